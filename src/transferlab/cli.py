"""The ``transferlab`` command: parse flags into frozen configs and call the study layer.

Bad input is reported as one line on stderr with exit code 2; Ctrl-C exits 130 keeping finished work.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from .utils import UserError

DEFAULT_DEMO_OUT = "transferlab-demo"


def _add_data_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="image folder with train/<class>/* (val/, test/ optional)")
    g.add_argument("--val-split", default="val", help="validation folder name (default: val)")
    g.add_argument("--test-split", default="test", help="test folder name (default: test)")
    g.add_argument("--valid-frac", type=float, default=0.2, help="fraction of train carved out as validation when there is no val folder")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the carved validation split and --max-per-class")
    g.add_argument("--max-per-class", type=int, default=None, help="cap train(+carved val) images per class")
    g.add_argument("--on-bad-image", default="error", choices=("error", "skip"), help="undecodable image files: list them and stop, or skip them")


def _add_backbone_flags(p: argparse.ArgumentParser) -> None:
    from .backbones import DEFAULT_BACKBONE, DEFAULT_MODEL_DIR

    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone name (default: {DEFAULT_BACKBONE}; see `transferlab backbones`)")
    g.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="folder with official pytorchcv .pth files")
    g.add_argument("--weights", default=None, help="local checkpoint (.safetensors or .pth) for the --backbone architecture")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--no-cache", action="store_true", help="run the frozen backbone on every image every epoch")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUT/cache)")
    g.add_argument("--cache-max-gb", type=float, default=4.0, help="largest activation cache to keep in memory")
    g.add_argument("--workers", type=int, default=None, help="image decoding workers (default: min(4, cores))")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--l2", type=float, default=0.0, help="loss = mean xent + (l2 / n_train) * sum(W_head^2)")
    g.add_argument("--seed", type=int, default=0, help="head init and batch order")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--patience", type=int, default=15, help="epochs without val xent improvement before stopping")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    g.add_argument("--n-trainable-layers", type=int, default=1, help="train the last k layers (1 = linear probe)")
    g.add_argument("--augment", action="store_true", help="random resized crops and flips of training images (runs the backbone every epoch)")
    g.add_argument("--train-bn", action="store_true", help="trainable batch-norm layers use batch statistics (default: pretrained running statistics)")


def _engine(args):
    from .study import EngineConfig

    return EngineConfig(args.device, not args.no_cache, args.cache_dir, args.cache_max_gb, args.workers, not args.no_progress)


def _data(args):
    from .study import DataConfig

    return DataConfig(args.data, args.val_split, args.test_split, args.valid_frac, args.split_seed, args.max_per_class, args.on_bad_image)


def _print_result(record: dict, out: Path) -> None:
    acc = record["test_acc"]
    acc_text = "n/a (no test split)" if acc is None else f"{acc:.4f}"
    layers = record["trainable_layers"]
    shown = ", ".join(layers if len(layers) <= 4 else layers[:2] + ["..."] + layers[-1:])
    print(
        f"{record['backbone']['name']}: status {record['status']}, best epoch {record['best_epoch']} "
        f"(val xent {record['val_xent']:.4f}, val err {record['val_err']:.4f}), test acc {acc_text}; "
        f"trained {record['trainable_params']:,} parameters in {len(layers)} layer(s): {shown}"
    )
    print(f"outputs: {out / 'run.json'}, {out / 'head.safetensors'}, {out / 'curves.png'}")


def cmd_backbones(args) -> int:
    from .backbones import list_backbones

    rows = list_backbones(args.model_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':20s} {'zoo':9s} {'source':10s} {'top1':>6s} {'params':>10s} {'input':>5s}  weights")
    for r in rows:
        top1 = f"{r['source_top1']:.2f}" if r["source_top1"] is not None else "-"
        print(f"{r['name']:20s} {r['zoo']:9s} {r['source']:10s} {top1:>6s} {r['params']:>10,d} {r['input_size']:>5d}  {r['weights']}")
    return 0


def cmd_probe(args) -> int:
    from .study import ProbeConfig, run_probe
    from .training import TrainConfig

    cfg = ProbeConfig(
        data=_data(args),
        backbone=args.backbone,
        model_dir=args.model_dir,
        weights=args.weights,
        n_trainable_layers=args.n_trainable_layers,
        train=TrainConfig(args.lr, args.l2, args.seed, args.epochs, args.patience, args.batch_size, args.optimizer,
                          train_bn=args.train_bn, augment=args.augment),
        engine=_engine(args),
    )
    out = Path(args.out)
    record = run_probe(cfg, out)
    _print_result(record, out)
    return 0


def cmd_demo(args) -> int:
    from .demo import write_digits_folder
    from .study import DataConfig, EngineConfig, ProbeConfig, run_probe
    from .training import TrainConfig

    out = Path(args.out)
    data = write_digits_folder(out / "digits")
    print(f"demo data: scikit-learn digits as images in {data} (30 train / 10 val / 20 test per class)")
    cfg = ProbeConfig(
        data=DataConfig(str(data)),
        backbone="efficientnet_lite0",
        train=TrainConfig(lr=1e-2, l2=1.0, seed=0, epochs=100, patience=15),
        engine=EngineConfig(device=args.device, progress=not args.no_progress),
    )
    record = run_probe(cfg, out / "probe")
    _print_result(record, out / "probe")
    return 0


def cmd_sweep(args) -> int:
    from .search import sweep
    from .sweep_cli import build_config, build_executor_config, reproduce_command, resolve

    values = resolve(args)
    cfg = build_config(values)
    out = Path(values["out"])
    rows = sweep(cfg, out, force=args.force, command=reproduce_command(args.argv), executor=build_executor_config(values))
    for r in rows:
        acc = "n/a" if r["test_acc"] is None else f"{r['test_acc']:.4f}"
        print(f"{r['backbone']:20s} {r['method']:6s} lr={r['lr']:<8g} l2={r['l2']:<6g} seed={r['seed']} "
              f"val_xent={r['val_xent']:.4f} val_err={r['val_err']:.4f} test_acc={acc}")
    print(f"outputs: {out / 'summary.json'}, {out / 'summary.csv'}, {out / 'report.html'}, {out / 'ledger.sqlite'}")
    return 0


def cmd_report(args) -> int:
    from .reporting.report import build_report

    rows = build_report(args.dir)
    print(f"{len(rows)} summary rows; report: {Path(args.dir) / 'report.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Transfer-learning experiments on small image sets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list the known backbones")
    p.add_argument("--json", action="store_true")
    from .backbones import DEFAULT_MODEL_DIR

    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("probe", help="train one linear probe (or fine-tune the last k layers)")
    _add_data_flags(p)
    _add_backbone_flags(p)
    _add_train_flags(p)
    _add_engine_flags(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_probe)

    from .sweep_cli import add_sweep_flags

    p = sub.add_parser("sweep", help="grid search (and LP-then-FT) over backbones, resumable")
    add_sweep_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="rebuild summary, figures and report.html from a sweep's ledger")
    p.add_argument("dir", help="the sweep's output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="offline demo: digits images + efficientnet_lite0 linear probe")
    p.add_argument("--out", default=DEFAULT_DEMO_OUT)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    from .use_cli import add_use_parsers

    add_use_parsers(sub)  # export, predict
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    argv_seen = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="transferlab: %(message)s")
    func = args.func
    del args.func
    args.argv = argv_seen
    try:
        return func(args)
    except UserError as e:
        print(f"transferlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferlab: interrupted; finished work is kept (re-run the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback only with --verbose
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            where = f" ({e.filename})" if e.filename else ""
            print(f"transferlab: error: {e.strerror}{where}; finished runs are kept, re-run to resume", file=sys.stderr)
            return 2
        if args.verbose:
            raise
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"transferlab: internal error: {type(e).__name__}: {first} (re-run with --verbose for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
