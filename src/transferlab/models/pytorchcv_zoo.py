"""Adapter for pytorchcv models (ResNet, MobileNet; ImageNet-1k and CUB-200-2011 weights).

The only module that imports pytorchcv. Weights come through pytorchcv's own
``get_model(name, pretrained=True, root=model_dir)``, which looks for
``{name}-{error}-{sha1[:8]}.pth`` in ``model_dir``, verifies its full sha1 and otherwise downloads it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any

import torch
from torch import nn

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.hashing import file_digest
from transferlab.models.spec import BackboneSpec

NAME = "pytorchcv"
REF_FORM = None  # its models are the catalogue's names (resnet10, resnet10_cub): no "pytorchcv:" names
CLASSIFIER = "output"


def classifier_name(model: nn.Module) -> str:
    return CLASSIFIER


def resolve(ref: str) -> BackboneSpec:
    """Never reached through the registry (REF_FORM is None): pytorchcv models have catalogue names only."""
    raise ConfigError("backbone", f"{NAME}:{ref}", "pytorchcv models are used by their catalogue names (transferlab backbones)")


def list_available(pattern: str, model_dir: str) -> list[dict]:
    """None by zoo (REF_FORM is None): pytorchcv models are listed in the catalogue (``list_backbones``)."""
    return []


def adapt_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """pytorchcv checkpoints use the model's own tensor names: nothing to adapt."""
    return state


def expected_weights_file(arch: str) -> tuple[str, str]:
    """(file name pytorchcv expects, full sha1) for `arch`."""
    from pytorchcv.models.common.model_store import get_model_name_suffix_data

    error, sha1, _tag = get_model_name_suffix_data(arch)
    return f"{arch}-{error}-{sha1[:8]}.pth", sha1


def weights_status(spec: BackboneSpec, model_dir: str) -> str:
    """'present' if the expected file is in `model_dir`, else 'missing (<file>)'. sha1 is checked at load."""
    file_name, _ = expected_weights_file(spec.arch)
    path = os.path.join(os.path.expanduser(model_dir), file_name)
    return "present" if os.path.isfile(path) else f"missing ({file_name})"


def build(spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
    """Build `spec.arch`; with `pretrained`, load the official weights or raise a UserError naming the file."""
    from pytorchcv.model_provider import get_model

    if not pretrained:
        return get_model(spec.arch, pretrained=False)
    model_dir = os.path.expanduser(model_dir)
    file_name, sha1 = expected_weights_file(spec.arch)
    path = os.path.join(model_dir, file_name)
    problem = "not found"
    if os.path.isfile(path):
        if file_digest(path, "sha1") == sha1:
            problem = ""
        else:
            problem = "present but its sha1 does not match the published one"
    try:
        # pytorchcv prints download progress on stdout; keep stdout for our own (JSON) output.
        with contextlib.redirect_stdout(sys.stderr):
            return get_model(spec.arch, pretrained=True, root=model_dir)
    except Exception as e:  # network errors, zip errors, hash mismatch after download
        reason = download_failure(e)
        raise UserError(
            f"no pretrained weights for backbone '{spec.name}': expected file {file_name} in {model_dir} "
            f"({problem or 'unreadable'}; download failed: {reason}); put the official file there or pass --model-dir"
        ) from None


def download_failure(error: BaseException, limit: int = 160) -> str:
    """A short, whole-word account of why a download failed: the host that could not be reached, if any,
    else the first line of the error, cut at a word boundary."""
    text = str(error).splitlines()[0] if str(error) else ""
    host = re.search(r"host='([^']+)'", text)
    if host:
        return f"{type(error).__name__}: cannot reach {host.group(1)}"
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def blocks(model: Any) -> list[tuple[str, nn.Module]]:
    """The model as a chain of blocks whose composition equals ``model.forward``.

    pytorchcv classifiers are ``features`` (init_block, stages of units, final_pool) -> flatten -> output.
    Stages are split into their units so a fine-tuning cache can stop right before a unit.
    """
    chain: list[tuple[str, nn.Module]] = []
    for name, child in model.features.named_children():
        if name.startswith("stage") and isinstance(child, nn.Sequential):
            chain += [(f"features.{name}.{unit_name}", unit) for unit_name, unit in child.named_children()]
        else:
            chain.append((f"features.{name}", child))
    chain.append(("flatten", nn.Flatten(1)))
    chain.append((CLASSIFIER, getattr(model, CLASSIFIER)))
    return chain
