"""Does the cost grow linearly with the image count, and memory not at all? Extraction and a probe grid at
N = 5k, 20k and 50k images, then the smallest N again on a 2-node Ray cluster on loopback.

    python benchmarks/bench_scale.py [--data ../shared/data/birds100] [--sizes 5000,20000,50000]
        [--backbone efficientnet_lite0] [--work DIR] [--no-cluster]

The images are synthetic: seeded random crops (50-100% of the area, aspect 3/4-4/3, mirrored half the
time) of the source photos, resized to 227x227 and written as JPEG (quality 90) into a temporary folder
(never into the repository), 100 classes balanced; each size is the first N/100 images of every class
(60% train, 20% val, 20% test), listed in a labels CSV. For every N, in separate processes:

- **extraction**: the frozen backbone over all N images into an empty feature cache (the default
  runtime); seconds and the process's peak RSS;
- **probe grid**: ``transferlab sweep`` on that cache (every lookup a hit) with ``--cache-ram-gb 0``,
  so every split is streamed from its memory-mapped shards: 3 lr x 3 l2, 10 epochs without early
  stopping (patience 10), so the work per image is the same at every N; seconds and peak RSS.

Then at the smallest N the same sweep runs with ``--executor ray`` on a cluster of two nodes on this
machine (``ray start --head --num-cpus 0`` and ``ray start --address`` with its own temp dir), from an
empty cache: the extraction runs on the worker node's actors. ``cluster_equals_local`` is true when its
summary.json is the local one byte for byte and every cache file it wrote (shards and manifests) has
the digest of the local file of that name.

The last stdout line is JSON: per size the numbers above, ``extract_time_ratio_over_size_ratio`` and
``grid_time_ratio_over_size_ratio`` (time ratio over size ratio, each larger N against the smallest:
the worst; 1.0 is linear), the same from each size to the next (``*_step_ratios``), ``probe_rss_growth``
(the grid's peak RSS at the largest N over the smallest, minus 1) and ``cluster_equals_local``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from loopback_cluster import loopback_cluster

CLASSES = 100
GRID = ["--lr", "1e-3,3e-3,1e-2", "--l2", "0,1e-2,1", "--epochs", "10", "--patience", "10", "--seeds", "0"]


def _source_images(data: Path) -> dict[str, list[Path]]:
    by_class: dict[str, list[Path]] = {}
    for split in ("train", "test", "val"):
        for folder in sorted((data / split).glob("*")):
            if folder.is_dir():
                by_class.setdefault(folder.name, []).extend(sorted(folder.glob("*.jpg")))
    names = sorted(by_class)[:CLASSES]
    if len(names) < CLASSES:
        raise SystemExit(f"--data {data}: needs {CLASSES} class folders, found {len(names)}")
    return {c: by_class[c] for c in names}


def _write_crop(job: tuple[Path, Path, int]) -> None:
    import numpy as np
    from PIL import Image

    src, dst, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        area = rng.uniform(0.5, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((227, 227), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(dst, quality=90)


def build_images(data: Path, root: Path, sizes: list[int]) -> dict[int, Path]:
    """The synthetic images for the largest size, and one labels CSV per size."""
    sources = _source_images(data)
    per_class = max(sizes) // CLASSES
    jobs, rows = [], {c: [] for c in sources}
    for ci, (c, files) in enumerate(sources.items()):
        (root / "images" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            dst = root / "images" / c / f"{i:05d}.jpg"
            split = ("train", "train", "train", "val", "test")[i % 5]
            rows[c].append((str(dst.relative_to(root)), c, split))
            if not dst.exists():
                jobs.append((files[i % len(files)], dst, ci * 1_000_003 + i))
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_crop, jobs, chunksize=64)
    csvs = {}
    for n in sizes:
        path = root / f"labels-{n}.csv"
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["path", "label", "split"])
            for c in sources:
                out.writerows(rows[c][: n // CLASSES])
        csvs[n] = path
    return csvs


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS MB) of `cmd`, measured with wait4 (the child's own maximum resident set)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err.decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def extract_child(csv_path: str, cache: str, backbone: str) -> None:
    """The child of the extraction measurement: every split of `csv_path` through the frozen backbone."""
    from transferlab.data import DataConfig
    from transferlab.features.cut_inputs import CutInputs
    from transferlab.features.engine import EngineConfig
    from transferlab.models import load_backbone

    splits = DataConfig(csv_path).load()
    engine = EngineConfig(device="cpu", progress=False, cache_ram_gb=0.0)
    inputs = CutInputs(load_backbone(backbone), splits, engine, cache)
    inputs.setup(1)
    inputs.split_source(1, splits.test)


def cache_digests(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.glob("*-*/*")) if p.suffix in (".safetensors", ".json")}


def sweep_cmd(csv_path: Path, out: Path, cache: Path, backbone: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transferlab", "sweep", "--data", str(csv_path), "--out", str(out), "--cache-dir", str(cache),
            "--backbones", backbone, *GRID, "--cache-ram-gb", "0", "--device", "cpu", "--no-progress", *extra]


def cluster_run(csv_path: Path, work: Path, backbone: str) -> tuple[Path, Path, float]:
    """The sweep at `csv_path` on a 2-node loopback cluster from an empty cache: (out, cache, seconds)."""
    with loopback_cluster(os.cpu_count() or 1) as address:
        out, cache = work / "cluster-out", work / "cluster-cache"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        seconds, _rss = run_child(sweep_cmd(csv_path, out, cache, backbone, "--executor", "ray", "--ray-address", address), env=env)
        return out, cache, seconds


def ratio_over_size(values: dict[int, float]) -> float:
    """The worst (largest) time ratio over size ratio, each larger size against the smallest."""
    small = min(values)
    return max((values[n] / values[small]) / (n / small) for n in values if n != small)


def step_ratios(values: dict[int, float]) -> list[float]:
    """Time ratio over size ratio from each size to the next (fixed costs weigh less at every step)."""
    sizes = sorted(values)
    return [round((values[b] / values[a]) / (b / a), 3) for a, b in zip(sizes, sizes[1:])]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "birds100"))
    p.add_argument("--sizes", default="5000,20000,50000")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--work", default=None, help="keep the images and caches here (default: a temporary folder, removed)")
    p.add_argument("--no-cluster", action="store_true")
    p.add_argument("--child-extract", nargs=3, metavar=("CSV", "CACHE", "BACKBONE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_extract:
        extract_child(*args.child_extract)
        return {}
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="transferlab-scale-"))
    try:
        t0 = time.perf_counter()
        csvs = build_images(Path(args.data), work, sizes)
        print(f"images: {max(sizes)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        per_size = {}
        for n in sizes:
            ex_s, ex_rss = run_child([sys.executable, __file__, "--child-extract", str(csvs[n]), str(cache), args.backbone])
            out = work / f"out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            entries = cache_digests(cache)
            grid_s, grid_rss = run_child(sweep_cmd(csvs[n], out, cache, args.backbone))
            if cache_digests(cache) != entries:
                raise SystemExit(f"the probe grid at N={n} extracted something: its time would not be the grid's alone")
            per_size[n] = {"extract_s": round(ex_s, 1), "extract_img_per_s": round(n / ex_s, 1), "extract_peak_rss_mb": round(ex_rss),
                           "grid_s": round(grid_s, 1), "grid_peak_rss_mb": round(grid_rss)}
            print(f"N={n}: {per_size[n]}", file=sys.stderr)
        result: dict = {"backbone": args.backbone, "sizes": per_size,
                        "extract_time_ratio_over_size_ratio": round(ratio_over_size({n: v["extract_s"] for n, v in per_size.items()}), 3),
                        "grid_time_ratio_over_size_ratio": round(ratio_over_size({n: v["grid_s"] for n, v in per_size.items()}), 3),
                        "extract_step_ratios": step_ratios({n: v["extract_s"] for n, v in per_size.items()}),
                        "grid_step_ratios": step_ratios({n: v["grid_s"] for n, v in per_size.items()}),
                        "probe_rss_growth": round(per_size[sizes[-1]]["grid_peak_rss_mb"] / per_size[sizes[0]]["grid_peak_rss_mb"] - 1, 3)}
        if not args.no_cluster:
            n = sizes[0]
            out, cluster_cache, seconds = cluster_run(csvs[n], work, args.backbone)
            local, made = cache_digests(cache), cache_digests(cluster_cache)
            same_files = bool(made) and all(local.get(name) == digest for name, digest in made.items())
            same_summary = (out / "summary.json").read_bytes() == (work / f"out-{n}" / "summary.json").read_bytes()
            result.update(cluster_n=n, cluster_s=round(seconds, 1), cluster_files=len(made), cluster_same_files=same_files,
                          cluster_same_summary=same_summary, cluster_equals_local=same_files and same_summary)
        return result
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    summary = main()
    if summary:
        print(json.dumps(summary))
