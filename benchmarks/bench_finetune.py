"""Does adapting the backbone beat the linear probe, by more than noise? LP, FT and LP-FT in one sweep.

    python benchmarks/bench_finetune.py --data ../shared/data/pacs-sketch [--backbone efficientnet_lite0]
        [--ood NAME=DIR ...] [--out DIR] [--progress] [-- extra sweep flags, e.g. --ft-lr 1e-4]

Runs ``transferlab sweep --lpft --ft`` from an empty cache (a fresh temporary folder unless --out is
given) with the default probe grid and the default fine-tuning rule (README, "Fine-tuning"). Every
choice is made on validation; the test split and each --ood set are read once per chosen model.
Prints one JSON line: ``minutes`` (the whole sweep), ``n_train``, and per method (LP, FT, LP-FT) its
test accuracy, validation numbers, chosen configuration, paired difference from LP with its 95%
bootstrap interval and McNemar's p, accuracy on each --ood set, and ``train_img_per_s`` (training
examples per second of the method's training passes, over all its runs; the probes train on cached
features), plus every fine-tuning run's validation numbers (what was tried).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from transferlab.cli.main import main as transferlab_main
from transferlab.sweep.ledger import Ledger
from transferlab.sweep.manifest import read_manifest

METHODS = ("LP", "FT", "LP-FT")
CONFIG_KEYS = ("lr", "l2", "seed", "ft_unit", "ft_augment", "ft_l2sp", "label_smoothing", "wise_alpha", "best_epoch",
               "n_trainable_layers")


def method_rows(out: Path, ood_names: list[str]) -> dict[str, dict]:
    """{method: its numbers} from the sweep's summary.json."""
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())}
    return {m: {"test_acc": r["test_acc"], "val_xent": r["val_xent"], "val_err": r["val_err"],
                "config": {k: r.get(k) for k in CONFIG_KEYS},
                "diff_vs_lp": r.get("diff_vs_lp"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"),
                "p_mcnemar": r.get("p_mcnemar"),
                "ood": {n: r.get(f"ood_{n}_acc") for n in ood_names}}
            for m, r in rows.items() if m in METHODS}


def training_speed(ledger: Ledger, backbone: str, method: str) -> float | None:
    """Training examples per second of `method`'s training passes, over all its finished runs."""
    images = seconds = 0.0
    for r in ledger.runs(backbone, method):
        timings = r.get("timings") or {}
        if timings.get("train_step_s"):
            images += timings["images_trained"]
            seconds += timings["train_step_s"]
    return round(images / seconds, 1) if seconds else None


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=DIR", help="an out-of-distribution test set (repeatable)")
    p.add_argument("--out", default=None, help="keep the sweep here (default: a temporary folder, removed)")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    ood_flags = [flag for spec in args.ood for flag in ("--ood", spec)]
    flags = ["sweep", "--data", args.data, "--out", str(out), "--backbones", args.backbone, "--lpft", "--ft", *ood_flags,
             *([] if args.progress else ["--no-progress"]), *extra]
    t0 = time.perf_counter()
    try:
        code = transferlab_main(flags)
        if code != 0:
            raise SystemExit(f"the sweep failed (exit {code})")
        minutes = (time.perf_counter() - t0) / 60
        methods = method_rows(out, [spec.partition("=")[0] for spec in args.ood])
        ledger = Ledger(out / "ledger.sqlite", readonly=True)
        for m in methods:
            methods[m]["train_img_per_s"] = training_speed(ledger, args.backbone, m)
        tried = [{"method": m, "unit": r["metrics"]["unit"], "lr": r["config"]["lr"], "epochs": r["config"]["epochs"],
                  "best_epoch": r["metrics"]["best_epoch"], "wise_alpha": r["metrics"]["wise_alpha"],
                  "val_xent": round(r["metrics"]["val_xent"], 4), "val_err": round(r["metrics"]["val_err"], 4),
                  "status": r["status"]}
                 for m in ("FT", "LP-FT") for r in ledger.runs(args.backbone, m) if r["metrics"]]
        n_train = read_manifest(ledger).data_summary["train"]["n"]
        ledger.close()
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    result = {"data": args.data, "backbone": args.backbone, "ood": args.ood, "extra_flags": extra, "minutes": round(minutes, 2),
              "n_train": n_train, "methods": methods, "ft_runs": tried}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
