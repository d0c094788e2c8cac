"""Splits from an image folder: ``ROOT/train/<class>/*`` is required; ``ROOT/<val_split>/<class>/*`` is the
validation set if present (else a stratified, seeded slice of train); ``ROOT/<test_split>/<class>/*`` is the
test set if present. Files are found recursively; hidden files and files without an image extension are
ignored. A path ending in ``.csv`` is a labels file instead (:mod:`transferlab.data.csv_labels`).
"""

from __future__ import annotations

import os
from pathlib import Path

from transferlab.core.errors import ConfigError, UserError
from transferlab.data.csv_labels import load_csv_splits
from transferlab.data.decoding import IMAGE_EXTENSIONS
from transferlab.data.splits import ImageSplits, Split, check_sampling, take_and_carve


def _scan_class_folders(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Map class name -> sorted image files (recursive, following symlinks); also list ignored files."""
    classes: dict[str, list[str]] = {}
    ignored: list[str] = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():  # follows symlinks
            ignored.append(entry.path)
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append(path)
                else:
                    files.append(path)
        classes[entry.name] = sorted(files)
    return classes, ignored


def _require_nonempty(split_dir: Path, per_class: dict[str, list[str]]) -> None:
    if not per_class:
        raise UserError(f"{split_dir}: no class folders inside (expected {split_dir}/<class>/<image>)")
    empty = [c for c, files in per_class.items() if not files]
    if empty:
        raise UserError(
            f"{split_dir}: class folder(s) with no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
            + ", ".join(str(split_dir / c) for c in empty)
        )


def _check_same_classes(train_dir: Path, other_dir: Path, train: set[str], other: set[str]) -> None:
    if train != other:
        parts = []
        if train - other:
            parts.append(f"only in {train_dir}: {', '.join(sorted(train - other))}")
        if other - train:
            parts.append(f"only in {other_dir}: {', '.join(sorted(other - train))}")
        raise UserError("class folders differ between splits; " + "; ".join(parts))


def load_splits(
    root: str | os.PathLike,
    val_split: str = "val",
    test_split: str = "test",
    valid_frac: float = 0.2,
    split_seed: int = 0,
    max_per_class: int | None = None,
    on_bad_image: str = "error",
) -> ImageSplits:
    """Find the images under `root` and build train / val / test splits.

    If `val_split` exists (and is not also the test split) it is the validation set; otherwise a
    stratified `valid_frac` of each class is carved out of train with `split_seed`. `max_per_class`
    caps the images taken from train (before carving), chosen with the same seed. `on_bad_image`
    applies to the files a labels CSV lists that do not exist (see :func:`load_csv_splits`).
    """
    if str(root).lower().endswith(".csv"):  # a labels file instead of a folder tree
        return load_csv_splits(root, val_split, test_split, valid_frac, split_seed, max_per_class, on_bad_image)
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("data", root, "no such folder")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise ConfigError("data", root, f"missing {train_dir} (expected {root}/train/<class>/<image>)")
    check_sampling(valid_frac, max_per_class)

    train_files, ignored = _scan_class_folders(train_dir)
    _require_nonempty(train_dir, train_files)
    classes = tuple(sorted(train_files))
    index = {c: i for i, c in enumerate(classes)}

    def folder_split(name: str, split_dir: Path) -> Split:
        per_class, ign = _scan_class_folders(split_dir)
        ignored.extend(ign)
        _require_nonempty(split_dir, per_class)
        _check_same_classes(train_dir, split_dir, set(classes), set(per_class))
        files = [f for c in classes for f in per_class[c]]
        labels = [index[c] for c in classes for _ in per_class[c]]
        return Split(name, tuple(files), tuple(labels), f"{split_dir.name}/")

    test_dir = root / test_split
    test = folder_split("test", test_dir) if test_dir.is_dir() and test_split != "train" else None

    val_dir = root / val_split
    use_val_folder = val_dir.is_dir() and val_split not in (test_split, "train")
    tr_files, tr_labels, va_files, va_labels = take_and_carve(
        classes, train_files, split_seed, max_per_class, None if use_val_folder else valid_frac,
        lambda c, n: f"{train_dir / c}: {n} image(s); carving a validation split needs at least 2 per class")

    train = Split("train", tuple(tr_files), tuple(tr_labels), "train/")
    if use_val_folder:
        val = folder_split("val", val_dir)
    else:
        val = Split("val", tuple(va_files), tuple(va_labels), f"carved from train/ ({valid_frac:g}, seed {split_seed})")
    return ImageSplits(str(root.resolve()), classes, train, val, test, tuple(ignored))
