"""Turn a finished run into a stand-alone model folder: the whole network, its classes and how to feed it.

A run keeps only what it trained (``head.safetensors`` of a probe, ``runs/<hash>.safetensors`` of a
sweep); the rest of the network is the pretrained backbone. :func:`load_trained` rebuilds the whole
network from the run's own record (backbone name, weights, classes) and loads the trained tensors
strictly: every trained tensor must name a tensor of the model, with the same shape.
:func:`export_model` writes it as ``MODEL_DIR/model.safetensors`` + ``config.json`` (+ ``model.onnx``):

- ``model.safetensors``: the state dict of the zoo's own model class (timm / pytorchcv) with a
  ``Linear(feature_dim, n_classes)`` classifier, so it loads without transferlab (README).
- ``config.json``: architecture and zoo, class names in label order, preprocessing (every step from
  file to tensor, :func:`preprocessing_recipe`), provenance (with the run's split settings).
- ``hf/`` (hf: models): the model's config and image processor config, so the folder is enough on its own.
- ``model.onnx``: input ``image`` (N, 3, H, W) float32, preprocessed as in the config; outputs
  ``logits`` and ``probabilities`` (softmax of the logits), both (N, n_classes); the batch is dynamic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.files import atomic_write_bytes, check_writable_dir, created_dirs_removed_on_failure, fsync_dir, write_json
from transferlab.core.hashing import file_digest, stable_hash
from transferlab.data import Preprocessing
from transferlab.models import DEFAULT_MODEL_DIR, Backbone, load_backbone
from transferlab.models.freezing import load_state_strict
from transferlab.models.heads import new_head
from transferlab.sweep.ledger import METHODS

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx", "both")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
ARCHITECTURE_DIR = "hf"  # hf: the model's config.json and preprocessor_config.json
# Every file an export may write; a re-export replaces them all (config.json last).
MODEL_OUTPUTS = (MODEL_FILE, ONNX_FILE, ARCHITECTURE_DIR, CONFIG_FILE)
# 18 is the lowest opset torch's (dynamo) ONNX exporter implements; >= 17 is what LayerNorm-era runtimes need.
ONNX_OPSET = 18
CONFIG_FORMAT = 1


@dataclass
class TrainedModel:
    """The whole trained network (eval mode, CPU) and what is known about where it came from."""

    backbone: Backbone
    base_name: str  # catalogue name of the architecture (without a local weights path)
    classes: tuple[str, ...]
    provenance: dict

    @property
    def model(self) -> nn.Module:
        return self.backbone.model

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.spec.preprocessing


# -- finding the run --------------------------------------------------------------------------------
def is_probe_dir(path: Path) -> bool:
    return (path / "run.json").is_file() and (path / "head.safetensors").is_file()


def is_sweep_dir(path: Path) -> bool:
    return (path / "ledger.sqlite").is_file()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"{path}: cannot read trained tensors ({type(e).__name__}: {str(e)[:160]})") from None


def load_trained_tensors(model: nn.Module, state: dict[str, torch.Tensor], source: str, classifier: str) -> None:
    """Load a run's trained tensors into `model`, strictly: each must be a model tensor of the same shape,
    and the classifier must be among them (else the exported network would carry an untrained head)."""
    head = {k for k in model.state_dict() if k.startswith(classifier + ".")}
    try:
        load_state_strict(model, state, required=head)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def _build(name: str, model_dir: str, weights: str | None, n_classes: int, state: dict, source: str) -> Backbone:
    backbone = load_backbone(name, model_dir=model_dir, weights=weights)
    backbone.reset_classifier(new_head(backbone.feature_dim, n_classes, seed=0))
    load_trained_tensors(backbone.model, state, source, backbone.classifier_name)
    backbone.model.eval()
    return backbone


def _from_probe(src: Path) -> TrainedModel:
    try:
        record = json.loads((src / "run.json").read_text())
        cfg = record["config"]
        classes = tuple(record["data"]["classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{src / 'run.json'}: not a transferlab run record ({type(e).__name__}: {e})") from None
    if record.get("status") != "done":
        raise UserError(f"{src}: the run's status is {record.get('status')!r}; only finished runs can be exported")
    head_file = src / "head.safetensors"
    state = _read_tensors(head_file)
    backbone = _build(cfg["backbone"], cfg.get("model_dir", DEFAULT_MODEL_DIR), cfg.get("weights"), len(classes), state, str(head_file))
    recorded = record.get("backbone", {}).get("weights_digest")
    if recorded and recorded != backbone.weights_digest:
        raise UserError(
            f"{src}: the backbone weights at hand (digest {backbone.weights_digest}) are not those the run was trained on "
            f"(digest {recorded}); pass the same weights (--model-dir / --weights) as for training"
        )
    provenance = {
        "kind": "probe",
        "source": str(src.resolve()),
        "run_hash": file_digest(head_file)[:20],  # a probe has no ledger hash: the digest of its trained tensors
        "method": "LP" if record.get("n_trainable_layers", 1) == 1 else "FT",
        "n_trainable_layers": record.get("n_trainable_layers"),
        "train": cfg.get("train"),
        "data": _data_provenance(record.get("data", {}), cfg.get("data"), record.get("data_digest")),
        "backbone_weights": backbone.weights,
        "backbone_weights_digest": backbone.weights_digest,
        "metrics": {k: record.get(k) for k in ("best_epoch", "val_xent", "val_err", "test_acc")},
    }
    return TrainedModel(backbone, cfg["backbone"], classes, provenance)


def _data_provenance(summary: dict, data_config: dict | None, data_digest: str | None) -> dict:
    """What the run was trained on: root, split sizes, and the images' fingerprint.

    The fingerprint is ``stable_hash`` of [path, size, content digest, label] of every file of every split
    (``ImageSplits.fingerprint``), the same digest a sweep's run hashes include.
    """
    out = {
        "root": summary.get("root"),
        "n_classes": summary.get("n_classes"),
        "splits": {s: summary[s]["n"] for s in ("train", "val", "test") if s in summary},
        "fingerprint": data_digest,
    }
    if data_config is not None:
        out["config"] = data_config
    return out


def sweep_choices(ledger) -> list[dict]:
    """Every chosen run of a sweep ledger: backbone, method, hash, val_xent."""
    rows = []
    for name in ledger.get_meta("backbones", []):
        for method in METHODS:
            h = ledger.choice(name, method)
            if h is None:
                continue
            run = ledger.run(h)
            metrics = run.get("metrics") or {}
            rows.append({"backbone": name, "method": method, "hash": h, "val_xent": metrics.get("val_xent"),
                         "val_err": metrics.get("val_err"), "run": run})
    return rows


def pick_choice(choices: list[dict], backbone: str | None, method: str | None, where: str, select: str = "val_xent") -> dict:
    """The chosen run for (backbone, method); unspecified parts: the best under the sweep's `select`
    criterion (lowest validation cross-entropy, ties: validation error; or the reverse)."""
    if method is not None and method not in METHODS:
        raise ConfigError("method", method, "expected LP or LP-FT")
    fits = [c for c in choices if (backbone is None or c["backbone"] == backbone) and (method is None or c["method"] == method)]
    if not fits:
        known = ", ".join(f"{c['backbone']}/{c['method']}" for c in choices) or "none"
        asked = "/".join(x for x in (backbone, method) if x) or "any"
        raise UserError(f"{where}: no chosen run for {asked} (chosen runs: {known})")
    finite = [c for c in fits if c["val_xent"] is not None and c.get("val_err") is not None]
    if not finite:
        return fits[0]
    from transferlab.train.training import selection_key

    return min(finite, key=lambda c: selection_key(select, c["val_xent"], c["val_err"]))


def _from_sweep(src: Path, backbone_name: str | None, method: str | None) -> TrainedModel:
    from transferlab.sweep.ledger import Ledger

    ledger = Ledger(src / "ledger.sqlite", readonly=True)
    try:
        choice = pick_choice(sweep_choices(ledger), backbone_name, method, str(src), ledger.get_meta("select", "val_xent"))
        config = ledger.get_meta("config", {})
        summary = ledger.get_meta("data_summary", {})
        fingerprint = ledger.get_meta("data_fingerprint")
        data_digest = stable_hash(fingerprint) if fingerprint is not None else None
    finally:
        ledger.close()
    run = choice["run"]
    classes = tuple(summary.get("classes") or ())
    if not classes:
        raise UserError(f"{src / 'ledger.sqlite'}: no data summary with class names")
    params = src / "runs" / f"{choice['hash']}.safetensors"
    if not params.is_file():
        raise UserError(f"{src}: the chosen run's parameters {params} are missing")
    backbone = _build(choice["backbone"], config.get("model_dir", DEFAULT_MODEL_DIR), None, len(classes), _read_tensors(params), str(params))
    metrics = run.get("metrics") or {}
    provenance = {
        "kind": "sweep",
        "source": str(src.resolve()),
        "run_hash": choice["hash"],
        "method": choice["method"],
        "n_trainable_layers": metrics.get("n_trainable_layers"),
        "train": run.get("config"),
        "data": _data_provenance(summary, config.get("data"), data_digest),
        "backbone_weights": backbone.weights,
        "backbone_weights_digest": backbone.weights_digest,
        # The sweep's run hash covers the weights digest: recomputing it checks these are the trained-on weights.
        "backbone_weights_verified": _hash_matches(choice, config, backbone, data_digest, src),
        "metrics": {"best_epoch": metrics.get("best_epoch"), "val_xent": metrics.get("val_xent"),
                    "val_err": metrics.get("val_err"), "test_acc": run.get("test_acc")},
    }
    return TrainedModel(backbone, choice["backbone"], classes, provenance)


def _hash_matches(choice: dict, config: dict, backbone: Backbone, data_digest: str | None, src: Path) -> bool | None:
    """Whether the run hash recomputed with the weights at hand equals the ledger's (None: cannot tell)."""
    try:
        from transferlab.sweep.ledger import Ledger
        from transferlab.sweep.search import run_hash
        from transferlab.train.probe_run import DataConfig
        from transferlab.train.training import TrainConfig

        ledger = Ledger(src / "ledger.sqlite", readonly=True)
        try:
            start = ledger.choice(choice["backbone"], "LP") if choice["method"] == "LP-FT" else None
            k = (choice["run"].get("metrics") or {})["n_trainable_layers"]
            numerics = ledger.get_meta(f"numerics:{choice['backbone']}:{k}", ledger.get_meta("numerics"))
        finally:
            ledger.close()
        h = run_hash(choice["method"], choice["backbone"], backbone.weights_digest, data_digest or "", DataConfig(**config["data"]),
                     TrainConfig.from_dict(choice["run"]["config"]), k, start, numerics)
    except Exception as e:  # an older or newer ledger layout: record that it could not be checked
        log.debug("cannot recompute the run hash: %s", e)
        return None
    if h != choice["hash"]:
        log.warning("%s: the run hash recomputed with the backbone weights at hand differs from the ledger's; "
                    "the weights may not be those the sweep trained on", src)
    return h == choice["hash"]


def load_trained(src: str | os.PathLike, backbone: str | None = None, method: str | None = None) -> TrainedModel:
    """The whole trained network of a probe folder (run.json + head.safetensors) or of a sweep folder
    (ledger.sqlite; `backbone` / `method` pick a chosen run, default the lowest validation cross-entropy)."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder")
    if is_probe_dir(src):
        if backbone is not None or method is not None:
            raise UserError(f"{src}: --backbone / --method pick a run of a sweep folder; this is a probe's folder")
        return _from_probe(src)
    if is_sweep_dir(src):
        return _from_sweep(src, backbone, method)
    raise UserError(f"{src}: neither a probe's output folder (run.json + head.safetensors) nor a sweep's (ledger.sqlite)")


# -- writing the model folder -----------------------------------------------------------------------
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
    """config.json: everything needed to rebuild, feed and trace the model."""
    from transferlab import __version__

    spec = trained.backbone.spec
    pre = trained.preprocessing
    return {
        "format": "transferlab-model",
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
            "onnx": {"input": "image", "outputs": ["logits", "probabilities"], "probabilities": "softmax of logits over classes",
                     "dynamic_axes": {"image": [0], "logits": [0], "probabilities": [0]}, "opset": ONNX_OPSET},
        },
        "provenance": {**trained.provenance, "transferlab_version": __version__},
    }


class _WithProbabilities(nn.Module):
    """The network plus a softmax, for ONNX: outputs (logits, probabilities)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)


def require_onnx() -> None:
    """Raise a UserError unless the onnx extra (onnx + onnxscript, for torch's exporter) is importable."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs the onnx extra: pip install 'transferlab[onnx]'") from None


def export_onnx(model: nn.Module, input_size: int, path: Path) -> None:
    """Write `model` as ONNX with a dynamic batch axis (torch's dynamo exporter; needs onnx + onnxscript)."""
    require_onnx()
    wrapped = _WithProbabilities(model).eval()
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        wrapped, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["image"],
        output_names=["logits", "probabilities"], dynamic_shapes=({0: batch},), verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    tmp = path.with_name(f".{path.name}.tmp")
    program.save(str(tmp))
    os.replace(tmp, path)


def export_model(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "safetensors",
                 backbone: str | None = None, method: str | None = None) -> dict:
    """Write MODEL_DIR (`out`): model.safetensors and config.json, model.onnx with fmt onnx|both, and
    for a zoo that builds its architecture from files (hf:) those files in ``hf/``.

    Everything is written into a hidden staging folder first and moved in at the end, so a failed
    export leaves `out` as it was (or absent); files of an earlier export the new one does not write
    are removed. Returns the config (also in ``out/config.json``).
    """
    if fmt not in FORMATS:
        raise ConfigError("format", fmt, f"expected one of {', '.join(FORMATS)}")
    if fmt in ("onnx", "both"):
        require_onnx()  # before anything is read or written
    with created_dirs_removed_on_failure():
        trained = load_trained(src, backbone, method)
        out = check_writable_dir(out)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
        try:
            config = _write_model_folder(trained, staging, fmt)
            _move_into(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return config


def _write_model_folder(trained: TrainedModel, folder: Path, fmt: str) -> dict:
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing memory, and a state dict may hold views
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained.model.state_dict().items()}
    config = model_config(trained)
    atomic_write_bytes(folder / MODEL_FILE, save(tensors, metadata={"format": "pt", "architecture": config["architecture"]}))
    config["files"] = {"safetensors": MODEL_FILE}
    if trained.backbone.spec.zoo == "hf":  # the architecture is its config: the folder must not need the original
        from transferlab.models import hf_zoo

        hf_zoo.save_architecture(trained.backbone.spec, str(folder / ARCHITECTURE_DIR))
        config["files"]["architecture"] = ARCHITECTURE_DIR
    if fmt in ("onnx", "both"):
        export_onnx(trained.model, trained.preprocessing.input_size, folder / ONNX_FILE)
        config["files"]["onnx"] = ONNX_FILE
    write_json(folder / CONFIG_FILE, config)
    return config


def _previous_export_files(out: Path) -> set[str]:
    """The files an earlier export wrote into `out`, as its config.json lists them (none if `out` holds
    no transferlab model): only those may be replaced or removed."""
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict) or config.get("format") != "transferlab-model" or not isinstance(config.get("files"), dict):
        return set()
    return {name for name in config["files"].values() if name in MODEL_OUTPUTS}


def _move_into(staging: Path, out: Path) -> None:
    """Make `out` hold the model files of `staging` and none of an earlier export's: config.json is
    removed first and put back last (a folder without it is no model folder). Files of an earlier
    export (those its config.json lists) that this one does not write are removed; anything else in
    `out` is the user's and is left alone, unless this export writes a file of that name."""
    previous = _previous_export_files(out)
    for name in MODEL_OUTPUTS:  # refuse before anything changes
        old = out / name
        if (staging / name).exists() and name not in previous and old.is_dir() and not old.is_symlink():
            raise UserError(f"{old}: a folder that is not an earlier export's is in the way of the model's {name}/ "
                            "(move it, or export elsewhere)")
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for name in MODEL_OUTPUTS:
        old, new = out / name, staging / name
        if name == CONFIG_FILE or not (new.exists() or name in previous):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
        if new.exists():
            os.replace(new, old)
    os.replace(staging / CONFIG_FILE, out / CONFIG_FILE)
    fsync_dir(out)
