"""The Python twins of the commands: ``transferlab.probe(...)`` builds the same configs as ``transferlab probe``
from keyword arguments checked by name and type, and runs the probe."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferlab.core.errors import ConfigError
from transferlab.core.fields import build_config, check_keywords, config_fields, field_doc, keyword_signature, path_argument
from transferlab.models import DEFAULT_BACKBONE
from transferlab.reporting.probe_report import build_probe_report
from transferlab.train.observer import RunObserver
from transferlab.train.probe_run import ProbeConfig, train_probe

__all__ = ["probe", "run_probe"]


def run_probe(cfg: ProbeConfig, out: str | Path, command: str | None = None, observers: Sequence[RunObserver] = ()) -> dict:
    """Train one probe (``train.probe_run.train_probe``), then build its report from its files: curves.png,
    report.html and with a test split insight.html and insight/. Returns the run record (also in run.json)."""
    record = train_probe(cfg, out, command, observers)
    build_probe_report(out)  # from run.json and test_predictions.json alone
    return record


def probe(data: str | os.PathLike, out: str | os.PathLike, backbone: str = DEFAULT_BACKBONE,
          observers: Sequence[RunObserver] = (), **fields: Any) -> dict:
    """Python twin of ``transferlab probe``: train one probe on `data`, write outputs to `out`, return the record.

    Keyword arguments are the config fields below (those of ``ProbeConfig`` and its ``DataConfig``,
    ``TrainConfig`` and ``EngineConfig``), by name and with their types: ``probe(data, out, lr=1e-3)``;
    any real number is a float and any integral one an int (``np.float32``, ``np.int64``), stored as
    the plain Python number. An unknown name, a sweep-only one or a value of the wrong type raises a
    ConfigError naming the field (and close names). `observers` see the run's events (``train.observer``).
    """
    data_text, out_text = path_argument("data", data), path_argument("out", out)
    if not isinstance(backbone, str):
        raise ConfigError("backbone", repr(backbone), f"expected str, got {type(backbone).__name__}")
    checked = check_keywords(PROBE_FIELDS, fields, _sweep_options())
    call = ", ".join([repr(data_text), repr(out_text), f"backbone={backbone!r}", *(f"{k}={v!r}" for k, v in checked.items())])
    return run_probe(build_config(ProbeConfig, {**checked, "data": data_text, "backbone": backbone}), out_text,
                     command=f"transferlab.probe({call})", observers=observers)


# Names of sweep options in earlier versions of the sweep's config, said of as the flag that sets them now.
LEGACY_SWEEP_NAMES = {"lrs": "--lr", "l2s": "--l2", "ft_lrs": "--ft-lr", "ft_label_smoothing": "--label-smoothing"}


def _sweep_options() -> dict[str, str]:
    """{keyword: what a probe says of it} for the options only ``transferlab sweep`` has (``ft_blocks``, ``seeds``)."""
    from transferlab.sweep.config import PHASES, UNIT_FIELDS, ExecutorConfig, SweepConfig, phase_flag, train_fields

    flags = [phase_flag(p, n) for p in PHASES for n in [*train_fields(), *(UNIT_FIELDS if p == "ft" else ())]]
    keys = {flag.removeprefix("--").replace("-", "_"): flag for flag in flags}
    for cls in (SweepConfig, ExecutorConfig):
        for f in dataclasses.fields(cls):
            if f.metadata:
                keys[f.name] = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    keys.update(LEGACY_SWEEP_NAMES)
    return {key: f"is a sweep option (transferlab sweep {flag}), not a probe field" for key, flag in keys.items()
            if key not in PROBE_FIELDS}


PROBE_FIELDS = config_fields(ProbeConfig)
probe.__signature__ = keyword_signature(probe, PROBE_FIELDS, skip=("data",))  # type: ignore[attr-defined]
probe.__doc__ = f"{probe.__doc__}\n    Fields:\n{field_doc({k: v for k, v in PROBE_FIELDS.items() if k not in ('data', 'backbone')})}\n"
