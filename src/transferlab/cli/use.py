"""``transferlab export`` and ``transferlab predict``: using what was trained.

Wired into the main parser by ``add_use_parsers(subparsers)``; errors are UserErrors (one line, exit 2).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from transferlab.core.errors import UserError
from transferlab.core.files import atomic_write_bytes
from transferlab.sweep.ledger import METHODS


def add_use_parsers(sub) -> None:
    """Add the `export` and `predict` subcommands to the main parser's subparsers."""
    p = sub.add_parser("export", help="write a trained model folder (model.safetensors, config.json, optionally model.onnx)")
    p.add_argument("src", help="a probe's output folder (run.json) or a sweep folder (ledger.sqlite)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "onnx", "both"),
                   help="onnx and both also write model.onnx (needs transferlab[onnx]); safetensors is always written")
    p.add_argument("--backbone", default=None, help="sweep folder: the backbone of the chosen run (default: lowest val xent)")
    p.add_argument("--method", default=None, choices=METHODS, help="sweep folder: the LP, FT or LP-FT chosen run")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify images with an exported model or a run folder")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files, or folders walked recursively")
    p.add_argument("--model", required=True, help="exported model folder, a probe's output folder or a sweep folder")
    p.add_argument("--backbone", default=None, help="sweep folder: the backbone of the chosen run")
    p.add_argument("--method", default=None, choices=METHODS, help="sweep folder: the LP, FT or LP-FT chosen run")
    p.add_argument("--data", default=None,
                   help="evaluation mode: a data folder or labels.csv, split by the run's own settings; predicts --split, reports accuracy")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="evaluation mode: which split (default test)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (exact training numbers on cpu)")
    p.add_argument("--workers", type=int, default=None, help="image decoding worker processes, 0: serially in this process (default: on CPU, "
                   "threads of this process taking turns with the model; on CUDA min(4, cores) for more "
                   "than one batch of files)")
    p.add_argument("--out", default=None, help="preds.csv or preds.jsonl (default: CSV on stdout)")
    p.add_argument("--on-bad-image", default="error", choices=("error", "skip"), help="undecodable files: list them and stop (exit 2), or skip them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def cmd_export(args) -> int:
    from transferlab.deploy.export import export_model

    config = export_model(args.src, args.out, args.format, args.backbone, args.method)
    prov = config["provenance"]
    m = prov["metrics"]
    test = "n/a" if m.get("test_acc") is None else f"{m['test_acc']:.4f}"
    print(f"exported {config['backbone']} {prov['method']} run {prov['run_hash']} ({config['num_classes']} classes; "
          f"val xent {m['val_xent']:.4f}, test acc {test})")
    print("outputs: " + ", ".join(str(Path(args.out) / f) for f in (*config["files"].values(), "config.json")))
    return 0


def cmd_predict(args) -> int:
    from transferlab.deploy.predict import find_images, load_classifier, run_split

    if args.out is not None and not args.out.endswith((".csv", ".jsonl")):
        raise UserError(f"--out {args.out}: expected a .csv or .jsonl file name")
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 (decode in this process) or more")
    if bool(args.images) == bool(args.data):
        raise UserError("predict: give IMAGE_OR_DIR arguments or --data (evaluation mode), not both or neither")
    labels = None
    if not args.data:
        files = find_images(args.images)
    clf = load_classifier(args.model, args.device, args.backbone, args.method)
    if args.data:  # the split as the run built it: its split names, seed, validation fraction, per-class cap
        files, labels = run_split(clf, args.data, args.split, args.model, args.on_bad_image)
    if labels is not None:
        unknown = sorted(set(labels) - set(clf.classes))
        if unknown:
            raise UserError(f"--data {args.data}: classes the model does not know: {', '.join(unknown)}")
    probs, kept = clf.predict_proba(files, args.batch_size, args.on_bad_image, args.workers, progress=not args.no_progress)
    from transferlab.deploy.predict import rows_from_probabilities

    rows = rows_from_probabilities(probs, [files[i] for i in kept], clf.classes, args.top_k)
    if len(kept) < len(files):
        skipped = sorted(set(range(len(files))) - set(kept))
        print(f"transferlab: skipped {len(skipped)} undecodable image(s): " + "; ".join(files[i] for i in skipped), file=sys.stderr)
    dicts = [r.as_dict() for r in rows]
    if labels is not None:
        for d, i in zip(dicts, kept):
            d["label"] = labels[i]
    text = to_jsonl(dicts) if args.out and args.out.endswith(".jsonl") else to_csv(dicts, min(args.top_k, len(clf.classes)))
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    else:
        sys.stdout.write(text)
    if labels is not None and dicts:
        correct = sum(d["predicted"] == d["label"] for d in dicts)
        print(f"accuracy {correct / len(dicts):.4f} ({correct}/{len(dicts)}) on {args.data} [{args.split}]", file=sys.stderr)
    if args.out:
        print(f"{len(dicts)} predictions: {args.out}", file=sys.stderr)
    return 0


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def to_csv(rows: list[dict], k: int) -> str:
    """Columns: path, predicted, probability, [label,] class_1, prob_1, ..., class_k, prob_k."""
    buf = io.StringIO()
    has_label = bool(rows) and "label" in rows[0]
    header = ["path", "predicted", "probability"] + (["label"] if has_label else [])
    header += [x for i in range(1, k + 1) for x in (f"class_{i}", f"prob_{i}")]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        line = [r["path"], r["predicted"], repr(r["probability"])] + ([r["label"]] if has_label else [])
        line += [x for t in r["top_k"] for x in (t["class"], repr(t["probability"]))]
        w.writerow(line)
    return buf.getvalue()
