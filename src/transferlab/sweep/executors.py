"""Where a sweep's tasks execute: in the coordinating process, in local worker processes, or on Ray.

Every executor has the same small interface (:class:`Executor`), so the sweep has one way to run a
unit of work whatever runs it. Workers return results and never touch the ledger. A task is called as
``task(on_epoch)``; its ``on_epoch(member, record)`` calls reach the callback given to ``submit`` in the
coordinating process, wherever the task runs: directly in-process, through a manager queue from worker
processes, through a Ray queue from Ray tasks (drained while the coordinator waits).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from transferlab.core.devices import resolve_device
from transferlab.core.errors import ConfigError
from transferlab.features.cluster import RayExtractor
from transferlab.features.extraction import Extractor
from transferlab.sweep.config import ExecutorConfig

log = logging.getLogger(__name__)

OnEvent = Callable[[int, Any], None]  # (member of the task, epoch record)
POLL_S = 0.2  # how often a waiting coordinator delivers the epoch events of running tasks


class Executor(Protocol):
    """Runs tasks (callables returning a list of results) somewhere and hands their results back."""

    threads: int  # intra-op threads every task uses, wherever it runs
    capacity: int | None  # tasks worth having in flight at once (None: as many as there are)
    extractor: Extractor | None  # computes missing feature caches (None: in the coordinating process)

    def put(self, obj: Any) -> Any:
        """A reference to `obj` that tasks can take as an argument (shipped once, used by many tasks)."""

    def submit(self, task: Callable[..., Any], on_epoch: OnEvent | None = None) -> Any:
        """Start `task`; returns a handle. The task's epoch events reach `on_epoch(member, record)` here."""

    def wait_any(self, handles: list) -> Any:
        """The first of `handles` whose task has finished (successfully or not), delivering epoch events
        of running tasks meanwhile."""

    def result(self, handle: Any) -> Any:
        """The task's return value, or its exception raised here."""

    def close(self) -> None: ...


def coordinator_threads() -> int:
    """Intra-op threads every run uses, wherever it executes.

    Float reductions in matmuls and convolutions depend on the thread count, so runs shipped to
    workers use the coordinator's count: that is what makes a Ray or multi-process sweep reproduce
    the in-process sweep bit for bit (at the price of oversubscribing cores when runs overlap).
    """
    import torch

    return torch.get_num_threads()


class _Deferred:
    """An in-process task, run when its result is first waited for."""

    def __init__(self, task: Callable[..., Any], on_epoch: OnEvent | None):
        self.task, self.on_epoch = task, on_epoch
        self.value: Any = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.value = self.task(on_epoch=self.on_epoch)
        except Exception as e:  # reported by result(); KeyboardInterrupt goes straight up
            self.error = e


class InProcessExecutor:
    """Runs each task in this process, one at a time, when the sweep asks for its result."""

    capacity: int | None = 1
    extractor: Extractor | None = None

    def __init__(self) -> None:
        self.threads = coordinator_threads()

    def put(self, obj: Any) -> Any:
        return obj

    def submit(self, task: Callable[..., Any], on_epoch: OnEvent | None = None) -> _Deferred:
        return _Deferred(task, on_epoch)

    def wait_any(self, handles: list) -> _Deferred:
        handles[0].run()
        return handles[0]

    def result(self, handle: _Deferred) -> Any:
        if handle.error is not None:
            raise handle.error
        return handle.value

    def close(self) -> None:
        pass


class _QueueEvents:
    """A task's on_epoch in a worker: its events go to the coordinator's queue, tagged with the task's key."""

    def __init__(self, queue: Any, key: int):
        self.queue, self.key, self.broken = queue, key, False

    def __call__(self, member: int, record: Any) -> None:
        if self.broken:
            return
        try:
            self.queue.put((self.key, member, record))
        except Exception:  # the channel is gone (manager or queue actor died): the run goes on without events
            self.broken = True


def _drain(queue: Any, callbacks: dict[int, OnEvent]) -> None:
    """Deliver every queued (key, member, record) event to its task's callback."""
    import queue as queue_module

    while True:
        try:
            key, member, record = queue.get_nowait()
        except (queue_module.Empty, EOFError, OSError):  # ray.util.queue.Empty is a queue.Empty too
            return
        except Exception as e:  # the channel itself failed (a dead Ray queue actor): results still arrive without it
            log.warning("epoch events are lost (%s); the runs go on", type(e).__name__)
            return
        if key in callbacks:
            callbacks[key](member, record)


def _call_pickled(blob: bytes, queue: Any, key: int) -> bytes:
    task = pickle.loads(blob)
    return pickle.dumps(task(_QueueEvents(queue, key)))


class ProcessExecutor:
    """`jobs` local worker processes (spawned, so no forked torch thread pools).

    Tasks and results travel as plain pickled bytes: multiprocessing's own pickler would hand torch
    tensors over as *shared memory*, and concurrent fine-tuning runs would then train one shared copy
    of the weights. Every worker uses the device the sweep was given (they share a GPU).
    """

    def __init__(self, jobs: int):
        if jobs < 1:
            raise ConfigError("jobs", jobs, "must be at least 1")
        self.threads = coordinator_threads()
        # No more tasks than workers in flight: a worker that dies breaks the pool, and fails only the
        # tasks that were running, not ones still waiting their turn.
        self.jobs = jobs
        self.capacity: int | None = jobs
        self.extractor: Extractor | None = None
        self.pool = self._new_pool()
        self._manager = multiprocessing.get_context("spawn").Manager()
        self.events = self._manager.Queue()
        self._callbacks: dict[int, OnEvent] = {}
        self._keys: dict[cf.Future, int] = {}

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))

    def put(self, obj: Any) -> Any:
        return obj

    def submit(self, task: Callable[..., Any], on_epoch: OnEvent | None = None) -> cf.Future:
        key = len(self._keys)
        if on_epoch is not None:
            self._callbacks[key] = on_epoch
        try:
            future = self.pool.submit(_call_pickled, pickle.dumps(task), self.events, key)
        except cf.process.BrokenProcessPool:  # a worker died earlier (its tasks failed): start afresh
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            future = self.pool.submit(_call_pickled, pickle.dumps(task), self.events, key)
        self._keys[future] = key
        return future

    def wait_any(self, handles: list) -> cf.Future:
        while True:
            done, _ = cf.wait(handles, timeout=POLL_S, return_when=cf.FIRST_COMPLETED)
            _drain(self.events, self._callbacks)
            if done:
                return next(h for h in handles if h in done)

    def result(self, handle: cf.Future) -> Any:
        _drain(self.events, self._callbacks)  # a finished task's last epochs first
        self._callbacks.pop(self._keys.get(handle, -1), None)
        return pickle.loads(handle.result())

    def close(self) -> None:
        # Terminate rather than wait: after Ctrl-C, running tasks would otherwise finish first.
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=5)
        self._manager.shutdown()


def _short_temp_dir(out: Path) -> Path:
    """Ray's temp dir under the output folder, unless that path is too long for its Unix sockets."""
    wanted = (out / "ray").resolve()
    if len(str(wanted)) <= 60:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    fallback = Path(tempfile.mkdtemp(prefix="transferlab-ray-"))
    log.warning("Ray temp dir %s is too long for Unix sockets; using %s", wanted, fallback)
    return fallback


def _run_task(task: Callable[..., Any], queue: Any, key: int) -> Any:
    return task(_QueueEvents(queue, key))


class RayExecutor:
    """Runs tasks as Ray tasks, each with its CPU/GPU request; inputs travel through the object store."""

    def __init__(self, out: Path, address: str | None, cpus_per_run: float = 1, gpus_per_run: float = 0, num_cpus: int | None = None,
                 gpu_extraction: bool = False):
        try:
            import ray
        except ImportError:
            raise ConfigError("executor", "ray", "Ray is not installed (pip install 'transferlab[ray]')") from None
        self.ray = ray
        self.threads = coordinator_threads()
        self.capacity: int | None = None  # Ray schedules tasks by their CPU/GPU requests
        if address in (None, "", "local"):
            # A private local instance: state under the output folder, loopback only, no auth token needed there.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=num_cpus, _temp_dir=str(_short_temp_dir(out)), _node_ip_address="127.0.0.1",
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError("ray_address", address, f"cannot connect ({str(e).splitlines()[0][:160]})") from None
        # Extraction too runs on the cluster: one actor per GPU, or per `cpus_per_run` CPUs.
        self.extractor: Extractor | None = RayExtractor(self.threads, cpus_per_run, 1 if gpu_extraction else 0)
        self._remote = ray.remote(_run_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        from ray.util.queue import Queue

        self.events = Queue(actor_options={"num_cpus": 0})  # Ray's own channel for the tasks' epoch events
        self._callbacks: dict[int, OnEvent] = {}
        self._keys: dict[Any, int] = {}

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def submit(self, task: Callable[..., Any], on_epoch: OnEvent | None = None) -> Any:
        key = len(self._keys)
        if on_epoch is not None:
            self._callbacks[key] = on_epoch
        handle = self._remote.remote(task, self.events, key)
        self._keys[handle] = key
        return handle

    def wait_any(self, handles: list) -> Any:
        while True:
            done, _ = self.ray.wait(handles, num_returns=1, timeout=POLL_S)
            _drain(self.events, self._callbacks)
            if done:
                return done[0]

    def result(self, handle: Any) -> Any:
        _drain(self.events, self._callbacks)
        self._callbacks.pop(self._keys.get(handle, -1), None)
        return self.ray.get(handle)

    def close(self) -> None:
        self.ray.shutdown()


def make_executor(cfg: ExecutorConfig, out: Path, device: str) -> Executor:
    """The executor `cfg` names; tasks run on `device` wherever they execute."""
    if cfg.kind == "local":
        local: Executor = InProcessExecutor() if cfg.jobs == 1 else ProcessExecutor(cfg.jobs)
        return local
    if cfg.kind == "ray":
        gpus = cfg.gpus_per_run
        if gpus is None:  # several runs share one GPU; each task sees it only if it asks for a share
            gpus = 0.25 if resolve_device(device).type == "cuda" else 0.0
        return RayExecutor(out, cfg.ray_address, cfg.cpus_per_run, gpus, gpu_extraction=resolve_device(device).type == "cuda")
    raise ConfigError("kind", cfg.kind, "expected local or ray")
