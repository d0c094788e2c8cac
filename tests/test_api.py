"""The Python API speaks Python: keyword arguments by field name and type, listed in the signature and docstring."""

import dataclasses
import inspect

import pytest

import transferlab
from transferlab.data import DataConfig
from transferlab.study import ProbeConfig
from transferlab.training import TrainConfig
from transferlab.utils import ConfigError
from transferlab.workbench import EngineConfig


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
    with pytest.raises(ConfigError, match=r"seeds=1: not a config field \(did you mean seed\?\)"):
        transferlab.probe(str(tmp_path), tmp_path / "out", seeds=1)


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
