"""Caches larger than memory: shards, memory-mapped streaming, resumed extraction; and extraction on Ray
(a local instance and a 2-node loopback cluster), equal to a local extraction file for file."""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from loopback_cluster import loopback_cluster

from conftest import require, write_image_folder
from transferlab.core.errors import UserError
from transferlab.data import DataConfig
from transferlab.features import shards
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.features.shards import ShardedRows
from transferlab.features.sources import TensorSource
from transferlab.train.config import TrainConfig
from transferlab.train.session import RunSession

SHARD_MB = 1e-4  # one 64-image batch per shard: 150 training images make 3 shards


@pytest.fixture
def folder_150(tmp_path) -> Path:
    counts = {"train": {c: 50 for c in "abc"}, "val": {c: 10 for c in "abc"}, "test": {c: 4 for c in "abc"}}
    return write_image_folder(tmp_path / "data", counts, size=32)


def inputs_of(backbone, data: Path, cache_dir: Path, extractor=None, **engine) -> CutInputs:
    splits = DataConfig(str(data)).load()
    cfg = EngineConfig(device="cpu", progress=False, runtime="torch", cache_shard_mb=SHARD_MB, **engine)
    return CutInputs(copy.deepcopy(backbone), splits, cfg, cache_dir, extractor=extractor)


def entry_files(cache_dir: Path) -> dict[str, str]:
    """{entry/file: sha256} of every shard and manifest in a cache folder."""
    return {str(p.relative_to(cache_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache_dir.glob("*-*/*")) if p.suffix in (".safetensors", ".json")}


def test_streamed_cache_trains_the_same_probe_as_the_cache_in_memory(folder_150, resnet10_random, tmp_path):
    cache = tmp_path / "cache"
    held = inputs_of(resnet10_random, folder_150, cache)
    train_held = held.setup(1).sources["train"]
    assert isinstance(train_held, TensorSource) and isinstance(train_held.inputs, torch.Tensor)
    manifest = shards.read_manifest(next(cache.glob("train-*")))
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 64), (64, 128), (128, 150)]

    streamed = inputs_of(resnet10_random, folder_150, cache, cache_ram_gb=0.0)
    train = streamed.setup(1).sources["train"]
    assert isinstance(train, TensorSource) and isinstance(train.inputs, ShardedRows)
    order = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train.inputs.rows(order), train_held.inputs[order])  # any order, across shards
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_size=32, patience=10)
    a, b = RunSession(held).run(cfg, 1), RunSession(streamed).run(cfg, 1)
    assert a.history == b.history and all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)


def test_a_probe_streaming_its_cache_writes_the_run_the_cache_in_memory_writes(folder_150, tmp_path):
    import json

    from transferlab.cli.main import main

    common = ["probe", "--data", str(folder_150), "--backbone", "efficientnet_lite0", "--epochs", "5", "--batch-size", "8",
              "--device", "cpu", "--workers", "0", "--no-progress", "--runtime", "torch"]
    runs = {}
    for name, extra in (("held", []), ("streamed", ["--cache-ram-gb", "0", "--cache-shard-mb", "0.0001"])):
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0  # each its own cache (OUT/cache)
        runs[name] = json.loads((tmp_path / name / "run.json").read_text())
    assert len(list((tmp_path / "streamed" / "cache").glob("train-*/*.safetensors"))) == 3  # 150 images, 3 shards
    assert runs["streamed"]["history"] == runs["held"]["history"] and runs["streamed"]["test_acc"] == runs["held"]["test_acc"]


def test_an_interrupted_extraction_keeps_its_finished_shards(folder_150, resnet10_random, tmp_path):
    cache = tmp_path / "cache"
    inputs_of(resnet10_random, folder_150, cache).setup(1)
    entry = next(cache.glob("train-*"))
    before = entry_files(cache)
    kept = {name: (entry / name).stat().st_mtime_ns for name in ("00000.safetensors", "00002.safetensors")}
    (entry / "manifest.json").unlink()  # interrupted before the manifest...
    (entry / "00001.safetensors").unlink()  # ...and the second shard
    inputs_of(resnet10_random, folder_150, cache).setup(1)
    assert {name: (entry / name).stat().st_mtime_ns for name in kept} == kept  # not computed again
    assert entry_files(cache) == before  # the missing shard and the manifest: the same bytes as before


def test_a_probe_streams_a_cache_larger_than_its_memory_limit(tmp_path):
    """RLIMIT_DATA bounds the process's private memory; memory-mapped shard files do not count against it,
    a cache loaded whole does. 315 MB of features against a limit of 160 MB above the process's size."""
    rows, dim, per_shard = 9600, 8192, 960
    entry = tmp_path / "train-entry"
    entry.mkdir()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (rows,), generator=gen)
    entries = [shards.write_shard(entry, i, torch.randn(per_shard, dim, generator=gen), labels[s : s + per_shard], s, [])
               for i, s in enumerate(range(0, rows, per_shard))]
    shards.write_manifest(entry, entries, (dim,))
    script = textwrap.dedent(f"""
        import resource, torch
        from pathlib import Path
        from torch import nn
        from transferlab.core.devices import Placement
        from transferlab.features import shards
        from transferlab.features.sources import SplitInputs, TensorSource
        from transferlab.train.config import TrainConfig
        from transferlab.train.probes import fit_linear_probes

        torch.set_num_threads(1)
        entry = Path({str(entry)!r})
        manifest = shards.read_manifest(entry)
        rows = shards.ShardedRows.open(entry, manifest)
        labels = shards.read_labels(entry, manifest)
        placement = Placement.of("cpu")
        train = TensorSource(SplitInputs(rows, labels, []), placement)
        val = TensorSource(SplitInputs(rows.select(list(range(500))), labels[:500], []), placement)
        data_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1])
        limit = data_kb * 1024 + 160 * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        heads = [nn.Linear({dim}, 10) for _ in range(2)]
        cfgs = [TrainConfig(epochs=1, lr=lr, batch_size=256, patience=5) for lr in (1e-3, 1e-2)]
        results = fit_linear_probes(heads, train, val, cfgs)
        print("trained", len(results[0].history))
        try:
            rows.load()
            print("loaded whole")
        except MemoryError:
            print("whole: MemoryError")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["trained", "2", "whole:", "MemoryError"]


# ---- Ray ----

def _short_dir(prefix: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # Ray's sockets need a short path


@pytest.mark.slow
def test_ray_extraction_equals_local_and_each_reuses_the_other(folder_150, resnet10_random, tmp_path, monkeypatch):
    ray = require("ray")
    from transferlab.features import cache as cache_module
    from transferlab.features.cluster import RayExtractor

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    local = tmp_path / "local"
    held = inputs_of(resnet10_random, folder_150, local)
    local_train = held.setup(1).sources["train"].inputs
    ray_dir = _short_dir("tl-ray-")
    ray.init(num_cpus=2, _temp_dir=str(ray_dir), _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        on_ray = tmp_path / "ray"
        extractor = RayExtractor(threads=torch.get_num_threads())
        spread = inputs_of(resnet10_random, folder_150, on_ray, extractor=extractor)
        assert torch.equal(spread.setup(1).sources["train"].inputs, local_train)
        assert entry_files(on_ray) == entry_files(local)  # bit-identical shards, same keys, same manifests
        assert extractor.nodes_used  # the shards came from actors
        # The cluster reuses a local cache: an entry whole (no extraction asked for)...
        refuse = lambda job: pytest.fail(f"extracted {job.folder.name}")  # noqa: E731
        assert torch.equal(inputs_of(resnet10_random, folder_150, local, extractor=refuse).setup(1).sources["train"].inputs, local_train)
        # ...and the shards of one interrupted before its manifest (no actor started).
        before = entry_files(local)
        for manifest in local.glob("*/manifest.json"):
            manifest.unlink()
        resuming = RayExtractor(threads=1)
        inputs_of(resnet10_random, folder_150, local, extractor=resuming).setup(1)
        assert resuming.nodes_used == set() and entry_files(local) == before
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    # ...and a local run reuses the cluster's: extracting anything would fail.
    monkeypatch.setattr(cache_module, "extract_job", lambda job: pytest.fail(f"extracted {job.folder.name}"))
    again = inputs_of(resnet10_random, folder_150, on_ray)
    assert torch.equal(again.setup(1).sources["train"].inputs, local_train)


@pytest.mark.slow
def test_two_node_loopback_cluster_extracts_like_local_and_names_an_unwritable_cache(folder_150, resnet10_random, tmp_path,
                                                                                     monkeypatch):
    """A head without CPUs and a worker node with its own temp dir, started without the right to bypass file
    permissions (as a node whose user cannot write the cache folder): every shard is made on the worker."""
    ray = require("ray")
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to start a worker node without CAP_DAC_OVERRIDE")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with loopback_cluster(2, worker_prefix=("setpriv", "--bounding-set", "-dac_override,-dac_read_search")) as address:
        try:
            _extract_on_the_loopback_cluster(ray, address, folder_150, resnet10_random, tmp_path)
        finally:
            ray.shutdown()


def _extract_on_the_loopback_cluster(ray, address: str, folder_150: Path, resnet10_random, tmp_path: Path) -> None:
    from transferlab.features.cluster import RayExtractor

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    local = tmp_path / "local"
    expected = inputs_of(resnet10_random, folder_150, local).setup(1).sources["train"].inputs
    on_cluster = tmp_path / "cluster"
    extractor = RayExtractor(threads=torch.get_num_threads())
    spread = inputs_of(resnet10_random, folder_150, on_cluster, extractor=extractor)
    assert torch.equal(spread.setup(1).sources["train"].inputs, expected)
    assert entry_files(on_cluster) == entry_files(local)
    worker = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    assert extractor.nodes_used == {f"{os.uname().nodename} ({worker[:8]})"}  # every shard made on the worker node

    # Folders this process makes are now read-only to their owner: root here still writes, the worker cannot.
    unwritable = tmp_path / "unwritable"
    old = os.umask(0o222)
    try:
        with pytest.raises(UserError) as raised:
            inputs_of(resnet10_random, folder_150, unwritable, extractor=RayExtractor(threads=1)).setup(1)
    finally:
        os.umask(old)
    message = str(raised.value)
    assert "cannot write the cache folder" in message and str(unwritable) in message and len(message.splitlines()) == 1
    assert not list(unwritable.glob("*/manifest.json"))


def test_a_corrupt_shard_is_recomputed(folder_150, resnet10_random, tmp_path):
    cache = tmp_path / "cache"
    first = inputs_of(resnet10_random, folder_150, cache).setup(1).sources["train"].inputs
    shard = next(cache.glob("train-*")) / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = inputs_of(resnet10_random, folder_150, cache).setup(1).sources["train"].inputs
    assert torch.equal(again, first)
    assert shard.read_bytes() != bytes(data)  # rewritten


def test_streamed_views_and_skipped_images_give_the_rows_held_in_memory(folder_150, resnet10_random, tmp_path):
    from transferlab.features.shards import StackedRows
    from transferlab.features.sources import ViewSource

    bad = folder_150 / "train" / "b" / "img_007.png"
    bad.write_bytes(b"not an image")
    cache = tmp_path / "cache"
    engine = {"on_bad_image": "skip"}

    def made(**extra) -> CutInputs:
        splits = DataConfig(str(folder_150), on_bad_image="skip").load()
        cfg = EngineConfig(device="cpu", progress=False, runtime="torch", cache_shard_mb=SHARD_MB, **extra)
        return CutInputs(copy.deepcopy(resnet10_random), splits, cfg, cache, **engine)

    held, streamed = made(), made(cache_ram_gb=0.0)
    a, b = held.setup(1).sources["train"], streamed.setup(1).sources["train"]
    assert isinstance(b.inputs, ShardedRows) and len(a) == len(b) == 149  # the undecodable file is skipped
    assert torch.equal(b.inputs.rows(torch.arange(149)), a.inputs) and torch.equal(b.labels, a.labels)
    assert held.skipped_files["train"] == streamed.skipped_files["train"] == [str(bad)]
    va, vb = held.views(1, 3, 0, 0.5), streamed.views(1, 3, 0, 0.5)
    assert isinstance(vb.inputs, StackedRows) and isinstance(va.inputs, torch.Tensor)
    order = torch.randperm(149, generator=torch.Generator().manual_seed(1))
    sa, sb = ViewSource(va.inputs, va.labels, held.placement, 5), ViewSource(vb.inputs, vb.labels, streamed.placement, 5)
    for (xa, ya), (xb, yb) in zip(sa.batches(order, 32), sb.batches(order, 32), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_damaged_shard_left_by_an_interrupted_extraction_is_computed_again(folder_150, resnet10_random, tmp_path):
    cache = tmp_path / "cache"
    inputs_of(resnet10_random, folder_150, cache).setup(1)
    entry = next(cache.glob("train-*"))
    before = entry_files(cache)
    (entry / "manifest.json").unlink()
    shard = entry / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # a flipped bit inside the features
    shard.write_bytes(bytes(data))
    inputs_of(resnet10_random, folder_150, cache).setup(1)
    assert entry_files(cache) == before


def test_streamed_rows_refuse_bad_positions_and_name_a_shard_this_node_cannot_see(folder_150, resnet10_random, tmp_path):
    cache = tmp_path / "cache"
    rows = inputs_of(resnet10_random, folder_150, cache, cache_ram_gb=0.0).setup(1).sources["train"].inputs
    assert isinstance(rows, ShardedRows) and rows[149].shape == rows.shape[1:] and torch.equal(rows[-1], rows[149])
    with pytest.raises(TypeError, match="integer positions"):
        rows.rows(torch.ones(150, dtype=torch.bool))
    with pytest.raises(IndexError, match=r"outside 0\.\.149"):
        rows.rows([150])
    with pytest.raises(IndexError):
        rows.rows([-1])
    elsewhere = pickle.loads(pickle.dumps(rows))  # what a run on another node gets: the paths
    cache.rename(tmp_path / "moved")
    with pytest.raises(UserError, match="is not visible here: --cache-dir must be on storage every node") as raised:
        elsewhere.rows([0])
    assert len(str(raised.value).splitlines()) == 1


def test_a_larger_shard_size_leaves_no_stale_shards(folder_150, resnet10_random, tmp_path):
    cache = tmp_path / "cache"
    inputs_of(resnet10_random, folder_150, cache).setup(1)
    entry = next(cache.glob("train-*"))
    (entry / "manifest.json").unlink()
    splits = DataConfig(str(folder_150)).load()
    engine = EngineConfig(device="cpu", progress=False, runtime="torch", cache_shard_mb=64.0)
    one = CutInputs(copy.deepcopy(resnet10_random), splits, engine, cache).setup(1).sources["train"].inputs
    assert sorted(p.name for p in entry.glob("*.safetensors")) == ["00000.safetensors"]
    assert one.shape == (150, 512)


_KEPT = """
import resource, sys, torch
from transferlab.core.devices import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
if sys.argv[1] == "predict":  # a prediction keeps freed memory for the rest of the process
    import os, tempfile
    from PIL import Image
    from transferlab.data import Preprocessing
    from transferlab.deploy.predict import Classifier
    photo = os.path.join(tempfile.mkdtemp(), "a.png")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(photo)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    Classifier(model, ["a", "b"], Preprocessing(input_size=32), device="cpu").predict_proba([photo])
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
before = resident_mb()
torch.empty(16 << 20, dtype=torch.float32).numpy().fill(1.0)  # 64 MB written, then freed at once
print(resident_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_is_kept_for_reuse():
    """By default glibc gives a freed 64 MB tensor back to the OS at once (the next one is page-faulted in
    afresh, zeroed); with keep_freed_memory (which a prediction applies) the freed pages stay resident."""
    def kept_mb(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", _KEPT, mode], capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    assert kept_mb("default") < 8
    assert kept_mb("keep") > 56 and kept_mb("predict") > 56
