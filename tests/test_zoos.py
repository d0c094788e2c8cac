"""Backbones by prefix from timm, torchvision and HuggingFace: offline, small random models."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import require, write_tiny_hf_vit
from transferlab.data import build_transform, load_splits
from transferlab.features.cache import Chain
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.models import load_backbone
from transferlab.models.freezing import FreezePlan, layer_of, layers_of_last_blocks, ordered_layers, plan_cut
from transferlab.train.config import TrainConfig
from transferlab.train.session import RunSession

# (name, input size for the composition check: CNNs take any size, ViTs their own)
MODELS = [
    ("timm:resnet18", 64), ("timm:convnext_atto", 64), ("timm:test_vit", None),
    ("torchvision:resnet18", 64), ("torchvision:mobilenet_v3_small", 64), ("torchvision:efficientnet_b0", 64),
    ("timm:regnetx_002", 64),  # a family without derived blocks: [features, head]
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_tiny_hf_vit(tmp_path_factory.mktemp("hf_vit"))


def build(name, hf_folder=None, size=None):
    if name == "hf":
        name = f"hf:{hf_folder}"
    bb = load_backbone(name, pretrained=False)
    if size is not None:  # a small input for speed (the CNNs' pooling makes any size work)
        pre = dataclasses.replace(bb.spec.preprocessing, input_size=size, resize=None, crop_pct=1.0)
        bb.spec = dataclasses.replace(bb.spec, preprocessing=pre)
    return bb


@pytest.mark.parametrize("name, size", MODELS + [("hf", None)])
def test_chain_composes_to_the_models_own_output(name, size, request):
    bb = build(name, request.getfixturevalue("hf_folder") if name == "hf" else None)
    side = size or bb.spec.preprocessing.input_size
    x = torch.randn(2, 3, side, side)
    chain = bb.chain()
    with torch.no_grad():
        assert torch.allclose(Chain(chain)(x), bb.model(x), atol=1e-5)
    assert chain[-1][0] == bb.classifier_name and chain[-1][1] is bb.classifier
    assert isinstance(bb.classifier, torch.nn.Linear) and bb.num_features == bb.feature_dim == bb.classifier.in_features
    assert len({n for n, _ in chain}) == len(chain)
    # Every parameter belongs to exactly one block: the cut is well defined.
    owned = [id(p) for _, b in chain for p in b.parameters()]
    assert sorted(owned) == sorted(id(p) for p in bb.model.parameters())


def last_block_k(bb):
    """(index of the last block with parameters before the head, k training exactly that block + the head)."""
    chain = bb.chain()
    i = max(j for j, (_, b) in enumerate(chain[:-1]) if any(True for _ in b.parameters()))
    owner = {id(p): layer_of(n) for n, p in bb.model.named_parameters()}
    layers = {owner[id(p)] for p in chain[i][1].parameters()} | {owner[id(p)] for p in chain[-1][1].parameters()}
    return i, len(layers)


@pytest.mark.parametrize("name, size", MODELS[:-1] + [("hf", None)])
def test_the_last_block_trains_exactly_its_parameters(name, size, request):
    bb = build(name, request.getfixturevalue("hf_folder") if name == "hf" else None)
    i, k = last_block_k(bb)
    assert layers_of_last_blocks(bb, 2) == k  # --ft-blocks 2: the last block and the head
    cut = plan_cut(bb, k)
    assert cut.index == i
    FreezePlan(k).apply(bb)
    chain = bb.chain()
    expected = {id(p) for p in chain[i][1].parameters()} | {id(p) for p in chain[-1][1].parameters()}
    assert {id(p) for p in bb.model.parameters() if p.requires_grad} == expected
    assert ordered_layers(bb)[-k:] == list(cut.trainable_layers)


def history(bb, splits, k, use_cache):
    engine = EngineConfig(device="cpu", use_cache=use_cache, runtime="torch", progress=False, num_workers=0)
    session = RunSession(CutInputs(copy.deepcopy(bb), splits, engine, None))
    frozen = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    result = session.run(TrainConfig(lr=1e-2, l2=1.0, seed=3, epochs=2, patience=10, batch_size=8), k)  # checks frozen_digest too
    trainable = set(plan_cut(session.inputs.backbone, k).trainable_layers)
    changed = {layer_of(n) for n, p in session.model.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed <= trainable
    return session.inputs, result


@pytest.mark.parametrize("name, size", [("timm:resnet18", 48), ("torchvision:mobilenet_v3_small", 48), ("hf", None)])
@pytest.mark.slow
def test_cached_and_uncached_fine_tuning_agree(tiny_folder, name, size, request):
    bb = build(name, request.getfixturevalue("hf_folder") if name == "hf" else None, size)
    splits = load_splits(tiny_folder)
    _, k = last_block_k(bb)
    inputs, cached = history(bb, splits, k, True)
    _, full = history(bb, splits, k, False)
    assert inputs.setup(k).cached and inputs.setup(k).cut.index > 0
    for a, b in zip(cached.history, full.history):
        for key in ("train_loss", "val_xent", "val_err"):
            if a[key] is not None:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_a_model_without_blocks_probes_cached_and_fine_tunes_uncached(tiny_folder, caplog):
    bb = build("timm:regnetx_002", size=48)
    assert [n for n, _ in bb.chain()] == ["features", "head.fc"]
    engine = EngineConfig(device="cpu", use_cache=True, runtime="torch", progress=False, num_workers=0)
    session = RunSession(CutInputs(bb, load_splits(tiny_folder), engine, None))
    assert session.inputs.setup(1).cached and session.inputs.setup(1).cut.index == 1
    with caplog.at_level("WARNING"):
        setup = session.inputs.setup(3)
    assert not setup.cached and "uncached" in setup.notice and setup.notice in caplog.text
    assert session.run(TrainConfig(lr=1e-2, epochs=1, batch_size=8), 3).status == "done"


@pytest.fixture(scope="module")
def chelsea():
    skdata = require("skimage.data")
    from PIL import Image

    return Image.fromarray(np.asarray(skdata.chelsea()))


@pytest.mark.parametrize("name", ["timm:convnext_atto", "timm:resnet50.a1_in1k", "timm:vit_small_patch16_224.augreg_in21k"])
def test_timm_preprocessing_matches_timms_own_transform(chelsea, name):
    import timm.data
    from timm.models import get_pretrained_cfg

    from transferlab.models import get_spec

    spec = get_spec(name)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=get_pretrained_cfg(name[5:]).to_dict()))
    assert torch.allclose(build_transform(spec.preprocessing)(chelsea), theirs(chelsea), atol=1e-6)


@pytest.mark.parametrize("name", ["torchvision:resnet50:IMAGENET1K_V2", "torchvision:efficientnet_b0", "torchvision:vit_b_16"])
def test_torchvision_preprocessing_matches_the_weights_transforms(chelsea, name):
    from torchvision.models import get_model_weights

    from transferlab.models import get_spec

    spec = get_spec(name)
    theirs = get_model_weights(spec.arch)[spec.tag].transforms()
    assert torch.allclose(build_transform(spec.preprocessing)(chelsea), theirs(chelsea), atol=1e-6)
    assert spec.source == "imagenet1k" and spec.source_top1 is not None and 60 < spec.source_top1 < 90


def test_hf_preprocessing_matches_the_image_processor(chelsea, hf_folder, tmp_path):
    transformers = require("transformers")
    from transferlab.models import get_spec
    from transferlab.models.hf_zoo import _processor

    # ViT: squash to 32x32, bilinear, mean = std = 0.5; DINOv2-style: short side 256 bicubic, crop 224, ImageNet stats
    bit = tmp_path / "bit"
    bit.mkdir()
    (bit / "config.json").write_text((hf_folder / "config.json").read_text())
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    cls(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(bit)
    for folder in (hf_folder, bit):
        spec = get_spec(f"hf:{folder}")
        theirs = torch.as_tensor(np.asarray(_processor(str(folder))(chelsea)["pixel_values"][0]))
        ours = build_transform(spec.preprocessing)(chelsea)
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6), (folder, (ours - theirs).abs().max())


def features(bb, x):
    with torch.no_grad():
        return Chain(bb.chain()[:-1])(x)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18", "hf"])
def test_local_weights_round_trip(tmp_path, name, request):
    from safetensors.torch import save_file

    if name == "hf":
        folder = request.getfixturevalue("hf_folder")
        name = f"hf:{folder}"
        source = load_backbone(name, pretrained=False)
        state = source.model.encoder.state_dict()  # the encoder's own keys, as save_pretrained writes them
    else:
        source = load_backbone(name, pretrained=False)
        state = source.model.state_dict()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_backbone(name, weights=str(path))
    x = torch.randn(2, 3, 32, 32) if name.startswith("hf") else torch.randn(2, 3, 64, 64)
    assert torch.equal(features(loaded, x), features(source, x))
    assert loaded.spec.source == "local" and loaded.weights == str(path)


def run_cli(argv, capsys):
    from transferlab.cli.main import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("backbone", ["timm:resnet18", "torchvision:resnet18", "hf:someorg/some-vit"])
def test_offline_missing_weights_is_one_line_exit_2(tiny_folder, tmp_path, monkeypatch, capsys, backbone):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    if backbone.startswith("hf:"):
        require("transformers")
    code, err = run_cli(["probe", "--data", str(tiny_folder), "--out", str(tmp_path / "out"), "--backbone", backbone, "--no-progress"], capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert f"--backbone {backbone}: no pretrained weights" in err
    assert str(tmp_path) in err  # where it looked
    assert "--weights FILE" in err


def test_backbones_lists_a_zoo_with_local_weights_status(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = __import__("transferlab.cli.main", fromlist=["main"]).main(["backbones", "--zoo", "timm", "--filter", "convnext_a*"])
    out = capsys.readouterr().out
    assert code == 0 and "timm:convnext_atto.d2_in1k" in out and "missing (" in out


def test_sweep_backbone_info_overrides_are_validated():
    from transferlab.core.errors import ConfigError
    from transferlab.data import DataConfig
    from transferlab.sweep.config import SweepConfig

    SweepConfig(DataConfig("x"), backbones=("timm:resnet18",), backbone_info={"timm:resnet18": {"source": "imagenet1k", "source_top1": 69.7}}).validate()
    with pytest.raises(ConfigError, match="source_top1"):
        SweepConfig(DataConfig("x"), backbone_info={"timm:resnet18": {"source_top1": 170}}).validate()
