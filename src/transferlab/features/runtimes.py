"""Where the frozen prefix runs: eager PyTorch, torch.compile, ONNX Runtime or OpenVINO.

Extraction (one forward pass of the frozen prefix per image) dominates a study, and eager PyTorch is
slow on a CPU, above all for EfficientNet's depthwise convolutions. The prefix is a fixed function of
the image, so it can be exported once to ONNX (per backbone weights, cut and input size; kept in the
cache folder) and run by an inference runtime. The trainable suffix always stays in PyTorch.

``resolve_runtime`` turns ``--runtime auto`` into a concrete runtime; ``prepare_prefix_runner`` builds
a :class:`PrefixRunner`, a callable from an image batch to float32 CPU outputs that also names what
produced them (runtime, version, precision) for cache keys and run records. Anything that goes wrong
with a runtime (export, compilation, a disagreement with eager PyTorch, an error while running) falls
back to eager PyTorch with one logged line: a run is never lost to a runtime. fp32 only on CPU: bf16
and int8 are slower or less accurate on CPUs without native support, and change the numbers.

onnxruntime and openvino are imported lazily, here only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from transferlab.core.devices import Placement
from transferlab.core.errors import ConfigError
from transferlab.core.hashing import stable_hash
from transferlab.models.onnx import export_onnx

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "compile", "onnxruntime", "openvino")
# On CPU, fastest first (measured on EfficientNet-Lite0 and ResNet-10: see README, Speed).
CPU_PREFERENCE = ("openvino", "onnxruntime")
INSTALL_HINT = {"onnxruntime": "pip install onnxruntime onnx", "openvino": "pip install openvino onnx"}
OPSET = 17
# A runtime whose output differs from eager PyTorch by more than this (relative to the output's scale)
# on a probe batch is not used. fp32 kernels that reorder sums differ by ~1e-6..1e-5.
AGREEMENT_TOL = 1e-4


class RuntimeFellBack(RuntimeError):
    """Raised by a runner whose runtime failed mid-pass: it now runs eager PyTorch; redo the pass."""


def is_installed(runtime: str) -> bool:
    """Whether `runtime`'s package (and onnx, which the export needs) can be imported; imports nothing."""
    if runtime in ("torch", "compile"):
        return True
    return importlib.util.find_spec(runtime) is not None and importlib.util.find_spec("onnx") is not None


def resolve_runtime(name: str, placement: Placement) -> str:
    """The concrete runtime for `name` on `placement`.

    'auto': on CPU in float32 the fastest installed of OpenVINO, ONNX Runtime, else eager PyTorch;
    on CUDA, or in float64, eager PyTorch. An explicit runtime that is not installed,
    or an inference runtime asked for on CUDA or in float64, is a ConfigError.
    """
    if name not in RUNTIMES:
        raise ConfigError("runtime", name, f"expected one of {', '.join(RUNTIMES)}")
    fp32_cpu = placement.device.type == "cpu" and placement.dtype == torch.float32
    if name == "auto":
        return next((r for r in CPU_PREFERENCE if is_installed(r)), "torch") if fp32_cpu else "torch"
    if name in CPU_PREFERENCE:
        if not fp32_cpu:
            raise ConfigError("runtime", name, "runs float32 on CPU only (use --runtime torch or auto here)")
        if not is_installed(name):
            raise ConfigError("runtime", name, f"not installed ({INSTALL_HINT[name]})")
    return name


def runtime_version(runtime: str) -> str:
    """Version of the package that runs `runtime` (from its metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    package = "torch" if runtime in ("torch", "compile") else runtime
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def precision(runtime: str, placement: Placement) -> str:
    """What the arithmetic is: bf16 autocast on CUDA (as always), else the model's dtype (fp32 for runtimes);
    PyTorch runs channels_last (Placement.put), whose rounding differs from the default layout."""
    if placement.device.type == "cuda" and runtime in ("torch", "compile"):
        return "bf16-autocast"
    dtype = "fp64" if placement.dtype == torch.float64 else "fp32"
    return f"{dtype} channels_last" if runtime in ("torch", "compile") else dtype


@dataclass
class PrefixRunner:
    """Runs a frozen prefix on an image batch; returns float32 outputs on CPU.

    `name`, `version` and `precision` identify what produced the numbers (cache keys, run records).
    `notice` is the one-line reason when the requested runtime could not be used ("" otherwise).
    If the runtime raises while running, the runner switches to eager PyTorch for good, logs the
    notice and raises :class:`RuntimeFellBack` so the caller can redo the pass: outputs of two
    runtimes are never mixed.
    """

    name: str
    version: str
    precision: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    fallback: Callable[[], PrefixRunner] | None = field(default=None, repr=False)
    notice: str = ""
    requested: str = ""
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # an export without a cache folder

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.fn(x)
        except Exception as e:
            if self.fallback is None:
                raise
            self._fall_back(f"{self.name} failed while running ({_reason(e)})")
            raise RuntimeFellBack(self.notice) from e

    def _fall_back(self, reason: str) -> None:
        eager = self.fallback()  # type: ignore[misc]
        self.notice = f"{reason}; running the frozen layers in eager PyTorch instead"
        log.warning(self.notice)
        self.name, self.version, self.precision, self.fn, self.fallback = eager.name, eager.version, eager.precision, eager.fn, None

    def describe(self) -> dict:
        """The record of what ran: for run.json."""
        return {"name": self.name, "version": self.version, "precision": self.precision,
                "requested": self.requested or self.name, "notice": self.notice}


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- eager and compiled PyTorch -------------------------------------------------------------------
def eager_runner(prefix: nn.Module, placement: Placement, input_shape: tuple = ()) -> PrefixRunner:
    """Eager PyTorch, the reference: on CPU exactly what the uncached path computes (both channels_last,
    Placement.put); on CUDA channels_last and bf16 autocast."""
    prefix.eval()
    device = placement.device
    cuda = device.type == "cuda"

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = placement.put(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            y = prefix(x)
        return y.float().cpu().contiguous()

    return PrefixRunner("torch", runtime_version("torch"), precision("torch", placement), fn)


def _compiled_fn(prefix: nn.Module, placement: Placement) -> Callable[[torch.Tensor], torch.Tensor]:
    compiled = torch.compile(prefix)
    device = placement.device
    cuda = device.type == "cuda"

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = placement.put(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            y = compiled(x)
        return y.float().cpu().contiguous()

    return fn


# -- ONNX export and the inference runtimes ------------------------------------------------------
def _onnxruntime_fn(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads would spin and take the cores the image-decoding workers need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def fn(x: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(None, {"x": x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(y)

    return fn


def _openvino_fn(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",  # never bf16 / f16 behind our back on CPUs that have it
        "PERFORMANCE_HINT": "LATENCY",  # one synchronous request per batch
    })
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def fn(x: torch.Tensor) -> torch.Tensor:
        result = request.infer({0: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(result[output].copy())  # the request reuses its output buffer

    return fn


def export_path(export_dir: Path, export_key: str) -> Path:
    return Path(export_dir) / "onnx" / f"prefix-{export_key}-opset{OPSET}.onnx"


def onnx_export_key(backbone_name: str, weights_digest: str, cut: str, input_shape: tuple) -> str:
    """What identifies an exported prefix: the backbone's weights, where it is cut, the input size."""
    return stable_hash({"backbone": backbone_name, "weights": weights_digest, "cut": cut,
                        "input": list(input_shape[1:]), "opset": OPSET}, length=16)


def _unprepared(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("planned_runner() only names a runtime; use prepare_prefix_runner() to run one")


def planned_runner(runtime: str, placement: Placement) -> PrefixRunner:
    """What `runtime` resolves to (name, version, precision) without exporting or compiling anything.

    For cache look-ups: a cache hit needs no runtime at all.
    """
    name = resolve_runtime(runtime, placement)
    return PrefixRunner(name, runtime_version(name), precision(name, placement), _unprepared, requested=runtime)


def _agreement_error(fn: Callable, eager: Callable, input_shape: tuple) -> float:
    x = torch.randn((2,) + tuple(input_shape[1:]), generator=torch.Generator().manual_seed(0))
    ref = eager(x)
    out = fn(x)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != eager {tuple(ref.shape)}")
    return float((out - ref).abs().max() / max(1.0, float(ref.abs().max())))


def prepare_prefix_runner(
    prefix: nn.Module,
    input_shape: tuple,
    runtime: str,
    placement: Placement,
    export_dir: str | os.PathLike | None,
    export_key: str,
    threads: int | None = None,
) -> PrefixRunner:
    """A runner for frozen `prefix` on inputs shaped like `input_shape` (the batch size is free).

    `runtime` is resolved first ('auto' -> the fastest installed). ONNX-based runtimes export the
    prefix once to ``export_dir/onnx/prefix-<export_key>-opset17.onnx`` (a temporary folder owned by
    the runner when `export_dir` is None) and reuse the file afterwards. Before it is used, every
    non-eager runner is checked against eager PyTorch on a small random batch. Failures fall back to
    eager PyTorch with a one-line warning (the runner's `notice`). `threads` defaults to
    torch.get_num_threads(). Keep the runner for every split cut at the same place: it holds the session.
    """
    name = resolve_runtime(runtime, placement)
    threads = threads or torch.get_num_threads()
    prefix.eval()
    make_eager = lambda: eager_runner(prefix, placement, input_shape)  # noqa: E731
    eager = make_eager()
    eager.requested = runtime
    if name == "torch" or next(prefix.parameters(), None) is None:  # nothing frozen to speed up
        return eager
    runner = PrefixRunner(name, runtime_version(name), precision(name, placement), eager.fn, make_eager, requested=runtime)
    try:
        if name == "compile":
            fn = _compiled_fn(prefix, placement)
        else:
            if export_dir is None:
                runner.scratch = tempfile.TemporaryDirectory(prefix="transferlab-onnx-")
                export_dir = runner.scratch.name
            path = export_path(Path(export_dir), export_key)
            if not path.exists():  # the TorchScript exporter: ~2x faster than dynamo, needs only onnx
                export_onnx(prefix, (1, *input_shape[1:]), path, opset=OPSET, input_name="x", output_names=("y",))
            fn = (_openvino_fn if name == "openvino" else _onnxruntime_fn)(path, threads)
        error = _agreement_error(fn, eager.fn, input_shape)
        if not error <= AGREEMENT_TOL:
            raise ValueError(f"outputs differ from eager PyTorch by {error:.1e} (relative) > {AGREEMENT_TOL:g}")
        runner.fn = fn
    except Exception as e:
        runner._fall_back(f"runtime {name} unavailable ({_reason(e)})")
    return runner
