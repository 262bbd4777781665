"""A small fused-vs-reference run of every psi_cuda op, for compute-sanitizer (gpu_check.sh).

    python scripts/gpu_sanitize_run.py                      # CUDA tensors (the default)
    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_run.py
    python scripts/gpu_sanitize_run.py --device cpu         # the same cases on the CPU kernels

Calls psi_cuda.ops.psi_sgd_, psi_adam_, bnp_update_stats_, bnp_precondition_ and bnp_sgd_ on
small cases that reach every kernel path (channel groups of 1, 3, 2048 = the longest group held
in registers, 2049 and 8193 = one block reading its group twice, 65537 = one more than one block
steps alone (chunked); tensor groups; Euclidean tensors; a list longer
than one launch's table; momentum/nesterov/dampening/exp+parallel/clipping; float32 and bfloat16;
found_inf absent, 0 and 1; statistics with inner == 1 and inner > 1, channels-last and longer
than a statistics chunk) and compares each result with psi_cuda.reference, computed on CPU
copies so that almost every CUDA kernel the sanitizer sees is a psi_cuda kernel (the rest are
copies). Tolerances are those of the tests (tests/helpers.py, tests/test_bnp_cuda.py).

Exit status: 0 all cases match, 1 a mismatch (each is printed), 2 no usable device or kernels.
Run it with the psi_cuda under test installed (not from the repository root, whose psi_cuda/
would shadow it; from scripts/ as here is fine).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from psi_cuda import ops, reference

F32, BF16 = torch.float32, torch.bfloat16
# Relative to the largest magnitude of the expected tensor (tests/helpers.py).
REL_TOL = {torch.float64: 1e-10, F32: 5e-5, BF16: 3e-2, torch.float16: 5e-3}
# (rtol, atol) of the statistics, state dtype float32 (tests/test_bnp_cuda.py).
STATS_TOL = (1e-5, 1e-6)


class Mismatch(AssertionError):
    pass


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_rel(actual, expected, dtype, what):
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.shape != e.shape:
        raise Mismatch(f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}")
    if e.numel() == 0:
        return
    if not torch.isfinite(a).all():
        raise Mismatch(f"{what}: non-finite values")
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    if err > REL_TOL[dtype] * max(scale, 1e-30):
        raise Mismatch(f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {REL_TOL[dtype]:g})")


def check_equal(actual, expected, what):
    if not torch.equal(actual.detach().cpu(), expected.detach().cpu()):
        raise Mismatch(f"{what}: changed although found_inf = 1")


def tangent_grad_like(p, manifold, gen):
    """A random gradient whose tangent part turns a group by about lr radians per step (as
    tests/helpers.py): steps of a realistic size, not dominated by rounding."""
    g = torch.randn(p.shape, dtype=torch.float64, generator=gen)
    if p.numel() == 0:
        return g.to(p.dtype)
    rows = p.size(0) if manifold == "channel" and p.dim() > 0 else 1
    w = p.double().reshape(rows, -1)
    n = w.norm(dim=1, keepdim=True).clamp_min(1e-3)
    return (g.reshape(rows, -1) / (n * w.shape[1] ** 0.5)).reshape(p.shape).to(p.dtype)


def to(device, tensors):
    """Copies on ``device`` with the same strides (channels-last stays channels-last)."""
    out = []
    for t in tensors:
        c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        c.copy_(t)
        out.append(c)
    return out


# --- psi_sgd_ / psi_adam_ ------------------------------------------------------------------------

# Channel groups: rows of 1 (frozen), 3, 2048 (registers), 2049 and 8193 (one block, read twice),
# 65537 (chunked), a conv weight (channels-last in one case) and a row of zeros.
CHANNEL_SHAPES = [(4, 1), (5, 3), (3, 2048), (2, 2049), (2, 8193), (1, 65537), (6, 4, 3, 3)]
# Tensor groups: one group per tensor, from a scalar to several chunks.
TENSOR_SHAPES = [(1, 1), (3,), (2048,), (7, 3, 3, 3), (3, 2049), (1, 8193), (5, 4000),
                 (2, 32769)]
EUCLIDEAN_SHAPES = [(1,), (7, 3), (2049,), (8193,), (3, 5, 2, 2), (0, 4)]
SHAPES = {"channel": CHANNEL_SHAPES, "tensor": TENSOR_SHAPES, None: EUCLIDEAN_SHAPES}

SGD_OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.01, maximize=True),
    dict(momentum=0.9, retraction="exp", transport="parallel", max_grad_norm=0.05),
]
ADAM_OPTIONS = [
    dict(),
    dict(beta1=0.8, beta2=0.99, eps=1e-3, retraction="exp", transport="parallel",
         max_grad_norm=0.05),
    dict(maximize=True, weight_decay=0.1, retraction="none"),
]


def psi_params(shapes, dtype, manifold, gen, channels_last=False):
    params, grads = [], []
    for s in shapes:
        p = torch.randn(s, dtype=torch.float64, generator=gen)
        if manifold == "channel" and p.dim() >= 2 and p.size(0) > 2:
            p[1] = 0  # a zero row must not move nor turn into NaN
        p = p.to(dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(p)
        grads.append(tangent_grad_like(p, manifold or "tensor", gen))
    return params, grads


def adam_second_moment(p, manifold):
    sdt = state_dtype(p.dtype)
    if manifold == "channel":
        return torch.zeros(p.size(0), dtype=sdt)
    if manifold == "tensor":
        return torch.zeros((), dtype=sdt)
    return torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)


def run_psi(op, device, dtype, manifold, opts, scaled, gen, shapes=None, steps=3):
    """``steps`` steps of ops.<op> on ``device`` and of reference.<op> on CPU copies."""
    shapes = shapes or SHAPES[manifold]
    params, grads = psi_params(shapes, dtype, manifold, gen, channels_last=scaled)
    sdt = state_dtype(dtype)
    if op == "psi_sgd_":
        mom = opts.get("momentum", 0.0) != 0
        states = [[torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
                   for p in params] if mom else []]
    else:
        states = [[torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
                   for p in params], [adam_second_moment(p, manifold) for p in params]]
    steps_t = [torch.zeros(()) for _ in params]
    ref = [[t.clone() for t in params]] + [[t.clone() for t in s] for s in states] + \
        [[t.clone() for t in steps_t]]
    fused = [to(device, params)] + [to(device, s) for s in states] + [to(device, steps_t)]
    kw = dict(lr=0.1 if op == "psi_sgd_" else 0.05, manifold=manifold, **opts)
    scale = 8.0
    for k in range(steps):
        g = grads if k == 0 else [tangent_grad_like(p, manifold or "tensor", gen) for p in params]
        if scaled:
            g = [(x.float() * scale).to(dtype) for x in g]
            extra_ref = dict(grad_scale=torch.tensor(scale), found_inf=torch.zeros(()))
            extra_dev = dict(grad_scale=torch.tensor(scale, device=device),
                             found_inf=torch.zeros((), device=device))
        else:
            extra_ref = extra_dev = {}
        getattr(ops, op)(fused[0], to(device, g), *fused[1:], **kw, **extra_dev)
        getattr(reference, op)(ref[0], [x.clone() for x in g], *ref[1:], **kw, **extra_ref)
    names = ["params"] + (["momentum_buffers"] if op == "psi_sgd_" else
                          ["exp_avgs", "exp_avg_sqs"])
    for name, a_list, e_list in zip(names, fused, ref):
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            check_rel(a, e, dtype, f"{name}[{i}] {tuple(e.shape)}")
            if name == "params" and a.stride() != params[i].stride():
                raise Mismatch(f"params[{i}]: strides {params[i].stride()} became {a.stride()}")
    for i, s in enumerate(fused[-1]):
        if s.item() != steps:
            raise Mismatch(f"state_steps[{i}] = {s.item()} after {steps} steps")


def run_psi_found_inf(op, device, dtype, manifold, gen):
    """found_inf = 1: nothing changes (step counters included), even with NaN gradients."""
    params, _ = psi_params(SHAPES[manifold], dtype, manifold, gen)
    sdt = state_dtype(dtype)
    bufs = [torch.randn(p.shape, generator=gen).to(sdt) for p in params]
    if op == "psi_sgd_":
        states = [bufs]
        kw = dict(lr=0.1, momentum=0.9)
    else:
        states = [bufs, [adam_second_moment(p, manifold) + 0.5 for p in params]]
        kw = dict(lr=0.05)
    steps_t = [torch.full((), 2.0) for _ in params]
    before = params + [t for s in states for t in s] + steps_t
    fused = [to(device, params)] + [to(device, s) for s in states] + [to(device, steps_t)]
    nan_grads = [torch.full(p.shape, float("nan"), dtype=dtype, device=device) for p in params]
    getattr(ops, op)(fused[0], nan_grads, *fused[1:], manifold=manifold,
                     grad_scale=torch.tensor(4.0, device=device),
                     found_inf=torch.ones((), device=device), **kw)
    after = [t for lst in fused for t in lst]
    for i, (a, b) in enumerate(zip(after, before)):
        check_equal(a, b, f"tensor {i}")


# --- BNP ------------------------------------------------------------------------------------------

# (input shape, channel_dim, channels_last): inner == 1 (rows of channels, many rows), inner > 1,
# channels-last, a 1-D input, channel_dim 0, and planes longer than a statistics chunk (16384);
# the columns kernel over many tiles and chunks (its two-level last-block finalize) and at inner
# 31, the planes kernel at inner 32 and over several chunks of several channels.
STATS_CASES = [((64, 7), -1, False), ((40000, 3), 1, False), ((5, 2049), 1, False),
               ((9,), 0, False), ((4, 3, 5, 5), 1, False), ((4, 3, 5, 5), 1, True),
               ((2, 5, 3, 4), 1, True), ((3, 7, 5), 0, False), ((2, 3, 20000), 1, False),
               ((0, 5), 1, False), ((20000, 200), 1, False), ((64, 40, 31), 1, False),
               ((64, 40, 32), 1, False), ((8, 6, 50000), 1, False)]

# (weight shape, groups): linear, wide linear (2049, 8193 inputs), conv, grouped, depthwise,
# 1x1, conv3d, empty.
LAYERS = [((7, 5), 1), ((3, 2049), 1), ((2, 8193), 1), ((8, 3, 3, 3), 1), ((6, 2, 3, 3), 2),
          ((12, 1, 3, 3), 12), ((4, 16, 1, 1), 1), ((3, 2, 2, 2, 2), 1), ((0, 3), 1)]
BNP_EPS = 1e-5
BNP_SGD_OPTIONS = [dict(momentum=0.0), dict(momentum=0.9),
                   dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                   dict(momentum=0.8, dampening=0.3, maximize=True)]


def run_stats(device, dtype, case, gen):
    shape, cd, channels_last = case
    x0 = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 0.5
    C = x0.shape[cd]
    ref = [torch.zeros(C), torch.ones(C), torch.zeros(())]
    fused = to(device, ref)
    for i in range(3):  # the first update (a = 1) and two blended ones
        x = (x0 * (1 + 0.1 * i)).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                             else torch.channels_last_3d)
        ops.bnp_update_stats_(to(device, [x])[0], *fused, channel_dim=cd, momentum=0.2)
        reference.bnp_update_stats_(x, *ref, channel_dim=cd, momentum=0.2)
    rtol, atol = STATS_TOL
    for name, a, e in zip(("mean", "sqmean", "step"), fused, ref):
        try:
            torch.testing.assert_close(a.cpu(), e, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise Mismatch(f"{name}: {err}") from None


def bnp_layers(dtype, gen, bias, channels_last=False, max_fan_in=None):
    weights, biases, grads, bgrads, means, sqs, groups = [], [], [], [], [], [], []
    for shape, g in LAYERS:
        if max_fan_in is not None and shape[1] > max_fan_in:
            continue
        w = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
        gw = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
        if channels_last and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
            gw = gw.contiguous(memory_format=torch.channels_last)
        weights.append(w)
        grads.append(gw)
        biases.append(torch.randn(shape[0], dtype=torch.float64, generator=gen).to(dtype))
        bgrads.append(torch.randn(shape[0], dtype=torch.float64, generator=gen).to(dtype))
        cin = shape[1] * g
        mu = torch.randn(cin, dtype=torch.float64, generator=gen)
        means.append(mu.to(state_dtype(dtype)))
        sqs.append((mu * mu + torch.rand(cin, dtype=torch.float64, generator=gen) + 0.1)
                   .to(state_dtype(dtype)))
        groups.append(g)
    if not bias:
        biases, bgrads = [], []
    return weights, biases, grads, bgrads, means, sqs, groups


def run_precondition(device, dtype, bias, channels_last, gen):
    _, _, grads, bgrads, means, sqs, groups = bnp_layers(dtype, gen, bias, channels_last)
    fused = (to(device, grads), to(device, bgrads))
    ref = ([g.clone() for g in grads], [g.clone() for g in bgrads])
    ops.bnp_precondition_(*fused, to(device, means), to(device, sqs), groups=groups, eps=BNP_EPS)
    reference.bnp_precondition_(*ref, means, sqs, groups=groups, eps=BNP_EPS)
    for i, (a, e) in enumerate(zip(fused[0] + fused[1], ref[0] + ref[1])):
        check_rel(a, e, dtype, f"grad {i} {tuple(e.shape)}")
        if a.stride() != (grads + bgrads)[i].stride():
            raise Mismatch(f"grad {i}: strides changed")


def run_bnp_sgd(device, dtype, bias, opts, scaled, gen, steps=3):
    # bfloat16: no 8193-wide layer. Its bias step is a difference of large sums over bf16
    # gradients, whose rounding exceeds the bf16 tolerance relative to the bias (on the CPU
    # kernels too); float32 covers that layer.
    weights, biases, grads, bgrads, means, sqs, groups = bnp_layers(
        dtype, gen, bias, channels_last=True, max_fan_in=4096 if dtype == BF16 else None)
    sdt = state_dtype(dtype)
    mom = opts["momentum"] != 0
    wbufs = [torch.zeros_like(w, dtype=sdt) for w in weights] if mom else []
    bbufs = [torch.zeros_like(b, dtype=sdt) for b in biases] if mom else []
    # Mixed first and later steps: each layer picks its update from its own counter.
    steps_t = [torch.tensor(float(i % 2)) for i in range(len(weights))]
    ref = [[t.clone() for t in lst] for lst in (weights, biases, wbufs, bbufs, steps_t)]
    fused = [to(device, lst) for lst in (weights, biases, wbufs, bbufs, steps_t)]
    kw = dict(groups=groups, eps=BNP_EPS, lr=0.05, **opts)
    dev_means, dev_sqs = to(device, means), to(device, sqs)
    scale = 4.0
    for k in range(steps):
        g = [(x.float() * (1 + k) * (scale if scaled else 1)).to(dtype) for x in grads]
        gb = [(x.float() * (1 - k) * (scale if scaled else 1)).to(dtype) for x in bgrads]
        if scaled:
            extra_ref = dict(grad_scale=torch.tensor(scale), found_inf=torch.zeros(()))
            extra_dev = dict(grad_scale=torch.tensor(scale, device=device),
                             found_inf=torch.zeros((), device=device))
        else:
            extra_ref = extra_dev = {}
        ops.bnp_sgd_(fused[0], fused[1], to(device, g), to(device, gb), fused[2], fused[3],
                     fused[4], dev_means, dev_sqs, **kw, **extra_dev)
        reference.bnp_sgd_(ref[0], ref[1], g, gb, ref[2], ref[3], ref[4], means, sqs, **kw,
                           **extra_ref)
    for name, a_list, e_list in zip(("weights", "biases", "weight_bufs", "bias_bufs", "steps"),
                                    fused, ref):
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            # The tests' tolerance: the parameter dtype's, for the buffers too (their inputs
            # are the bf16 gradients); the step counters exactly.
            check_rel(a, e, dtype if name != "steps" else torch.float64,
                      f"{name}[{i}] {tuple(e.shape)}")


def run_bnp_sgd_found_inf(device, gen):
    weights, biases, grads, bgrads, means, sqs, groups = bnp_layers(F32, gen, True)
    wbufs = [torch.randn(w.shape, generator=gen) for w in weights]
    bbufs = [torch.randn(b.shape, generator=gen) for b in biases]
    steps_t = [torch.full((), 3.0) for _ in weights]
    before = weights + biases + wbufs + bbufs + steps_t
    fused = [to(device, lst) for lst in (weights, biases, wbufs, bbufs, steps_t)]
    nan = [torch.full(g.shape, float("nan"), device=device) for g in grads]
    nanb = [torch.full(g.shape, float("nan"), device=device) for g in bgrads]
    ops.bnp_sgd_(fused[0], fused[1], nan, nanb, fused[2], fused[3], fused[4],
                 to(device, means), to(device, sqs), groups=groups, eps=BNP_EPS, lr=0.1,
                 momentum=0.9, grad_scale=torch.tensor(2.0, device=device),
                 found_inf=torch.ones((), device=device))
    for i, (a, b) in enumerate(zip([t for lst in fused for t in lst], before)):
        check_equal(a, b, f"tensor {i}")


# --- driver ---------------------------------------------------------------------------------------


def cases(device):
    """(name, thunk) of every case; each thunk gets a seeded CPU generator."""
    out = []
    for op, options in (("psi_sgd_", SGD_OPTIONS), ("psi_adam_", ADAM_OPTIONS)):
        for dtype in (F32, BF16):
            for manifold in ("channel", "tensor", None):
                for j, opts in enumerate(options):
                    scaled = j % 2 == 1  # grad_scale + found_inf = 0 (and channels-last)
                    label = ",".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
                    out.append((f"{op} {str(dtype)[6:]} {manifold} {label}"
                                f"{' scaled' if scaled else ''}",
                                lambda g, op=op, dtype=dtype, manifold=manifold, opts=opts,
                                scaled=scaled: run_psi(op, device, dtype, manifold, opts,
                                                       scaled, g)))
                out.append((f"{op} {str(dtype)[6:]} {manifold} found_inf=1",
                            lambda g, op=op, dtype=dtype, manifold=manifold:
                            run_psi_found_inf(op, device, dtype, manifold, g)))
        # More tensors than one launch's table holds (several launches, channel and tensor).
        many = [(3, 5)] * 40 + [(2, 2049)] * 3 + [(4, 3)] * 40
        for manifold in ("channel", "tensor"):
            opts = dict(momentum=0.9) if op == "psi_sgd_" else {}
            out.append((f"{op} float32 {manifold} 83 tensors",
                        lambda g, op=op, manifold=manifold, opts=opts:
                        run_psi(op, device, F32, manifold, opts, False, g, shapes=many)))
    for dtype in (F32, BF16):
        for case in STATS_CASES:
            out.append((f"bnp_update_stats_ {str(dtype)[6:]} {case}",
                        lambda g, dtype=dtype, case=case: run_stats(device, dtype, case, g)))
        for bias in (True, False):
            for cl in (False, True):
                out.append((f"bnp_precondition_ {str(dtype)[6:]} bias={bias} channels_last={cl}",
                            lambda g, dtype=dtype, bias=bias, cl=cl:
                            run_precondition(device, dtype, bias, cl, g)))
            for j, opts in enumerate(BNP_SGD_OPTIONS):
                scaled = j % 2 == 1
                label = ",".join(f"{k}={v}" for k, v in opts.items())
                out.append((f"bnp_sgd_ {str(dtype)[6:]} bias={bias} {label}"
                            f"{' scaled' if scaled else ''}",
                            lambda g, dtype=dtype, bias=bias, opts=opts, scaled=scaled:
                            run_bnp_sgd(device, dtype, bias, opts, scaled, g)))
    out.append(("bnp_sgd_ float32 found_inf=1", lambda g: run_bnp_sgd_found_inf(device, g)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="device of the fused ops (default: cuda)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only the cases whose name contains one of these substrings")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    todo = cases(device)
    if args.only:
        todo = [(n, f) for n, f in todo if any(s in n for s in args.only)]
    if args.list:
        print("\n".join(n for n, _ in todo))
        return 0
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("FAILED: gpu_sanitize_run: no GPU visible to torch", file=sys.stderr)
            return 2
        if not ops.has_cuda_kernels():
            print("FAILED: gpu_sanitize_run: this psi_cuda build has no CUDA kernels "
                  "(rebuild with PSI_CUDA_BUILD_CUDA=1)", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"psi_cuda from {ops.__file__}", flush=True)
    t0 = time.perf_counter()
    failed = []
    for i, (name, run) in enumerate(todo):
        gen = torch.Generator().manual_seed(1000 + i)
        try:
            run(gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel fault surfaces here, in this case
        except Exception as e:  # noqa: BLE001 (report every case, then fail)
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            if not isinstance(e, Mismatch):
                traceback.print_exc()
            if device.type == "cuda" and "CUDA error" in str(e):
                break  # the context is unusable after a device-side fault
        else:
            print(f"ok   {name}", flush=True)
    seconds = time.perf_counter() - t0
    print(f"\n{len(todo) - len(failed)}/{len(todo)} cases match the reference on {device} "
          f"({seconds:.1f} s)" + (f"; FAILED: {len(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
