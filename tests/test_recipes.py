"""Fine-tuning recipes that can move a network: which blocks train, layer-wise lr decay, AdamW's decoupled
weight decay, SGD with Nesterov momentum, the one-cycle schedule, views drawn on the fly when training
starts at the image, and the fine-tuning rule. Expected values come from the definitions (timm's
layer_decay formula, torch's own optimisers and OneCycleLR, a hand-computed AdamW step)."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.data import load_splits
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.features.sources import ImageSource, SplitInputs, TensorSource
from transferlab.models.freezing import block_unit, layer_names, layers_of_last_blocks, parameter_blocks
from transferlab.models.heads import new_head
from transferlab.sweep import hyper_rule
from transferlab.sweep.config import PhaseGrid, SweepConfig
from transferlab.train.config import TrainConfig
from transferlab.train.loop import fit, lr_scales, make_optimizer
from transferlab.train.schedule import lr_factor
from transferlab.train.session import RunSession

ENGINE = EngineConfig(device="cpu", progress=False, num_workers=0, runtime="torch")


def test_layer_decay_gives_each_block_the_lr_of_its_distance_from_the_head(resnet10_random):
    bb = copy.deepcopy(resnet10_random)
    for p in bb.model.parameters():
        p.requires_grad_(True)
    blocks = [b for _, b in parameter_blocks(bb)]
    cfg = TrainConfig(lr=0.01, backbone_lr_mult=0.5, layer_decay=0.8)
    scales = lr_scales(bb.model, bb.classifier, cfg, blocks)
    last = len(blocks) - 1
    head_ids = {id(p) for p in bb.classifier.parameters()}
    for j, block in enumerate(blocks):
        for p in block.parameters():
            want = 1.0 if id(p) in head_ids else 0.5 * 0.8 ** (last - j)  # timm: scale = decay ** (L - layer_id)
            assert scales[id(p)] == pytest.approx(want), (j, p.shape)
    # the stem: the most blocks before the head, the smallest rate; the last backbone block one factor below 0.5
    stem_w = next(blocks[0].parameters())
    assert scales[id(stem_w)] == pytest.approx(0.5 * 0.8**last)
    optimizer = make_optimizer(bb.model, bb.classifier, cfg, blocks)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(stem_w)] == pytest.approx(0.01 * 0.5 * 0.8**last)
    assert lr_of[id(bb.classifier.weight)] == pytest.approx(0.01)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == head_ids  # the head's group first
    # layer_decay 1: two groups, the head at lr and the backbone at lr * mult, as without decay
    plain = make_optimizer(bb.model, bb.classifier, dataclasses.replace(cfg, layer_decay=1.0), blocks)
    assert [g["lr"] for g in plain.param_groups] == pytest.approx([0.01, 0.005])


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.out(torch.relu(self.body(x)))


def test_adamw_decays_the_backbone_weights_decoupled_exactly_as_torchs_adamw():
    cfg = TrainConfig(lr=0.01, optimizer="adamw", weight_decay=0.3, backbone_lr_mult=0.5)
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ours_model = TwoLayer()
    ref_model = copy.deepcopy(ours_model)
    before = copy.deepcopy(ours_model)
    ours = make_optimizer(ours_model, ours_model.out, cfg)
    ref = torch.optim.AdamW([{"params": [ref_model.out.weight, ref_model.out.bias], "lr": 0.01, "weight_decay": 0.0},
                             {"params": [ref_model.body.weight], "lr": 0.005, "weight_decay": 0.3},
                             {"params": [ref_model.body.bias], "lr": 0.005, "weight_decay": 0.0}])
    for _ in range(3):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-7), name
    # one step by hand: decoupled decay is w * (1 - lr * wd), then Adam's first step moves by lr * g / (|g| + eps)
    one = copy.deepcopy(before)
    opt = make_optimizer(one, one.out, cfg)
    nn.functional.cross_entropy(one(x), y).backward()
    grad = one.body.weight.grad.clone()
    opt.step()
    want = before.body.weight * (1 - 0.005 * 0.3) - 0.005 * grad / (grad.abs() + 1e-8)
    assert torch.allclose(one.body.weight, want, atol=1e-6)
    want_bias = before.body.bias - 0.005 * torch.sign(one.body.bias.grad)  # biases: no decay
    assert torch.allclose(one.body.bias, want_bias, atol=1e-6)


def test_sgd_nesterov_is_torchs_nesterov_and_the_batched_probes_follow_it():
    from transferlab.train.probes import fit_linear_probes

    cfg = TrainConfig(lr=0.05, optimizer="sgd", momentum=0.9, nesterov=True, epochs=6, patience=10, batch_size=8, seed=2)
    model = TwoLayer()
    opt = make_optimizer(model, model.out, cfg)
    assert all(g["nesterov"] for g in opt.param_groups)
    g = torch.Generator().manual_seed(3)
    train = TensorSource(SplitInputs(torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g), []), _cpu())
    val = TensorSource(SplitInputs(torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g), []), _cpu())
    head = new_head(6, 3, seed=2)
    alone = fit(head, head, head, train, val, cfg)
    batched = fit_linear_probes([new_head(6, 3, seed=2)], train, val, [cfg])[0]
    other = new_head(6, 3, seed=2)
    plain = fit(other, other, other, train, val, dataclasses.replace(cfg, nesterov=False))
    for a, b in zip(batched.history, alone.history):
        assert a["val_xent"] == pytest.approx(b["val_xent"], rel=1e-5)
    assert alone.history[-1]["val_xent"] != pytest.approx(plain.history[-1]["val_xent"], rel=1e-6)
    with pytest.raises(ConfigError, match="nesterov=True: needs the sgd optimizer with a momentum above 0"):
        TrainConfig(nesterov=True).validate()


def _cpu():
    from transferlab.core.devices import Placement

    return Placement(torch.device("cpu"))


def test_one_cycle_factors_are_torchs_onecycle_lr():
    cfg = TrainConfig(lr=0.02, epochs=5, lr_schedule="one_cycle")
    steps = 7
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=cfg.epochs * steps, cycle_momentum=False)
    for step in range(cfg.epochs * steps):
        assert 0.02 * lr_factor(cfg, step, steps) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), step
        opt.step()
        sched.step()
    warm = dataclasses.replace(cfg, warmup_epochs=1)  # one-cycle warms up itself: warmup_epochs is not used
    assert [lr_factor(warm, s, steps) for s in range(cfg.epochs * steps)] == [lr_factor(cfg, s, steps) for s in range(cfg.epochs * steps)]


def test_block_units_all_and_from_n_count_blocks_from_the_stem(resnet10_random):
    bb = resnet10_random
    n_blocks = len(parameter_blocks(bb))
    assert layers_of_last_blocks(bb, "all") == len(layer_names(bb.model)) == layers_of_last_blocks(bb, "from:0")
    assert layers_of_last_blocks(bb, "from:1") == layers_of_last_blocks(bb, n_blocks - 1)
    assert layers_of_last_blocks(bb, f"from:{n_blocks - 1}") == 1  # the head's block alone
    with pytest.raises(ConfigError, match=f"ft.blocks=from:{n_blocks}: must be between 1 and {n_blocks}"):
        layers_of_last_blocks(bb, f"from:{n_blocks}")
    assert [block_unit(v) for v in ("all", "from:03", "4", 2)] == ["all", "from:3", 4, 2]
    for bad in ("every", "from:", "from:x", True):
        with pytest.raises(ValueError):
            block_unit(bad)


def test_the_fine_tuning_rule_sets_epochs_from_the_training_size_and_keeps_what_the_user_set():
    assert [hyper_rule.rule_epochs(n) for n in (100, 624, 1000, 3000, 100_000)] == [15, 13, 8, 5, 5]
    cfg = SweepConfig(data=None, lpft=True)  # type: ignore[arg-type]
    sized = cfg.for_training_size(624)
    assert sized.ft.get("epochs") == (13,) and sized.ft.get("lr") == hyper_rule.FIXED["lr"]
    assert sized.ft_units() == [("blocks", "all")]
    mine = dataclasses.replace(cfg, ft=PhaseGrid.of("ft", {"epochs": 3, "lr": [1e-4]})).for_training_size(624)
    assert mine.ft.get("epochs") == (3,) and mine.ft.get("lr") == (1e-4,)
    assert mine.ft.get("optimizer") == ("adamw",)  # the rest: the rule's
    # the rule's weight decay is AdamW's decoupled rate: another optimizer without its own has none
    assert PhaseGrid.of("ft").get("weight_decay") == (0.05,)
    assert PhaseGrid.of("ft", {"optimizer": "sgd"}).get("weight_decay") == (0.0,)
    assert PhaseGrid.of("ft", {"optimizer": ["sgd", "adamw"]}).get("weight_decay") == (0.0,)
    assert PhaseGrid.of("ft", {"optimizer": "sgd", "weight_decay": 5e-4}).get("weight_decay") == (5e-4,)


@pytest.mark.slow
def test_views_of_a_cut_at_the_input_are_fresh_every_epoch_seeded_and_independent_of_workers(tiny_folder, resnet10_random):
    splits = load_splits(tiny_folder)
    k = len(layer_names(resnet10_random.model))  # the whole network: the trainable part starts at the image
    histories = []
    for workers, augment in ((0, "views:4"), (2, "views:4"), (None, "views:2")):
        engine = dataclasses.replace(ENGINE, num_workers=workers)
        session = RunSession(CutInputs(copy.deepcopy(resnet10_random), splits, engine, None))
        cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=1, feature_augment=augment)
        assert isinstance(session.train_source(cfg, k), ImageSource)  # decoded every pass, nothing cached
        histories.append(session.run(cfg, k).history)
    assert histories[0] == histories[1]  # 0 or 2 decoding workers: identical numbers
    # a decoding thread (the CPU default) too; and on the fly K caps nothing: views:2 and views:4 are the same views
    assert histories[0] == histories[2]
    # the same views as --augment draws them (the definition), and not the plain images
    engine = dataclasses.replace(ENGINE, use_cache=False)
    session = RunSession(CutInputs(copy.deepcopy(resnet10_random), splits, engine, None))
    assert session.run(TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=1, augment=True), k).history == histories[0]
    plain = session.run(TrainConfig(lr=1e-3, epochs=2, batch_size=8, seed=1), k).history
    assert plain[1]["train_loss"] != pytest.approx(histories[0][1]["train_loss"], rel=1e-6)
    assert not math.isnan(plain[1]["train_loss"])


def test_ft_blocks_takes_n_all_or_from_n_and_names_the_flag_otherwise(tiny_folder, tmp_path, capsys):
    from transferlab.cli.main import main
    from transferlab.cli.sweep import build_configs, load_yaml

    base = ["sweep", "--data", str(tiny_folder), "--out", str(tmp_path / "o"), "--ft", "--device", "cpu", "--no-progress"]
    for value, expected in [("every", "--ft-blocks every: expected a comma list of block values"),
                            ("from:x", "--ft-blocks from:x: expected a comma list of block values"),
                            ("0", "--ft-blocks 0: must be at least 1")]:
        assert main(base + ["--ft-blocks", value]) == 2, value
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (value, err)
    assert not (tmp_path / "o").exists()
    path = tmp_path / "g.yaml"
    path.write_text("ft:\n  blocks: [all, from:2, 3]\n  epochs: 4\n")
    cfg = build_configs(load_yaml(str(path)))[0]
    assert cfg.ft_units() == [("blocks", "all"), ("blocks", "from:2"), ("blocks", 3)]
    assert cfg.for_training_size(10).ft.get("epochs") == (4,)


def test_threaded_decoding_gives_the_data_loaders_batches(tiny_folder, resnet10_random):
    from transferlab.data.loader import image_loader, threaded_batches

    split, pre = load_splits(tiny_folder).train, resnet10_random.spec.preprocessing
    chunks = [[5, 0, 3], [7, 1], [2, 4, 6]]
    for seed in (None, 11):
        threaded = list(threaded_batches(split, pre, chunks, threads=2, augment_seed=seed))
        loader = list(image_loader(split, pre, 3, 0, batch_sampler=chunks, augment_seed=seed))
        assert len(threaded) == len(loader) == 3
        for a, b in zip(threaded, loader):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_new_training_fields_enter_a_run_identity_only_when_set():
    from transferlab.core.fields import identity

    base = identity(TrainConfig())
    assert not {"nesterov", "weight_decay", "layer_decay"} & set(base)  # identities from before these fields hold
    assert base == {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in ("nesterov", "weight_decay", "layer_decay")}
    assert identity(TrainConfig(weight_decay=0.05))["weight_decay"] == 0.05
    assert identity(TrainConfig(optimizer="sgd", nesterov=True))["nesterov"] is True


def test_weight_decay_spares_biases_norms_tokens_and_what_the_model_exempts():
    from transferlab.train.loop import no_weight_decay

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.proj = nn.Linear(4, 4)
            self.gate = nn.Parameter(torch.zeros(4, 4))
            self.out = nn.Linear(4, 2)

        def no_weight_decay(self):
            return {"gate"}

    model = Tokens()
    assert no_weight_decay(model) == {"cls_token", "pos_embed", "gate"}
    opt = make_optimizer(model, model.out, TrainConfig(optimizer="adamw", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model.proj.weight)}
