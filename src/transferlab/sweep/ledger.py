"""The sweep ledger: one sqlite row per run, written only by the coordinating process.

Standard library only (no torch), so reports can be rebuilt from it anywhere. Every write is one
transaction; a killed process leaves the last committed state, and rows still marked ``running``
are redone by the next sweep. A finished row is never overwritten.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal, TypedDict

from transferlab.core.errors import UserError
from transferlab.core.hashing import to_json

# LP: a probe; FT: fine-tuning from the pretrained backbone with a fresh head; LP-FT: fine-tuning from the chosen probe.
Method = Literal["LP", "FT", "LP-FT"]
METHODS: tuple[Method, ...] = ("LP", "FT", "LP-FT")
Status = Literal["running", "done", "failed", "diverged"]
FINISHED: tuple[Status, ...] = ("done", "diverged")

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
    grid TEXT,
    PRIMARY KEY (backbone, method)
);
CREATE TABLE IF NOT EXISTS ood_evaluations (
    hash TEXT NOT NULL REFERENCES runs(hash),
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    accuracy REAL,
    time REAL NOT NULL,
    PRIMARY KEY (hash, name, digest)
);
CREATE TABLE IF NOT EXISTS test_evaluations (
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL REFERENCES runs(hash),
    backbone TEXT NOT NULL,
    method TEXT NOT NULL,
    test_acc REAL,
    time REAL NOT NULL
);
"""


class RunRow(TypedDict):
    """One run as the ledger holds it (JSON columns decoded)."""

    hash: str
    backbone: str
    method: Method
    config: dict[str, Any]
    status: Status
    metrics: dict[str, Any] | None
    history: list[dict[str, Any]] | None
    timings: dict[str, Any] | None
    error: str | None
    test_acc: float | None
    updated: float


class Ledger:
    """Runs, choices, test evaluations and sweep metadata of one output folder."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.db = sqlite3.connect(self.path, timeout=30)
        try:
            if not readonly:
                self.db.execute("PRAGMA synchronous=FULL")
                with self.db:
                    self.db.executescript(SCHEMA)
                    if "grid" not in {r[1] for r in self.db.execute("PRAGMA table_info(choices)")}:  # a 0.1 ledger
                        self.db.execute("ALTER TABLE choices ADD COLUMN grid TEXT")
            self.db.execute("SELECT COUNT(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as e:  # not a database, or not a ledger
            self.db.close()
            raise UserError(f"{self.path}: not a readable transferlab ledger ({e}); move it away or use another folder") from None
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    # -- metadata ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, to_json(value, indent=None)))

    def start_over(self) -> None:
        """Forget every run, choice and test evaluation (the folder's data or splits changed)."""
        with self.db:
            for table in ("ood_evaluations", "test_evaluations", "choices", "runs", "meta"):
                self.db.execute(f"DELETE FROM {table}")

    # -- runs -------------------------------------------------------------------------------------
    def status(self, run_hash: str) -> Status | None:
        row = self.db.execute("SELECT status FROM runs WHERE hash = ?", (run_hash,)).fetchone()
        return row["status"] if row else None

    def is_finished(self, run_hash: str) -> bool:
        return self.status(run_hash) in FINISHED

    def mark_running(self, run_hash: str, backbone: str, method: Method, config: dict) -> None:
        """Record that a run starts; a finished row is left exactly as it is."""
        with self.db:
            self.db.execute(
                "INSERT INTO runs (hash, backbone, method, config, status, updated) VALUES (?, ?, ?, ?, 'running', ?) "
                "ON CONFLICT (hash) DO UPDATE SET status = 'running', error = NULL, updated = excluded.updated "
                "WHERE runs.status NOT IN ('done', 'diverged')",
                (run_hash, backbone, method, to_json(config, indent=None), time.time()),
            )

    def finish(self, run_hash: str, status: Status, metrics: dict, history: list, timings: dict) -> None:
        with self.db:
            self.db.execute(
                "UPDATE runs SET status = ?, metrics = ?, history = ?, timings = ?, error = NULL, updated = ? "
                "WHERE hash = ? AND status = 'running'",
                (status, to_json(metrics, indent=None), to_json(history, indent=None), to_json(timings, indent=None),
                 time.time(), run_hash),
            )

    def fail(self, run_hash: str, error: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET status = 'failed', error = ?, updated = ? WHERE hash = ? AND status = 'running'",
                            (error, time.time(), run_hash))

    def record_test(self, run_hash: str, test_acc: float | None) -> None:
        """Store the one test evaluation of a chosen run, and count it."""
        row = self.run(run_hash)
        assert row is not None and row["status"] == "done", run_hash
        with self.db:
            self.db.execute("UPDATE runs SET test_acc = ? WHERE hash = ?", (test_acc, run_hash))
            self.db.execute("INSERT INTO test_evaluations (hash, backbone, method, test_acc, time) VALUES (?, ?, ?, ?, ?)",
                            (run_hash, row["backbone"], row["method"], test_acc, time.time()))

    def record_ood(self, run_hash: str, name: str, digest: str, accuracy: float) -> None:
        """Store the one evaluation of a chosen run on extra test set `name` (its images' `digest`)."""
        with self.db:
            self.db.execute("INSERT INTO ood_evaluations (hash, name, digest, accuracy, time) VALUES (?, ?, ?, ?, ?)",
                            (run_hash, name, digest, accuracy, time.time()))

    def ood_accuracy(self, run_hash: str, name: str, digest: str) -> float | None:
        """The run's accuracy on extra test set `name` with those images, if it was evaluated."""
        row = self.db.execute("SELECT accuracy FROM ood_evaluations WHERE hash = ? AND name = ? AND digest = ?",
                              (run_hash, name, digest)).fetchone()
        return None if row is None else row["accuracy"]

    def test_evaluations(self, backbone: str | None = None, method: Method | None = None) -> int:
        """How many times the test split was evaluated (for `backbone` and `method`, if given)."""
        where, args = _where(backbone, method)
        return self.db.execute("SELECT COUNT(*) FROM test_evaluations" + where, args).fetchone()[0]

    def run(self, run_hash: str) -> RunRow | None:
        row = self.db.execute("SELECT * FROM runs WHERE hash = ?", (run_hash,)).fetchone()
        return _decode(row) if row else None

    def runs(self, backbone: str | None = None, method: Method | None = None) -> list[RunRow]:
        where, args = _where(backbone, method)
        return [_decode(r) for r in self.db.execute("SELECT * FROM runs" + where + " ORDER BY rowid", args)]

    # -- what the current grid planned ---------------------------------------------------------------
    # The report reads only these runs: rows of other grids in the same folder (another seed list, epoch
    # count, runtime...) share their configs' fields but are never mixed into this grid's numbers.
    def set_plan(self, backbone: str, method: Method, hashes: list[str]) -> None:
        """The runs the current grid (meta "grid") planned for (backbone, method), in grid order."""
        self.set_meta(f"plan:{backbone}:{method}", {"grid": self.get_meta("grid"), "hashes": list(hashes)})

    def plan(self, backbone: str, method: Method) -> list[str] | None:
        """The current grid's planned run hashes for (backbone, method); None when it planned none (yet)."""
        value = self.get_meta(f"plan:{backbone}:{method}")
        if value is None or value.get("grid") != self.get_meta("grid"):
            return None
        return list(value["hashes"])

    # -- choices ----------------------------------------------------------------------------------
    # Each choice is tagged with the grid (meta "grid": a hash of the sweep's config) that made it; only
    # the current grid's choices are seen, so a re-run with another grid never shows an old winner, and
    # a re-run refused or interrupted before choosing leaves nothing half-replaced.
    def choose(self, backbone: str, method: Method, run_hash: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO choices (backbone, method, hash, grid) VALUES (?, ?, ?, ?)",
                            (backbone, method, run_hash, self.get_meta("grid")))

    def unchoose(self, backbone: str, method: Method) -> None:
        """This grid has no choice for (backbone, method)."""
        with self.db:
            self.db.execute("DELETE FROM choices WHERE backbone = ? AND method = ?", (backbone, method))

    def choice(self, backbone: str, method: Method) -> str | None:
        """The current grid's chosen run for (backbone, method), if any."""
        row = self.db.execute("SELECT hash, grid FROM choices WHERE backbone = ? AND method = ?", (backbone, method)).fetchone()
        if row is None or row["grid"] != self.get_meta("grid"):
            return None
        return row["hash"]

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


def _where(backbone: str | None, method: str | None) -> tuple[str, list[str]]:
    """A WHERE clause selecting rows of `backbone` and `method` (None: any), and its arguments."""
    given = [(column, value) for column, value in (("backbone", backbone), ("method", method)) if value is not None]
    return " WHERE 1=1" + "".join(f" AND {column} = ?" for column, _ in given), [value for _, value in given]


def _decode(row: sqlite3.Row) -> RunRow:
    out = dict(row)
    for key in ("config", "metrics", "history", "timings"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out  # type: ignore[return-value]
