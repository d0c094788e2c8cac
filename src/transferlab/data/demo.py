"""The offline demo data set: scikit-learn's handwritten digits written out as an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(root: str | Path, per_class: tuple[int, int, int] = (30, 10, 20), seed: int = 0) -> Path:
    """Write ``root/{train,val,test}/<digit>/*.png`` from sklearn's 8x8 digits (upscaled to 64x64 RGB).

    `per_class` = images per class in train, val, test, drawn without overlap with `seed`.
    Existing files are reused, so calling it twice is cheap.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        start = 0
        for split, n in zip(("train", "val", "test"), per_class):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx[start : start + n]:
                path = folder / f"digit_{i:04d}.png"
                if not path.exists():
                    grey = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white
                    Image.fromarray(grey, "L").resize((64, 64), Image.Resampling.BICUBIC).convert("RGB").save(path)
            start += n
    return root
