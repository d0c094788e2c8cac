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

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.files import folder_lock_is_held

DEFAULT_DEMO_OUT = "transferlab-demo"


def _probe_flag_groups():
    from transferlab.cli.flags import config_flags
    from transferlab.data import DataConfig
    from transferlab.train.config import TrainConfig
    from transferlab.train.probe_run import EngineConfig, ProbeConfig

    return [("data", config_flags(DataConfig)), ("backbone", config_flags(ProbeConfig)),
            # A probe run has no start state to interpolate with (WiSE-FT is the sweep's --ft-wise).
            ("training", config_flags(TrainConfig, exclude=("wise_alphas",))), ("engine", config_flags(EngineConfig))]


def _all_flags():
    from transferlab.cli.sweep import SWEEP_FLAGS

    return [fl for _, group in _probe_flag_groups() for fl in group] + SWEEP_FLAGS


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
    for warning in record.get("warnings", []):
        print(f"warning: {warning}")
    from transferlab.train.probe_run import feature_cache_in, run_outputs_in

    outputs = [f"{path}/" if path.is_dir() else str(path) for path in run_outputs_in(out)]
    cache = feature_cache_in(out, record["config"]["engine"]["cache_dir"])
    if cache is not None:
        outputs.append(f"{cache}/ (feature cache)")
    print("outputs: " + ", ".join(outputs))


def cmd_backbones(args) -> int:
    from transferlab.models import list_backbones, list_zoo

    rows = list_zoo(args.zoo, args.filter, args.model_dir) if args.zoo else list_backbones(args.model_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.zoo:
        width = max([20] + [len(r["name"]) for r in rows])
        print(f"{'name':{width}s} {'source':12s} {'top1':>6s}  weights")
        for r in rows:
            top1 = f"{r['source_top1']:.2f}" if r["source_top1"] is not None else "-"
            print(f"{r['name']:{width}s} {r['source']:12s} {top1:>6s}  {r['weights']}")
        return 0
    print(f"{'name':20s} {'zoo':9s} {'source':10s} {'top1':>6s} {'params':>10s} {'input':>5s}  weights")
    for r in rows:
        top1 = f"{r['source_top1']:.2f}" if r["source_top1"] is not None else "-"
        print(f"{r['name']:20s} {r['zoo']:9s} {r['source']:10s} {top1:>6s} {r['params']:>10,d} {r['input_size']:>5d}  {r['weights']}")
    return 0


def cmd_probe(args) -> int:
    from transferlab.api import run_probe
    from transferlab.cli.flags import field_values
    from transferlab.cli.sweep import reproduce_command
    from transferlab.core.fields import build_config
    from transferlab.train.probe_run import ProbeConfig

    flags = [fl for _, group in _probe_flag_groups() for fl in group]
    cfg = build_config(ProbeConfig, field_values(flags, vars(args)))
    out = Path(args.out)
    with _tracking(args, out, "probe") as observers:
        record = run_probe(cfg, out, command=reproduce_command(args.argv), observers=observers)
    _print_result(record, out)
    return 0


def cmd_demo(args) -> int:
    from transferlab.api import run_probe
    from transferlab.cli.sweep import reproduce_command
    from transferlab.data import DataConfig
    from transferlab.data.demo import write_digits_folder
    from transferlab.train.config import TrainConfig
    from transferlab.train.probe_run import EngineConfig, ProbeConfig

    out = Path(args.out)
    data = write_digits_folder(out / "digits")
    print(f"demo data: scikit-learn digits as images in {data} (30 train / 10 val / 20 test per class)")
    cfg = ProbeConfig(
        data=DataConfig(str(data)),
        backbone="efficientnet_lite0",
        train=TrainConfig(lr=1e-2, l2=1.0, seed=0, epochs=100, patience=15),
        engine=EngineConfig(device=args.device, progress=not args.no_progress),
    )
    record = run_probe(cfg, out / "probe", command=reproduce_command(args.argv))
    _print_result(record, out / "probe")
    return 0


def cmd_sweep(args) -> int:
    from transferlab.cli.sweep import build_configs, n_test_images, reproduce_command, resolve, summary_lines
    from transferlab.reporting.report import build_report
    from transferlab.sweep.coordinator import sweep

    values = resolve(args)
    cfg, executor = build_configs(values)
    out = Path(values["out"])
    with _tracking(values, out, "sweep") as observers:  # the tracker attaches the report once it is built
        sweep(cfg, out, force=args.force, command=reproduce_command(args.argv), executor=executor, observers=observers)
        rows = build_report(out)
    for line in summary_lines(rows, n_test_images(out)):
        print(line)
    print(f"outputs: {out / 'summary.json'}, {out / 'summary.csv'}, {out / 'report.html'}, {out / 'ledger.sqlite'}")
    return 0


def _track_config(values):
    """The TrackConfig of the given flag values (an argparse namespace, or a sweep's flags and YAML keys)."""
    from transferlab.cli.flags import config_flags, field_values
    from transferlab.core.fields import build_config
    from transferlab.track import TrackConfig

    given = values if isinstance(values, dict) else vars(values)
    return build_config(TrackConfig, field_values(config_flags(TrackConfig), given))


def _tracking(values, out: Path, kind):
    """The run observers of --track (none without it), as a context that ends the tracking (track.tracking)."""
    from transferlab.track import tracking

    return tracking(_track_config(values), out, kind)


def cmd_track(args) -> int:
    from transferlab.track.push import push_folder

    cfg = _track_config(args)
    n = push_folder(Path(args.dir), cfg.track_uri, cfg.track_experiment)
    print(f"{args.dir}: {n} run(s) pushed to MLflow, the rest was there already")
    return 0


def cmd_report(args) -> int:
    from transferlab.reporting.probe_report import build_probe_report, is_probe_folder
    from transferlab.reporting.report import build_report

    folder = Path(args.dir)
    if not (folder / "ledger.sqlite").is_file():
        if not is_probe_folder(folder):
            raise UserError(f"{folder}: neither a sweep's ledger.sqlite nor a probe's run.json here")
        print(f"report: {build_probe_report(folder)}")
        return 0
    rows = build_report(folder)
    print(f"{len(rows)} summary rows; report: {folder / 'report.html'}")
    return 0


def _holds_results(folder: Path) -> bool:
    """Whether an output folder that a failed command created holds anything worth keeping: any file
    but a sweep's bookkeeping (its folder lock, and a ledger that records no run), and a folder whose
    lock another process holds (a sweep that started there meanwhile) is always kept."""
    for path in folder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        if path.name == ".lock":
            if folder_lock_is_held(path):
                return True
            continue
        if path.name == "ledger.sqlite" and _ledger_is_empty(path):
            continue
        return True
    return False


def _ledger_is_empty(path: Path) -> bool:
    import sqlite3

    from transferlab.sweep.ledger import Ledger

    try:
        ledger = Ledger(path, readonly=True)
    except sqlite3.Error:
        return False
    try:
        return not ledger.runs()
    except sqlite3.Error:
        return False
    finally:
        ledger.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Transfer-learning experiments on small image sets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list the known backbones")
    p.add_argument("--json", action="store_true")
    from transferlab.models import DEFAULT_MODEL_DIR, prefixed_zoos

    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    p.add_argument("--zoo", choices=prefixed_zoos(), help="list a library's models (name prefix zoo:) instead of the catalogue")
    p.add_argument("--filter", default="*", help="with --zoo: shell pattern on model names, e.g. 'convnext*'")
    p.set_defaults(func=cmd_backbones)

    from transferlab.cli.flags import add_flags, config_flags

    p = sub.add_parser("probe", help="train one linear probe (or fine-tune the last k layers)")
    p.add_argument("--out", required=True, help="output folder")
    for title, flags in _probe_flag_groups():
        add_flags(p.add_argument_group(title), flags, required=("data",))
    from transferlab.track import TrackConfig

    add_flags(p.add_argument_group("tracking"), config_flags(TrackConfig))
    p.set_defaults(func=cmd_probe)

    from transferlab.cli.sweep import add_sweep_flags

    p = sub.add_parser("sweep", help="grid search (and LP-then-FT) over backbones, resumable")
    add_sweep_flags(p)  # the tracking flags among them (a sweep's YAML may give them too)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="rebuild report.html: a sweep's summary, figures and report from its ledger, "
                       "or a probe's curves, insight and report from its run.json and test_predictions.json")
    p.add_argument("dir", help="the sweep's or the probe's output folder")
    # report draws no progress bar; the flag is accepted so the same flags work on every command
    p.add_argument("--no-progress", action="store_true", help="accepted for consistency with the other commands (no effect)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="offline demo: digits images + efficientnet_lite0 linear probe")
    p.add_argument("--out", default=DEFAULT_DEMO_OUT)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    from transferlab.cli.use import add_use_parsers

    add_use_parsers(sub)  # export, predict
    p = sub.add_parser("track", help="push what an experiment tracker (MLflow) lacks of a sweep's or a probe's folder")
    p.add_argument("dir", help="the sweep's or the probe's output folder")
    add_flags(p, [fl for fl in config_flags(TrackConfig) if fl.field != "track"])
    p.set_defaults(func=cmd_track)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    argv_seen = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="transferlab: %(message)s")
    # What a sweep says it does (its plan, the time left: search.progress_log) shows without --verbose.
    logging.getLogger("transferlab.progress").setLevel(logging.INFO)
    func = args.func
    del args.func
    args.argv = argv_seen
    from transferlab.core.files import created_dirs_removed_on_failure

    try:
        with created_dirs_removed_on_failure(_holds_results):  # a failed command leaves no empty --out behind
            return func(args)
    except ConfigError as e:
        from transferlab.cli.flags import flag_text

        print(f"transferlab: error: {flag_text(e, _all_flags())}", file=sys.stderr)
        return 2
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
