"""Does LP-then-FT beat the linear probe, by more than noise? One sweep with the default fine-tuning grid
plus ``--ft-augment views:4``.

    python benchmarks/bench_finetune.py --data ../shared/data/birds100 [--backbone efficientnet_lite0]
        [--out DIR] [-- extra sweep flags, e.g. --ft-blocks 8,11 --ft-lr 1e-4]

Runs ``transferlab sweep --lpft`` from an empty cache (a fresh temporary folder unless --out is
given): the default probe grid, then the default fine-tuning grid with 4 cached augmented views per
training image, from the chosen probe (README, "Fine-tuning"). Every choice is made on validation; the test split is read once per method. Prints
one JSON line: both test accuracies, the paired difference with its 95% bootstrap interval and
McNemar's p, the minutes the whole sweep took, the chosen fine-tuning configuration, and every
fine-tuning run's validation numbers (what was tried).
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


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--out", default=None, help="keep the sweep here (default: a temporary folder, removed)")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    flags = ["sweep", "--data", args.data, "--out", str(out), "--backbones", args.backbone, "--lpft", "--ft-augment", "views:4",
             *([] if args.progress else ["--no-progress"]), *extra]
    t0 = time.perf_counter()
    try:
        code = transferlab_main(flags)
        if code != 0:
            raise SystemExit(f"the sweep failed (exit {code})")
        minutes = (time.perf_counter() - t0) / 60
        rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())}
        lp, ft = rows["LP"], rows["LP-FT"]
        ledger = Ledger(out / "ledger.sqlite", readonly=True)
        tried = [{"unit": r["metrics"]["unit"], "lr": r["config"]["lr"], "augment": r["config"]["feature_augment"],
                  "l2sp": r["config"]["l2sp"], "label_smoothing": r["config"]["label_smoothing"],
                  "best_epoch": r["metrics"]["best_epoch"], "wise_alpha": r["metrics"]["wise_alpha"],
                  "val_xent": round(r["metrics"]["val_xent"], 4), "val_err": round(r["metrics"]["val_err"], 4),
                  "status": r["status"]}
                 for r in ledger.runs(args.backbone, "LP-FT") if r["metrics"]]
        ledger.close()
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    result = {
        "data": args.data, "backbone": args.backbone, "extra_flags": extra,
        "lp_test_acc": lp["test_acc"], "lpft_test_acc": ft["test_acc"], "diff": ft["diff_vs_lp"],
        "ci_low": ft["ci_low"], "ci_high": ft["ci_high"], "p_mcnemar": ft["p_mcnemar"], "minutes": round(minutes, 2),
        "lp_val": {"val_xent": lp["val_xent"], "val_err": lp["val_err"], "lr": lp["lr"], "l2": lp["l2"], "seed": lp["seed"]},
        "chosen_ft": {k: ft[k] for k in ("ft_unit", "lr", "ft_augment", "ft_l2sp", "label_smoothing", "wise_alpha", "select",
                                         "best_epoch", "val_xent", "val_err", "n_trainable_layers")},
        "ft_runs": tried,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
