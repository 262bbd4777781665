"""Time one optimizer step on model-shaped parameter lists, all methods side by side in one run.

    python benchmarks/bench_step.py                      # ResNet-50 list, CPU
    python benchmarks/bench_step.py --models resnet50 vit_b16 --steps 20 --device cuda

For every method: the median (and quartiles) of --steps timed steps after --warmup steps, the
methods taking turns step by step (round-robin) so that noise on the machine hits all alike;
effective GB/s = bytes a momentum-SGD step must move (read w, g, m; write w, m) / time, and the
fraction of the machine's copy bandwidth measured in the same run (Adam methods also move their
second moments: per element for AdamW, one scalar per group for PSIAdam's channel groups, so
their GB/s column understates AdamW's traffic; compare Adam methods with each other by time). Results go to
benchmarks/results/<name>.json with the machine description.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shapes import MODELS, numel  # noqa: E402

from psi_cuda.optim import PSIAdam, PSISGD  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, device: str, warmup: int, steps: int) -> list[float]:
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


def make_params(shapes, device, dtype):
    g = torch.Generator().manual_seed(0)
    params = []
    for _, shape, _ in shapes:
        p = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        p.requires_grad_(True)
        p.grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype) * 1e-3
        params.append(p)
    return params


def psi_groups(shapes, params):
    by = {}
    for (_, _, manifold), p in zip(shapes, params):
        by.setdefault(manifold, []).append(p)
    return [{"params": ps, "manifold": m} for m, ps in by.items()]


def methods(shapes, device, dtype, lr=0.01, momentum=0.9):
    """name -> factory returning a step function; each factory builds fresh params."""
    def psisgd(backend):
        def make():
            params = make_params(shapes, device, dtype)
            return PSISGD(psi_groups(shapes, params), lr=lr, momentum=momentum,
                          backend=backend).step
        return make

    def psiadam(backend):
        def make():
            params = make_params(shapes, device, dtype)
            return PSIAdam(psi_groups(shapes, params), lr=lr, backend=backend).step
        return make

    def torch_adamw(**flags):
        def make():
            return torch.optim.AdamW(make_params(shapes, device, dtype), lr=lr, **flags).step
        return make

    def torch_sgd(**flags):
        def make():
            return torch.optim.SGD(make_params(shapes, device, dtype), lr=lr, momentum=momentum,
                                   **flags).step
        return make

    def geoopt_sgd():
        import geoopt

        def make():
            params = make_params(shapes, device, dtype)
            leaves = []
            for (_, _, manifold), p in zip(shapes, params):
                if manifold == "channel":  # geoopt's Sphere acts on the last dim: use 2-D rows
                    q = geoopt.ManifoldParameter(p.detach().reshape(p.size(0), -1).clone(),
                                                 manifold=geoopt.Sphere())
                    q.grad = p.grad.reshape(q.shape).clone()
                    leaves.append(q)
                else:
                    leaves.append(p)
            return geoopt.optim.RiemannianSGD(leaves, lr=lr, momentum=momentum).step
        return make

    def adamp_sgdp():
        from adamp import SGDP

        def make():
            return SGDP(make_params(shapes, device, dtype), lr=lr, momentum=momentum).step
        return make

    return {
        "psi_cuda PSISGD (fused)": psisgd("fused"),
        "psi_cuda PSISGD (reference, for-loop)": psisgd("reference"),
        "torch SGD (fused)": torch_sgd(fused=True),
        "torch SGD (foreach)": torch_sgd(foreach=True),
        "torch SGD (for-loop)": torch_sgd(foreach=False),
        "geoopt RiemannianSGD": geoopt_sgd(),
        "adamp SGDP": adamp_sgdp(),
        "psi_cuda PSIAdam (fused)": psiadam("fused"),
        "psi_cuda PSIAdam (reference, for-loop)": psiadam("reference"),
        "torch AdamW (fused)": torch_adamw(fused=True),
        "torch AdamW (foreach)": torch_adamw(foreach=True),
    }


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
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50"], choices=sorted(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="substrings of method names to run")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default=None, help="result file name (default: step_<device>)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    bw = copy_bandwidth(args.device)
    print(f"copy bandwidth: {bw:.1f} GB/s  ({machine(args.device)['cpu']}, "
          f"{torch.get_num_threads()} threads)")
    report = {"machine": machine(args.device), "device": args.device, "dtype": args.dtype,
              "steps": args.steps, "warmup": args.warmup, "copy_bandwidth_gbs": bw, "models": {}}
    for model in args.models:
        shapes = MODELS[model]()
        n = numel(shapes)
        # One momentum step must read w, g, m and write w, m (m in fp32 whatever the dtype).
        elt = torch.finfo(dtype).bits // 8
        nbytes = n * (3 * elt + 2 * 4)
        print(f"\n{model}: {len(shapes)} tensors, {n / 1e6:.2f}M parameters, "
              f"{nbytes / 1e9:.3f} GB moved per step")
        # All methods are built first and timed round-robin, one step each per round, so that
        # a slow spell of the machine hits every method alike.
        steps_of = {name: make() for name, make in methods(shapes, args.device, dtype).items()
                    if not args.only or any(s in name for s in args.only)}
        for step in steps_of.values():
            time_steps(step, args.device, args.warmup, 0)
        times = {name: [] for name in steps_of}
        for _ in range(args.steps):
            for name, step in steps_of.items():
                times[name] += time_steps(step, args.device, 0, 1)
        del steps_of
        rows = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
            rows[name] = {"median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
                          "gbs": nbytes / med / 1e9, "frac_copy_bw": nbytes / med / 1e9 / bw}
            print(f"  {name:40s} {med * 1e3:9.2f} ms  [{q[0] * 1e3:.2f}, {q[2] * 1e3:.2f}]  "
                  f"{nbytes / med / 1e9:7.2f} GB/s  {100 * nbytes / med / 1e9 / bw:5.1f}% of copy")
        for kind, floor_name in (("PSISGD", "torch SGD (fused)"),
                                 ("PSIAdam", "torch AdamW (fused)")):
            floor = rows.get(floor_name, {}).get("median_ms")
            fused = rows.get(f"psi_cuda {kind} (fused)", {}).get("median_ms")
            if floor and fused:
                print(f"  fused {kind} / {floor_name} = {fused / floor:.2f}x")
            if fused:
                for name, r in rows.items():
                    if "reference" in name and kind in name:
                        print(f"  {name} / fused {kind} = {r['median_ms'] / fused:.1f}x")
        report["models"][model] = {"tensors": len(shapes), "params": n, "bytes_per_step": nbytes,
                                   "methods": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or 'step_' + args.device.split(':')[0]}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {path}")
    return report


if __name__ == "__main__":
    main()
