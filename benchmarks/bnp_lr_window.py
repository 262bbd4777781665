"""BNP-SGD's usable learning rates, with and without the step cap (``BNPSGD(max_update=...)``).

    python benchmarks/bnp_lr_window.py            # 2 variants x 11 lrs x 5 seeds (~8 min, 1 core)
    python benchmarks/bnp_lr_window.py --quick    # 3 lrs x 2 seeds (smoke run)
    python benchmarks/bnp_lr_window.py --batch-size 4 --epochs 2 --seeds 2 \
        --lrs 1e-4 3e-4 1e-3 3e-3 1e-2 --out benchmarks/results/bnp_lr_window_b4.json

Every run is ``psi_cuda.apps.train.run(TrainSettings("bnp-sgd", ...))``, the function behind
``psi-cuda train --optimizer bnp-sgd``: the BatchNorm-free SmallResNet on the built-in digits
data, batch 64, momentum 0.9, weight decay 5e-4, cosine schedule, 6 epochs, one thread. Two
variants of the optimizer:

* ``exact``: ``max_update=None``, the BNP step of docs/ALGORITHMS.md section 4 as it was before the
  cap (bit for bit the old optimizer);
* ``capped``: the defaults (``max_update`` = ``DEFAULT_MAX_UPDATE``, ``update_floor`` =
  ``DEFAULT_UPDATE_FLOOR``).

For each variant and learning rate (a x3 grid from 1e-4 to 10), seeds 0..n-1: the final test
accuracy, the final training loss (mean over the last epoch), the step at which the trailing
one-epoch mean of the training loss first reaches 0.1, and whether the run diverged (a
non-finite step loss, or a final training loss above ln 10, the loss of chance). A learning rate
is *usable* when the mean test accuracy over the seeds is at least 95% and no seed diverged; the
window is the usable learning rates. Also the table at each variant's default learning rate
(``exact``: 1e-3, the old default; ``capped``: ``train.DEFAULTS["bnp-sgd"]["lr"]``).
-> benchmarks/results/bnp_lr_window.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from psi_cuda.apps import train
from psi_cuda.apps.data import load_dataset
from psi_cuda.optim import BNPSGD, bnp_sgd

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
OLD_DEFAULT_LR = 1e-3
TARGET = 0.1
MIN_ACC = 0.95


@contextlib.contextmanager
def variant(name: str):
    """``train.run`` builds ``BNPSGD(model, lr=..., momentum=..., weight_decay=...)``; for
    ``exact`` it gets ``max_update=None``."""
    old = train.BNPSGD
    if name == "exact":
        train.BNPSGD = partial(BNPSGD, max_update=None)
    try:
        yield
    finally:
        train.BNPSGD = old


def one_run(name: str, lr: float, seed: int, epochs: int, data, batch_size: int) -> dict:
    with variant(name):
        t0 = time.perf_counter()
        rec = train.run(train.TrainSettings("bnp-sgd", lr=lr, seed=seed, epochs=epochs,
                                            threads=1, batch_size=batch_size), data=data)
    losses = rec["step_loss"]
    final = rec["final"]
    diverged = (not all(math.isfinite(v) for v in losses)
                or not final["train_loss"] <= math.log(10))
    return dict(variant=name, lr=lr, seed=seed, test_acc=final["test_acc"],
                train_loss=final["train_loss"], diverged=diverged,
                steps_to_target=train.time_to_target(rec, TARGET)["step"],
                max_step_loss=max(losses) if losses else None, seconds=time.perf_counter() - t0)


def summarize(runs: list[dict]) -> dict:
    accs = [r["test_acc"] for r in runs]
    hits = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    return dict(
        seeds=len(runs), test_acc_mean=statistics.mean(accs),
        test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, test_acc_min=min(accs),
        train_loss_median=statistics.median(r["train_loss"] for r in runs),
        reached_target=len(hits),
        steps_to_target_mean=statistics.mean(hits) if hits else None,
        steps_to_target_std=statistics.stdev(hits) if len(hits) > 1 else None,
        diverged=sum(r["diverged"] for r in runs),
        usable=statistics.mean(accs) >= MIN_ACC and not any(r["diverged"] for r in runs))


def fmt_row(name: str, lr: float, s: dict) -> str:
    steps = ("-" if s["steps_to_target_mean"] is None else
             f"{s['steps_to_target_mean']:.0f}" + (f" +- {s['steps_to_target_std']:.0f}"
                                                   if s["steps_to_target_std"] else ""))
    return (f"{name:7s} {lr:<7g} {100 * s['test_acc_mean']:6.2f} +- {100 * s['test_acc_std']:5.2f}"
            f"  min {100 * s['test_acc_min']:6.2f}  loss(med) {s['train_loss_median']:<9.3g}"
            f" to {TARGET}: {s['reached_target']}/{s['seeds']} {steps:10s} diverged "
            f"{s['diverged']}/{s['seeds']}  {'usable' if s['usable'] else ''}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=train.DEFAULT_BATCH_SIZE)
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--quick", action="store_true", help="3 lrs, 2 seeds, 2 epochs")
    p.add_argument("--out", type=Path, default=RESULTS / "bnp_lr_window.json")
    args = p.parse_args(argv)
    lrs, seeds, epochs = tuple(args.lrs), args.seeds, args.epochs
    if args.quick:
        lrs, seeds, epochs = (1e-3, 3e-2, 1.0), 2, 2
    torch.set_num_threads(1)
    data = load_dataset("digits", None, split_seed=train.SPLIT_SEED)
    new_default = train.DEFAULTS["bnp-sgd"]["lr"]
    defaults = {"exact": OLD_DEFAULT_LR, "capped": new_default}
    runs, window, at_default = [], {}, {}
    for name in ("exact", "capped"):
        grid = sorted(set(lrs) | ({defaults[name]} if args.batch_size == train.DEFAULT_BATCH_SIZE
                                  else set()))
        window[name] = []
        for lr in grid:
            batch = [one_run(name, lr, s, epochs, data, args.batch_size) for s in range(seeds)]
            runs += batch
            s = summarize(batch)
            window[name].append(dict(lr=lr, **s))
            if lr == defaults[name]:
                at_default[name] = dict(lr=lr, **s)
            print(fmt_row(name, lr, s), flush=True)
    usable = {name: [w["lr"] for w in rows if w["usable"]] for name, rows in window.items()}
    for name, u in usable.items():
        print(f"{name}: usable lrs {u}")
    payload = dict(
        command="python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        description=__doc__,
        settings=dict(epochs=epochs, seeds=list(range(seeds)), lrs=list(lrs),
                      batch_size=args.batch_size, momentum=train.DEFAULT_MOMENTUM,
                      weight_decay=train.DEFAULTS["bnp-sgd"]["weight_decay"],
                      schedule="cosine", target_loss=TARGET, usable_min_test_acc=MIN_ACC,
                      max_update=bnp_sgd.DEFAULT_MAX_UPDATE,
                      update_floor=bnp_sgd.DEFAULT_UPDATE_FLOOR, default_lr=defaults),
        environment=dict(torch=torch.__version__, python=platform.python_version(),
                         machine=platform.machine()),
        at_default_lr=at_default, window=window, usable_lrs=usable, runs=runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
