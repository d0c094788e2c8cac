"""The per-image test predictions file: written by a probe and by a sweep for the one test evaluation of a
chosen model, read by the report's per-class insight and verdicts.

JSON: ``{"format": "transferlab-test-predictions", "version": 1, "classes": [...], "files": [...],
"labels": [...], "probs": [[...], ...]}``, one row of class probabilities per test image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from transferlab.core.files import atomic_write_bytes

PREDICTIONS_FORMAT = "transferlab-test-predictions"


def write_test_predictions(path: str | os.PathLike, classes, files, labels, probs) -> None:
    """Write ``test_predictions.json`` (see the module docstring); lists or numpy arrays in."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    classes, files = [str(c) for c in classes], [os.fspath(f) for f in files]
    _check(classes, files, labels, probs, str(path))
    data = {"format": PREDICTIONS_FORMAT, "version": 1, "classes": classes, "files": files,
            "labels": labels.tolist(), "probs": probs.tolist()}
    atomic_write_bytes(path, (json.dumps(data, separators=(",", ":")) + "\n").encode())


def read_test_predictions(path: str | os.PathLike) -> dict:
    """The predictions file as {"classes": list, "files": list, "labels": int array, "probs": (N, C) array}."""
    data = json.loads(Path(path).read_text())
    out = {"classes": list(data["classes"]), "files": list(data["files"]),
           "labels": np.asarray(data["labels"], dtype=np.int64).reshape(-1),
           "probs": np.asarray(data["probs"], dtype=np.float64).reshape(len(data["labels"]), len(data["classes"]))}
    _check(out["classes"], out["files"], out["labels"], out["probs"], str(path))
    return out


def _check(classes, files, labels, probs, where: str) -> None:
    n, c = len(labels), len(classes)
    if probs.ndim != 2 or probs.shape != (n, c) or len(files) != n:
        raise ValueError(f"{where}: probs must be (n_images, n_classes) = ({n}, {c}), got {probs.shape} and {len(files)} files")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"{where}: labels must be in 0..{c - 1}")


def ood_predictions_path(out: str | os.PathLike, name: str, digest: str, run_hash: str) -> Path:
    """Where a sweep keeps a chosen run's per-image predictions on extra test set `name` with images `digest`."""
    return Path(out) / "predictions" / f"ood_{name}" / digest / f"{run_hash}.json"


def sweep_predictions_path(out: str | os.PathLike, run_hash: str) -> Path:
    """Where a sweep keeps a chosen run's per-image test predictions: ``OUT/predictions/<hash>.json``."""
    return Path(out) / "predictions" / f"{run_hash}.json"
