"""Load a finished run as one whole trained network: from a probe's folder or a sweep's chosen run.

A run keeps only what it trained (``head.safetensors`` of a probe, ``runs/<hash>.safetensors`` of a
sweep); the rest of the network is the pretrained backbone. :func:`load_trained` rebuilds the whole
network from the run's own record (backbone name, weights, classes) and loads the trained tensors
strictly: every trained tensor must name a tensor of the model, with the same shape. What is known of
the run (its hash, method, training config, data and weights digests, metrics) goes with it as
provenance. :func:`sweep_choices` and :func:`pick_choice` find a sweep's chosen run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferlab.core.errors import UserError
from transferlab.core.hashing import file_digest, stable_hash
from transferlab.data import Preprocessing
from transferlab.models import DEFAULT_MODEL_DIR, Backbone, load_backbone
from transferlab.models.freezing import load_state_strict
from transferlab.models.heads import new_head
from transferlab.sweep.manifest import read_backbone, read_manifest, require_manifest
from transferlab.sweep.select import pick_choice, sweep_choices

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """The whole trained network (eval mode, CPU) and what is known about where it came from."""

    backbone: Backbone
    base_name: str  # catalogue name of the architecture (without a local weights path)
    classes: tuple[str, ...]
    provenance: dict

    @property
    def model(self) -> nn.Module:
        """The whole network: the backbone's model with its trained classifier."""
        return self.backbone.model

    @property
    def preprocessing(self) -> Preprocessing:
        """How an image becomes the network's input (the backbone's own preprocessing)."""
        return self.backbone.spec.preprocessing


def is_probe_dir(path: Path) -> bool:
    """Whether `path` is a probe's output folder (run.json + head.safetensors)."""
    return (path / "run.json").is_file() and (path / "head.safetensors").is_file()


def is_sweep_dir(path: Path) -> bool:
    """Whether `path` is a sweep folder (ledger.sqlite)."""
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


def _from_sweep(src: Path, backbone_name: str | None, method: str | None) -> TrainedModel:
    from transferlab.sweep.ledger import Ledger

    ledger = Ledger(src / "ledger.sqlite", readonly=True)
    try:
        require_manifest(ledger, str(src))
        manifest = read_manifest(ledger)
        choice = pick_choice(sweep_choices(ledger), backbone_name, method, str(src), manifest.select)
        config, summary = manifest.config, manifest.data_summary
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
        from transferlab.sweep.plan import run_hash
        from transferlab.train.config import TrainConfig
        from transferlab.train.probe_run import DataConfig

        ledger = Ledger(src / "ledger.sqlite", readonly=True)
        try:
            start = ledger.choice(choice["backbone"], "LP") if choice["method"] == "LP-FT" else None
            k = (choice["run"].get("metrics") or {})["n_trainable_layers"]
            numerics = read_backbone(ledger, choice["backbone"]).numerics.get(str(k), read_manifest(ledger).numerics)
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
