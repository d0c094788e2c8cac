"""A sweep's report, rebuilt from its ledger alone: summary.json, summary.csv, figures/*.png, insight/ and
report.html. This module reads the ledger, calls the parts (summary, sweep_figures, sweep_insight,
sweep_page) and writes the files; it imports no torch."""

from __future__ import annotations

import shutil
from pathlib import Path

from transferlab.core.errors import UserError
from transferlab.core.files import atomic_write_bytes, safe_filename
from transferlab.reporting.summary import SUMMARY_KEYS, chosen_predictions, summary_rows, write_summary
from transferlab.reporting.sweep_figures import draw_figures
from transferlab.reporting.sweep_insight import insight_sections
from transferlab.reporting.sweep_page import render_html
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import require_manifest

__all__ = ["SUMMARY_KEYS", "build_report"]  # SUMMARY_KEYS: still importable from here, its old home


def build_report(out: str | Path) -> list[dict]:
    """Write summary.json, summary.csv, figures/*.png and report.html from ``out/ledger.sqlite``."""
    out = Path(out)
    path = out / "ledger.sqlite"
    if not path.is_file():
        raise UserError(f"{out}: no ledger.sqlite here (is it a sweep's output folder?)")
    ledger = Ledger(path, readonly=True)
    try:
        require_manifest(ledger, str(out))
        rows = summary_rows(ledger, out)
        write_summary(out, rows)
        made = draw_figures(ledger, out, rows)
        page = render_html(ledger, rows, made, insight_sections(ledger, out, rows), chosen_predictions(ledger, out, rows))
        atomic_write_bytes(out / "report.html", page.encode())
    finally:
        ledger.close()
    # The folder shows this report's figures and insight only, not those of an earlier grid or backbone list.
    _prune(out / "figures", {path.name for _caption, path, _small in made}, files=True)
    _prune(out / "insight", {f"{safe_filename(r['backbone'])}_{r['method']}" for r in rows}, files=False)
    return rows


def _prune(folder: Path, keep: set[str], files: bool) -> None:
    """Remove the report's own outputs in `folder` (PNG files, or insight folders) not named in `keep`."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if files and entry.is_file() and entry.suffix == ".png":
            entry.unlink()
        elif not files and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
