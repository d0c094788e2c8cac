"""Issue 19, data items: one decoder for paths and PIL images, 16-bit and bomb-sized images, content-keyed
caches and data-change detection, and bad input (missing CSV files, negative flags) named in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transferlab.data import load_rgb, to_rgb


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("kind", ["rgb-exif", "palette-transparency", "16bit-exif", "16bit-large", "grey-large"])
def test_to_rgb_of_an_opened_png_equals_load_rgb_pixel_for_pixel(tmp_path, kind):
    """`to_rgb(Image.open(p), m)` is what `load_rgb(p, m)` gives, for every step after decoding."""
    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.png"
    if kind == "rgb-exif":
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(path, exif=_exif(6))
    elif kind == "palette-transparency":
        img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).convert("P")
        img.save(path, transparency=3)
    elif kind == "16bit-exif":
        Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16)).save(path, exif=_exif(8))
    elif kind == "16bit-large":
        Image.fromarray(rng.integers(0, 65535, (130, 170), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (130, 170), dtype=np.uint8)).save(path)
    for min_size in (None, 16):
        expected = np.asarray(load_rgb(str(path), min_size))
        got = np.asarray(to_rgb(Image.open(path), min_size))
        assert got.shape == expected.shape
        assert np.array_equal(got, expected)
    if kind.endswith("exif"):  # orientation 6 or 8 swaps the sides: the transpose was applied
        assert np.asarray(to_rgb(Image.open(path))).shape[:2] == (50, 30)
