"""GPU smoke check: probe, LP-then-FT sweep and a Ray sweep on CUDA agree with the same runs on CPU.

Runs (each from the command line, in fresh folders under --out):
  1. ``transferlab probe`` on CPU and on CUDA;
  2. ``transferlab sweep --lpft`` (a small grid) on CPU and on CUDA;
  3. the same sweep on CUDA with ``--executor ray``, whose feature extraction runs on one Ray actor per GPU
     (its cache files are compared with those the in-process CUDA sweep wrote: same keys, features
     within 1e-6);
  4. FT and LP-FT of every block (``--ft --lpft --ft-blocks all``, 2 epochs) on CPU and on CUDA, where
     training runs under bf16 autocast;
and prints one JSON line: per comparison the largest |val_xent difference| (target <= 2e-3 for probes;
for fine-tuned runs, whose backbone layers train under bf16 autocast on CUDA, <= 5e-2), whether the chosen configuration is the same
(or, if not, whether the two were within that margin on CPU), extraction img/s on GPU vs CPU (from
run.json timings) and whole-network training img/s per method on each device.

    python benchmarks/gpu_check.py --data ../shared/data/birds10 [--out gpu-check]

Needs a CUDA device; exits 2 with one line otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOL = 2e-3
FT_TOL = 5e-2  # whole-network training in bf16 autocast on CUDA vs fp32 on CPU, 2 epochs
FT_GRID = ["--lr", "1e-2", "--l2", "0", "--seeds", "0", "--epochs", "40", "--lpft", "--ft", "--ft-blocks", "all",
           "--ft-epochs", "2", "--ft-lr", "1e-3", "--no-progress"]
GRID = ["--lr", "1e-3,1e-2", "--l2", "0,1e-2", "--seeds", "0", "--lpft", "--ft-lr", "1e-5,1e-4", "--epochs", "40",
        "--ft-blocks", "4", "--ft-augment", "none", "--ft-optimizer", "adam", "--ft-weight-decay", "0", "--ft-epochs", "10",
        "--ft-backbone-lr-mult", "0.3", "--ft-batch-size", "64", "--no-progress"]


def transferlab(*args: str) -> float:
    """Run one command; seconds it took."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferlab", *args], check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    return time.perf_counter() - t


def chosen(summary: list[dict]) -> dict:
    return {(r["backbone"], r["method"]): r for r in summary}


def training_img_s(sweep_dir: Path, method: str) -> float | None:
    """Training examples per second of `method`'s runs, from the ledger's timings."""
    import sqlite3

    con = sqlite3.connect(sweep_dir / "ledger.sqlite")
    try:
        rows = [json.loads(t or "{}") for (t,) in con.execute("SELECT timings FROM runs WHERE method = ?", (method,))]
    finally:
        con.close()
    seconds = sum(r.get("train_step_s", 0.0) for r in rows)
    return round(sum(r.get("images_trained", 0) for r in rows) / seconds, 1) if seconds else None


def compare_sweeps(cpu_dir: Path, gpu_dir: Path, ft_tol: float = FT_TOL) -> dict:
    cpu, gpu = chosen(json.loads((cpu_dir / "summary.json").read_text())), chosen(json.loads((gpu_dir / "summary.json").read_text()))
    out = {}
    for key, c in cpu.items():
        g = gpu.get(key)
        if g is None:
            out["/".join(key)] = {"missing_on_gpu": True}
            continue
        same = all(c[k] == g[k] for k in ("lr", "l2", "seed"))
        tol = TOL if key[1] == "LP" else ft_tol  # fine-tuned layers train in bf16 autocast on CUDA
        margin_ok = same or _within_margin_on_cpu(cpu_dir, key, c, g, tol)
        out["/".join(key)] = {"val_xent_cpu": c["val_xent"], "val_xent_gpu": g["val_xent"],
                              "abs_diff": abs(c["val_xent"] - g["val_xent"]), "tol": tol, "same_choice": same,
                              "choice_ok": margin_ok, "test_acc_cpu": c["test_acc"], "test_acc_gpu": g["test_acc"]}
    return out


def _within_margin_on_cpu(cpu_dir: Path, key: tuple, c: dict, g: dict, tol: float) -> bool:
    """Different choices are fine when the GPU's choice was within `tol` of the CPU's best on CPU too."""
    import sqlite3

    con = sqlite3.connect(cpu_dir / "ledger.sqlite")
    try:
        for cfg, metrics in con.execute("SELECT config, metrics FROM runs WHERE backbone = ? AND method = ?", key):
            cfg, metrics = json.loads(cfg), json.loads(metrics or "{}")
            if all(cfg[k] == g[k] for k in ("lr", "l2", "seed")) and metrics.get("val_xent") is not None:
                return abs(metrics["val_xent"] - c["val_xent"]) <= tol
    finally:
        con.close()
    return False


def compare_caches(local: Path, on_ray: Path) -> dict:
    """The cache entries two sweeps wrote: whether they have the same keys, and the largest feature difference."""
    from safetensors.torch import load_file

    names = {p.parent.name for p in local.glob("*-*/manifest.json")}
    ray_names = {p.parent.name for p in on_ray.glob("*-*/manifest.json")}
    diff = 0.0
    for name in sorted(names & ray_names):
        for shard in sorted((local / name).glob("*.safetensors")):
            a, b = load_file(str(shard))["inputs"], load_file(str(on_ray / name / shard.name))["inputs"]
            diff = max(diff, float((a - b).abs().max()))
    return {"entries": len(ray_names), "same_keys": bool(names) and names == ray_names, "max_abs_diff": diff,
            "ok": bool(names) and names == ray_names and diff <= 1e-6}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="gpu-check")
    p.add_argument("--backbone", default="efficientnet_lite0")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device is available", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    common = ["--data", args.data, "--backbone", args.backbone, "--no-progress"]
    seconds = {}
    for device in ("cpu", "cuda"):
        seconds[f"probe_{device}"] = transferlab("probe", *common, "--device", device, "--out", str(out / f"probe_{device}"))
    probe = {d: json.loads((out / f"probe_{d}" / "run.json").read_text()) for d in ("cpu", "cuda")}
    n_images = sum(probe["cpu"]["data"][s]["n"] for s in ("train", "val", "test") if s in probe["cpu"]["data"])
    img_s = {d: n_images / sum(v for k, v in probe[d]["timings"].items() if k.startswith("inputs_")) for d in ("cpu", "cuda")}
    sweep = ["sweep", "--data", args.data, "--backbones", args.backbone, *GRID]
    for name, extra in (("sweep_cpu", ["--device", "cpu"]), ("sweep_cuda", ["--device", "cuda"]),
                        ("sweep_cuda_ray", ["--device", "cuda", "--executor", "ray"])):
        seconds[name] = transferlab(*sweep, *extra, "--out", str(out / name))
    whole = ["sweep", "--data", args.data, "--backbones", args.backbone, *FT_GRID]
    for device in ("cpu", "cuda"):
        seconds[f"whole_network_{device}"] = transferlab(*whole, "--device", device, "--out", str(out / f"whole_network_{device}"))
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "probe": {"val_xent_cpu": probe["cpu"]["val_xent"], "val_xent_gpu": probe["cuda"]["val_xent"],
                  "abs_diff": abs(probe["cpu"]["val_xent"] - probe["cuda"]["val_xent"]),
                  "test_acc_cpu": probe["cpu"]["test_acc"], "test_acc_gpu": probe["cuda"]["test_acc"]},
        "sweep_cuda": compare_sweeps(out / "sweep_cpu", out / "sweep_cuda"),
        "sweep_cuda_ray": compare_sweeps(out / "sweep_cpu", out / "sweep_cuda_ray"),
        "gpu_actor_extraction": compare_caches(out / "sweep_cuda" / "cache", out / "sweep_cuda_ray" / "cache"),
        "whole_network": compare_sweeps(out / "whole_network_cpu", out / "whole_network_cuda"),
        "train_img_s": {m: {d: training_img_s(out / f"whole_network_{d}", m) for d in ("cpu", "cuda")} for m in ("FT", "LP-FT")},
        "extract_img_s": {"cpu": round(img_s["cpu"], 1), "cuda": round(img_s["cuda"], 1), "ratio": round(img_s["cuda"] / img_s["cpu"], 2)},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    rows = [v for s in ("sweep_cuda", "sweep_cuda_ray", "whole_network") for v in result[s].values()]
    within = [result["probe"]["abs_diff"] <= TOL] + [v.get("abs_diff", float("inf")) <= v.get("tol", TOL) for v in rows]
    result["ok"] = all(within) and all(v.get("choice_ok", False) for v in rows) and result["gpu_actor_extraction"]["ok"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
