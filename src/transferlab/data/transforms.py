"""Preprocessing as data, and the two views of an image made from it: the deterministic evaluation
transform (resize, center crop, normalise) and the seeded augmented view (random resized crop, mirror).

Each view is made in two steps: the geometry (PIL, 8-bit pixels: :func:`eval_pixels`,
:func:`augmented_pixels`), then :func:`normalise_into`, which turns the pixels into the float tensor
``ToTensor`` and ``Normalize`` make, in place, plane by plane.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation preprocessing: resize the short side, center crop, normalise.

    The short side goes to `resize` pixels when given (torchvision's weights transforms, HF image
    processors), else to ``int(input_size / crop_pct)`` (timm's crop_pct). With `squash` the image is
    resized to input_size x input_size directly, aspect ratio not kept, and not cropped (HF ViT).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"  # one of INTERPOLATIONS
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: int | None = None
    squash: bool = False

    @property
    def resize_size(self) -> int:
        """The short side before the center crop (input_size itself with `squash`)."""
        if self.squash:
            return self.input_size
        return self.resize if self.resize is not None else int(self.input_size / self.crop_pct)


# PIL resampling filters by the names timm, torchvision and HF use.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}

def _geometry(pre: Preprocessing) -> list:
    from torchvision import transforms

    interp = transforms.InterpolationMode(pre.interpolation)
    if pre.squash:
        return [transforms.Resize((pre.input_size, pre.input_size), interpolation=interp)]
    return [transforms.Resize(pre.resize_size, interpolation=interp), transforms.CenterCrop(pre.input_size)]


def build_transform(pre: Preprocessing):
    """The torchvision transform for `pre` (PIL RGB image -> normalised float tensor): the definition
    that :func:`eval_pixels` followed by :func:`normalise_into` computes faster, bit for bit."""
    from torchvision import transforms

    return transforms.Compose([*_geometry(pre), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])


def eval_pixels(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """The evaluation view's geometry of an RGB image as ``(H, W, 3)`` uint8: :func:`build_transform`'s
    Resize and CenterCrop, pixel for pixel (:func:`resized_center_crop`)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    interp, size = InterpolationMode(pre.interpolation), [pre.input_size, pre.input_size]
    if pre.squash:
        return np.asarray(TF.resize(img, size, interp))
    return np.asarray(resized_center_crop(img, pre.resize_size, pre.input_size, pre.interpolation))


def resized_center_crop(img: Image.Image, resize_size: int, crop_size: int, interpolation: str) -> Image.Image:
    """torchvision's ``center_crop(resize(img, resize_size), crop_size)`` of a PIL image, the same pixels,
    resampling only the crop on each axis where that gives the same numbers.

    Pillow computes output pixel i of an axis from source position ``box_start + (i + 0.5) * scale``,
    with the box in float32. Resampling just the crop's box puts each of its pixels at the same source
    position when those positions are exact: when the axis's scale (source / resized length) is a
    dyadic fraction, as for any side resized to 256 (227 -> 256: 227/256). Such an axis skips the
    resized pixels the crop drops (a 227 px square to 256 then 224: 23% less resampling); any other
    axis is resampled whole and cropped after. Pillow 13 runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width; the crop's box is asked for only
    where that choice is the same as for the whole resize (the two orders round differently).
    """
    from torchvision.transforms import functional as TF

    resample = INTERPOLATIONS[interpolation]
    plan = None if resample == Image.Resampling.NEAREST else _crop_plan(*img.size, resize_size, crop_size)
    if plan is None:  # nearest (no filter taps, nothing to gain), or a crop larger than the image (padded)
        return TF.center_crop(TF.resize(img, resize_size, TF.InterpolationMode(interpolation)), [crop_size, crop_size])
    size, box, crop = plan
    resized = img.resize(size, resample, box=box)
    return resized if crop is None else resized.crop(crop)


Box = tuple[float, float, float, float]


@functools.lru_cache(maxsize=4096)
def _crop_plan(w: int, h: int, resize_size: int, crop_size: int) -> tuple[tuple[int, int], Box, Box | None] | None:
    """For :func:`resized_center_crop`: the size and source box to resample and the crop of that left to take
    (None: none); None when the crop is larger than the resized image."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)  # torchvision's rule
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if crop_size > min(new_w, new_h):
        return None
    left, top = int(round((new_w - crop_size) / 2.0)), int(round((new_h - crop_size) / 2.0))
    x_box, y_box = _exact_crop_box(w, new_w, left, crop_size), _exact_crop_box(h, new_h, top, crop_size)
    out_w, out_h = crop_size if x_box else new_w, crop_size if y_box else new_h
    if _vertical_first(w, h, new_w, new_h) != _vertical_first(w, h, out_w, out_h):  # the two orders round differently
        x_box = y_box = None
        out_w, out_h = new_w, new_h
    (x0, x1), (y0, y1) = x_box or (0.0, float(w)), y_box or (0.0, float(h))
    if x_box and y_box:
        return (out_w, out_h), (x0, y0, x1, y1), None
    crop_left, crop_top = 0 if x_box else left, 0 if y_box else top
    return (out_w, out_h), (x0, y0, x1, y1), (crop_left, crop_top, crop_left + crop_size, crop_top + crop_size)


def _exact_crop_box(n_source: int, n_resized: int, start: int, n_crop: int) -> tuple[float, float] | None:
    """The source interval of resized pixels ``[start, start + n_crop)`` when Pillow's sample positions
    for it are exactly those of the whole resize (see :func:`resized_center_crop`); else None."""
    from fractions import Fraction

    scale = Fraction(n_source, n_resized)
    if n_source == n_resized or scale.denominator & (scale.denominator - 1):  # no resampling; not dyadic
        return None
    lo, hi = scale * start, scale * (start + n_crop)
    # With a dyadic scale every position is exact in double; the box's float32 corners and length must be too.
    if any(Fraction(float(np.float32(float(v)))) != v for v in (lo, hi, hi - lo)):
        return None
    return float(lo), float(hi)


def _vertical_first(w: int, h: int, out_w: int, out_h: int) -> bool:
    """Whether Pillow (13 and later) resamples rows before columns for a `w` x `h` -> `out_w` x `out_h` resize."""
    return h - out_h > 0 and h - out_h > (w - out_w) * 2


def normalise_into(pixels: np.ndarray, pre: Preprocessing, out: torch.Tensor) -> torch.Tensor:
    """Write the normalised ``(3, H, W)`` float32 tensor of `pixels` (``(H, W, 3)`` uint8) into `out`: the
    numbers of ``ToTensor`` then ``Normalize(pre.mean, pre.std)``, at a fraction of the cost.

    The same float32 operations in the same order (v / 255, then (x - mean) / std), each correctly
    rounded, on each plane in place: no stacked, permuted or collated copies (a lookup table of the 256
    values per channel gives the same numbers at twice the cost: the index array is converted first).
    """
    planes = out.numpy()
    for c in range(3):
        plane = planes[c]
        np.copyto(plane, pixels[:, :, c], casting="unsafe")  # uint8 -> float32, exact
        np.divide(plane, np.float32(255), out=plane)
        np.subtract(plane, np.float32(pre.mean[c]), out=plane)
        np.divide(plane, np.float32(pre.std[c]), out=plane)
    return out


DEFAULT_MIN_SCALE = 0.35  # smallest crop, as a fraction of the image's area


def augmented_view(img: Image.Image, pre: Preprocessing, gen: torch.Generator, min_scale: float = DEFAULT_MIN_SCALE) -> torch.Tensor:
    """A random resized crop (`min_scale`-100% of the area, aspect 3/4-4/3) and a coin-flip horizontal
    mirror, drawn from `gen` alone, then resized to the input size and normalised like the evaluation view."""
    from torchvision.transforms import functional as TF

    return TF.normalize(TF.to_tensor(Image.fromarray(augmented_pixels(img, pre, gen, min_scale))), pre.mean, pre.std)


def augmented_pixels(img: Image.Image, pre: Preprocessing, gen: torch.Generator, min_scale: float = DEFAULT_MIN_SCALE) -> np.ndarray:
    """:func:`augmented_view`'s geometry (crop, resize, mirror): ``(input_size, input_size, 3)`` uint8."""
    w, h = img.size

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand(1, generator=gen).item()

    box = None
    for _ in range(10):
        area = w * h * uniform(min_scale, 1.0)
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # extreme aspect ratios: the central square
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    resample = INTERPOLATIONS[pre.interpolation]
    img = img.crop(box).resize((pre.input_size, pre.input_size), resample)
    if torch.rand(1, generator=gen).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)
