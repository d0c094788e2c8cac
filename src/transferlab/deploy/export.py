"""Export a finished run as a stand-alone model folder (MODEL_DIR), written all at once or not at all.

:func:`export_model` loads the run's whole trained network (:func:`transferlab.deploy.trained.load_trained`)
and writes ``model.safetensors``, ``config.json`` (:mod:`transferlab.deploy.model_folder`, which also
describes the folder's files), ``hf/`` for a zoo that builds its architecture from files, and
``model.onnx`` with ``--format onnx|both``. Everything goes into a hidden staging folder inside MODEL_DIR
first and is moved in at the end, config.json last: a failed export leaves the folder as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.files import atomic_write_bytes, check_writable_dir, created_dirs_removed_on_failure, fsync_dir
from transferlab.deploy.model_folder import (
    ARCHITECTURE_DIR,
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_OUTPUTS,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OPSET,
    ONNX_OUTPUTS,
    exported_files,
    model_config,
    write_config,
)
from transferlab.deploy.trained import TrainedModel, load_trained
from transferlab.models.onnx import export_onnx

FORMATS = ("safetensors", "onnx", "both")


class _WithProbabilities(nn.Module):
    """The network plus a softmax, for ONNX: outputs (logits, probabilities)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)


def require_onnx() -> None:
    """Raise a UserError unless the onnx extra (onnx + onnxscript, for torch's exporter) is importable."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs the onnx extra: pip install 'transferlab[onnx]'") from None


def export_model(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "safetensors",
                 backbone: str | None = None, method: str | None = None) -> dict:
    """Write MODEL_DIR (`out`): model.safetensors and config.json, model.onnx with fmt onnx|both, and
    for a zoo that builds its architecture from files (hf:) those files in ``hf/``.

    Everything is written into a hidden staging folder first and moved in at the end, so a failed
    export leaves `out` as it was (or absent); files of an earlier export the new one does not write
    are removed. Returns the config (also in ``out/config.json``).
    """
    if fmt not in FORMATS:
        raise ConfigError("format", fmt, f"expected one of {', '.join(FORMATS)}")
    if fmt in ("onnx", "both"):
        require_onnx()  # before anything is read or written
    with created_dirs_removed_on_failure():
        trained = load_trained(src, backbone, method)
        out = check_writable_dir(out)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
        try:
            config = _write_model_folder(trained, staging, fmt)
            _move_into(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return config


def _write_model_folder(trained: TrainedModel, folder: Path, fmt: str) -> dict:
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing memory, and a state dict may hold views
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained.model.state_dict().items()}
    config = model_config(trained)
    atomic_write_bytes(folder / MODEL_FILE, save(tensors, metadata={"format": "pt", "architecture": config["architecture"]}))
    files = {"safetensors": MODEL_FILE}
    if trained.backbone.spec.zoo == "hf":  # the architecture is its config: the folder must not need the original
        from transferlab.models import hf_zoo

        hf_zoo.save_architecture(trained.backbone.spec, str(folder / ARCHITECTURE_DIR))
        files["architecture"] = ARCHITECTURE_DIR
    if fmt in ("onnx", "both"):
        size = trained.preprocessing.input_size
        # a batch of 2 to trace: the dynamo exporter would fix a batch of 1 as a constant
        export_onnx(_WithProbabilities(trained.model), (2, 3, size, size), folder / ONNX_FILE, opset=ONNX_OPSET,
                    input_name=ONNX_INPUT, output_names=ONNX_OUTPUTS, dynamo=True)
        files["onnx"] = ONNX_FILE
    return write_config(folder, config, files)


def _move_into(staging: Path, out: Path) -> None:
    """Make `out` hold the model files of `staging` and none of an earlier export's: config.json is
    removed first and put back last (a folder without it is no model folder). Files of an earlier
    export (those its config.json lists) that this one does not write are removed; anything else in
    `out` is the user's and is left alone, unless this export writes a file of that name."""
    previous = exported_files(out)
    for name in MODEL_OUTPUTS:  # refuse before anything changes
        old = out / name
        if (staging / name).exists() and name not in previous and old.is_dir() and not old.is_symlink():
            raise UserError(f"{old}: a folder that is not an earlier export's is in the way of the model's {name}/ "
                            "(move it, or export elsewhere)")
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for name in MODEL_OUTPUTS:
        old, new = out / name, staging / name
        if name == CONFIG_FILE or not (new.exists() or name in previous):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
        if new.exists():
            os.replace(new, old)
    os.replace(staging / CONFIG_FILE, out / CONFIG_FILE)
    fsync_dir(out)
