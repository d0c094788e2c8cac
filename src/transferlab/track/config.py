"""Where the runs of a command are tracked: the flags of ``--track``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transferlab.core.fields import option

Kind = Literal["probe", "sweep"]


@dataclass(frozen=True)
class TrackConfig:
    """Where the runs of a command are tracked (nothing is sent anywhere without ``--track``)."""

    track: str | None = option(None, "also log every run to an experiment tracker: mlflow (pip install 'transferlab[mlflow]')",
                               choices=("mlflow",))
    track_uri: str | None = option(None, "the tracker: an MLflow server (http://host:port) or a sqlite:///FILE store "
                                   "(default: OUT/mlflow.db, artifacts in OUT/mlruns)")
    track_experiment: str = option("transferlab", "the MLflow experiment the runs go into")
