"""Extraction on a Ray cluster: Ray Data streams a cache entry's shards through a pool of actors, each holding
the frozen prefix and its runner, each writing its shards straight into the cache folder.

The cache folder must be on storage every node sees (NFS, a mounted bucket; one machine's disk for a
local instance): every actor first checks that it sees the coordinator's marker there and can write,
and the coordinator reads every shard back before it writes the manifest. A shard is computed exactly
as a local extraction computes it (the same batches, decoder, runtime and thread count), so the files
are the same bytes on CPU and the cache key is the same: a cluster-made entry is reused locally and the
other way round. Ray Data is used here only.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass

import torch

from transferlab.core.devices import Placement
from transferlab.core.errors import UserError
from transferlab.features import shards
from transferlab.features.extraction import ExtractionJob, extract, write_entry_manifest
from transferlab.features.runtimes import prepare_prefix_runner

log = logging.getLogger(__name__)

MARKER = ".transferlab-shared-check-"  # + the coordinator's token: concurrent coordinators each have their own


@dataclass(frozen=True)
class ActorSpec:
    """What every extraction actor is built from (shipped once per entry)."""

    job: ExtractionJob  # its runner is replaced by one each actor prepares
    runtime: dict  # what the coordinator's runner is (describe()): every actor must run the same
    device: str
    dtype: torch.dtype
    threads: int
    token: str  # written by the coordinator into the marker: seen by a worker only on shared storage


class ShardExtractor:
    """A Ray Data actor: extracts whole shards, writes each into the cache folder, returns its entry."""

    def __init__(self, spec: ActorSpec):
        import ray

        self.spec, job = spec, spec.job
        self.node = f"{socket.gethostname()} ({ray.get_runtime_context().get_node_id()[:8]})"
        folder = job.folder
        try:
            seen = (folder / (MARKER + spec.token)).read_text().strip()
        except OSError:
            seen = ""
        if seen != spec.token:
            raise UserError(f"the cache folder {folder} is not visible from worker node {self.node}: "
                            "--cache-dir must be on storage every node of the cluster sees")
        try:
            probe = folder / f".write-check-{self.node}-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"worker node {self.node} cannot write the cache folder {folder} ({e.strerror}): "
                            "--cache-dir must be on storage every node can write") from None
        torch.set_num_threads(spec.threads)  # float reductions follow the thread count: the coordinator's
        self.placement = Placement(torch.device(spec.device), spec.dtype)
        prefix = job.prefix.to(self.placement.device)
        shape = (1, 3, job.pre.input_size, job.pre.input_size)
        self.runner = prepare_prefix_runner(prefix, shape, spec.runtime["name"], self.placement, job.export_dir, job.export_key,
                                            threads=spec.threads)
        self.prefix = prefix
        self._check_runtime()

    def _check_runtime(self) -> None:
        got, want = self.runner.describe(), self.spec.runtime
        if [got.get(k) for k in ("name", "version", "precision")] != [want.get(k) for k in ("name", "version", "precision")]:
            raise UserError(f"worker node {self.node} ran the frozen layers with {got.get('name')} {got.get('version')} "
                            f"({got.get('notice') or got.get('precision')}), not with the coordinator's {want.get('name')} "
                            f"{want.get('version')}: install the same runtime on every node, or pass --runtime torch")

    def __call__(self, batch: dict) -> dict:
        job = self.spec.job
        out: dict[str, list] = {"index": [], "sha256": [], "node": []}
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"]):
            index, start, stop = int(index), int(start), int(stop)
            part = job.split.subset(list(range(start, stop)))
            missing = next((f for f in part.files if not os.path.exists(f)), None)
            if missing is not None:  # it exists where the splits were made: the data is not on shared storage
                raise UserError(f"worker node {self.node} cannot see the image {missing}: the data folder must be on "
                                "storage every node of the cluster sees")
            inputs, bad = extract(self.prefix, part, job.pre, self.placement, job.batch_size, None, False, self.runner, job.augment)
            self._check_runtime()  # a runtime that failed midway fell back: those numbers are not the key's
            labels = torch.tensor(part.labels, dtype=torch.int64)
            try:
                entry = shards.write_shard(job.folder, index, inputs, labels, start, [start + j for j in bad])
            except OSError as e:
                raise UserError(f"worker node {self.node} cannot write the cache folder {job.folder} ({e.strerror}): "
                                "--cache-dir must be on storage every node can write") from None
            out["index"].append(index)
            out["sha256"].append(entry["sha256"])
            out["node"].append(self.node)
        return out


class RayExtractor:
    """Computes cache entries on the Ray cluster this process is connected to (``ray.init`` done by the caller).

    One actor per `cpus_per_actor` CPUs of the cluster (or per GPU with `gpus_per_actor` = 1), at most one
    per missing shard; each uses `threads` intra-op threads, the coordinator's count.
    """

    def __init__(self, threads: int, cpus_per_actor: float = 1, gpus_per_actor: float = 0, max_actors: int | None = None):
        self.threads, self.cpus_per_actor, self.gpus_per_actor = threads, cpus_per_actor, gpus_per_actor
        self.max_actors = max_actors
        self.nodes_used: set[str] = set()  # the workers' host names, of every entry computed so far

    def _pool_size(self, n_shards: int) -> int:
        import ray

        def fitting(resources: dict) -> int:
            fit = int(resources.get("CPU", 0) // max(self.cpus_per_actor, 1e-9))
            return min(fit, int(resources.get("GPU", 0) // self.gpus_per_actor)) if self.gpus_per_actor else fit

        resources = ray.cluster_resources()
        if fitting(resources) < 1:
            raise UserError(f"the Ray cluster has no room for an extraction actor ({self.cpus_per_actor} CPU, "
                            f"{self.gpus_per_actor} GPU each; it has {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU)")
        free = max(1, fitting(ray.available_resources()))  # what running work leaves (at least one: Ray waits for it)
        return max(1, min(n_shards, free, self.max_actors or free))

    def __call__(self, job: ExtractionJob) -> bool:

        folder = job.folder
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        marker = folder / (MARKER + token)
        marker.write_text(token + "\n")
        try:
            entries = self._extract_missing(job, token)
        finally:
            marker.unlink(missing_ok=True)
        write_entry_manifest(job, [entries[i] for i in range(len(job.bounds))])
        return True

    def _extract_missing(self, job: ExtractionJob, token: str) -> dict[int, dict]:
        """{shard index: its manifest entry}: the shards already whole in the folder, and the others made by actors."""
        import ray.data

        folder = job.folder
        entries: dict[int, dict] = {}
        for i, bounds in enumerate(job.bounds):  # shards of an interrupted extraction are kept
            entry = shards.intact_shard(folder, i, bounds)
            if entry is not None:
                entries[i] = entry
        todo = [{"index": i, "start": s, "stop": e} for i, (s, e) in enumerate(job.bounds) if i not in entries]
        if todo:
            spec = ActorSpec(job=_shippable(job), runtime=job.runner.describe(), device=job.placement.device.type,
                             dtype=job.placement.dtype, threads=self.threads, token=token)
            ray.data.DataContext.get_current().enable_progress_bars = job.progress
            shard_specs = ray.data.from_items(todo, override_num_blocks=len(todo))
            ds = shard_specs.map_batches(ShardExtractor, fn_constructor_args=(spec,), batch_size=1,
                                         concurrency=self._pool_size(len(todo)), num_cpus=self.cpus_per_actor,
                                         num_gpus=self.gpus_per_actor or None)
            log.info("extracting %s: %d shard(s) on the Ray cluster", folder.name, len(todo))
            try:
                done = ds.take_all()
            except Exception as e:
                found = _user_error(e)
                if found is None:
                    raise
                raise found from None
            for row in done:
                index = int(row["index"])
                entry = shards.intact_shard(folder, index, job.bounds[index])
                if entry is None or entry["sha256"] != row["sha256"]:
                    raise UserError(f"shard {index} written by worker node {row['node']} into {folder} is not the same file "
                                    "here: --cache-dir must be on storage every node of the cluster sees")
                entries[index] = entry
                self.nodes_used.add(str(row["node"]))
        return entries


def _shippable(job: ExtractionJob) -> ExtractionJob:
    """`job` without its runner (which holds a runtime session; each actor prepares its own), prefix on CPU."""
    import copy
    import dataclasses

    prefix = copy.deepcopy(job.prefix).cpu()
    return dataclasses.replace(job, prefix=prefix, runner=None, progress=False)  # type: ignore[arg-type]


def _user_error(e: BaseException) -> UserError | None:
    """The UserError an actor raised, found in the exceptions Ray wrapped it in."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, UserError):
            return UserError(str(err).splitlines()[0])
        stack += [err.__cause__, err.__context__, getattr(err, "cause", None)]
    text = str(e)
    for line in text.splitlines():
        if "UserError: " in line:
            return UserError(line.split("UserError: ", 1)[1].strip())
    return None
