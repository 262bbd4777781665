"""Cost of the step of sharded tensor groups (psi_cuda.distributed) against the fused op on the
same tensors, in one process (a one-rank gloo group: the all-reduce is there but trivial).

Three ways per optimizer, measured side by side (interleaved round by round, so drift of the
machine hits all alike): the fused op on plain tensors (the bound), the sharded path with the
fused ops (``psi_grams``, one all-reduce, ``psi_sgd_``/``psi_adam_`` with ``grams=``: what the
fused backend runs under FSDP2) and the torch path (the reference backend's). Prints the median
ms and the ratios to the fused op, and saves them (``--out``).

    python benchmarks/bench_sharded_tensor_groups.py --count 12 --shape 768 2304
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from psi_cuda import distributed, ops
from psi_cuda.optim import PSIAdam, PSISGD

SGD = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
           retraction="normalize", transport="project", max_grad_norm=None)
ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
            retraction="normalize", transport="project", max_grad_norm=None)
RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_medians(fns: dict, rounds: int, warmup: int = 3) -> dict:
    """Median ms of each function, called in turn once per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--shape", type=int, nargs="+", default=[768, 2304])
    ap.add_argument("--steps", type=int, default=20, help="rounds (each steps every way once)")
    ap.add_argument("--out", default=str(RESULTS / "sharded_groups.json"),
                    help="JSON file the figures are appended to ('' to skip)")
    args = ap.parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    gen = torch.Generator().manual_seed(0)
    make = lambda: [torch.randn(args.shape, generator=gen) for _ in range(args.count)]  # noqa: E731
    w, g = make(), make()
    m = [torch.zeros(args.shape) for _ in range(args.count)]
    steps = [torch.ones(()) for _ in range(args.count)]
    vs = [torch.zeros(()) for _ in range(args.count)]
    dt = lambda ts: [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in ts]  # noqa: E731
    copies = {k: (dt(w), dt(g), dt(m), [s.clone() for s in steps], [v.clone() for v in vs])
              for k in ("fused", "torch")}

    def sharded(kind, path, solve, op, opts):
        wd, gd, md, sd, vd = copies[path]
        lists = [wd, gd, md, sd] if kind == "sgd" else [wd, gd, md, vd, sd]
        grams_fn = ops.psi_grams if path == "fused" else None
        return lambda: distributed.step_call(op, lists, manifold="tensor", solve=solve,
                                             grams_fn=grams_fn, lr=1e-3, **opts)

    fns = {
        "PSISGD fused op": lambda: ops.psi_sgd_(w, g, m, steps, lr=1e-3, manifold="tensor",
                                                **SGD),
        "PSISGD sharded, fused": sharded("sgd", "fused", PSISGD.solve, ops.psi_sgd_, SGD),
        "PSISGD sharded, torch": sharded("sgd", "torch", PSISGD.solve, ops.psi_sgd_, SGD),
        "PSIAdam fused op": lambda: ops.psi_adam_(w, g, m, vs, steps, lr=1e-3,
                                                  manifold="tensor", **ADAM),
        "PSIAdam sharded, fused": sharded("adam", "fused", PSIAdam.solve, ops.psi_adam_, ADAM),
        "PSIAdam sharded, torch": sharded("adam", "torch", PSIAdam.solve, ops.psi_adam_, ADAM),
    }
    med = interleaved_medians(fns, args.steps)
    n = args.count * torch.Size(args.shape).numel()
    print(f"{args.count} tensor groups of {tuple(args.shape)} ({n / 1e6:.1f}M values), "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved rounds:")
    ratios = {}
    for name, ms in med.items():
        base = med[name.split()[0] + " fused op"]
        ratios[name] = ms / base
        print(f"  {name:24s} {ms:8.2f} ms  {ms / base:5.2f}x the fused op")
    if args.out:
        path = Path(args.out)
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        runs.append({"count": args.count, "shape": list(args.shape), "rounds": args.steps,
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "machine": platform.machine(), "median_ms": med, "ratio": ratios,
                     "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        path.write_text(json.dumps({"command": "python benchmarks/bench_sharded_tensor_groups.py"
                                    " --count 12 --shape 768 2304", "runs": runs}, indent=1))
        print(f"saved to {path}")
    dist.destroy_process_group()
    time.sleep(0.2)  # let gloo's workers drop their last works first: see examples/train_large.py


if __name__ == "__main__":
    main()
