"""The sweep's grid as a mapping over TrainConfig fields per phase: flags and YAML fill it, one validator
checks every run, and its errors name the phase's flag."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from transferlab.cli.main import main
from transferlab.cli.sweep import PHASE_FLAGS, build_configs, load_yaml
from transferlab.core.errors import ConfigError, UserError
from transferlab.data import DataConfig
from transferlab.sweep.config import SWEEP_WIDE, UNIT_FIELDS, PhaseGrid, SweepConfig, phase_flag
from transferlab.train.config import TrainConfig


def configs(*argv: str) -> SweepConfig:
    from transferlab.cli.main import build_parser

    args = build_parser().parse_args(["sweep", "--data", "d", "--out", "o", *argv])
    values = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "force", "config", "argv")}
    return build_configs(values)[0]


def test_every_training_field_is_a_flag_and_a_yaml_key_of_both_phases(tmp_path):
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for phase in ("lp", "ft"):
        wide = set(SWEEP_WIDE) if phase == "ft" else set()  # one value for the whole sweep: the probes' flag
        assert set(names) - wide == {k.split(".", 1)[1] for k in PHASE_FLAGS if k.startswith(phase + ".")} - set(UNIT_FIELDS)
    yaml_file = tmp_path / "g.yaml"
    yaml_file.write_text("lp:\n" + "".join(f"  {n}: {v!r}\n" for n, v in [("lr", [0.1]), ("batch_size", [8, 16])])
                         + "ft:\n  lr: [0.001]\n  blocks: [2]\n  batch_size: [4]\n")
    values = load_yaml(str(yaml_file))
    assert values == {"lr": [0.1], "batch_size": [8, 16], "ft_lr": [0.001], "ft_blocks": [2], "ft_batch_size": [4]}


def test_the_default_grids_nest_seed_lr_l2_and_lr_augment_l2sp_smoothing():
    cfg = SweepConfig(DataConfig("d"), lpft=True)
    expected = [(s, lr, l2) for s in (0, 1) for lr in (1e-4, 1e-3, 1e-2) for l2 in (0.0, 1e-2, 1.0)]
    assert [(c.seed, c.lr, c.l2) for c in cfg.probe_configs()] == expected
    probe = TrainConfig(lr=1e-2, l2=1.0, seed=1, batch_size=32)
    ft = cfg.for_training_size(1000).finetune_configs(probe)
    assert [c.lr for c in ft] == [1e-3, 3e-3]  # the fine-tuning rule's (sweep/hyper_rule.py)
    # fixed fine-tuning values override the probe's; what the phase does not set is inherited from it
    assert {(c.epochs, c.patience, c.lr_schedule, c.warmup_epochs, c.backbone_lr_mult, c.wise_alphas) for c in ft} == {
        (8, 5, "cosine", 1, 0.1, (0.0, 0.25, 0.5, 0.75, 1.0))}  # 8 = round(8000 / 1000) epochs
    assert {(c.optimizer, c.weight_decay, c.feature_augment, c.batch_size, c.seed) for c in ft} == {("adamw", 0.05, "views:4", 32, 0)}
    assert {(c.l2, c.label_smoothing) for c in ft} == {(1.0, 0.0)}  # the probe's l2
    assert cfg.ft_units() == [("blocks", "all")]


def test_flags_fill_the_phase_mappings_and_any_field_can_be_an_axis():
    cfg = configs("--lr", "0.1,0.01", "--batch-size", "8,16", "--lpft", "--ft-lr", "1e-4", "--ft-momentum", "0.5,0.9",
                  "--ft-blocks", "2", "--ft-layers", "3", "--ft-train-bn", "--ft-wise", "0,1")
    assert cfg.lp.get("lr") == (0.1, 0.01) and cfg.lp.get("batch_size") == (8, 16)
    assert len(cfg.probe_configs()) == 2 * 2 * 2 * 3  # lr x batch size x seeds x l2
    ft = cfg.finetune_configs(TrainConfig())
    assert [c.momentum for c in ft] == [0.5, 0.9] and {c.train_bn for c in ft} == {True}
    assert {c.wise_alphas for c in ft} == {(0.0, 1.0)}
    assert cfg.ft_units() == [("blocks", 2), ("layers", 3)]
    product = list(itertools.product((0, 1), (0.1, 0.01), (0.0, 1e-2, 1.0), (8, 16)))
    assert [(c.seed, c.lr, c.l2, c.batch_size) for c in cfg.probe_configs()] == product


@pytest.mark.parametrize(("argv", "expected"), [
    (["--lpft", "--ft-lr", "-1"], "--ft-lr -1.0: must be a positive number"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--lpft", "--ft-warmup-epochs", "20"], "--ft-warmup-epochs 20: must be in [0, epochs = 15]"),
    (["--lpft", "--ft-momentum", "0.5", "--ft-optimizer", "rmsprop"], "--ft-optimizer rmsprop: expected one of adam, adamw, sgd"),
    (["--lpft", "--ft-l2sp", "-1"], "--ft-l2sp -1.0: must be zero or positive"),
    (["--lpft", "--ft-blocks", "0"], "--ft-blocks 0: must be at least 1"),
    (["--select", "val_err,val_xent"], "--select val_err,val_xent: takes one value for the whole sweep"),
])
def test_one_validator_whose_errors_name_the_phase_flag(tmp_path, capsys, argv, expected):
    code = main(["sweep", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"transferlab: error: {expected}"


def test_fields_of_the_whole_sweep_are_set_once_for_the_probes():
    cfg = SweepConfig(DataConfig("d"), lpft=True, ft=PhaseGrid.of("ft", {"select": ("val_err",)}))
    with pytest.raises(ConfigError, match=r"ft.select=val_err: is the probes' \(--select\), one value for the whole sweep"):
        cfg.validate()


def test_a_phase_grid_refuses_names_that_are_not_training_fields():
    with pytest.raises(ConfigError, match="lp=blocks: not a training field"):
        PhaseGrid.of("lp", {"blocks": (2,)})
    with pytest.raises(ConfigError, match="ft=lrs: not a training field"):
        PhaseGrid.of("ft", {"lrs": (1e-3,)})


def test_phase_flags_keep_the_earlier_names():
    assert [phase_flag("lp", n) for n in ("lr", "l2", "seed", "epochs")] == ["--lr", "--l2", "--seeds", "--epochs"]
    assert [phase_flag("ft", n) for n in ("lr", "feature_augment", "wise_alphas", "label_smoothing", "backbone_lr_mult")] == [
        "--ft-lr", "--ft-augment", "--ft-wise", "--label-smoothing", "--ft-backbone-lr-mult"]


def test_the_python_api_takes_one_value_or_a_list_and_checks_types():
    grid = PhaseGrid.of("ft", {"wise_alphas": (0, 0.5, 1), "epochs": 5, "lr": [1e-4, 1e-3]})
    assert grid.get("wise_alphas") == ((0.0, 0.5, 1.0),) and grid.get("epochs") == (5,) and grid.get("lr") == (1e-4, 1e-3)
    assert PhaseGrid.of("ft", {"wise_alphas": [[0, 1], [0.5]]}).get("wise_alphas") == ((0.0, 1.0), (0.5,))
    with pytest.raises(ConfigError, match="ft.epochs=ten: expected int"):
        PhaseGrid.of("ft", {"epochs": "ten"})


def test_an_empty_interpolation_list_is_refused(tmp_path, capsys):
    code = main(["sweep", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--lpft", "--ft-wise", ""])
    assert code == 2 and capsys.readouterr().err.strip().endswith("--ft-wise : needs at least one value")


def test_yaml_boolean_axes_collisions_and_sweep_wide_fields(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("ft:\n  train_bn: [false, true]\n")
    cfg = build_configs(load_yaml(str(path)))[0]
    assert [c.train_bn for c in cfg.finetune_configs(TrainConfig())] == [False, True, False, True]  # lr, then train_bn
    path.write_text("lr: [0.1]\nlp:\n  lr: [0.2]\n")
    with pytest.raises(UserError, match="lp.lr and lr both give --lr: keep one"):
        load_yaml(str(path))
    path.write_text("ft:\n  select: [val_err]\n")
    with pytest.raises(UserError, match="ft.select holds for the whole sweep: set it once, as lp.select"):
        load_yaml(str(path))


def test_probe_names_the_sweep_options_it_does_not_take(tmp_path):
    import transferlab

    for name, flag in [("lrs", "--lr"), ("ft_blocks", "--ft-blocks"), ("seeds", "--seeds"), ("kind", "--executor")]:
        with pytest.raises(ConfigError, match=f"is a sweep option \\(transferlab sweep {flag}\\), not a probe field"):
            transferlab.probe(tmp_path, tmp_path / "out", **{name: 1})


def test_a_sweeps_yaml_may_say_where_its_runs_are_tracked(tmp_path):
    from transferlab.cli.main import _track_config
    from transferlab.track import TrackConfig

    path = tmp_path / "g.yaml"
    path.write_text("track: mlflow\ntrack_uri: http://127.0.0.1:5000\n")
    assert _track_config(load_yaml(str(path))) == TrackConfig(track="mlflow", track_uri="http://127.0.0.1:5000")
    assert _track_config({}) == TrackConfig()
