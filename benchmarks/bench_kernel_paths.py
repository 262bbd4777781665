"""One psi_sgd_ / psi_adam_ step on lists that each take one path of the fused kernels, next to
torch's fused SGD / AdamW on tensors of the same sizes: the paths the GPU-speed work added or
changed, timed on the first GPU that runs them (``scripts/gpu_check.sh`` runs this).

    python benchmarks/bench_kernel_paths.py --device cuda           # the GPU run (about 1 min)
    python benchmarks/bench_kernel_paths.py --device cpu --quick    # smoke run of the program

The lists (about 8-9M fp32 values each, so that every step moves 170-190 MB, beyond the caches):

* ``registers``: 4096 rows of 2048, channel groups held in registers (one read, one write);
* ``read twice (4608)``: 2048 rows of 4608, ResNet-50's layer-4 3x3 convs: one block per group,
  the write reads the group again (modelled as an L2 hit, benchmarks/gpu_static.py);
* ``read twice (32768)``: 256 rows of 32768 (its modelled L2 working set is beyond the L2);
* ``chunked (131072)``: 64 rows of 131072, the reduce/solve/apply path;
* ``tiny rows (9)``: 1M rows of 9, depthwise 3x3 convs (one block per row);
* ``euclidean``: the same 8.4M values as one Euclidean tensor (manifold=None).

Then BNP's statistics (``bnp_update_stats_``, one launch per call) on layer inputs of 4-13M
values, next to torch's BatchNorm statistics kernel (``torch.batch_norm_stats``; ``var_mean`` on
the CPU), which reads the input once as this op does:

* ``NCHW 56x56`` and ``NCHW 7x7``: the planes kernel (inner sizes 3136 and 49);
* ``NCHW 4x4``: inner size 16, the columns kernel (read as rows of C * 16 columns);
* ``channels-last 56x56`` and ``Linear (12608, 768)``: inner size 1, the columns kernel.

For each list the methods take turns step by step (round-robin, ``psi_cuda.apps.bench``), and
the table gives the median step time, the GB/s of the bytes a step must move (PSI-SGD with
momentum: read w, g, m, write w, m, 20 B per fp32 value; PSI-Adam: 28 B per value for torch's
AdamW, whose v is per element, the same denominator for PSIAdam) and each method's time over
torch's. Results go to ``--out``/``--name``.json. Timing only: correctness is the tests' job.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from psi_cuda import ops
from psi_cuda.apps.bench import machine, round_robin

LISTS = {  # name: (shape of one tensor, how many, manifold)
    "registers": ((4096, 2048), 1, "channel"),
    "read twice (4608)": ((2048, 4608), 1, "channel"),
    "read twice (32768)": ((256, 32768), 1, "channel"),
    "chunked (131072)": ((64, 131072), 1, "channel"),
    "tiny rows (9)": ((1 << 20, 9), 1, "channel"),
    "euclidean": ((4096, 2048), 1, None),
}
QUICK_SCALE = 64  # --quick: every list's rows divided by this

STATS = {  # name: (input shape, memory format)
    "NCHW 56x56": ((64, 64, 56, 56), None),
    "NCHW 7x7": ((256, 512, 7, 7), None),
    "NCHW 4x4": ((256, 1024, 4, 4), None),
    "channels-last 56x56": ((64, 64, 56, 56), torch.channels_last),
    "Linear (12608, 768)": ((12608, 768), None),
}


def make_state(shape, count, manifold, device, adam):
    g = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(shape, generator=g).to(device) for _ in range(count)]
    grads = [torch.randn(shape, generator=g).to(device) * 1e-2 for _ in range(count)]
    bufs = [torch.zeros(shape, device=device) for _ in range(count)]
    steps = [torch.zeros((), device=device) for _ in range(count)]
    if not adam:
        return params, grads, bufs, steps
    if manifold == "channel":
        vs = [torch.zeros(shape[0], device=device) for _ in range(count)]
    else:
        vs = [torch.zeros(shape, device=device) for _ in range(count)]
    return params, grads, bufs, vs, steps


def steps_of(shape, count, manifold, device):
    """The step functions of one list: psi_sgd_, torch fused SGD, psi_adam_, torch fused AdamW."""
    sgd = make_state(shape, count, manifold, device, adam=False)
    adam = make_state(shape, count, manifold, device, adam=True)
    t_params = [p.clone() for p in sgd[0]]
    for p, gr in zip(t_params, sgd[1]):
        p.grad = gr.clone()
    t_sgd = torch.optim.SGD(t_params, lr=1e-3, momentum=0.9, fused=True)
    a_params = [p.clone() for p in sgd[0]]
    for p, gr in zip(a_params, sgd[1]):
        p.grad = gr.clone()
    t_adam = torch.optim.AdamW(a_params, lr=1e-3, fused=True)
    return {
        "psi_sgd_": lambda: ops.psi_sgd_(*sgd, lr=1e-3, momentum=0.9, manifold=manifold),
        "torch SGD (fused)": t_sgd.step,
        "psi_adam_": lambda: ops.psi_adam_(*adam, lr=1e-3, manifold=manifold),
        "torch AdamW (fused)": t_adam.step,
    }


def stats_of(shape, fmt, device):
    """bnp_update_stats_ on one input and torch's statistics of the same input."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    mean, sqmean, step = (torch.zeros(C, device=device), torch.ones(C, device=device),
                          torch.zeros((), device=device))
    if x.is_cuda:
        def baseline():
            return torch.batch_norm_stats(x, 1e-5)
    else:
        dims = [d for d in range(x.dim()) if d != 1]

        def baseline():
            return torch.var_mean(x, dim=dims)
    return {
        "bnp_update_stats_": lambda: ops.bnp_update_stats_(x, mean, sqmean, step, channel_dim=1,
                                                           momentum=0.1),
        "torch BN stats": baseline,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="rows / 64, 5 steps (smoke run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None, help="result file name (default kernel_paths_<device>)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_kernel_paths: --device cuda but torch.cuda.is_available() is False")
    steps = 5 if args.quick else args.steps
    report = {"command": "python benchmarks/bench_kernel_paths.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine(args.device), "steps": steps, "lists": {}}
    header = f"{'list':<28}{'values':>10}  {'method':<20}{'median ms':>10}{'GB/s':>8}{'/ torch':>9}"
    print(header)
    print("-" * len(header))
    for name, (shape, count, manifold) in LISTS.items():
        if args.quick:
            shape = (max(1, shape[0] // QUICK_SCALE),) + shape[1:]
        n = count * shape[0] * shape[1]
        times = round_robin(steps_of(shape, count, manifold, args.device), args.device,
                            args.warmup, steps)
        rows = {}
        for method, ts in times.items():
            med = statistics.median(ts)
            nbytes = n * (28 if "adam" in method.lower() else 20)
            rows[method] = {"median_s": med, "times_s": ts, "gb_per_s": nbytes / med / 1e9}
        for method, row in rows.items():
            ref = "torch AdamW (fused)" if "adam" in method.lower() else "torch SGD (fused)"
            row["vs_torch_fused"] = row["median_s"] / rows[ref]["median_s"]
            print(f"{name:<28}{n:>10}  {method:<20}{row['median_s'] * 1e3:>10.3f}"
                  f"{row['gb_per_s']:>8.1f}{row['vs_torch_fused']:>8.2f}x")
        report["lists"][name] = {"shape": list(shape), "tensors": count, "manifold": manifold,
                                 "values": n, "methods": rows}
    report["stats"] = {}
    for name, (shape, fmt) in STATS.items():
        if args.quick:
            shape = (max(1, shape[0] // QUICK_SCALE),) + shape[1:]
        n = 1
        for d in shape:
            n *= d
        times = round_robin(stats_of(shape, fmt, args.device), args.device, args.warmup, steps)
        rows = {}
        for method, ts in times.items():
            med = statistics.median(ts)
            rows[method] = {"median_s": med, "times_s": ts, "gb_per_s": n * 4 / med / 1e9}
        for method, row in rows.items():
            row["vs_torch"] = row["median_s"] / rows["torch BN stats"]["median_s"]
            print(f"{'stats ' + name:<28}{n:>10}  {method:<20}{row['median_s'] * 1e3:>10.3f}"
                  f"{row['gb_per_s']:>8.1f}{row['vs_torch']:>8.2f}x")
        report["stats"][name] = {"shape": list(shape), "channels_last": fmt is not None,
                                 "values": n, "methods": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name or 'kernel_paths_' + args.device.split(':')[0]}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {path}")
    return report


if __name__ == "__main__":
    main()
