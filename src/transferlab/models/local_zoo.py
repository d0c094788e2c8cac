"""Adapter for local checkpoint files (``.safetensors`` or ``.pth``) loaded into a known architecture.

``.pth`` files are read with ``torch.load(weights_only=True)``: a pickle that needs arbitrary code is
refused with an explanation, never loaded unsafely.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from transferlab.core.errors import ConfigError


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers."""
    if not os.path.isfile(path):
        raise ConfigError("weights", path, "no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ConfigError(
            "weights", path, f"refused by torch.load(weights_only=True) because it holds pickled objects "
            f"other than tensors ({first}); re-save it as a plain state_dict or .safetensors"
        ) from None
    except Exception as e:
        raise ConfigError("weights", path, f"cannot read checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("weights", path, "not a state_dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str, classifier: str) -> None:
    """Load `state` into `model`, naming the first missing or mismatching tensor.

    Classifier tensors are loaded only when their shapes fit: the classifier is replaced anyway.
    """
    own = model.state_dict()
    for name, ref in own.items():
        is_head = name.startswith(classifier + ".")
        if name not in state:
            if is_head:
                continue
            raise ConfigError("weights", path, f"tensor {name} is missing from the checkpoint")
        if tuple(state[name].shape) != tuple(ref.shape):
            if is_head:
                continue
            raise ConfigError("weights", path, f"tensor {name} has shape {tuple(state[name].shape)}, "
                              f"the architecture needs {tuple(ref.shape)}")
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fitting, strict=False)
