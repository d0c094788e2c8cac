"""Grid search and LP-then-FT over backbones, resumable through the ledger.

For every backbone: probe every configuration of the ``lp`` grid on cached features (heads sharing a
schedule train in one batched pass), choose on validation only, test the chosen probe once. With
LP-then-FT, fine-tune from exactly the chosen probe over the ``ft`` grid, choose, test once.

Every run is a ledger row keyed by a hash of everything that defines its numbers, the images
included; a re-run skips finished rows and redoes the rest. Both phases go through one path: plan the
runs, execute the missing ones as tasks on an executor (in-process, worker processes or Ray), choose
and test (``sweep.select``). Observers see every run; the ledger and the progress bar are two of them.
The caller builds the report from the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from transferlab.core.errors import ConfigError
from transferlab.core.files import FolderLock, check_writable_dir, write_json
from transferlab.core.hashing import stable_hash
from transferlab.data.eval_sets import checked_eval_split, load_eval_split
from transferlab.data.splits import split_fingerprint
from transferlab.features.cache import FeatureCache
from transferlab.sweep.config import ExecutorConfig, SweepConfig
from transferlab.sweep.executors import Executor, make_executor
from transferlab.sweep.ledger import METHODS, Ledger
from transferlab.sweep.manifest import SweepManifest, write_manifest
from transferlab.sweep.observers import LedgerRecorder, SweepProgress
from transferlab.sweep.phase import BackbonePhases
from transferlab.sweep.plan import numerics_identity, plan_line, time_left_text
from transferlab.sweep.preflight import preflight, resolve_backbones
from transferlab.sweep.store import claim_folder
from transferlab.train.objective import describe_objective
from transferlab.train.observer import Observers, RunObserver

log = logging.getLogger(__name__)
# What the sweep says it does (its plan, the time left): INFO records the CLI shows without --verbose.
progress_log = logging.getLogger("transferlab.progress")

LEDGER_FILE = "ledger.sqlite"


class Sweep:
    """Coordinates one sweep: the only writer of the ledger, holding the output folder's lock."""

    def __init__(self, cfg: SweepConfig, out: str | Path, force: bool = False, command: str = "",
                 executor: ExecutorConfig | None = None, observers: Sequence[RunObserver] = ()):
        cfg.validate()
        if cfg.probe_base.augment and cfg.engine.use_cache:
            # New views every epoch: probes and fine-tuning both run the backbone on every image (as `probe` does).
            log.warning("--augment: every epoch sees new views of the images, so the backbone runs on every image every epoch (no cache)")
            cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, use_cache=False))
        self.cfg, self.executor_cfg, self.command, self.force = cfg, executor or ExecutorConfig(), command, force
        self.extra_observers = list(observers)
        self.out = check_writable_dir(out)
        self.lock = FolderLock(self.out)
        try:
            self.ledger = Ledger(self.out / LEDGER_FILE)
        except BaseException:
            self.lock.release()  # sweep() never gets an object to close: give the folder back now
            raise
        self.cache_dir = Path(cfg.engine.cache_dir) if cfg.engine.cache_dir is not None else self.out / "cache"
        self.executor: Executor | None = None

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.ledger.close()
        self.lock.release()

    def run(self) -> None:
        """Run (or resume) every phase for every backbone."""
        cfg = self.cfg
        # Everything that can be refused is checked, for every backbone, before the ledger, sweep.json or
        # anything else is written: a refused re-run keeps the folder's previous choices.
        splits = cfg.data.load()
        if cfg.fine_tunes:  # the fine-tuning rule's epochs follow from the training split's size
            cfg = self.cfg = cfg.for_training_size(len(splits.train))
            try:
                cfg.validate()
            except ConfigError as e:
                epochs = cfg.ft.get("epochs")
                raise ConfigError(e.field, e.value, f"{e.reason} (the fine-tuning rule gives {len(splits.train)} training "
                                  f"images {epochs[0]} epochs; set --ft-epochs)") from None
        names, skipped = resolve_backbones(cfg)
        preflight(cfg, names, splits)
        numerics = numerics_identity(cfg.engine)
        self.executor = executor = make_executor(self.executor_cfg, self.out, cfg.engine.device)
        memo_dir = FeatureCache(self.cache_dir).digest_memo_dir
        ood = {name: checked_eval_split(load_eval_split(name, where, splits.classes), f"--ood {name}={where}", cfg.data.on_bad_image)[0]
               for name, where in (cfg.ood or {}).items()}
        ood_digests = {name: stable_hash(split_fingerprint(split, memo_dir)) for name, split in ood.items()}
        data_digest = claim_folder(self.ledger, self.out, cfg.data, splits, self.force, memo_dir)
        config = cfg.record()
        self.ledger.set_meta("grid", stable_hash(config))  # choices of other grids are not shown
        write_json(self.out / "sweep.json", {"config": config, "executor": dataclasses.asdict(self.executor_cfg),
                                             "command": self.command})
        for name, reason in skipped.items():
            log.warning("skipping %s: %s", name, reason)
        ft_terms = (cfg.ft.get("label_smoothing"), cfg.ft.get("l2sp")) if cfg.fine_tunes else ((0.0,), (0.0,))
        write_manifest(self.ledger, SweepManifest(
            config=config, grid={"lp": config["lp"], **({"ft": config["ft"]} if cfg.fine_tunes else {})},
            command=self.command, backbones=names, skipped_backbones=skipped, data_summary=splits.summary(),
            objective=describe_objective(cfg.lp.get("l2"), *ft_terms, smoothing_scope="fine-tuning: "),
            select=cfg.select, numerics=numerics,
            ood={n: {"where": (cfg.ood or {})[n], "digest": ood_digests[n], "n": len(s)} for n, s in ood.items()}))
        extra = {n: (s, ood_digests[n]) for n, s in ood.items()}
        phases = {name: BackbonePhases(name, cfg, splits, self.ledger, self.out, self.cache_dir, data_digest, numerics, extra,
                                       executor.extractor) for name in names}
        plans = {name: p.plan() for name, p in phases.items()}
        self._announce(plans)
        progress = SweepProgress(sum(p.total for ps in plans.values() for p in ps), cfg.engine.progress)
        observers = Observers([LedgerRecorder(self.ledger, self.out), progress, *self.extra_observers])
        started, executed = time.perf_counter(), 0
        try:
            with logging_redirect_tqdm() if cfg.engine.progress else contextlib.nullcontext():  # log lines above the bar
                for i, name in enumerate(names):
                    executed += phases[name].run(executor, observers, progress)
                    left = sum(p.to_run for later in names[i + 1:] for p in plans[later])
                    self._say_time_left(name, time.perf_counter() - started, executed, left)
        finally:
            progress.close()

    def _announce(self, plans: dict) -> None:
        """Say the plan: the totals, then one line per backbone."""
        totals = {m: sum(p.total for phases in plans.values() for p in phases if p.method == m) for m in METHODS}
        used = {"LP": True, "FT": self.cfg.plain_ft, "LP-FT": self.cfg.lpft}
        per_phase = ", ".join(f"{m} {n}" for m, n in totals.items() if used[m])
        progress_log.info("sweep plan: %d backbone(s), %d run(s) (%s)", len(plans), sum(totals.values()), per_phase)
        for name, phases in plans.items():
            progress_log.info("%s", plan_line(name, phases))

    @staticmethod
    def _say_time_left(name: str, elapsed: float, executed: int, left: int) -> None:
        estimate = time_left_text(elapsed, executed, left)
        if estimate:
            # one decimal below 10 s (never "0 s"); 9.95 rounds to "10.0", so it is whole seconds from there
            per_run = elapsed / executed
            progress_log.info("%s finished; %s (%d run(s) to go, from %s s per run so far)", name, estimate,
                              left, f"{per_run:.1f}" if per_run < 9.95 else f"{per_run:.0f}")


def sweep(cfg: SweepConfig, out: str | Path, force: bool = False, command: str = "",
          executor: ExecutorConfig | None = None, observers: Sequence[RunObserver] = ()) -> None:
    """Run (or resume) a sweep into `out` (its ledger, runs and predictions); build the report with
    ``reporting.report.build_report(out)``."""
    s = Sweep(cfg, out, force, command, executor, observers)
    try:
        s.run()
    finally:
        s.close()
