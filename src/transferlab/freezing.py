"""Which layers train: layer naming, freezing the rest, and keeping frozen layers in eval mode.

A *layer* is a unique parameter-name prefix (the name minus ``.weight``/``.bias``) in definition
order; ``n_trainable_layers = k`` trains the last k layers. Frozen layers stay in eval mode during
training, so their weights *and* batch-norm running statistics do not change (the course code this
tool replaces put the whole model in train mode and let them drift).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn

from .utils import UserError


def layer_names(model: nn.Module) -> list[str]:
    """Unique parameter-name prefixes of `model`, in definition order."""
    names: list[str] = []
    seen: set[str] = set()
    for name, _ in model.named_parameters():
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        if prefix not in seen:
            seen.add(prefix)
            names.append(prefix)
    return names


@dataclass(frozen=True)
class FreezePlan:
    """Train the last `n_trainable_layers` layers of a model, freeze the rest."""

    n_trainable_layers: int = 1

    def trainable_layers(self, model: nn.Module) -> list[str]:
        names = layer_names(model)
        k = self.n_trainable_layers
        if not 1 <= k <= len(names):
            raise UserError(f"--n-trainable-layers {k}: must be between 1 and {len(names)} (the model's layer count)")
        return names[-k:]

    def apply(self, model: nn.Module) -> list[str]:
        """Set ``requires_grad`` accordingly and return the trainable layer names."""
        trainable = set(self.trainable_layers(model))
        for name, param in model.named_parameters():
            prefix = name.rsplit(".", 1)[0] if "." in name else ""
            param.requires_grad_(prefix in trainable)
        return [n for n in layer_names(model) if n in trainable]


def set_train_mode(model: nn.Module, training: bool, train_bn: bool = True) -> None:
    """Eval mode everywhere, except (when `training`) modules that own a trainable parameter.

    Parameter-free modules (dropout, pooling) also stay in eval mode: the frozen part of the network
    is then a fixed function of the image, which is what makes feature caching exact. With
    ``train_bn=False`` trainable batch-norm layers learn their affine parameters but keep normalising
    with (and keep) their pretrained running statistics.
    """
    model.eval()
    if training:
        for module in model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                if train_bn or not isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module) -> dict:
    """Trainable parameters plus the buffers (BN running stats) of modules that own them: what training changes."""
    state = {}
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if any(p.requires_grad for _, p in own):
            prefix = f"{mod_name}." if mod_name else ""
            for n, t in list(own) + list(module.named_buffers(recurse=False)):
                state[prefix + n] = t.detach().clone()
    return state


def frozen_digest(model: nn.Module) -> str:
    """sha256 over every frozen parameter and every buffer of a module without trainable parameters.

    Equal before and after training means the frozen part was not touched (MoCo's linear-eval check).
    """
    h = hashlib.sha256()
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if any(p.requires_grad for _, p in own):
            continue
        for n, t in own + list(module.named_buffers(recurse=False)):
            h.update(f"{mod_name}.{n}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
