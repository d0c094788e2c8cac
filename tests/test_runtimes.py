"""The frozen prefix run by an inference runtime gives eager PyTorch's numbers, keyed apart, never lost."""

import copy
import json

import numpy as np
import pytest
import torch

from conftest import require
from transferlab.core.devices import Placement
from transferlab.core.errors import ConfigError
from transferlab.data import build_transform, load_splits
from transferlab.features import runtimes
from transferlab.features.cache import Chain, FeatureCache, cached_split_inputs
from transferlab.features.runtimes import onnx_export_key, planned_runner, prepare_prefix_runner, resolve_runtime
from transferlab.models import load_backbone
from transferlab.models.freezing import plan_cut

CPU = Placement(torch.device("cpu"))
DEFAULT = "openvino"  # what `auto` picks with the default install (pyproject.toml)
FAMILIES = [("efficientnet_lite0", True), ("efficientnet_lite1", True), ("efficientnet_lite2", True),
            ("resnet10", False), ("mobilenet_w1", False)]


def need(runtime: str) -> None:
    """The default runtime must be installed (fails under CI); another may be skipped when it is not."""
    if runtime == DEFAULT:
        require(runtime)
        require("onnx")
    elif runtime in ("onnxruntime", "openvino"):
        pytest.importorskip(runtime)
        pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def photos():
    skdata = require("skimage.data")
    return [skdata.chelsea(), skdata.coffee()]


def photo_batch(photos, pre) -> torch.Tensor:
    from PIL import Image

    tf = build_transform(pre)
    return torch.stack([tf(Image.fromarray(np.asarray(img))) for img in photos])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")  # one ONNX file per backbone, shared by both runtimes


@pytest.mark.parametrize("name, pretrained", FAMILIES)
def test_every_family_gives_eager_features_within_1e_4_on_real_photos(name, pretrained, photos, export_dir):
    bb = load_backbone(name, pretrained=pretrained)
    chain = bb.chain()
    prefix = Chain(chain[:-1])  # everything but the classifier: the probe's features
    x = photo_batch(photos, bb.spec.preprocessing)
    with torch.no_grad():
        reference = prefix.eval()(x)
    key = onnx_export_key(name, bb.weights_digest, chain[-1][0], tuple(x.shape))
    for runtime in ("torch", "onnxruntime", "openvino"):
        if runtime != "torch":
            need(runtime)
        runner = prepare_prefix_runner(prefix, tuple(x.shape), runtime, CPU, export_dir, key)
        assert (runner.name, runner.notice, runner.precision) == (runtime, "", "fp32 channels_last" if runtime == "torch" else "fp32")
        out = runner(x)
        assert out.dtype == torch.float32 and out.shape == reference.shape
        assert (out - reference).abs().max().item() <= 1e-4, (name, runtime)


def test_an_intermediate_cut_is_exported_too(photos, tmp_path):
    need(DEFAULT)
    bb = load_backbone("efficientnet_lite0")
    chain = bb.chain()
    cut = [n for n, _ in chain].index("blocks.6.0")
    prefix = Chain(chain[:cut])  # the input of the last inverted-residual block, a (N, 192, 7, 7) map
    x = photo_batch(photos, bb.spec.preprocessing)
    runner = prepare_prefix_runner(prefix, tuple(x.shape), DEFAULT, CPU, tmp_path, "lite0-b6")
    with torch.no_grad():
        reference = prefix.eval()(x)
    assert runner.name == DEFAULT and runner(x).shape == reference.shape == (2, 192, 7, 7)
    assert (runner(x) - reference).abs().max().item() <= 1e-4
    assert list((tmp_path / "onnx").glob("*.onnx")) == [tmp_path / "onnx" / "prefix-lite0-b6-opset17.onnx"]
    assert not list((tmp_path / "onnx").glob(".*"))  # no temp file left behind


def test_auto_picks_the_fastest_installed_runtime_on_cpu_and_pytorch_on_cuda(monkeypatch):
    need(DEFAULT)
    assert resolve_runtime("auto", CPU) == DEFAULT
    assert resolve_runtime("auto", Placement(torch.device("cuda"))) == "torch"
    assert resolve_runtime("auto", Placement(torch.device("cpu"), torch.float64)) == "torch"
    monkeypatch.setattr(runtimes, "is_installed", lambda r: r in ("torch", "compile", "onnxruntime"))
    assert resolve_runtime("auto", CPU) == "onnxruntime"
    monkeypatch.setattr(runtimes, "is_installed", lambda r: r in ("torch", "compile"))
    assert resolve_runtime("auto", CPU) == "torch"
    with pytest.raises(ConfigError, match="runtime=openvino: not installed"):
        resolve_runtime("openvino", CPU)
    with pytest.raises(ConfigError, match="runtime=tensorrt"):
        resolve_runtime("tensorrt", CPU)


def _probe_prefix(backbone):
    return Chain(backbone.chain()[: plan_cut(backbone, 1).index])


def test_cache_keys_separate_runtimes_and_features_are_never_mixed(tiny_folder, resnet10_random, tmp_path):
    need(DEFAULT)
    splits = load_splits(tiny_folder)
    bb = copy.deepcopy(resnet10_random)
    prefix = _probe_prefix(bb)
    cache = FeatureCache(tmp_path / "cache")
    pre = bb.spec.preprocessing
    keys = {r: cache.key(bb, "output", splits.val, pre, CPU, planned_runner(r, CPU)) for r in ("torch", "compile", DEFAULT)}
    assert len(set(keys.values())) == 3
    assert cache.key(bb, "output", splits.val, pre, CPU) == keys["torch"]  # no runner: eager PyTorch

    def get(runtime):
        return cached_split_inputs(bb, prefix, "output", splits.val, cache, CPU, num_workers=0, progress=False, runtime=runtime)

    eager, _, hit = get("torch")
    assert not hit and eager.runtime["name"] == "torch"
    fast, _, hit = get(DEFAULT)
    assert not hit, "features of another runtime were reused"
    assert fast.runtime["name"] == DEFAULT and fast.runtime["precision"] == "fp32"
    assert (fast.inputs - eager.inputs).abs().max().item() <= 1e-4
    again, _, hit = get("auto")
    assert hit and torch.equal(again.inputs, fast.inputs)
    assert cache.path(splits.val, keys[DEFAULT]).exists() and cache.path(splits.val, keys["torch"]).exists()
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1  # exported once, in the cache folder


def test_a_failed_export_falls_back_to_eager_with_a_one_line_notice(tiny_folder, resnet10_random, tmp_path, monkeypatch, caplog):
    need(DEFAULT)
    bb = copy.deepcopy(resnet10_random)
    prefix = _probe_prefix(bb)

    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported: aten::frobnicate\nlong traceback line")

    monkeypatch.setattr(runtimes, "export_onnx", broken_export)
    splits = load_splits(tiny_folder)
    cache = FeatureCache(tmp_path / "cache")
    with caplog.at_level("WARNING"):
        item, _, hit = cached_split_inputs(bb, prefix, "output", splits.val, cache, CPU, num_workers=0, progress=False, runtime=DEFAULT)
    notice = item.runtime["notice"]
    assert item.runtime["name"] == "torch" and item.runtime["requested"] == DEFAULT
    assert f"runtime {DEFAULT} unavailable (RuntimeError: Unsupported: aten::frobnicate)" in notice and "\n" not in notice
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [notice]
    # Nothing is lost, and the features are filed under eager PyTorch, not under the failed runtime.
    assert cache.path(splits.val, cache.key(bb, "output", splits.val, bb.spec.preprocessing, CPU)).exists()
    eager, _, hit = cached_split_inputs(bb, prefix, "output", splits.val, cache, CPU, num_workers=0, progress=False, runtime="torch")
    assert hit and torch.equal(eager.inputs, item.inputs)


def test_a_runtime_error_midway_redoes_the_pass_in_eager_pytorch(tiny_folder, resnet10_random, tmp_path, caplog):
    need(DEFAULT)
    bb = copy.deepcopy(resnet10_random)
    prefix = _probe_prefix(bb)
    runner = prepare_prefix_runner(prefix, (1, 3, 224, 224), DEFAULT, CPU, tmp_path, "r10")
    assert runner.name == DEFAULT
    calls = []
    working = runner.fn

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp: out of memory")
        return working(x)

    runner.fn = flaky
    from transferlab.features.extraction import extract

    splits = load_splits(tiny_folder)
    with caplog.at_level("WARNING"):
        out, bad = extract(prefix, splits.train, bb.spec.preprocessing, CPU, batch_size=8, num_workers=0, progress=False, runner=runner)
    assert runner.name == "torch" and f"{DEFAULT} failed while running (RuntimeError: Exception from" in runner.notice
    eager, _ = extract(prefix, splits.train, bb.spec.preprocessing, CPU, batch_size=8, num_workers=0, progress=False)
    assert torch.equal(out, eager), "rows of two runtimes were mixed"


def test_a_probe_gives_the_same_test_accuracy_with_every_runtime(tiny_folder, tmp_path):
    need(DEFAULT)
    from transferlab.api import probe

    runs = {}
    for runtime in ("torch", "onnxruntime", DEFAULT):
        need(runtime)
        runs[runtime] = probe(str(tiny_folder), tmp_path / runtime, "efficientnet_lite0", lr=1e-2, epochs=8, patience=8,
                              batch_size=8, num_workers=0, progress=False, runtime=runtime)
    for runtime, record in runs.items():
        assert record["runtime"]["name"] == runtime and record["runtime"]["notice"] == ""
        assert record["test_acc"] == runs["torch"]["test_acc"]
        assert record["best_epoch"] == runs["torch"]["best_epoch"]
        assert abs(record["val_xent"] - runs["torch"]["val_xent"]) <= 1e-4
    saved = json.loads((tmp_path / DEFAULT / "run.json").read_text())
    assert saved["runtime"]["version"] and saved["config"]["engine"]["runtime"] == DEFAULT
