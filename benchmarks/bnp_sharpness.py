"""Why the exact BNP-SGD step has a narrow learning-rate window: the preconditioned curvature.

    python benchmarks/bnp_sharpness.py          # about 3 minutes on one core

Trains the BatchNorm-free SmallResNet of ``psi-cuda train --optimizer bnp-sgd`` on digits (batch
64, momentum 0.9, weight decay 5e-4, constant lr, float64, seed 0) and, at a few steps, measures
the top eigenvalue of P H, the Hessian of the loss on a fixed probe batch (512 training images)
preconditioned by BNP (P: the BNP map of every layer with the current statistics; it is
symmetric positive definite, so P H has real eigenvalues): for each layer alone (its diagonal
block) and for all layers together, by power iteration on Hessian-vector products. SGD with
momentum beta is stable only while lr * lambda_max < 2 (1 + beta) = 3.8, so this is the quantity
that decides the largest usable lr.

Runs: the exact step (``max_update=None``) at lr 1e-3 (the old default, the best lr of the exact
step) and at 3e-3 (where it diverges), and the capped default at 0.1. Also the relative change of
each layer's raw weights since initialization, ``|W_t - W_0| / |W_0|``: the exact step makes the
raw weights of layers with small input variances grow by a large factor, which multiplies the
network's gain and with it the curvature seen by the layers before them. Measured: the exact
step at 1e-3 goes from lambda 7 to 1.2e3 in 40 steps; at 3e-3 lr * lambda passes 1.5 by step 10
and the loss explodes before step 20. The cap does not stop the sharpening (at 0.1, lambda
reaches 7e3, lr * lambda far above 3.8): it bounds the length of every step, so past the
stability limit the iterate oscillates in a bounded band instead of diverging.
-> benchmarks/results/bnp_sharpness.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from psi_cuda import reference
from psi_cuda.apps import train
from psi_cuda.apps.data import load_dataset
from psi_cuda.optim import BNPSGD

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
RUNS = (("exact", 1e-3, None), ("exact", 3e-3, None), ("capped", 0.1, "default"))
CHECKPOINTS = (1, 10, 20, 40)
PROBE = 512
ITERS = 30


def top_eigenvalue(model, opt, layers, x, y, iters=ITERS, seed=0):
    """Power iteration on v -> P H v over the weights and biases of ``layers``."""
    params = [p for l in layers for p in (l.module.weight, l.module.bias)]
    model.eval()  # no statistics updates (the net has no BatchNorm: same forward)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    lam = float("nan")
    for _ in range(iters):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        phv = []
        for i, l in enumerate(layers):
            w, b = [hv[2 * i].clone()], [hv[2 * i + 1].clone()]
            reference.bnp_precondition_(w, b, [l.mean], [l.sqmean], groups=[l.groups],
                                        eps=opt.bnp.eps)
            phv += [w[0], b[0]]
        lam = math.sqrt(sum(float((t * t).sum()) for t in phv))
        v = [t.detach() for t in phv]
    model.train()
    return lam


def one_run(name, lr, cap, data):
    tx, ty = data[0].double(), data[1]
    torch.manual_seed(0)
    model = train.SmallResNet(norm=False).double()
    kw = {} if cap == "default" else dict(max_update=cap)
    opt = BNPSGD(model, lr=lr, momentum=train.DEFAULT_MOMENTUM,
                 weight_decay=train.DEFAULTS["bnp-sgd"]["weight_decay"], backend="reference",
                 **kw)
    w0 = {l.name: l.module.weight.detach().clone() for l in opt.bnp.layers}
    order = torch.randperm(ty.numel(), generator=torch.Generator().manual_seed(0))
    px, py = tx[:PROBE], ty[:PROBE]
    out, t, n = [], 0, ty.numel()
    for target in CHECKPOINTS:
        while t < target:
            start = (t * 64) % (n - 64)
            idx = order[start:start + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(tx[idx]), ty[idx])
            loss.backward()
            opt.step()
            t += 1
        finite = math.isfinite(loss.item())
        entry = dict(step=t, loss=loss.item(),
                     weight_growth={l.name: float((l.module.weight.detach() - w0[l.name]).norm()
                                                  / w0[l.name].norm()) for l in opt.bnp.layers})
        if finite:
            entry["lambda_max_layer"] = {l.name: top_eigenvalue(model, opt, [l], px, py)
                                         for l in opt.bnp.layers}
            entry["lambda_max_all"] = top_eigenvalue(model, opt, opt.bnp.layers, px, py)
            entry["lr_times_lambda"] = lr * entry["lambda_max_all"]
        out.append(entry)
        print(f"{name} lr {lr:g} step {t}: loss {entry['loss']:.4g}"
              + (f"  lambda_max(P H) {entry['lambda_max_all']:.4g}  lr*lambda "
                 f"{entry['lr_times_lambda']:.3g}" if finite else "  (diverged)"), flush=True)
        if not finite:
            break
    return dict(variant=name, lr=lr, checkpoints=out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "bnp_sharpness.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("digits", None, split_seed=train.SPLIT_SEED)
    runs = [one_run(name, lr, cap, data) for name, lr, cap in RUNS]
    payload = dict(
        command="python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        description=__doc__, stability_limit="lr * lambda_max < 2 (1 + momentum) = 3.8",
        settings=dict(checkpoints=list(CHECKPOINTS), probe_images=PROBE, power_iterations=ITERS,
                      momentum=train.DEFAULT_MOMENTUM, batch_size=64, schedule="constant",
                      dtype="float64", seed=0),
        torch=torch.__version__, runs=runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
