import copy
import math

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.devices import Placement
from transferlab.core.errors import ConfigError
from transferlab.data import load_splits
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.features.sources import SplitInputs, TensorSource
from transferlab.models.freezing import FreezePlan, frozen_digest, layer_names, layers_of_last_blocks, ordered_layers, plan_cut, set_train_mode
from transferlab.models.heads import new_head
from transferlab.train.config import TrainConfig
from transferlab.train.loop import evaluate, fit
from transferlab.train.session import RunSession

CPU = Placement(torch.device("cpu"))


def feature_source(n, dim, n_classes, seed, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = torch.randn(n, dim, generator=g) + shift * F.one_hot(y, dim).float()
    return TensorSource(SplitInputs(x, y, []), CPU)


def _resnet10_with_head(resnet10_random):
    bb = copy.deepcopy(resnet10_random)
    bb.reset_classifier(new_head(512, 10, seed=0))
    return bb


def test_resnet10_last_layers_follow_the_forward_pass(resnet10_random):
    """pytorchcv's ResUnit.forward computes `identity_conv(x)` before `body(x)`, though it defines
    `identity_conv` after `body`: in forward order the last 3 layers are the main path's last conv and
    BN, then the head; `--layer-order definition` keeps the course's rule (the 1x1 shortcut)."""
    bb = _resnet10_with_head(resnet10_random)
    unit = "features.stage4.unit1"
    forward = ordered_layers(bb, "forward")
    assert forward[-3:] == [f"{unit}.body.conv2.conv", f"{unit}.body.conv2.bn", "output"]
    assert forward[-7:-3] == [f"{unit}.identity_conv.conv", f"{unit}.identity_conv.bn", f"{unit}.body.conv1.conv", f"{unit}.body.conv1.bn"]
    assert sorted(forward) == sorted(layer_names(bb.model)) and forward[0] == "features.init_block.conv.conv"
    definition = ordered_layers(bb, "definition")
    assert definition[-3:] == [f"{unit}.identity_conv.conv", f"{unit}.identity_conv.bn", "output"]
    assert FreezePlan(1).apply(bb) == ["output"]
    assert sum(p.numel() for p in bb.model.parameters() if p.requires_grad) == 5130
    assert FreezePlan(3).apply(bb) == forward[-3:]
    assert FreezePlan(3, "definition").apply(bb) == definition[-3:]
    assert plan_cut(bb, 3).name == unit and plan_cut(bb, 3, "definition").name == unit
    with pytest.raises(ConfigError, match=f"n_trainable_layers={len(forward) + 1}: must be between 1 and {len(forward)}"):
        FreezePlan(len(forward) + 1).apply(bb)


def test_efficientnet_lite_last_layers_follow_the_forward_pass():
    """timm's InvertedResidual runs conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3; the model then conv_head,
    bn2, the classifier. The last block of the chain holding parameters is the head."""
    from transferlab.models import load_backbone

    bb = load_backbone("efficientnet_lite0", pretrained=False)
    last_ir = [f"blocks.6.0.{n}" for n in ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3")]
    assert ordered_layers(bb, "forward")[-9:] == last_ir + ["conv_head", "bn2", "classifier"]
    # Blocks with parameters, last first: classifier, bn2, conv_head, blocks.6.0 (6 layers).
    assert [layers_of_last_blocks(bb, n) for n in (1, 2, 3, 4)] == [1, 2, 3, 9]
    assert plan_cut(bb, layers_of_last_blocks(bb, 4)).name == "blocks.6.0"
    with pytest.raises(ConfigError, match="ft.blocks=0: must be between 1 and"):
        layers_of_last_blocks(bb, 0)


def test_train_mode_only_for_trainable_batch_norm_and_only_with_train_bn(resnet10_random):
    """Only normalisation layers behave differently in training: the trainable BN alone trains (with
    train_bn); convs, the head and every frozen or parameter-free module stay in eval mode."""
    bb = _resnet10_with_head(resnet10_random)
    model = bb.model
    FreezePlan(3, "definition").apply(bb)
    set_train_mode(model, True, train_bn=True)
    training = {n for n, m in model.named_modules() if m.training}
    assert training == {"features.stage4.unit1.identity_conv.bn"}
    set_train_mode(model, True, train_bn=False)
    assert not any(m.training for m in model.modules())


def test_loss_formula_matches_hand_computation():
    train, val = feature_source(20, 6, 3, seed=1), feature_source(9, 6, 3, seed=2)
    head = new_head(6, 3, seed=5)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    cfg = TrainConfig(lr=0.1, l2=3.0, seed=0, epochs=1, patience=5, batch_size=20, optimizer="sgd")
    result = fit(head, head, head, train, val, cfg)
    # One full batch: the recorded loss is the loss at the initial weights.
    logits = train.inputs @ w0.T + b0
    expected = F.cross_entropy(logits, train.labels) + (3.0 / 20) * (w0**2).sum()
    assert math.isclose(result.history[1]["train_loss"], expected.item(), rel_tol=1e-6)
    assert math.isclose(result.history[1]["train_xent"], F.cross_entropy(logits, train.labels).item(), rel_tol=1e-6)
    # The bias is not penalised: its gradient is the cross-entropy's alone.
    assert result.history[1]["train_loss"] > result.history[1]["train_xent"]


def test_epoch_zero_is_validation_of_the_untrained_head():
    train, val = feature_source(30, 8, 4, seed=1), feature_source(12, 8, 4, seed=2)
    head = new_head(8, 4, seed=3)
    before = evaluate(head, val)
    result = fit(head, head, head, train, val, TrainConfig(epochs=3, patience=10))
    first = result.history[0]
    assert first["epoch"] == 0 and first["train_loss"] is None and first["train_err"] is None
    assert (first["val_xent"], first["val_err"]) == pytest.approx(before)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]


def test_early_stopping_restores_the_best_epoch():
    # Noise labels: validation cross-entropy gets worse as the head memorises train.
    g = torch.Generator().manual_seed(0)
    train = TensorSource(SplitInputs(torch.randn(40, 30, generator=g), torch.randint(0, 3, (40,), generator=g), []), CPU)
    val = TensorSource(SplitInputs(torch.randn(30, 30, generator=g), torch.randint(0, 3, (30,), generator=g), []), CPU)
    head = new_head(30, 3, seed=0)
    cfg = TrainConfig(lr=0.05, epochs=200, patience=4, batch_size=8)
    result = fit(head, head, head, train, val, cfg)
    xents = [h["val_xent"] for h in result.history]
    assert result.best_epoch == xents.index(min(xents))
    assert result.history[-1]["epoch"] == result.best_epoch + 4 < 200  # stopped by patience
    assert evaluate(head, val) == pytest.approx((result.best["val_xent"], result.best["val_err"]), abs=1e-6)


def test_same_seed_same_history_different_seed_different():
    train, val = feature_source(50, 8, 4, seed=1), feature_source(12, 8, 4, seed=2)
    runs = []
    for seed in (7, 7, 8):
        head = new_head(8, 4, seed=seed)
        runs.append(fit(head, head, head, train, val, TrainConfig(seed=seed, epochs=4, batch_size=16)).history)
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("k, train_bn", [(1, True), (3, True), (3, False)])
def test_frozen_weights_and_bn_statistics_are_bit_identical_after_training(tiny_folder, resnet10_random, k, train_bn):
    """MoCo's linear-eval sanity check, including batch-norm running statistics."""
    engine = EngineConfig(device="cpu", progress=False, num_workers=0)
    session = RunSession(CutInputs(copy.deepcopy(resnet10_random), load_splits(tiny_folder), engine, None))
    session.reset(seed=0, n_trainable_layers=k)
    unit = session.model.features.stage4.unit1
    frozen_bn = unit.identity_conv.bn  # k = 3 in forward order: body.conv2.conv, body.conv2.bn, output
    before_mean = frozen_bn.running_mean.clone()
    digest = frozen_digest(session.model)
    trained_bn = unit.body.conv2.bn
    trained_bn_before = trained_bn.running_mean.clone()
    after_epoch_1 = []  # read during training: the best epoch restored at the end may be epoch 0, statistics and all

    def record(r):
        if r["epoch"] == 1:
            after_epoch_1.append(trained_bn.running_mean.clone())

    session.run(TrainConfig(lr=1e-2, epochs=3, batch_size=8, train_bn=train_bn), k, on_epoch=record)
    assert frozen_digest(session.model) == digest
    assert torch.equal(frozen_bn.running_mean, before_mean)
    # Running statistics move only when a trainable BN layer uses batch statistics; its affine params train either way.
    assert torch.equal(after_epoch_1[0], trained_bn_before) == (k == 1 or not train_bn)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batched_probes_match_individual_runs(optimizer):
    from transferlab.train.probes import fit_linear_probes

    train, val = feature_source(70, 16, 5, seed=1, shift=1.0), feature_source(25, 16, 5, seed=2, shift=1.0)
    cfgs = [TrainConfig(lr=lr, l2=l2, seed=4, epochs=25, patience=3, batch_size=16, optimizer=optimizer)
            for lr in (1e-3, 3e-2, 50.0) for l2 in (0.0, 10.0)]
    batched = fit_linear_probes([new_head(16, 5, seed=4) for _ in cfgs], train, val, cfgs, head_name="output")
    for cfg, got in zip(cfgs, batched):
        head = new_head(16, 5, seed=4)
        ref = fit(head, head, head, train, val, cfg)
        assert got.best_epoch == ref.best_epoch and got.status == ref.status
        assert len(got.history) == len(ref.history)
        for a, b in zip(got.history, ref.history):
            for key in ("train_loss", "train_xent", "train_err", "val_xent", "val_err"):
                if a[key] is None or not math.isfinite(a[key]):
                    assert (a[key] is None) == (b[key] is None)
                else:
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (cfg, a["epoch"], key)
        assert torch.allclose(got.best_state["output.weight"], ref.best_state["weight"], atol=1e-5)


@pytest.mark.slow
def test_augmentation_is_seeded_per_image_and_independent_of_workers(tiny_folder, resnet10_random):
    from transferlab.data import ImageDataset

    splits = load_splits(tiny_folder)
    pre = resnet10_random.spec.preprocessing
    a, b = ImageDataset(splits.train, pre, augment_seed=5), ImageDataset(splits.train, pre, augment_seed=6)
    assert torch.equal(a[3][0], ImageDataset(splits.train, pre, augment_seed=5)[3][0])
    assert not torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], ImageDataset(splits.train, pre)[3][0])
    histories = []
    for workers in (0, 2, 0):
        engine = EngineConfig(device="cpu", use_cache=False, progress=False, num_workers=workers)
        session = RunSession(CutInputs(copy.deepcopy(resnet10_random), splits, engine, None))
        seed = 1 if len(histories) < 2 else 2
        histories.append(session.run(TrainConfig(lr=1e-2, epochs=2, batch_size=8, seed=seed, augment=True), 1).history)
    assert histories[0] == histories[1]  # same seed, 0 or 2 decoding workers: identical numbers
    assert histories[0][1] != histories[2][1]


def test_augment_without_no_cache_switches_to_the_uncached_path(tiny_folder, tmp_path):
    import json

    from transferlab.cli.main import main

    out = tmp_path / "aug"
    assert main(["probe", "--data", str(tiny_folder), "--backbone", "mobilenet_wd4", "--weights", str(_random_ckpt(tmp_path)),
                 "--augment", "--epochs", "2", "--device", "cpu", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["cached"] is False and record["config"]["train"]["augment"] is True


def _random_ckpt(tmp_path):
    from safetensors.torch import save_file

    from transferlab.models import load_backbone

    path = tmp_path / "wd4.safetensors"
    save_file({k: v.contiguous() for k, v in load_backbone("mobilenet_wd4", pretrained=False).model.state_dict().items()}, str(path))
    return path
