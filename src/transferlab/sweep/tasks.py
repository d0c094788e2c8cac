"""Units of work a sweep hands to an executor: plain picklable objects, run wherever the executor runs them.

A task never touches the ledger; it returns one FitResult per run it holds. Inputs cached by the
coordinator travel with the task (Ray's object store, process arguments, or by reference in-process).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from transferlab.core.devices import Placement
from transferlab.data import ImageSplits
from transferlab.features.cut_inputs import CutInputs, CutSnapshot
from transferlab.features.cut_setup import ViewsKey
from transferlab.features.engine import EngineConfig
from transferlab.features.shards import ShardedRows, StackedRows
from transferlab.features.sources import SplitInputs, TensorSource
from transferlab.models import Backbone
from transferlab.models.heads import new_head
from transferlab.sweep.executors import Executor, InProcessExecutor
from transferlab.train.config import TrainConfig, parse_feature_augment
from transferlab.train.probes import fit_linear_probes, probe_groups
from transferlab.train.results import EpochRecord, FitResult
from transferlab.train.session import FrozenWeightsChanged, RunSession

OnEpoch = Callable[[int, EpochRecord], None]  # (member: the run's index within its task, record)


class Task(Protocol):
    """What an executor runs: ``task(on_epoch)`` -> one FitResult per run of the task; ``on_epoch(member, record)``
    sees every epoch record of run `member` (epoch 0 first)."""

    threads: int

    def __call__(self, on_epoch: OnEpoch | None = None) -> list[FitResult]: ...


def fetch(obj):
    """An object a task was given by reference (a Ray ObjectRef, from ``Executor.put``) or by value."""
    if type(obj).__name__ == "ObjectRef":
        import ray

        return ray.get(obj)
    return obj


def _digest(item: SplitInputs) -> bytes:
    import hashlib

    if isinstance(item.inputs, (ShardedRows, StackedRows)):  # read-only maps of files: batches are copies
        views = item.inputs.views if isinstance(item.inputs, StackedRows) else [item.inputs]
        return hashlib.sha256("".join(v.identity() for v in views).encode()).digest()
    return hashlib.sha256(item.inputs.contiguous().numpy().tobytes()).digest()


@dataclass
class ProbeGroupTask:
    """Linear probes sharing a schedule, trained in one batched pass on cached features."""

    feature_dim: int
    n_classes: int
    head_name: str
    train: SplitInputs
    val: SplitInputs
    cfgs: list[TrainConfig]
    engine: EngineConfig
    threads: int

    def __call__(self, on_epoch: OnEpoch | None = None) -> list[FitResult]:
        torch.set_num_threads(self.threads)
        placement = Placement.of(self.engine.device, self.engine.dtype)
        train, val = fetch(self.train), fetch(self.val)
        before = (_digest(train), _digest(val))
        heads = [new_head(self.feature_dim, self.n_classes, self.cfgs[0].seed).to(placement.device, placement.dtype)
                 for _ in self.cfgs]
        results = fit_linear_probes(heads, TensorSource(train, placement), TensorSource(val, placement),
                                    self.cfgs, self.head_name, on_epoch)
        # The frozen backbone is represented here by its cached outputs: they must not change either.
        if (_digest(train), _digest(val)) != before:
            raise FrozenWeightsChanged("the cached features changed during training")
        return results


@dataclass
class TrainTask:
    """One run of the last `n_trainable_layers` layers from pristine weights plus `start_state`.

    With a `snapshot` (the coordinator's cached inputs of the cut) no image is decoded; without, the
    task decodes the images itself every epoch (the uncached path).
    """

    backbone: Backbone  # pristine weights (by value or by reference: see fetch)
    splits: ImageSplits
    engine: EngineConfig
    on_bad_image: str
    n_trainable_layers: int
    snapshot: CutSnapshot | None  # its tensors by value or by reference (see fetch), each shipped once per cut
    cfg: TrainConfig
    start_state: dict[str, torch.Tensor] | None
    threads: int

    def __call__(self, on_epoch: OnEpoch | None = None) -> list[FitResult]:
        torch.set_num_threads(self.threads)
        engine = dataclasses.replace(self.engine, progress=False)
        # A private copy: in-process, the backbone object is shared with the coordinator.
        backbone = copy.deepcopy(fetch(self.backbone))
        inputs = CutInputs(backbone, fetch(self.splits), engine, cache_dir=None, on_bad_image=self.on_bad_image,
                           layer_order=self.cfg.layer_order)
        snapshot = self.snapshot
        if snapshot is not None:
            inputs.adopt(CutSnapshot(snapshot.n_trainable_layers, fetch(snapshot.train), fetch(snapshot.val),
                                     {key: fetch(v) for key, v in snapshot.views.items()}))
        report = None if on_epoch is None else (lambda record: on_epoch(0, record))  # one run: member 0
        return [RunSession(inputs).run(self.cfg, self.n_trainable_layers, start_state=fetch(self.start_state), on_epoch=report)]


def _views_key(cfg: TrainConfig) -> ViewsKey | None:
    """The set of cached train views `cfg` trains on (--ft-augment views:K), if any."""
    kind, n_views = parse_feature_augment(cfg.feature_augment) or ("none", 0)
    return (n_views, cfg.seed, cfg.augment_min_scale) if kind == "views" else None


def make_tasks(session: RunSession, executor: Executor, n_trainable_layers: int, cfgs: list[TrainConfig],
               start_state: dict[str, torch.Tensor] | None) -> list[tuple[list[int], Task]]:
    """The units of work that train `cfgs` on `session`'s inputs: (indices into `cfgs`, task) pairs.

    Linear probes on cached features train in batched groups (``probe_groups``); anything else is one
    run per task. What tasks share (features, each set of train views, pristine weights, the start
    state) is shipped once through ``executor.put``. Extraction, or a cache load, happens here: only
    when there is work.
    """
    k, inputs = n_trainable_layers, session.inputs
    engine, backbone = inputs.engine, inputs.backbone
    if k == 1 and start_state is None and all(c.feature_augment == "none" for c in cfgs):
        snapshot = inputs.snapshot(k, views_keys=[])
        if snapshot is not None:
            train, val = executor.put(snapshot.train), executor.put(snapshot.val)
            return [(members, ProbeGroupTask(backbone.feature_dim, inputs.n_classes, backbone.classifier_name, train, val,
                                             [cfgs[i] for i in members], engine, executor.threads))
                    for members in probe_groups(cfgs)]
    keys = list(dict.fromkeys(key for key in map(_views_key, cfgs) if key is not None))
    snapshot = inputs.snapshot(k, views_keys=keys)  # each set of views computed (or loaded) once
    session.reset(seed=0, n_trainable_layers=k)  # pristine weights, shipped on the CPU: each task places its own copy
    pristine = copy.deepcopy(backbone)
    pristine.model.to("cpu", torch.float32)
    shipped_backbone, splits = executor.put(pristine), executor.put(inputs.splits)
    start = None if start_state is None else executor.put(start_state)
    shared = None if snapshot is None else CutSnapshot(k, executor.put(snapshot.train), executor.put(snapshot.val))
    views = {} if snapshot is None else {key: executor.put(v) for key, v in snapshot.views.items()}
    tasks: list[tuple[list[int], Task]] = []
    for i, cfg in enumerate(cfgs):
        key = _views_key(cfg)
        mine = None if shared is None else dataclasses.replace(shared, views={} if key is None else {key: views[key]})
        tasks.append(([i], TrainTask(shipped_backbone, splits, engine, session.inputs.on_bad_image, k, mine, cfg, start, executor.threads)))
    return tasks


def train_probes(session: RunSession, cfgs: list[TrainConfig], on_epoch: OnEpoch | None = None) -> list[FitResult]:
    """Linear probes for `cfgs` on `session`'s inputs, in this process, grouped and run as a sweep runs them;
    `on_epoch(i, record)` sees the records of `cfgs[i]`."""
    results: list[FitResult | None] = [None] * len(cfgs)
    for members, task in make_tasks(session, InProcessExecutor(), 1, cfgs, None):
        report = None if on_epoch is None else (lambda member, record, members=members: on_epoch(members[member], record))
        for i, result in zip(members, task(report)):
            results[i] = result
    return [r for r in results if r is not None]
