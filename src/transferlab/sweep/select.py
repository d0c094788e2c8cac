"""Choosing on validation only, and testing once: the one owner of both, for the sweep and for export."""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.predictions import ood_predictions_path, sweep_predictions_path, write_test_predictions
from transferlab.data import Split
from transferlab.sweep.ledger import METHODS, Ledger, Method, RunRow
from transferlab.sweep.manifest import read_manifest
from transferlab.sweep.plan import PlannedRun
from transferlab.sweep.store import load_params
from transferlab.train.config import selection_key
from transferlab.train.observer import RunObserver
from transferlab.train.session import RunSession

log = logging.getLogger(__name__)


def choose(rows: list[RunRow], order: list[str], select: str = "val_xent") -> RunRow | None:
    """Among the runs whose hash is in `order`, the finished, non-diverged one that is best under `select`
    (val_xent: lowest val xent, ties by val err; val_err: the reverse), then by position in `order`."""
    done = [r for r in rows if r["hash"] in order and r["status"] == "done" and (r["metrics"] or {}).get("val_xent") is not None]
    if not done:
        return None
    return min(done, key=lambda r: (*selection_key(select, r["metrics"]["val_xent"], r["metrics"]["val_err"]),  # type: ignore[index]
                                    order.index(r["hash"])))


def choose_and_test(ledger: Ledger, session: RunSession, backbone: str, method: Method, planned: list[PlannedRun], select: str,
                    out: Path, observers: RunObserver) -> str | None:
    """Choose among `planned` on validation (only once every run is finished) and evaluate the test split
    for the chosen run unless the ledger already holds its one test evaluation; the chosen hash (None: no
    choice, and the ledger then shows none for this grid)."""
    hashes = [p.hash for p in planned]
    if not all(ledger.is_finished(h) for h in hashes):
        log.warning("%s %s: some runs failed or are unfinished; re-run the same command to finish them before choosing",
                    backbone, method)
        ledger.unchoose(backbone, method)
        return None
    chosen = choose(ledger.runs(backbone, method), hashes, select)
    if chosen is None:
        log.warning("%s %s: every run diverged; nothing to test", backbone, method)
        ledger.unchoose(backbone, method)
        return None
    h = chosen["hash"]
    ledger.choose(backbone, method, h)
    k = next(p.k for p in planned if p.hash == h)
    test = session.inputs.splits.test
    if chosen["test_acc"] is None and test is not None:
        # Per-image predictions of this one evaluation: the report's per-class insight reads them.
        observers.test(h, evaluate_once(session, out, h, k, test, sweep_predictions_path(out, h)))
    return h


def evaluate_once(session: RunSession, out: Path, run_hash: str, k: int, split: Split, predictions: Path) -> float:
    """Run `run_hash`'s trained state on `split` once, keep the per-image predictions in `predictions`; the accuracy."""
    session.load_trained(k, load_params(out, run_hash))
    result = session.evaluate_split(k, split)
    assert result is not None
    write_test_predictions(predictions, session.inputs.splits.classes, result.files, result.labels, result.probs.numpy())
    return result.accuracy


def sweep_choices(ledger: Ledger) -> list[dict]:
    """Every chosen run of a sweep ledger: backbone, method, hash, val_xent, val_err and the run's row."""
    rows = []
    for name in read_manifest(ledger).backbones:
        for method in METHODS:
            h = ledger.choice(name, method)
            if h is None:
                continue
            run = ledger.run(h)
            assert run is not None  # a choice references its run (foreign key)
            metrics = run["metrics"] or {}
            rows.append({"backbone": name, "method": method, "hash": h, "val_xent": metrics.get("val_xent"),
                         "val_err": metrics.get("val_err"), "run": run})
    return rows


def pick_choice(choices: list[dict], backbone: str | None, method: str | None, where: str, select: str = "val_xent") -> dict:
    """The chosen run for (backbone, method), as export takes it; unspecified parts: the best under the
    sweep's `select` criterion (lowest validation cross-entropy, ties: validation error; or the reverse)."""
    if method is not None and method not in METHODS:
        raise ConfigError("method", method, "expected LP, FT or LP-FT")
    fits = [c for c in choices if (backbone is None or c["backbone"] == backbone) and (method is None or c["method"] == method)]
    if not fits:
        known = ", ".join(f"{c['backbone']}/{c['method']}" for c in choices) or "none"
        asked = "/".join(x for x in (backbone, method) if x) or "any"
        raise UserError(f"{where}: no chosen run for {asked} (chosen runs: {known})")
    finite = [c for c in fits if c["val_xent"] is not None and c.get("val_err") is not None]
    if not finite:
        return fits[0]
    return min(finite, key=lambda c: selection_key(select, c["val_xent"], c["val_err"]))


def evaluate_extra_sets(ledger: Ledger, session: RunSession, backbone: str, sets: dict[str, tuple[Split, str]], out: Path) -> None:
    """Evaluate every chosen run of `backbone` once on each extra test set ({name: (split, digest)}), after
    its choices are made: nothing chosen ever reads these sets. The per-image predictions go beside the
    test predictions (``predictions/ood_<name>/<hash>.json``); a run already evaluated on the same images
    is not evaluated again."""
    for method in METHODS:
        h = ledger.choice(backbone, method)
        if h is None:
            continue
        for name, (split, digest) in sets.items():
            if ledger.ood_accuracy(h, name, digest) is not None:
                continue
            run = ledger.run(h)
            assert run is not None and run["metrics"] is not None
            k = run["metrics"]["n_trainable_layers"]
            ledger.record_ood(h, name, digest, evaluate_once(session, out, h, k, split, ood_predictions_path(out, name, digest, h)))
