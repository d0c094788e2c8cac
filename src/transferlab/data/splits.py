"""Splits as records: one split's files and labels, a data folder's classes and train / val / test
splits, how train is sampled and carved into train and validation, and what a split depends on
(its fingerprint, and a sentence saying how two fingerprints differ)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from transferlab.core.errors import ConfigError, UserError
from transferlab.data.decoding import describe_bad_image

log = logging.getLogger(__name__)


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
        """Images per class, for labels 0 .. n_classes - 1."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=n_classes).tolist()

    def subset(self, keep: list[int]) -> Split:
        """The split of the items at positions `keep`, in that order (same name and source)."""
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
        """Root, classes, and per split its source, size and per-class counts; counts of ignored and missing files."""
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
        only) while a file is untouched; see :mod:`transferlab.core.digests`.
        """
        return {s.name: split_fingerprint(s, memo_dir) for s in (self.train, self.val, self.test) if s is not None}


def split_fingerprint(split: Split, memo_dir: str | os.PathLike | None = None) -> list:
    """[path, size, content digest, label] per file ([path, -1, "", label] for one that cannot be read):
    what a cached result computed from `split` depends on. Digests are BLAKE2b of the bytes
    (:func:`transferlab.core.digests.file_digests`, remembered in `memo_dir` while a file is untouched)."""
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


def check_sampling(valid_frac: float, max_per_class: int | None) -> None:
    """Refuse a carving fraction outside (0, 1) and a per-class cap below 1, naming the field."""
    if not 0.0 < valid_frac < 1.0:
        raise ConfigError("valid_frac", valid_frac, "must be between 0 and 1")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError("max_per_class", max_per_class, "must be at least 1")


def take_and_carve(classes: tuple[str, ...], train_files: dict[str, list[str]], split_seed: int, max_per_class: int | None,
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


def bad_image_policy(split: Split, bad_files: list[str], on_bad_image: str) -> list[int]:
    """Indices of `split` to keep. 'error': one UserError listing every bad file; 'skip': drop them (logged)."""
    if not bad_files:
        return list(range(len(split)))
    if on_bad_image == "error":
        listing = "; ".join(f"{p} ({describe_bad_image(p)})" for p in bad_files)
        raise UserError(
            f"{len(bad_files)} image(s) in split '{split.name}' cannot be decoded: {listing} "
            "(fix or remove them, or pass --on-bad-image skip)"
        )
    for p in bad_files:
        log.warning("skipping unreadable image %s", p)
    bad = set(bad_files)
    return [i for i, f in enumerate(split.files) if f not in bad]
