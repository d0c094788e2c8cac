"""Three methods in one sweep (Kumar et al. 2022's comparison): LP, FT from the pretrained backbone with a
fresh head, and LP-FT from the chosen probe; each chosen on validation and tested once."""

from __future__ import annotations

import json

import pytest

from transferlab.cli.main import main
from transferlab.sweep.ledger import Ledger
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
