import copy
import os

import pytest
import torch

from transferlab.core.devices import Placement
from transferlab.data import load_splits
from transferlab.features.cache import Chain, FeatureCache, cached_split_inputs
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.models.freezing import plan_cut
from transferlab.train.config import TrainConfig
from transferlab.train.session import RunSession

METRICS = ("train_loss", "train_xent", "train_err", "val_xent", "val_err")


def run_history(backbone, splits, k, use_cache, cache_dir=None, epochs=4, train_bn=False):
    # Eager PyTorch on both paths: this checks the cache itself (other runtimes: test_runtimes.py).
    engine = EngineConfig(device="cpu", use_cache=use_cache, progress=False, num_workers=0, runtime="torch")
    session = RunSession(CutInputs(copy.deepcopy(backbone), splits, engine, cache_dir))
    result = session.run(TrainConfig(lr=1e-2, l2=1.0, seed=3, epochs=epochs, patience=10, batch_size=8, train_bn=train_bn), k)
    return session.inputs, result


def assert_same_history(a, b, tol=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in METRICS:
            if ra[key] is None:
                assert rb[key] is None
            else:
                assert abs(ra[key] - rb[key]) <= tol, (ra["epoch"], key, ra[key], rb[key])


@pytest.mark.parametrize("k, cut, train_bn", [(1, "output", False), (3, "features.stage4.unit1", False), (3, "features.stage4.unit1", True)])
def test_cached_run_equals_running_the_frozen_backbone_every_epoch(tiny_folder, resnet10_random, k, cut, train_bn):
    splits = load_splits(tiny_folder)
    cached_inputs, cached = run_history(resnet10_random, splits, k, use_cache=True, train_bn=train_bn)
    _, full = run_history(resnet10_random, splits, k, use_cache=False, train_bn=train_bn)
    assert cached_inputs.setup(k).cached and cached_inputs.setup(k).cut.name == cut
    assert_same_history(cached.history, full.history)
    assert cached.best_epoch == full.best_epoch


def test_cache_is_reused_and_invalidated(tiny_folder, resnet10_random, tmp_path):
    splits = load_splits(tiny_folder)
    bb = copy.deepcopy(resnet10_random)
    prefix = Chain(bb.chain()[: plan_cut(bb, 1).index])
    cache = FeatureCache(tmp_path / "cache")
    cpu = Placement(torch.device("cpu"))

    def get(split, backbone=bb):
        return cached_split_inputs(backbone, prefix, "output", split, cache, cpu, num_workers=0, progress=False)

    first, _, hit = get(splits.val)
    assert not hit and first.inputs.shape == (9, 512)
    again, _, hit = get(splits.val)
    assert hit and torch.equal(again.inputs, first.inputs)

    # The key follows the files' contents: a new mtime alone keeps the entry, new contents invalidate it.
    path = splits.val.files[0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, _, hit = get(splits.val)
    assert hit
    original = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(open(splits.val.files[1], "rb").read())
    _, _, hit = get(splits.val)
    assert not hit
    with open(path, "wb") as f:
        f.write(original)

    # Different weights: a different key.
    other = copy.deepcopy(bb)
    with torch.no_grad():
        other.model.features.init_block.conv.conv.weight.add_(1.0)
    from transferlab.models import weights_digest

    other.weights_digest = weights_digest(other.model, "output")
    assert cache.key(other, "output", splits.val, other.spec.preprocessing, cpu) != cache.key(bb, "output", splits.val, bb.spec.preprocessing, cpu)

    # A corrupted file is detected, never used, and rebuilt.
    key = cache.key(bb, "output", splits.val, bb.spec.preprocessing, cpu)
    file = cache.path(splits.val, key) / "00000.safetensors"
    data = bytearray(file.read_bytes())
    data[-20] ^= 0xFF  # flip a bit inside the tensor data
    file.write_bytes(bytes(data))
    rebuilt, _, hit = get(splits.val)
    assert not hit
    assert torch.allclose(rebuilt.inputs, first.inputs, atol=1e-6)
    truncated = file.read_bytes()[:100]
    file.write_bytes(truncated)
    _, _, hit = get(splits.val)
    assert not hit


def test_memory_guard_falls_back_to_the_full_model_with_a_notice(tiny_folder, resnet10_random, caplog):
    engine = EngineConfig(device="cpu", use_cache=True, cache_max_gb=1e-6, progress=False, num_workers=0)
    session = RunSession(CutInputs(copy.deepcopy(resnet10_random), load_splits(tiny_folder), engine, None))
    with caplog.at_level("WARNING"):
        setup = session.inputs.setup(3)
    assert not setup.cached
    assert "--cache-max-gb 1e-06" in setup.notice and "features.stage4.unit1" in setup.notice
    assert setup.notice in caplog.text
    result = session.run(TrainConfig(lr=1e-4, epochs=1, batch_size=8), 3)
    assert result.status == "done" and len(result.history) == 2
