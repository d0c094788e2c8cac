"""Cached inputs stored as shards: one folder per (split, key), a few safetensors files of consecutive rows and
a manifest written last.

The layout is a function of the row count, the row size, the shard size and the batch size only, so a
local extraction and one spread over a cluster write the same files, byte for byte. A shard is the
unit of work of a distributed extraction and of a resumed one (a shard already on disk, intact, is not
computed again). A split larger than the memory budget is not loaded: :class:`ShardedRows` maps one
shard at a time and copies out the rows a minibatch asks for, so what stays resident is bounded by
one shard per source, whatever the number of images.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferlab.core.files import atomic_write_bytes
from transferlab.core.hashing import file_digest

MANIFEST = "manifest.json"


def shard_bounds(n_rows: int, row_bytes: int, shard_bytes: float, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard: about `shard_bytes` each, a whole number of `batch_size` batches, so a
    shard's batches are exactly the batches a pass over the whole split makes."""
    per_shard = max(1, int(shard_bytes // max(1, row_bytes)) // batch_size) * batch_size
    return [(start, min(start + per_shard, n_rows)) for start in range(0, n_rows, per_shard)]


def shard_name(index: int) -> str:
    return f"{index:05d}.safetensors"


def shard_bytes_of(inputs: torch.Tensor, labels: torch.Tensor, start: int, bad: list[int]) -> bytes:
    """A shard file's bytes: rows `start`.. of a split, their labels, the positions (in the split) of files
    that failed to decode. One metadata key, so the bytes do not depend on a map's iteration order."""
    from safetensors.torch import save

    inputs, labels = inputs.contiguous(), labels.contiguous()
    info = {"start": start, "rows": len(labels), "bad": bad, "inputs_sha256": _sha256(inputs), "labels_sha256": _sha256(labels)}
    return save({"inputs": inputs, "labels": labels}, metadata={"shard": json.dumps(info, sort_keys=True)})


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def write_shard(folder: Path, index: int, inputs: torch.Tensor, labels: torch.Tensor, start: int, bad: list[int]) -> dict:
    """Write shard `index` atomically into `folder`; returns its manifest entry."""
    data = shard_bytes_of(inputs, labels, start, bad)
    atomic_write_bytes(folder / shard_name(index), data)
    return {"file": shard_name(index), "start": start, "stop": start + len(labels), "bad": bad,
            "sha256": hashlib.sha256(data).hexdigest()}


def read_shard_entry(path: Path, index: int) -> dict | None:
    """The manifest entry of an existing shard file, None unless it is whole: its tensors must have the
    digests its metadata records (a shard kept from an interrupted extraction is checked so)."""
    from safetensors import safe_open

    try:
        meta, _tensors = _header(path)
        info = json.loads(meta["shard"])
        with safe_open(str(path), framework="pt") as f:
            if _sha256(f.get_tensor("inputs")) != info["inputs_sha256"] or _sha256(f.get_tensor("labels")) != info["labels_sha256"]:
                return None
        return {"file": shard_name(index), "start": info["start"], "stop": info["start"] + info["rows"],
                "bad": info["bad"], "sha256": file_digest(path)}
    except Exception:  # a half-written, damaged or foreign file: computed again
        return None


def intact_shard(folder: Path, index: int, bounds: tuple[int, int]) -> dict | None:
    """The manifest entry of shard `index` if its file is whole and holds rows `bounds` (kept from an
    interrupted extraction, or written by a worker), else None."""
    entry = read_shard_entry(folder / shard_name(index), index)
    return entry if entry is not None and (entry["start"], entry["stop"]) == tuple(bounds) else None


def write_manifest(folder: Path, shards: list[dict], row_shape: tuple[int, ...]) -> None:
    """The entry's manifest, written last: an entry without one is not in the cache."""
    manifest = {"rows": shards[-1]["stop"] if shards else 0, "row_shape": list(row_shape), "dtype": "float32", "shards": shards}
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (dtype, shape, absolute byte offset)}) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    return meta, {name: (t["dtype"], tuple(t["shape"]), 8 + n + t["data_offsets"][0]) for name, t in header.items()}


@dataclass(frozen=True)
class _Shard:
    path: Path
    start: int
    stop: int
    offset: int  # of the inputs in the file


class ShardedRows:
    """The rows (N, ...) of a cached split, in memory-mapped shards; picklable (it holds paths only).

    ``rows(idx)`` copies the rows at `idx` (any order) into a new tensor; one shard is mapped at a time,
    so resident memory stays within one shard plus the batch. ``select(keep)`` is the rows at `keep`
    (a view: nothing is read).
    """

    def __init__(self, shards: list[_Shard], row_shape: tuple[int, ...], index: np.ndarray | None = None):
        self.shards, self.row_shape, self.index = shards, tuple(row_shape), index
        self._stops = np.array([s.stop for s in shards], dtype=np.int64)
        self._mapped: tuple[int, np.memmap] | None = None

    @classmethod
    def open(cls, folder: Path, manifest: dict) -> ShardedRows:
        shards = []
        for entry in manifest["shards"]:
            path = folder / entry["file"]
            _meta, tensors = _header(path)
            dtype, shape, offset = tensors["inputs"]
            if dtype != "F32" or tuple(shape[1:]) != tuple(manifest["row_shape"]) or shape[0] != entry["stop"] - entry["start"]:
                raise ValueError(f"{path.name} does not hold the rows its manifest says")
            shards.append(_Shard(path, entry["start"], entry["stop"], offset))
        return cls(shards, tuple(manifest["row_shape"]))

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "row_shape": self.row_shape, "index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shards"], state["row_shape"], state["index"])  # type: ignore[misc]

    def __len__(self) -> int:
        return int(self._stops[-1]) if self.index is None else len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def nbytes(self) -> int:
        return len(self) * math.prod(self.row_shape) * 4

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def select(self, keep: list[int] | np.ndarray) -> ShardedRows:
        keep = np.asarray(keep, dtype=np.int64)
        return ShardedRows(self.shards, self.row_shape, keep if self.index is None else self.index[keep])

    def _map(self, s: int) -> np.memmap:
        if self._mapped is None or self._mapped[0] != s:
            self._mapped = None  # the previous shard is unmapped before the next one is mapped
            shard = _visible(self.shards[s])
            self._mapped = (s, np.memmap(shard.path, dtype=np.float32, mode="r", offset=shard.offset,
                                         shape=(shard.stop - shard.start, *self.row_shape)))
        return self._mapped[1]

    def rows(self, idx: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """The rows at positions `idx`, as a new float32 tensor in `idx`'s order."""
        pos = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
        if pos.dtype == np.bool_ or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
            raise TypeError(f"rows() takes integer positions, not {pos.dtype}")
        pos = pos.astype(np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1}")
        if self.index is not None:
            pos = self.index[pos]
        out = np.empty((len(pos), *self.row_shape), dtype=np.float32)
        which = np.searchsorted(self._stops, pos, side="right")
        for s in np.unique(which):
            mask = which == s
            out[mask] = self._map(int(s))[pos[mask] - self.shards[s].start]
        return torch.from_numpy(out)

    def __getitem__(self, item) -> torch.Tensor:
        if isinstance(item, (int, np.integer)):
            return self.rows([range(len(self))[item]])[0]  # range: negative positions, IndexError, no array
        if isinstance(item, slice):
            return self.rows(np.arange(len(self))[item])
        return self.rows(item)

    def identity(self) -> str:
        """What the rows are read from: each shard file's path, size and modification time, and the selection
        (the files are mapped read-only and every batch is a copy, so only rewriting a file changes them)."""
        files = [(str(s.path), _visible(s).path.stat().st_size, s.path.stat().st_mtime_ns, s.start, s.stop) for s in self.shards]
        return json.dumps([files, None if self.index is None else hashlib.sha256(self.index.tobytes()).hexdigest()])

    def float(self) -> ShardedRows:
        return self

    def cpu(self) -> ShardedRows:
        return self

    def load(self) -> torch.Tensor:
        """All rows in memory."""
        return self.rows(np.arange(len(self)))


class StackedRows:
    """K views of a split's rows, each in its own shards: (K, N, ...) without loading them."""

    def __init__(self, views: list[ShardedRows]):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.views), *self.views[0].shape))

    def float(self) -> StackedRows:
        return self

    def cpu(self) -> StackedRows:
        return self


def _visible(shard: _Shard) -> _Shard:
    """`shard`, or a UserError when this process cannot see its file (a worker on another node)."""
    if not shard.path.exists():
        from transferlab.core.errors import UserError

        raise UserError(f"the cache shard {shard.path} is not visible here: --cache-dir must be on storage every node "
                        "of the cluster sees (streamed caches travel to the runs as their paths)")
    return shard


def remove_shards_from(folder: Path, n_shards: int) -> None:
    """Remove shard files numbered `n_shards` and above (left by an extraction with a smaller shard size)."""
    for path in folder.glob("*.safetensors"):
        if path.stem.isdigit() and int(path.stem) >= n_shards:
            path.unlink(missing_ok=True)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def verify(folder: Path, manifest: dict) -> None:
    """A ValueError unless every shard's file has the digest the manifest records."""
    for entry in manifest["shards"]:
        if file_digest(folder / entry["file"]) != entry["sha256"]:
            raise ValueError(f"{entry['file']}: checksum mismatch")


def read_labels(folder: Path, manifest: dict) -> torch.Tensor:
    from safetensors import safe_open

    parts = []
    for entry in manifest["shards"]:
        with safe_open(str(folder / entry["file"]), framework="pt") as f:
            parts.append(f.get_tensor("labels"))
    return torch.cat(parts)


def entry_bytes(manifest: dict) -> int:
    return manifest["rows"] * math.prod(manifest["row_shape"]) * 4


def remove_entry(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)

