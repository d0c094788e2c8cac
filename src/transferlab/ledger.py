"""The sweep ledger: one sqlite row per run, written only by the coordinating process.

Standard library only (no torch), so reports can be rebuilt from it anywhere. Every write is one
transaction; a killed process leaves the last committed state, and rows still marked ``running``
are redone by the next sweep.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .utils import to_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    backbone TEXT NOT NULL,
    method TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'diverged')),
    metrics TEXT,
    history TEXT,
    timings TEXT,
    error TEXT,
    test_acc REAL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS choices (
    backbone TEXT NOT NULL,
    method TEXT NOT NULL,
    hash TEXT NOT NULL REFERENCES runs(hash),
    PRIMARY KEY (backbone, method)
);
"""

FINISHED = ("done", "diverged")


class Ledger:
    """Runs, choices and sweep metadata of one output folder."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA synchronous=FULL")
            with self.db:
                self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    # -- metadata ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, to_json(value, indent=None)))

    # -- runs -------------------------------------------------------------------------------------
    def status(self, run_hash: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE hash = ?", (run_hash,)).fetchone()
        return row["status"] if row else None

    def is_finished(self, run_hash: str) -> bool:
        return self.status(run_hash) in FINISHED

    def mark_running(self, run_hash: str, backbone: str, method: str, config: dict) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO runs (hash, backbone, method, config, status, updated) VALUES (?, ?, ?, ?, 'running', ?)",
                (run_hash, backbone, method, to_json(config, indent=None), time.time()),
            )

    def finish(self, run_hash: str, status: str, metrics: dict, history: list, timings: dict, error: str | None = None) -> None:
        with self.db:
            self.db.execute(
                "UPDATE runs SET status = ?, metrics = ?, history = ?, timings = ?, error = ?, updated = ? WHERE hash = ?",
                (status, to_json(metrics, indent=None), to_json(history, indent=None), to_json(timings, indent=None),
                 error, time.time(), run_hash),
            )

    def fail(self, run_hash: str, error: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET status = 'failed', error = ?, updated = ? WHERE hash = ?", (error, time.time(), run_hash))

    def set_test_acc(self, run_hash: str, test_acc: float | None) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET test_acc = ? WHERE hash = ?", (test_acc, run_hash))

    def run(self, run_hash: str) -> dict | None:
        row = self.db.execute("SELECT * FROM runs WHERE hash = ?", (run_hash,)).fetchone()
        return _decode(row) if row else None

    def runs(self, backbone: str | None = None, method: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM runs WHERE 1=1", []
        if backbone is not None:
            query, args = query + " AND backbone = ?", args + [backbone]
        if method is not None:
            query, args = query + " AND method = ?", args + [method]
        return [_decode(r) for r in self.db.execute(query + " ORDER BY rowid", args)]

    # -- choices ----------------------------------------------------------------------------------
    def choose(self, backbone: str, method: str, run_hash: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO choices (backbone, method, hash) VALUES (?, ?, ?)", (backbone, method, run_hash))

    def choice(self, backbone: str, method: str) -> str | None:
        row = self.db.execute("SELECT hash FROM choices WHERE backbone = ? AND method = ?", (backbone, method)).fetchone()
        return row["hash"] if row else None

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in ("config", "metrics", "history", "timings"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out
