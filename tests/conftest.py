"""Shared fixtures: tiny image folders made on the fly, random-weight backbones, the shared photo sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def shared_dataset(name: str) -> Path:
    """Path of a real photo set in ../shared/data; fail under CI, skip elsewhere, when it is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        message = f"shared data set {path} is missing"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def write_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 40, seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/img_i.png`` images whose colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    classes = sorted({c for per in counts.values() for c in per})
    for split, per_class in counts.items():
        for c, n in per_class.items():
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[classes.index(c) % 3] = 200
            for i in range(n):
                noise = rng.integers(0, 80, size=(size, size, 3))
                arr = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr, "RGB").save(folder / f"img_{i:03d}.png")
    return root


def require(module: str):
    """Import an optional test dependency; under CI a missing one fails instead of skipping."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (CI installs .[test,ray])")
        pytest.skip(f"{module} is not installed")


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """3 classes; train 8 / val 3 / test 3 images per class."""
    counts = {
        "train": {c: 8 for c in ("a", "b", "c")},
        "val": {c: 3 for c in ("a", "b", "c")},
        "test": {c: 3 for c in ("a", "b", "c")},
    }
    return write_image_folder(tmp_path / "data", counts)


@pytest.fixture(scope="session")
def resnet10_random():
    """resnet10 with random weights, built once; tests must not modify it (use copy.deepcopy)."""
    from transferlab.backbones import load_backbone

    return load_backbone("resnet10", pretrained=False)
