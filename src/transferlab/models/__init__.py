"""Pretrained backbones behind one small interface, whatever zoo they come from.

A backbone is a model plus a *chain* of blocks whose composition is its forward pass, the last block
the head slot the probe fills (``backbone``). Zoos: the catalogue (pytorchcv, EfficientNet-Lite) and,
by prefix, ``timm:NAME[.TAG]``, ``torchvision:NAME[:WEIGHTS]`` and ``hf:MODEL_ID_OR_FOLDER``. Each zoo
is one adapter module, the only one importing its library, implementing the ``ZooAdapter`` protocol;
the ``ZOOS`` registry (``zoo``) maps zoo names to adapters. ``registry`` turns names into specs,
``listing`` says what is at hand, ``freezing`` and ``heads`` decide what trains.
This package imports ``core`` and ``data`` only.
"""

from transferlab.models.backbone import DEFAULT_MODEL_DIR, Backbone, load_backbone, weights_digest
from transferlab.models.listing import check_weights_available, list_backbones, list_zoo
from transferlab.models.registry import CATALOGUE, DEFAULT_BACKBONE, get_spec, resolve_spec, with_source
from transferlab.models.spec import BackboneSpec
from transferlab.models.zoo import ZOOS, ZooAdapter, prefixed_zoos, register_zoo

__all__ = [
    "Backbone", "BackboneSpec", "CATALOGUE", "DEFAULT_BACKBONE", "DEFAULT_MODEL_DIR", "ZOOS", "ZooAdapter",
    "check_weights_available", "get_spec", "list_backbones", "list_zoo", "load_backbone", "prefixed_zoos",
    "register_zoo", "resolve_spec", "weights_digest", "with_source",
]
