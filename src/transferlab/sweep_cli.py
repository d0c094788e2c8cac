"""Flags and YAML for ``transferlab sweep``: a YAML file gives values, flags given on the command line override them."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .utils import UserError

LIST_KEYS = {"backbones": str, "sources": str, "lr": float, "l2": float, "seeds": int, "ft_lr": float}
SCALAR_KEYS = {
    "data": str, "out": str, "epochs": int, "patience": int, "batch_size": int, "optimizer": str, "lpft": bool,
    "ft_layers": int, "ft_train_bn": bool, "model_dir": str, "val_split": str, "test_split": str, "valid_frac": float, "split_seed": int,
    "max_per_class": int, "on_bad_image": str, "device": str, "cache_dir": str, "cache_max_gb": float, "workers": int,
    "no_cache": bool, "no_progress": bool, "executor": str, "jobs": int, "ray_address": str, "cpus_per_run": float,
    "gpus_per_run": float, "runtime": str,
}


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to 'not given' (SUPPRESS) so YAML values are only overridden by explicit flags."""
    S = argparse.SUPPRESS
    p.add_argument("--config", default=S, help="YAML file with the same keys as the flags (underscores); flags override it")
    p.add_argument("--data", default=S, help="image folder (train/<class>/*, val/ and test/ optional)")
    p.add_argument("--out", default=S, help="output folder (ledger, runs, figures, report)")
    p.add_argument("--backbones", default=S, help="comma list of architectures (default efficientnet_lite0)")
    p.add_argument("--sources", default=S, help="comma list of source data sets: imagenet1k,cub (default imagenet1k)")
    p.add_argument("--lr", default=S, help="comma list of probe learning rates (default 1e-4,1e-3,1e-2)")
    p.add_argument("--l2", default=S, help="comma list of L2 strengths (default 0,1e-2,1)")
    p.add_argument("--seeds", default=S, help="comma list of seeds (default 0,1)")
    for flag, typ in (("--epochs", int), ("--patience", int), ("--batch-size", int), ("--ft-layers", int),
                      ("--valid-frac", float), ("--split-seed", int), ("--max-per-class", int), ("--cache-max-gb", float),
                      ("--workers", int), ("--jobs", int), ("--cpus-per-run", float), ("--gpus-per-run", float)):
        p.add_argument(flag, type=typ, default=S)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=S)
    p.add_argument("--lpft", action="store_true", default=S, help="LP-then-FT from the chosen probe")
    p.add_argument("--ft-train-bn", action="store_true", default=S, help="fine-tuned batch-norm layers use batch statistics")
    p.add_argument("--ft-lr", default=S, help="comma list of fine-tuning learning rates (default 1e-5,1e-4)")
    for flag in ("--model-dir", "--val-split", "--test-split", "--device", "--cache-dir", "--ray-address"):
        p.add_argument(flag, default=S)
    p.add_argument("--on-bad-image", choices=("error", "skip"), default=S)
    p.add_argument("--executor", choices=("local", "ray"), default=S, help="where runs execute (default local)")
    p.add_argument("--runtime", choices=("auto", "torch", "compile", "onnxruntime", "openvino"), default=S, help="what runs the frozen layers (default auto)")
    p.add_argument("--no-cache", action="store_true", default=S)
    p.add_argument("--no-progress", action="store_true", default=S)
    p.add_argument("--force", action="store_true", help="write into a folder holding a different sweep's ledger")


def _parse_list(key: str, value, typ) -> tuple:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return tuple(typ(str(v).strip()) if typ is not str else str(v).strip() for v in items if str(v).strip() != "")
    except ValueError:
        raise UserError(f"--{key.replace('_', '-')} {value}: expected a comma list of {typ.__name__} values") from None


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
    unknown = sorted(set(data) - set(LIST_KEYS) - set(SCALAR_KEYS))
    if unknown:
        raise UserError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    return data


def resolve(args: argparse.Namespace) -> dict:
    """YAML values overridden by the flags given; lists parsed; returns plain keyword values."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "force", "config", "argv")}
    merged = load_yaml(args.config) if getattr(args, "config", None) else {}
    merged.update(given)
    for key, typ in LIST_KEYS.items():
        if key in merged:
            merged[key] = _parse_list(key, merged[key], typ)
    for key in ("data", "out"):
        if key not in merged:
            raise UserError(f"--{key} is required (as a flag or in --config)")
    return merged


def build_config(values: dict):
    from .search import SweepConfig
    from .study import DataConfig, EngineConfig

    data = DataConfig(
        values["data"], values.get("val_split", "val"), values.get("test_split", "test"), values.get("valid_frac", 0.2),
        values.get("split_seed", 0), values.get("max_per_class"), values.get("on_bad_image", "error"),
    )
    engine = EngineConfig(
        values.get("device", "auto"), not values.get("no_cache", False), values.get("cache_dir"),
        values.get("cache_max_gb", 4.0), values.get("workers"), not values.get("no_progress", False),
        values.get("runtime", "auto"),
    )
    kw = {}
    for key, field_name in (("backbones", "backbones"), ("sources", "sources"), ("lr", "lrs"), ("l2", "l2s"),
                            ("seeds", "seeds"), ("ft_lr", "ft_lrs")):
        if key in values:
            kw[field_name] = values[key]
    for key in ("epochs", "patience", "batch_size", "optimizer", "lpft", "ft_layers", "ft_train_bn", "model_dir"):
        if key in values:
            kw[key] = values[key]
    return SweepConfig(data=data, engine=engine, **kw)


def build_executor_config(values: dict):
    from .search import ExecutorConfig

    return ExecutorConfig(values.get("executor", "local"), values.get("jobs", 1), values.get("ray_address"),
                          values.get("cpus_per_run", 1), values.get("gpus_per_run", 0))


def reproduce_command(argv: list[str] | None) -> str:
    return "transferlab " + shlex.join(sys.argv[1:] if argv is None else argv)
