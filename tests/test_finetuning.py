"""Fine-tuning that can earn its place: augmentation on the cached path, backbone learning-rate factor,
schedules, the selection criterion and weight interpolation (WiSE-FT). Expected values come from the
definitions (the same views computed on the fly, the schedule's formula, an SGD step by hand)."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.devices import Placement
from transferlab.core.errors import ConfigError
from transferlab.data import load_splits
from transferlab.features.cache import Chain
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.engine import EngineConfig
from transferlab.features.sources import ImageSource, SplitInputs, TensorSource, ViewSource, crop_and_flip_maps, view_seed
from transferlab.models.heads import new_head
from transferlab.train.config import TrainConfig, parse_feature_augment, selection_key
from transferlab.train.interpolation import interpolate_states
from transferlab.train.loop import evaluate, fit
from transferlab.train.schedule import lr_factor
from transferlab.train.session import RunSession

CPU = Placement(torch.device("cpu"))
ENGINE = EngineConfig(device="cpu", progress=False, num_workers=0, runtime="torch")


def inputs_of(backbone, folder, cache_dir=None, **kw):
    return CutInputs(copy.deepcopy(backbone), load_splits(folder), ENGINE, cache_dir, **kw)


def session_of(backbone, folder, cache_dir=None, **kw):
    return RunSession(inputs_of(backbone, folder, cache_dir, **kw))


def test_cached_views_equal_the_same_views_computed_on_the_fly(tiny_folder, resnet10_random, tmp_path):
    inputs = inputs_of(resnet10_random, tiny_folder, tmp_path / "cache")
    k, n_views, seed = 3, 3, 5
    views = inputs.views(k, n_views, seed, 0.5)
    cut = inputs.setup(k).cut.index
    assert views.inputs.shape[:2] == (n_views, len(inputs.splits.train))
    # On the fly: the whole frozen prefix on pass v of the uncached --augment path with the same seed.
    prefix = Chain(inputs.backbone.chain()[:cut]).eval()
    images = ImageSource(inputs.splits.train, inputs.backbone.spec.preprocessing, CPU, num_workers=0).augmented(seed, 0.5)
    for v in range(n_views):
        with torch.no_grad():
            on_the_fly = torch.cat([prefix(x) for x, _y in images.batches(torch.arange(len(images)), 64)])
        assert torch.allclose(views.inputs[v], on_the_fly, atol=1e-5), v
    assert not torch.allclose(views.inputs[0], views.inputs[1], atol=1e-3)
    plain = inputs.setup(k).sources["train"]
    assert isinstance(plain, TensorSource) and not torch.allclose(views.inputs[0], plain.inputs, atol=1e-3)
    # Each view is its own cache file: second inputs load them, and views:2 is views:3's first two.
    files = sorted((tmp_path / "cache").glob("train-*/manifest.json"))
    assert len(files) == 1 + n_views
    again = inputs_of(resnet10_random, tiny_folder, tmp_path / "cache").views(k, 2, seed, 0.5)
    assert torch.equal(again.inputs, views.inputs[:2])
    assert len(sorted((tmp_path / "cache").glob("train-*/manifest.json"))) == len(files)
    # Another seed or crop scale is another key.
    other = inputs.views(k, 1, seed, 0.9)
    assert not torch.allclose(other.inputs[0], views.inputs[0], atol=1e-3)


def test_view_source_shows_one_seeded_view_per_image_each_pass():
    views = torch.arange(3 * 5, dtype=torch.float32).view(3, 5, 1)  # view v of image i holds 5v + i
    labels = torch.arange(5)

    def passes(seed, n=6):
        src = ViewSource(views, labels, CPU, seed)
        out = []
        for _ in range(n):
            xs, ys = zip(*src.batches(torch.tensor([4, 0, 2, 1, 3]), 2))
            x, y = torch.cat(xs).view(-1), torch.cat(ys)
            assert torch.equal(x.long() % 5, y)  # each row is a view of its own image
            out.append((x.long() // 5).tolist())
        return out

    first = passes(7)
    assert first == passes(7) and first != passes(8)
    assert {v for p in first for v in p} == {0, 1, 2}  # every view gets used
    assert first[0] != first[1]  # a new draw each pass


def test_map_augmentation_crops_and_flips_spatial_maps_only(tiny_folder, resnet10_random):
    maps = torch.randn(16, 2, 5, 5)
    flips_only = crop_and_flip_maps(maps, torch.Generator().manual_seed(0), min_scale=1.0)
    flipped = [torch.equal(a.flip(2), b) for a, b in zip(maps, flips_only)]
    assert all(f or torch.equal(a, b) for f, a, b in zip(flipped, maps, flips_only))
    assert 0 < sum(flipped) < len(maps)  # a coin flip per map
    # By hand: with the first draws of the same generator, map 0's crop (side round(5 * sqrt(area))) at
    # (y0, x0), resized back to 5x5, then mirrored if the coin says so.
    gen = torch.Generator().manual_seed(3)
    area = 0.2 + 0.8 * torch.rand(1, generator=gen).item()
    side = max(1, round(5 * area**0.5))
    y0, x0 = int(torch.randint(0, 5 - side + 1, (1,), generator=gen)), int(torch.randint(0, 5 - side + 1, (1,), generator=gen))
    expected = F.interpolate(maps[:1, :, y0 : y0 + side, x0 : x0 + side], size=(5, 5), mode="bilinear", align_corners=False)
    if torch.rand(1, generator=gen).item() < 0.5:
        expected = expected.flip(3)
    cropped = crop_and_flip_maps(maps, torch.Generator().manual_seed(3), min_scale=0.2)
    assert side < 5 and torch.allclose(cropped[0], expected[0])
    assert cropped.shape == maps.shape
    assert torch.equal(cropped, crop_and_flip_maps(maps, torch.Generator().manual_seed(3), min_scale=0.2))
    # A probe's cache holds pooled vectors: map augmentation is refused, naming the flag's value.
    session = session_of(resnet10_random, tiny_folder)
    with pytest.raises(ConfigError, match="needs cached spatial maps before global pooling"):
        session.run(TrainConfig(epochs=1, feature_augment="map"), 1)
    # resnet10's last 3 layers are inside stage4.unit1: its cached input is a (512, H, W) map.
    augmented = session.run(TrainConfig(lr=1e-3, epochs=2, batch_size=8, feature_augment="map"), 3)
    plain = session.run(TrainConfig(lr=1e-3, epochs=2, batch_size=8), 3)
    assert augmented.status == "done" and augmented.history[1]["train_xent"] != plain.history[1]["train_xent"]
    assert augmented.history[0] == plain.history[0]


def test_views_training_is_reproducible_and_differs_from_plain(tiny_folder, resnet10_random):
    session = session_of(resnet10_random, tiny_folder)
    cfg = TrainConfig(lr=1e-3, epochs=3, batch_size=8, feature_augment="views:2")
    a, b = session.run(cfg, 3).history, session.run(cfg, 3).history
    plain = session.run(TrainConfig(lr=1e-3, epochs=3, batch_size=8), 3).history
    assert a == b and a[1]["train_xent"] != plain[1]["train_xent"]
    assert a[0] == plain[0]  # validation always sees the plain view


def test_feature_augment_values_are_checked():
    assert parse_feature_augment("views:4") == ("views", 4) and parse_feature_augment("map") == ("map", 0)
    for bad in ("views:0", "views", "crops", "views:x"):
        with pytest.raises(ConfigError, match="expected none, map or views:K"):
            TrainConfig(feature_augment=bad).validate()
    with pytest.raises(ConfigError, match="cannot be combined with --augment"):
        TrainConfig(feature_augment="views:2", augment=True).validate()


def test_lr_factor_is_linear_warmup_then_cosine_to_zero():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, lr_schedule="cosine")
    steps = 2  # per epoch: 2 warmup steps, then 6 of cosine decay
    got = [lr_factor(cfg, s, steps) for s in range(8)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert got == pytest.approx(expected)
    assert lr_factor(TrainConfig(epochs=4), 5, steps) == 1.0
    assert [lr_factor(TrainConfig(epochs=4, warmup_epochs=2), s, steps) for s in (0, 3, 4)] == [0.25, 1.0, 1.0]


def test_fit_applies_the_schedule_to_every_step():
    # Plain SGD (no momentum), one full batch per epoch: each epoch's update is -lr * factor * gradient.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.arange(12) % 3
    train, val = TensorSource(SplitInputs(x, y, []), CPU), TensorSource(SplitInputs(x[:6], y[:6], []), CPU)
    head = new_head(4, 3, seed=1)
    cfg = TrainConfig(lr=0.5, epochs=3, patience=10, batch_size=12, optimizer="sgd", momentum=0.0,
                      lr_schedule="cosine", warmup_epochs=1)
    weights = [head.weight.detach().clone()]
    fit(head, head, head, train, val, cfg, on_epoch=lambda r: weights.append(head.weight.detach().clone()) if r["epoch"] else None)
    # Reproduce the whole trajectory by hand, weight and bias together.
    w, b = new_head(4, 3, seed=1).weight.detach().clone(), new_head(4, 3, seed=1).bias.detach().clone()
    for step in range(3):
        w.requires_grad_(True)
        b.requires_grad_(True)
        loss = F.cross_entropy(x @ w.t() + b, y)
        gw, gb = torch.autograd.grad(loss, [w, b])
        lr = 0.5 * lr_factor(cfg, step, 1)
        w, b = (w - lr * gw).detach(), (b - lr * gb).detach()
        assert torch.allclose(weights[step + 1], w, atol=1e-6), step
    assert [lr_factor(cfg, s, 1) for s in range(3)] == pytest.approx([1.0, 1.0, 0.5])


def test_backbone_lr_mult_scales_only_the_backbone(tiny_folder, resnet10_random):
    session = session_of(resnet10_random, tiny_folder)
    conv = "features.stage4.unit1.body.conv2.conv.weight"
    pristine = session.model.state_dict()[conv].clone()

    def after_one_epoch(mult):
        seen = {}

        def snap(record):
            if record["epoch"] == 1:
                state = session.model.state_dict()
                seen.update(conv=state[conv].clone(), head=state["output.weight"].clone())

        session.run(TrainConfig(lr=1e-2, epochs=1, batch_size=8, backbone_lr_mult=mult), 3, on_epoch=snap)
        return seen

    frozen_backbone = after_one_epoch(0.0)
    assert torch.equal(frozen_backbone["conv"], pristine)  # lr 0 for the backbone: it stays pretrained
    assert not torch.equal(frozen_backbone["head"], new_head(512, 3, seed=0).weight)  # the head trained
    moved = after_one_epoch(0.1)
    assert not torch.equal(moved["conv"], pristine)
    # Adam's first steps move each weight by about lr: the backbone's by about lr * mult.
    full = after_one_epoch(1.0)
    step_ratio = (moved["conv"] - pristine).abs().max() / (full["conv"] - pristine).abs().max()
    assert 0.05 < step_ratio < 0.2


def test_select_chooses_the_epoch_by_val_err_then_val_xent():
    g = torch.Generator().manual_seed(0)
    train = TensorSource(SplitInputs(torch.randn(40, 30, generator=g), torch.randint(0, 3, (40,), generator=g), []), CPU)
    val = TensorSource(SplitInputs(torch.randn(30, 30, generator=g), torch.randint(0, 3, (30,), generator=g), []), CPU)
    for select in ("val_xent", "val_err"):
        head = new_head(30, 3, seed=0)
        result = fit(head, head, head, train, val, TrainConfig(lr=0.05, epochs=30, patience=30, batch_size=8, select=select))
        keys = [selection_key(select, h["val_xent"], h["val_err"]) for h in result.history]
        assert result.best_epoch == keys.index(min(keys)), select
    assert selection_key("val_err", 0.5, 0.1) == (0.1, 0.5) and selection_key("val_xent", 0.5, 0.1) == (0.5, 0.1)


def test_wise_alpha_0_is_exactly_the_probe_and_1_exactly_the_fine_tuned_run(tiny_folder, resnet10_random):
    session = session_of(resnet10_random, tiny_folder, share_cut_layers=3)
    probe = session.run(TrainConfig(lr=1e-2, epochs=5, batch_size=8), 1)
    alphas = (0.0, 0.5, 1.0)
    ft = session.run(TrainConfig(lr=1e-3, epochs=3, patience=5, batch_size=8, wise_alphas=alphas), 3, start_state=probe.best_state)
    trained = session.run(TrainConfig(lr=1e-3, epochs=3, patience=5, batch_size=8, wise_alphas=(1.0,)), 3, start_state=probe.best_state)
    assert [r["alpha"] for r in ft.wise] == list(alphas) and ft.history == trained.history
    # Early stopping picks among trained epochs (a = 0 stands for the start): the best epoch >= 1.
    keys = [selection_key("val_xent", h["val_xent"], h["val_err"]) for h in ft.history]
    assert ft.best_epoch >= 1 and ft.best_epoch == 1 + keys[1:].index(min(keys[1:]))
    by = {r["alpha"]: r for r in ft.wise}
    # a = 0: the probe itself (FT epoch 0 is the probe on validation); a = 1: the best fine-tuned epoch.
    assert (by[0.0]["val_xent"], by[0.0]["val_err"]) == (ft.history[0]["val_xent"], ft.history[0]["val_err"])
    assert by[0.0]["val_xent"] == pytest.approx(probe.best["val_xent"], abs=1e-5)
    assert (by[1.0]["val_xent"], by[1.0]["val_err"]) == (ft.best["val_xent"], ft.best["val_err"])
    # The returned state is the interpolation chosen on validation, and the model holds it.
    chosen = min(ft.wise, key=lambda r: selection_key("val_xent", r["val_xent"], r["val_err"]))
    assert ft.wise_alpha == chosen["alpha"] and ft.val_metrics == (chosen["val_xent"], chosen["val_err"])
    session.load_trained(3, ft.best_state)
    assert evaluate(session.inputs.net(3), session.inputs.setup(3).sources["val"]) == pytest.approx(ft.val_metrics, abs=1e-6)
    # Interpolated tensors: exactly the start at 0 and exactly the trained at 1, the mean at 1/2.
    start = {k: probe.best_state.get(k, session.pristine[k]) for k in trained.best_state}
    for alpha, expected in ((0.0, start), (1.0, trained.best_state)):
        got = interpolate_states(start, trained.best_state, alpha)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    half = interpolate_states(start, trained.best_state, 0.5)
    w = "output.weight"
    assert torch.allclose(half[w], (start[w] + trained.best_state[w]) / 2, atol=1e-7)


def test_views_path_equals_the_uncached_augmented_path_for_one_view(tiny_folder, resnet10_random):
    """views:1 shows every epoch pass 0's views; the uncached --augment path shows pass 0 only in epoch 1."""
    cfg_views = TrainConfig(lr=1e-3, epochs=1, batch_size=8, seed=3, feature_augment="views:1")
    cached = session_of(resnet10_random, tiny_folder).run(cfg_views, 3)
    engine = EngineConfig(device="cpu", progress=False, num_workers=0, use_cache=False)
    uncached = RunSession(CutInputs(copy.deepcopy(resnet10_random), load_splits(tiny_folder), engine, None)).run(
        TrainConfig(lr=1e-3, epochs=1, batch_size=8, seed=3, augment=True), 3)
    for a, b in zip(cached.history, uncached.history):
        for key in ("train_loss", "train_xent", "val_xent", "val_err"):
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert view_seed(3, 0) == 3 * 100_003


def test_sweep_fine_tuning_flags_are_checked_by_their_own_names(tiny_folder, tmp_path, capsys):
    from transferlab.cli.main import main

    base = ["sweep", "--data", str(tiny_folder), "--out", str(tmp_path / "o"), "--lpft", "--device", "cpu", "--no-progress"]
    for flags, expected in [(["--ft-wise", "1.5"], "--ft-wise 1.5: every a must be in [0, 1]"),
                            (["--ft-l2sp", "-1"], "--ft-l2sp -1.0: must be zero or positive"),
                            (["--ft-epochs", "2", "--ft-warmup-epochs", "5"], "--ft-warmup-epochs 5: must be in [0, epochs = 2]"),
                            (["--ft-patience", "0"], "--ft-patience 0: must be at least 1"),
                            (["--ft-augment", "views:0"], "--ft-augment views:0: expected none, map or views:K"),
                            (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
                            (["--ft-layers", "0"], "--ft-layers 0: must be at least 1")]:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (flags, err)
    # map needs spatial maps at the fine-tuning cut: refused before any run trains, naming the flag.
    assert main(base + ["--ft-layers", "1", "--ft-augment", "map", "--lr", "1e-2", "--l2", "0", "--seeds", "0"]) == 2
    assert "--ft-augment map: needs cached spatial maps" in capsys.readouterr().err
    # map needs the cached path: refused before anything is written, saying how to do without it.
    uncached = [tmp_path / "o2" if a == str(tmp_path / "o") else a for a in base]
    assert main([*map(str, uncached), "--no-cache", "--ft-augment", "none,map", "--lr", "1e-2", "--l2", "0",
                 "--seeds", "0", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ft-augment map: needs the cached path" in err[0] and "--ft-augment none" in err[0], err
    assert not (tmp_path / "o2" / "sweep.json").exists()
    assert not (tmp_path / "o" / "runs").exists()


def test_ft_wise_1_alone_means_no_interpolation(tiny_folder, resnet10_random):
    session = session_of(resnet10_random, tiny_folder)
    probe = session.run(TrainConfig(lr=1e-2, epochs=3, batch_size=8), 1)
    cfg = TrainConfig(lr=1.0, epochs=2, patience=5, batch_size=8)  # a step so large that epoch 0 stays best
    alone = session.run(dataclasses.replace(cfg, wise_alphas=(1.0,)), 3, start_state=probe.best_state)
    plain = session.run(cfg, 3, start_state=probe.best_state)
    assert alone.wise_alpha is None and alone.best_epoch == plain.best_epoch and alone.history == plain.history
