"""Where sweep runs execute when not in the coordinating process: local worker processes or Ray.

The coordinator computes each backbone's cached inputs once and ships them to the runs (Ray's
object store, or process arguments); workers return results and never touch the ledger. The task
functions are plain functions of picklable arguments.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import pickle
import tempfile
from pathlib import Path

from .utils import UserError

log = logging.getLogger(__name__)


# -- tasks (run in workers) -------------------------------------------------------------------------
def probe_group_task(feature_dim, n_classes, head_name, train, val, cfgs, device, threads):
    """A batched group of linear probes on shipped features; returns their FitResults."""
    import torch

    from .features import TensorSource
    from .heads import new_head
    from .training import fit_linear_probes

    torch.set_num_threads(threads)
    dev = torch.device(device)
    heads = [new_head(feature_dim, n_classes, cfgs[0].seed).to(dev) for _ in cfgs]
    return fit_linear_probes(heads, TensorSource(train, dev), TensorSource(val, dev), cfgs, head_name)


def finetune_task(backbone, splits, n_trainable_layers, inputs, cfg, start_state, device, threads):
    """One fine-tuning run from `start_state` on shipped prefix activations; returns its FitResult."""
    import torch

    from .study import EngineConfig, Workbench

    torch.set_num_threads(threads)
    bench = Workbench(backbone, splits, EngineConfig(device, progress=False), cache_dir=None)
    bench.adopt_inputs(n_trainable_layers, inputs)
    return bench.run(cfg, n_trainable_layers, start_state=start_state)


# -- executors (in the coordinator) -----------------------------------------------------------------
def coordinator_threads() -> int:
    """Intra-op threads every run uses, wherever it executes.

    Float reductions in matmuls and convolutions depend on the thread count, so runs shipped to
    workers use the coordinator's count: that is what makes a Ray or multi-process sweep reproduce
    the in-process sweep bit for bit (at the price of oversubscribing cores when runs overlap).
    """
    import torch

    return torch.get_num_threads()


def _call_pickled(blob: bytes) -> bytes:
    fn, args = pickle.loads(blob)
    return pickle.dumps(fn(*args))


class ProcessExecutor:
    """`jobs` local worker processes (spawned, so no forked torch thread pools).

    Tasks and results travel as plain pickled bytes: multiprocessing's own pickler would hand torch
    tensors over as *shared memory*, and concurrent fine-tuning runs would then train one shared copy
    of the weights.
    """

    def __init__(self, jobs: int):
        if jobs < 1:
            raise UserError(f"--jobs {jobs}: must be at least 1")
        self.threads = coordinator_threads()
        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def put(self, obj):
        return obj

    def submit(self, fn, *args):
        return self.pool.submit(_call_pickled, pickle.dumps((fn, args)))

    def wait_any(self, pending: list) -> tuple[list, list]:
        done, rest = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        return list(done), list(rest)

    def result(self, handle):
        return pickle.loads(handle.result())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _short_temp_dir(out: Path) -> Path:
    """Ray's temp dir under the output folder, unless that path is too long for its Unix sockets."""
    wanted = (out / "ray").resolve()
    if len(str(wanted)) <= 60:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    fallback = Path(tempfile.mkdtemp(prefix="transferlab-ray-"))
    log.warning("Ray temp dir %s is too long for Unix sockets; using %s", wanted, fallback)
    return fallback


class RayExecutor:
    """Runs as Ray tasks, each with its CPU/GPU request; inputs travel through the object store."""

    def __init__(self, out: Path, address: str | None, cpus_per_run: float = 1, gpus_per_run: float = 0, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray: Ray is not installed (pip install 'transferlab[ray]')") from None
        self.ray = ray
        self.cpus, self.gpus = cpus_per_run, gpus_per_run
        self.threads = coordinator_threads()
        if address in (None, "", "local"):
            # A private local instance: state under the output folder, loopback only, no auth token needed there.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=num_cpus, _temp_dir=str(_short_temp_dir(out)), _node_ip_address="127.0.0.1",
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"--ray-address {address}: cannot connect ({str(e).splitlines()[0][:160]})") from None
        self._remote: dict = {}

    def put(self, obj):
        return self.ray.put(obj)

    def submit(self, fn, *args):
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)
        return self._remote[fn].remote(*args)

    def wait_any(self, pending: list) -> tuple[list, list]:
        return self.ray.wait(pending, num_returns=1)

    def result(self, handle):
        return self.ray.get(handle)

    def close(self) -> None:
        self.ray.shutdown()


def make_executor(kind: str, out: Path, jobs: int = 1, ray_address: str | None = None, cpus_per_run: float = 1,
                  gpus_per_run: float = 0):
    """None for the in-process sequential path; otherwise a ProcessExecutor or RayExecutor."""
    if kind == "local":
        return None if jobs == 1 else ProcessExecutor(jobs)
    if kind == "ray":
        return RayExecutor(out, ray_address, cpus_per_run, gpus_per_run)
    raise UserError(f"--executor {kind}: expected local or ray")
