"""The zoo interface and the zoo registry: one :class:`ZooAdapter` protocol, one ``ZOOS`` dict.

A zoo adapter is the only module that imports its model library (imported lazily, inside its
functions). Each adapter module satisfies :class:`ZooAdapter` with module-level constants and
functions; mypy checks that at its ``register_zoo`` line. A new zoo is one adapter module plus its
``register_zoo`` line at the bottom of this file (and its name in the import): names ``NAME:REF``
then resolve through it, ``load_backbone`` builds it, ``transferlab backbones --zoo NAME`` lists it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from transferlab.models import hf_zoo, pytorchcv_zoo, timm_zoo, torchvision_zoo
from transferlab.models.spec import BackboneSpec

__all__ = ["ZOOS", "ZooAdapter", "prefixed_zoos", "register_zoo", "zoo_of"]


class ZooAdapter(Protocol):
    """What every zoo provides to build, cut, load and list its models."""

    @property
    def NAME(self) -> str:  # noqa: N802 (a module constant in the adapters)
        """The zoo's key: ``BackboneSpec.zoo`` of its models, and their name prefix ``NAME:``."""

    @property
    def REF_FORM(self) -> str | None:  # noqa: N802
        """What follows ``NAME:`` in a backbone name, as hints show it (``NAME``, ``MODEL_ID``); None for
        a zoo whose models are catalogue names only (no ``NAME:`` names, not listed by ``--zoo``)."""

    def resolve(self, ref: str) -> BackboneSpec:
        """The spec of ``NAME:<ref>`` from the library's own metadata (no model is built)."""

    def build(self, spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
        """The model of `spec`, random or with its pretrained weights (an error naming where they were looked for)."""

    def classifier_name(self, model: nn.Module) -> str:
        """Dotted path of `model`'s head slot, a Linear layer (``fc``, ``head.fc``, ``classifier.1``)."""

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """`model`'s forward pass as a chain ``[(name, block), ...]`` ending in the head slot."""

    def weights_status(self, spec: BackboneSpec, model_dir: str) -> str:
        """``present``, or ``missing (<where they were looked for>)``; nothing is downloaded or built."""

    def adapt_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """A local checkpoint's tensors renamed to `model`'s own names where the zoo saves them otherwise."""

    def list_available(self, pattern: str, model_dir: str) -> list[dict]:
        """Rows (name, zoo, source, source_top1, weights) of the names matching `pattern` (fnmatch)."""


ZOOS: dict[str, ZooAdapter] = {}


def register_zoo(zoo: ZooAdapter) -> ZooAdapter:
    """Add `zoo` to the registry under its NAME; a second zoo of the same name is refused."""
    if zoo.NAME in ZOOS:
        raise ValueError(f"zoo {zoo.NAME} is registered already")
    ZOOS[zoo.NAME] = zoo
    return zoo


def zoo_of(spec: BackboneSpec) -> ZooAdapter:
    """The adapter that builds `spec` (the zoo named by ``spec.zoo``)."""
    try:
        return ZOOS[spec.zoo]
    except KeyError:
        raise ValueError(f"unknown zoo {spec.zoo}") from None


def prefixed_zoos() -> list[str]:
    """The zoos whose models are named ``NAME:REF`` (the choices of ``backbones --zoo``), in registration order."""
    return [name for name, zoo in ZOOS.items() if zoo.REF_FORM is not None]


# The zoos, in the order messages and `transferlab backbones --zoo` name them.
register_zoo(pytorchcv_zoo)
register_zoo(timm_zoo)
register_zoo(torchvision_zoo)
register_zoo(hf_zoo)
