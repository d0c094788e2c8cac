"""Pretrained backbones behind one small interface, whatever zoo they come from.

A :class:`Backbone` is a model plus a *chain*: the model's forward pass written as a list of blocks
``[(name, module), ...]`` whose composition equals ``model(x)``; the last block is the classifier.
Caches cut the chain where the first trainable layer begins (see ``transferlab.features``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from . import local_zoo
from .registry import CATALOGUE, DEFAULT_BACKBONE, BackboneSpec, get_spec, with_source

__all__ = [
    "Backbone", "BackboneSpec", "CATALOGUE", "DEFAULT_BACKBONE", "DEFAULT_MODEL_DIR",
    "get_spec", "list_backbones", "load_backbone", "with_source",
]

DEFAULT_MODEL_DIR = os.path.join("~", ".torch", "models")  # pytorchcv's own default


def _zoo(spec: BackboneSpec) -> ModuleType:
    if spec.zoo == "pytorchcv":
        from . import pytorchcv_zoo

        return pytorchcv_zoo
    if spec.zoo == "timm":
        from . import timm_zoo

        return timm_zoo
    raise ValueError(f"unknown zoo {spec.zoo}")


@dataclass
class Backbone:
    """A built model with its spec, its chain of blocks and where its weights came from."""

    spec: BackboneSpec
    model: nn.Module
    weights: str  # "pretrained", "random" or the local file path
    weights_digest: str

    @property
    def classifier_name(self) -> str:
        return _zoo(self.spec).CLASSIFIER

    @property
    def classifier(self) -> nn.Linear:
        return getattr(self.model, self.classifier_name)

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def chain(self) -> list[tuple[str, nn.Module]]:
        """The forward pass as ``[(name, block), ...]``; recomputed so a replaced head is picked up."""
        return _zoo(self.spec).blocks(self.model)

    def reset_classifier(self, head: nn.Linear) -> None:
        """Replace the classifier with `head` (same attribute, so layer order is unchanged)."""
        setattr(self.model, self.classifier_name, head)


def weights_digest(model: nn.Module, skip_prefix: str) -> str:
    """sha256 of every tensor of `model` except the classifier's: identifies what a cache depends on."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(skip_prefix + "."):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_backbone(
    name: str,
    model_dir: str = DEFAULT_MODEL_DIR,
    weights: str | None = None,
    pretrained: bool = True,
) -> Backbone:
    """Build backbone `name` with its pretrained weights, or with a local checkpoint `weights`.

    `pretrained=False` gives random weights (benchmarks and tests of logic that does not depend on them).
    Missing weights raise a UserError naming the expected file and folder.
    """
    spec = get_spec(name)
    zoo = _zoo(spec)
    if weights is not None:
        state = local_zoo.read_state_dict(weights)
        model = zoo.build(spec, pretrained=False, model_dir=model_dir)
        local_zoo.load_into(model, state, weights, zoo.CLASSIFIER)
        spec = spec.with_local_weights(weights)
        origin = os.path.abspath(weights)
    else:
        model = zoo.build(spec, pretrained=pretrained, model_dir=model_dir)
        origin = "pretrained" if pretrained else "random"
    model.eval()
    return Backbone(spec, model, origin, weights_digest(model, zoo.CLASSIFIER))


def list_backbones(model_dir: str = DEFAULT_MODEL_DIR) -> list[dict]:
    """One row per catalogued backbone: name, zoo, source, top-1, parameters, preprocessing, weights."""
    rows = []
    for spec in CATALOGUE.values():
        zoo = _zoo(spec)
        model = zoo.build(spec, pretrained=False, model_dir=model_dir)
        pre = spec.preprocessing
        rows.append(
            {
                "name": spec.name,
                "zoo": spec.zoo,
                "arch": spec.arch,
                "source": spec.source,
                "source_top1": spec.source_top1,
                "params": sum(p.numel() for p in model.parameters()),
                "input_size": pre.input_size,
                "resize": pre.resize_size,
                "crop_pct": pre.crop_pct,
                "interpolation": pre.interpolation,
                "mean": list(pre.mean),
                "std": list(pre.std),
                "weights": zoo.weights_status(spec, model_dir),
            }
        )
    return rows


def check_weights_available(name: str, model_dir: str = DEFAULT_MODEL_DIR) -> str | None:
    """None if `name`'s weights are at hand, else a short reason (no model is built)."""
    spec = get_spec(name)
    status = _zoo(spec).weights_status(spec, model_dir)
    return None if status == "present" else status

