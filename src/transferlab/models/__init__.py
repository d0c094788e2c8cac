"""Pretrained backbones behind one small interface, whatever zoo they come from.

A :class:`Backbone` is a model plus a *chain*: the model's forward pass written as a list of blocks
``[(name, module), ...]`` whose composition equals ``model(x)``; the last block is the head slot the
probe fills (a ``Linear(num_features, n_classes)`` at ``classifier_name``, a dotted module path).
Caches cut the chain where the first trainable layer begins (see ``transferlab.features``).

Zoos: the catalogue (pytorchcv, EfficientNet-Lite), and by prefix ``timm:NAME[.TAG]``,
``torchvision:NAME[:WEIGHTS]`` and ``hf:MODEL_ID_OR_FOLDER``. One adapter module per zoo, the only one
importing it, with the same functions: ``build``, ``classifier_name``, ``blocks``, ``weights_status``
(and for the prefixed zoos ``resolve`` and ``list_available``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.data import Preprocessing
from transferlab.models import local_zoo
from transferlab.models.blocks import get_path, set_path
from transferlab.models.registry import CATALOGUE, DEFAULT_BACKBONE, ZOO_PREFIXES, BackboneSpec, get_spec, resolve_spec, with_source

__all__ = [
    "Backbone", "BackboneSpec", "CATALOGUE", "DEFAULT_BACKBONE", "DEFAULT_MODEL_DIR", "ZOO_PREFIXES",
    "get_spec", "list_backbones", "list_zoo", "load_backbone", "resolve_spec", "with_source",
]

DEFAULT_MODEL_DIR = os.path.join("~", ".torch", "models")  # pytorchcv's own default


def _zoo(spec: BackboneSpec) -> ModuleType:
    if spec.zoo == "pytorchcv":
        from transferlab.models import pytorchcv_zoo

        return pytorchcv_zoo
    if spec.zoo == "timm":
        from transferlab.models import timm_zoo

        return timm_zoo
    if spec.zoo == "torchvision":
        from transferlab.models import torchvision_zoo

        return torchvision_zoo
    if spec.zoo == "hf":
        from transferlab.models import hf_zoo

        return hf_zoo
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
        """Dotted path of the head slot (``fc``, ``head.fc``, ``classifier.1``); its keys prefix the saved head."""
        return _zoo(self.spec).classifier_name(self.model)

    @property
    def classifier(self) -> nn.Linear:
        head = get_path(self.model, self.classifier_name)
        assert isinstance(head, nn.Linear), f"{self.spec.name}: the head slot holds {type(head).__name__}"
        return head

    @property
    def num_features(self) -> int:
        """Width of the features the head reads (the penultimate layer)."""
        return self.classifier.in_features

    @property
    def feature_dim(self) -> int:  # the older name of num_features
        return self.num_features

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    def chain(self) -> list[tuple[str, nn.Module]]:
        """The forward pass as ``[(name, block), ...]``; recomputed so a replaced head is picked up.

        Names are the blocks' parameter-name prefixes (``layer4.1``, ``stages.3.blocks.2``, ``blocks.11``);
        a model whose blocks cannot be derived has two: ``features`` and the head.
        """
        return _zoo(self.spec).blocks(self.model)

    def reset_classifier(self, head: nn.Linear) -> None:
        """Put `head` in the head slot (same module path, so layer order is unchanged)."""
        set_path(self.model, self.classifier_name, head)


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
        if hasattr(zoo, "adapt_state"):
            state = zoo.adapt_state(state, model)
        local_zoo.load_into(model, state, weights, zoo.classifier_name(model))
        spec = spec.with_local_weights(weights)
        origin = os.path.abspath(weights)
    else:
        model = zoo.build(spec, pretrained=pretrained, model_dir=model_dir)
        origin = "pretrained" if pretrained else "random"
    model.eval()
    return Backbone(spec, model, origin, weights_digest(model, zoo.classifier_name(model)))


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



def list_zoo(zoo: str, pattern: str = "*", model_dir: str = DEFAULT_MODEL_DIR) -> list[dict]:
    """Names usable with the `zoo` prefix that match `pattern` (fnmatch), and whether their weights are
    on this machine (nothing is downloaded, no model is built)."""
    if zoo not in ZOO_PREFIXES:
        raise ConfigError("zoo", zoo, f"unknown zoo; known: {', '.join(ZOO_PREFIXES)}")
    spec = BackboneSpec("", zoo, "", "", None, Preprocessing())
    return _zoo(spec).list_available(pattern, model_dir)
