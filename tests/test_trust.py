"""Results that can be trusted a week later: sweeps follow the data, the test split is read once,
every run is checked and ends in a recorded state, one sweep owns its output folder."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import write_image_folder
from transferlab.cli.main import main
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.tasks import ProbeGroupTask

FAST = ["--backbones", "efficientnet_lite0", "--epochs", "4", "--patience", "4", "--ft-epochs", "4", "--ft-patience", "4",
        "--device", "cpu", "--workers", "0", "--no-progress"]


def sweep(data, out, *extra):
    return main(["sweep", "--data", str(data), "--out", str(out), *FAST, *extra])


def summary(out):
    return json.loads((out / "summary.json").read_text())


def ledger_of(out):
    return Ledger(out / "ledger.sqlite", readonly=True)


@pytest.fixture
def data(tmp_path):
    return write_image_folder(tmp_path / "data", {"train": {c: 6 for c in "abc"}, "val": {c: 3 for c in "abc"},
                                                   "test": {c: 3 for c in "abc"}})


def one_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("transferlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. a resumed sweep follows the images ---------------------------------------------------------
@pytest.mark.slow
def test_swapped_test_folders_are_refused_then_force_starts_over(data, tmp_path, capsys):
    out = tmp_path / "s"
    grid = ["--lr", "1e-2", "--l2", "0", "--seeds", "0"]
    assert sweep(data, out, *grid) == 0
    capsys.readouterr()
    a, b, tmp = data / "test" / "a", data / "test" / "b", data / "test" / "tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    assert sweep(data, out, *grid) == 2
    line = one_line(capsys)
    assert "images changed" in line and "in split test" in line and "--force" in line
    assert sweep(data, out, *grid, "--force") == 0
    # Starting over gives what a fresh folder gives on the new images, not the old test accuracy.
    assert sweep(data, tmp_path / "fresh", *grid) == 0
    assert summary(out) == summary(tmp_path / "fresh")


def test_describe_data_change_counts_each_kind():
    from transferlab.data import describe_data_change

    old = {"train": [["x", 1, 1, 0], ["y", 1, 1, 0]], "test": [["t", 5, 5, 1]]}
    new = {"train": [["x", 2, 1, 0], ["z", 1, 1, 0]], "test": [["t", 5, 5, 0]]}
    assert describe_data_change(old, new) == ("1 file added, 1 file removed, 1 file modified in split train; "
                                              "1 file relabelled in split test")
    assert describe_data_change(old, old) == ""


# -- 2. and 3. choices come from the current grid; finished runs are never redone or overwritten ----
def test_a_grid_that_only_diverges_shows_no_stale_winner(data, tmp_path):
    out = tmp_path / "s"
    assert sweep(data, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0") == 0
    assert [r["method"] for r in summary(out)] == ["LP"]
    assert sweep(data, out, "--lr", "1000", "--l2", "0", "--seeds", "0") == 0
    assert summary(out) == []
    ledger = ledger_of(out)
    assert ledger.choice("efficientnet_lite0", "LP") is None
    assert {r["status"] for r in ledger.runs()} == {"done", "diverged"}


@pytest.mark.slow
def test_extending_the_grid_trains_only_new_runs_and_tests_once_per_choice(data, tmp_path):
    out = tmp_path / "s"
    base = ["--lr", "1e-2", "--seeds", "0,1", "--lpft", "--ft-lr", "1e-4"]
    assert sweep(data, out, *base, "--l2", "0") == 0
    ledger = ledger_of(out)
    before = {r["hash"]: (r["updated"], r["test_acc"], r["history"]) for r in ledger.runs()}
    first_choices = {m: ledger.choice("efficientnet_lite0", m) for m in ("LP", "LP-FT")}
    ledger.close()
    for _ in range(2):  # grow, then resume the grown grid
        assert sweep(data, out, *base, "--l2", "0,1") == 0
    ledger = ledger_of(out)
    after = {r["hash"]: (r["updated"], r["test_acc"], r["history"]) for r in ledger.runs()}
    assert all(after[h] == before[h] for h in before)  # finished rows untouched, test accuracy kept
    assert len([r for r in ledger.runs(method="LP")]) == 4
    # The test split is read once per configuration ever chosen: once for the first grid's choice, once
    # more only if the grown grid chose another; the resume reads it no more.
    for method in ("LP", "LP-FT"):
        chosen_over_time = {first_choices[method], ledger.choice("efficientnet_lite0", method)}
        assert ledger.test_evaluations("efficientnet_lite0", method) == len(chosen_over_time)
    ledger.close()
    # Trained only what was missing, yet the numbers equal a fresh sweep of the whole grid.
    assert sweep(data, tmp_path / "fresh", *base, "--l2", "0,1") == 0
    assert summary(out) == summary(tmp_path / "fresh")


@pytest.mark.slow
def test_a_refused_rerun_keeps_the_choices_and_another_grid_never_shows_old_ones(data, tmp_path, capsys):
    out = tmp_path / "s"
    grid = ["--lr", "1e-2", "--l2", "0", "--seeds", "0"]
    assert sweep(data, out, *grid) == 0
    chosen = ledger_of(out).choice("efficientnet_lite0", "LP")
    assert chosen is not None
    assert sweep(data, out, *grid, "--jobs", "0") == 2  # refused before the ledger changes
    assert ledger_of(out).choice("efficientnet_lite0", "LP") == chosen


@pytest.mark.slow
def test_a_fixed_grid_tests_once_however_often_it_resumes(data, tmp_path):
    out = tmp_path / "s"
    grid = ["--lr", "1e-2,1e-3", "--l2", "0", "--seeds", "0", "--lpft", "--ft-lr", "1e-4"]
    for _ in range(3):
        assert sweep(data, out, *grid) == 0
    ledger = ledger_of(out)
    assert ledger.test_evaluations("efficientnet_lite0", "LP") == 1
    assert ledger.test_evaluations("efficientnet_lite0", "LP-FT") == 1


def test_batched_probe_numbers_do_not_depend_on_the_other_heads():
    from transferlab.core.devices import Placement
    from transferlab.features.sources import SplitInputs, TensorSource
    from transferlab.models.heads import new_head
    from transferlab.train.config import TrainConfig
    from transferlab.train.probes import fit_linear_probes

    g = torch.Generator().manual_seed(0)
    place = Placement(torch.device("cpu"))
    x, y = torch.randn(300, 1280, generator=g).abs(), torch.arange(300) % 20
    train = TensorSource(SplitInputs(x, y, []), place)
    val = TensorSource(SplitInputs(x[:80] + 0.1, y[:80], []), place)
    cfgs = [TrainConfig(lr=lr, l2=l2, seed=3, epochs=6) for lr in (1e-3, 1e-2) for l2 in (0.0, 1.0)]
    together = fit_linear_probes([new_head(1280, 20, 3) for _ in cfgs], train, val, cfgs)
    for cfg, ref in zip(cfgs, together):
        alone = fit_linear_probes([new_head(1280, 20, 3)], train, val, [cfg])[0]
        assert alone.history == ref.history
        assert all(torch.equal(alone.best_state[k], ref.best_state[k]) for k in ref.best_state)


# -- 4. the frozen-weights check runs in every run, wherever it executes ----------------------------
def _tamper_frozen_weight(model):
    for p in model.parameters():
        if not p.requires_grad:
            with torch.no_grad():
                p.add_(1.0)
            return


@pytest.mark.slow
def test_a_changed_frozen_weight_fails_the_run_in_process(data, tmp_path, monkeypatch):
    import transferlab.train.session as session

    real_fit = session.fit

    def tampering_fit(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        _tamper_frozen_weight(model)
        return result

    monkeypatch.setattr(session, "fit", tampering_fit)
    out = tmp_path / "s"
    # the last 2 blocks train: the rest is frozen (the whole network, the default, leaves nothing frozen to check)
    assert sweep(data, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0", "--lpft", "--ft-lr", "1e-4", "--ft-blocks", "2") == 0
    ledger = ledger_of(out)
    ft = ledger.runs(method="LP-FT")
    assert [r["status"] for r in ft] == ["failed"] and "frozen parameter or buffer changed" in ft[0]["error"]
    assert [r["method"] for r in summary(out)] == ["LP"]


class _TamperingTask(ProbeGroupTask):
    """A probe task that trains, then scribbles on the cached features (in a worker process)."""

    def __call__(self, on_epoch=None):
        import transferlab.sweep.tasks as tasks

        real = tasks.fit_linear_probes

        def tampering(heads, train, val, *args, **kwargs):
            result = real(heads, train, val, *args, **kwargs)
            train.inputs.add_(1.0)  # on CPU the source shares the shipped tensor
            return result

        tasks.fit_linear_probes = tampering
        try:
            return super().__call__(on_epoch)
        finally:
            tasks.fit_linear_probes = real


@pytest.mark.slow
def test_changed_cached_features_fail_the_probes_in_a_worker_process(data, tmp_path, monkeypatch):
    import transferlab.sweep.tasks as tasks

    monkeypatch.setattr(tasks, "ProbeGroupTask", _TamperingTask)
    out = tmp_path / "s"
    assert sweep(data, out, "--lr", "1e-2", "--l2", "0,1", "--seeds", "0,1", "--jobs", "2") == 0
    runs = ledger_of(out).runs(method="LP")
    assert len(runs) == 4 and {r["status"] for r in runs} == {"failed"}
    assert all("cached features changed" in r["error"] for r in runs)


# -- 5. strict loads ----------------------------------------------------------------------------------
def test_trained_state_that_does_not_fit_is_an_error_not_a_fresh_head(resnet10_random):
    import copy

    from transferlab.models.freezing import load_state_strict

    model = copy.deepcopy(resnet10_random.model)
    with pytest.raises(ValueError, match="trained tensor classifier.weight is not a tensor of the model"):
        load_state_strict(model, {"classifier.weight": torch.zeros(10, 512)})
    with pytest.raises(ValueError, match=r"trained tensor output.weight has shape \(3, 512\), the model needs \(1000, 512\)"):
        load_state_strict(model, {"output.weight": torch.zeros(3, 512)})
    with pytest.raises(ValueError, match="the trained tensors lack output.bias"):
        load_state_strict(model, {"output.weight": torch.zeros(1000, 512)}, required={"output.weight", "output.bias"})
    load_state_strict(model, {"output.bias": torch.ones(1000)})
    assert torch.equal(model.output.bias, torch.ones(1000))


# -- 6. photo orientation -----------------------------------------------------------------------------
def test_exif_orientation_is_applied_and_part_of_the_cache_key(tmp_path, resnet10_random, monkeypatch):
    import numpy as np

    from transferlab.core.devices import Placement
    from transferlab.data import load_rgb, load_splits
    from transferlab.features import cache as features
    from transferlab.features.cache import FeatureCache

    # Stored 40 wide x 20 high, left half red. EXIF orientation 6: display rotated 90 degrees clockwise,
    # so the viewer sees 20 wide x 40 high with the red half on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    shown = np.asarray(load_rgb(str(path)), dtype=float)
    assert shown.shape == (40, 20, 3)
    assert shown[:20, :, 0].mean() > 200 and shown[20:, :, 0].mean() < 50

    folder = write_image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    split = load_splits(folder).train
    cpu = Placement(torch.device("cpu"))
    key = FeatureCache(None).key(resnet10_random, "output", split, resnet10_random.spec.preprocessing, cpu)
    monkeypatch.setattr(features, "DECODER", "pil-rgb")  # a decoder that ignored EXIF
    assert FeatureCache(None).key(resnet10_random, "output", split, resnet10_random.spec.preprocessing, cpu) != key


# -- 7. one divergence reference for both phases ------------------------------------------------------
def test_a_healthy_run_from_an_excellent_start_is_not_called_diverged():
    """Fine-tuning starts from a probe that is nearly perfect on validation (val xent ~1e-4); noisy train
    labels keep the train cross-entropy near 1, far above 100x the start but nowhere near blowing up."""
    from transferlab.core.devices import Placement
    from transferlab.features.sources import SplitInputs, TensorSource
    from transferlab.models.heads import new_head
    from transferlab.train.config import TrainConfig
    from transferlab.train.early_stopping import divergence_threshold
    from transferlab.train.loop import fit

    place = Placement(torch.device("cpu"))
    x = torch.eye(3).repeat(20, 1) * 10
    clean = torch.arange(60) % 3
    noisy = clean.clone()
    noisy[::4] = (noisy[::4] + 1) % 3  # a quarter of the train labels are wrong
    head = new_head(3, 3, 0)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    train, val = TensorSource(SplitInputs(x, noisy, []), place), TensorSource(SplitInputs(x, clean, []), place)
    result = fit(head, head, head, train, val, TrainConfig(lr=1e-3, epochs=3, batch_size=60))
    assert result.history[0]["val_xent"] < 1e-3 and result.history[1]["train_xent"] > 100 * result.history[0]["val_xent"]
    assert result.status == "done"
    assert divergence_threshold(3) == pytest.approx(100 * math.log(3))


# -- 8. and 9. tensors follow the model's placement; workers follow --device / --dtype ---------------
@pytest.mark.slow
def test_probe_and_lpft_sweep_run_with_the_model_in_another_dtype(data, tmp_path):
    """Any input created without the model's placement (CPU float32) fails here, as on CUDA."""
    assert main(["probe", "--data", str(data), "--out", str(tmp_path / "p"), "--dtype", "float64", "--n-trainable-layers", "3",
                 "--epochs", "2", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "p" / "run.json").read_text())["status"] == "done"
    grid = ["--lr", "1e-2", "--l2", "0", "--seeds", "0", "--lpft", "--ft-lr", "1e-4", "--dtype", "float64"]
    assert sweep(data, tmp_path / "s64", *grid) == 0
    assert [r["method"] for r in summary(tmp_path / "s64")] == ["LP", "LP-FT"]
    # Worker processes compute where the sweep says: the same float64 numbers as in-process.
    assert sweep(data, tmp_path / "s64j", *grid, "--jobs", "2") == 0
    assert summary(tmp_path / "s64j") == summary(tmp_path / "s64")
    assert sweep(data, tmp_path / "s32", *grid[:-2]) == 0
    assert summary(tmp_path / "s32") != summary(tmp_path / "s64")


# -- 11. one failure path ------------------------------------------------------------------------------
def test_an_exception_in_an_in_process_probe_is_recorded_and_the_sweep_goes_on(data, tmp_path, monkeypatch):
    import transferlab.sweep.tasks as tasks

    real = tasks.fit_linear_probes

    def failing_for_seed_1(heads, train, val, cfgs, *args, **kwargs):
        if cfgs[0].seed == 1:
            raise RuntimeError("simulated out of memory")
        return real(heads, train, val, cfgs, *args, **kwargs)

    monkeypatch.setattr(tasks, "fit_linear_probes", failing_for_seed_1)
    out = tmp_path / "s"
    assert sweep(data, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0,1") == 0
    runs = {r["config"]["seed"]: r for r in ledger_of(out).runs()}
    assert runs[0]["status"] == "done"
    assert runs[1]["status"] == "failed" and runs[1]["error"] == "RuntimeError: simulated out of memory"
    monkeypatch.undo()
    assert sweep(data, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0,1") == 0  # the re-run retries it
    assert {r["status"] for r in ledger_of(out).runs()} == {"done"}


LONG = ["--lr", "1e-3,1e-2", "--l2", "0,1", "--seeds", "0,1", "--epochs", "3000", "--patience", "3000", "--jobs", "2",
        "--device", "cpu", "--workers", "0", "--no-progress"]


def test_ctrl_c_with_worker_processes_exits_promptly(data, tmp_path):
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "sweep", "--data", str(data), "--out", str(out), *LONG],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = []
        if (out / "ledger.sqlite").exists():
            try:
                rows = ledger_of(out).runs()
            except Exception:
                rows = []
        if any(r["status"] == "running" for r in rows):
            break
        time.sleep(0.1)
    time.sleep(2)  # the workers are training now
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.time() - sent < 15
    assert "interrupted" in err and "Traceback" not in err


# -- 12. one sweep per output folder ---------------------------------------------------------------------
def test_a_second_sweep_on_a_locked_folder_exits_2_naming_the_process(data, tmp_path, capsys):
    from transferlab.core.files import FolderLock

    out = tmp_path / "s"
    out.mkdir()
    lock = FolderLock(out)
    try:
        assert sweep(data, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0") == 2
        assert f"is in use by process {os.getpid()}" in one_line(capsys)
    finally:
        lock.release()
    # A lock left by a killed process does not block the next run.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from transferlab.core.files import FolderLock; FolderLock(Path(sys.argv[1])); print('locked', flush=True); "
                               "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert sweep(data, out, "--lr", "1e-2", "--l2", "0", "--seeds", "0") == 0


# -- 13. durable atomic writes that leave the umask alone -----------------------------------------------
def test_atomic_write_fsyncs_file_and_folder_and_keeps_the_umask(tmp_path, monkeypatch):
    import stat

    from transferlab.core.files import atomic_write_bytes

    synced, umask_seen_meanwhile = [], []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        # What another thread would see while the write is under way (os.umask sets and returns it).
        def read_umask():
            current = os.umask(0)
            os.umask(current)
            umask_seen_meanwhile.append(current)

        probe = threading.Thread(target=read_umask)
        probe.start()
        probe.join()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
        mode = stat.S_IMODE(os.stat(tmp_path / "f.bin").st_mode)
    finally:
        os.umask(old)
    assert umask_seen_meanwhile == [0o027, 0o027] and mode == 0o640
    assert synced == [False, True]  # the file, then its folder
    assert (tmp_path / "f.bin").read_bytes() == b"x" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_fine_tuning_grid_is_one_run_per_combination_and_the_test_split_is_read_once(data, tmp_path):
    out = tmp_path / "ftgrid"
    grid = ["--lr", "1e-2", "--l2", "0", "--seeds", "0", "--lpft", "--ft-blocks", "2,3", "--ft-lr", "1e-3",
            "--ft-augment", "none,views:2,map", "--ft-l2sp", "0,0.1", "--label-smoothing", "0,0.1", "--ft-epochs", "2",
            "--select", "val_err"]
    assert sweep(data, out, *grid) == 0
    ledger = ledger_of(out)
    ft_runs = ledger.runs("efficientnet_lite0", "LP-FT")
    combos = {(r["metrics"]["unit"], r["config"]["lr"], r["config"]["feature_augment"], r["config"]["l2sp"],
               r["config"]["label_smoothing"]) for r in ft_runs}
    assert len(ft_runs) == len(combos) == 2 * 3 * 2 * 2
    assert all(r["status"] == "done" and r["config"]["select"] == "val_err" and r["config"]["epochs"] == 2 for r in ft_runs)
    assert all(r["metrics"]["wise_alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in ft_runs)
    for method in ("LP", "LP-FT"):
        assert ledger.test_evaluations("efficientnet_lite0", method) == 1
    # The choice follows --select val_err (ties: val xent, then grid order) over the interpolated runs.
    chosen = ledger.run(ledger.choice("efficientnet_lite0", "LP-FT"))
    best = min((r["metrics"]["val_err"], r["metrics"]["val_xent"]) for r in ft_runs)
    assert (chosen["metrics"]["val_err"], chosen["metrics"]["val_xent"]) == best
    ledger.close()
    ft = summary(out)[1]
    assert ft["method"] == "LP-FT" and ft["select"] == "val_err"
    assert (ft["ft_unit"], ft["ft_augment"], ft["ft_l2sp"], ft["label_smoothing"], ft["wise_alpha"]) == (
        chosen["metrics"]["unit"], chosen["config"]["feature_augment"], chosen["config"]["l2sp"],
        chosen["config"]["label_smoothing"], chosen["metrics"]["wise_alpha"])
    assert "Selection criterion (--select val_err)" in (out / "report.html").read_text()
    # A resume trains nothing and reads the test split no more.
    assert sweep(data, out, *grid) == 0
    ledger = ledger_of(out)
    assert ledger.test_evaluations("efficientnet_lite0") == 2
    assert len(ledger.runs("efficientnet_lite0", "LP-FT")) == 24
