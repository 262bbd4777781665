"""Command line: ``python -m psi_cuda [demo|train|bench] ...`` (also installed as ``psi-cuda``).

``train`` trains one or more optimizers (sgd, psi-sgd, psi-adam, adamw, bnp-sgd) over one or
more seeds on the built-in digits data or a local CIFAR-10, with a progress bar, one summary line
per epoch, a final comparison table (one row per optimizer and net), one JSON log per run, PNG
plots, and a checkpoint per run after every epoch (``--resume`` continues an interrupted
command). ``demo`` (the default) is a short ``train`` over 3 seeds on digits of every method
beside its fair baseline (:data:`DEMO_RUNS`): PSI-SGD, PSI-Adam, SGD and AdamW on the net with
BatchNorm, BNP-SGD and SGD on the same net without BatchNorm. ``bench`` times one optimizer step
against pure PyTorch and the peers (psi_cuda/apps/bench.py). Ctrl-C stops cleanly: what was
logged so far is still written (and flagged ``interrupted``), and the exit code is 130.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .data import DATASETS, find_cifar10, load_dataset
from .train import (DEFAULT_BATCH_SIZE, DEFAULT_LR_ON_NET, DEFAULT_MOMENTUM, DEFAULTS,
                    NET_DESCRIPTIONS, NET_LABELS, NORMS, OPTIMIZERS, RESUMABLE_CHANGES,
                    SCHEDULES, TrainSettings, mean_std, mean_std_reached, resolve_settings, run,
                    run_name, time_to_target)

COMMANDS = ("demo", "train")
DEMO_EPOCHS = 6
DEMO_SEEDS = 3
# The demo's rows, (optimizer, net): each method next to its baseline on the same net.
DEMO_RUNS = (("sgd", "bn"), ("psi-sgd", "bn"), ("adamw", "bn"), ("psi-adam", "bn"),
             ("sgd", "none"), ("bnp-sgd", "none"))
DEFAULT_TARGET_LOSS = 0.1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {value}")
    return value


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    # One thread: the digits model is so small (8x8 images, 16-32 channels) that splitting its
    # ops over threads costs more than it gains (2 threads measured 2-10x slower on 2 cores).
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch.set_num_threads during training (default: 1)")
    p.add_argument("--out", default=out,
                   help=f"folder for the JSON logs, plots and checkpoints (default: {out})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal and tqdm is "
                   "installed)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs' logs in --out and continue unfinished runs from "
                   "their checkpoints (same settings)")
    p.add_argument("--target-loss", type=_positive_float, default=DEFAULT_TARGET_LOSS,
                   help="the table's time to reach this training loss (trailing mean over one "
                   f"epoch of steps; default {DEFAULT_TARGET_LOSS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psi-cuda", description="Train PSI-SGD, PSI-Adam and BNP against SGD and AdamW "
        "on the built-in digits data (or a local CIFAR-10). Without a command: demo.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,bench}")

    rows = ", ".join(f"{o} ({NET_LABELS[n]})" for o, n in DEMO_RUNS)
    demo = sub.add_parser("demo", help="every method beside its baseline, 3 seeds, 6 epochs "
                          "(the default)",
                          description="Trains every method with its default settings next to "
                          "its fair baseline on the same net, on the digits data over 3 seeds: "
                          f"{rows}. Prints a comparison table and writes the logs and plots.")
    _common(demo, "runs/demo")
    # Shorter or longer demos (the tests use tiny ones).
    demo.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=argparse.SUPPRESS)
    demo.add_argument("--seeds", type=_positive_int, default=DEMO_SEEDS, help=argparse.SUPPRESS)
    demo.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                      help=argparse.SUPPRESS)

    lrs = "; ".join(f"{k} {v['lr']:g}" for k, v in DEFAULTS.items())
    lrs += "".join(f"; {o} on --norm {n}: {lr:g}" for (o, n), lr in DEFAULT_LR_ON_NET.items())
    train = sub.add_parser("train", help="train one or more optimizers over one or more seeds",
                           description="Trains each optimizer for each seed and writes one JSON "
                           "log per run, a summary with the comparison table (one row per "
                           "optimizer and net), and plots.")
    train.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=["psi-sgd"],
                       metavar="NAME", help=f"one or more of {', '.join(OPTIMIZERS)} "
                       "(default: psi-sgd)")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help=f"learning rate of the Euclidean parameters (default: {lrs})")
    train.add_argument("--psi-lr", type=_positive_float, default=None,
                       help="learning rate of the PSI (conv weight) groups, psi-sgd and "
                       f"psi-adam (default: {DEFAULTS['psi-sgd']['psi_lr']:g} and "
                       f"{DEFAULTS['psi-adam']['psi_lr']:g})")
    train.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM,
                       help="SGD momentum, beta1 for psi-adam/adamw (default: 0.9)")
    train.add_argument("--weight-decay", type=float, default=None,
                       help="L2 for the SGD family, decoupled for psi-adam/adamw; never on PSI "
                       "groups (default: 5e-4 for the SGD family, 1e-2 for the Adam pair)")
    train.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    train.add_argument("--seeds", type=_positive_int, default=1,
                       help="number of seeds: --seed, --seed+1, ... (default: 1)")
    train.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                       help="lr schedule over the whole run (default: cosine)")
    train.add_argument("--norm", choices=NORMS, default=None,
                       help="the net of every optimizer: bn, the ResNet with BatchNorm; none, "
                       "its BN-free twin (default: bn, none for bnp-sgd). BNP's fair "
                       "comparison: --optimizer bnp-sgd sgd --norm none")
    train.add_argument("--width", type=_positive_int, default=16,
                       help="channels of the first block (default: 16)")
    train.add_argument("--data", choices=DATASETS, default="digits",
                       help="digits (built in) or cifar10 (needs --data-dir; never downloads)")
    train.add_argument("--data-dir", default=None,
                       help="folder with CIFAR-10's python version (cifar-10-batches-py)")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="random crop + flip (default: on for cifar10, off for digits)")
    train.add_argument("--rescale", type=float, default=None, metavar="S",
                       help="equivalent start: multiply each conv output channel by a factor "
                       "log-uniform in [1/S, S] after initialization")
    _common(train, "runs/train")
    # Listed for --help only: main() hands "bench ..." to psi_cuda/apps/bench.py's own parser.
    sub.add_parser("bench", help="time one optimizer step vs torch and the peers "
                   "(psi-cuda bench --help)", add_help=False)
    return parser


# --- logs -----------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so the JSON is standard (a diverged
    run has NaN losses)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _settings_of(record: dict[str, Any]) -> TrainSettings:
    return TrainSettings.from_dict(record["settings"])


def _write(record: dict[str, Any], folder: Path) -> Path:
    """Writes ``record`` to ``folder/<run name>.json`` (atomically); returns the path."""
    return _write_json(folder / f"{run_name(_settings_of(record))}.json", record)


def _load_finished(path: Path, settings: TrainSettings) -> dict[str, Any] | None:
    """The finished record at ``path`` when it was made with ``settings``, else None."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    saved = record.get("settings", {})
    same = all(saved.get(k) == v for k, v in settings.to_dict().items()
               if k not in RESUMABLE_CHANGES)
    done = (not record.get("interrupted")
            and record.get("final", {}).get("epochs_done") == settings.epochs)
    return record if same and done else None


# --- output ---------------------------------------------------------------------------------


def _epoch_printer(settings: TrainSettings):
    label = f"{run_name(settings):>16}"

    def show(entry: dict[str, Any]) -> None:
        print(f"{label}  epoch {entry['epoch']:>2}/{settings.epochs}  loss "
              f"{entry['train_loss']:.4f}  test acc {100 * entry['test_acc']:6.2f}%  "
              f"{entry['samples_per_s']:8.0f} samples/s  ({entry['wall_s']:.2f} s)", flush=True)
    return show


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _reached(records: list[dict[str, Any]], target: float, key: str, fmt: str) -> str:
    """Mean +- std of the time to ``target`` over the runs that got there, and how many did."""
    return mean_std_reached([time_to_target(r, target)[key] for r in records], fmt)


def _table(records: list[dict[str, Any]], target: float = DEFAULT_TARGET_LOSS) -> str:
    """One row per setting (optimizer and net): mean +- std over seeds of the final numbers,
    and the steps and training seconds to a trailing-mean training loss of ``target`` (over the
    seeds that reached it; how many did, in brackets, when not all)."""
    header = ("run", "net", "batch", "lr", "psi_lr", "seeds", "epochs", "train loss",
              "test acc %", "best test acc %", f"steps to loss {target:g}",
              f"seconds to loss {target:g}", "samples/s")
    settings = [_settings_of(r) for r in records]
    rows = []
    for key in dict.fromkeys((s.optimizer, s.net) for s in settings):
        rs = [r for r, s in zip(records, settings) if (s.optimizer, s.net) == key]
        s, finals = _settings_of(rs[0]), [r["final"] for r in rs]
        rows.append((s.optimizer, NET_LABELS[s.net], str(s.batch_size), f"{s.lr:g}",
                     "-" if s.psi_lr is None else f"{s.psi_lr:g}",
                     str(len(rs)), "/".join(sorted({str(f["epochs_done"]) for f in finals})),
                     mean_std([f["train_loss"] for f in finals]),
                     mean_std([_percent(f["test_acc"]) for f in finals], ".2f"),
                     mean_std([_percent(f["best_test_acc"]) for f in finals], ".2f"),
                     _reached(rs, target, "step", ".0f"), _reached(rs, target, "seconds", ".2f"),
                     mean_std([f["samples_per_s"] for f in finals], ".0f")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _nets(records: list[dict[str, Any]]) -> str:
    """What the table's net column means, for the nets in ``records``."""
    settings = [_settings_of(r) for r in records]
    nets = dict.fromkeys(s.net for s in settings)
    lines = [f"{NET_LABELS[n]:>5} = {NET_DESCRIPTIONS[n]}" for n in nets]
    return f"net (width {settings[0].width}):\n" + "\n".join(lines)


def _progress_enabled(args: argparse.Namespace) -> bool:
    have_tqdm = importlib.util.find_spec("tqdm") is not None
    if args.progress is None:
        return sys.stderr.isatty() and have_tqdm
    if args.progress and not have_tqdm:
        build_parser().error("--progress needs tqdm (pip install 'psi_cuda[apps]')")
    return args.progress


# --- commands -------------------------------------------------------------------------------


def _compare(args: argparse.Namespace, runs: list[TrainSettings], title: str) -> int:
    """Trains every run (resolved settings), writing logs, checkpoints, the summary and the
    plots into ``args.out``; prints the table. Returns the exit code."""
    started = time.perf_counter()
    out = Path(args.out)
    progress = _progress_enabled(args)
    records: list[dict[str, Any]] = []
    paths: list[Path] = []
    interrupted = False
    try:
        first = runs[0]  # every run of a command has the same data
        data = load_dataset(first.dataset, first.data_dir, split_seed=first.split_seed)
        labels = ", ".join(dict.fromkeys(f"{s.optimizer} ({NET_LABELS[s.net]})" for s in runs))
        seeds = sorted({s.seed for s in runs})
        print(f"{first.dataset}: {data[1].numel()} train / {data[3].numel()} test images; "
              f"{labels} x {len(seeds)} seed(s); device {args.device}, "
              f"{args.threads} thread(s); logs in {out}", flush=True)
        for settings in runs:
            name = run_name(settings)
            path = out / f"{name}.json"
            if args.resume:
                record = _load_finished(path, settings)
                if record is not None:
                    print(f"{name:>16}  finished before: {path}", flush=True)
                    records.append(record)
                    paths.append(path)
                    continue
            record = run(settings, data=data, checkpoint=out / "checkpoints" / f"{name}.pt",
                         resume=args.resume, progress=progress,
                         on_epoch=_epoch_printer(settings))
            if record["resumed_from_epoch"]:
                print(f"{name:>16}  resumed after epoch {record['resumed_from_epoch']}",
                      flush=True)
            records.append(record)
            paths.append(_write(record, out))
            if record["interrupted"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # in a run (it returned what it had) or between runs
        interrupted = True
    plot = None
    if records:
        table, nets = _table(records, args.target_loss), _nets(records)
        try:
            from .plots import plot_records

            plot = plot_records(records, out / "plots.png", title)
        except ImportError:  # matplotlib: the apps extra, set up by setup.sh
            print("matplotlib not installed: no plots", flush=True)
        _write_json(out / "summary.json", dict(
            title=title, runs=[str(p) for p in paths], table=table, nets=nets,
            target_loss=args.target_loss, plots=str(plot) if plot else None,
            interrupted=interrupted))
        print()
        print(table)
        print(nets)
    print(f"\n{'Interrupted; wrote' if interrupted else 'Wrote'} {len(paths)} JSON log(s) "
          f"to {out}/ in {time.perf_counter() - started:.1f} s", flush=True)
    if plot is not None:
        print(f"Plots: {plot}", flush=True)
    if records:
        print(f"Summary: {out / 'summary.json'}; checkpoints: {out / 'checkpoints'}/",
              flush=True)
    return 130 if interrupted else 0


def _settings(**values: Any) -> TrainSettings:
    """The resolved settings of one run (the defaults filled in once, here, before any
    training); a bad value or combination (e.g. psi-sgd with --norm none) is a usage error."""
    try:
        return resolve_settings(TrainSettings(**values))
    except ValueError as e:
        build_parser().error(str(e))


def demo(args: argparse.Namespace) -> int:
    rows = [(o, n) for o, n in DEMO_RUNS if o in args.optimizer]
    runs = [_settings(optimizer=o, norm=n, epochs=args.epochs, seed=seed, device=args.device,
                      threads=args.threads) for seed in range(args.seeds) for o, n in rows]
    return _compare(args, runs, f"psi-cuda demo: digits, {args.epochs} epochs, "
                    f"{args.seeds} seed(s), default settings")


def train(args: argparse.Namespace) -> int:
    if args.data == "cifar10":
        if args.data_dir is None:
            build_parser().error("--data cifar10 needs --data-dir (psi_cuda never downloads)")
        try:
            find_cifar10(args.data_dir)
        except FileNotFoundError as e:
            build_parser().error(f"--data-dir: {e}")
    runs = [_settings(optimizer=name, norm=args.norm, lr=args.lr, psi_lr=args.psi_lr,
                      momentum=args.momentum, weight_decay=args.weight_decay,
                      schedule=args.schedule, batch_size=args.batch_size, epochs=args.epochs,
                      seed=seed, width=args.width, dataset=args.data, data_dir=args.data_dir,
                      augment=args.augment, rescale=args.rescale, device=args.device,
                      threads=args.threads)
            for seed in range(args.seed, args.seed + args.seeds) for name in args.optimizer]
    return _compare(args, runs, f"psi-cuda train: {args.data}, {args.epochs} epochs, "
                    f"batch {args.batch_size}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m psi_cuda`` and the ``psi-cuda`` script; returns the exit code
    (0, 130 after Ctrl-C, 2 for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own parser: psi_cuda/apps/bench.py
        from .bench import main as bench_main

        bench_main(argv[1:])
        return 0
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "demo")
    args = build_parser().parse_args(argv)
    return demo(args) if args.command == "demo" else train(args)
