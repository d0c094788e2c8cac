"""Building a backbone: :func:`load_backbone` gives a :class:`Backbone` (model, chain of blocks, head slot,
where its weights came from and their digest), whatever zoo it comes from.

A :class:`Backbone` is a model plus a *chain*: the model's forward pass written as a list of blocks
``[(name, module), ...]`` whose composition equals ``model(x)``; the last block is the head slot the
probe fills (a ``Linear(num_features, n_classes)`` at ``classifier_name``, a dotted module path).
Everything zoo-specific is asked of the spec's adapter in the zoo registry (``models.zoo``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from torch import nn

from transferlab.data import Preprocessing
from transferlab.models import local_zoo
from transferlab.models.blocks import get_path, set_path
from transferlab.models.registry import get_spec
from transferlab.models.spec import BackboneSpec
from transferlab.models.zoo import zoo_of

DEFAULT_MODEL_DIR = os.path.join("~", ".torch", "models")  # pytorchcv's own default


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
        return zoo_of(self.spec).classifier_name(self.model)

    @property
    def classifier(self) -> nn.Linear:
        """The Linear layer in the head slot."""
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
        """How images are fed to this backbone (size, crop, interpolation, normalisation)."""
        return self.spec.preprocessing

    def chain(self) -> list[tuple[str, nn.Module]]:
        """The forward pass as ``[(name, block), ...]``; recomputed so a replaced head is picked up.

        Names are the blocks' parameter-name prefixes (``layer4.1``, ``stages.3.blocks.2``, ``blocks.11``);
        a model whose blocks cannot be derived has two: ``features`` and the head.
        """
        return zoo_of(self.spec).blocks(self.model)

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
    zoo = zoo_of(spec)
    if weights is not None:
        state = local_zoo.read_state_dict(weights)
        model = zoo.build(spec, pretrained=False, model_dir=model_dir)
        state = zoo.adapt_state(state, model)
        local_zoo.load_into(model, state, weights, zoo.classifier_name(model))
        spec = spec.with_local_weights(weights)
        origin = os.path.abspath(weights)
    else:
        model = zoo.build(spec, pretrained=pretrained, model_dir=model_dir)
        origin = "pretrained" if pretrained else "random"
    model.eval()
    return Backbone(spec, model, origin, weights_digest(model, zoo.classifier_name(model)))
