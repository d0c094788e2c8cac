"""Adapter for torchvision classification models: ``torchvision:NAME[:WEIGHTS]``.

The only module that imports torchvision.models. Models come from ``torchvision.models.get_model``;
preprocessing, source data set and ImageNet top-1 from the weights enum (``weights.transforms()``,
``weights.meta["_metrics"]``; ``DEFAULT`` when no weights are named). Pretrained files live in
torch.hub's checkpoint folder (downloaded there when the network answers).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any

import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.data import Preprocessing
from transferlab.models.blocks import Call, get_path, last_linear, split_sequential, uncovered, without_classifier
from transferlab.models.spec import BackboneSpec

NAME = "torchvision"
REF_FORM = "NAME"  # torchvision:NAME[:WEIGHTS]
PREFIX = NAME + ":"


def _weights(arch: str, tag: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum[tag or "DEFAULT"]
    except KeyError:
        known = [w.name for w in enum]
        raise ConfigError("backbone", f"{PREFIX}{arch}:{tag}", f"no weights {tag} for {arch}; known: {', '.join(known)}") from None


def _source(weights: Any) -> tuple[str, float | None]:
    metrics = weights.meta.get("_metrics", {})
    if "ImageNet-1K" in metrics:
        return "imagenet1k", float(metrics["ImageNet-1K"]["acc@1"])
    return (next(iter(metrics)).lower() if metrics else "unknown"), None


def resolve(ref: str) -> BackboneSpec:
    """The spec of ``torchvision:<ref>`` from the weights enum (no model is built)."""
    from torchvision.models import list_models

    arch, _, tag = ref.partition(":")
    names = list_models(module=__import__("torchvision").models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ConfigError("backbone", PREFIX + ref, f"torchvision has no classification model {arch}{hint}")
    weights = _weights(arch, tag)
    tf = weights.transforms()
    pre = Preprocessing(int(tf.crop_size[0]), tf.crop_size[0] / tf.resize_size[0], tf.interpolation.value,
                        tuple(tf.mean), tuple(tf.std), resize=int(tf.resize_size[0]))
    source, top1 = _source(weights)
    return BackboneSpec(PREFIX + ref, "torchvision", arch, source, top1, pre, tag=weights.name)


def _checkpoint_path(weights: Any) -> str:
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def weights_status(spec: BackboneSpec, model_dir: str) -> str:
    path = _checkpoint_path(_weights(spec.arch, spec.tag))
    return "present" if os.path.isfile(path) else f"missing ({path})"


def build(spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
    """``get_model(arch)``; with `pretrained`, the weights enum's file (a ConfigError naming it if absent)."""
    from torchvision.models import get_model

    model = get_model(spec.arch, weights=None)
    if pretrained:
        weights = _weights(spec.arch, spec.tag)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # offline, or a corrupt file
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
            raise ConfigError("backbone", spec.name, f"no pretrained weights for torchvision {spec.arch} {weights.name}: "
                              f"expected {_checkpoint_path(weights)} (download failed: {reason}); pass --weights FILE") from None
        model.load_state_dict(state)
    return model


def adapt_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision checkpoints use the model's own tensor names: nothing to adapt."""
    return state


def classifier_name(model: nn.Module) -> str:
    """The last Linear layer: ``fc``, ``classifier.1``, ``classifier.3``, ``heads.head``."""
    return last_linear(model)


def _feature_blocks(model: Any) -> list[tuple[str, nn.Module]] | None:
    """Blocks up to the classifier's Sequential for the families whose forward we know, else None."""
    kind = type(model).__name__
    if kind == "ResNet":
        chain = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for n in ("layer1", "layer2", "layer3", "layer4"):
            chain += split_sequential(n, getattr(model, n))
        return chain + [("avgpool", model.avgpool), ("flatten", nn.Flatten(1))]
    if kind in ("EfficientNet", "MobileNetV2", "MobileNetV3", "ConvNeXt"):
        chain = []
        for name, child in model.features.named_children():  # stages of units are split into their units
            units = list(child.children())
            stage = isinstance(child, nn.Sequential) and units and all(isinstance(u, nn.Sequential) or hasattr(u, "block") for u in units)
            chain += split_sequential(f"features.{name}", child) if stage and len(units) > 1 else [(f"features.{name}", child)]
        if kind == "MobileNetV2":  # pooling is a function call in its forward
            pool: nn.Module = Call(lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1))
            return chain + [("avgpool", pool)]
        return chain + [("avgpool", model.avgpool)] + ([] if kind == "ConvNeXt" else [("flatten", nn.Flatten(1))])
    if kind == "VisionTransformer":
        def tokens(x: torch.Tensor) -> torch.Tensor:
            x = model._process_input(x)
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return model.encoder.dropout(x + model.encoder.pos_embedding)

        embed = Call(tokens, {"conv_proj": model.conv_proj, "dropout": model.encoder.dropout},
                     {"class_token": model.class_token, "pos_embedding": model.encoder.pos_embedding})
        pool = Call(lambda x: model.encoder.ln(x)[:, 0], {"ln": model.encoder.ln})
        return [("conv_proj", embed)] + split_sequential("encoder.layers", model.encoder.layers) + [("encoder.ln", pool)]
    return None


def blocks(model: Any) -> list[tuple[str, nn.Module]]:
    """The model as a chain composing to ``model.forward``: stem, stage units, pooling, the classifier's
    own layers (``classifier.0``, ...). Other families: ``[features, classifier]``."""
    head_name = classifier_name(model)
    head = get_path(model, head_name)
    features = _feature_blocks(model)
    parent = head_name.rpartition(".")[0]
    if features is None:
        modules, params = uncovered(model, [head])
        return [("features", Call(without_classifier(model, head_name), modules, params)), (head_name, head)]
    # The layers around the classifier in its container (dropout, LayerNorm2d + Flatten, a hidden Linear).
    tail = split_sequential(parent, get_path(model, parent)) if parent else [(head_name, head)]
    return features + tail


def list_available(pattern: str, model_dir: str) -> list[dict]:
    """torchvision classification models x weights matching `pattern`, with whether the file is cached."""
    import torchvision
    from torchvision.models import get_model_weights, list_models

    rows = []
    for arch in list_models(module=torchvision.models):
        for w in get_model_weights(arch):
            name = f"{arch}:{w.name}"
            if not (fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(arch, pattern)):
                continue
            source, top1 = _source(w)
            path = _checkpoint_path(w)
            rows.append({"name": PREFIX + name, "zoo": "torchvision", "source": source, "source_top1": top1,
                         "weights": "present" if os.path.isfile(path) else f"missing ({path})"})
    return rows
