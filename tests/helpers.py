"""Small shared helpers of the tests."""
import torch

# Tolerances of fused-vs-reference comparisons (relative to the largest magnitude of the tensor).
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close_rel(actual, expected, dtype, what=""):
    """|actual - expected| <= tol * max|expected| (the scale that matters for a step)."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-30), f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def tangent_grad_like(p, manifold, scale=1.0):
    """A random gradient whose scale-free tangent part |q| = |w| |h| is about `scale` per group,
    so a step of lr turns a group by about lr radians (steps of a realistic size)."""
    g = torch.randn(p.shape, dtype=torch.float64, device=p.device)
    if p.numel() == 0:
        return g.to(p.dtype)
    rows = p.size(0) if manifold == "channel" and p.dim() > 0 else 1
    w = p.double().reshape(rows, -1)
    n = w.norm(dim=1, keepdim=True).clamp_min(1e-3)
    g = scale * g.reshape(rows, -1) / (n * w.shape[1] ** 0.5)
    return g.reshape(p.shape).to(p.dtype)
