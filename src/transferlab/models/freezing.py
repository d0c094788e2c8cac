"""Which layers train: layer naming, freezing the rest, and keeping frozen layers in eval mode.

A *layer* is a unique parameter-name prefix (the name minus ``.weight``/``.bias``). Layers are ordered
by when a forward pass first runs them (``order="forward"``, the default) or by parameter definition
(``order="definition"``, the course's rule); ``n_trainable_layers = k`` trains the last k layers. The
two differ where a module is defined after one that runs later: pytorchcv's ResUnit defines its 1x1
shortcut ``identity_conv`` after ``body`` but runs it first, so by definition the "last 3 layers" of
resnet10 were the shortcut, not the last conv of the main path. Frozen layers stay in eval mode during
training, so their weights *and* batch-norm running statistics do not change (the course code this
tool replaces put the whole model in train mode and let them drift).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.models import Backbone


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to: its name minus the last component (``.weight``, ``.bias``)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


LAYER_ORDERS = ("forward", "definition")


def layer_names(model: nn.Module) -> list[str]:
    """Unique parameter-name prefixes of `model`, in definition order."""
    return list(dict.fromkeys(layer_of(name) for name, _ in model.named_parameters()))


@torch.no_grad()
def forward_layer_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """`model`'s layers in the order one forward pass of `example` first runs them (hooks, eval mode).

    Layers the pass never enters through their own module come first, in definition order: they
    cannot be "the last" layers of anything.
    """
    owners = {m: name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    seen: dict[str, None] = {}

    def record(module: nn.Module, _inputs: object) -> None:
        seen.setdefault(owners[module], None)

    handles = [m.register_forward_pre_hook(record) for m in owners]
    training = model.training
    try:
        model.eval()(example)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    defined = layer_names(model)
    ran = [n for n in seen if n in set(defined)]
    return [n for n in defined if n not in seen] + ran


def ordered_layers(backbone: Backbone, order: str = "forward") -> list[str]:
    """The backbone's layers in `order` ("forward" or "definition")."""
    if order == "definition":
        return layer_names(backbone.model)
    if order != "forward":
        raise ConfigError("layer_order", order, f"expected one of {', '.join(LAYER_ORDERS)}")
    p = next(backbone.model.parameters())
    size = backbone.spec.preprocessing.input_size
    return forward_layer_names(backbone.model, torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))


@dataclass(frozen=True)
class FreezePlan:
    """Train the last `n_trainable_layers` layers of a backbone (in `order`), freeze the rest."""

    n_trainable_layers: int = 1
    order: str = "forward"

    def trainable_layers(self, backbone: Backbone) -> list[str]:
        """The trainable layers, in `order`."""
        names = ordered_layers(backbone, self.order)
        k = self.n_trainable_layers
        if not 1 <= k <= len(names):
            raise ConfigError("n_trainable_layers", k, f"must be between 1 and {len(names)} (the model's layer count)")
        return names[-k:]

    def apply(self, backbone: Backbone) -> list[str]:
        """Set ``requires_grad`` accordingly and return the trainable layer names (in `order`)."""
        trainable = self.trainable_layers(backbone)
        keep = set(trainable)
        for name, param in backbone.model.named_parameters():
            param.requires_grad_(layer_of(name) in keep)
        return trainable


def parameter_blocks(backbone: Backbone) -> list[tuple[str, nn.Module]]:
    """The chain's blocks that hold parameters, in forward order (the head's block last)."""
    return [(name, b) for name, b in backbone.chain() if next(b.parameters(), None) is not None]


def block_unit(value: int | str) -> int | str:
    """A fine-tuning block unit as the grid holds it: N (the last N blocks), ``all`` or ``from:N`` (block N on,
    0-based); a ValueError for anything else."""
    text = str(value).strip()
    if text == "all":
        return text
    if text.startswith("from:") and text[5:].isdigit():
        return f"from:{int(text[5:])}"
    if isinstance(value, bool) or not text.lstrip("-").isdigit():
        raise ValueError(f"not a block unit: {value!r}")
    return int(text)


def last_blocks_count(backbone: Backbone, unit: int | str) -> int:
    """How many last blocks with parameters `unit` names (:func:`block_unit`): ``all`` is every one of them,
    ``from:N`` those from block N on, the head's block counting; a ConfigError naming ft.blocks otherwise."""
    n_total = len(parameter_blocks(backbone))
    value = block_unit(unit)
    n = n_total if value == "all" else n_total - int(str(value)[5:]) if isinstance(value, str) else value
    if not 1 <= n <= n_total:
        raise ConfigError("ft.blocks", value, f"must be between 1 and {n_total} ({backbone.spec.name}'s blocks with "
                          f"parameters; from:N takes N from 0 to {n_total - 1})")
    return n


def layers_of_last_blocks(backbone: Backbone, unit: int | str) -> int:
    """How many layers the last blocks `unit` names hold (:func:`last_blocks_count`; the head is one block).

    Blocks run one after the other, so their layers are the last ones in forward order: training the
    last N blocks is training that many last layers, with ``order="forward"``.
    """
    blocks = parameter_blocks(backbone)
    n_blocks = last_blocks_count(backbone, unit)
    owner = {id(p): layer_of(name) for name, p in backbone.model.named_parameters()}
    return len({owner[id(p)] for _, b in blocks[-n_blocks:] for p in b.parameters() if id(p) in owner})


@dataclass(frozen=True)
class Cut:
    """Where a backbone's chain of blocks is cut for a number of trainable layers.

    Blocks before `index` hold no trainable layer: their output is a fixed function of the image.
    """

    index: int  # the first block of the chain that holds a trainable layer
    name: str  # that block's name
    trainable_layers: tuple[str, ...]


def plan_cut(backbone: Backbone, n_trainable_layers: int, order: str = "forward") -> Cut:
    """The cut for training the last `n_trainable_layers` layers; computed without changing the model."""
    model = backbone.model
    ordered = FreezePlan(n_trainable_layers, order).trainable_layers(backbone)
    trainable = set(ordered)
    owner = {id(p): layer_of(name) for name, p in model.named_parameters()}
    for i, (name, block) in enumerate(backbone.chain()):
        if any(owner.get(id(p)) in trainable for p in block.parameters()):
            return Cut(i, name, tuple(ordered))
    raise ValueError(f"no block of {backbone.spec.name}'s chain holds a trainable layer")


def set_train_mode(model: nn.Module, training: bool, train_bn: bool = True) -> None:
    """Eval mode everywhere, except (when `training` and `train_bn`) trainable normalisation layers.

    ``Module.train()`` is recursive, so switching on a module that owns a trainable parameter would
    also switch on its parameter-free children: dropout and stochastic depth inside a fine-tuned block
    would then draw from the unseeded global RNG, and two runs of one config would differ. Nothing
    stochastic runs in training here: the only layers whose training behaviour differs are
    normalisation layers with running statistics, and those switch to batch statistics only with
    ``train_bn`` (otherwise trainable batch-norm layers learn their affine parameters but keep
    normalising with, and keep, their pretrained running statistics). The frozen part of the network
    is therefore a fixed function of the image, which is what makes feature caching exact.
    """
    model.eval()
    if training and train_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and any(p.requires_grad for p in module.parameters(recurse=False)):
                module.training = True  # this module alone, not recursively


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters plus the buffers (BN running stats) of modules that own them."""
    keys = []
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if any(p.requires_grad for _, p in own):
            prefix = f"{mod_name}." if mod_name else ""
            keys += [prefix + n for n, _ in own] + [prefix + n for n, _ in module.named_buffers(recurse=False)]
    return keys


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training changes: :func:`trainable_state_keys`' tensors."""
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in trainable_state_keys(model)}


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], required: set[str] | None = None) -> None:
    """Copy `state`'s tensors into `model` in place; every key must exist with the same shape.

    With `required`, every one of those keys must be in `state` too. A mismatch is an error, never a
    silently ignored tensor (``load_state_dict(strict=False)`` would leave a fresh head in place).
    """
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    missing = sorted((required or set()) - set(state))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(f"trained tensor {unknown[0]} is not a tensor of the model{more}")
    if missing:
        raise ValueError(f"the trained tensors lack {', '.join(missing)}")
    with torch.no_grad():
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"trained tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}")
            own[key].copy_(value)


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
