"""Is transferlab's linear probe as good as a well-tuned logistic regression on the same features?

    python benchmarks/bench_probe_quality.py --data ../shared/data/birds100 [--backbone efficientnet_lite0]
        [--cache-dir DIR] [--json]

Both use the same penultimate features and the same train / validation / test split. transferlab:
the 3 lr x 3 l2 probe grid (seed 0), chosen on validation cross-entropy. scikit-learn: L-BFGS
logistic regression (multinomial), C chosen on validation accuracy (ties: log loss). Prints one
JSON line with both test accuracies and their difference in points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from transferlab.features.cut_inputs import CutInputs
from transferlab.features.sources import TensorSource
from transferlab.models import load_backbone
from transferlab.sweep.select import choose
from transferlab.sweep.tasks import train_probes
from transferlab.train.config import TrainConfig
from transferlab.train.probe_run import DataConfig, EngineConfig
from transferlab.train.session import RunSession

LRS, L2S, CS = (1e-4, 1e-3, 1e-2), (0.0, 1e-2, 1.0), (0.01, 0.1, 1.0, 10.0, 100.0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--test-split", default="test")
    p.add_argument("--cache-dir", default=None, help="reuse a sweep's feature cache (e.g. OUT/cache)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    splits = DataConfig(args.data, test_split=args.test_split).load()
    bench = RunSession(CutInputs(load_backbone(args.backbone), splits, EngineConfig("cpu", progress=not args.json), args.cache_dir))
    t0 = time.perf_counter()
    bench.inputs.setup(1)
    bench.evaluate_test(1)  # test features, for scikit-learn below
    extract_s = time.perf_counter() - t0

    cfgs = [TrainConfig(lr=lr, l2=l2, seed=0, epochs=args.epochs, patience=15) for lr in LRS for l2 in L2S]
    t1 = time.perf_counter()
    results = train_probes(bench, cfgs)
    rows = [{"hash": str(i), "status": r.status, "metrics": {"val_xent": r.best["val_xent"], "val_err": r.best["val_err"]}}
            for i, r in enumerate(results)]
    best = int(choose(rows, [str(i) for i in range(len(cfgs))])["hash"])
    bench.load_trained(1, results[best].best_state)
    test = bench.evaluate_test(1)
    assert test is not None, "needs a test split"
    probe_acc = test.accuracy
    probe_s = time.perf_counter() - t1

    def xy(name):
        src = bench.inputs.setup(1).sources[name]
        assert isinstance(src, TensorSource)
        return src.inputs.cpu().numpy(), src.labels.cpu().numpy()

    (xtr, ytr), (xva, yva), (xte, yte) = xy("train"), xy("val"), xy("test")
    t2 = time.perf_counter()
    fits = []
    for c in CS:
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        fits.append((clf.score(xva, yva), -log_loss(yva, clf.predict_proba(xva), labels=clf.classes_), c, clf))
    val_acc, _, best_c, clf = max(fits, key=lambda f: (f[0], f[1]))
    sk_acc = float(clf.score(xte, yte))
    sk_s = time.perf_counter() - t2
    result = {
        "data": args.data, "backbone": args.backbone, "n_train": len(ytr), "n_val": len(yva), "n_test": len(yte),
        "probe_test_acc": round(probe_acc, 4), "probe_lr": cfgs[best].lr, "probe_l2": cfgs[best].l2,
        "probe_best_epoch": results[best].best_epoch, "probe_val_err": round(results[best].best["val_err"], 4),
        "sklearn_test_acc": round(sk_acc, 4), "sklearn_C": best_c, "sklearn_val_acc": round(float(val_acc), 4),
        "diff_points": round(100 * (probe_acc - sk_acc), 2),
        "extract_s": round(extract_s, 1), "probe_grid_s": round(probe_s, 2), "sklearn_s": round(sk_s, 1),
    }
    if not args.json:
        print(f"probe {probe_acc:.4f} vs scikit-learn {sk_acc:.4f} ({result['diff_points']:+.2f} points)", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
