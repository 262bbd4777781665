"""Evidence for Batch Normalization Preconditioning (BNP): training curves and hook overhead.

    python benchmarks/bnp_evidence.py              # full run (a few minutes on a 2-core CPU)
    python benchmarks/bnp_evidence.py --quick      # smoke run (well under a minute)

1. Training comparison on the built-in digits data (8x8 grayscale, 10 classes). One small CNN,
   conv3x3(1->16)-ReLU-conv3x3(16->32)-ReLU-maxpool2-Linear(512->10), in two twins:
     * "sgd":      BN-free (convs with bias), torch.optim.SGD;
     * "sgd+bn":   BatchNorm2d after each conv (convs without bias), torch.optim.SGD;
     * "bnp-sgd":  the BN-free twin, psi_cuda.optim.BNPSGD (every conv and the Linear layer
                   preconditioned, statistics momentum 0.1, eps 1e-5).
   All start from the same weights (the BN twin copies the conv weights and the classifier of
   the BN-free one) and see the examples in the same order. Momentum 0.9 for all (the usual
   choice; the same for every method so that only the preconditioning/normalization differs),
   constant lr, no weight decay. Batch sizes 1, 4 and 128 see the same number of examples
   (--epochs passes over the training split), so the curves share an x axis (examples seen).
   For every method and batch size a short fixed lr grid is tried on the first seed; the lr with
   the lowest final training loss (mean minibatch loss over the last epoch) is kept and rerun on
   the other seeds. Reported per run: the curve (mean minibatch loss per --log-every examples),
   the final training loss, the eval-mode loss on the whole training split, the test accuracy
   (eval mode; BatchNorm then uses its running statistics) and, for the BN twin, the test
   accuracy with batch statistics (the whole test split as one training-mode batch) to show
   how much of a BN gap comes from the running statistics.
   -> bnp_training.json, bnp_training.png

2. Hook overhead: the forward pass in training mode (autograd on, as in a training step) of a
   conv net on CPU, without hooks, with psi_cuda.BNP hooks (fused backend), with BNP hooks
   (reference backend) and with no-op pre-hooks on the same layers (the cost of torch's hook
   machinery alone), all variants on identical copies of the model, timed round-robin (one
   forward of each per round, in a new random order every round) after a warm-up; medians and
   quartiles, and the median over rounds of the paired difference (variant - plain).
   To see where the hook time goes, the same rounds also time the statistics update alone on
   the inputs the layers see (in cache, as in the hook): the raw op
   (torch.ops.psi_cuda.bnp_update_stats_), the Python wrapper (psi_cuda.ops.bnp_update_stats_)
   and BNP's hook functions called directly, summed over the layers. Overhead % =
   (variant - plain) / plain. Target: fused hooks <= 10% of the forward time.
   -> bnp_overhead.json

Deterministic training: torch.manual_seed, seeded shuffling, torch.use_deterministic_algorithms
and a fixed thread count (--threads, default 1: fastest for these tiny models and the fairest on
a shared machine). The load average is recorded: on a busy machine the timings are noisier
(medians of round-robin rounds are used for that reason).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import psi_cuda
from psi_cuda import ops
from psi_cuda.apps.bench import machine
from psi_cuda.apps.data import load_digits, train_test_split
from psi_cuda.apps.train import SPLIT_SEED, deterministic
from psi_cuda.optim import BNPSGD

HERE = Path(__file__).resolve().parent

METHODS = ("sgd", "sgd+bn", "bnp-sgd")
BATCH_SIZES = (1, 4, 128)
MOMENTUM = 0.9
# lr grids per method and batch size: half-decade steps, three per grid (four at batch 128,
# where runs are cheap and the best lr was at an end of three). BNP's gradient is divided by the
# input variance of each layer (small for ReLU features), so its useful lrs are ~30x below SGD's;
# the grids were centred by a preliminary run on seed 0. The chosen lr is flagged when it lies
# at an end of its grid.
LR_GRID = {
    "sgd": {1: (0.001, 0.003, 0.01), 4: (0.003, 0.01, 0.03), 128: (0.03, 0.1, 0.3, 1.0)},
    "sgd+bn": {1: (0.001, 0.003, 0.01), 4: (0.001, 0.003, 0.01), 128: (0.01, 0.03, 0.1, 0.3)},
    "bnp-sgd": {1: (3e-5, 1e-4, 3e-4), 4: (1e-4, 3e-4, 1e-3), 128: (1e-3, 3e-3, 1e-2)},
}
QUICK_LR_GRID = {m: {b: g[:2] for b, g in grids.items()} for m, grids in LR_GRID.items()}


# ------------------------------------------------------------------------------------ models

class DigitsCNN(nn.Module):
    """conv3x3(1->w)-[BN]-ReLU-conv3x3(w->2w)-[BN]-ReLU-maxpool2 (8x8 -> 4x4)-Linear(32w->10).
    With ``bn=True`` a BatchNorm2d follows each conv and the convs have no bias."""

    def __init__(self, width: int = 16, bn: bool = False, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(2 * width) if bn else nn.Identity()
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def twins(width: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """(BN-free model, BN model) with the same conv weights and classifier."""
    torch.manual_seed(seed)
    plain = DigitsCNN(width, bn=False)
    with_bn = DigitsCNN(width, bn=True)
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc"):
            getattr(with_bn, name).weight.copy_(getattr(plain, name).weight)
        with_bn.fc.bias.copy_(plain.fc.bias)
    return plain, with_bn


class BigConvNet(nn.Module):
    """The larger net of the overhead measurement: 4 conv3x3 layers of width w on 3x32x32
    (conv-ReLU-conv-ReLU-pool-conv-ReLU-conv-ReLU-pool), global average pool, Linear(w->10)."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 3, padding=1)] +
                                   [nn.Conv2d(width, width, 3, padding=1) for _ in range(3)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------ training

@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; the model is left in training mode."""
    model.eval()
    loss, correct = 0.0, 0
    for s in range(0, y.numel(), batch_size):
        logits = model(x[s:s + batch_size])
        loss += float(F.cross_entropy(logits, y[s:s + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[s:s + batch_size]).sum())
    model.train()
    return loss / y.numel(), correct / y.numel()


@torch.no_grad()
def batch_stats_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy with BatchNorm in training mode on the whole of ``x`` as one batch (on a copy,
    so the running statistics of ``model`` stay as they are)."""
    m = copy.deepcopy(model).train()
    return float((m(x).argmax(1) == y).float().mean())


def train_one(method: str, batch_size: int, lr: float, seed: int, data, *, epochs: int,
              width: int, log_every: int) -> dict:
    """One training run; returns its record (curve, final numbers, wall time)."""
    train_x, train_y, test_x, test_y = data
    n = train_y.numel()
    plain, with_bn = twins(width, seed)
    if method == "sgd":
        model, opt = plain, torch.optim.SGD(plain.parameters(), lr=lr, momentum=MOMENTUM)
    elif method == "sgd+bn":
        model, opt = with_bn, torch.optim.SGD(with_bn.parameters(), lr=lr, momentum=MOMENTUM)
    elif method == "bnp-sgd":
        model, opt = plain, BNPSGD(plain, lr=lr, momentum=MOMENTUM)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model.train()
    shuffle = torch.Generator().manual_seed(seed)
    curve, window, window_n = [], 0.0, 0
    last_epoch_loss, seen, steps, diverged = math.nan, 0, 0, False
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=shuffle)
        epoch_losses = []
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            b = idx.numel()
            epoch_losses.append(loss.detach() * b)
            window += float(loss.detach()) * b
            window_n += b
            seen += b
            if window_n >= log_every:
                curve.append([seen, window / window_n])
                window, window_n = 0.0, 0
                if not math.isfinite(curve[-1][1]):
                    diverged = True
                    break
        if diverged:
            break
        last_epoch_loss = float(torch.stack(epoch_losses).sum()) / n
    if window_n and not diverged:
        curve.append([seen, window / window_n])
    diverged = diverged or not math.isfinite(last_epoch_loss)
    wall = time.perf_counter() - t0
    rec = dict(method=method, batch_size=batch_size, lr=lr, seed=seed, steps=steps,
               examples_seen=seen, diverged=diverged, wall_s=wall,
               final_train_loss=None if diverged else last_epoch_loss,
               train_loss_eval=None, test_loss=None, test_acc=None, test_acc_batch_stats=None,
               curve=[[e, (l if math.isfinite(l) else None)] for e, l in curve])
    if not diverged:
        rec["train_loss_eval"], _ = evaluate(model, train_x, train_y)
        rec["test_loss"], rec["test_acc"] = evaluate(model, test_x, test_y)
        if method == "sgd+bn":
            rec["test_acc_batch_stats"] = batch_stats_accuracy(model, test_x, test_y)
    return rec


def training_comparison(args, lr_grid, log) -> dict:
    data = train_test_split(*load_digits(), seed=SPLIT_SEED)
    if args.train_subset:
        data = (data[0][:args.train_subset], data[1][:args.train_subset], data[2], data[3])
    n_train = data[1].numel()
    seeds = list(range(args.seeds))
    cfg = dict(methods=list(METHODS), batch_sizes=list(args.batch_sizes), epochs=args.epochs,
               examples_per_run=args.epochs * n_train, n_train=n_train, n_test=data[3].numel(),
               split_seed=SPLIT_SEED, width=args.width, momentum=MOMENTUM, weight_decay=0.0,
               lr_schedule="constant", lr_grid={m: {str(b): list(lr_grid[m][b]) for b in args.batch_sizes}
                                for m in METHODS},
               lr_selection=f"lowest final training loss (mean minibatch loss over the last "
                            f"epoch) on seed {seeds[0]}; diverged runs are never chosen",
               seeds=seeds, log_every_examples=args.log_every, threads=args.threads,
               bnp=dict(momentum=0.1, eps=1e-5, layers="conv1, conv2, fc"),
               model=("conv3x3(1->w)-[BN]-ReLU-conv3x3(w->2w)-[BN]-ReLU-maxpool2-"
                      "Linear(32w->10); BN twin: no conv bias"))
    sweep, runs, chosen = [], [], {}
    kw = dict(epochs=args.epochs, width=args.width, log_every=args.log_every)
    with deterministic(args.threads):
        for bs in args.batch_sizes:
            for method in METHODS:
                best, tried = None, []
                for lr in lr_grid[method][bs]:
                    rec = train_one(method, bs, lr, seeds[0], data, **kw)
                    tried.append(rec)
                    sweep.append({k: v for k, v in rec.items() if k != "curve"})
                    log(f"  sweep  bs={bs:<4d} {method:8s} lr={lr:<6g} "
                        f"final train loss={_fmt(rec['final_train_loss'])}  "
                        f"test acc={_fmt(rec['test_acc'])}  ({rec['wall_s']:.1f} s)")
                    if rec["final_train_loss"] is not None and (
                            best is None or rec["final_train_loss"] < best["final_train_loss"]):
                        best = rec
                if best is None:  # every lr diverged: report the smallest one's run
                    best = tried[0]
                grid = lr_grid[method][bs]
                chosen.setdefault(method, {})[str(bs)] = dict(
                    lr=best["lr"], at_grid_edge=best["lr"] in (grid[0], grid[-1]))
                runs.append(best)
                for seed in seeds[1:]:
                    rec = train_one(method, bs, best["lr"], seed, data, **kw)
                    log(f"  rerun  bs={bs:<4d} {method:8s} lr={best['lr']:<6g} seed={seed} "
                        f"final train loss={_fmt(rec['final_train_loss'])}  "
                        f"test acc={_fmt(rec['test_acc'])}")
                    runs.append(rec)
    summary = []
    for bs in args.batch_sizes:
        for method in METHODS:
            rs = [r for r in runs if r["method"] == method and r["batch_size"] == bs]
            row = dict(method=method, batch_size=bs, lr=rs[0]["lr"],
                       lr_at_grid_edge=chosen[method][str(bs)]["at_grid_edge"], seeds=len(rs),
                       diverged=sum(r["diverged"] for r in rs))
            for key in ("final_train_loss", "train_loss_eval", "test_acc", "test_acc_batch_stats",
                        "wall_s"):
                vals = [r[key] for r in rs if r[key] is not None]
                row[key] = statistics.mean(vals) if vals else None
                row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
            summary.append(row)
    return dict(config=cfg, chosen_lr=chosen, summary=summary, runs=runs, lr_sweep=sweep)


def plot_training(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bss = result["config"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(bss), figsize=(5 * len(bss), 4), squeeze=False)
    colors = {"sgd": "tab:blue", "sgd+bn": "tab:orange", "bnp-sgd": "tab:green"}
    for ax, bs in zip(axes[0], bss):
        for method in METHODS:
            rs = [r for r in result["runs"] if r["method"] == method and r["batch_size"] == bs]
            curves = [[p for p in r["curve"] if p[1] is not None] for r in rs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            k = min(len(c) for c in curves)
            xs = [c[0] for c in curves[0][:k]]
            ys = [[c[i][1] for c in curves] for i in range(k)]
            label = f"{method} (lr {rs[0]['lr']:g})"
            ax.plot(xs, [statistics.mean(y) for y in ys], color=colors[method], label=label)
            if len(curves) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys],
                                color=colors[method], alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        ax.set_title(f"batch size {bs}")
        ax.set_xlabel("training examples seen")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("training loss (mean per interval)")
    n = len(result["config"]["seeds"])
    fig.suptitle(f"Digits CNN: SGD vs SGD+BatchNorm vs BNP-SGD (momentum {MOMENTUM}; "
                 f"{'mean and min-max over ' + str(n) + ' seeds' if n > 1 else '1 seed'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ overhead

def _layer_inputs(model: nn.Module, x: Tensor) -> list[tuple[Tensor, int]]:
    """(input, channel_dim) of every Linear/Conv layer in one training forward of a copy."""
    m = copy.deepcopy(model).train()
    bnp = psi_cuda.BNP(m, backend="reference")
    seen = []
    hooks = [l.module.register_forward_pre_hook(
        lambda mod, a, l=l: seen.append((a[0].detach().clone(), l.channel_dim(a[0]))))
        for l in bnp.layers]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return seen


def overhead_one(name: str, model: nn.Module, x: Tensor, reps: int, warmup: int) -> dict:
    """Round-robin timing of the forward variants and of the statistics update alone."""
    model.train()
    variants = {}
    variants["plain"] = copy.deepcopy(model)
    variants["no-op pre-hooks"] = copy.deepcopy(model)
    for m in variants["no-op pre-hooks"].modules():
        if isinstance(m, psi_cuda.bnp.LAYER_TYPES):
            m.register_forward_pre_hook(lambda mod, a: None)
    keep = []
    for v, backend in (("BNP hooks (fused)", "fused"), ("BNP hooks (reference)", "reference")):
        variants[v] = copy.deepcopy(model)
        keep.append(psi_cuda.BNP(variants[v], backend=backend))
    n_layers = len(keep[0].layers)
    # The fused hooks once more, each wrapped in a timer: how long BNP's hook bodies take inside
    # the forward (where the layer input comes straight from the previous layer).
    timed_name = "BNP hooks (fused), bodies timed inside"
    variants[timed_name] = copy.deepcopy(model)
    timed_bnp = psi_cuda.BNP(variants[timed_name], backend="fused")
    timed_bnp.remove()
    in_situ = [0.0] * n_layers

    def timed_hook(i, layer):
        body = timed_bnp._hook(layer)

        def hook(mod, a):
            t0 = time.perf_counter()
            body(mod, a)
            in_situ[i] += time.perf_counter() - t0
        return hook

    for i, layer in enumerate(timed_bnp.layers):
        layer.module.register_forward_pre_hook(timed_hook(i, layer))

    inputs = _layer_inputs(model, x)
    stats = [(torch.zeros(t.size(cd), dtype=torch.float32), torch.ones(t.size(cd)),
              torch.zeros((), dtype=torch.float32)) for t, cd in inputs]

    def forward(m):
        def f():
            m(x)
        return f

    def raw_op():
        with torch.no_grad():  # as in the hook
            for (t, cd), (mu, sq, st) in zip(inputs, stats):
                torch.ops.psi_cuda.bnp_update_stats_(t, mu, sq, st, channel_dim=cd,
                                                     momentum=0.1)

    def wrapper_op():
        with torch.no_grad():
            for (t, cd), (mu, sq, st) in zip(inputs, stats):
                ops.bnp_update_stats_(t, mu, sq, st, channel_dim=cd, momentum=0.1)

    fns = {k: forward(m) for k, m in variants.items()}
    plain_model = variants["plain"]

    def forward_no_grad():
        with torch.no_grad():
            plain_model(x)

    fns["plain, torch.no_grad() (reference point)"] = forward_no_grad
    # BNP's hook functions themselves (Python body + kernel), called directly on the layer
    # inputs, i.e. without torch's hook dispatch; on a spare copy so no timed model is touched.
    spare = copy.deepcopy(model)
    spare_bnp = psi_cuda.BNP(spare, backend="fused")
    bodies = [(spare_bnp._hook(l), l.module, (t,)) for l, (t, _) in zip(spare_bnp.layers, inputs)]

    def hook_bodies():
        for h, mod, a in bodies:
            h(mod, a)

    fns["stats op alone (raw torch.ops, all layers)"] = raw_op
    fns["stats op alone (psi_cuda.ops wrapper, all layers)"] = wrapper_op
    fns["BNP hook bodies called directly (all layers)"] = hook_bodies
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    times = {k: [] for k in names}
    in_situ_rounds = []  # per round: [hook body seconds per layer]
    shuffler = random.Random(0)
    for _ in range(reps):
        order = list(names)
        shuffler.shuffle(order)  # a new order every round: no variant always follows another
        for k in order:
            if k.startswith(("stats op", "BNP hook bodies")):
                fns[k]()  # untimed: the inputs in cache, as they would be in a hook (the layer
                # input was just written by the previous layer)
            in_situ[:] = [0.0] * n_layers
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            if k == timed_name:
                in_situ_rounds.append(list(in_situ))
    plain = statistics.median(times["plain"])
    rows = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
        alone = k.startswith(("stats op", "BNP hook bodies"))
        # paired: median over rounds of (this variant - plain in the same round); less noisy
        # than a difference of medians when the machine's speed drifts.
        diffs = [a - b for a, b in zip(ts, times["plain"])]
        paired = None if k == "plain" or alone else statistics.median(diffs)
        pq = statistics.quantiles(diffs, n=4) if paired is not None and len(diffs) > 1 else None
        rows[k] = dict(median_ms=med * 1e3, q1_ms=q[0] * 1e3, q3_ms=q[2] * 1e3,
                       overhead_pct=None if k == "plain" else 100 * (
                           med if alone else med - plain) / plain,
                       paired_diff_ms=None if paired is None else paired * 1e3,
                       paired_overhead_pct=None if paired is None else 100 * paired / plain,
                       paired_diff_q1_q3_ms=None if pq is None else [pq[0] * 1e3, pq[2] * 1e3])
    elems = sum(t.numel() for t, _ in inputs)
    med = {k: v["median_ms"] for k, v in rows.items()}
    hook = rows["BNP hooks (fused)"]["paired_diff_ms"]
    raw = med["stats op alone (raw torch.ops, all layers)"]
    wrapper = med["stats op alone (psi_cuda.ops wrapper, all layers)"]
    bodies_ms = med["BNP hook bodies called directly (all layers)"]
    machinery = rows["no-op pre-hooks"]["paired_diff_ms"]
    inside_ms = statistics.median(sum(r) for r in in_situ_rounds) * 1e3
    inside_per_layer_ms = [statistics.median(r[i] for r in in_situ_rounds) * 1e3
                           for i in range(n_layers)]
    # Each term is a median or a paired median difference of interleaved timings: noisy, and on
    # a busy machine a small term can come out negative.
    breakdown = dict(
        fused_hooks_paired_ms=hook,
        hook_bodies_inside_forward_ms=inside_ms,
        hook_bodies_inside_forward_per_layer_ms=inside_per_layer_ms,
        layers=[l.name for l in keep[0].layers],
        hook_bodies_called_directly_ms=bodies_ms,
        stats_kernel_alone_ms=raw,
        ops_wrapper_python_ms=wrapper - raw,
        rest_of_hook_body_python_ms=bodies_ms - wrapper,
        slower_inside_forward_ms=inside_ms - bodies_ms,
        torch_hook_dispatch_paired_ms=machinery,
        remainder_ms=hook - inside_ms - machinery,
        fused_hooks_pct_of_no_grad_forward=100 * hook /
        med["plain, torch.no_grad() (reference point)"],
        note="fused hook cost (paired) = hook bodies as timed inside the forward + torch's "
             "pre-hook dispatch (no-op hooks vs plain, paired) + remainder (noise, effects on "
             "the layers after a hook). The bodies called directly on inputs in cache = kernel "
             "alone + psi_cuda.ops wrapper (device check) + rest of BNP's hook body (training/"
             "device checks, backend choice, channel_dim, no_grad, detach); 'slower inside "
             "forward' is how much more the same bodies take inside the forward")
    return dict(model=name, input_shape=list(x.shape), preconditioned_layers=n_layers,
                layer_input_elements=elems, layer_input_shapes=[list(t.shape) for t, _ in inputs],
                reps=reps, warmup=warmup,
                forward_mode="train mode, autograd on (as in a training step)",
                variants=rows, breakdown=breakdown)


def hook_overhead(args, log) -> dict:
    g = torch.Generator().manual_seed(0)
    with deterministic(args.threads):
        torch.manual_seed(0)
        digits = DigitsCNN(args.width)
        big = BigConvNet(args.big_width)
        cases = [
            (f"digits CNN (width {args.width}), batch {args.overhead_batch}", digits,
             torch.rand(args.overhead_batch, 1, 8, 8, generator=g), args.reps),
            (f"4-conv net (width {args.big_width}), 3x32x32, batch {args.big_batch}", big,
             torch.randn(args.big_batch, 3, 32, 32, generator=g), args.big_reps),
        ]
        results = []
        for name, model, x, reps in cases:
            load0 = os.getloadavg()[0]
            r = overhead_one(name, model, x, reps, args.warmup)
            r["load_avg_1min"] = [load0, os.getloadavg()[0]]
            results.append(r)
            log(f"  {name}: plain {r['variants']['plain']['median_ms']:.3f} ms, fused hooks "
                f"+{r['variants']['BNP hooks (fused)']['overhead_pct']:.1f}%")
    return dict(target_pct=10.0, threads=args.threads, models=results)


# ------------------------------------------------------------------------------------ report

def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def training_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Training: digits CNN, {cfg['epochs']} epochs ({cfg['examples_per_run']} examples) "
             f"per run, momentum {cfg['momentum']}, constant lr, seeds {cfg['seeds']}",
             f"{'batch':>5}  {'method':8}  {'lr':>6}  {'final train loss':>17}  "
             f"{'train loss (eval)':>17}  {'test acc':>15}  {'BN test acc, batch stats':>24}",
             "-" * 104]
    for row in result["summary"]:
        def pm(key, spec=".4f", scale=1.0):
            v, s = row[key], row[key + "_std"]
            if v is None:
                return "diverged"
            return format(v * scale, spec) + (f" ± {s * scale:{spec}}" if s is not None else "")
        lr = f"{row['lr']:g}" + ("*" if row["lr_at_grid_edge"] else "")
        lines.append(f"{row['batch_size']:>5}  {row['method']:8}  {lr:>6}  "
                     f"{pm('final_train_loss'):>17}  {pm('train_loss_eval'):>17}  "
                     f"{pm('test_acc', '.1f', 100):>14}%  "
                     f"{(pm('test_acc_batch_stats', '.1f', 100) + '%') if row['test_acc_batch_stats'] is not None else '-':>24}")
    lines.append("(* lr at the edge of its grid; ± is the standard deviation over seeds; test "
                 "acc in eval mode, BN with running statistics)")
    return "\n".join(lines)


def overhead_table(result: dict) -> str:
    lines = [f"Hook overhead: forward pass in training mode, CPU, {result['threads']} thread(s); "
             f"target <= {result['target_pct']:.0f}% for the fused hooks"]
    for m in result["models"]:
        lines += ["", f"{m['model']} ({m['preconditioned_layers']} preconditioned layers, "
                      f"{m['layer_input_elements']} layer-input elements; median of {m['reps']} "
                      f"round-robin reps; load avg {m['load_avg_1min'][0]:.2f}->"
                      f"{m['load_avg_1min'][1]:.2f})",
                  f"  {'variant':50} {'median ms':>10} {'[q1, q3] ms':>20} {'overhead':>10} {'paired':>8}"]
        for k, v in m["variants"].items():
            oh = "-" if v["overhead_pct"] is None else f"{v['overhead_pct']:+.1f}%"
            po = "-" if v["paired_overhead_pct"] is None else f"{v['paired_overhead_pct']:+.1f}%"
            lines.append(f"  {k:50} {v['median_ms']:10.3f} "
                         f"{'[' + format(v['q1_ms'], '.3f') + ', ' + format(v['q3_ms'], '.3f') + ']':>20} "
                         f"{oh:>10} {po:>8}")
        fused = m["variants"]["BNP hooks (fused)"]["overhead_pct"]
        paired = m["variants"]["BNP hooks (fused)"]["paired_overhead_pct"]
        b = m["breakdown"]
        lines.append(f"  -> fused hooks {fused:+.1f}% of the training forward (paired "
                     f"{paired:+.1f}%; {b['fused_hooks_pct_of_no_grad_forward']:+.1f}% of a "
                     f"no-grad forward): target {'met' if fused <= result['target_pct'] else 'NOT met'}")
        per = ", ".join(f"{n} {t:.3f}" for n, t in
                        zip(b["layers"], b["hook_bodies_inside_forward_per_layer_ms"]))
        lines.append(f"     fused hook cost (paired) {b['fused_hooks_paired_ms']:.3f} ms = hook "
                     f"bodies inside the forward {b['hook_bodies_inside_forward_ms']:.3f} ({per})"
                     f" + torch hook dispatch {b['torch_hook_dispatch_paired_ms']:.3f} + "
                     f"remainder {b['remainder_ms']:.3f} ms")
        lines.append(f"     hook bodies called directly (inputs in cache) "
                     f"{b['hook_bodies_called_directly_ms']:.3f} ms = kernel "
                     f"{b['stats_kernel_alone_ms']:.3f} + ops wrapper "
                     f"{b['ops_wrapper_python_ms']:.3f} + rest of body "
                     f"{b['rest_of_hook_body_python_ms']:.3f} ms; inside the forward they take "
                     f"{b['slower_inside_forward_ms']:+.3f} ms more")
    lines.append("(overhead = (median variant - median plain) / median plain; paired = median "
                 "over rounds of (variant - plain) / median plain; rows 'alone'/'called "
                 "directly': that time alone as % of the plain forward)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 epoch on 256 training examples, the 2 lowest lrs per grid, 1 seed, "
                         "few timing reps (numbers not meaningful)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 2; quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="passes over the training split "
                    "per run, every batch size (default 3; quick 1)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES),
                    choices=BATCH_SIZES)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=None,
                    help="examples per curve point (default 256; quick 64)")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="use the first N training examples only (quick: 256)")
    ap.add_argument("--reps", type=int, default=None, help="timing rounds, digits CNN "
                    "(default 300; quick 10)")
    ap.add_argument("--big-reps", type=int, default=None, help="timing rounds, 4-conv net "
                    "(default 60; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 5; quick 1)")
    ap.add_argument("--overhead-batch", type=int, default=128)
    ap.add_argument("--big-width", type=int, default=64)
    ap.add_argument("--big-batch", type=int, default=None, help="default 64; quick 8")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    q = args.quick
    for key, full, quick in (("seeds", 2, 1), ("epochs", 3, 1), ("log_every", 256, 64),
                             ("train_subset", None, 256), ("reps", 300, 10), ("big_reps", 60, 3),
                             ("warmup", 5, 1), ("big_batch", 64, 8)):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    lr_grid = QUICK_LR_GRID if q else LR_GRID
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        info = machine("cpu")
    finally:
        torch.set_num_threads(threads_before)
    info["load_avg_at_start"] = list(load_start)
    report = {"machine": info, "quick": q, "command": "python benchmarks/bnp_evidence.py " +
              " ".join(argv if argv is not None else sys.argv[1:])}
    files = []
    training = overhead = None
    if not args.skip_training:
        log(f"training comparison ({'quick' if q else 'full'}): methods {list(METHODS)}, batch "
            f"sizes {args.batch_sizes}, {args.epochs} epoch(s), seeds 0..{args.seeds - 1}")
        training = training_comparison(args, lr_grid, log)
        training.update(report)
        training["wall_s"] = time.perf_counter() - t_start
        p = out / "bnp_training.json"
        p.write_text(json.dumps(training, indent=1) + "\n")
        files.append(p)
        p = out / "bnp_training.png"
        plot_training(training, p)
        files.append(p)
    if not args.skip_overhead:
        log("hook overhead (round-robin timing)")
        t0 = time.perf_counter()
        overhead = hook_overhead(args, log)
        overhead.update(report)
        overhead["wall_s"] = time.perf_counter() - t0
        p = out / "bnp_overhead.json"
        p.write_text(json.dumps(overhead, indent=1) + "\n")
        files.append(p)

    load_end = os.getloadavg()
    print()
    if training is not None:
        print(training_table(training))
        print()
    if overhead is not None:
        print(overhead_table(overhead))
        print()
    busy = max(load_start[0], load_end[0]) > args.threads + 0.5
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"{args.threads} thread(s); load average (1 min) {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end" +
          (" -- shared machine was busy: timings are noisier than on an idle one" if busy else ""))
    print(f"total {time.perf_counter() - t_start:.0f} s; wrote:")
    for p in files:
        print(f"  {p}")
    return {"training": training, "overhead": overhead, "files": [str(p) for p in files]}


if __name__ == "__main__":
    main()
