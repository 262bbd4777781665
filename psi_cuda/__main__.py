"""Command line: ``python -m psi_cuda [demo|train|bench] ...`` (also installed as ``psi-cuda``).

``demo`` (the default) trains the same small ResNet on the built-in digits data with plain SGD
and with PSI-SGD for a few epochs and seeds, prints one line per epoch and a comparison table,
and writes one JSON record per run. ``train`` runs one optimizer with every option. ``bench``
times one optimizer step against pure PyTorch and the peers (psi_cuda/bench.py).
Ctrl-C stops cleanly: what was logged so far is still written (and flagged ``interrupted``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

COMMANDS = ("demo", "train")
DEMO_EPOCHS = 6
DEMO_SEEDS = 3


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    # One thread: this model is so small (8x8 images, 16-32 channels) that splitting its ops
    # over threads costs more than it gains (2 threads measured 2-10x slower on a 2-core box).
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch.set_num_threads during training (default: 1)")
    p.add_argument("--out", default=out, help=f"folder for the JSON logs (default: {out})")


def build_parser() -> argparse.ArgumentParser:
    from .train import (DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_MOMENTUM, DEFAULT_PSI_LR,
                        OPTIMIZERS, SCHEDULES)

    parser = argparse.ArgumentParser(
        prog="psi-cuda", description="PSI-SGD vs SGD on the built-in 8x8 digits data. "
        "Without a command: demo.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,bench}")

    demo = sub.add_parser("demo", help="SGD vs PSI-SGD, a few epochs and seeds (the default)",
                          description="Trains SGD and PSI-SGD with their default settings and "
                          "prints a comparison.")
    _common(demo, "runs/demo")
    # Shorter or longer demos (the tests use tiny ones).
    demo.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=argparse.SUPPRESS)
    demo.add_argument("--seeds", type=_positive_int, default=DEMO_SEEDS, help=argparse.SUPPRESS)

    train = sub.add_parser("train", help="train with one optimizer",
                           description="Trains one optimizer and writes its JSON record.")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="psi-sgd")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate of the Euclidean parameters (default: "
                       + ", ".join(f"{k} {v}" for k, v in DEFAULT_LR.items()) + ")")
    train.add_argument("--psi-lr", type=float, default=None,
                       help="learning rate of the PSI (conv weight) groups, psi-sgd only "
                       f"(default: {DEFAULT_PSI_LR})")
    train.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM)
    train.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    train.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                       help="lr schedule over the whole run (default: cosine)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    _common(train, "runs/train")
    # Listed for --help only: main() hands "bench ..." to psi_cuda/bench.py's own parser.
    sub.add_parser("bench", help="time one optimizer step vs torch and the peers "
                   "(psi-cuda bench --help)", add_help=False)
    return parser


def _run_name(settings: dict[str, Any]) -> str:
    return f"{settings['optimizer']}-seed{settings['seed']}"


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


def _write(record: dict[str, Any], folder: Path) -> Path:
    """Writes ``record`` to ``folder/<optimizer>-seed<seed>.json`` (atomically); returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_run_name(record['settings'])}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(record), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _epoch_printer(settings: dict[str, Any]):
    label = f"{settings['optimizer']:>7} seed {settings['seed']}"
    total = settings["epochs"]

    def show(entry: dict[str, Any]) -> None:
        print(f"{label}  epoch {entry['epoch']:>2}/{total}  loss {entry['train_loss']:.4f}  "
              f"test acc {100 * entry['test_acc']:6.2f}%  {entry['samples_per_s']:8.0f} samples/s"
              f"  ({entry['wall_s']:.2f} s)", flush=True)
    return show


def _train_one(name: str, args: argparse.Namespace, seed: int, data) -> dict:
    """One demo run with the default learning rates, momentum and batch size."""
    from .train import run

    printer = _epoch_printer(dict(optimizer=name, seed=seed, epochs=args.epochs))
    return run(name, seed=seed, epochs=args.epochs, device=args.device, threads=args.threads,
               data=data, on_epoch=printer)


def _mean_std(values: list[float | None], fmt: str = ".4f") -> str:
    """Mean +- sample std over the seeds (runs without a finished epoch left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} +- {statistics.stdev(values):{fmt}}"


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _table(records: list[dict[str, Any]]) -> str:
    """One row per optimizer: mean +- std over seeds of the final numbers."""
    header = ("optimizer", "lr", "psi_lr", "seeds", "epochs", "train loss", "test acc %",
              "best test acc %", "samples/s")
    rows = []
    for name in dict.fromkeys(r["settings"]["optimizer"] for r in records):
        rs = [r for r in records if r["settings"]["optimizer"] == name]
        s, finals = rs[0]["settings"], [r["final"] for r in rs]
        rows.append((name, f"{s['lr']:g}", "-" if s["psi_lr"] is None else f"{s['psi_lr']:g}",
                     str(len(rs)), "/".join(sorted({str(f["epochs_done"]) for f in finals})),
                     _mean_std([f["train_loss"] for f in finals]),
                     _mean_std([_percent(f["test_acc"]) for f in finals], ".2f"),
                     _mean_std([_percent(f["best_test_acc"]) for f in finals], ".2f"),
                     _mean_std([f["samples_per_s"] for f in finals], ".0f")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _finish(records: list[dict[str, Any]], paths: list[Path], started: float,
            interrupted: bool) -> int:
    if records:
        print()
        print(_table(records))
    where = paths[0] if len(paths) == 1 else paths[0].parent if paths else "(nothing)"
    print(f"\n{'Interrupted; wrote' if interrupted else 'Wrote'} {len(paths)} JSON log(s) to "
          f"{where} in {time.perf_counter() - started:.1f} s", flush=True)
    return 130 if interrupted else 0


def demo(args: argparse.Namespace) -> int:
    from .data import load_digits, train_test_split
    from .train import OPTIMIZERS, SPLIT_SEED

    started = time.perf_counter()
    records, paths, out = [], [], Path(args.out)
    interrupted = False
    try:
        data = train_test_split(*load_digits(), seed=SPLIT_SEED)
        print(f"digits: {data[1].numel()} train / {data[3].numel()} test images, "
              f"{args.epochs} epochs x {args.seeds} seed(s) per optimizer, device {args.device}, "
              f"{args.threads} thread(s)", flush=True)
        for seed in range(args.seeds):
            for name in OPTIMIZERS:
                record = _train_one(name, args, seed, data)
                records.append(record)
                paths.append(_write(record, out))
                if record["interrupted"]:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:  # in a run (it returned what it had) or between runs
        interrupted = True
    if records:
        summary = dict(runs=[str(p) for p in paths], table=_table(records),
                       interrupted=interrupted)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return _finish(records, paths, started, interrupted)


def train(args: argparse.Namespace) -> int:
    from .train import run

    started = time.perf_counter()
    settings = dict(optimizer=args.optimizer, seed=args.seed, epochs=args.epochs)
    try:
        record = run(args.optimizer, lr=args.lr, psi_lr=args.psi_lr, momentum=args.momentum,
                     batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                     device=args.device, threads=args.threads, schedule=args.schedule,
                     on_epoch=_epoch_printer(settings))
    except KeyboardInterrupt:  # before training started (loading data, building the model)
        print("\ninterrupted before the first step; nothing to write", flush=True)
        return 130
    path = _write(record, Path(args.out))
    return _finish([record], [path], started, record["interrupted"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m psi_cuda`` and the ``psi-cuda`` script; returns the exit code
    (0, 130 after Ctrl-C, 2 for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own parser: psi_cuda/bench.py
        from .bench import main as bench_main

        bench_main(argv[1:])
        return 0
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "demo")
    args = build_parser().parse_args(argv)
    if args.epochs < 0:
        build_parser().error("--epochs must be >= 0")
    return demo(args) if args.command == "demo" else train(args)


if __name__ == "__main__":
    sys.exit(main())
