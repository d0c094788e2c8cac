"""Library-free helpers for writing a model's forward pass as a chain of blocks.

A chain block must own exactly the parameters it uses (``plan_cut`` finds the cut through
``block.parameters()``), so operations that are not modules of their own (a class token and position
embedding, pooling plus a final norm, "the whole network up to the classifier") are wrapped in
:class:`Call`, which registers the modules and parameters the operation uses and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Call(nn.Module):
    """A block computing ``fn(x)`` with `modules` and `params` registered as its own (shared, not copied)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], modules: dict[str, nn.Module] | None = None,
                 params: dict[str, nn.Parameter | None] | None = None):
        super().__init__()
        self.fn = fn  # a plain attribute: the model it closes over is not registered (its parameters are not ours)
        self.parts = nn.ModuleDict({k.replace(".", "__"): m for k, m in (modules or {}).items()})
        self.own = nn.ParameterDict({k.replace(".", "__"): p for k, p in (params or {}).items() if p is not None})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def get_path(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_path(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def uncovered(model: nn.Module, covered: list[nn.Module]) -> tuple[dict[str, nn.Module], dict[str, nn.Parameter | None]]:
    """The largest submodules of `model` sharing nothing with `covered`, and the parameters held
    directly by modules that contain a covered one (e.g. a ViT's ``cls_token`` on the root)."""
    inside = {id(s) for m in covered for s in m.modules()}
    owned = {id(p) for m in covered for p in m.parameters()}  # e.g. a cls_token a block registered itself
    modules: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter | None] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for n, p in module.named_parameters(recurse=False):
            if id(p) not in owned:
                params[prefix + n] = p
        for name, child in module.named_children():
            if id(child) in inside:
                continue
            if any(id(s) in inside for s in child.modules()):
                walk(f"{prefix}{name}.", child)
            else:
                modules[prefix + name] = child

    walk("", model)
    return modules, params


def call_rest(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, covered: list[nn.Module]) -> Call:
    """`fn` as a block owning every part of `model` not in `covered` (the blocks around it, the classifier)."""
    modules, params = uncovered(model, covered)
    return Call(fn, modules, params)


def split_sequential(prefix: str, seq: nn.Module) -> list[tuple[str, nn.Module]]:
    """A stage's units as blocks (``layer1.0``, ``layer1.1``, ...)."""
    return [(f"{prefix}.{name}", child) for name, child in seq.named_children()]


def without_classifier(model: nn.Module, classifier: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s own forward with the classifier swapped for an identity: its input, the features."""

    def features(x: torch.Tensor) -> torch.Tensor:
        head = get_path(model, classifier)
        set_path(model, classifier, nn.Identity())
        try:
            return model(x)
        finally:
            set_path(model, classifier, head)

    return features


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` in definition order (torchvision's classifiers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no Linear layer")
    return names[-1]
