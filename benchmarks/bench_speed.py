"""Speed of one-forward-pass-per-image training versus running the frozen backbone every epoch.

    python benchmarks/bench_speed.py --data ../shared/data/birds10 --backbone resnet10 [--json]

Prints one JSON object as its last stdout line; every ratio is measured within this one run.
Without pretrained weights at hand, a randomly initialised copy is timed (``"weights": "random"``):
time does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from transferlab.backbones import load_backbone
from transferlab.data import load_splits
from transferlab.study import EngineConfig, Workbench
from transferlab.training import TrainConfig
from transferlab.utils import UserError

GRID_LRS, GRID_L2S, GRID_SEEDS, GRID_EPOCHS = (1e-4, 1e-3, 1e-2), (0.0, 1e-2, 1.0), (0, 1), 30


def load(name: str, model_dir: str | None):
    try:
        return load_backbone(name, **({"model_dir": model_dir} if model_dir else {})), "pretrained"
    except UserError:
        return load_backbone(name, pretrained=False), "random"


def epoch_times(bench: Workbench, k: int, epochs: int) -> list[float]:
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="resnet10")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--naive-epochs", type=int, default=3)
    p.add_argument("--ft-layers", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    splits = load_splits(args.data)
    backbone, weights = load(args.backbone, args.model_dir)
    n_images = len(splits.train) + len(splits.val) + (len(splits.test) if splits.test else 0)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    def bench(use_cache: bool) -> Workbench:
        engine = EngineConfig(args.device, use_cache=use_cache, progress=False)
        return Workbench(backbone, splits, engine, cache_dir=None)  # memory only: nothing read back from disk

    # 1. The model's own forward throughput vs extraction (decode + forward) throughput.
    model_img_s = model_throughput(backbone.model, backbone.spec.preprocessing.input_size, 64)
    say(f"model forward: {model_img_s:.1f} img/s")

    # 2. Extraction, then the whole LP grid on cached features (no early stopping).
    cached = bench(True)
    t0 = time.perf_counter()
    cached.setup(1)
    cached.evaluate_test(1)  # extracts the test split too
    extract_s = time.perf_counter() - t0
    cfgs = [TrainConfig(lr=lr, l2=l2, seed=s, epochs=GRID_EPOCHS, patience=GRID_EPOCHS + 1)
            for s in GRID_SEEDS for lr in GRID_LRS for l2 in GRID_L2S]
    t1 = time.perf_counter()
    cached.run_probes(cfgs)
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
        "backbone": args.backbone,
        "weights": weights,
        "device": args.device,
        "n_images": n_images,
        "threads": torch.get_num_threads(),
        "model_img_s": round(model_img_s, 2),
        "extract_s": round(extract_s, 3),
        "extract_img_s": round(n_images / extract_s, 2),
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
