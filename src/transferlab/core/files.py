"""Files and folders: atomic writes, JSON files, safe file names, output folders and their locks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transferlab.core.errors import ConfigError
from transferlab.core.hashing import to_json


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Mode 0o666 lets the kernel apply the process umask (mkstemp would give 0600), without
    # touching the process-wide umask, which other threads share.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (to_json(obj) + "\n").encode())



_PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,79}")


def safe_filename(name: str) -> str:
    """A file name standing for `name` that stays in its folder on every file system, one per name.

    A plain name (lower-case letters, digits, ``_ . -``, starting with a letter or digit, at most 80
    characters) is its own file name; any other name becomes a readable lower-case slug of it, ``+`` and
    12 hex digits of its SHA-256 (``hf:../m`` -> ``hf_.._m+…``, still one file name: ``/`` never survives).
    Plain names never contain ``+``, and the hash covers the whole name, so two names never share a file,
    even on a case-insensitive file system.
    """
    if _PLAIN_NAME.fullmatch(name):
        return name
    slug = re.sub(r"[^a-z0-9_.-]+", "_", name.lower()).strip("._")[:60] or "name"
    return f"{slug}+{hashlib.sha256(name.encode()).hexdigest()[:12]}"


# Folders check_writable_dir created, deepest first per call, so that a failed command can take back
# the ones it left holding nothing (see created_dirs_removed_on_failure).
_created_dirs: list[Path] = []
_open_blocks: list[int] = []


def check_writable_dir(path: str | os.PathLike, field: str = "out") -> Path:
    """Create `path` if needed and make sure we can write there, before any work starts.

    The folders it creates are remembered: inside :func:`created_dirs_removed_on_failure`, a command
    that fails takes them back while they hold nothing.
    """
    path = Path(path)
    new = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_empty_dirs([p for p in new if p.is_dir()])
        raise ConfigError(field, path, f"cannot write there ({e.strerror or e})") from None
    if _open_blocks:
        _created_dirs.extend(new)
    return path


def holds_files(folder: Path) -> bool:
    """Whether `folder` holds any file (or link) at any depth; empty subfolders do not count."""
    return any(not p.is_dir() or p.is_symlink() for p in folder.rglob("*"))


def remove_empty_dirs(folders: list[Path], holds_results: Callable[[Path], bool] = holds_files) -> None:
    """Remove each folder of `folders` (deepest first) that holds no results by `holds_results`."""
    import shutil

    for folder in folders:
        try:
            if folder.is_dir() and not folder.is_symlink() and not holds_results(folder):
                shutil.rmtree(folder)
        except OSError:
            pass  # best effort: the command's own error is what the user needs to see


@contextlib.contextmanager
def created_dirs_removed_on_failure(holds_results: Callable[[Path], bool] = holds_files) -> Iterator[None]:
    """On any exception, remove the folders that :func:`check_writable_dir` created inside the block
    and that hold no results (by `holds_results`), then re-raise: a failed command leaves no empty
    output folder behind, and never removes one that was there before or holds a result."""
    start = len(_created_dirs)
    _open_blocks.append(start)
    try:
        yield
    except BaseException:
        remove_empty_dirs(_created_dirs[start:], holds_results)
        del _created_dirs[start:]
        raise
    finally:
        _open_blocks.pop()
        if not _open_blocks:  # an enclosing block would still need them
            del _created_dirs[start:]


def folder_lock_is_held(lock_path: Path) -> bool:
    """Whether some process holds the :class:`FolderLock` file `lock_path` (a sweep is writing there)."""
    import fcntl

    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts with the holder's exclusive one
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return False


class FolderLock:
    """An exclusive lock on an output folder (``flock`` on ``DIR/.lock``), so two sweeps never write one folder.

    The kernel drops the lock when its process dies, so a killed run never blocks the next one.
    """

    def __init__(self, folder: Path, field: str = "out"):
        import fcntl

        self.path = folder / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(field, folder, f"is in use by process {holder} (another sweep writes there)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1
