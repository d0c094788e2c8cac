"""Content digests of image files, remembered while a file is provably untouched.

A cached result (extracted features, a sweep's runs) is only valid for the bytes it was computed
from, so caches and data-change detection are keyed by a digest of each file's contents (BLAKE2b,
128 bits). Reading every image on every start would cost a pass over the data, so a digest is
remembered per (path, size, mtime_ns, ctime_ns, inode, device): `cp -p`, `rsync -a` and `touch` can
set a file's size and modification time back, but not its status-change time (ctime), so a
rewritten file is always read again, while an untouched one is not.

Memos: a dictionary in this process, and a small SQLite file (``memo.sqlite``) in a folder the
caller names (the feature-cache folder; with none, digests are remembered in this process only,
so nothing is written outside the folders a command was given). A memo that cannot be read is ignored
and rebuilt; one that cannot be written is skipped. A file changed within ``RACY_NS`` of being
hashed is not remembered (its ctime may not have ticked yet; git's "racy clean" rule).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

DIGEST_NAME = "blake2b-128"
MEMO_FILE = "memo.sqlite"
RACY_NS = 2_000_000_000  # a file whose ctime is this recent is hashed but not remembered
_STAT = struct.Struct("<5q")  # size, mtime_ns, ctime_ns, inode, device

# path -> packed stat + 16-byte digest (small: one bytes object per file, the path string is the caller's)
_process_memo: dict[str, bytes] = {}
_process_lock = threading.Lock()


def _new_hash() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=16)


def _stat_key(st: os.stat_result) -> bytes:
    return _STAT.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _hash_file(path: str) -> bytes:
    h = _new_hash()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)  # releases the GIL for large chunks: threads hash in parallel
    return h.digest()


class _SqliteMemo:
    """The persistent memo: path -> (stat key, digest); every failure is logged and ignored."""

    def __init__(self, directory: Path | None):
        self.path = directory / MEMO_FILE if directory is not None else None

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self.path is None or (not create and not self.path.exists()):
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stat BLOB NOT NULL, digest BLOB NOT NULL)")
        return con

    def _rebuild(self, error: Exception) -> None:
        log.warning("digest memo %s cannot be read (%s); rebuilding it", self.path, str(error)[:80])
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    def get(self, paths: list[str]) -> dict[str, bytes]:
        """{path: stat key + digest} for the paths it holds."""
        try:
            con = self._connect(create=False)
            if con is None:
                return {}
            try:
                found: dict[str, bytes] = {}
                for i in range(0, len(paths), 500):
                    chunk = paths[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    for path, stat, digest in con.execute(f"SELECT path, stat, digest FROM digests WHERE path IN ({marks})", chunk):
                        found[path] = bytes(stat) + bytes(digest)
                return found
            finally:
                con.close()
        except sqlite3.DatabaseError as e:  # garbled or not a database: start a new one
            self._rebuild(e)
        except OSError as e:
            log.info("digest memo %s not read: %s", self.path, e)
        return {}

    def put(self, entries: dict[str, bytes]) -> None:
        if not entries or self.path is None:
            return
        rows = [(path, value[: _STAT.size], value[_STAT.size :]) for path, value in entries.items()]
        for attempt in (1, 2):
            try:
                con = self._connect(create=True)
                assert con is not None
                try:
                    with con:  # one transaction: all of it or nothing
                        con.executemany("INSERT OR REPLACE INTO digests (path, stat, digest) VALUES (?, ?, ?)", rows)
                finally:
                    con.close()
                return
            except sqlite3.DatabaseError as e:
                if attempt == 2:
                    log.info("digest memo %s not written: %s", self.path, e)
                    return
                self._rebuild(e)
            except OSError as e:  # read-only or full disk: the digests are still right, only not remembered
                log.info("digest memo %s not written: %s", self.path, e)
                return


def file_digests(paths: Sequence[str], memo_dir: str | os.PathLike | None = None,
                 workers: int | None = None) -> list[tuple[int, str]]:
    """(size in bytes, hex content digest) of each file in `paths`, in order; (-1, "") for one that cannot be read.

    Digests come from the memos while the file's stat key is unchanged, else the file is read
    (by `workers` threads: hashing releases the GIL). New digests are remembered in this process and
    in ``memo_dir`` (None: in this process only).
    """
    memo = _SqliteMemo(Path(memo_dir) if memo_dir is not None else None)
    keys: list[bytes | None] = []
    for path in paths:
        try:
            keys.append(_stat_key(os.stat(path)))
        except OSError:
            keys.append(None)
    sizes = [_STAT.unpack(key)[0] if key is not None else -1 for key in keys]
    digests: list[bytes | None] = [None] * len(paths)
    with _process_lock:
        for i, (path, key) in enumerate(zip(paths, keys)):
            value = _process_memo.get(path) if key is not None else None
            if value is not None and value[: _STAT.size] == key:
                digests[i] = value[_STAT.size :]
    asked = [i for i, d in enumerate(digests) if d is None and keys[i] is not None]  # looked up in the persistent memo
    stored = memo.get([paths[i] for i in asked]) if asked else {}
    for i in asked:
        value = stored.get(paths[i])
        if value is not None and value[: _STAT.size] == keys[i]:
            digests[i] = value[_STAT.size :]
    to_read = [i for i in asked if digests[i] is None]

    def read(i: int) -> tuple[int, bytes | None]:
        try:
            digest = _hash_file(paths[i])
            after = _stat_key(os.stat(paths[i]))
        except OSError:
            return i, None
        if after != keys[i]:  # changed while being read: give this digest, remember nothing
            keys[i] = None
        return i, digest

    if to_read:
        n = workers if workers is not None else min(8, os.cpu_count() or 1)
        if n > 1 and len(to_read) > 1:
            def read_share(share: list[int]) -> list[tuple[int, bytes | None]]:
                return [read(i) for i in share]

            with ThreadPoolExecutor(n) as pool:  # one share per thread: no per-file task overhead
                results = [r for share in pool.map(read_share, [to_read[k::n] for k in range(n)]) for r in share]
        else:
            results = [read(i) for i in to_read]
        for i, digest in results:
            digests[i] = digest
            if digest is None:
                sizes[i] = -1
    # Remember only what is settled: unchanged while read, and a ctime older than the racy window.
    now = time.time_ns()

    def settled(i: int) -> bool:
        key = keys[i]
        return key is not None and digests[i] is not None and now - _STAT.unpack(key)[2] >= RACY_NS

    fresh: dict[str, bytes] = {}
    with _process_lock:
        for i in asked:
            if settled(i):
                value = keys[i] + digests[i]  # type: ignore[operator]
                _process_memo[paths[i]] = value
                if stored.get(paths[i]) != value:
                    fresh[paths[i]] = value
    memo.put(fresh)
    return [(size, digest.hex()) if digest is not None else (-1, "") for size, digest in zip(sizes, digests)]
