"""deploy.trained: which chosen run of a sweep is loaded, and which folders hold a run."""

import pytest

from transferlab.core.errors import ConfigError, UserError
from transferlab.deploy.trained import load_trained
from transferlab.sweep.select import pick_choice


def row(backbone, method, val_xent, val_err):
    return {"backbone": backbone, "method": method, "hash": f"{backbone}-{method}", "val_xent": val_xent, "val_err": val_err}


CHOICES = [row("a", "LP", 0.50, 0.20), row("a", "LP-FT", 0.40, 0.30), row("b", "LP", 0.40, 0.10), row("b", "LP-FT", None, None)]


def test_unspecified_parts_take_the_lowest_val_xent_then_val_err():
    assert pick_choice(CHOICES, None, None, "sweep")["hash"] == "b-LP"  # 0.40 twice: the lower val_err
    assert pick_choice(CHOICES, "a", None, "sweep")["hash"] == "a-LP-FT"
    assert pick_choice(CHOICES, None, "LP", "sweep")["hash"] == "b-LP"


def test_select_val_err_ranks_by_the_error_first():
    assert pick_choice(CHOICES, "a", None, "sweep", select="val_err")["hash"] == "a-LP"


def test_a_run_without_metrics_is_taken_only_when_it_is_the_one_asked_for():
    assert pick_choice(CHOICES, "b", "LP-FT", "sweep")["hash"] == "b-LP-FT"


def test_what_is_not_chosen_is_one_error_listing_the_chosen_runs():
    with pytest.raises(ConfigError, match="method=PT: expected LP, FT or LP-FT"):
        pick_choice(CHOICES, None, "PT", "sweep")
    with pytest.raises(UserError, match=r"^sweep: no chosen run for FT \(chosen runs: a/LP, a/LP-FT, b/LP, b/LP-FT\)$"):
        pick_choice(CHOICES, None, "FT", "sweep")  # a method this sweep did not run
    with pytest.raises(UserError, match=r"^out: no chosen run for c/LP \(chosen runs: a/LP, a/LP-FT, b/LP, b/LP-FT\)$"):
        pick_choice(CHOICES, "c", "LP", "out")
    with pytest.raises(UserError, match=r"no chosen run for any \(chosen runs: none\)"):
        pick_choice([], None, None, "out")


def test_a_folder_that_holds_no_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_trained(tmp_path / "missing")
    with pytest.raises(UserError, match="neither a probe's output folder"):
        load_trained(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "head.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="pick a run of a sweep folder"):
        load_trained(tmp_path, backbone="a")
