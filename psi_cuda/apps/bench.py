"""Microbenchmark of one optimizer step: ``psi-cuda bench`` / ``python -m psi_cuda bench``.

    psi-cuda bench                                    # full CPU run (~10 min on 2 cores)
    psi-cuda bench --quick                            # a minute: fewer steps, no large list
    psi-cuda bench --models resnet50 --steps 30 --only PSISGD "SGD (fused)"
    psi-cuda bench --device cuda --dtype bfloat16     # on a GPU (large list: 1B+ values)
    psi-cuda bench --host-only                        # only the host time per tensor (~1 min)

Parameter lists are shaped like real models (psi_cuda/apps/shapes.py; no models are built):
ResNet-50 (channel groups + Euclidean BN/fc), ViT-B/16 (tensor groups + Euclidean) and a large
list (ResNet-50 lists repeated: ~511M values on CPU, ~1.02B on a GPU). For each list every
method is timed side by side in ONE process, taking turns step by step (round-robin), so that a
slow spell of the machine hits all alike; the median of --steps steps after --warmup steps is
reported with its quartiles. Effective GB/s = the bytes a momentum-SGD step must move (read w, g, m; write w, m;
m in fp32) / time; the fraction is of the machine's copy bandwidth (dst.copy_(src), read +
write, on buffers larger than the caches) measured in the same run. Adam methods also move
their second moments (AdamW per element, PSIAdam one scalar per channel group): their GB/s
column counts the SGD bytes; compare them with each other by time.

The methods share one set of parameters and gradients per list (each keeps its own optimizer
state), which keeps the large list within memory; on the large list only the methods that fit
run (fused PSISGD, torch fused/foreach SGD, the for-loop PSISGD reference).

The host-time section (--host, on by default) times a step over N tensors of shape (4, 9) with
their gradients set (N = 100, 1,000, 10,000): fused PSISGD (momentum 0.9; one channel group per
row, and Euclidean), fused PSIAdam (the same two) and torch's fused SGD and AdamW, each on its own
copy of the list, round-robin, on one torch thread (--host-threads), and reports the median step
time divided by N. The kernels' work on 36 values is a small part of it: what it measures is the
per-tensor cost of the Python and C++ host work of a step (grouping, state lookups, checks, the
op's argument lists), which on a GPU is the step time of a model with many small tensors.

A scaling sweep (--scaling) times fused PSISGD, torch's fused SGD and the PSISGD references on
prefixes of the large list from 1M values up to the whole list.

Results: benchmarks/results/step_<device>.json (machine description included), a PNG chart
next to it, and ``--readme`` rewrites the table of README.md from the JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .. import ops, reference
from ..optim import PSIAdam, PSISGD
from . import bench_report
from .shapes import MODELS, ShapeList, model_list, numel, prefix

# --- timing ---------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], device: str, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(device: str, nbytes: int = 1 << 29, reps: int = 10) -> float:
    """GB/s of dst.copy_(src) (bytes read + bytes written) on a buffer larger than the caches."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), device, 2, reps)
    return 2 * nbytes / statistics.median(times) / 1e9


def round_robin(steps_of: dict[str, Callable[[], object]], device: str, warmup: int,
                steps: int) -> dict[str, list[float]]:
    """Warm every method up, then time one step of each in turn, ``steps`` rounds. Python's
    garbage collector is off while timing, as in ``timeit``, and collects before every step,
    so that a collection of the objects one method made does not land in the next one's time."""
    for step in steps_of.values():
        time_steps(step, device, warmup, 0)
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(steps):
            for name, step in steps_of.items():
                gc.collect()
                times[name] += time_steps(step, device, 0, 1)
    finally:
        if enabled:
            gc.enable()
    return times


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- methods --------------------------------------------------------------------------------


def make_params(shapes: ShapeList, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for _, shape, _ in shapes:
        p = torch.empty(shape, dtype=dtype, device=device)
        _fill_randn(p, g)
        p.requires_grad_(True)
        p.grad = torch.empty_like(p)
        _fill_randn(p.grad, g, 1e-3)
        params.append(p)
    return params


def _fill_randn(t: torch.Tensor, g: torch.Generator, scale: float = 1.0) -> None:
    """randn in pieces (no float32 copy of a 1B-value list at once)."""
    flat = t.detach().view(-1)
    for b in range(0, flat.numel(), 1 << 24):
        e = min(flat.numel(), b + (1 << 24))
        flat[b:e].copy_(torch.randn(e - b, generator=g).mul_(scale).to(t.dtype))


def psi_groups(shapes: ShapeList, params: list[torch.Tensor]) -> list[dict]:
    by: dict = {}
    for (_, _, manifold), p in zip(shapes, params):
        by.setdefault(manifold, []).append(p)
    return [{"params": ps, "manifold": m} for m, ps in by.items()]


class ForeachPSISGD:
    """Momentum PSI-SGD over the groups with ``reference.psi_sgd_foreach_`` (the pure-torch
    foreach baseline; state kept here, as PSISGD keeps it)."""

    def __init__(self, groups: list[dict], lr: float, momentum: float):
        self.groups, self.lr, self.momentum = groups, lr, momentum
        self.state = [([torch.zeros_like(p, dtype=reference.opmath_dtype(p.dtype))
                        for p in g["params"]], [torch.zeros(()) for _ in g["params"]])
                      for g in groups]

    def step(self) -> None:
        for g, (bufs, steps) in zip(self.groups, self.state):
            reference.psi_sgd_foreach_(g["params"], [p.grad for p in g["params"]], bufs, steps,
                                       lr=self.lr, momentum=self.momentum, manifold=g["manifold"])


class FusedBNPSGD:
    """``ops.bnp_sgd_`` (or its reference) on the PSI-grouped weights of a list, each given a
    bias (out,) and per-input-channel statistics: the update of BNPSGD without a model."""

    def __init__(self, shapes: ShapeList, params: list[torch.Tensor], lr: float, momentum: float,
                 fn: Callable):
        g = torch.Generator(device="cpu").manual_seed(1)
        self.fn, self.lr, self.momentum = fn, lr, momentum
        self.weights = [p for (_, _, m), p in zip(shapes, params) if m is not None and p.dim() >= 2]
        dev, dt = self.weights[0].device, self.weights[0].dtype
        self.biases = [torch.zeros(w.size(0), device=dev, dtype=dt) for w in self.weights]
        self.bias_grads = [torch.randn(w.size(0), generator=g).to(dev, dt) * 1e-3
                           for w in self.weights]
        sd = reference.opmath_dtype(dt)
        self.wbufs = [torch.zeros_like(w, dtype=sd) for w in self.weights]
        self.bbufs = [torch.zeros_like(b, dtype=sd) for b in self.biases]
        self.steps = [torch.zeros(()) for _ in self.weights]
        self.means = [torch.randn(w.size(1), generator=g).to(dev) * 0.1 for w in self.weights]
        self.sqmeans = [m * m + 1.0 for m in self.means]

    def numel(self) -> int:
        return sum(w.numel() + b.numel() for w, b in zip(self.weights, self.biases))

    def step(self) -> None:
        self.fn(self.weights, self.biases, [w.grad for w in self.weights], self.bias_grads,
                self.wbufs, self.bbufs, self.steps, self.means, self.sqmeans,
                groups=[1] * len(self.weights), eps=1e-5, lr=self.lr, momentum=self.momentum)


# Methods that fit the large list (shared params/grads + their own momentum; no list-wide
# temporaries) and the methods of the scaling sweep.
LARGE_METHODS = ("psi_cuda PSISGD (fused)", "psi_cuda PSISGD (reference, for-loop)",
                 "torch SGD (fused)", "torch SGD (foreach)")
SCALING_METHODS = ("psi_cuda PSISGD (fused)", "psi_cuda PSISGD (reference, foreach)",
                   "psi_cuda PSISGD (reference, for-loop)", "torch SGD (fused)")
FOREACH_MAX_VALUES = 130_000_000  # the foreach reference makes ~8 list-sized temporaries


def methods(shapes: ShapeList, params: list[torch.Tensor], device: str, lr: float = 0.01,
            momentum: float = 0.9) -> dict[str, Callable[[], Callable[[], object]]]:
    """name -> factory of a step function. All methods step the same ``params`` (their grads
    stay fixed); each factory builds its own optimizer state."""
    fused_sgd_ok = device.startswith("cuda") or device == "cpu"
    has_euclid_only = all(m is None for _, _, m in shapes)

    def psisgd(backend):
        return lambda: PSISGD(psi_groups(shapes, params), lr=lr, momentum=momentum,
                              backend=backend).step

    def psiadam(backend):
        return lambda: PSIAdam(psi_groups(shapes, params), lr=lr, backend=backend).step

    def geoopt_sgd():
        import geoopt

        def make():
            leaves = []
            for (_, _, manifold), p in zip(shapes, params):
                if manifold is not None:  # geoopt's Sphere acts on the last dim: one row per group
                    rows = p.size(0) if manifold == "channel" else 1
                    q = geoopt.ManifoldParameter(p.detach().reshape(rows, -1).clone(),
                                                 manifold=geoopt.Sphere())
                    q.grad = p.grad.reshape(q.shape).clone()
                    leaves.append(q)
                else:
                    leaves.append(p)
            return geoopt.optim.RiemannianSGD(leaves, lr=lr, momentum=momentum).step
        return make

    def adamp_sgdp():
        from adamp import SGDP
        return lambda: SGDP(params, lr=lr, momentum=momentum).step

    table = {
        "psi_cuda PSISGD (fused)": psisgd("fused"),
        "psi_cuda PSISGD (reference, foreach)":
            lambda: ForeachPSISGD(psi_groups(shapes, params), lr, momentum).step,
        "psi_cuda PSISGD (reference, for-loop)": psisgd("reference"),
        "torch SGD (fused)": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                     fused=True).step,
        "torch SGD (foreach)": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                       foreach=True).step,
        "torch SGD (for-loop)": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                        foreach=False).step,
        "geoopt RiemannianSGD": geoopt_sgd(),
        "adamp SGDP": adamp_sgdp(),
        "psi_cuda BNPSGD (fused op)":
            lambda: FusedBNPSGD(shapes, params, lr, momentum, ops.bnp_sgd_).step,
        "psi_cuda BNPSGD (reference, for-loop)":
            lambda: FusedBNPSGD(shapes, params, lr, momentum, reference.bnp_sgd_).step,
        "psi_cuda PSIAdam (fused)": psiadam("fused"),
        "psi_cuda PSIAdam (reference, for-loop)": psiadam("reference"),
        "torch AdamW (fused)": lambda: torch.optim.AdamW(params, lr=lr, fused=True).step,
        "torch AdamW (foreach)": lambda: torch.optim.AdamW(params, lr=lr, foreach=True).step,
        STREAM_LIMIT: lambda: stream_limit(sum(p.numel() for p in params), device),
    }
    if device != "cpu" or any(p.dtype != torch.float32 for p in params):
        table.pop(STREAM_LIMIT)
    if not fused_sgd_ok:
        for name in ("torch SGD (fused)", "torch AdamW (fused)"):
            table.pop(name)
    if has_euclid_only:
        for name in list(table):
            if "BNPSGD" in name:
                table.pop(name)
    return table


STREAM_LIMIT = "stream limit (read 3, write 2)"


def stream_limit(n: int, device: str) -> Callable[[], object]:
    """The yardstick of the CPU figures: ``psi_cuda_bench::stream_limit_``, a plain loop (built
    with the extension's flags and ISA dispatch, split over threads like the CPU kernels) with a
    momentum step's access pattern, m = 0.9 m + g, w -= 1e-3 m, on three fp32 streams of ``n``
    values: the bytes of a step over the list, without the optimizer's arithmetic. (torch's
    fused SGD runs above ``dst.copy_(src)``'s bandwidth, so a copy is not the limit.)"""
    w, g, m = (torch.randn(n, device=device) * 1e-2 for _ in range(3))
    return lambda: torch.ops.psi_cuda_bench.stream_limit_(w, g, m)


def step_bytes(n: int, dtype: torch.dtype) -> int:
    """Bytes one momentum step must move: read w, g, m and write w, m (m in fp32)."""
    elt = torch.finfo(dtype).bits // 8
    return n * (3 * elt + 2 * 4)


def summarize(ts: list[float], nbytes: int, bw: float) -> dict:
    med = statistics.median(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
    return {"median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "steps": len(ts), "bytes_per_step": nbytes, "gbs": nbytes / med / 1e9,
            "frac_copy_bw": nbytes / med / 1e9 / bw}


def selected(name: str, only: list[str] | None) -> bool:
    return not only or any(s.lower() in name.lower() for s in only)


def bench_model(model: str, args, dtype: torch.dtype, bw: float) -> dict:
    shapes = model_list(model, args.device, args.large_values)
    n = numel(shapes)
    nbytes = step_bytes(n, dtype)
    print(f"\n{model}: {len(shapes)} tensors, {n / 1e6:.2f}M parameters, "
          f"{nbytes / 1e9:.3f} GB moved per momentum step", flush=True)
    params = make_params(shapes, args.device, dtype)
    table = methods(shapes, params, args.device)
    if model == "large":
        table = {k: v for k, v in table.items() if k in LARGE_METHODS}
    steps_of = {}
    bytes_of = {}
    for name, make in table.items():
        if not selected(name, args.only):
            continue
        try:
            steps_of[name] = make()
        except ImportError as e:  # geoopt/adamp not installed
            print(f"  {name}: skipped ({e})")
            continue
        owner = getattr(steps_of[name], "__self__", None)
        bytes_of[name] = step_bytes(owner.numel(), dtype) if isinstance(owner, FusedBNPSGD) \
            else nbytes
    load = load_average()
    times = round_robin(steps_of, args.device, args.warmup, args.steps)
    del steps_of
    rows = {name: summarize(ts, bytes_of[name], bw) for name, ts in times.items()}
    limit = rows.get(STREAM_LIMIT)
    for name, r in rows.items():
        if limit:  # GB/s as a fraction of the loop with the same access pattern
            r["frac_stream_limit"] = r["gbs"] / limit["gbs"]
        print(f"  {name:40s} {r['median_ms']:9.2f} ms  [{r['q1_ms']:.2f}, {r['q3_ms']:.2f}]  "
              f"{r['gbs']:7.2f} GB/s  {100 * r['frac_copy_bw']:5.1f}% of copy"
              + (f"  {100 * r['frac_stream_limit']:5.1f}% of limit" if limit else ""),
              flush=True)
    out = {"tensors": len(shapes), "params": n, "bytes_per_step": nbytes,
           "load_average_before": load, "load_average_after": load_average(), "methods": rows,
           "ratios": ratios(rows)}
    for k, v in out["ratios"].items():
        print(f"  {k} = {v:.2f}")
    del params, table
    gc.collect()
    return out


def ratios(rows: dict) -> dict:
    """Headline ratios of the side-by-side times (only those whose methods ran)."""
    t = {k: v["median_ms"] for k, v in rows.items()}
    out = {}
    fused = t.get("psi_cuda PSISGD (fused)")
    if fused:
        if "torch SGD (fused)" in t:
            out["PSISGD fused / torch SGD fused"] = fused / t["torch SGD (fused)"]
        refs = [t[k] for k in t if k.startswith("psi_cuda PSISGD (reference")]
        if refs:
            out["best PSISGD reference / PSISGD fused"] = min(refs) / fused
        for peer in ("geoopt RiemannianSGD", "adamp SGDP"):
            if peer in t:
                out[f"{peer} / PSISGD fused"] = t[peer] / fused
    if "psi_cuda PSIAdam (fused)" in t and "torch AdamW (fused)" in t:
        out["PSIAdam fused / torch AdamW fused"] = t["psi_cuda PSIAdam (fused)"] / t["torch AdamW (fused)"]
    if STREAM_LIMIT in t:
        for name in ("psi_cuda PSISGD (fused)", "torch SGD (fused)"):
            if name in t:
                out[f"{name} / {STREAM_LIMIT}"] = t[name] / t[STREAM_LIMIT]
    if "psi_cuda BNPSGD (fused op)" in t and "psi_cuda BNPSGD (reference, for-loop)" in t:
        out["BNPSGD reference / BNPSGD fused"] = (t["psi_cuda BNPSGD (reference, for-loop)"]
                                                  / t["psi_cuda BNPSGD (fused op)"])
    return out


def bench_scaling(args, dtype: torch.dtype, bw: float, large_result: dict | None = None) -> dict:
    """Step time against list size, on prefixes of the large list. The whole large list's point
    is taken from ``large_result`` (the main table's run of it) when given."""
    full = model_list("large", args.device, args.large_values)
    top = numel(full)
    sizes = []
    s = args.scaling_start
    while s < top:
        sizes.append(s)
        s *= 4
    sizes.append(top)
    seen = set()
    points = []
    print("\nscaling (prefixes of the large list):", flush=True)
    for target in sizes:
        shapes = prefix(full, target)
        n = numel(shapes)
        if n in seen:  # a prefix that already reached the next size
            continue
        seen.add(n)
        if large_result is not None and n == large_result["params"]:
            rows = {k: v for k, v in large_result["methods"].items() if k in SCALING_METHODS}
            points.append({"params": n, "tensors": len(shapes), "steps": args.steps,
                           "from": "the large list of the main table", "methods": rows})
            print(f"  {n / 1e6:8.1f}M  (the large list above)", flush=True)
            continue
        params = make_params(shapes, args.device, dtype)
        table = methods(shapes, params, args.device)
        steps_of = {k: table[k]() for k in SCALING_METHODS
                    if k in table and selected(k, args.only)
                    and not ("foreach" in k and n > FOREACH_MAX_VALUES)}
        # fewer rounds for the slow references on big lists, at least 5
        rounds = max(5, min(args.scaling_steps, int(args.scaling_steps * 64e6 / max(n, 1)))) \
            if n > 64e6 else args.scaling_steps
        times = round_robin(steps_of, args.device, 1, rounds)
        del steps_of
        row = {"params": n, "tensors": len(shapes), "steps": rounds,
               "methods": {k: summarize(v, step_bytes(n, dtype), bw) for k, v in times.items()}}
        points.append(row)
        print(f"  {n / 1e6:8.1f}M  " + "  ".join(
            f"{k.replace('psi_cuda ', '')}: {v['median_ms']:.2f} ms"
            for k, v in row["methods"].items()), flush=True)
        del params, table
        gc.collect()
    return {"lists": "prefixes of the large list", "points": points}


# --- host time per tensor ---------------------------------------------------------------------

HOST_SHAPE = (4, 9)
HOST_SIZES = (100, 1000, 10_000)
HOST_METHODS = ("psi_cuda PSISGD (channel)", "psi_cuda PSISGD (euclidean)", "torch SGD (fused)",
                "psi_cuda PSIAdam (channel)", "psi_cuda PSIAdam (euclidean)",
                "torch AdamW (fused)")
# (method, its torch peer) of the ratios reported
HOST_RATIOS = (("psi_cuda PSISGD (channel)", "torch SGD (fused)"),
               ("psi_cuda PSISGD (euclidean)", "torch SGD (fused)"),
               ("psi_cuda PSIAdam (channel)", "torch AdamW (fused)"),
               ("psi_cuda PSIAdam (euclidean)", "torch AdamW (fused)"))


def host_methods(n: int, device: str, dtype: torch.dtype, lr: float = 0.01,
                 momentum: float = 0.9) -> dict[str, Callable[[], object]]:
    """name -> step function of the host-time section: each method steps its own list of ``n``
    tensors of shape HOST_SHAPE with their gradients set (the same values for every method)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    values = [torch.randn(HOST_SHAPE, generator=g) for _ in range(n)]
    grads = [torch.randn(HOST_SHAPE, generator=g) * 1e-3 for _ in range(n)]

    def params():
        ps = [v.to(device, dtype).requires_grad_(True) for v in values]
        for p, gr in zip(ps, grads):
            p.grad = gr.to(device, dtype)
        return ps

    fused = device.startswith("cuda") or device == "cpu"
    table = {
        "psi_cuda PSISGD (channel)": lambda: PSISGD(params(), lr=lr, momentum=momentum,
                                                    manifold="channel", backend="fused"),
        "psi_cuda PSISGD (euclidean)": lambda: PSISGD(params(), lr=lr, momentum=momentum,
                                                      manifold=None, backend="fused"),
        "torch SGD (fused)": lambda: torch.optim.SGD(params(), lr=lr, momentum=momentum,
                                                     fused=fused),
        "psi_cuda PSIAdam (channel)": lambda: PSIAdam(params(), lr=lr, manifold="channel",
                                                      backend="fused"),
        "psi_cuda PSIAdam (euclidean)": lambda: PSIAdam(params(), lr=lr, manifold=None,
                                                        backend="fused"),
        "torch AdamW (fused)": lambda: torch.optim.AdamW(params(), lr=lr, fused=fused),
    }
    return {name: make().step for name, make in table.items()}


def bench_host(args, dtype: torch.dtype) -> dict:
    """Per-tensor step time on lists of many small tensors (the host work of a step), with
    ``args.host_threads`` torch threads (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.host_threads)
    try:
        return _bench_host(args, dtype)
    finally:
        torch.set_num_threads(threads)


def _bench_host(args, dtype: torch.dtype) -> dict:
    print(f"\nhost time per tensor: N tensors of shape {HOST_SHAPE} with gradients set, "
          f"median of {args.host_steps} steps (after {args.warmup} warm-up steps), "
          f"{torch.get_num_threads()} thread(s), us per tensor:", flush=True)
    names = [n for n in HOST_METHODS if selected(n, args.only)]
    short = {n: n.replace("psi_cuda ", "") for n in names}
    print("  " + f"{'tensors':>8s}" + "".join(f"  {short[n]:>20s}" for n in names), flush=True)
    sizes = {}
    for n in args.host_tensors:
        steps_of = {k: v for k, v in host_methods(n, args.device, dtype).items() if k in names}
        load = load_average()
        times = round_robin(steps_of, args.device, args.warmup, args.host_steps)
        del steps_of
        rows = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
            rows[name] = {"median_us_per_tensor": med / n * 1e6,
                          "q1_us_per_tensor": q[0] / n * 1e6, "q3_us_per_tensor": q[2] / n * 1e6,
                          "median_ms_per_step": med * 1e3, "steps": len(ts)}
        ratios = {f"{a} / {b}": rows[a]["median_us_per_tensor"] / rows[b]["median_us_per_tensor"]
                  for a, b in HOST_RATIOS if a in rows and b in rows}
        sizes[str(n)] = {"tensors": n, "load_average_before": load,
                         "load_average_after": load_average(), "methods": rows, "ratios": ratios}
        print("  " + f"{n:8d}" + "".join(f"  {rows[k]['median_us_per_tensor']:20.2f}"
                                          for k in names), flush=True)
        gc.collect()
    return {"shape": list(HOST_SHAPE), "steps": args.host_steps, "warmup": args.warmup,
            "threads": torch.get_num_threads(), "sizes": sizes}


# --- output ---------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return None
    models = report["models"]
    has_scaling = bool(report.get("scaling"))
    ncols = len(models) + (1 if has_scaling else 0)
    fig, axes = plt.subplots(1, max(ncols, 1), figsize=(6.5 * max(ncols, 1), 5.5), squeeze=False)
    bw = report["copy_bandwidth_gbs"]
    for ax, (model, r) in zip(axes[0], models.items()):
        names = list(r["methods"])
        vals = [r["methods"][k]["gbs"] for k in names]
        colors = ["tab:red" if "psi_cuda" in k and "reference" not in k else
                  "tab:blue" if k.startswith("torch") else "tab:gray" for k in names]
        y = range(len(names))
        ax.barh(list(y), vals, color=colors)
        ax.set_yticks(list(y), [k.replace("psi_cuda ", "") for k in names], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(bw, color="k", ls="--", lw=1)
        ax.text(bw, len(names) - 0.5, " copy bw", fontsize=8, va="bottom")
        ax.set_xlabel("effective GB/s (momentum-step bytes / time)")
        ax.set_title(f"{model}: {r['params'] / 1e6:.0f}M params")
    if has_scaling:
        ax = axes[0][-1]
        pts = report["scaling"]["points"]
        names = sorted({k for p in pts for k in p["methods"]}, key=SCALING_METHODS.index)
        for k in names:
            xs = [p["params"] for p in pts if k in p["methods"]]
            ys = [p["methods"][k]["median_ms"] for p in pts if k in p["methods"]]
            ax.loglog(xs, ys, "o-", label=k.replace("psi_cuda ", ""))
        xs = [p["params"] for p in pts]
        floor = [step_bytes(x, getattr(torch, report["dtype"])) / bw / 1e9 * 1e3 for x in xs]
        ax.loglog(xs, floor, "k--", lw=1, label="bytes / copy bandwidth")
        ax.set_xlabel("parameters")
        ax.set_ylabel("ms per step")
        ax.set_title("scaling: step time vs list size")
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, "
                 f"{report['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="psi-cuda bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS) + ["tiny"],
                    help="parameter lists (default: resnet50 vit_b16 large; --quick: "
                    "resnet50 vit_b16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20, "
                    "--quick 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="substrings of method names to run")
    ap.add_argument("--large-values", type=int, default=None,
                    help="size of the large list (default: 500M on CPU, 1B on CUDA)")
    ap.add_argument("--scaling", dest="scaling", action="store_true", default=None,
                    help="run the scaling sweep (default: on, off with --quick)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false")
    ap.add_argument("--scaling-steps", type=int, default=10)
    ap.add_argument("--scaling-start", type=int, default=1_000_000,
                    help="smallest list of the sweep (values); sizes grow 4x up to the large list")
    ap.add_argument("--host", dest="host", action="store_true", default=True,
                    help="run the host-time section (default: on)")
    ap.add_argument("--no-host", dest="host", action="store_false")
    ap.add_argument("--host-only", action="store_true",
                    help="only the host-time section (no model lists, no copy bandwidth); the "
                    "default result file is then host_<device>.json")
    ap.add_argument("--host-tensors", type=int, nargs="+", default=None,
                    help="list sizes of the host-time section (default: 100 1000 10000; "
                    "--quick: 100 1000)")
    ap.add_argument("--host-steps", type=int, default=None,
                    help="timed steps per method and size in the host-time section (default "
                    "30, --quick 10)")
    # One thread: the host work is serial and 36 values per tensor are too few to split. With two
    # threads on this shared 2-core VM, torch's fused per-tensor CPU kernels waited on the thread
    # pool when another process kept a core busy (up to 8 ms a tensor instead of 5 us).
    ap.add_argument("--host-threads", type=int, default=1,
                    help="torch threads during the host-time section (default: 1)")
    ap.add_argument("--copy-mib", type=int, default=512,
                    help="buffer size of the copy-bandwidth measurement (MiB)")
    ap.add_argument("--quick", action="store_true",
                    help="about a minute: resnet50 and vit_b16, 5 steps, no large list/scaling")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results "
                    "of a source checkout, else ./bench_results)")
    ap.add_argument("--name", default=None, help="result file stem (default: step_<device>)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--readme", action="store_true",
                    help="rewrite README.md's table from the results (source checkout only)")
    return ap


def source_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() and (root / "README.md").is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    """The command line with the defaults that depend on --quick and --host-only filled in."""
    args = build_parser().parse_args(argv)
    if args.models is None:
        args.models = ["resnet50", "vit_b16"] if args.quick else list(MODELS)
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.scaling is None:
        args.scaling = not args.quick and "large" in args.models and not args.host_only
    if args.host_tensors is None:
        args.host_tensors = [100, 1000] if args.quick else list(HOST_SIZES)
    if args.host_steps is None:
        args.host_steps = 10 if args.quick else 30
    if args.host_only:
        args.host, args.models = True, []
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda")
                                          else "float32"))
    root = source_root()
    out = Path(args.out) if args.out else (root / "benchmarks" / "results" if root
                                           else Path("bench_results"))

    bw = copy_bandwidth(args.device, args.copy_mib << 20) if args.models else None
    mach = machine(args.device)
    print((f"copy bandwidth: {bw:.1f} GB/s  " if bw else "") +
          f"({mach.get('gpu') or mach['cpu']}, {torch.get_num_threads()} threads), "
          f"load average {load_average()}", flush=True)
    report = {"command": "psi-cuda bench " + " ".join(argv if argv is not None else
                                                      sys.argv[1:]),
              "machine": mach, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
              "steps": args.steps, "warmup": args.warmup, "copy_bandwidth_gbs": bw,
              "load_average_start": load_average(), "models": {}}
    t0 = time.time()
    if args.host:
        report["host"] = bench_host(args, dtype)
    for model in args.models:
        report["models"][model] = bench_model(model, args, dtype, bw)
    if args.scaling:
        report["scaling"] = bench_scaling(args, dtype, bw, report["models"].get("large"))
    if args.models:
        report["copy_bandwidth_end_gbs"] = copy_bandwidth(args.device, args.copy_mib << 20)
    report["wall_s"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("host_" if args.host_only else "step_") + args.device.split(":")[0]
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {path}  ({report['wall_s']:.0f} s)")
    if not args.no_plot and args.models:
        png = plot(report, out / f"{stem}.png")
        if png:
            print(f"saved {png}")
    if args.readme:
        if root is None:
            raise SystemExit("--readme needs a source checkout (README.md next to psi_cuda/)")
        bench_report.main(root)
    return report


if __name__ == "__main__":
    main()
