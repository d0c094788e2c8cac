"""A Ray cluster of two nodes on this machine, for the tests and benchmarks: a head without CPUs and a worker
node with its own temp dir, so everything scheduled runs on the worker (as on a real cluster's node)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def loopback_cluster(worker_cpus: int, worker_prefix: tuple[str, ...] = (), port: int | None = None) -> Iterator[str]:
    """Start the two nodes, yield the head's address, then stop both (only them: not ``ray stop``).

    `worker_prefix` goes before the worker's ``ray start`` (e.g. ``setpriv`` to drop capabilities)."""
    port = port or 6400 + os.getpid() % 500
    temp_dirs = [tempfile.mkdtemp(prefix="tl-head-", dir="/tmp"), tempfile.mkdtemp(prefix="tl-node-", dir="/tmp")]  # short socket paths
    try:
        _ray_start("--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={temp_dirs[0]}")
        _ray_start(f"--address=127.0.0.1:{port}", f"--num-cpus={worker_cpus}", f"--temp-dir={temp_dirs[1]}", prefix=worker_prefix)
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_nodes(temp_dirs)
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _ray_start(*args: str, prefix: tuple[str, ...] = ()) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    run = subprocess.run([*prefix, ray, "start", *args, "--node-ip-address=127.0.0.1", "--disable-usage-stats"], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if run.returncode:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}")


def stop_ray_nodes(temp_dirs: list[str]) -> None:
    """Stop the Ray nodes started with these temp dirs, and their children (``ray stop`` would stop every
    Ray process of the machine): every process whose command line names one of the dirs, then its tree."""

    def processes() -> dict[int, tuple[int, str]]:
        found = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                found[int(proc.name)] = (ppid, cmdline)
        return found

    table = processes()
    doomed = {pid for pid, (_ppid, cmd) in table.items() if any(d in cmd for d in temp_dirs)}
    while True:
        more = {pid for pid, (ppid, _cmd) in table.items() if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(2)
