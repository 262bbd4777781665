"""The step of a PSI group written in closed form from the Gram matrix of (w, g, m): the math of
``csrc/include/psi/math.h`` and ``adam.h`` vectorized over many groups, in float64
(docs/ALGORITHMS.md section 8). The reference backend's path for groups cut across ranks
(``distributed.sharded_group_step``; the fused backend uses ``ops.psi_grams`` and the ops'
``grams=``): each rank sums its part's Gram entries, one all-reduce adds them up, and every rank
solves the same update.

A combo (c_w, c_g, c_m) is a vector of a group written c_w w + c_g g + c_m m; entries are float64
tensors of shape (k,), one per group, or Python floats.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

GRAM_KEYS = ("ww", "wg", "wm", "gg", "gm", "mm")


def dot(a, b, G):
    return (a[0] * (b[0] * G["ww"] + b[1] * G["wg"] + b[2] * G["wm"])
            + a[1] * (b[0] * G["wg"] + b[1] * G["gg"] + b[2] * G["gm"])
            + a[2] * (b[0] * G["wm"] + b[1] * G["gm"] + b[2] * G["mm"]))


def norm(a, G):
    s = dot(a, a, G)
    return torch.where(s > 0, s.clamp_min(0).sqrt(), torch.zeros_like(s))


def add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def scale(s, a):
    return tuple(s * x for x in a)


def move_on_sphere(G, n, d, buf, *, lr, retraction, transport):
    """math.h move_on_sphere: returns (param combo, buf combo or None, ok)."""
    u = (1.0 / n, 0.0, 0.0)
    if retraction == "none":
        param = add((1.0, 0.0, 0.0), scale(-lr * n, d))
        r = norm(param, G)
        ok = r > 0
        u_new = scale(1.0 / r, param)
        geodesic = torch.zeros_like(ok)
    else:
        v = add(u, scale(-lr, d))
        r = norm(v, G)
        u_new = scale(1.0 / r, v)
        ok = r > 0
        geodesic = torch.zeros_like(ok)
        if retraction == "exp":
            d_norm = norm(d, G)
            t = lr * d_norm
            geodesic = t >= reference.EXP_MIN_ANGLE
            u_exp = add(scale(torch.cos(t), u), scale(-torch.sin(t) / d_norm, d))
            u_new = tuple(torch.where(geodesic, a, b) for a, b in zip(u_exp, u_new))
            ok = ok | geodesic
        param = scale(n, u_new)
    if buf is None:
        return param, None, ok
    new_buf = add(buf, scale(-dot(buf, u_new, G), u_new))
    if retraction == "exp" and transport == "parallel":
        e = scale(-1.0 / d_norm, d)
        par = add(buf, scale(-dot(buf, e, G),
                               add(scale(torch.sin(t), u), scale(1.0 - torch.cos(t), e))))
        new_buf = tuple(torch.where(geodesic, a, b) for a, b in zip(par, new_buf))
    return param, new_buf, ok


def tangent(G, n, max_grad_norm):
    q = (-G["wg"] / n, n, torch.zeros_like(n))
    if max_grad_norm:
        qn = norm(q, G)
        q = scale(torch.where(qn > max_grad_norm, max_grad_norm / qn, torch.ones_like(qn)), q)
    return q


def keep(combo, unchanged, skip):
    """The combination, or ``unchanged`` (w, or m) for the skipped groups."""
    return tuple(torch.where(skip, torch.as_tensor(u, dtype=x.dtype, device=x.device), x)
                 for x, u in zip(combo, unchanged))


GRAM_BLOCK = 1024  # like the kernels (group_loops.h kFlush): opmath sums per block, then double


def gram_local(ws: list[Tensor]) -> Tensor:
    """The 6 Gram entries (GRAM_KEYS order) of this rank's shard of (w, g[, m]) (opmath
    tensors): products summed in opmath over blocks of 1024 elements (one batched matmul), the
    block sums added in float64, as the fused kernels do."""
    flat = [t.reshape(-1) for t in ws]
    n = flat[0].numel()
    nb = n // GRAM_BLOCK
    k = len(flat)
    M = torch.zeros((k, k), dtype=torch.float64, device=flat[0].device)
    if nb:
        X = torch.stack([t[:nb * GRAM_BLOCK].view(nb, GRAM_BLOCK) for t in flat], dim=1)
        M += torch.bmm(X, X.transpose(1, 2)).sum(0, dtype=torch.float64)
    if n > nb * GRAM_BLOCK:
        T = torch.stack([t[nb * GRAM_BLOCK:] for t in flat]).to(torch.float64)
        M += T @ T.T
    if k == 2:  # no buffer: its entries are 0
        return torch.stack([M[0, 0], M[0, 1], M.new_zeros(()), M[1, 1], M.new_zeros(()),
                            M.new_zeros(())])
    return torch.stack([M[0, 0], M[0, 1], M[0, 2], M[1, 1], M[1, 2], M[2, 2]])


