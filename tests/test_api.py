"""The Python API speaks Python: keyword arguments by field name and type, listed in the signature and docstring."""

import dataclasses
import inspect
import json

import numpy as np
import pytest

import transferlab
import transferlab.api
from transferlab.core.errors import ConfigError
from transferlab.core.hashing import stable_hash
from transferlab.data import DataConfig
from transferlab.features.engine import EngineConfig
from transferlab.train.config import TrainConfig
from transferlab.train.probe_run import ProbeConfig


def test_a_value_of_the_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        transferlab.probe(str(tmp_path), tmp_path / "out", lr="1e-3")
    assert str(e.value) == "lr='1e-3': expected float, got str"
    with pytest.raises(ConfigError, match=r"epochs=2.5: expected int, got float"):
        transferlab.probe(str(tmp_path), tmp_path / "out", epochs=2.5)
    with pytest.raises(ConfigError, match=r"use_cache='no': expected bool"):
        transferlab.probe(str(tmp_path), tmp_path / "out", use_cache="no")
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_an_unknown_name_suggests_the_close_field(tmp_path):
    with pytest.raises(ConfigError, match=r"learning_rate=0.001: not a config field \(did you mean lr\b"):
        transferlab.probe(str(tmp_path), tmp_path / "out", learning_rate=1e-3)
    # A name in other letter case is that field, not one whose help text mentions it (backbone_lr_mult: "x --lr").
    with pytest.raises(ConfigError) as e:
        transferlab.probe(str(tmp_path), tmp_path / "out", Lr=1e-3)
    assert str(e.value) == "Lr=0.001: not a config field (did you mean lr?)"
    assert not (tmp_path / "out").exists()


def test_a_sweep_only_field_says_it_is_a_sweep_option(tmp_path):
    with pytest.raises(ConfigError) as e:
        transferlab.probe(str(tmp_path), tmp_path / "out", ft_blocks=1)
    assert str(e.value) == "ft_blocks=1: is a sweep option (transferlab sweep --ft-blocks), not a probe field"
    with pytest.raises(ConfigError) as e:  # the sweep's flag, and the probe's field of that meaning
        transferlab.probe(str(tmp_path), tmp_path / "out", seeds=1)
    assert str(e.value) == "seeds=1: is a sweep option (transferlab sweep --seeds), not a probe field (did you mean seed?)"
    with pytest.raises(ConfigError, match=r"^jobs=2: is a sweep option \(transferlab sweep --jobs\), not a probe field"):
        transferlab.probe(str(tmp_path), tmp_path / "out", jobs=2)  # an ExecutorConfig field
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argument, value, expected", [
    ("data", 3, "data=3: expected str or os.PathLike, got int"),
    ("out", 3, "out=3: expected str or os.PathLike, got int"),
    ("backbone", 3, "backbone=3: expected str, got int"),
    ("backbone", None, "backbone=None: expected str, got NoneType"),
])
def test_the_positional_arguments_are_checked_by_name(tmp_path, argument, value, expected):
    given = {"data": str(tmp_path), "out": tmp_path / "out", "backbone": "efficientnet_lite0", argument: value}
    with pytest.raises(ConfigError) as e:
        transferlab.probe(**given)
    assert str(e.value) == expected
    assert not (tmp_path / "out").exists()


def test_numpy_numbers_are_numbers_and_the_config_holds_plain_ones(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(transferlab.api, "run_probe", lambda cfg, out, command, observers: built.append((cfg, out, command)) or {})
    transferlab.probe(tmp_path, tmp_path / "out", lr=np.float32(1e-3), epochs=np.int64(7), l2=1,
                      wise_alphas=[np.float64(0.5), 1], max_per_class=np.int32(4))
    cfg, out, command = built[0]
    # run.json records the call that reproduces the run, with the plain values the config holds
    assert command == (f"transferlab.probe({str(tmp_path)!r}, {str(tmp_path / 'out')!r}, backbone='efficientnet_lite0', "
                       "lr=0.0010000000474974513, epochs=7, l2=1.0, wise_alphas=(0.5, 1.0), max_per_class=4)")
    assert out == str(tmp_path / "out") and cfg.data.data == str(tmp_path)  # os.PathLike taken as its path text
    # float32 1e-3 is 0.0010000000474974513 as a float: the same number, as a Python float
    assert type(cfg.train.lr) is float and cfg.train.lr == float(np.float32(1e-3)) == 0.0010000000474974513
    assert type(cfg.train.epochs) is int and cfg.train.epochs == 7
    assert type(cfg.train.l2) is float and cfg.train.l2 == 1.0  # an int for a float field: 1.0, as --l2 1 gives
    assert cfg.train.wise_alphas == (0.5, 1.0) and all(type(a) is float for a in cfg.train.wise_alphas)
    assert type(cfg.data.max_per_class) is int and cfg.data.max_per_class == 4
    plain = ProbeConfig(DataConfig(str(tmp_path), max_per_class=4), train=TrainConfig(
        lr=0.0010000000474974513, epochs=7, l2=1.0, wise_alphas=(0.5, 1.0)))
    assert stable_hash(dataclasses.asdict(cfg)) == stable_hash(dataclasses.asdict(plain))
    assert json.dumps(dataclasses.asdict(cfg)) == json.dumps(dataclasses.asdict(plain))
    for bad, got in (({"epochs": np.float64(2.0)}, "float64"), ({"lr": np.bool_(True)}, "bool"), ({"lr": True}, "bool")):
        with pytest.raises(ConfigError, match=f"expected (int|float), got {got}"):
            transferlab.probe(tmp_path, tmp_path / "out", **bad)


def test_a_probe_from_python_with_numpy_numbers_writes_plain_numbers(tiny_folder, tmp_path):
    out = tmp_path / "out"
    record = transferlab.probe(tiny_folder, out, "efficientnet_lite0", lr=np.float32(1e-2), epochs=np.int64(1),
                               device="cpu", num_workers=0, progress=False)
    written = json.loads((out / "run.json").read_text())
    assert written["config"]["train"]["lr"] == float(np.float32(1e-2)) and written["config"]["train"]["epochs"] == 1
    assert written["config"]["data"]["data"] == str(tiny_folder) and record["epochs_run"] == 1
    assert written["command"] == (f"transferlab.probe({str(tiny_folder)!r}, {str(out)!r}, backbone='efficientnet_lite0', "
                                  f"lr={float(np.float32(1e-2))!r}, epochs=1, device='cpu', num_workers=0, progress=False)")


def test_signature_and_docstring_list_every_field_with_its_default():
    params = inspect.signature(transferlab.probe).parameters
    for cls in (DataConfig, TrainConfig, EngineConfig, ProbeConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("data", "backbone", "train", "engine"):  # data and backbone are positional
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            assert params[f.name].default == default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
            assert f"    {f.name} (" in transferlab.probe.__doc__, f.name
    assert "use_cache (bool, default True): False: run the frozen backbone" in transferlab.probe.__doc__
