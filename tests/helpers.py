"""What the tests share, written once: devices, tolerances, the fused-vs-reference harness of the
ops, the small models, and the optimizer cases the contract tests (tests/test_contract.py) run
for every optimizer."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from psi_cuda.optim import BNPSGD, PSIAdam, PSISGD

HAS_CUDA = torch.cuda.is_available()

# CPU always; CUDA when a GPU is present (skipped, not failed, without one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))]

# --- tolerances --------------------------------------------------------------------------------

# Tolerances of fused-vs-reference comparisons (relative to the largest magnitude of the tensor).
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close_rel(actual, expected, dtype, what=""):
    """|actual - expected| <= tol * max|expected| (the scale that matters for a step)."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-30), \
        f"{what}: max error {err:.3e} vs scale {scale:.3e}"


# --- the fused-vs-reference harness of psi_sgd_ / psi_adam_ -------------------------------------

# Shapes that exercise every path: odd sizes, vector tails, rows of length 1, long rows that are
# reduced in parallel chunks (> 65536), a tensor with size 0, a 1-D tensor and a scalar.
SHAPES = [(7, 3, 3, 3), (5, 1), (3, 17), (2, 70001), (64, 129), (0, 4), (33,), (1, 1)]


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


def make_case(shapes, dtype, device, manifold, state: Callable, zero_rows=False,
              channels_last=False) -> list[list]:
    """The lists (params, grads, *state lists, steps) of an op call: random params (row 1 zero
    with ``zero_rows``, 4-D ones channels-last with ``channels_last``), gradients from
    ``tangent_grad_like`` and ``state(p)``: the state tensors of ``p``, one per state list (None
    for a list the call leaves empty)."""
    params, grads, steps, states = [], [], [], []
    for s in shapes:
        p = torch.randn(s, dtype=torch.float64)
        if zero_rows and p.dim() >= 1 and p.size(0) > 1:
            p[1] = 0
        p = p.to(device=device, dtype=dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(p)
        grads.append(tangent_grad_like(p, manifold or "tensor"))
        states.append(state(p))
        steps.append(torch.zeros((), device=device))
    n_state = len(states[0]) if states else 0
    # A None state (e.g. no momentum buffer) leaves its list empty, as the ops want.
    return [params, grads, *([s[i] for s in states if s[i] is not None]
                             for i in range(n_state)), steps]


def zeros_like_state(p):
    """A zero state tensor shaped and laid out like ``p`` in its opmath dtype."""
    return torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)


def clone_all(*lists):
    return [[t.clone() for t in lst] for lst in lists]


def run_both(fused_op, reference_op, case, steps=3, new_grads=False, **kw):
    """``steps`` calls of the fused op and of the reference on copies of ``case``; with
    ``new_grads`` fresh gradients (the same for both) from the second call on."""
    fused = clone_all(*case)
    ref = clone_all(*case)
    manifold = kw.get("manifold")
    for k in range(steps):
        if new_grads and k > 0:
            grads = [tangent_grad_like(p, manifold or "tensor") for p in fused[0]]
            fused[1], ref[1] = grads, [g.clone() for g in grads]
        fused_op(*fused, **kw)
        reference_op(*ref, **kw)
    return fused, ref


def step_side_by_side(opt, params, twin_opt, twin_params, steps=8):
    """``steps`` steps of two optimizers over twin parameter lists, with the same random
    gradients (for comparisons with torch.optim)."""
    for _ in range(steps):
        for p, q in zip(params, twin_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        twin_opt.step()


def assert_norms_kept_and_tangent(params, bufs, norms0, manifold):
    """Every group kept its norm (``norms0``), and its buffer is tangent (no radial part) and
    not all zero (docs/ALGORITHMS.md 7.2)."""
    for p, m, n0 in zip(params, bufs, norms0):
        rows = p.size(0) if manifold == "channel" else 1
        w, mm = p.reshape(rows, -1), m.reshape(rows, -1)
        torch.testing.assert_close(w.norm(dim=1), n0, rtol=1e-12, atol=0)
        u = w / w.norm(dim=1, keepdim=True)
        radial = (mm * u).sum(dim=1).abs()
        assert (radial <= 1e-12 * mm.norm(dim=1).clamp_min(1e-300)).all()
        assert mm.abs().max() > 0


def group_norms(params, manifold):
    return [p.reshape(p.size(0) if manifold == "channel" else 1, -1).norm(dim=1) for p in params]


# --- small models ------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Conv -> BN twice, then a classifier: the conv weights are channel groups. BN's eps is
    tiny so the invariance L(c w) = L(w) holds to float64 rounding, not just to eps/var."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, bias=False)
        self.b1 = nn.BatchNorm2d(8, eps=1e-12)
        self.c2 = nn.Conv2d(8, 12, 3, bias=False)
        self.b2 = nn.BatchNorm2d(12, eps=1e-12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def conv_groups(model, psi):
    """ConvBN's groups by hand: the conv weights channel groups (Euclidean if not ``psi``)."""
    conv = [model.c1.weight, model.c2.weight]
    rest = [p for n, p in model.named_parameters() if n not in ("c1.weight", "c2.weight")]
    return [{"params": conv, "manifold": "channel" if psi else None},
            {"params": rest, "manifold": None}]


def rescaled_copy(model):
    """The same network with every conv output channel multiplied by a random c in [0.1, 10]."""
    twin = copy.deepcopy(model)
    factors = {}
    with torch.no_grad():
        for name in ("c1", "c2"):
            w = getattr(twin, name).weight
            c = torch.exp(torch.empty(w.size(0), dtype=w.dtype).uniform_(-2.3, 2.3))
            w.mul_(c.view(-1, 1, 1, 1))
            factors[name] = c
    return twin, factors


def train(model, opt, batches, steps):
    """``steps`` closure-free steps of cross-entropy on ``batches`` (cycled); the losses."""
    losses = []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def rescaling_gaps(make, steps=100, seed=0):
    """Trains a float64 ConvBN from w0 and from its copy with every conv channel rescaled by a
    random c in [0.1, 10] (``rescaled_copy``), each with ``make(model)``. Returns the largest
    relative gap between the rescaled run's conv weights divided by c and the other's, the
    largest loss gap, and the losses: both gaps are ~0 for an optimizer equivariant under the
    rescaling (docs/ALGORITHMS.md 7.1)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        model = ConvBN()
        data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(4)]
        a = copy.deepcopy(model)
        b, factors = rescaled_copy(model)
        la = train(a, make(a), data, steps)
        lb = train(b, make(b), data, steps)
        gap = max(((getattr(b, n).weight / factors[n].view(-1, 1, 1, 1)
                    - getattr(a, n).weight).abs().max() / getattr(a, n).weight.abs().max())
                  .item() for n in ("c1", "c2"))
        return gap, max(abs(x - y) for x, y in zip(la, lb)), la
    finally:
        torch.set_default_dtype(default)


def bnp_cnn(bias=True):
    """A BatchNorm-free CNN (a grouped conv, a LayerNorm head) for BNP."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5), nn.LayerNorm(5))


# --- the optimizers of the contract tests -------------------------------------------------------


@dataclass(frozen=True)
class OptimizerCase:
    """How the contract tests build one optimizer: ``model()`` (float32), ``make(model)``, the
    state keys each parameter must have after a step, and the parameter a test poisons."""
    model: Callable[[], nn.Module]
    make: Callable[[nn.Module], torch.optim.Optimizer]
    state_keys: tuple[str, ...]
    poison: Callable[[nn.Module], torch.Tensor]


def _psi_adam_three_manifolds(m, **kw):
    return PSIAdam([{"params": [m.c1.weight], "manifold": "channel"},
                    {"params": [m.c2.weight], "manifold": "tensor"},
                    {"params": [p for n, p in m.named_parameters()
                                if n not in ("c1.weight", "c2.weight")], "manifold": None}],
                   lr=0.02, retraction="exp", **kw)


OPTIMIZERS = {
    # PSISGD from the model: param_groups finds the conv weights (channel groups).
    "PSISGD": OptimizerCase(ConvBN, lambda m: PSISGD(m, lr=0.1, momentum=0.9, nesterov=True),
                            ("step", "momentum_buffer"), lambda m: m.c2.weight),
    # PSIAdam with a channel, a tensor and a Euclidean group (three kinds of second moment).
    "PSIAdam": OptimizerCase(ConvBN, _psi_adam_three_manifolds,
                             ("step", "exp_avg", "exp_avg_sq"), lambda m: m.c2.weight),
    "BNPSGD": OptimizerCase(bnp_cnn, lambda m: BNPSGD(m, lr=0.05, momentum=0.9),
                            ("momentum_buffer",), lambda m: m[0].weight),
}


def batches(n=3, dtype=torch.float32, seed=0):
    """``n`` (input, label) batches for the models above (3 x 8 x 8 images, 5 classes)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g).to(dtype),
             torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


__all__ = ["ConvBN", "DEVICES", "HAS_CUDA", "OptimizerCase", "OPTIMIZERS", "SHAPES", "TOL",
           "assert_close_rel", "assert_norms_kept_and_tangent", "batches", "bnp_cnn", "clone_all",
           "conv_groups", "group_norms", "make_case", "rescaled_copy", "rescaling_gaps",
           "run_both", "state_dtype", "step_side_by_side", "tangent_grad_like", "train",
           "zeros_like_state"]
