"""The exported model folder's ``config.json``: its one writer and its one reader.

An exported model folder (MODEL_DIR) holds:

- ``model.safetensors``: the state dict of the zoo's own model class (timm / pytorchcv) with a
  ``Linear(feature_dim, n_classes)`` classifier, so it loads without transferlab (README).
- ``config.json``: architecture and zoo, class names in label order, preprocessing (every step from
  file to tensor, :func:`preprocessing_recipe`), provenance (with the run's split settings), and
  ``files``: which of the files below this export wrote.
- ``hf/`` (hf: models): the model's config and image processor config, so the folder is enough on its own.
- ``model.onnx``: input ``image`` (N, 3, H, W) float32, preprocessed as in the config; outputs
  ``logits`` and ``probabilities`` (softmax of the logits), both (N, n_classes); the batch is dynamic.

:func:`model_config` and :func:`write_config` write config.json; :meth:`ModelConfig.read` reads what a
loader needs from it, and :func:`exported_files` which files an earlier export wrote. The files
themselves are written by :mod:`transferlab.deploy.export`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.core.errors import UserError
from transferlab.core.files import write_json
from transferlab.data import Preprocessing

if TYPE_CHECKING:
    from transferlab.deploy.trained import TrainedModel

FORMAT = "transferlab-model"
CONFIG_FORMAT = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ARCHITECTURE_DIR = "hf"  # hf: the model's config.json and preprocessor_config.json
# Every file an export may write; a re-export replaces them all (config.json last).
MODEL_OUTPUTS = (MODEL_FILE, ONNX_FILE, ARCHITECTURE_DIR, CONFIG_FILE)
# model.onnx's opset. 18 is the lowest opset torch's (dynamo) ONNX exporter implements; >= 17 is what
# LayerNorm-era runtimes need.
ONNX_OPSET = 18
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("logits", "probabilities")  # both with a dynamic batch axis, as the input


# How a client without transferlab rebuilds the network (model.safetensors is its state dict).
LOAD_HINTS = {
    "timm": "timm.create_model(architecture, num_classes=num_classes).load_state_dict(load_file('model.safetensors'))",
    "pytorchcv": "pytorchcv.model_provider.get_model(architecture, num_classes=num_classes).load_state_dict(...)",
    "torchvision": "torchvision.models.get_model(architecture, weights=None) with the Linear at `classifier` replaced by "
                   "Linear(feature_dim, num_classes), then load_state_dict(...)",
    "hf": "encoder = transformers.AutoModel.from_config(AutoConfig.from_pretrained('hf/'), add_pooling_layer=False) (for a "
          "config with a vision_config: the vision tower's model from that config); encoder.load_state_dict of the "
          "'encoder.'-prefixed tensors; logits = head(features), head = Linear(feature_dim, num_classes) from 'head.weight' / "
          "'head.bias', features = the encoder's pooler_output when it has one, else last_hidden_state[:, 0]",
}

# What a client that cannot follow a step exactly gets: max |probability difference| from predict over images
# and classes, measured with exported efficientnet_lite0 (bicubic) linear probes of birds10 and hymenoptera.
CLIENT_DIFFERENCES = {
    "opencv_bicubic": "cv2.resize(INTER_CUBIC) in place of Pillow's bicubic (OpenCV's kernel has a = -0.75, Pillow's -0.5, "
                      "and OpenCV does not antialias): max |prob diff| 0.067 on birds10 test (100 photos of 227 px, enlarged; "
                      "top-1 unchanged), 0.161 on hymenoptera (397 photos, mostly shrunk; top-1 changed on 1)",
    "no_draft": "decoding JPEGs at full size (no Image.draft) and resizing from there: max |prob diff| 0.0041 on hymenoptera "
                "(8 of 397 photos large enough to be decoded at reduced scale; top-1 unchanged); 0 on birds10 (none large enough)",
}


def preprocessing_recipe(pre: Preprocessing) -> dict:
    """config.json's ``preprocessing``: the fields, and every step from file to tensor, as predict does them
    (:func:`transferlab.data.load_rgb`, :func:`transferlab.data.build_transform`), with this model's numbers."""
    r, s = pre.resize_size, pre.input_size
    if pre.squash:
        mode = "squash"
        geometry = [f"resize to {s}x{s} (width x height; aspect ratio not kept, no crop) with Pillow's {pre.interpolation} filter: "
                    f"Image.resize(({s}, {s}), Image.Resampling.{pre.interpolation.upper()}), as "
                    f"torchvision.transforms.Resize(({s}, {s})) does on a PIL image"]
    else:
        mode = "short_side_then_center_crop"
        geometry = [
            f"resize so the short side is {r} and the long side int({r} * long / short), with Pillow's {pre.interpolation} filter: "
            f"Image.resize(size, Image.Resampling.{pre.interpolation.upper()}), as torchvision.transforms.Resize({r}) does on a PIL image",
            f"center crop {s}x{s}: top = int(round((height - {s}) / 2)), left = int(round((width - {s}) / 2)) "
            "(torchvision.transforms.CenterCrop)",
        ]
    steps = [
        f"open the file with Pillow; a JPEG: img.draft('RGB', ({r}, {r})) before decoding, so libjpeg decodes it at 1/s scale, "
        f"s the largest of 8, 4, 2, 1 with s <= min(width // {r}, height // {r}) (size rounded up: ceil(width / s) x ceil(height / s))",
        "img.load(); a 16-bit or 32-bit grey image (mode I;16*, I, F) is converted to mode F for the next step",
        f"not a JPEG and min(width, height) // {2 * r} >= 2 (and not mode P or 1): img.reduce(min(width, height) // {2 * r}) "
        "(box average over that integer factor)",
        "16-bit grey (I;16*): uint8(clip(v / 65535 * 255 + 0.5, 0, 255)) per pixel, mode L (Pillow's own convert would clip, "
        "not scale); 32-bit grey (I, F): the same with 65535 if the image's maximum is > 255, else 255 in place of 65535",
        "a palette image with transparency is converted to RGBA",
        "apply the EXIF orientation (PIL.ImageOps.exif_transpose)",
        "img.convert('RGB'): alpha dropped (not composited onto a background), grey repeated, CMYK converted by Pillow",
        *geometry,
        "Pillow's resampling is antialiased (the filter widens with the downscale factor); libraries that do not antialias "
        "(OpenCV's cv2.resize, torch's interpolate without antialias=True) differ most on large images",
        f"to float32 in [0, 1] (value / 255), RGB order, then (x - mean) / std per channel; layout (N, 3, {s}, {s})",
    ]
    return {
        **dataclasses.asdict(pre),
        "resize_size": r,
        "resize_mode": mode,  # short_side_then_center_crop | squash
        "library": "Pillow (PIL) for decoding and resizing, through torchvision.transforms on PIL images",
        "jpeg_draft": [r, r],  # img.draft('RGB', jpeg_draft) before a JPEG is decoded
        "steps": steps,
        "client_differences": CLIENT_DIFFERENCES,
    }


def model_config(trained: TrainedModel) -> dict:
    """config.json (without ``files``, which :func:`write_config` adds): everything needed to rebuild,
    feed and trace `trained`; also a run folder's record when predict loads it directly."""
    from transferlab.core.version import __version__

    spec = trained.backbone.spec
    pre = trained.preprocessing
    return {
        "format": FORMAT,
        "format_version": CONFIG_FORMAT,
        "architecture": spec.arch,  # the zoo's own model name
        "zoo": spec.zoo,  # timm | pytorchcv | torchvision | hf
        "backbone": trained.base_name,  # transferlab's name (hf: the original folder; predict builds from files.architecture)
        "classifier": trained.backbone.classifier_name,
        "feature_dim": trained.backbone.feature_dim,
        "num_classes": len(trained.classes),
        "classes": list(trained.classes),  # in label order: output column i is classes[i]
        "preprocessing": preprocessing_recipe(pre),
        "load": LOAD_HINTS.get(spec.zoo, ""),
        "outputs": {
            "safetensors": "model(x) returns logits (N, num_classes); probabilities = softmax(logits, dim=1)",
            "onnx": {"input": ONNX_INPUT, "outputs": list(ONNX_OUTPUTS), "probabilities": "softmax of logits over classes",
                     "dynamic_axes": {name: [0] for name in (ONNX_INPUT, *ONNX_OUTPUTS)}, "opset": ONNX_OPSET},
        },
        "provenance": {**trained.provenance, "transferlab_version": __version__},
    }


def write_config(folder: Path, config: dict, files: dict[str, str]) -> dict:
    """Write `config` (from :func:`model_config`) with `files` (kind -> name in `folder` of each file the
    export wrote) as ``folder/config.json``; returns what was written."""
    config = {**config, "files": files}
    write_json(folder / CONFIG_FILE, config)
    return config


def is_model_folder(path: Path) -> bool:
    """Whether `path` holds an exported model (config.json + model.safetensors)."""
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


@dataclass(frozen=True)
class ModelConfig:
    """What a loader needs from a model folder's config.json, read and checked once."""

    folder: Path
    classes: tuple[str, ...]  # in label order: output column i is classes[i]
    preprocessing: Preprocessing
    backbone: str  # the name load_backbone builds the architecture from (hf: the folder's hf/ files)
    raw: dict = dataclasses.field(repr=False, compare=False)  # the whole config.json

    @property
    def weights(self) -> Path:
        """The model's state dict file."""
        return self.folder / MODEL_FILE

    @classmethod
    def read(cls, folder: Path) -> ModelConfig:
        """Read ``folder/config.json``; a UserError naming the file if it is not a transferlab model config."""
        path = folder / CONFIG_FILE
        try:
            config = json.loads(path.read_text())
            classes, pre = tuple(config["classes"]), config["preprocessing"]
            preprocessing = Preprocessing(pre["input_size"], pre["crop_pct"], pre["interpolation"], tuple(pre["mean"]),
                                          tuple(pre["std"]), pre.get("resize"), pre.get("squash", False))
            name = config["backbone"]
            architecture_files = config.get("files", {}).get("architecture")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: not a transferlab model config ({type(e).__name__}: {e})") from None
        if architecture_files is not None:  # the zoo builds the architecture from files in the folder (hf: its config)
            name = f"{config['zoo']}:{folder / architecture_files}"
        return cls(folder, classes, preprocessing, name, config)


def exported_files(folder: Path) -> set[str]:
    """The files an earlier export wrote into `folder`, as its config.json lists them (none if `folder`
    holds no transferlab model): only those may be replaced or removed."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("files"), dict):
        return set()
    return {name for name in config["files"].values() if name in MODEL_OUTPUTS}
