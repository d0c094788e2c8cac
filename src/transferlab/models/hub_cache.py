"""Where the HuggingFace hub cache keeps a model's files, and whether the hub can be reached.

Plain file-system reads (no hub client): listing backbones never downloads, and an offline machine
gets a clear error at once instead of the hub client's minute of retries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def cache_dir() -> str:
    """The hub cache folder, as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def repo_folder(repo_id: str) -> str:
    return os.path.join(cache_dir(), "models--" + repo_id.replace("/", "--"))


def cached_file(repo_id: str, filename: str) -> str | None:
    """Path of `filename` in the newest cached snapshot of `repo_id` that has it, else None."""
    snapshots = os.path.join(repo_folder(repo_id), "snapshots")
    if not os.path.isdir(snapshots):
        return None
    preferred = []
    ref = os.path.join(repo_folder(repo_id), "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            preferred.append(f.read().strip())
    for rev in preferred + sorted(os.listdir(snapshots)):
        path = os.path.join(snapshots, rev, filename)
        if os.path.isfile(path):
            return path
    return None


def cached_snapshot(repo_id: str, marker: str = "config.json") -> str | None:
    """The cached snapshot folder of `repo_id` holding `marker`, else None."""
    path = cached_file(repo_id, marker)
    return os.path.dirname(path) if path else None


def offline_reason() -> str | None:
    """Why the hub cannot be used for a download now (None: it answered a TCP connect within 3 s)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"{host} unreachable ({e.strerror or type(e).__name__})"
    return None
