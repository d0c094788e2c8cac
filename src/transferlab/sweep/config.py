"""What a sweep runs: data, backbones x sources, and one search space per phase over `TrainConfig` fields.

A phase's grid is a mapping, as Ray Tune's ``param_space``: ``{field: values}`` for any `TrainConfig`
field. A field with one value is fixed for the phase; every combination of the fields with several
values is one run. The probe phase (``lp``) starts from `TrainConfig`'s defaults; the fine-tuning
phase (``ft``) starts from the chosen probe's config with the fine-tuning rule's values over it
(:mod:`hyper_rule`: optimizer, batch size, schedule, ...), so it inherits only what neither sets (the
head's l2, ...). Fine-tuning also lists what it trains: ``blocks`` (the last N blocks of the chain
holding parameters, the head counting as one) and ``layers`` (the last k layers).

Every run's config is checked by `TrainConfig.validate`; its errors name the phase's flag
(``ft.lr`` -> ``--ft-lr``, see :func:`phase_flag`).
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transferlab.core.errors import ConfigError
from transferlab.core.fields import fits, option, plain, type_text
from transferlab.data import DataConfig
from transferlab.features.engine import EngineConfig
from transferlab.models import DEFAULT_MODEL_DIR
from transferlab.models.freezing import block_unit
from transferlab.sweep import hyper_rule
from transferlab.train.config import TrainConfig

PHASES = ("lp", "ft")
UNIT_FIELDS = ("blocks", "layers")  # what fine-tuning trains: not TrainConfig fields, the outer loop of its grid
DEFAULT_FT_BLOCKS: int | str = hyper_rule.DEFAULT_UNIT
# The nesting of each phase's grid, outermost first (the order also breaks validation ties); fields not
# named here follow in TrainConfig's order.
AXIS_ORDER = {"lp": ("seed", "lr", "l2"), "ft": ("lr", "feature_augment", "l2sp", "label_smoothing")}
DEFAULT_GRID: dict[str, dict[str, tuple]] = {
    "lp": {"seed": (0, 1), "lr": (1e-4, 1e-3, 1e-2), "l2": (0.0, 1e-2, 1.0)},
    "ft": dict(hyper_rule.FIXED),  # and hyper_rule.sized(n_train) once the data is known
}
# Flags that differ from the rule of phase_flag (kept from earlier versions of the command line).
FLAG_NAMES = {("lp", "seed"): "--seeds", ("lp", "label_smoothing"): "--lp-label-smoothing",
              ("ft", "feature_augment"): "--ft-augment", ("ft", "wise_alphas"): "--ft-wise",
              ("ft", "label_smoothing"): "--label-smoothing", ("ft", "augment"): "--ft-augment-images"}
SWEEP_WIDE = ("select", "layer_order", "augment")  # fields one value of which holds for every run of a sweep
PHASE_HELP = {("ft", "blocks"): "fine-tuning trains the last N blocks of the chain holding parameters, the head counting "
                                "as one (all their layers), every block (all) or the blocks from block N on (from:N, "
                                "0-based); with neither this nor --ft-layers: all",
              ("ft", "layers"): "fine-tuning trains the last k layers (see --layer-order)"}


def train_fields() -> dict[str, dataclasses.Field]:
    """TrainConfig's fields by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def phase_flag(phase: str, name: str) -> str:
    """The command-line flag of field `name` in `phase`: ``--lr`` for the probes, ``--ft-lr`` for fine-tuning."""
    if (phase, name) in FLAG_NAMES:
        return FLAG_NAMES[(phase, name)]
    dashed = name.replace("_", "-")
    return f"--{dashed}" if phase == "lp" else f"--ft-{dashed}"


def is_tuple_field(name: str) -> bool:
    """Whether a TrainConfig field's value is itself a tuple (``wise_alphas``): a flat list is one value of it."""
    hint = typing.get_type_hints(TrainConfig).get(name)
    return typing.get_origin(hint) is tuple


@dataclass(frozen=True)
class PhaseGrid:
    """One phase's search space: ``(field, values)`` pairs; one value is fixed, several are a grid axis."""

    values: tuple[tuple[str, tuple], ...] = ()
    given: frozenset[str] = frozenset()  # the fields set by the user (the rest: the phase's defaults)

    @classmethod
    def of(cls, phase: str, given: Mapping[str, Iterable] | None = None) -> PhaseGrid:
        """The phase's default grid with `given` ``{field: values}`` replacing those fields' values."""
        merged = {**DEFAULT_GRID[phase], **{k: _values(k, v) for k, v in (given or {}).items()}}
        if phase == "ft" and "weight_decay" not in (given or {}):
            merged["weight_decay"] = hyper_rule.weight_decay_for(merged.get("optimizer", ("adam",)))
        known = train_fields()
        order = [n for n in AXIS_ORDER[phase] if n in merged] + [n for n in known if n in merged and n not in AXIS_ORDER[phase]]
        units = [n for n in UNIT_FIELDS if n in merged]
        unknown = sorted(set(merged) - set(order) - set(units))
        if unknown or (units and phase != "ft"):
            bad = unknown[0] if unknown else units[0]
            raise ConfigError(phase, bad, "not a training field (TrainConfig: " + ", ".join(known) + ")"
                              + ("; blocks and layers are the fine-tuning phase's" if bad in UNIT_FIELDS else ""))
        hints = typing.get_type_hints(TrainConfig)
        for name in order:
            wrong = next((v for v in merged[name] if not fits(hints[name], v)), None) if merged[name] else None
            if wrong is not None:
                raise ConfigError(f"{phase}.{name}", wrong, f"expected {type_text(hints[name])}")
        return cls(tuple((n, tuple(plain(hints[n], v) for v in merged[n]) if n in hints else merged[n]) for n in units + order),
                   frozenset(given or {}))

    def with_defaults(self, phase: str, defaults: Mapping[str, Iterable]) -> PhaseGrid:
        """This grid with `defaults` (``{field: values}``) for the fields the user did not set."""
        own = {n: v for n, v in self.values if n in self.given or n not in defaults}
        grid = PhaseGrid.of(phase, {**defaults, **own})
        return dataclasses.replace(grid, given=self.given)

    def get(self, name: str, default: Any = None) -> tuple:
        return dict(self.values).get(name, default)

    def train_values(self) -> list[tuple[str, tuple]]:
        """The TrainConfig fields of the grid (blocks and layers left out), in nesting order."""
        return [(n, v) for n, v in self.values if n not in UNIT_FIELDS]

    def configs(self, base: TrainConfig) -> list[TrainConfig]:
        """Every combination of the grid applied to `base`, the last field varying fastest."""
        names = [n for n, _ in self.train_values()]
        return [dataclasses.replace(base, **dict(zip(names, combo))) for combo in itertools.product(*(v for _, v in self.train_values()))]

    def as_dict(self) -> dict[str, list]:
        """``{field: values}`` as a config file (and the report) reads it."""
        return {n: list(v) for n, v in self.values}


def _values(name: str, given: Any) -> tuple:
    """A field's values as a tuple: one value alone (a scalar, or a flat list for a tuple field) or several."""
    if is_tuple_field(name):
        flat = isinstance(given, (list, tuple)) and all(not isinstance(v, (list, tuple)) for v in given)
        return (tuple(given),) if flat else tuple(tuple(v) for v in given)
    return tuple(given) if isinstance(given, (list, tuple)) else (given,)


def lp_grid_default() -> PhaseGrid:
    return PhaseGrid.of("lp")


def ft_grid_default() -> PhaseGrid:
    return PhaseGrid.of("ft")


@dataclass(frozen=True)
class SweepConfig:
    """A whole study: data, backbones x sources, the probe grid and the optional LP-then-FT phase."""

    data: DataConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    backbones: tuple[str, ...] = option(("efficientnet_lite0",), "comma list of architectures")
    sources: tuple[str, ...] = option(("imagenet1k",), "comma list of source data sets: imagenet1k,cub")
    lpft: bool = option(False, "LP-then-FT from the chosen probe")
    plain_ft: bool = option(False, "FT: fine-tune from the pretrained backbone with a fresh head (no probe first), over "
                            "the same fine-tuning grid", flag="--ft")
    model_dir: str = option(DEFAULT_MODEL_DIR, "folder with official pytorchcv .pth files")
    backbone_info: dict[str, dict] | None = option(None, "per backbone name, overrides of what the library says: "
                                                   "{NAME: {source: ..., source_top1: ...}} (YAML, or JSON on the command line)")
    ood: dict[str, str] | None = option(None, "an out-of-distribution test set NAME=DIR (repeatable; DIR holds <class>/* "
                                        "images or a path,label CSV with the training classes), evaluated once by every "
                                        "chosen model and never by a choice; YAML ood: {NAME: DIR}", pairs=True)
    lp: PhaseGrid = field(default_factory=lp_grid_default)
    ft: PhaseGrid = field(default_factory=ft_grid_default)

    def record(self) -> dict[str, Any]:
        """The resolved config as sweep.json and the manifest keep it: each phase as ``{field: values}``, the
        probes' over TrainConfig's defaults (what every probe run starts from)."""
        out = dataclasses.asdict(self)
        out["lp"] = {**{n: [v] for n, v in dataclasses.asdict(TrainConfig()).items()}, **self.lp.as_dict()}
        out["ft"] = self.ft.as_dict()
        return out

    def for_training_size(self, n_train: int) -> SweepConfig:
        """The config with the fine-tuning rule's size-dependent values (:mod:`hyper_rule`: epochs) filled in
        for `n_train` training images, where the user did not set them."""
        return dataclasses.replace(self, ft=self.ft.with_defaults("ft", hyper_rule.sized(n_train)))

    @property
    def probe_base(self) -> TrainConfig:
        """The probes' config before the grid: TrainConfig's defaults with the probe phase's fixed values;
        what every run of the sweep shares (selection metric, layer order, whether images are augmented)."""
        fixed = {n: v[0] for n, v in self.lp.train_values() if len(v) == 1}
        return dataclasses.replace(TrainConfig(), **fixed)

    @property
    def fine_tunes(self) -> bool:
        """Whether the fine-tuning grid is used (by FT, LP-FT or both)."""
        return self.lpft or self.plain_ft

    def plain_ft_configs(self) -> list[TrainConfig]:
        """FT's grid: the fine-tuning grid from the probes' base config (its seeds are the grid's: a seed seeds
        the fresh head, the batch order and the crops), without interpolation (there is no start to
        interpolate with). Its head's l2 is the probes' when they fix one, else 0."""
        return [dataclasses.replace(c, wise_alphas=()) for c in self.ft.configs(self.probe_base)]

    @property
    def select(self) -> str:
        """What both phases' choices minimise (the probes' --select)."""
        return self.probe_base.select

    def probe_configs(self) -> list[TrainConfig]:
        """The LP grid in a fixed order (seed, lr, l2 by default): the order also breaks validation ties."""
        return self.lp.configs(TrainConfig())

    def ft_units(self) -> list[tuple[str, int | str]]:
        """What fine-tuning trains, in grid order: ("blocks", N, "all" or "from:N") for each --ft-blocks, then
        ("layers", k) for each --ft-layers; with neither, the whole network (("blocks", "all"))."""
        blocks, layers = self.ft.get("blocks", ()), self.ft.get("layers", ())
        if not blocks and not layers:
            return [("blocks", DEFAULT_FT_BLOCKS)]
        return [("blocks", n) for n in blocks] + [("layers", k) for k in layers]

    def finetune_configs(self, probe: TrainConfig) -> list[TrainConfig]:
        """The fine-tuning grid from the chosen probe's config, in a fixed order (lr, augment, L2-SP,
        label smoothing; the outer loop over units is the caller's): the order also breaks validation ties."""
        return self.ft.configs(probe)

    def validate(self) -> None:
        """ConfigErrors naming the phase's field (``ft.lr``; the CLI shows its flag, ``--ft-lr``)."""
        for name in ("backbones", "sources"):
            if not getattr(self, name):
                raise ConfigError(name, "", "needs at least one value")
        phases = [("lp", self.lp)] + ([("ft", self.ft)] if self.fine_tunes else [])
        for phase, grid in phases:
            for name, values in grid.values:
                if name not in UNIT_FIELDS and (not values or (is_tuple_field(name) and values == ((),) and name in DEFAULT_GRID[phase])):
                    raise ConfigError(f"{phase}.{name}", "", "needs at least one value")
        for name in SWEEP_WIDE:  # the sweep's choices, cut and cache follow one value
            if len(self.lp.get(name, (None,))) > 1:
                raise ConfigError(f"lp.{name}", ",".join(map(str, self.lp.get(name))), "takes one value for the whole sweep")
            if self.fine_tunes and name in dict(self.ft.values):
                raise ConfigError(f"ft.{name}", ",".join(map(str, self.ft.get(name))), f"is the probes' ({phase_flag('lp', name)}), "
                                  "one value for the whole sweep")
        _validate_each(self.probe_configs(), "lp", self.lp)
        if self.fine_tunes:
            if self.ft.get("blocks") and self.probe_base.layer_order != "forward":
                raise ConfigError("ft.blocks", ",".join(map(str, self.ft.get("blocks"))), "counts blocks in forward order "
                                  "(drop --layer-order definition)")
            for unit, n in self.ft_units():
                if unit == "blocks":
                    try:
                        n = block_unit(n)
                    except ValueError:
                        raise ConfigError("ft.blocks", n, "expected N (the last N blocks), all, or from:N (block N on)") from None
                if isinstance(n, int) and n < 1:
                    raise ConfigError(f"ft.{unit}", n, "must be at least 1")
            _validate_each(self.finetune_configs(self.probe_configs()[0]), "ft", self.ft)
        for name, info in (self.backbone_info or {}).items():
            if not isinstance(info, dict) or set(info) - {"source", "source_top1"}:
                raise ConfigError("backbone_info", name, "expected a mapping with keys source and/or source_top1")
            top1 = info.get("source_top1")
            if top1 is not None and not (isinstance(top1, (int, float)) and 0 <= top1 <= 100):
                raise ConfigError("backbone_info", name, f"source_top1 {top1!r} must be a percentage")


def _validate_each(configs: list[TrainConfig], phase: str, grid: PhaseGrid) -> None:
    """TrainConfig.validate on every run of a phase; an error names the phase's field (a field the phase
    does not set is the probes' own, inherited)."""
    set_here = {n for n, _ in grid.values}
    for cfg in configs:
        try:
            cfg.validate()
        except ConfigError as e:
            owner = phase if e.field in set_here or phase == "lp" else "lp"
            raise ConfigError(f"{owner}.{e.field}", e.value, e.reason) from None


@dataclass(frozen=True)
class ExecutorConfig:
    """Where runs execute; results are the same wherever they run."""

    kind: str = option("local", "where runs execute", flag="--executor", choices=("local", "ray"))
    jobs: int = option(1, "local worker processes (1: in this process)")
    ray_address: str | None = option(None, "Ray cluster ('auto' or ray://host:port); default: a private local instance")
    cpus_per_run: float = option(1.0, "CPUs each Ray task requests")
    gpus_per_run: float | None = option(None, "GPUs each Ray task requests (default: 0 on CPU, 0.25 on CUDA)")
