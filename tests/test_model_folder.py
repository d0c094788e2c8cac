"""deploy.model_folder: config.json of an exported model folder, written and read by one module."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from transferlab.core.errors import UserError
from transferlab.data import Preprocessing
from transferlab.deploy.model_folder import (
    CONFIG_FILE,
    MODEL_FILE,
    ONNX_OPSET,
    ModelConfig,
    exported_files,
    is_model_folder,
    model_config,
    preprocessing_recipe,
    write_config,
)

PRE = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def trained(zoo="timm", pre=PRE):
    """What model_config reads of a TrainedModel, without building a network."""
    spec = SimpleNamespace(arch="tf_efficientnet_lite0", zoo=zoo, preprocessing=pre)
    backbone = SimpleNamespace(spec=spec, classifier_name="classifier", feature_dim=1280)
    return SimpleNamespace(backbone=backbone, base_name="efficientnet_lite0", classes=("b", "a", "c"),
                           preprocessing=pre, provenance={"kind": "probe", "method": "LP"})


def test_what_is_written_is_read_back(tmp_path):
    written = write_config(tmp_path, model_config(trained()), {"safetensors": MODEL_FILE})
    on_disk = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert on_disk == json.loads(json.dumps(written))  # tuples as lists
    assert written["format"] == "transferlab-model" and written["files"] == {"safetensors": MODEL_FILE}
    assert written["num_classes"] == 3 and written["classes"] == ["b", "a", "c"]  # label order, not sorted
    assert written["outputs"]["onnx"]["opset"] == ONNX_OPSET == 18
    config = ModelConfig.read(tmp_path)
    assert config.classes == ("b", "a", "c") and config.preprocessing == PRE
    assert config.backbone == "efficientnet_lite0" and config.weights == tmp_path / MODEL_FILE and config.raw == on_disk


def test_a_zoo_built_from_files_is_read_as_the_folders_own_architecture(tmp_path):
    write_config(tmp_path, model_config(trained(zoo="hf")), {"safetensors": MODEL_FILE, "architecture": "hf"})
    assert ModelConfig.read(tmp_path).backbone == f"hf:{tmp_path / 'hf'}"


@pytest.mark.parametrize("text", ["not json", "[]", '{"classes": ["a"]}', '{"classes": ["a"], "preprocessing": {}}'])
def test_a_file_that_is_no_model_config_is_one_error_naming_it(text, tmp_path):
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(UserError, match=rf"^{tmp_path / CONFIG_FILE}: not a transferlab model config \("):
        ModelConfig.read(tmp_path)


def test_the_recipe_gives_this_models_numbers():
    crop = preprocessing_recipe(PRE)
    assert crop["resize_mode"] == "short_side_then_center_crop" and crop["resize_size"] == int(224 / 0.875) == 256
    assert crop["jpeg_draft"] == [256, 256] and crop["interpolation"] == "bicubic" and crop["mean"] == (0.5, 0.5, 0.5)
    assert any("center crop 224x224" in step for step in crop["steps"])
    squash = preprocessing_recipe(Preprocessing(input_size=32, squash=True))
    assert squash["resize_mode"] == "squash" and squash["resize_size"] == 32 and squash["jpeg_draft"] == [32, 32]
    assert not any("center crop" in step for step in squash["steps"])


def test_only_the_files_an_earlier_export_lists_are_its_own(tmp_path: Path):
    assert exported_files(tmp_path) == set()  # no config.json
    (tmp_path / CONFIG_FILE).write_text("{broken")
    assert exported_files(tmp_path) == set()
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "someone-else", "files": {"onnx": "model.onnx"}}))
    assert exported_files(tmp_path) == set()
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "transferlab-model",
                                                    "files": {"onnx": "model.onnx", "x": "../notes.txt", "architecture": "hf"}}))
    assert exported_files(tmp_path) == {"model.onnx", "hf"}  # never a name an export does not write


def test_a_model_folder_has_both_its_config_and_its_weights(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{}")
    assert not is_model_folder(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"")
    assert is_model_folder(tmp_path)
