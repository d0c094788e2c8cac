"""Three methods in one sweep (Kumar et al. 2022's comparison): LP, FT from the pretrained backbone with a
fresh head, and LP-FT from the chosen probe; each chosen on validation and tested once."""

from __future__ import annotations

import json

import pytest

from conftest import write_image_folder
from transferlab.cli.main import main
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import read_manifest
from transferlab.train.config import TrainConfig

GRID = ["--backbones", "efficientnet_lite0", "--lr", "1e-2", "--l2", "0", "--seeds", "0,1", "--epochs", "4", "--patience", "2",
        "--ft-epochs", "3", "--ft-patience", "2", "--ft-lr", "1e-4", "--ft-layers", "3", "--ft-wise", "0,1",
        "--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.mark.slow
def test_lp_ft_and_lpft_are_each_chosen_and_tested_once(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(out), *GRID, "--lpft", "--ft"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["LP", "FT", "LP-FT"]
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    assert {m: ledger.test_evaluations("efficientnet_lite0", m) for m in ("LP", "FT", "LP-FT")} == {"LP": 1, "FT": 1, "LP-FT": 1}
    lp, ft, lpft = (ledger.run(ledger.choice("efficientnet_lite0", m)) for m in ("LP", "FT", "LP-FT"))
    # FT starts where a probe of the same seed starts: the pretrained backbone and a fresh head of that seed,
    # so its epoch 0 is that probe's epoch 0 (computed through the fine-tuned suffix instead of cached features);
    # LP-FT starts from the chosen probe: its epoch 0 is the probe's best epoch.
    ft_cfg = TrainConfig.from_dict(ft["config"])
    probe_same_seed = next(r for r in ledger.runs("efficientnet_lite0", "LP") if r["config"]["seed"] == ft_cfg.seed)
    assert ft["history"][0]["val_xent"] == pytest.approx(probe_same_seed["history"][0]["val_xent"], abs=1e-4)
    assert lpft["history"][0]["val_xent"] == pytest.approx(lp["history"][lp["metrics"]["best_epoch"]]["val_xent"], abs=1e-4)
    # no start to interpolate with: FT is never interpolated; LP-FT tried a = 0 and 1
    assert ft["metrics"]["wise_alpha"] is None and [w["alpha"] for w in lpft["metrics"]["wise"]] == [0.0, 1.0]
    assert (ft_cfg.epochs, ft_cfg.lr, ft_cfg.wise_alphas, ft["metrics"]["n_trainable_layers"]) == (3, 1e-4, (), 3)
    ledger.close()
    # FT's row is compared with LP on the same test images, like LP-FT's
    assert rows[1]["diff_vs_lp"] == pytest.approx(rows[1]["test_acc"] - rows[0]["test_acc"], abs=1e-12)
    model = tmp_path / "model"
    assert main(["export", str(out), "--out", str(model), "--method", "FT"]) == 0
    provenance = json.loads((model / "config.json").read_text())["provenance"]
    assert provenance["method"] == "FT" and provenance["train"]["wise_alphas"] == [] and provenance["backbone_weights_verified"]


@pytest.mark.slow
def test_ood_sets_are_read_once_per_chosen_model_after_every_choice(tiny_folder, tmp_path, monkeypatch):
    import transferlab.sweep.phase as phase
    from transferlab.train.session import RunSession

    shift = write_image_folder(tmp_path / "ood", {"shift": {c: 4 for c in ("a", "b", "c")}}, seed=7) / "shift"
    plain, with_ood = tmp_path / "plain", tmp_path / "with_ood"
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(plain), *GRID, "--lpft"]) == 0
    events: list[str] = []  # every choice and every read of a split, in order
    real_choose, real_evaluate = phase.choose_and_test, RunSession.evaluate_split
    monkeypatch.setattr(phase, "choose_and_test", lambda *a, **k: (events.append("choose"), real_choose(*a, **k))[1])
    monkeypatch.setattr(RunSession, "evaluate_split", lambda self, k, split: (events.append(split.name), real_evaluate(self, k, split))[1])
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(with_ood), *GRID, "--lpft", "--ood", f"shift={shift}"]) == 0
    assert events.count("ood_shift") == 2 and max(i for i, e in enumerate(events) if e == "choose") < events.index("ood_shift")
    a, b = (json.loads((o / "summary.json").read_text()) for o in (plain, with_ood))
    # no choice read the OOD set: the same runs are chosen with the same numbers, and only columns are added
    assert [{k: r[k] for k in r} for r in a] == [{k: r[k] for k in a[0]} for r in b]
    assert [k for k in b[0] if k not in a[0]] == [f"ood_shift_{s}" for s in
                                                    ("acc", "ci_low", "ci_high", "diff_vs_lp", "ci_low_vs_lp", "ci_high_vs_lp", "p_vs_lp")]
    ledger = Ledger(with_ood / "ledger.sqlite", readonly=True)
    digest = read_manifest(ledger).ood["shift"]["digest"]
    for row in b:
        h = ledger.choice("efficientnet_lite0", row["method"])
        stored = json.loads((with_ood / "predictions" / "ood_shift" / digest / f"{h}.json").read_text())
        correct = sum(int(max(range(3), key=lambda c: p[c]) == y) for p, y in zip(stored["probs"], stored["labels"]))
        assert len(stored["labels"]) == 12 and row["ood_shift_acc"] == pytest.approx(correct / 12)
        assert row["ood_shift_ci_low"] <= row["ood_shift_acc"] <= row["ood_shift_ci_high"]
    assert b[0]["ood_shift_diff_vs_lp"] is None
    assert b[1]["ood_shift_diff_vs_lp"] == pytest.approx(b[1]["ood_shift_acc"] - b[0]["ood_shift_acc"], abs=1e-12)
    count = ledger.db.execute("SELECT COUNT(*) FROM ood_evaluations").fetchone()[0]
    ledger.close()
    assert count == 2
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(with_ood), *GRID, "--lpft", "--ood", f"shift={shift}"]) == 0
    ledger = Ledger(with_ood / "ledger.sqlite", readonly=True)
    assert ledger.db.execute("SELECT COUNT(*) FROM ood_evaluations").fetchone()[0] == 2  # a re-run reads it no more
    ledger.close()
    assert "In distribution vs out of distribution" in (with_ood / "report.html").read_text()


def test_an_ood_set_must_have_the_training_classes(tiny_folder, tmp_path, capsys):
    odd = write_image_folder(tmp_path / "ood", {"shift": {"a": 2, "b": 2, "z": 2}}) / "shift"
    code = main(["sweep", "--data", str(tiny_folder), "--out", str(tmp_path / "o"), *GRID, "--ood", f"shift={odd}"])
    assert code == 2 and not (tmp_path / "o" / "ledger.sqlite").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"transferlab: error: --ood shift={odd}: its classes are not the training classes (only in the training data: c; "
        f"only in {odd}: z)")


def test_ood_input_is_checked_before_anything_is_written(tiny_folder, tmp_path, capsys):
    good = write_image_folder(tmp_path / "ood", {"shift": {c: 2 for c in ("a", "b", "c")}}) / "shift"
    (good / "a" / "broken.png").write_bytes(b"not an image")
    for argv, message in [
        (["--ood", f"shift={good}"], f"--ood shift={good}: 1 image(s) in split 'ood_shift' cannot be decoded: {good / 'a' / 'broken.png'} ("),
        (["--ood", "shift="], "--ood shift=: expected NAME=VALUE"),
        (["--ood", f"s={good}", "--ood", f"s={good}"], "--ood s=...: given more than once"),
        (["--ood", f"Bad={good}"], f"--ood Bad={good}: the name must be lower-case"),
    ]:
        assert main(["sweep", "--data", str(tiny_folder), "--out", str(tmp_path / "o"), *GRID, *argv]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ft_trains_the_fine_tuning_grids_seeds_and_yaml_can_switch_it_on(tmp_path):
    from transferlab.cli.sweep import build_configs, load_yaml

    path = tmp_path / "g.yaml"
    path.write_text("ft: true\nseeds: [3, 4]\nft_lr: [1e-4]\n")
    cfg = build_configs(load_yaml(str(path)))[0]
    assert cfg.plain_ft and [c.seed for c in cfg.plain_ft_configs()] == [0]  # the fine-tuning rule's one seed
    path.write_text("ft:\n  lr: [1e-4]\n  seed: [7]\nft_plain: false\n".replace("ft_plain: false\n", ""))
    cfg = build_configs(load_yaml(str(path)))[0]
    assert not cfg.plain_ft and [c.seed for c in cfg.plain_ft_configs()] == [7]
