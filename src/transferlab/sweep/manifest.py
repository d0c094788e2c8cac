"""What a sweep folder's ledger says about the sweep as a whole: one typed record written by the sweep,
read by the report and by export (standard library only, so reports are rebuilt without torch).

The ledger's ``meta`` table holds it as JSON under one key (:data:`MANIFEST_KEY`), and one
:class:`BackboneRecord` per backbone (``backbone:<name>``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transferlab.core.errors import UserError
from transferlab.sweep.ledger import Ledger

MANIFEST_KEY = "manifest"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SweepManifest:
    """The sweep that wrote a ledger: its config, its grids, its command and what it ran on."""

    config: dict[str, Any] = field(default_factory=dict)  # dataclasses.asdict(SweepConfig)
    grid: dict[str, dict[str, list]] = field(default_factory=dict)  # phase ("lp", "ft") -> {TrainConfig field: values}
    command: str = ""
    backbones: list[str] = field(default_factory=list)  # the backbones it ran, in sweep order
    skipped_backbones: dict[str, str] = field(default_factory=dict)  # name -> why not
    data_summary: dict[str, Any] = field(default_factory=dict)  # ImageSplits.summary()
    objective: str = ""
    select: str = "val_xent"
    numerics: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra test set name -> {where, digest, n}
    version: int = MANIFEST_VERSION

    def phase(self, name: str) -> dict[str, list]:
        """{field: values} of phase `name` ({} when the sweep did not run it)."""
        return self.grid.get(name, {})

    def value(self, phase: str, name: str, default: Any = None) -> Any:
        """The one value of a field fixed in `phase` (None where the phase lists several, or none)."""
        values = self.phase(phase).get(name)
        return values[0] if values is not None and len(values) == 1 else default

    @property
    def n_test(self) -> int | None:
        """How many test images the sweep had (None: unknown, or no test split)."""
        n = (self.data_summary.get("test") or {}).get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) else None


@dataclass(frozen=True)
class BackboneRecord:
    """What one backbone of the sweep was, and what of its data it could not use."""

    source: str | None = None
    source_top1: float | None = None
    arch: str | None = None
    skipped_files: dict[str, list[str]] = field(default_factory=dict)  # split -> files skipped
    numerics: dict[str, dict] = field(default_factory=dict)  # str(n_trainable_layers) -> what computed its inputs


def write_manifest(ledger: Ledger, manifest: SweepManifest) -> None:
    ledger.set_meta(MANIFEST_KEY, dataclasses.asdict(manifest))


def read_manifest(ledger: Ledger) -> SweepManifest:
    """The ledger's manifest (an empty one for a ledger no sweep finished planning)."""
    return _build(SweepManifest, ledger.get_meta(MANIFEST_KEY, {}))


def require_manifest(ledger: Ledger, where: str) -> None:
    """A UserError for a ledger with runs but no manifest (written by a transferlab before it): what to do."""
    if ledger.get_meta(MANIFEST_KEY) is None and ledger.runs():
        raise UserError(f"{where}: its ledger was written by an earlier transferlab (no sweep manifest); re-run its "
                        "sweep command to update it (finished runs are reused)")


def write_backbone(ledger: Ledger, name: str, record: BackboneRecord) -> None:
    ledger.set_meta(f"backbone:{name}", dataclasses.asdict(record))


def read_backbone(ledger: Ledger, name: str) -> BackboneRecord:
    return _build(BackboneRecord, ledger.get_meta(f"backbone:{name}", {}))


def _build(cls: type, values: dict) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
