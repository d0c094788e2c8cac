"""Speed of one-forward-pass-per-image training versus running the frozen backbone every epoch.

    python benchmarks/bench_speed.py --data ../shared/data/birds10 --backbone resnet10 [--json]

Prints one JSON object as its last stdout line; every ratio is measured within this one run.
Without pretrained weights at hand, a randomly initialised copy is timed (``"weights": "random"``):
time does not depend on the weight values.

Runtimes (``--runtime-backbones``, default efficientnet_lite0,resnet10): extraction throughput
(decode + frozen prefix, the probe's features) of `--runtime-images` training images with each
runtime: ``eager`` (plain eager PyTorch, what extraction ran before runtimes existed), ``torch``
(eager, channels_last), ``onnxruntime``, ``openvino`` (and ``compile`` with ``--compile``). Rounds
alternate the runtimes and the best round counts, so a neighbour's load on a shared CPU hurts
every runtime alike. ``runtime_speedup`` = what ``--runtime auto`` picks / ``eager``.
``extract_over_inference`` = that runtime's extraction (decoding included) / the same runtime on the
same images decoded beforehand (``inference_img_s``): 1.0 means decoding costs nothing.
``--probe-e2e`` also times ``transferlab probe`` on `--data` end to end (default flags, fresh output
folder, no cache) with ``--runtime torch`` and with the default runtime. ``--runtimes-only`` skips
the grid and fine-tuning timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from transferlab.core.devices import Placement, keep_freed_memory
from transferlab.core.errors import UserError
from transferlab.data import image_loader, load_splits
from transferlab.features.cache import Chain
from transferlab.features.cut_inputs import CutInputs
from transferlab.features.extraction import extract
from transferlab.features.runtimes import PrefixRunner, is_installed, onnx_export_key, prepare_prefix_runner, resolve_runtime
from transferlab.models import load_backbone
from transferlab.sweep.tasks import train_probes
from transferlab.train.config import TrainConfig
from transferlab.train.probe_run import EngineConfig
from transferlab.train.session import RunSession

GRID_LRS, GRID_L2S, GRID_SEEDS, GRID_EPOCHS = (1e-4, 1e-3, 1e-2), (0.0, 1e-2, 1.0), (0, 1), 30


def load(name: str, model_dir: str | None):
    try:
        return load_backbone(name, **({"model_dir": model_dir} if model_dir else {})), "pretrained"
    except UserError:
        return load_backbone(name, pretrained=False), "random"


def epoch_times(bench: RunSession, k: int, epochs: int) -> list[float]:
    """Wall time of each training epoch (train step + validation), epochs 1..n."""
    stamps = []
    bench.run(TrainConfig(lr=1e-3, epochs=epochs, patience=epochs + 1), k, on_epoch=lambda r: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


@torch.no_grad()
def model_throughput(model: torch.nn.Module, size: int, batch: int, reps: int = 4) -> float:
    """Images per second of the model's own forward pass on random tensors (after one warm-up)."""
    model.eval()
    x = torch.randn(batch, 3, size, size)
    model(x)
    start = time.perf_counter()
    for _ in range(reps):
        model(x)
    return reps * batch / (time.perf_counter() - start)


def plain_eager(prefix: torch.nn.Module) -> PrefixRunner:
    """Extraction as it ran before runtimes: eager PyTorch, default memory layout."""

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        return prefix(x).float()

    return PrefixRunner("eager", torch.__version__, "fp32", fn)


def runtime_throughput(name: str, model_dir: str | None, data: str, n_images: int, rounds: int, with_compile: bool, say) -> dict:
    """Extraction img/s of the probe's features of `name` on `n_images` training images, per runtime."""
    backbone, weights = load(name, model_dir)
    split = load_splits(data).train
    split = split.subset(list(range(0, len(split), max(1, len(split) // n_images)))[:n_images])
    pre = backbone.spec.preprocessing
    chain = backbone.chain()
    prefix = Chain(chain[:-1]).eval()
    shape = (1, 3, pre.input_size, pre.input_size)
    cpu = Placement(torch.device("cpu"))
    names = ["torch", "compile"] if with_compile else ["torch"]
    names += [r for r in ("onnxruntime", "openvino") if is_installed(r)]
    runners = {"eager": plain_eager(prefix)}
    prepare_s = {}
    for r in names:
        t = time.perf_counter()
        runners[r] = prepare_prefix_runner(prefix, shape, r, cpu, None, onnx_export_key(name, backbone.weights_digest, "head", shape))
        prepare_s[r] = round(time.perf_counter() - t, 2)  # export + compile (done once per cache folder)
        if runners[r].notice:
            say(runners[r].notice)
    auto = resolve_runtime("auto", cpu)
    # The runtime alone, on the same images decoded beforehand: what extraction would reach if decoding were free.
    # Timed in every round right after the extractions, so a neighbour's load hurts both alike.
    decoded = [x for x, _y, _idx, _ok in image_loader(split, pre, 64, 0)]
    img_s = {r: 0.0 for r in runners}
    inference = 0.0
    for _ in range(rounds):
        for r, runner in runners.items():
            t = time.perf_counter()
            extract(prefix, split, pre, cpu, progress=False, runner=runner)
            img_s[r] = max(img_s[r], len(split) / (time.perf_counter() - t))
        t = time.perf_counter()
        for x in decoded:
            runners[auto](x)
        inference = max(inference, len(split) / (time.perf_counter() - t))
    result = {
        "weights": weights, "images": len(split), "input_size": pre.input_size, "auto": auto,
        "extract_img_s": {r: round(v, 1) for r, v in img_s.items()},
        "inference_img_s": round(inference, 1),
        "extract_over_inference": round(img_s[auto] / inference, 3),
        "prepare_s": prepare_s,
        "runtime_speedup": round(img_s[auto] / img_s["eager"], 2),
    }
    say(f"{name}: " + ", ".join(f"{r} {v:.1f}" for r, v in img_s.items()) + f" img/s; {auto} / eager = {result['runtime_speedup']}x")
    return result


def probe_end_to_end(data: str, backbone: str, runtime: str | None) -> float:
    """Seconds of `transferlab probe` on `data` from the command line, in a fresh output folder."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "transferlab", "probe", "--data", data, "--backbone", backbone, "--out", out, "--no-progress"]
        cmd += ["--runtime", runtime] if runtime else []
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
        return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="resnet10")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--naive-epochs", type=int, default=3)
    p.add_argument("--ft-layers", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--runtime-backbones", default="efficientnet_lite0,resnet10", help="comma list ('' to skip)")
    p.add_argument("--runtime-images", type=int, default=96)
    p.add_argument("--runtime-rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a small CPU)")
    p.add_argument("--probe-e2e", action="store_true", help="time `transferlab probe` end to end: --runtime torch vs default")
    p.add_argument("--runtimes-only", action="store_true", help="only the runtime (and --probe-e2e) timings")
    args = p.parse_args(argv)
    keep_freed_memory()  # as every CutInputs does
    splits = load_splits(args.data)
    backbone, weights = load(args.backbone, args.model_dir)
    n_images = len(splits.train) + len(splits.val) + (len(splits.test) if splits.test else 0)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    runtime_rows = {name: runtime_throughput(name, args.model_dir, args.data, args.runtime_images, args.runtime_rounds, args.compile, say)
                    for name in filter(None, args.runtime_backbones.split(","))}
    result = {
        "threads": torch.get_num_threads(),
        "runtimes": runtime_rows,
        "extract_img_s": {name: row["extract_img_s"] for name, row in runtime_rows.items()},
        "runtime_speedup": {name: row["runtime_speedup"] for name, row in runtime_rows.items()},
        "extract_over_inference": {name: row["extract_over_inference"] for name, row in runtime_rows.items()},
    }
    if args.probe_e2e:
        for _ in range(1):  # warm the page cache so neither command pays for the first read of the images
            for path in splits.train.files + splits.val.files + (splits.test.files if splits.test else []):
                with open(path, "rb") as f:
                    f.read()
        torch_s = probe_end_to_end(args.data, args.backbone, "torch")
        auto_s = probe_end_to_end(args.data, args.backbone, None)
        result["probe_e2e"] = {"backbone": args.backbone, "torch_s": round(torch_s, 1), "default_s": round(auto_s, 1),
                               "default_runtime": resolve_runtime("auto", Placement(torch.device("cpu"))), "speedup": round(torch_s / auto_s, 2)}
        say(f"probe end to end: --runtime torch {torch_s:.1f}s, default {auto_s:.1f}s")
    if args.runtimes_only:
        print(json.dumps(result))
        return result

    def bench(use_cache: bool) -> RunSession:
        engine = EngineConfig(args.device, use_cache=use_cache, progress=False)
        return RunSession(CutInputs(backbone, splits, engine, cache_dir=None))  # memory only: nothing read back from disk

    # 1. The model's own forward throughput vs extraction (decode + forward) throughput.
    model_img_s = model_throughput(backbone.model, backbone.spec.preprocessing.input_size, 64)
    say(f"model forward: {model_img_s:.1f} img/s")

    # 2. Extraction, then the whole LP grid on cached features (no early stopping).
    cached = bench(True)
    t0 = time.perf_counter()
    cached.inputs.setup(1)
    cached.evaluate_test(1)  # extracts the test split too
    extract_s = time.perf_counter() - t0
    cfgs = [TrainConfig(lr=lr, l2=l2, seed=s, epochs=GRID_EPOCHS, patience=GRID_EPOCHS + 1)
            for s in GRID_SEEDS for lr in GRID_LRS for l2 in GRID_L2S]
    t1 = time.perf_counter()
    train_probes(cached, cfgs)
    grid_runs_s = time.perf_counter() - t1
    grid_cached_s = extract_s + grid_runs_s
    say(f"extract {extract_s:.1f}s, grid of {len(cfgs)} probes {grid_runs_s:.2f}s")

    # 3. The naive probe: frozen backbone on every image every epoch.
    naive = bench(False)
    naive_epoch_s = statistics.median(epoch_times(naive, 1, args.naive_epochs + 1)[1:] or [float("nan")])
    naive_grid_est_s = naive_epoch_s * GRID_EPOCHS * len(cfgs)
    say(f"naive epoch {naive_epoch_s:.2f}s")

    # 4. Fine-tuning the last k layers: full model every epoch vs the frozen-prefix cache.
    ft_full = statistics.median(epoch_times(naive, args.ft_layers, args.naive_epochs + 1)[1:])
    prefix = bench(True)
    t2 = time.perf_counter()
    prefix.setup(args.ft_layers)
    prefix_extract_s = time.perf_counter() - t2
    ft_prefix = statistics.median(epoch_times(prefix, args.ft_layers, 6)[1:])
    say(f"ft epoch full {ft_full:.2f}s, prefix {ft_prefix:.3f}s (cut at {prefix.setup(args.ft_layers).cut.name})")

    result = {
        **result,
        "backbone": args.backbone,
        "weights": weights,
        "device": args.device,
        "n_images": n_images,
        "model_img_s": round(model_img_s, 2),
        "extract_s": round(extract_s, 3),
        "grid_extract_img_s": round(n_images / extract_s, 2),
        "extract_vs_model": round(n_images / extract_s / model_img_s, 3),
        "grid_runs": len(cfgs),
        "grid_epochs": GRID_EPOCHS,
        "grid_cached_s": round(grid_cached_s, 3),
        "naive_epoch_s": round(naive_epoch_s, 3),
        "naive_grid_est_s": round(naive_grid_est_s, 1),
        "speedup_vs_naive": round(naive_grid_est_s / grid_cached_s, 1),
        "grid_over_extract": round(grid_cached_s / extract_s, 3),
        "ft_layers": args.ft_layers,
        "ft_cut": prefix.setup(args.ft_layers).cut.name,
        "ft_prefix_extract_s": round(prefix_extract_s, 3),
        "ft_epoch_full_s": round(ft_full, 3),
        "ft_epoch_prefix_s": round(ft_prefix, 4),
        "ft_speedup": round(ft_full / ft_prefix, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
