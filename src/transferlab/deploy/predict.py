"""Classify images with a trained model: ``load_classifier(MODEL_DIR or RUN_DIR).predict(images)``.

Images go through the training code path, :class:`transferlab.data.ImageDataset`:
:func:`transferlab.data.load_rgb` (with the same reduced-scale JPEG decoding), then the numbers of
:func:`transferlab.data.build_transform` (computed as pixels, then normalised in place); PIL images through
:func:`transferlab.data.to_rgb` (what load_rgb does after opening the file) and the same view. On CPU
the numbers are those of training's test evaluation (fp32, same preprocessing).
Evaluation on a data folder (:func:`run_split`) rebuilds the splits with the run's own split settings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import nn
from tqdm.auto import tqdm

from transferlab.core.devices import Placement, keep_freed_memory, resolve_device
from transferlab.core.errors import ConfigError, UserError
from transferlab.data import (
    BAD_IMAGE_ERRORS,
    IMAGE_EXTENSIONS,
    ChildSignalSafeLoader,
    DataConfig,
    ImageDataset,
    Preprocessing,
    Split,
    default_num_workers,
    describe_bad_image,
    to_rgb,
)
from transferlab.data.loader import batches_in_turns, consecutive_batches
from transferlab.data.transforms import eval_pixels
from transferlab.deploy.model_folder import ModelConfig, is_model_folder, model_config

ImageLike = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: the top class, its probability and the top-k (class, probability) pairs."""

    path: str
    predicted: str
    probability: float
    top_k: tuple[tuple[str, float], ...]
    label: str | None = None  # the true class, when known (evaluation mode)

    def as_dict(self) -> dict:
        out = {"path": self.path, "predicted": self.predicted, "probability": self.probability,
               "top_k": [{"class": c, "probability": p} for c, p in self.top_k]}
        if self.label is not None:
            out["label"] = self.label
        return out


def own_copy(img: Image.Image) -> Image.Image:
    """An image to decode that is not the caller's object (which is never changed): a file-backed image
    not yet loaded is opened afresh from its file, so it decodes as its path does (a JPEG at reduced
    scale); anything else is copied as it is (a JPEG the caller already loaded stays at full size)."""
    filename = getattr(img, "filename", "")
    if isinstance(img, ImageFile.ImageFile) and img.tile and filename:
        try:
            return Image.open(filename)
        except OSError:
            pass
    copy = img.copy()
    copy.format = img.format  # copy() forgets it; to_rgb decides by it whether to box-reduce
    return copy


class _Items(ImageDataset):
    """Paths go through ImageDataset (load_rgb + build_transform's numbers); PIL images through to_rgb and
    the same view: everything load_rgb does after opening a file, so an image opened from a path predicts
    as the path does (a JPEG not yet loaded is decoded at reduced scale too). The caller's images are
    not changed (:func:`own_copy`)."""

    def __init__(self, items: Sequence[ImageLike], pre: Preprocessing):
        self.items = list(items)
        paths = tuple("" if isinstance(x, Image.Image) else os.fspath(x) for x in self.items)
        super().__init__(Split("predict", paths, (0,) * len(paths)), pre)

    def pixels(self, i: int) -> np.ndarray | None:
        item = self.items[i]
        if not isinstance(item, Image.Image):
            return super().pixels(i)
        try:
            return eval_pixels(to_rgb(own_copy(item), min_size=self.pre.resize_size), self.pre)
        except BAD_IMAGE_ERRORS:  # a lazily opened image whose file does not decode
            return None

    def describe_bad(self, i: int) -> str:
        """'NAME (reason)' of item `i`, which did not decode."""
        item = self.items[i]
        if isinstance(item, Image.Image):
            try:
                to_rgb(own_copy(item))
            except BAD_IMAGE_ERRORS as e:
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                return f"{_name(item, i)} ({reason})"
            return f"{_name(item, i)} (decoded on retry)"
        path = self.split.files[i]
        return f"{path} ({describe_bad_image(path)})"


def find_images(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files named directly, plus every image under named folders (recursive, same rules as training:
    hidden files and folders skipped, extensions .jpg .jpeg .png .bmp .webp, sorted)."""
    files: list[str] = []
    for item in inputs:
        path = os.fspath(item)
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = []
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, n) for n in sorted(filenames)
                          if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise UserError(f"{path}: no images inside ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += sorted(found)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


class Classifier:
    """A trained network with its class names and preprocessing.

    The network is moved to `device` and to channels_last in place (as training runs it); a batch's
    probabilities can then differ from the same images' in another batch in the last bits (about 1e-8).
    Predicting applies :func:`~transferlab.core.devices.keep_freed_memory` to the process.
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], preprocessing: Preprocessing, config: dict | None = None,
                 device: str = "auto"):
        self.device = resolve_device(device)
        self.placement = Placement(self.device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()  # as training runs it
        self.classes = tuple(classes)
        self.preprocessing = preprocessing
        self.config = config or {}

    def predict_proba(self, images: Sequence[ImageLike], batch_size: int = 64, on_bad_image: str = "error",
                      num_workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, list[int]]:
        """(probabilities (n_kept, n_classes) float64, indices of `images` kept).

        Paths and PIL images take the same steps (:func:`transferlab.data.to_rgb`): a PIL image opened
        from a path gives the path's numbers (a JPEG not yet loaded is decoded at reduced scale in place).
        Undecodable files: 'error' raises one UserError listing all of them; 'skip' leaves them out.
        """
        if on_bad_image not in ("error", "skip"):
            raise ConfigError("on_bad_image", on_bad_image, "expected error or skip")
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be at least 1")
        keep_freed_memory()  # else every batch's tensors (activations, on CPU) are page-faulted in afresh: 2.5x slower
        dataset = _Items(images, self.preprocessing)
        plain = all(not isinstance(x, Image.Image) for x in dataset.items)
        loader: Iterable
        if num_workers is None and self.device.type == "cpu":
            # Decoding takes turns with the model (as extraction's does): worker processes would fight its
            # threads for the cores. The caller's PIL images are decoded by this thread alone: two threads
            # copying one lazily loaded image would both load it.
            loader = batches_in_turns(dataset, consecutive_batches(len(dataset), batch_size), threads=None if plain else 0)
        else:
            if num_workers is None:
                num_workers = default_num_workers() if plain and len(dataset) > batch_size else 0
            loader = ChildSignalSafeLoader(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                                       num_workers=num_workers))
        probs: list[torch.Tensor] = []
        kept: list[int] = []
        bad: list[int] = []
        bar = tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress, leave=False)
        try:
            with torch.no_grad():
                for x, _labels, idx, ok in loader:
                    bad += idx[~ok].tolist()
                    if ok.any() and not (bad and on_bad_image == "error"):  # once it will fail, only keep listing
                        logits = self.model(self.placement.put(x[ok]))
                        probs.append(torch.softmax(logits.float(), dim=1).double().cpu())
                        kept += idx[ok].tolist()
                    bar.update(len(idx))
        finally:
            bar.close()
            close = getattr(loader, "close", None)
            if close is not None:  # the decoding threads stop now, also when the model raised
                close()
        if bad and on_bad_image == "error":
            listing = "; ".join(dataset.describe_bad(i) for i in bad)
            raise UserError(f"{len(bad)} image(s) cannot be decoded: {listing} (fix or remove them, or pass --on-bad-image skip)")
        out = torch.cat(probs).numpy() if probs else np.zeros((0, len(self.classes)))
        return out, kept

    def predict(self, images: Sequence[ImageLike] | ImageLike, top_k: int = 5, batch_size: int = 64,
                on_bad_image: str = "error", progress: bool = False, num_workers: int | None = None) -> list[Prediction]:
        """One :class:`Prediction` per image (in input order; with 'skip', undecodable files are left out)."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if top_k < 1:
            raise ConfigError("top_k", top_k, "must be at least 1")
        probs, kept = self.predict_proba(images, batch_size, on_bad_image, num_workers, progress)
        return rows_from_probabilities(probs, [_name(images[i], i) for i in kept], self.classes, top_k)


def _name(item: ImageLike, i: int) -> str:
    return f"<image {i}>" if isinstance(item, Image.Image) else os.fspath(item)


def rows_from_probabilities(probs: np.ndarray, names: Sequence[str], classes: Sequence[str], top_k: int) -> list[Prediction]:
    k = min(top_k, len(classes))
    rows = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")[:k]  # ties: the lower label first, as argmax
        top = tuple((classes[j], float(p[j])) for j in order)
        rows.append(Prediction(name, top[0][0], top[0][1], top))
    return rows


def _from_model_dir(path: Path, device: str) -> Classifier:
    from safetensors.torch import load_file

    from transferlab.models import load_backbone
    from transferlab.models.heads import new_head

    config = ModelConfig.read(path)
    name, classes = config.backbone, config.classes
    backbone = load_backbone(name, pretrained=False)
    backbone.reset_classifier(new_head(backbone.feature_dim, len(classes), seed=0))
    state = load_file(str(config.weights), device="cpu")
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{config.weights}: does not fit {name} with {len(classes)} classes ({str(e).splitlines()[0][:200]})") from None
    return Classifier(backbone.model.eval(), classes, config.preprocessing, config.raw, device)


SPLIT_SETTINGS = ("val_split", "test_split", "valid_frac", "split_seed", "max_per_class")


def run_data_config(config: dict, data: str, where: str, on_bad_image: str = "error") -> DataConfig:
    """The run's own split settings (its DataConfig, recorded in config.json's ``provenance.data.config``)
    applied to the images at `data`: the same split names, seed, validation fraction and per-class cap;
    `on_bad_image` is this command's (files a labels CSV lists that do not exist: stop, or skip them)."""
    recorded = ((config.get("provenance") or {}).get("data") or {}).get("config")
    missing = [k for k in SPLIT_SETTINGS if not isinstance(recorded, dict) or k not in recorded]
    if missing:
        raise UserError(f"--model {where}: its record lacks the run's split settings ({', '.join(missing)}), so --data cannot "
                        "rebuild the run's splits; re-export the run with this transferlab, or predict the files as IMAGE_OR_DIR")
    assert isinstance(recorded, dict)
    return DataConfig(data=os.fspath(data), on_bad_image=on_bad_image, **{k: recorded[k] for k in SPLIT_SETTINGS})


def run_split(clf: Classifier, data: str, split: str, where: str, on_bad_image: str = "error") -> tuple[list[str], list[str]]:
    """(files, class names) of split `split` (train, val or test) of `data`, built by the run's own split rules."""
    cfg = run_data_config(clf.config, data, where, on_bad_image)
    splits = cfg.load()
    chosen = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if chosen is None:
        raise UserError(f"--data {data}: has no {split} split (the run took its test split from '{cfg.test_split}')")
    return list(chosen.files), [splits.classes[i] for i in chosen.labels]


def load_classifier(path: str | os.PathLike, device: str = "auto", backbone: str | None = None,
                    method: str | None = None) -> Classifier:
    """A :class:`Classifier` from an exported MODEL_DIR (config.json + model.safetensors), a probe's
    output folder, or a sweep folder (`backbone` / `method` pick a chosen run; default the lowest val xent)."""
    from transferlab.deploy.trained import is_probe_dir, is_sweep_dir, load_trained

    path = Path(path)
    if is_model_folder(path):
        if backbone is not None or method is not None:
            raise ConfigError("model", path, "--backbone / --method pick a run of a sweep folder; this is an exported model")
        return _from_model_dir(path, device)
    if not (is_probe_dir(path) or is_sweep_dir(path)):
        raise UserError(f"--model {path}: not an exported model folder (config.json + model.safetensors), "
                        "a probe's output folder (run.json + head.safetensors) or a sweep folder (ledger.sqlite)")
    trained = load_trained(path, backbone, method)
    return Classifier(trained.model, trained.classes, trained.preprocessing, model_config(trained), device)
