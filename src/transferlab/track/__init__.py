"""Experiment tracking: every run of a probe or a sweep sent to a tracker (MLflow), as one more run observer.

A tracker watches the same events as the ledger and the progress bars (``train.observer``) and, when the
command ends, pushes from the folder what the events did not carry (a sweep's runs finished by an earlier
command, its report and figures). It never fails the command: a tracker that cannot be reached says so in
one warning line and the command goes on. ``track.mlflow`` is the only module importing mlflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transferlab.core.fields import option
from transferlab.train.observer import RunObserver

Kind = Literal["probe", "sweep"]


@dataclass(frozen=True)
class TrackConfig:
    """Where the runs of a command are tracked (nothing is sent anywhere without ``--track``)."""

    track: str | None = option(None, "also log every run to an experiment tracker: mlflow (pip install 'transferlab[mlflow]')",
                               choices=("mlflow",))
    track_uri: str | None = option(None, "the tracker: an MLflow server (http://host:port) or a sqlite:///FILE store "
                                   "(default: OUT/mlflow.db, artifacts in OUT/mlruns)")
    track_experiment: str = option("transferlab", "the MLflow experiment the runs go into")


@contextmanager
def tracking(cfg: TrackConfig, out: str | Path, kind: Kind) -> Iterator[list[RunObserver]]:
    """The observers that track the command writing `out` (none without ``--track``). On a normal exit the
    tracker pushes what is missing from the folder and ends its runs; on an error or Ctrl-C it marks the
    runs in flight killed (the next run of the same command logs them anew)."""
    if cfg.track is None:
        yield []
        return
    from transferlab.track.mlflow import MlflowTracker

    tracker = MlflowTracker(Path(out), kind, cfg.track_uri, cfg.track_experiment)
    try:
        yield [tracker]
    except BaseException:
        tracker.close(interrupted=True)
        raise
    tracker.close()


__all__ = ["Kind", "TrackConfig", "tracking"]
