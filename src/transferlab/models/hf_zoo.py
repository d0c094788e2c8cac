"""Adapter for HuggingFace transformers vision encoders: ``hf:MODEL_ID`` or ``hf:LOCAL_FOLDER``.

The only module that imports transformers (the optional extra ``transferlab[hf]``). The encoder
(``AutoModel``; for CLIP-like models their vision tower) has no classifier: :class:`EncoderClassifier`
adds a ``head`` on its pooled features (``pooler_output`` when the encoder defines one without extra
weights, else the CLS token of the last hidden state). Preprocessing comes from the model's image
processor config. Offline, a model id is read from the HF hub cache, or from a snapshot folder.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.data import Preprocessing
from transferlab.models import hub_cache
from transferlab.models.blocks import Call, call_rest, split_sequential
from transferlab.models.spec import BackboneSpec

NAME = "hf"
REF_FORM = "MODEL_ID"  # hf:MODEL_ID or hf:LOCAL_FOLDER
PREFIX = NAME + ":"
CLASSIFIER = "head"
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("backbone", "hf:", "needs the optional extra: pip install 'transferlab[hf]'") from None
    return transformers


class EncoderClassifier(nn.Module):
    """A vision encoder with a linear head on its pooled features: ``head(pool(encoder(x)))``."""

    def __init__(self, encoder: nn.Module, num_features: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(num_features, 1)  # a placeholder: the probe puts its own head here

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _source_folder(ref: str) -> tuple[str | None, str]:
    """(a local folder holding the model's config, where it was looked for)."""
    if os.path.isdir(ref):
        return ref, ref
    snap = hub_cache.cached_snapshot(ref)
    return snap, hub_cache.repo_folder(ref)


def _missing(ref: str, where: str, why: str) -> ConfigError:
    return ConfigError("backbone", PREFIX + ref, f"no pretrained weights: expected a local snapshot folder or the hub cache {where} "
                       f"({why}); pass hf:FOLDER, or --weights FILE with hf:FOLDER holding config.json")


def _ensure_local(ref: str) -> str:
    """A folder with the model's files: the given folder, the hub cache snapshot, or a fresh download."""
    folder, where = _source_folder(ref)
    if folder is not None:
        return folder
    if ref.startswith((".", "/", "~")):
        raise ConfigError("backbone", PREFIX + ref, "no such folder")
    why = hub_cache.offline_reason()
    if why is None:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        except Exception as e:
            why = f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    raise _missing(ref, where, why)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def _size(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def preprocessing_of(processor: Any) -> Preprocessing:
    """A :class:`Preprocessing` that feeds the model like `processor` (PIL backend) does."""
    size = getattr(processor, "size", None) or {}
    interpolation = RESAMPLE[int(getattr(processor, "resample", 2))]
    mean = tuple(float(v) for v in processor.image_mean)
    std = tuple(float(v) for v in processor.image_std)
    short = _size(size, "shortest_edge")
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if short is not None:
        side = _size(crop, "height") if crop else short
        assert side is not None
        return Preprocessing(side, side / short, interpolation, mean, std, resize=short)  # type: ignore[arg-type]
    height, width = _size(size, "height"), _size(size, "width")
    if height is None or height != width or crop:
        raise ConfigError("backbone", "hf:", f"image processor size {size} is not supported (shortest_edge, or a square height/width)")
    return Preprocessing(height, 1.0, interpolation, mean, std, squash=True)  # type: ignore[arg-type]


def _processor(folder: str) -> Any:
    tf = _transformers()
    try:
        return tf.AutoImageProcessor.from_pretrained(folder, backend="pil")
    except TypeError:  # transformers 4: the slow processor is the PIL one
        return tf.AutoImageProcessor.from_pretrained(folder, use_fast=False)


def resolve(ref: str) -> BackboneSpec:
    """The spec of ``hf:<ref>`` from its config and image processor config (local folder or hub cache)."""
    folder = _ensure_local(ref)
    config = _transformers().AutoConfig.from_pretrained(folder)
    pre = preprocessing_of(_processor(folder))
    return BackboneSpec(PREFIX + ref, "hf", ref, "unknown", None, pre, tag=str(getattr(config, "model_type", "")))


def weights_status(spec: BackboneSpec, model_dir: str) -> str:
    folder, where = _source_folder(spec.arch)
    if folder is None:
        return f"missing ({where})"
    has = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder))
    return "present" if has else f"missing (weights in {folder})"


def build(spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
    tf = _transformers()
    folder = _ensure_local(spec.arch)
    config = tf.AutoConfig.from_pretrained(folder)
    vision = _vision_config(config)
    if pretrained:
        if weights_status(spec, model_dir) != "present":
            raise _missing(spec.arch, folder, "the folder holds no weights file")
        cls = tf.AutoModel._model_mapping[type(vision)] if vision is not config else tf.AutoModel
        encoder = cls.from_pretrained(folder)
    else:
        encoder = tf.AutoModel.from_config(vision)
    if getattr(encoder, "pooler", None) is not None:  # ViT's dense+tanh pooler: not part of the features
        encoder.pooler = None
    return EncoderClassifier(encoder.eval(), int(vision.hidden_size)).eval()


def save_architecture(spec: BackboneSpec, folder: str) -> None:
    """Write the model's config and image processor config into `folder`: ``hf:FOLDER`` then builds the
    same architecture (random weights) and preprocessing without the original folder or the hub."""
    source = _ensure_local(spec.arch)
    _transformers().AutoConfig.from_pretrained(source).save_pretrained(folder)
    _processor(source).save_pretrained(folder)


def adapt_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Accept the encoder's own state dict (``save_pretrained``'s keys) as well as ours (``encoder.`` prefixed)."""
    own = model.state_dict()
    if sum(k in own for k in state) >= sum(f"encoder.{k}" in own for k in state):
        return state
    return {f"encoder.{k}" if f"encoder.{k}" in own else k: v for k, v in state.items()}


def classifier_name(model: nn.Module) -> str:
    return CLASSIFIER


def blocks(model: Any) -> list[tuple[str, nn.Module]]:
    """ViT / DINOv2 encoders: embeddings, each layer, final norm + CLS token, head. Others: [features, head]."""
    enc = model.encoder
    layers = getattr(enc, "layers", None)
    if layers is None and hasattr(enc, "encoder"):
        layers = getattr(enc.encoder, "layer", None)
    kind = type(enc).__name__
    if kind in ("ViTModel", "Dinov2Model") and isinstance(layers, nn.ModuleList) and hasattr(enc, "layernorm"):
        prefix = "encoder.layers" if hasattr(enc, "layers") else "encoder.encoder.layer"

        def unit(layer: nn.Module) -> Call:
            def run(x: torch.Tensor) -> torch.Tensor:
                out = layer(x)
                return out[0] if isinstance(out, tuple) else out

            return Call(run, {"layer": layer})

        dtype = next(enc.parameters()).dtype
        chain: list[tuple[str, nn.Module]] = [("encoder.embeddings", Call(lambda x: enc.embeddings(x.to(dtype)), {"embeddings": enc.embeddings}))]
        chain += [(name, unit(layer)) for name, layer in split_sequential(prefix, layers)]
        chain.append(("encoder.layernorm", Call(lambda h: enc.layernorm(h)[:, 0], {"layernorm": enc.layernorm})))
        return chain + [(CLASSIFIER, model.head)]
    return [("features", call_rest(model.features, model, [model.head])), (CLASSIFIER, model.head)]


def list_available(pattern: str, model_dir: str) -> list[dict]:
    """Models in the local HF hub cache matching `pattern` (the hub itself is not searched)."""
    root = hub_cache.cache_dir()
    rows = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not entry.startswith("models--"):
            continue
        repo = entry.removeprefix("models--").replace("--", "/")
        if fnmatch.fnmatch(repo, pattern) and hub_cache.cached_snapshot(repo):
            spec = BackboneSpec(PREFIX + repo, "hf", repo, "unknown", None, Preprocessing())
            rows.append({"name": spec.name, "zoo": "hf", "source": "unknown", "source_top1": None, "weights": weights_status(spec, model_dir)})
    return rows
