"""Units of work a sweep hands to an executor: plain picklable objects, run wherever the executor runs them.

A task never touches the ledger; it returns one FitResult per run it holds. Inputs cached by the
coordinator travel with the task (Ray's object store, process arguments, or by reference in-process).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from transferlab.core.devices import Placement
from transferlab.data import ImageSplits
from transferlab.features.sources import SplitInputs, TensorSource
from transferlab.features.workbench import EngineConfig, FrozenWeightsChanged, Workbench
from transferlab.models import Backbone
from transferlab.models.heads import new_head
from transferlab.sweep.executors import Executor, InProcessExecutor
from transferlab.train.training import EpochRecord, FitResult, TrainConfig, fit_linear_probes, parse_feature_augment, probe_groups

OnEpoch = Callable[[EpochRecord], None]


class Task(Protocol):
    """What an executor runs: ``task(on_epoch)`` -> one FitResult per run of the task."""

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

    With `inputs` (the coordinator's cached prefix outputs) no image is decoded; without, the
    task decodes the images itself every epoch (the uncached path).
    """

    backbone: Backbone  # pristine weights (by value or by reference: see fetch)
    splits: ImageSplits
    engine: EngineConfig
    on_bad_image: str
    n_trainable_layers: int
    inputs: dict[str, SplitInputs] | None
    cfg: TrainConfig
    start_state: dict[str, torch.Tensor] | None
    threads: int
    views: dict[tuple[int, int, float], SplitInputs] | None = None  # cached augmented train views (--ft-augment views:K)

    def __call__(self, on_epoch: OnEpoch | None = None) -> list[FitResult]:
        torch.set_num_threads(self.threads)
        engine = dataclasses.replace(self.engine, progress=False)
        # A private copy: in-process, the backbone object is shared with the coordinator.
        backbone = copy.deepcopy(fetch(self.backbone))
        bench = Workbench(backbone, fetch(self.splits), engine, cache_dir=None, on_bad_image=self.on_bad_image,
                          layer_order=self.cfg.layer_order)
        inputs = fetch(self.inputs)
        if inputs is not None:
            bench.adopt_inputs(self.n_trainable_layers, inputs, fetch(self.views))
        return [bench.run(self.cfg, self.n_trainable_layers, start_state=fetch(self.start_state), on_epoch=on_epoch)]


def make_tasks(bench: Workbench, executor: Executor, n_trainable_layers: int, cfgs: list[TrainConfig],
               start_state: dict[str, torch.Tensor] | None, on_bad_image: str) -> list[tuple[list[int], Task]]:
    """The units of work that train `cfgs` on `bench`: (indices into `cfgs`, task) pairs.

    Linear probes on cached features train in batched groups (``probe_groups``); anything else is one
    run per task. What tasks share (features, pristine weights, the start state) is shipped once
    through ``executor.put``. Extraction, or a cache load, happens here: only when there is work.
    """
    k, engine = n_trainable_layers, bench.engine
    inputs = bench.inputs(k)
    if k == 1 and start_state is None and inputs is not None and all(c.feature_augment == "none" for c in cfgs):
        train, val = executor.put(inputs["train"]), executor.put(inputs["val"])
        return [(members, ProbeGroupTask(bench.backbone.feature_dim, bench.n_classes, bench.backbone.classifier_name, train, val,
                                         [cfgs[i] for i in members], engine, executor.threads))
                for members in probe_groups(cfgs)]
    bench.reset(seed=0, n_trainable_layers=k)  # pristine weights, shipped on the CPU: each task places its own copy
    pristine = copy.deepcopy(bench.backbone)
    pristine.model.to("cpu", torch.float32)
    backbone, splits = executor.put(pristine), executor.put(bench.splits)
    shipped = None if inputs is None else executor.put(inputs)
    start = None if start_state is None else executor.put(start_state)
    views: dict[tuple[int, int, float], Any] = {}  # each set of views is computed (or loaded) once, shipped once
    tasks: list[tuple[list[int], Task]] = []
    for i, cfg in enumerate(cfgs):
        kind, n_views = parse_feature_augment(cfg.feature_augment) or ("none", 0)
        mine = None
        if kind == "views" and inputs is not None:
            key = (n_views, cfg.seed, cfg.augment_min_scale)
            if key not in views:
                views[key] = executor.put({key: bench.views(k, *key)})
            mine = views[key]
        tasks.append(([i], TrainTask(backbone, splits, engine, on_bad_image, k, shipped, cfg, start, executor.threads, mine)))
    return tasks


def train_probes(bench: Workbench, cfgs: list[TrainConfig], on_epoch: OnEpoch | None = None) -> list[FitResult]:
    """Linear probes for `cfgs` on `bench`, in this process, grouped and run as a sweep runs them."""
    results: list[FitResult | None] = [None] * len(cfgs)
    for members, task in make_tasks(bench, InProcessExecutor(), 1, cfgs, None, bench.on_bad_image):
        for i, result in zip(members, task(on_epoch)):
            results[i] = result
    return [r for r in results if r is not None]
