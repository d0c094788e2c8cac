"""Splits from a labels file (``path,label[,split]`` rows) instead of a folder tree, by the folders' rules;
errors name the CSV line and column."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from transferlab.core.errors import ConfigError, UserError
from transferlab.data.decoding import IMAGE_EXTENSIONS
from transferlab.data.splits import ImageSplits, Split, check_sampling, take_and_carve

log = logging.getLogger(__name__)



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
    path = Path(csv_path)
    if not path.is_file():
        raise ConfigError("data", path, "no such file")
    check_sampling(valid_frac, max_per_class)
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
    tr_files, tr_labels, va_files, va_labels = take_and_carve(
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
