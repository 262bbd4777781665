"""Cost of the pure-torch step of sharded tensor groups (psi_cuda.distributed) against the fused
op on the same tensors, in one process (a one-rank gloo group: the all-reduce is there but
trivial). Prints the median ms of a PSISGD (momentum) and a PSIAdam step over `--count` tensor
groups of shape `--shape`.

    python benchmarks/bench_sharded_tensor_groups.py --count 12 --shape 768 2304
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from psi_cuda import distributed, ops
from psi_cuda.optim import PSIAdam, PSISGD

SGD = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
           retraction="normalize", transport="project", max_grad_norm=None)
ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
            retraction="normalize", transport="project", max_grad_norm=None)


def median_ms(fn, steps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--shape", type=int, nargs="+", default=[768, 2304])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    make = lambda: [torch.randn(args.shape) for _ in range(args.count)]  # noqa: E731
    w, g, m, v = make(), make(), [torch.zeros(args.shape) for _ in range(args.count)], None
    steps = [torch.ones(()) for _ in range(args.count)]
    vs = [torch.zeros(()) for _ in range(args.count)]
    dt = lambda ts: [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in ts]  # noqa: E731
    wd, gd, md = dt(w), dt(g), dt(m)
    rows = {}
    rows["PSISGD fused op"] = median_ms(
        lambda: ops.psi_sgd_(w, g, m, steps, lr=1e-3, manifold="tensor",
                             **{k: v for k, v in SGD.items()}), args.steps)
    rows["PSISGD sharded path"] = median_ms(
        lambda: distributed.step_call(ops.psi_sgd_, [wd, gd, md, steps], manifold="tensor",
                                      solve=PSISGD.solve, lr=1e-3, **SGD), args.steps)
    rows["PSIAdam fused op"] = median_ms(
        lambda: ops.psi_adam_(w, g, m, vs, steps, lr=1e-3, manifold="tensor", **ADAM),
        args.steps)
    rows["PSIAdam sharded path"] = median_ms(
        lambda: distributed.step_call(ops.psi_adam_, [wd, gd, md, vs, steps],
                                      manifold="tensor", solve=PSIAdam.solve, lr=1e-3, **ADAM),
        args.steps)
    n = args.count * torch.Size(args.shape).numel()
    print(f"{args.count} tensor groups of {tuple(args.shape)} ({n / 1e6:.1f}M values), "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps:")
    for name, ms in rows.items():
        print(f"  {name:22s} {ms:8.2f} ms")
    dist.destroy_process_group()
    time.sleep(0.2)  # let gloo's workers drop their last works first: see examples/train_large.py


if __name__ == "__main__":
    main()
