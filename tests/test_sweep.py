import json

import pytest

from transferlab.cli.main import main
from transferlab.reporting.report import SUMMARY_KEYS
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import read_backbone, read_manifest
from transferlab.train.session import RunSession

NAME = "efficientnet_lite0"
GRID = ["--backbones", NAME, "--lr", "1e-3,3e-2", "--l2", "0,1", "--seeds", "0,1",
        "--epochs", "6", "--patience", "3", "--ft-epochs", "6", "--ft-patience", "3", "--lpft", "--ft-lr", "1e-4,1e-3", "--ft-layers", "3",
        "--device", "cpu", "--workers", "0", "--no-progress"]


def sweep(data, out, *extra):
    return main(["sweep", "--data", str(data), "--out", str(out), *GRID, *extra])


def count_test_evaluations(out):
    """{(backbone, method): number of test-split evaluations} as the ledger counts them."""
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        return {(b, m): ledger.test_evaluations(b, m) for b in ("efficientnet_lite0",) for m in ("LP", "LP-FT")}
    finally:
        ledger.close()


def test_sweep_chooses_on_validation_and_tests_only_the_chosen(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    assert sweep(tiny_folder, out) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["backbone"], r["method"]) for r in rows] == [("efficientnet_lite0", "LP"), ("efficientnet_lite0", "LP-FT")]
    assert all(tuple(r) == SUMMARY_KEYS for r in rows)
    assert rows[0]["n_trainable_layers"] == 1 and rows[1]["n_trainable_layers"] == 3
    assert rows[0]["source"] == "imagenet1k" and rows[0]["source_top1"] == 75.1
    # The paired comparison on the same test images: its difference is the two test accuracies' difference.
    assert rows[0]["diff_vs_lp"] is None and 0.0 <= rows[1]["p_mcnemar"] <= 1.0
    assert rows[1]["diff_vs_lp"] == pytest.approx(rows[1]["test_acc"] - rows[0]["test_acc"], abs=1e-12)
    assert rows[1]["ci_low"] <= rows[1]["diff_vs_lp"] <= rows[1]["ci_high"]
    assert rows[0]["n_seeds"] == 2 and rows[0]["val_err_seed_std"] is not None
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    lp = [r for r in ledger.runs("efficientnet_lite0", "LP")]
    ft = [r for r in ledger.runs("efficientnet_lite0", "LP-FT")]
    assert len(lp) == 8 and len(ft) == 2
    # The chosen probe has the lowest validation cross-entropy; only chosen runs have a test accuracy.
    chosen_lp = min((r for r in lp if r["status"] == "done"), key=lambda r: (r["metrics"]["val_xent"], r["metrics"]["val_err"]))
    assert ledger.choice("efficientnet_lite0", "LP") == chosen_lp["hash"]
    tested = {r["hash"] for r in lp + ft if r["test_acc"] is not None}
    assert tested == {ledger.choice("efficientnet_lite0", "LP"), ledger.choice("efficientnet_lite0", "LP-FT")}
    assert count_test_evaluations(out) == {("efficientnet_lite0", "LP"): 1, ("efficientnet_lite0", "LP-FT"): 1}
    # LP-FT starts exactly from the restored best probe.
    for run in ft:
        assert run["history"][0]["val_xent"] == pytest.approx(chosen_lp["metrics"]["val_xent"], abs=1e-5)
        assert run["history"][0]["val_err"] == pytest.approx(chosen_lp["metrics"]["val_err"], abs=1e-9)
        assert run["config"]["l2"] == chosen_lp["config"]["l2"] and run["config"]["seed"] == chosen_lp["config"]["seed"]
    for name in ("report.html", "summary.csv", "figures/transfer.png", "figures/curves_efficientnet_lite0.png",
                 "figures/grid_efficientnet_lite0.png", "figures/lpft_efficientnet_lite0.png"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    # 4 figures, plus a confusion matrix and a reliability diagram per per-class section: one for each of the
    # 2 chosen runs, or one shared when they predict the same class for every test image.
    from transferlab.core.predictions import read_test_predictions, sweep_predictions_path

    chosen = [ledger.choice("efficientnet_lite0", m) for m in ("LP", "LP-FT")]
    lp_pred, ft_pred = (read_test_predictions(sweep_predictions_path(out, h))["probs"].argmax(1) for h in chosen)
    sections = 1 if (lp_pred == ft_pred).all() else 2
    assert html.count("data:image/png;base64,") == 4 + 2 * sections
    assert "(l2 / n_train) * sum(W_head ** 2)" in html and "transferlab sweep --data" in html
    # The paired test of LP-FT against LP is stated, or, with no discordant image, that there is nothing to test.
    same = rows[1]["ci_low"] == rows[1]["ci_high"] == 0
    assert ("right and wrong on exactly the same images" if same else "McNemar p = ") in html


def _run_rows(out):
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    try:
        return {r["hash"]: (r["status"], r["updated"], r["test_acc"]) for r in ledger.runs()}
    finally:
        ledger.close()


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_report_rebuilds(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    assert sweep(tiny_folder, out) == 0
    first, rows = (out / "summary.json").read_bytes(), _run_rows(out)
    assert sweep(tiny_folder, out) == 0
    assert _run_rows(out) == rows  # no run was started again: every row is untouched
    assert (out / "summary.json").read_bytes() == first
    assert count_test_evaluations(out) == {("efficientnet_lite0", "LP"): 1, ("efficientnet_lite0", "LP-FT"): 1}
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists() and (out / "summary.json").read_bytes() == first


def test_interrupted_sweep_resumes_to_the_same_summary(tiny_folder, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert sweep(tiny_folder, full) == 0
    out = tmp_path / "interrupted"
    original = RunSession.run
    state = {"n": 0}

    def interrupt_second_ft(self, *args, **kwargs):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunSession, "run", interrupt_second_ft)
    assert sweep(tiny_folder, out) == 130
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    statuses = sorted(r["status"] for r in ledger.runs())
    assert statuses.count("running") == 1 and statuses.count("done") == 9
    assert ledger.integrity() == "ok"
    # what export checks each run hash with is stored as the hash is made, not when the backbone is done
    full_ledger = Ledger(full / "ledger.sqlite", readonly=True)
    assert read_backbone(ledger, NAME).numerics == read_backbone(full_ledger, NAME).numerics != {}
    full_ledger.close()
    ledger.close()
    monkeypatch.setattr(RunSession, "run", original)
    assert sweep(tiny_folder, out) == 0
    assert (out / "summary.json").read_bytes() == (full / "summary.json").read_bytes()


def test_a_different_sweep_in_the_same_folder_is_refused(tiny_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(out), "--lr", "1e-3", "--l2", "0", "--seeds", "0",
                 "--epochs", "2", "--no-progress", "--workers", "0"]) == 0
    code = main(["sweep", "--data", str(tiny_folder), "--out", str(out), "--valid-frac", "0.3", "--val-split", "none",
                 "--lr", "1e-3", "--l2", "0", "--seeds", "0", "--epochs", "2", "--no-progress"])
    assert code == 2 and "different sweep" in capsys.readouterr().err


def test_yaml_config_with_flags_overriding(tiny_folder, tmp_path):
    from transferlab.cli.main import build_parser
    from transferlab.cli.sweep import build_configs, resolve

    yml = tmp_path / "study.yaml"
    yml.write_text(f"data: {tiny_folder}\nout: {tmp_path / 'o'}\nlr: [0.001, 0.01]\nl2: 0,1\nseeds: [3]\nlpft: true\nft-layers: 2\n")
    args = build_parser().parse_args(["sweep", "--config", str(yml), "--lr", "0.5"])
    args.argv = []
    cfg, _executor = build_configs(resolve(args))
    assert cfg.lp.get("lr") == (0.5,) and cfg.lp.get("l2") == (0.0, 1.0) and cfg.lp.get("seed") == (3,)
    assert cfg.lpft and cfg.ft.get("layers") == (2,)
    yml.write_text("data: x\nout: y\nlearning_rate: 3\n")
    args = build_parser().parse_args(["sweep", "--config", str(yml)])
    args.argv = []
    from transferlab.core.errors import UserError

    with pytest.raises(UserError, match="unknown key.*learning_rate"):
        resolve(args)


def test_lpft_extracts_once_and_derives_probe_features(tiny_folder, tmp_path):
    """With --lpft the backbone runs once per image (at the FT cut), and once per augmented view of a
    training image; probe features are derived from the plain pass."""
    shared, plain = tmp_path / "shared", tmp_path / "plain"
    assert sweep(tiny_folder, shared, "--ft-augment", "none,views:2") == 0
    no_ft = [a for a in GRID if a not in ("--lpft",)]
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(plain), *no_ft]) == 0
    # One file per split at the FT cut, plus one per view of train: fine-tuning starts from the one chosen
    # probe, whose seed seeds the views, so 2 views (shared by the none and views:2 runs' plain pass).
    cached = sorted(p.name.split("-")[0] for p in (shared / "cache").iterdir() if (p / "manifest.json").is_file())
    assert cached == ["test"] + ["train"] * (1 + 2) + ["val"]
    assert len(list((shared / "cache" / "onnx").glob("*.onnx"))) == 1  # one frozen prefix exported: the FT cut's
    lp_shared = json.loads((shared / "summary.json").read_text())[0]
    lp_plain = json.loads((plain / "summary.json").read_text())[0]
    keys = ("lr", "l2", "seed", "best_epoch")
    assert [lp_shared[k] for k in keys] == [lp_plain[k] for k in keys]
    assert lp_shared["val_xent"] == pytest.approx(lp_plain["val_xent"], abs=1e-5)
    assert lp_shared["test_acc"] == lp_plain["test_acc"]


def test_ft_blocks_train_whole_blocks_and_the_layer_order_is_recorded(tiny_folder, tmp_path):
    out = tmp_path / "blocks"
    at = GRID.index("--ft-layers")
    grid = GRID[:at] + GRID[at + 2 :]
    assert main(["sweep", "--data", str(tiny_folder), "--out", str(out), *grid, "--ft-blocks", "4", "--ft-lr", "1e-4"]) == 0
    ft = json.loads((out / "summary.json").read_text())[1]
    # efficientnet_lite0's last 4 blocks with parameters: blocks.6.0 (6 layers), conv_head, bn2, classifier.
    assert ft["method"] == "LP-FT" and ft["n_trainable_layers"] == 9
    ledger = Ledger(out / "ledger.sqlite", readonly=True)
    assert {r["config"]["layer_order"] for r in ledger.runs()} == {"forward"}
    assert read_manifest(ledger).phase("ft")["blocks"] == [4]
