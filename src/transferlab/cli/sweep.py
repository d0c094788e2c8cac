"""Flags and YAML for ``transferlab sweep``: a YAML file gives values, flags given on the command line override them.

Flags and YAML keys are generated from the config fields (``cli.flags``); a YAML key is the flag's
name without dashes (``ft_lr: [1e-5, 1e-4]``, ``no_cache: true``). Each phase's grid has one flag per
TrainConfig field (``--lr``, ``--ft-lr``; ``sweep.config.phase_flag``), and YAML ``lp:`` / ``ft:``
mappings by field name (``ft: {lr: [1e-5, 1e-4], blocks: [2, 4]}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from transferlab.cli.flags import Flag, add_flags, config_flags, field_values
from transferlab.core.errors import ConfigError, UserError
from transferlab.core.fields import build_config
from transferlab.data import DataConfig
from transferlab.features.engine import EngineConfig
from transferlab.models.freezing import block_unit
from transferlab.sweep import hyper_rule
from transferlab.sweep.config import (
    PHASE_HELP,
    PHASES,
    SWEEP_WIDE,
    UNIT_FIELDS,
    ExecutorConfig,
    PhaseGrid,
    SweepConfig,
    is_tuple_field,
    phase_flag,
    train_fields,
)
from transferlab.track import TrackConfig
from transferlab.train.config import TrainConfig


def block(text: str) -> int | str:
    """One --ft-blocks value: N, all or from:N."""
    return block_unit(text)


def phase_flags(phase: str) -> list[Flag]:
    """One flag per TrainConfig field for `phase` (and fine-tuning's blocks and layers): a comma list, one
    value fixing the field for the phase, several making it an axis of the phase's grid."""
    defaults = dict(PhaseGrid.of(phase).values)
    flags = []
    units = [Flag(f"ft.{n}", phase_flag("ft", n), "list", block if n == "blocks" else int, False, None, PHASE_HELP[("ft", n)], ())
             for n in UNIT_FIELDS]
    for fl in config_flags(TrainConfig):
        if phase == "ft" and fl.field in SWEEP_WIDE:
            continue  # one value for the whole sweep: the probes' flag sets it
        kind = "bool" if fl.kind == "bool" else "list"
        axis = not (kind == "bool" or is_tuple_field(fl.field) or fl.field in SWEEP_WIDE)
        text = fl.help + ("; a comma list is a grid axis" if axis else "; one value for the whole sweep" if fl.field in SWEEP_WIDE else "")
        if phase == "ft" and fl.field not in defaults:
            default, text = None, text + " (default: the chosen probe's)"
        elif phase == "ft" and fl.field in hyper_rule.sized(1):
            default, text = None, text + " (default: the fine-tuning rule's, from the training-set size)"
        else:
            default = defaults.get(fl.field, (fl.default,))
            default = default[0] if is_tuple_field(fl.field) else default
        flags.append(dataclasses.replace(fl, field=f"{phase}.{fl.field}", flag=phase_flag(phase, fl.field), kind=kind,
                                         help=text, default=default))
    return (units if phase == "ft" else []) + flags


# (argparse group title, flags): everything a sweep accepts.
SWEEP_FLAG_GROUPS: list[tuple[str, list[Flag]]] = [
    ("data", config_flags(DataConfig)),
    ("sweep", config_flags(SweepConfig)),
    ("probe grid (lp: every TrainConfig field; YAML lp: {field: [values]})", phase_flags("lp")),
    ("fine-tuning grid (ft: FT and LP-FT, over the fine-tuning rule; YAML ft: {field: [values]})", phase_flags("ft")),
    ("engine", config_flags(EngineConfig)),
    ("executor", config_flags(ExecutorConfig)),
    ("tracking", config_flags(TrackConfig)),
]
SWEEP_FLAGS = [fl for _, group in SWEEP_FLAG_GROUPS for fl in group]
PHASE_FLAGS = {fl.field: fl for fl in SWEEP_FLAGS if "." in fl.field}
OTHER_KEYS = ("out",)


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to 'not given' (SUPPRESS) so YAML values are only overridden by explicit flags."""
    S = argparse.SUPPRESS
    p.add_argument("--config", default=S, help="YAML file with the same keys as the flags (underscores); flags override it")
    p.add_argument("--out", default=S, help="output folder (ledger, runs, figures, report)")
    p.add_argument("--force", action="store_true", help="start over in a folder holding another sweep's ledger or older images")
    for title, flags in SWEEP_FLAG_GROUPS:
        add_flags(p.add_argument_group(title), flags, suppress=True)


def load_yaml(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise UserError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of keys to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for phase in PHASES:  # lp: {lr: [...]} is --lr, ft: {lr: [...]} is --ft-lr
        grid = data.pop(phase, None)
        if grid is None:
            continue
        if phase == "ft" and isinstance(grid, bool):  # ft: true is the --ft switch; ft: {...} the fine-tuning grid
            data["ft"] = grid
            continue
        if not isinstance(grid, dict):
            raise UserError(f"--config {path}: {phase} must be a mapping of training fields to values")
        for name, values in grid.items():
            fl = PHASE_FLAGS.get(f"{phase}.{str(name).replace('-', '_')}")
            if fl is None and name in SWEEP_WIDE:
                raise UserError(f"--config {path}: {phase}.{name} holds for the whole sweep: set it once, as lp.{name}")
            if fl is None:
                raise UserError(f"--config {path}: {phase}.{name} is not a training field (TrainConfig fields"
                                f"{', blocks, layers' if phase == 'ft' else ''}: {', '.join(train_fields())})")
            if fl.key in data:
                raise UserError(f"--config {path}: {phase}.{name} and {fl.key} both give {fl.flag}: keep one")
            data[fl.key] = values
    unknown = sorted(set(data) - {fl.key for fl in SWEEP_FLAGS} - set(OTHER_KEYS))
    if unknown:
        raise UserError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    return data


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """YAML values overridden by the flags given, keyed by flag key (``lr``, ``no_cache``, ``out``)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "force", "config", "argv")}
    merged = load_yaml(args.config) if getattr(args, "config", None) else {}
    merged.update(given)
    for key in ("data", "out"):
        if key not in merged:
            raise UserError(f"--{key} is required (as a flag or in --config)")
    return merged


def build_configs(values: dict[str, Any]) -> tuple[SweepConfig, ExecutorConfig]:
    """The sweep's configs, built by field name from resolved flag values; the phase flags fill the grids."""
    fields = field_values(SWEEP_FLAGS, values)
    grids: dict[str, dict[str, tuple]] = {phase: {} for phase in PHASES}
    for key in [k for k in fields if "." in k]:
        phase, name = key.split(".", 1)
        value = fields.pop(key)
        single = (PHASE_FLAGS[key].kind == "bool" and not isinstance(value, tuple)) or is_tuple_field(name)
        grids[phase][name] = (value,) if single else value
    try:
        grid = {phase: PhaseGrid.of(phase, given) for phase, given in grids.items()}
    except ConfigError as e:  # cannot happen from flags (each names a field), kept for the Python API
        raise UserError(str(e)) from None
    cfg = dataclasses.replace(build_config(SweepConfig, fields), **grid)
    return cfg, build_config(ExecutorConfig, fields)


def reproduce_command(argv: list[str] | None) -> str:
    return "transferlab " + shlex.join(sys.argv[1:] if argv is None else argv)


def summary_lines(rows: list[dict], n_test: int | None = None) -> list[str]:
    """The terminal summary of a sweep: one line per summary row (plus one per warning), best first, then
    which model ``export`` takes and why, and what one of the `n_test` test images is worth.

    Rows are printed by their ``rank`` under the selection metric (rows without one, which no verdict
    ranked, after the ranked ones in sweep order). A probe's line names its lr, l2 and seed; an LP-FT line
    what the fine-tuning grid chose (its own lr, unit, augmentation and interpolation a; L2-SP and label
    smoothing when used), never the probe's l2 and seed. Where the report put them in the rows: the test
    accuracy's 95% interval, the paired difference from the best and the warnings.
    """
    from transferlab.reporting.verdict import model_name, resolution_sentence

    ordered = sorted(rows, key=lambda r: (0, r["rank"]) if r.get("rank") is not None else (1, 0))  # stable: sweep order
    lines = []
    for r in ordered:
        lines.append(_row_line(r))
        lines += [f"    warning: {w}" for w in r.get("warnings") or []]
    best = next((r for r in ordered if r.get("rank") == 1), None)
    if best is not None:
        select = best.get("select") or "val_xent"
        lines.append(f"export takes #1 {model_name(best)} (lowest {select} {_f(best.get(select))} among the chosen models; "
                     "the test split played no part in the choice)")
    if n_test:
        lines.append(resolution_sentence(n_test))
    return lines


def _row_line(r: dict) -> str:
    if r["method"] in ("FT", "LP-FT"):
        chose = f"ft_lr={r['lr']:<8g} unit={r.get('ft_unit')} augment={r.get('ft_augment')} a={_g(r.get('wise_alpha'))}"
        for key, name in (("ft_l2sp", "l2sp"), ("label_smoothing", "smoothing")):
            if r.get(key):
                chose += f" {name}={r[key]:g}"
    else:
        chose = f"lr={r['lr']:<8g} l2={r['l2']:<6g} seed={r['seed']}"
    rank = f"#{r['rank']} " if r.get("rank") is not None else ""
    acc = "n/a" if r.get("test_acc") is None else f"{r['test_acc']:.4f}"
    if r.get("test_acc_ci_low") is not None and r.get("test_acc_ci_high") is not None:
        acc += f" [{r['test_acc_ci_low']:.4f}, {r['test_acc_ci_high']:.4f}]"
    line = (f"{rank}{r['backbone']:20s} {r['method']:6s} {chose}  val_xent={_f(r.get('val_xent'))} "
            f"val_err={_f(r.get('val_err'))} test_acc={acc}")
    if r.get("diff_vs_best") is not None:
        line += (f"  vs best {100 * r['diff_vs_best']:+.1f} pt [{100 * r['ci_low_vs_best']:+.1f}, "
                 f"{100 * r['ci_high_vs_best']:+.1f}], McNemar p = {r['p_vs_best']:.2g}")
    return line


def n_test_images(out: Path) -> int | None:
    """How many test images the sweep in `out` has (its manifest's data summary), None when unknown."""
    import sqlite3

    from transferlab.sweep.ledger import Ledger
    from transferlab.sweep.manifest import read_manifest

    if not (out / "ledger.sqlite").is_file():
        return None
    try:
        ledger = Ledger(out / "ledger.sqlite", readonly=True)
        try:
            return read_manifest(ledger).n_test
        finally:
            ledger.close()
    except (sqlite3.Error, UserError):  # the summary is printed all the same, without this line
        return None


def _g(v) -> str:
    return "-" if v is None else f"{v:g}"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


__all__ = ["SWEEP_FLAGS", "ConfigError", "add_sweep_flags", "build_configs", "n_test_images", "reproduce_command", "resolve",
           "summary_lines"]
