"""Extra test sets (out-of-distribution sets, ``--ood NAME=DIR``): a folder of ``<class>/*`` images or a
``path,label`` CSV whose classes are the training classes, read as one split evaluated by chosen models only."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from transferlab.core.errors import UserError
from transferlab.data.decoding import BAD_IMAGE_ERRORS, load_rgb
from transferlab.data.folders import _scan_class_folders
from transferlab.data.splits import Split, bad_image_policy

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")  # it becomes summary keys (ood_<name>_acc) and folder names


def load_eval_split(name: str, where: str, classes: tuple[str, ...] | list[str]) -> Split:
    """The images of extra test set `name` at `where`, labelled by the index of their class in `classes`.

    A UserError naming ``--ood NAME=DIR`` for a bad name, a missing folder or file, a CSV without
    ``path,label`` columns, and classes that are not exactly the training classes (the difference said).
    """
    flag = f"--ood {name}={where}"
    if not NAME.fullmatch(name):
        raise UserError(f"{flag}: the name must be lower-case letters, digits, '_' or '-' (at most 40), starting with a letter or digit")
    path = Path(where).expanduser()
    if path.is_dir():
        per_class, _ignored = _scan_class_folders(path)
        pairs = [(f, c) for c, files in per_class.items() for f in files]
    elif path.is_file() and path.suffix.lower() == ".csv":
        pairs = _csv_pairs(path, flag)
    else:
        raise UserError(f"{flag}: no such folder or .csv file")
    found = {c for _f, c in pairs}
    if found != set(classes):
        parts = [f"only in the training data: {', '.join(sorted(set(classes) - found))}" if set(classes) - found else "",
                 f"only in {path}: {', '.join(sorted(found - set(classes)))}" if found - set(classes) else ""]
        raise UserError(f"{flag}: its classes are not the training classes ({'; '.join(p for p in parts if p)})")
    index = {c: i for i, c in enumerate(classes)}
    return Split(f"ood_{name}", tuple(f for f, _c in pairs), tuple(index[c] for _f, c in pairs), str(path))


def checked_eval_split(split: Split, flag: str, on_bad_image: str) -> tuple[Split, list[str]]:
    """`split` with its undecodable images refused (one line naming them) or, with ``skip``, dropped: the
    split kept and the files dropped. Checked when the set is given, so a sweep never fails on it after training."""
    bad = [f for f in split.files if not _decodes(f)]
    try:
        keep = bad_image_policy(split, bad, on_bad_image)  # the training splits' policy
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    return (split, []) if not bad else (split.subset(keep), bad)


def _decodes(path: str) -> bool:
    try:
        load_rgb(path)
    except BAD_IMAGE_ERRORS:
        return False
    return True


def _csv_pairs(path: Path, flag: str) -> list[tuple[str, str]]:
    """(file, class) rows of a ``path,label`` CSV, relative paths resolved against its folder."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not {"path", "label"} <= set(header):
            raise UserError(f"{flag}: line 1: expected the columns path,label (header: {','.join(header) or 'empty'})")
        reader.fieldnames = header
        rows = []
        for r in reader:
            if not (r.get("path") or "").strip() or not (r.get("label") or "").strip():
                raise UserError(f"{flag}: line {reader.line_num}: expected a path and a label")
            file = r["path"].strip()
            rows.append((file if Path(file).is_absolute() else str((path.parent / file).resolve()), r["label"].strip()))
    missing = [file for file, _c in rows if not Path(file).is_file()]
    if missing:
        raise UserError(f"{flag}: {len(missing)} listed file(s) do not exist (first: {missing[0]})")
    return rows
