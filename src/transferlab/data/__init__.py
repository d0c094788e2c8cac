"""Image folders: finding the files, splitting them, decoding any image into a normalised tensor.

Layout: ``ROOT/train/<class>/*`` is required; ``ROOT/<val_split>/<class>/*`` is the validation set if
present (else a stratified, seeded slice of train); ``ROOT/<test_split>/<class>/*`` is the test set if
present. Files are found recursively; hidden files and files without an image extension are ignored.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.fields import option

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# Errors PIL raises for zero-byte, truncated, corrupt or absurdly large files.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)

# How files become pixels; part of every cache key, so caches made by an older decoder are not reused.
# "exif-transpose": EXIF orientation is applied (a portrait phone photo is upright).
# "v2": 16-bit images are reduced (they failed) and EXIF-transposed (they were not); JPEGs over PIL's
# bomb limit at full size but not at their reduced scale decode (they were refused).
DECODER = "pil-rgb-exif-transpose-v2"
ON_BAD_IMAGE = ("error", "skip")


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation preprocessing: resize the short side, center crop, normalise.

    The short side goes to `resize` pixels when given (torchvision's weights transforms, HF image
    processors), else to ``int(input_size / crop_pct)`` (timm's crop_pct). With `squash` the image is
    resized to input_size x input_size directly, aspect ratio not kept, and not cropped (HF ViT).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"  # one of INTERPOLATIONS
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: int | None = None
    squash: bool = False

    @property
    def resize_size(self) -> int:
        if self.squash:
            return self.input_size
        return self.resize if self.resize is not None else int(self.input_size / self.crop_pct)


# PIL resampling filters by the names timm, torchvision and HF use.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Split:
    """One split: parallel tuples of file paths and integer labels."""

    name: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    source: str = ""  # folder it came from, e.g. "train/" or "carved from train/"

    def __len__(self) -> int:
        return len(self.files)

    def counts(self, n_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=n_classes).tolist()

    def subset(self, keep: list[int]) -> Split:
        return Split(self.name, tuple(self.files[i] for i in keep), tuple(self.labels[i] for i in keep), self.source)


@dataclass(frozen=True)
class ImageSplits:
    """Classes and the train / val / test splits of one data folder."""

    root: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split | None
    ignored_files: tuple[str, ...] = field(default=(), repr=False)
    # Files a labels CSV lists that do not exist, skipped under on_bad_image="skip": {split name: files}.
    missing_files: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    def summary(self) -> dict:
        n = len(self.classes)
        out = {"root": self.root, "classes": list(self.classes), "n_classes": n}
        for split in (self.train, self.val, self.test):
            if split is not None:
                out[split.name] = {"source": split.source, "n": len(split), "per_class": split.counts(n)}
        out["ignored_files"] = len(self.ignored_files)
        if self.missing_files:
            out["missing_files"] = sum(len(files) for files in self.missing_files.values())
        return out

    def fingerprint(self, memo_dir: str | os.PathLike | None = None) -> dict[str, list]:
        """{split name: [path, size, content digest, label] per file} for train, val and test.

        Digests are remembered in `memo_dir` (pass the feature-cache folder; None: in this process
        only) while a file is untouched; see :mod:`transferlab.digests`.
        """
        return {s.name: split_fingerprint(s, memo_dir) for s in (self.train, self.val, self.test) if s is not None}


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split."""

    data: str = option("", "image folder with train/<class>/* (val/, test/ optional)")
    val_split: str = option("val", "validation folder name")
    test_split: str = option("test", "test folder name")
    valid_frac: float = option(0.2, "fraction of train carved out as validation when there is no val folder")
    split_seed: int = option(0, "seed of the carved validation split and of --max-per-class")
    max_per_class: int | None = option(None, "cap train (+ carved val) images per class")
    on_bad_image: str = option("error", "undecodable image files (and files a labels CSV lists that do not exist): "
                              "list them and stop, or skip them", choices=ON_BAD_IMAGE)

    def load(self) -> ImageSplits:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError("on_bad_image", self.on_bad_image, "expected error or skip")
        return load_splits(self.data, self.val_split, self.test_split, self.valid_frac, self.split_seed, self.max_per_class,
                           self.on_bad_image)


def split_fingerprint(split: Split, memo_dir: str | os.PathLike | None = None) -> list:
    """[path, size, content digest, label] per file ([path, -1, "", label] for one that cannot be read):
    what a cached result computed from `split` depends on. Digests are BLAKE2b of the bytes
    (:func:`transferlab.digests.file_digests`, remembered in `memo_dir` while a file is untouched)."""
    from transferlab.core.digests import file_digests

    return [[path, size, digest, label]
            for path, label, (size, digest) in zip(split.files, split.labels, file_digests(split.files, memo_dir))]


def describe_data_change(old: dict[str, list], new: dict[str, list]) -> str:
    """'3 files added, 1 modified in split test' from two {split: fingerprint} maps ('' if equal)."""
    def by_mtime(fingerprint: dict[str, list]) -> bool:  # made before content digests: [path, size, mtime_ns, label]
        return any(not isinstance(row[2], str) for rows in fingerprint.values() for row in rows or [])

    if by_mtime(old) != by_mtime(new):
        return ("the recorded fingerprint is of file sizes and modification times (an older transferlab), "
                "which cannot tell whether the contents are the same")
    parts = []
    for name in dict.fromkeys(list(old) + list(new)):
        before = {row[0]: row[1:] for row in old.get(name) or []}
        after = {row[0]: row[1:] for row in new.get(name) or []}
        added = len(after.keys() - before.keys())
        removed = len(before.keys() - after.keys())
        modified = sum(1 for f in after.keys() & before.keys() if after[f][:2] != before[f][:2])
        relabelled = sum(1 for f in after.keys() & before.keys() if after[f][2] != before[f][2])
        counts = [(added, "added"), (removed, "removed"), (modified, "modified"), (relabelled, "relabelled")]
        said = [f"{n} file{'s' if n != 1 else ''} {what}" for n, what in counts if n]
        if said:
            parts.append(f"{', '.join(said)} in split {name}")
    return "; ".join(parts)


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


def _take_and_carve(classes: tuple[str, ...], train_files: dict[str, list[str]], split_seed: int, max_per_class: int | None,
                    valid_frac: float | None, too_few: Callable[[str, int], str]) -> tuple[list[str], list[int], list[str], list[int]]:
    """(train files, labels, carved val files, labels): per class, at most `max_per_class` images drawn with
    `split_seed`, then a stratified `valid_frac` of them carved out as validation (None: no carving).

    Each split keeps file order, so runs do not depend on the order of the carving permutation.
    """
    rng = np.random.default_rng(split_seed)
    tr_files: list[str] = []
    tr_labels: list[int] = []
    va_files: list[str] = []
    va_labels: list[int] = []
    for label, c in enumerate(classes):
        files = train_files[c]
        order = rng.permutation(len(files)) if (max_per_class or valid_frac is not None) else np.arange(len(files))
        if max_per_class is not None:
            order = order[:max_per_class]
        chosen = [files[i] for i in order]
        n_val = 0
        if valid_frac is not None:
            if len(chosen) < 2:
                raise UserError(too_few(c, len(chosen)))
            n_val = min(len(chosen) - 1, max(1, round(len(chosen) * valid_frac)))
        va_files += sorted(chosen[:n_val])
        va_labels += [label] * n_val
        tr_files += sorted(chosen[n_val:])
        tr_labels += [label] * (len(chosen) - n_val)
    return tr_files, tr_labels, va_files, va_labels


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
    if not 0.0 < valid_frac < 1.0:
        raise ConfigError("valid_frac", valid_frac, "must be between 0 and 1")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError("max_per_class", max_per_class, "must be at least 1")

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
    tr_files, tr_labels, va_files, va_labels = _take_and_carve(
        classes, train_files, split_seed, max_per_class, None if use_val_folder else valid_frac,
        lambda c, n: f"{train_dir / c}: {n} image(s); carving a validation split needs at least 2 per class")

    train = Split("train", tuple(tr_files), tuple(tr_labels), "train/")
    if use_val_folder:
        val = folder_split("val", val_dir)
    else:
        val = Split("val", tuple(va_files), tuple(va_labels), f"carved from train/ ({valid_frac:g}, seed {split_seed})")
    return ImageSplits(str(root.resolve()), classes, train, val, test, tuple(ignored))


def load_csv_splits(
    csv_path: str | os.PathLike,
    val_split: str = "val",
    test_split: str = "test",
    valid_frac: float = 0.2,
    split_seed: int = 0,
    max_per_class: int | None = None,
    on_bad_image: str = "error",
) -> ImageSplits:
    """Splits from a labels file with columns ``path,label`` and optionally ``split``.

    Relative paths are resolved against the CSV's folder. ``split`` values are ``train``, `val_split`
    and `test_split` (rows without a split column are train). The rules are those of folders: the
    val rows are the validation set, else a stratified `valid_frac` of train is carved with
    `split_seed` (same permutation as :func:`load_splits` on the same files); test is optional; every
    split must hold every train class. Errors name the CSV line and column.

    Rows whose file does not exist: with `on_bad_image` "error", one UserError listing all of them
    (with their lines); with "skip", they are dropped before splitting (as if not listed), logged,
    and returned in ``ImageSplits.missing_files``.
    """
    import csv

    path = Path(csv_path)
    if not path.is_file():
        raise ConfigError("data", path, "no such file")
    if not 0.0 < valid_frac < 1.0:
        raise ConfigError("valid_frac", valid_frac, "must be between 0 and 1")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError("max_per_class", max_per_class, "must be at least 1")
    base = path.resolve().parent
    allowed = {"train", val_split, test_split}
    rows: dict[str, list[tuple[str, str, int]]] = {}  # split value -> (file, label, line)
    seen: dict[str, int] = {}
    missing: list[tuple[int, str, str]] = []  # (line, split value, file)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            for column in ("path", "label"):
                if column not in header:
                    raise UserError(f"{path}: line 1: missing column '{column}' (header: {','.join(header) or 'empty'}; "
                                    "expected path,label[,split])")
            reader.fieldnames = header
            for record in reader:
                line = reader.line_num
                where = f"{path}: line {line}"
                if record.get(None):  # DictReader puts fields beyond the header under the key None
                    raise UserError(f"{where}: {len(header) + len(record[None])} fields, the header has {len(header)}")
                if not any((v or "").strip() for k, v in record.items() if k is not None):
                    continue  # blank line
                file, label = (record.get("path") or "").strip(), (record.get("label") or "").strip()
                if not file:
                    raise UserError(f"{where}, column path: empty")
                if not label:
                    raise UserError(f"{where}, column label: empty label for {file}")
                split = (record.get("split") or "").strip() if "split" in header else "train"
                if split not in allowed:
                    raise UserError(f"{where}, column split: unknown split value '{split}' (expected one of "
                                    f"{', '.join(sorted(allowed))})")
                full = os.path.normpath(os.path.join(base, file))
                if Path(full).suffix.lower() not in IMAGE_EXTENSIONS:
                    raise UserError(f"{where}, column path: {file} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
                if full in seen:
                    raise UserError(f"{where}, column path: {file} is listed again (first on line {seen[full]})")
                seen[full] = line
                if not os.path.isfile(full):
                    missing.append((line, split, full))
                    continue
                rows.setdefault(split, []).append((full, label, line))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if missing:
        listing = "; ".join(f"line {line}, column path: no such file {file}" for line, _split, file in missing)
        if on_bad_image == "error":
            raise UserError(f"{path}: {len(missing)} listed file(s) do not exist: {listing} "
                            "(fix the paths, or pass --on-bad-image skip)")
        log.warning("%s: skipping %d listed file(s) that do not exist: %s", path, len(missing), listing)
    train_rows = rows.get("train", [])
    if not train_rows:
        raise UserError(f"{path}: no train rows (column split: rows with 'train', or no split column)")
    train_files: dict[str, list[str]] = {}
    for file, label, _line in train_rows:
        train_files.setdefault(label, []).append(file)
    classes = tuple(sorted(train_files))
    index = {c: i for i, c in enumerate(classes)}

    def csv_split(name: str, value: str) -> Split:
        per_class: dict[str, list[str]] = {}
        for file, label, line in rows[value]:
            if label not in index:
                raise UserError(f"{path}: line {line}, column label: class '{label}' of split '{value}' has no train rows")
            per_class.setdefault(label, []).append(file)
        missing = [c for c in classes if c not in per_class]
        if missing:
            raise UserError(f"{path}: column split: split '{value}' has no rows of class(es) {', '.join(missing)}")
        files = [f for c in classes for f in sorted(per_class[c])]
        labels = [index[c] for c in classes for _ in per_class[c]]
        return Split(name, tuple(files), tuple(labels), f"{path.name} [{value}]")

    test = csv_split("test", test_split) if test_split != "train" and rows.get(test_split) else None
    use_val = val_split not in (test_split, "train") and bool(rows.get(val_split))
    tr_files, tr_labels, va_files, va_labels = _take_and_carve(
        classes, {c: sorted(train_files[c]) for c in classes}, split_seed, max_per_class, None if use_val else valid_frac,
        lambda c, n: f"{path}: class '{c}' has {n} train row(s); carving a validation split needs at least 2 per class")
    train = Split("train", tuple(tr_files), tuple(tr_labels), f"{path.name} [train]")
    if use_val:
        val = csv_split("val", val_split)
    else:
        val = Split("val", tuple(va_files), tuple(va_labels), f"carved from {path.name} [train] ({valid_frac:g}, seed {split_seed})")
    split_name = {val_split: "val", test_split: "test", "train": "train"}  # the names' precedence in the rules above
    missing_files: dict[str, tuple[str, ...]] = {}
    for _line, value, file in missing:
        name = split_name[value]
        missing_files[name] = missing_files.get(name, ()) + (file,)
    return ImageSplits(str(path.resolve()), classes, train, val, test, (), missing_files)


# Modes PIL cannot reduce or convert to RGB faithfully: they are box-reduced in float and scaled to 8 bits.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _is_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def _check_decoded_size(img: Image.Image) -> None:
    """PIL's decompression-bomb rule (refuse over twice ``Image.MAX_IMAGE_PIXELS``), on the size that will be decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.size[0] * img.size[1] > 2 * limit:
        raise Image.DecompressionBombError(
            f"Image size ({img.size[0] * img.size[1]} pixels, decoded at {img.size[0]}x{img.size[1]}) exceeds limit of "
            f"{2 * limit} pixels, could be decompression bomb DOS attack.")


def open_image(path: str, min_size: int | None = None) -> Image.Image:
    """Open `path` lazily; a JPEG is set to decode at reduced scale (``draft``), still >= `min_size` on each side.

    PIL's decompression-bomb limit applies to the size actually decoded: a JPEG too large at full
    size but not at its reduced scale is opened; one still too large reduced is refused.
    """
    try:
        img: Image.Image = Image.open(path)
    except Image.DecompressionBombError:
        if min_size is None or not _is_jpeg(path):
            raise
        from PIL import JpegImagePlugin

        img = JpegImagePlugin.JpegImageFile(path)  # what Image.open builds, without its full-size check
        img.draft("RGB", (min_size, min_size))
        _check_decoded_size(img)
        return img
    if min_size is not None and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    return img


def to_rgb(img: Image.Image, min_size: int | None = None) -> Image.Image:
    """Everything :func:`load_rgb` does after opening a file, for a PIL image from anywhere: an 8-bit RGB image.

    Non-JPEG images with a short side of at least 4 x `min_size` are box-reduced right after decoding
    (kept at >= 2 x `min_size`) so later steps work on a small copy; a JPEG straight from
    ``Image.open`` (not yet loaded) is decoded at reduced scale, as from a path. 16-bit and 32-bit
    grey images are scaled to 8 bits (16-bit: v / 65535 * 255, rounded). A palette image with
    transparency goes through RGBA; the EXIF orientation is applied, so a photo taken in portrait is
    upright; grey, palette, RGBA and CMYK images become RGB; alpha is dropped. For a PNG path ``p``,
    ``to_rgb(Image.open(p), m)`` equals ``load_rgb(p, m)`` pixel for pixel.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on palette transparency and EXIF oddities
        if min_size is not None and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))  # a no-op once loaded
        img.load()
        info = {k: v for k, v in img.info.items() if k != "transparency"}  # keeps the EXIF orientation
        top = None
        if img.mode in HIGH_DEPTH_MODES:
            top = 65535.0 if img.mode.startswith("I;16") or float(np.asarray(img).max()) > 255 else 255.0
            img = img.convert("F")  # PIL cannot reduce 16-bit modes; float also averages without rounding
        if min_size is not None and img.format != "JPEG":
            factor = min(img.size) // (2 * min_size)
            if factor >= 2 and img.mode not in ("P", "1"):
                img = img.reduce(factor)
        if top is not None:
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            img.info.update(info)
        elif img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = ImageOps.exif_transpose(img) or img
        return img.convert("RGB")


def load_rgb(path: str, min_size: int | None = None) -> Image.Image:
    """Decode any supported image file into an 8-bit RGB PIL image: :func:`open_image`, then :func:`to_rgb`.

    Large JPEGs are decoded at reduced scale (still >= `min_size` on each side) so an 8000x6000 photo
    never materialises at full size; other large images are box-reduced right after decoding.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on bomb-sized images below its refusal limit
        return to_rgb(open_image(path, min_size), min_size)


def build_transform(pre: Preprocessing):
    """The torchvision transform for `pre` (PIL RGB image -> normalised float tensor)."""
    from torchvision import transforms

    interp = transforms.InterpolationMode(pre.interpolation)
    if pre.squash:
        resize = [transforms.Resize((pre.input_size, pre.input_size), interpolation=interp)]
    else:
        resize = [transforms.Resize(pre.resize_size, interpolation=interp), transforms.CenterCrop(pre.input_size)]
    return transforms.Compose(
        [
            *resize,
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )


DEFAULT_MIN_SCALE = 0.35  # smallest crop, as a fraction of the image's area


def augmented_view(img: Image.Image, pre: Preprocessing, gen: torch.Generator, min_scale: float = DEFAULT_MIN_SCALE) -> torch.Tensor:
    """A random resized crop (`min_scale`-100% of the area, aspect 3/4-4/3) and a coin-flip horizontal
    mirror, drawn from `gen` alone, then resized to the input size and normalised like the evaluation view."""
    from torchvision.transforms import functional as TF

    w, h = img.size

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand(1, generator=gen).item()

    box = None
    for _ in range(10):
        area = w * h * uniform(min_scale, 1.0)
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # extreme aspect ratios: the central square
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    resample = INTERPOLATIONS[pre.interpolation]
    img = img.crop(box).resize((pre.input_size, pre.input_size), resample)
    if torch.rand(1, generator=gen).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return TF.normalize(TF.to_tensor(img), pre.mean, pre.std)


def default_num_workers() -> int:
    """Decoding workers: enough to keep the model busy on a laptop."""
    return min(4, os.cpu_count() or 1)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy / random in each decoding worker from torch's per-worker seed (set by the loader's generator)."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ChildSignalSafeLoader:
    """Iterates a DataLoader's batches, then puts the process's SIGCHLD disposition back as it was.

    The first multi-worker DataLoader iterated in the main thread installs a process-wide Python
    SIGCHLD handler (torch's worker-failure check) and never removes it. From then on every child
    exit (a decoding worker, a sweep worker, a subprocess) interrupts some thread of the process;
    in our long-lived test process this went with heap corruption (segfaults inside malloc, 5 of 5
    full test runs; 3 of 3 passed once the handler was removed). This narrows the handler's life to
    the iteration itself; it is not restored if the iteration is closed off the main thread. Dead
    workers are still noticed without it, by the loader's own status checks (within about 5 s).
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD")
        before = signal.getsignal(signal.SIGCHLD) if main else None
        try:
            yield from self.loader
        finally:
            # `before` is None for a handler set outside Python: nothing we could put back.
            if before is not None and threading.current_thread() is threading.main_thread() \
                    and signal.getsignal(signal.SIGCHLD) is not before:
                signal.signal(signal.SIGCHLD, before)


def image_loader(split: Split, pre: Preprocessing, batch_size: int, num_workers: int, batch_sampler=None, pin: bool = False,
                 augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE) -> ChildSignalSafeLoader:
    """A DataLoader of ``(image, label, index, ok)`` in split order (or `batch_sampler`'s order)."""
    # Augmentations draw from per-item generators (see ImageDataset); the workers are seeded anyway
    # so nothing else they might randomise escapes the seed (pytorch#7068).
    dataset = ImageDataset(split, pre, augment_seed, min_scale)
    kwargs: dict = dict(num_workers=num_workers, pin_memory=pin, worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    if batch_sampler is not None:
        return ChildSignalSafeLoader(torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs))
    return ChildSignalSafeLoader(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs))


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(image_tensor, label, index, ok)``; a file that fails to decode gives ``ok=False``
    and a zero image, so one bad file never stops a pass and every bad file can be reported.

    With ``augment_seed`` set, each item is an :func:`augmented_view` drawn from a generator seeded by
    (augment_seed, index): the same numbers whatever the number or order of loader workers.
    """

    def __init__(self, split: Split, pre: Preprocessing, augment_seed: int | None = None, min_scale: float = DEFAULT_MIN_SCALE):
        self.split = split
        self.min_scale = min_scale
        self.pre = pre
        self.transform = build_transform(pre)
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.split.files[i], min_size=self.pre.resize_size)
            if self.augment_seed is None:
                x = self.transform(img)
            else:
                gen = torch.Generator().manual_seed(self.augment_seed * 1_000_003 + i)
                x = augmented_view(img, self.pre, gen, self.min_scale)
            ok = True
        except BAD_IMAGE_ERRORS:
            x = torch.zeros(3, self.pre.input_size, self.pre.input_size)
            ok = False
        return x, self.split.labels[i], i, ok


def describe_bad_image(path: str) -> str:
    """A short reason why `path` does not decode (for error listings)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        load_rgb(path)
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:120]
    return "decoded on retry"

