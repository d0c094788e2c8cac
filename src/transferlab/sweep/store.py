"""What a sweep keeps in its folder besides the manifest: the folder's claim on its data, each run's
trained parameters, and the chosen runs' per-image test predictions."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from transferlab.core.errors import ConfigError
from transferlab.core.files import atomic_write_bytes
from transferlab.core.hashing import stable_hash
from transferlab.data import DataConfig, ImageSplits, describe_data_change
from transferlab.sweep.ledger import Ledger

log = logging.getLogger(__name__)


def claim_folder(ledger: Ledger, out: Path, data: DataConfig, splits: ImageSplits, force: bool,
                 memo_dir: Path | None = None) -> str:
    """Refuse (or with `force`, start over) when `out`'s ledger is about other data or other images.

    Records the data's identity and fingerprint (content digests remembered in `memo_dir`); returns
    the images' digest (part of every run hash).
    """
    identity = stable_hash(dataclasses.asdict(data))
    fingerprint = splits.fingerprint(memo_dir)
    previous_identity = ledger.get_meta("identity")
    previous_fingerprint = ledger.get_meta("data_fingerprint")
    problem = ""
    if previous_identity is not None and previous_identity != identity:
        problem = "holds the ledger of a different sweep (other data or splits)"
    elif previous_fingerprint is not None and previous_fingerprint != fingerprint:
        problem = f"the images changed since its sweep ran: {describe_data_change(previous_fingerprint, fingerprint)}"
    if problem:
        if not force:
            raise ConfigError("out", out, f"{problem}; use another folder, or pass --force to start over")
        log.warning("--force: %s %s; starting over", out, problem)
        ledger.start_over()
        shutil.rmtree(out / "runs", ignore_errors=True)
    ledger.set_meta("identity", identity)
    ledger.set_meta("data_fingerprint", fingerprint)
    return stable_hash(fingerprint)


def save_params(out: Path, run_hash_: str, state: dict) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(out / "runs" / f"{run_hash_}.safetensors", save(tensors))


def load_params(out: Path, run_hash_: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "runs" / f"{run_hash_}.safetensors"))
