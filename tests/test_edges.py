"""Numerics at the edges and the non-finite policy (docs/ALGORITHMS.md 6.6, 6.7).

Oracles: scale invariance (a group of scale s with the gradient a scale-invariant loss gives it,
about 1/s, must step like its unit-scale copy, and keep its norm), the same op in float64 (for
finite gradients too large for float sums) and torch.optim.SGD / AdamW for Euclidean tensors.
"""
import pytest
import torch

import psi_cuda
from psi_cuda import ops, reference
from helpers import DEVICES, zeros_like_state

BACKENDS = {"fused": ops, "reference": reference}
OPS = ["psi_sgd_", "psi_adam_"]
# Powers of two, so that s * w is exact: the ideal result is exactly s times the unit one.
SCALES = {"1e-25": 2.0 ** -83, "1e-20": 2.0 ** -66, "1e20": 2.0 ** 66, "3e30": 2.0 ** 101}


def unit_rows(rows, cols, dtype, device, seed=0):
    """w and a gradient with entries of magnitude in [0.5, 1] (normal numbers at every scale
    used below, also in float16), random signs."""
    gen = torch.Generator().manual_seed(seed)

    def draw():
        mag = 0.5 + 0.5 * torch.rand(rows, cols, generator=gen, dtype=torch.float64)
        sign = torch.randint(0, 2, (rows, cols), generator=gen).to(torch.float64) * 2 - 1
        return (mag * sign).to(dtype).to(device)
    return draw(), draw()


def state_for(op, w, manifold):
    steps = [torch.zeros((), dtype=torch.float32, device=w.device)]
    if op == "psi_sgd_":
        return [[zeros_like_state(w)], steps]
    v = torch.zeros(w.size(0) if manifold == "channel" else (), dtype=torch.float32
                    if w.dtype != torch.float64 else torch.float64, device=w.device)
    return [[zeros_like_state(w)], [v], steps]


def kw_for(op, manifold, retraction="normalize"):
    kw = dict(lr=0.1, manifold=manifold, retraction=retraction)
    if op == "psi_sgd_":
        kw["momentum"] = 0.9
    return kw


def steps_of(mod, op, w, g, manifold, n=3, retraction="normalize"):
    """n steps with the same gradient; returns (w, first state tensor)."""
    w = w.clone()
    state = state_for(op, w, manifold)
    for _ in range(n):
        getattr(mod, op)([w], [g.clone()], *state, **kw_for(op, manifold, retraction))
    return w, state[0][0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("retraction", ["normalize", "exp", "none"])
@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("op", OPS)
def test_step_is_scale_invariant_at_the_edges(op, backend, manifold, dtype, scale, retraction,
                                              device):
    """A group at 1e-25 .. 3e30 (fp32, bf16) steps like its unit-scale copy (stepped in float64):
    w' / s equals the unit w' and the buffer (scale free) equals the unit buffer, to the dtype's
    precision; the norm is kept. Before the fix such groups did not move (or became zero/NaN)."""
    s = SCALES[scale]
    if backend == "reference" and retraction != "normalize":
        pytest.skip("the reference's range fix is the float64 norm; one retraction suffices")
    w0, g0 = unit_rows(6, 70, dtype, device)
    if manifold == "tensor":
        w0, g0 = w0.reshape(-1), g0.reshape(-1)
    mod = BACKENDS[backend]
    # the unit-scale copy, stepped in float64 (the float32 unit step itself carries rounding
    # that momentum and "exp" amplify: up to 5e-4 after 3 steps of a 420-element tensor group)
    # bfloat16 rounds w after every step; over 3 steps one flipped rounding grows past 2e-2
    n = 3 if dtype == torch.float32 else 1
    unit_w, unit_m = steps_of(mod, op, w0.double(), g0.double(), manifold, n=n,
                              retraction=retraction)
    w, m = steps_of(mod, op, w0 * s, g0 / s, manifold, n=n, retraction=retraction)
    assert torch.isfinite(w).all() and torch.isfinite(m).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    # the step moved the group (a frozen group would fail this) ...
    assert (unit_w - w0.double()).abs().max() > 0.05
    # ... exactly as at unit scale
    # (to the largest entry: "none" lets the norm grow, so entries differ in size)
    torch.testing.assert_close(w.double() / s, unit_w, rtol=tol,
                               atol=tol * unit_w.abs().max().item())
    torch.testing.assert_close(m.double(), unit_m, rtol=tol, atol=tol * unit_m.abs().max().item())
    rows = (lambda t: t.reshape(1, -1)) if manifold == "tensor" else (lambda t: t)
    norms0 = rows((w0 * s).double()).norm(dim=1)
    norms = rows(w.double()).norm(dim=1)
    if retraction != "none":  # "none" grows the norm slowly, by design
        torch.testing.assert_close(norms / norms0, torch.ones_like(norms), rtol=tol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
@pytest.mark.parametrize("op", OPS)
def test_float16_near_its_extremes(op, manifold, device):
    """float16 groups with entries near its largest normals (about 3e4) and near its smallest
    (about 1.2e-4, gradients about 1/s) step like their unit copies."""
    w0, g0 = unit_rows(6, 70, torch.float16, device)
    if manifold == "tensor":
        w0, g0 = w0.reshape(-1), g0.reshape(-1)
    unit_w, unit_m = steps_of(ops, op, w0, g0, manifold)
    for s in (2.0 ** 15, 2.0 ** -13):
        gs = 1 / s if s < 1 else 1.0  # 2^-15 * 0.5 would be subnormal in float16
        w, m = steps_of(ops, op, w0 * s, g0 * gs, manifold)
        assert torch.isfinite(w).all()
        if gs == 1 / s:
            torch.testing.assert_close(m, unit_m, rtol=5e-3, atol=5e-3)
            torch.testing.assert_close((w.double() / s).half(), unit_w, rtol=5e-3, atol=5e-3)
        norms = w.double().reshape(w.shape[0] if manifold == "channel" else 1, -1).norm(dim=1)
        norms0 = (w0 * s).double().reshape(norms.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms / norms0, torch.ones_like(norms), rtol=5e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
# (up to about 1e30: the momentum buffer, stored in float32, holds the tangent gradient, about
# |g| sqrt(numel) here; at 2^127 it overflows float in the float64 oracle too)
@pytest.mark.parametrize("gscale", [2.0 ** 64, 2.0 ** 100])
@pytest.mark.parametrize("retraction", ["normalize", "exp", "none"])
@pytest.mark.parametrize("op", OPS)
def test_huge_finite_gradients_take_the_float64_step(op, retraction, gscale, device):
    """Finite gradients of 1e19 .. 1e30 at unit |w| (their squares overflow float): the fused
    fp32 step equals the same step computed in float64. Before the fix "normalize" wrote a zero
    group, "exp" NaN and "none" inf."""
    w0, g0 = unit_rows(4, 50, torch.float32, device, seed=1)
    g = g0 * gscale
    w, m = steps_of(ops, op, w0, g, "channel", n=1, retraction=retraction)
    w64, m64 = steps_of(ops, op, w0.double(), g.double(), "channel", n=1, retraction=retraction)
    assert torch.isfinite(w).all() and torch.isfinite(m).all()
    torch.testing.assert_close(w, w64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.double(), m64, rtol=1e-4, atol=1e-4 * m64.abs().max().item())


# --- the non-finite policy -------------------------------------------------------------------------

def _bad_grad(g, kind):
    g = g.clone()
    g[1, 3] = float("nan") if kind == "nan" else float("inf")
    return g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("op", OPS)
def test_nonfinite_gradient_propagates(op, backend, manifold, kind, device):
    """Default policy: the group holding a NaN or inf gradient becomes NaN as a whole (its
    parameter and buffer; it was silently left unchanged before); the other groups take the
    step they take without it."""
    w0, g0 = unit_rows(4, 30, torch.float32, device)
    bad = _bad_grad(g0, kind)
    if manifold == "tensor":
        w0, g0, bad = w0.reshape(-1), g0.reshape(-1), bad.reshape(-1)
    mod = BACKENDS[backend]
    w, m = steps_of(mod, op, w0, bad, manifold, n=1)
    good_w, good_m = steps_of(mod, op, w0, g0, manifold, n=1)
    if manifold == "tensor":
        assert torch.isnan(w).all() and torch.isnan(m).all()
        return
    assert torch.isnan(w[1]).all() and torch.isnan(m[1]).all()
    others = [0, 2, 3]
    assert torch.equal(w[others], good_w[others]) and torch.equal(m[others], good_m[others])


def _model_and_opt(cls, skip, backend, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    head = torch.nn.Linear(4, 2)
    groups = [{"params": [conv.weight], "manifold": "channel"},
              {"params": list(head.parameters()), "manifold": None}]
    opt = cls(groups, lr=0.1, skip_nonfinite=skip, backend=backend,
              **({"momentum": 0.9} if cls is psi_cuda.PSISGD else {}))
    return [conv.weight, *head.parameters()], opt


def _set_grads(params, poison=None):
    gen = torch.Generator().manual_seed(5)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen)
        if poison is not None and i == poison:
            p.grad.view(-1)[0] = float("nan")


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("cls", [psi_cuda.PSISGD, psi_cuda.PSIAdam], ids=["PSISGD", "PSIAdam"])
def test_default_policy_same_for_psi_and_euclidean_groups(cls, backend):
    """Without skip_nonfinite a NaN shows in both kinds of group: the PSI row and the Euclidean
    entry it reaches (as torch.optim), never a silent skip."""
    params, opt = _model_and_opt(cls, False, backend)
    _set_grads(params, poison=0)
    params[1].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[0][0]).all() and torch.isfinite(params[0][1:]).all()
    assert torch.isnan(params[1][0, 0]) and torch.isfinite(params[1].view(-1)[1:]).all()


@pytest.mark.parametrize("poison", [0, 1])  # a PSI group's gradient, a Euclidean one
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("cls", [psi_cuda.PSISGD, psi_cuda.PSIAdam], ids=["PSISGD", "PSIAdam"])
def test_skip_nonfinite_skips_the_whole_step_and_counts_it(cls, backend, poison):
    params, opt = _model_and_opt(cls, True, backend)
    twin_params, twin = _model_and_opt(cls, False, backend)
    _set_grads(params)
    _set_grads(twin_params)
    opt.step()
    twin.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    _set_grads(params, poison=poison)
    opt.step()  # skipped: nothing changes, bit for bit, steps included
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    for k, v in opt.state[params[0]].items():
        if k != "nonfinite_skips":
            assert torch.equal(v, state[k]), k
    assert opt.nonfinite_skips() == 1
    assert all(opt.state[p]["nonfinite_skips"].item() == 1 for p in params)
    # the run goes on exactly as one that never saw the bad step
    for _ in range(2):
        _set_grads(params)
        _set_grads(twin_params)
        opt.step()
        twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert opt.nonfinite_skips() == 1 and twin.nonfinite_skips() == 0
    # the counter is state: it survives a round trip
    fresh_params, fresh = _model_and_opt(cls, True, backend)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.nonfinite_skips() == 1 and fresh.param_groups[0]["skip_nonfinite"] is True


def test_skip_nonfinite_with_grad_scaler():
    """Under GradScaler the scaler's found_inf and the optimizer's own check combine: a step
    with inf gradients is skipped once (the scaler backs off), and counted."""
    params, opt = _model_and_opt(psi_cuda.PSISGD, True, "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(torch.ones(()))  # as scaler.scale(loss) would: the scale exists
    _set_grads(params)
    for p in params:
        p.grad.mul_(2.0 ** 8)
    params[2].grad[0] = float("inf")
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert opt.nonfinite_skips() == 1 and scaler.get_scale() == 2.0 ** 7
