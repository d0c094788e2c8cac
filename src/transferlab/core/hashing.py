"""Canonical JSON and the hashes of configs and files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None so the JSON is standard (diverged runs record them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Serialise dataclasses, paths and scalars to standard JSON (non-finite floats become null)."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_finite_or_none(plain), indent=indent, sort_keys=False, allow_nan=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of `obj` (key order does not matter)."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
