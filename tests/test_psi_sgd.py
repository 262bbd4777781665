"""psi_sgd_: the fused op against the pure-torch reference, over shapes, layouts, dtypes, options."""
import itertools
from functools import partial

import pytest
import torch

from psi_cuda import ops, reference
import helpers
from helpers import (DEVICES, SHAPES, assert_close_rel, assert_norms_kept_and_tangent,
                     clone_all, group_norms, tangent_grad_like, zeros_like_state)

OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3),
    dict(momentum=0.9, retraction="exp"),
    dict(momentum=0.9, retraction="exp", transport="parallel"),
    dict(momentum=0.9, nesterov=True, retraction="none"),
    dict(momentum=0.9, max_grad_norm=0.05),
    dict(momentum=0.0, retraction="exp", transport="parallel", max_grad_norm=0.1),
    dict(momentum=0.9, maximize=True, weight_decay=0.1),
]


def make_case(shapes, dtype, device, manifold, momentum, zero_rows=False, channels_last=False):
    """(params, grads, momentum_buffers, steps); no buffers without momentum."""
    return helpers.make_case(shapes, dtype, device, manifold,
                             lambda p: [zeros_like_state(p) if momentum else None],
                             zero_rows=zero_rows, channels_last=channels_last)


run_both = partial(helpers.run_both, ops.psi_sgd_, reference.psi_sgd_)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fused_matches_reference(device, dtype, manifold, opts):
    shapes = SHAPES if manifold != "channel" else [s for s in SHAPES if len(s) >= 1]
    case = make_case(shapes, dtype, device, manifold, opts["momentum"])
    kw = dict(lr=0.1, manifold=manifold, **opts)
    (p_f, g_f, b_f, s_f), (p_r, g_r, b_r, s_r) = run_both(case, **kw)
    for i, (a, e) in enumerate(zip(p_f, p_r)):
        assert a.stride() == case[0][i].stride()
        assert_close_rel(a, e, dtype, f"params[{i}] {tuple(a.shape)}")
    for i, (a, e) in enumerate(zip(b_f, b_r)):
        assert_close_rel(a, e, dtype, f"momentum_buffers[{i}]")
    assert all(s.item() == 3 for s in s_f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_zero_rows_and_strided_grads(device, dtype):
    """Channels-last weights keep channel groups on dim 0; zero rows stay zero (no NaN);
    gradients with other strides than their parameter are read correctly."""
    case = make_case([(8, 5, 3, 3), (6, 4, 1, 1), (16, 9)], dtype, device, "channel", 0.9,
                     zero_rows=True, channels_last=True)
    params, grads, bufs, steps = case
    grads[2] = grads[2].t().contiguous().t()  # same values, transposed strides
    assert not grads[2].is_contiguous()
    kw = dict(lr=0.2, momentum=0.9, manifold="channel")
    (p_f, _, b_f, _), (p_r, _, b_r, _) = run_both(case, **kw)
    for a, e, p0 in zip(p_f, p_r, params):
        assert a.is_contiguous(memory_format=torch.channels_last) == p0.is_contiguous(
            memory_format=torch.channels_last)
        assert_close_rel(a, e, dtype)
        assert torch.isfinite(a).all()
        assert (a[1] == 0).all()  # the zero row did not move
    for a, e in zip(b_f, b_r):
        assert_close_rel(a, e, dtype)
        assert (a[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("retraction", ["normalize", "exp"])
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
def test_norms_preserved_and_buffer_tangent(device, retraction, manifold):
    case = make_case([(12, 40), (4, 3, 5, 5)], torch.float64, device, manifold, 0.9)
    params, grads, bufs, steps = case
    norms0 = group_norms(params, manifold)
    for _ in range(20):
        for p, g in zip(params, grads):
            g.copy_(tangent_grad_like(p, manifold))
        ops.psi_sgd_(params, grads, bufs, steps, lr=0.3, momentum=0.9, manifold=manifold,
                     retraction=retraction)
    assert_norms_kept_and_tangent(params, bufs, norms0, manifold)


@pytest.mark.parametrize("device", DEVICES)
def test_retraction_none_grows_norm_by_known_factor(device):
    """With retraction='none' and momentum 0, |w'| = |w| sqrt(1 + lr^2 |q|^2) (q is tangent)."""
    p = torch.randn(6, 30, dtype=torch.float64, device=device)
    g = tangent_grad_like(p, "channel")
    n = p.norm(dim=1)
    u = p / n[:, None]
    q = n[:, None] * (g - (g * u).sum(1, keepdim=True) * u)
    lr = 0.4
    ops.psi_sgd_([p], [g], [], [torch.zeros((), device=device)], lr=lr, manifold="channel",
                 retraction="none")
    torch.testing.assert_close(p.norm(dim=1), n * torch.sqrt(1 + lr**2 * q.norm(dim=1) ** 2))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_found_inf(device):
    case = make_case([(9, 7), (3, 2, 3, 3)], torch.float32, device, "channel", 0.9)
    params, grads, bufs, steps = case
    scale = torch.tensor(1024.0, device=device)
    scaled = [g * scale for g in grads]
    a = clone_all(params, bufs, steps)
    b = clone_all(params, bufs, steps)
    kw = dict(lr=0.1, momentum=0.9, manifold="channel")
    ops.psi_sgd_(a[0], grads, a[1], a[2], **kw)
    ops.psi_sgd_(b[0], scaled, b[1], b[2], grad_scale=scale, **kw)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    # found_inf set: nothing changes, the step counters included, even with NaN gradients.
    c = clone_all(params, bufs, steps)
    nan_grads = [torch.full_like(g, float("nan")) for g in grads]
    ops.psi_sgd_(c[0], nan_grads, c[1], c[2], grad_scale=scale,
                 found_inf=torch.ones((), device=device), **kw)
    for x, y in zip(c[0] + c[1] + c[2], params + bufs + steps):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_first_step_follows_state_step(device):
    """The buffer's first step stores the direction itself (no dampening), like torch's SGD,
    decided by state_steps on the device: a step skipped by found_inf keeps it a first step."""
    p = torch.randn(5, 8, device=device, dtype=torch.float64)
    g = tangent_grad_like(p, "channel")
    m = torch.zeros_like(p)
    step = torch.zeros((), device=device)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5, manifold="channel")
    ops.psi_sgd_([p], [g], [m], [step], found_inf=torch.ones((), device=device), **kw)
    assert step.item() == 0
    p_ref, m_ref = p.clone(), m.clone()
    ops.psi_sgd_([p], [g], [m], [step], **kw)
    reference.psi_sgd_([p_ref], [g], [m_ref], [torch.zeros((), device=device)], **kw)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(m, m_ref)
    assert step.item() == 1


def test_zero_and_length_one_groups_do_not_move():
    p = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    g = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.1, -0.2]])
    m = torch.zeros_like(p)
    ops.psi_sgd_([p], [g], [m], [torch.zeros(())], lr=0.5, momentum=0.9, manifold="channel")
    assert torch.equal(p[0], torch.zeros(3)) and torch.equal(m[0], torch.zeros(3))
    assert not torch.equal(p[1], torch.tensor([1.0, 2.0, 3.0]))
    v = torch.tensor([[2.0], [-3.0]])  # rows of length 1: points of the 0-sphere
    v0 = v.clone()
    ops.psi_sgd_([v], [torch.ones_like(v)], [], [torch.zeros(())], lr=0.5, manifold="channel")
    assert torch.equal(v, v0)


def test_opcheck():
    case = make_case([(4, 6), (3, 2, 2)], torch.float32, "cpu", "channel", 0.9)
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0,
                  maximize=False, manifold=1, retraction=1, transport=1, max_grad_norm=0.5,
                  grad_scale=torch.tensor(2.0), found_inf=torch.zeros(()))
    torch.library.opcheck(torch.ops.psi_cuda.psi_sgd_.default, case, kwargs)
    torch.library.opcheck(torch.ops.psi_cuda.psi_sgd_.default,
                          make_case([(5, 3)], torch.float64, "cpu", None, 0.0),
                          dict(kwargs, momentum=0.0, nesterov=False, manifold=0, retraction=0,
                               transport=0, max_grad_norm=0.0, grad_scale=None, found_inf=None))


BAD_CALLS = {
    "grad shape": (lambda c: c[1].__setitem__(1, torch.zeros(3, 3)), r"grads\[1\] has shape"),
    "grad dtype": (lambda c: c[1].__setitem__(0, c[1][0].double()), r"grads\[0\] is Double"),
    "param dtype": (lambda c: c[0].__setitem__(1, c[0][1].double()), r"params\[1\] is Double"),
    "buffer dtype": (lambda c: c[2].__setitem__(0, c[2][0].half()), r"momentum_buffers\[0\]"),
    "sparse grad": (lambda c: c[1].__setitem__(0, c[1][0].to_sparse()), r"grads\[0\] is sparse"),
    "missing step": (lambda c: c[3].pop(), r"state_steps"),
    "step dtype": (lambda c: c[3].__setitem__(0, torch.zeros((), dtype=torch.int64)),
                   r"state_steps\[0\] must be a float32"),
    "device": (lambda c: c[1].__setitem__(0, c[1][0].to("meta")), r"grads\[0\] is on meta but params\[0\] is on cpu"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_inputs_raise_and_change_nothing(name):
    mutate, pattern = BAD_CALLS[name]
    params, grads, bufs, steps = make_case([(4, 6), (3, 2)], torch.float32, "cpu", "channel", 0.9)
    before = clone_all(params, bufs, steps)
    case = [params, list(grads), list(bufs), list(steps)]
    mutate(case)
    with pytest.raises(RuntimeError, match=pattern):
        ops.psi_sgd_(*case, lr=0.1, momentum=0.9, manifold="channel")
    for x, y in zip(params + bufs + steps, itertools.chain(*before)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kw,pattern", [
    (dict(manifold="sphere"), r"manifold must be one of"),
    (dict(retraction="cayley"), r"retraction must be one of"),
    (dict(transport="parallel"), r"parallel needs retraction=exp"),
    (dict(lr=-1.0), r"lr must be >= 0"),
    (dict(nesterov=True, momentum=0.0), r"nesterov needs momentum > 0"),
])
def test_bad_options_raise(kw, pattern):
    """ValueError, from the wrapper (option names) or from the op (TORCH_CHECK_VALUE)."""
    params, grads, _, steps = make_case([(4, 6)], torch.float32, "cpu", "channel", 0.0)
    p0 = params[0].clone()
    with pytest.raises(ValueError, match=pattern):
        ops.psi_sgd_(params, grads, [], steps, **{"lr": 0.1, "manifold": "channel", **kw})
    assert torch.equal(params[0], p0) and steps[0].item() == 0


@pytest.mark.parametrize("fn", [ops.psi_sgd_, reference.psi_sgd_], ids=["fused", "reference"])
def test_parallel_transport_needs_exp_in_both_backends(fn):
    params, grads, _, steps = make_case([(4, 6)], torch.float32, "cpu", "channel", 0.0)
    with pytest.raises(ValueError, match="parallel"):
        fn(params, grads, [], steps, lr=0.1, manifold="channel", transport="parallel")
    assert steps[0].item() == 0
