"""Write a PyTorch module as an ONNX file: the one export function, used for the frozen prefix an
inference runtime runs (:mod:`transferlab.features.runtimes`) and for an exported model's
``model.onnx`` (:mod:`transferlab.deploy.export`).

Every export has one input whose batch axis (0) is dynamic, as is every output's, and is written
atomically: a hidden temporary name in the target folder, then a rename, so a reader sees no file or
the whole one (with the mode the umask gives, as :func:`transferlab.core.files.atomic_write_bytes`).
The caller names the exporter and the opset, because they fix the file's bytes: the runtimes' cached
prefixes are keyed on their opset, and an exported model records its own.
"""

from __future__ import annotations

import inspect
import os
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def export_onnx(module: nn.Module, example_shape: Sequence[int], path: str | os.PathLike, *, opset: int,
                input_name: str, output_names: Sequence[str], dynamo: bool = False) -> Path:
    """Write `module` (put in eval mode) to `path` as ONNX, traced on zeros of `example_shape`.

    `dynamo` False: torch's TorchScript-based exporter (needs only the onnx package; about twice as fast
    to export); True: the dynamo exporter (needs onnx and onnxscript; opset 18 is the lowest it
    implements). With dynamo the example's batch must be at least 2: torch.export turns a size-1 axis
    into a constant. Raises whatever the exporter raises, leaving no file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    example = torch.zeros(tuple(example_shape))
    module.eval()
    try:
        if dynamo:
            _dynamo_export(module, example, tmp, opset, input_name, output_names)
        else:
            _torchscript_export(module, example, tmp, opset, input_name, output_names)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _torchscript_export(module: nn.Module, example: torch.Tensor, tmp: Path, opset: int, input_name: str,
                        output_names: Sequence[str]) -> None:
    # torch >= 2.5 defaults to the dynamo exporter; older versions have no `dynamo` argument.
    legacy: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    batch = {name: {0: "batch"} for name in (input_name, *output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; failures still raise
        torch.onnx.export(module, (example,), str(tmp), input_names=[input_name], output_names=list(output_names),
                          dynamic_axes=batch, opset_version=opset, **legacy)


def _dynamo_export(module: nn.Module, example: torch.Tensor, tmp: Path, opset: int, input_name: str,
                   output_names: Sequence[str]) -> None:
    batch = torch.export.Dim("batch", min=1)  # the outputs' batch axes follow from the input's
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=opset, input_names=[input_name],
        output_names=list(output_names), dynamic_shapes=({0: batch},), verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(tmp))
