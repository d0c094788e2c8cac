"""Experiment tracking: every run of a probe or a sweep sent to a tracker (MLflow), as one more run observer.

A tracker watches the same events as the ledger and the progress bars (``train.observer``) and, when the
command ends, pushes from the folder what the events did not carry (a sweep's runs finished by an earlier
command, its report and figures). It never fails the command: a tracker that cannot be reached says so in
one warning line and the command goes on. ``track.mlflow`` is the only module importing mlflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transferlab.track.config import Kind, TrackConfig
from transferlab.train.observer import RunObserver


@contextmanager
def tracking(cfg: TrackConfig, out: str | Path, kind: Kind) -> Iterator[list[RunObserver]]:
    """The observers that track the command writing `out` (none without ``--track``). On a normal exit the
    tracker pushes what is missing from the folder and ends its runs; on an error or Ctrl-C it marks the
    runs in flight killed (the next run of the same command logs them anew)."""
    if cfg.track is None:
        yield []
        return
    from transferlab.track.mlflow import MlflowTracker
    from transferlab.track.push import push_missing

    tracker = MlflowTracker(Path(out), kind, cfg.track_uri, cfg.track_experiment)
    try:
        yield [tracker]
    except BaseException:
        tracker.close(interrupted=True)
        raise
    tracker.close(push=push_missing)


__all__ = ["Kind", "TrackConfig", "tracking"]
