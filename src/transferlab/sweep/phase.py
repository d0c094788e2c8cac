"""Both phases of one backbone: plan the runs, execute the unfinished ones, choose and test once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from transferlab.core.errors import ConfigError
from transferlab.data import ImageSplits, Split
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.extraction import Extractor
from transferlab.sweep.config import SweepConfig
from transferlab.sweep.executors import Executor
from transferlab.sweep.ledger import Ledger, Method
from transferlab.sweep.manifest import BackboneRecord, read_backbone, write_backbone
from transferlab.sweep.observers import SweepProgress
from transferlab.sweep.plan import PhasePlan, PlannedRun, ft_layer_counts, progress_desc, run_hash
from transferlab.sweep.preflight import load_checked
from transferlab.sweep.select import choose, choose_and_test, evaluate_extra_sets
from transferlab.sweep.store import load_params
from transferlab.sweep.tasks import Task, make_tasks
from transferlab.train.config import TrainConfig
from transferlab.train.observer import Observers, RunEnd, RunInfo
from transferlab.train.results import EpochRecord, FitResult
from transferlab.train.session import RunSession

log = logging.getLogger(__name__)


class BackbonePhases:
    """The probes of backbone `name`, then (with LP-FT) fine-tuning from the chosen probe, then (with FT)
    fine-tuning from the pretrained backbone with a fresh head."""

    def __init__(self, name: str, cfg: SweepConfig, splits: ImageSplits, ledger: Ledger, out: Path, cache_dir: Path,
                 data_digest: str, numerics: dict, ood: dict[str, tuple[Split, str]] | None = None, extractor: Extractor | None = None):
        self.name, self.cfg, self.splits, self.ledger, self.out = name, cfg, splits, ledger, out
        self.cache_dir, self.data_digest, self.numerics = cache_dir, data_digest, numerics
        self.ood, self.extractor = ood or {}, extractor  # {extra test set: (split, digest)}; where caches are made (None: here)
        self.record = read_backbone(ledger, name)  # what an earlier run stored: kept until replaced

    def _session(self) -> tuple[RunSession, dict[str, int]]:
        """A run session on the backbone's cut inputs, and the fine-tuning grid's {unit: layers} on it."""
        backbone = load_checked(self.name, self.cfg.model_dir)
        ft_ks = ft_layer_counts(self.cfg, backbone)
        # Cache once, at the deepest fine-tuning cut; shallower cuts' inputs are derived from it.
        inputs = CutInputs(backbone, self.splits, self.cfg.engine, self.cache_dir, self.cfg.data.on_bad_image,
                           share_cut_layers=max(ft_ks.values()) if self.cfg.fine_tunes else None,
                           layer_order=self.cfg.probe_base.layer_order, extractor=self.extractor)
        return RunSession(inputs), ft_ks

    def plan(self) -> list[PhasePlan]:
        """What each phase runs and what the ledger already holds. LP-FT's runs start from the chosen
        probe: its done count is known once every planned probe is finished."""
        session, ft_ks = self._session()
        probes = self._probe_runs(session)
        phases = [PhasePlan("LP", len(probes), sum(self.ledger.is_finished(p.hash) for p in probes))]
        if self.cfg.lpft:
            # blocks:N and layers:k naming the same layers are one run (as _finetune_runs plans them)
            total = len(set(ft_ks.values())) * len(self.cfg.finetune_configs(self.cfg.probe_configs()[0]))
            done = None
            if phases[0].to_run == 0:
                chosen = choose(self.ledger.runs(self.name, "LP"), [p.hash for p in probes], self.cfg.select)
                if chosen is None:  # every probe diverged: nothing to fine-tune from
                    total, done = 0, 0
                else:
                    ft = self._finetune_runs(session, chosen["hash"], ft_ks)
                    total, done = len(ft), sum(self.ledger.is_finished(p.hash) for p in ft)
            phases.append(PhasePlan("LP-FT", total, done))
        if self.cfg.plain_ft:
            ft = self._plain_ft_runs(session, ft_ks)
            phases.append(PhasePlan("FT", len(ft), sum(self.ledger.is_finished(p.hash) for p in ft)))
        return phases

    def run(self, executor: Executor, observers: Observers, progress: SweepProgress) -> int:
        """Both phases; returns how many runs this call executed (not skipped as finished)."""
        cfg, name = self.cfg, self.name
        session, ft_ks = self._session()
        spec = session.inputs.backbone.spec
        info = {"source": spec.source, "source_top1": spec.source_top1, "arch": spec.arch, **(cfg.backbone_info or {}).get(name, {})}
        self.record = BackboneRecord(**info, numerics=self.record.numerics)
        write_backbone(self.ledger, name, self.record)
        if cfg.fine_tunes:
            _check_feature_augment(session, cfg, ft_ks, name)
        executed = 0
        probes = self._probe_runs(session)
        probe_hash, n = self._phase(session, "LP", probes, executor, observers, progress)
        executed += n
        if cfg.lpft and probe_hash is not None:
            _, n = self._phase(session, "LP-FT", self._finetune_runs(session, probe_hash, ft_ks), executor, observers, progress,
                               start=probe_hash)
            executed += n
        else:
            self.ledger.set_plan(name, "LP-FT", [])
            self.ledger.unchoose(name, "LP-FT")
        if cfg.plain_ft:
            _, n = self._phase(session, "FT", self._plain_ft_runs(session, ft_ks), executor, observers, progress)
            executed += n
        else:
            self.ledger.set_plan(name, "FT", [])
            self.ledger.unchoose(name, "FT")
        evaluate_extra_sets(self.ledger, session, name, self.ood, self.out)  # every choice of this backbone is made
        self.record = BackboneRecord(**{**info, "skipped_files": session.inputs.skipped_files, "numerics": self.record.numerics})
        write_backbone(self.ledger, name, self.record)
        return executed

    # -- what each phase runs ---------------------------------------------------------------------
    def _hash(self, session: RunSession, method: Method, cfg: TrainConfig, k: int, start: str | None = None) -> str:
        # Where the cached inputs come from changes the numbers (the runtime runs the prefix up to that
        # block, eager PyTorch the rest): part of the run's identity.
        numerics = {**self.numerics, "cached_at": session.inputs.cache_origin(k)} if self.numerics.get("cached") else self.numerics
        if self.record.numerics.get(str(k)) != numerics:  # what export checks a hash with: stored as soon as known
            self.record.numerics[str(k)] = numerics
            write_backbone(self.ledger, self.name, self.record)
        return run_hash(method, self.name, session.inputs.backbone.weights_digest, self.data_digest, self.cfg.data, cfg, k, start, numerics)

    def _probe_runs(self, session: RunSession) -> list[PlannedRun]:
        return [PlannedRun(self._hash(session, "LP", c, 1), c, 1) for c in self.cfg.probe_configs()]

    def _finetune_runs(self, session: RunSession, probe_hash: str, ft_ks: dict[str, int]) -> list[PlannedRun]:
        probe = self.ledger.run(probe_hash)
        assert probe is not None
        return self._unit_runs(session, "LP-FT", self.cfg.finetune_configs(TrainConfig.from_dict(probe["config"])), ft_ks, probe_hash)

    def _plain_ft_runs(self, session: RunSession, ft_ks: dict[str, int]) -> list[PlannedRun]:
        return self._unit_runs(session, "FT", self.cfg.plain_ft_configs(), ft_ks)

    def _unit_runs(self, session: RunSession, method: Method, cfgs: list[TrainConfig], ft_ks: dict[str, int],
                   start: str | None = None) -> list[PlannedRun]:
        planned: dict[str, PlannedRun] = {}  # blocks:N and layers:k may name the same layers: one run
        for unit, k in ft_ks.items():
            for c in cfgs:
                h = self._hash(session, method, c, k, start)
                planned.setdefault(h, PlannedRun(h, c, k, unit))
        return list(planned.values())

    # -- one path for every phase -----------------------------------------------------------------
    def _phase(self, session: RunSession, method: Method, planned: list[PlannedRun], executor: Executor, observers: Observers,
               progress: SweepProgress, start: str | None = None) -> tuple[str | None, int]:
        """Execute the unfinished runs of `planned`, then choose on validation and test once: the chosen
        hash, and how many runs were executed."""
        self.ledger.set_plan(self.name, method, [p.hash for p in planned])  # what the report reads
        todo = [p for p in planned if not self.ledger.is_finished(p.hash)]
        progress.phase(progress_desc(self.name, method), len(planned) - len(todo))
        start_state = None if start is None or not todo else load_params(self.out, start)
        for k in dict.fromkeys(p.k for p in todo):  # one cut at a time, in grid order
            runs = [p for p in todo if p.k == k]
            units = make_tasks(session, executor, k, [p.cfg for p in runs], start_state)
            self._execute(session, method, k, [([runs[i] for i in members], task) for members, task in units], executor, observers)
        return choose_and_test(self.ledger, session, self.name, method, planned, self.cfg.select, self.out, observers), len(todo)

    def _execute(self, session: RunSession, method: Method, k: int, units: list[tuple[list[PlannedRun], Task]],
                 executor: Executor, observers: Observers) -> None:
        """Run every unit; each of its runs ends done, diverged or failed (error stored), and the sweep goes on.

        A unit's runs start when it is submitted, and no more units are in flight than the executor has
        room for: an interruption leaves only those unfinished.
        """
        n_params = session.trainable_param_count(k)
        runtime = session.inputs.setup(k).runtime  # what computed the cached inputs (None: the uncached path)
        waiting = list(units)
        in_flight: dict[object, list[PlannedRun]] = {}
        while waiting or in_flight:
            while waiting and (executor.capacity is None or len(in_flight) < executor.capacity):
                runs, task = waiting.pop(0)
                for p in runs:
                    observers.run_start(RunInfo(p.hash, self.name, method, p.cfg, p.k, p.unit))
                in_flight[executor.submit(task, _epoch_events(observers, [p.hash for p in runs]))] = runs
            handle = executor.wait_any(list(in_flight))
            runs = in_flight.pop(handle)
            try:
                results: list[FitResult] = executor.result(handle)
            except Exception as e:  # a bug, out of memory, a dead worker: record it, keep going
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                for p in runs:
                    observers.run_end(p.hash, RunEnd("failed", {}, error))
                log.warning("%s %s: %d run(s) failed (%s); re-run the same command to retry them", self.name, method, len(runs), error)
                continue
            for p, result in zip(runs, results):
                observers.run_end(p.hash, RunEnd(result.status, run_metrics(p, result, n_params, runtime), result=result))


def _check_feature_augment(session: RunSession, cfg: SweepConfig, ft_ks: dict[str, int], name: str) -> None:
    """check_ft_grid planned this; the set-up of the inputs is the final word, before any run."""
    for k in dict.fromkeys(ft_ks.values()):
        for augment in cfg.ft.get("feature_augment", ("none",)):
            try:
                session.inputs.check_feature_augment(augment, k)
            except ConfigError as e:
                raise ConfigError("ft.feature_augment", e.value, f"{e.reason} ({name})") from None


def _epoch_events(observers: Observers, run_ids: list[str]) -> Callable[[int, EpochRecord], None]:
    """A task's on_epoch(member, record) as the observers' epoch event of that member's run."""
    def on_epoch(member: int, record: EpochRecord) -> None:
        try:
            observers.epoch(run_ids[member], record)
        except Exception as e:  # events are best effort: a failing observer never fails a run or the sweep
            log.warning("an observer failed on an epoch event (%s: %s); the run goes on", type(e).__name__, e)

    return on_epoch


def run_metrics(p: PlannedRun, result: FitResult, n_params: int, runtime: dict | None) -> dict:
    """The ledger's metrics of a finished run."""
    val_xent, val_err = result.val_metrics  # of the returned weights (after interpolation, if any)
    return {"best_epoch": result.best_epoch, "epochs_run": result.history[-1]["epoch"], "val_xent": val_xent,
            "val_err": val_err, "trainable_params": n_params, "n_trainable_layers": p.k, "unit": p.unit,
            "wise_alpha": result.wise_alpha, "wise": result.wise, "runtime": runtime,
            # the best epoch's own numbers (before interpolation), as the history and the curves show them
            "epoch_val_xent": result.best["val_xent"], "epoch_val_err": result.best["val_err"]}
