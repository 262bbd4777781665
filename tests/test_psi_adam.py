"""psi_adam_ / PSIAdam: the fused op against the pure-torch reference (shapes, layouts, dtypes,
options), exact identities of docs/ALGORITHMS.md section 3, the invariants of section 7 (equivariance,
norms, tangent moments), torch.optim.AdamW on Euclidean groups, and the optimizer contract
(GradScaler, state_dict resume, bad input)."""
import itertools
import math

import pytest
import torch

import psi_cuda
from psi_cuda import ops, reference
from psi_cuda.optim import PSIAdam, PSISGD
import helpers
from helpers import (DEVICES, SHAPES, ConvBN, assert_close_rel, assert_norms_kept_and_tangent,
                     clone_all, conv_groups, group_norms, rescaling_gaps, state_dtype,
                     step_side_by_side, tangent_grad_like, train, zeros_like_state)

OPTIONS = [
    dict(),
    dict(beta1=0.8, beta2=0.99, eps=1e-3),
    dict(retraction="exp"),
    dict(retraction="exp", transport="parallel"),
    dict(retraction="none"),
    dict(max_grad_norm=0.05),
    dict(maximize=True, weight_decay=0.1),
    dict(beta1=0.0, eps=0.0, retraction="exp", transport="parallel", max_grad_norm=0.1),
]


def second_moment_like(p, manifold, dtype):
    if manifold == "channel":
        return torch.zeros(p.size(0), dtype=dtype, device=p.device)
    if manifold == "tensor":
        return torch.zeros((), dtype=dtype, device=p.device)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def make_case(shapes, dtype, device, manifold, zero_rows=False, channels_last=False):
    """(params, grads, exp_avgs, exp_avg_sqs, steps)."""
    return helpers.make_case(
        shapes, dtype, device, manifold,
        lambda p: [zeros_like_state(p), second_moment_like(p, manifold, state_dtype(p.dtype))],
        zero_rows=zero_rows, channels_last=channels_last)


def run_both(case, steps=3, new_grads=True, **kw):
    """`steps` steps of the fused op and of the reference on copies of `case`; fresh gradients
    each step (the same for both)."""
    return helpers.run_both(ops.psi_adam_, reference.psi_adam_, case, steps, new_grads, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "defaults")
def test_fused_matches_reference(device, dtype, manifold, opts):
    shapes = SHAPES if manifold != "channel" else [s for s in SHAPES if len(s) >= 1]
    if manifold is None and opts.get("eps") == 0.0:
        opts = dict(opts, eps=1e-8)  # AdamW with eps=0 gives 0/0 where g=0 (torch's too)
    case = make_case(shapes, dtype, device, manifold)
    kw = dict(lr=0.05, manifold=manifold, **opts)
    (p_f, _, m_f, v_f, s_f), (p_r, _, m_r, v_r, s_r) = run_both(case, **kw)
    for i, (a, e) in enumerate(zip(p_f, p_r)):
        assert a.stride() == case[0][i].stride()
        assert_close_rel(a, e, dtype, f"params[{i}] {tuple(a.shape)}")
        # the step really moved the parameter (a test that cannot pass by doing nothing)
        if a.numel() > 0 and (manifold is None or a[0].numel() > 1):
            assert not torch.equal(a, case[0][i]), f"params[{i}] did not move"
    for i, (a, e) in enumerate(zip(m_f, m_r)):
        assert_close_rel(a, e, dtype, f"exp_avgs[{i}]")
    for i, (a, e) in enumerate(zip(v_f, v_r)):
        assert a.shape == case[3][i].shape
        assert_close_rel(a, e, dtype, f"exp_avg_sqs[{i}]")
    assert all(s.item() == 3 for s in s_f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_zero_rows_and_strided_grads(device, dtype):
    """Channels-last weights keep channel groups on dim 0; zero rows stay zero with their state
    untouched (no NaN); gradients with other strides than their parameter are read correctly."""
    case = make_case([(8, 5, 3, 3), (6, 4, 1, 1), (16, 9)], dtype, device, "channel",
                     zero_rows=True, channels_last=True)
    params, grads, exp_avgs, exp_avg_sqs, steps = case
    grads[2] = grads[2].t().contiguous().t()  # same values, transposed strides
    assert not grads[2].is_contiguous()
    (p_f, _, m_f, v_f, _), (p_r, _, m_r, v_r, _) = run_both(case, new_grads=False, lr=0.1,
                                                            manifold="channel")
    for a, e, p0 in zip(p_f, p_r, params):
        assert a.is_contiguous(memory_format=torch.channels_last) == p0.is_contiguous(
            memory_format=torch.channels_last)
        assert_close_rel(a, e, dtype)
        assert torch.isfinite(a).all()
        assert (a[1] == 0).all()
    for a, e in zip(m_f + v_f, m_r + v_r):
        assert_close_rel(a, e, dtype)
        assert (a[1] == 0).all()
    for v in v_f:
        assert (v[0] > 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("retraction", ["normalize", "exp"])
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
def test_norms_preserved_and_moment_tangent(device, retraction, manifold):
    params, grads, exp_avgs, exp_avg_sqs, steps = make_case([(12, 40), (4, 3, 5, 5)],
                                                            torch.float64, device, manifold)
    norms0 = group_norms(params, manifold)
    for _ in range(20):
        for p, g in zip(params, grads):
            g.copy_(tangent_grad_like(p, manifold) + 0.3 * p)  # with a radial part
        ops.psi_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.1, manifold=manifold,
                      retraction=retraction)
    assert_norms_kept_and_tangent(params, exp_avgs, norms0, manifold)


@pytest.mark.parametrize("device", DEVICES)
def test_first_step_turns_each_group_by_lr(device):
    """Section 3: on the first step d = q / (|q| + eps), so with the exponential map every group
    turns by lr radians, whatever the size of its gradient and of the group."""
    p = torch.randn(6, 30, dtype=torch.float64, device=device) * torch.logspace(
        -2, 2, 6, dtype=torch.float64, device=device)[:, None]
    g = tangent_grad_like(p, "channel") * torch.logspace(-3, 3, 6, dtype=torch.float64,
                                                         device=device)[:, None]
    w0 = p.clone()
    lr = 0.3
    ops.psi_adam_([p], [g], [torch.zeros_like(p)], [torch.zeros(6, dtype=torch.float64,
                                                                device=device)],
                  [torch.zeros((), device=device)], lr=lr, eps=0.0, manifold="channel",
                  retraction="exp")
    cos = (p * w0).sum(1) / (p.norm(dim=1) * w0.norm(dim=1))
    torch.testing.assert_close(torch.acos(cos.clamp(-1, 1)),
                               torch.full((6,), lr, dtype=torch.float64, device=device),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("retraction", ["normalize", "exp", "none"])
def test_betas_zero_is_normalized_gradient_psi_sgd(device, retraction):
    """beta1 = beta2 = 0, eps = 0: d = q / |q|, i.e. PSI-SGD on the clipped gradient
    (max_grad_norm c < |q| gives c q / |q|) with lr / c: an independent op as the oracle."""
    p = torch.randn(9, 14, dtype=torch.float64, device=device)
    a, b = p.clone(), p.clone()
    ma, va = torch.zeros_like(p), torch.zeros(9, dtype=torch.float64, device=device)
    sa, sb = torch.zeros((), device=device), torch.zeros((), device=device)
    c = 1e-3
    for _ in range(5):
        g = tangent_grad_like(a, "channel")
        ops.psi_adam_([a], [g], [ma], [va], [sa], lr=0.2, beta1=0.0, beta2=0.0, eps=0.0,
                      manifold="channel", retraction=retraction)
        ops.psi_sgd_([b], [g.clone()], [], [sb], lr=0.2 / c, max_grad_norm=c,
                     manifold="channel", retraction=retraction)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, p)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_found_inf(device):
    params, grads, exp_avgs, exp_avg_sqs, steps = make_case([(9, 7), (3, 2, 3, 3)],
                                                            torch.float32, device, "channel")
    scale = torch.tensor(1024.0, device=device)
    scaled = [g * scale for g in grads]
    a = clone_all(params, exp_avgs, exp_avg_sqs, steps)
    b = clone_all(params, exp_avgs, exp_avg_sqs, steps)
    kw = dict(lr=0.1, manifold="channel")
    ops.psi_adam_(a[0], grads, a[1], a[2], a[3], **kw)
    ops.psi_adam_(b[0], scaled, b[1], b[2], b[3], grad_scale=scale, **kw)
    for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    # found_inf set: nothing changes, steps and moments included, even with NaN gradients.
    for manifold in ("channel", None):
        case = make_case([(9, 7), (3, 2, 3, 3)], torch.float32, device, manifold)
        c = clone_all(case[0], case[2], case[3], case[4])
        for lst in c[1:3]:
            for t in lst:
                t.uniform_()  # non-zero state, to see that it is kept
        before = clone_all(*c)
        nan_grads = [torch.full_like(g, float("nan")) for g in case[1]]
        ops.psi_adam_(c[0], nan_grads, c[1], c[2], c[3], lr=0.1, manifold=manifold,
                      grad_scale=scale, found_inf=torch.ones((), device=device))
        for x, y in zip(itertools.chain(*c), itertools.chain(*before)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_correction_follows_state_step(device):
    """t = state_step + 1 on the device: a step skipped by found_inf keeps the next one the
    first (bias corrections of t = 1), and a resumed step count gives that step's corrections."""
    p = torch.randn(5, 8, device=device, dtype=torch.float64)
    g = tangent_grad_like(p, "channel")
    m, v, step = torch.zeros_like(p), torch.zeros(5, dtype=torch.float64, device=device), \
        torch.zeros((), device=device)
    kw = dict(lr=0.1, manifold="channel")
    ops.psi_adam_([p], [g], [m], [v], [step], found_inf=torch.ones((), device=device), **kw)
    assert step.item() == 0
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    ops.psi_adam_([p], [g], [m], [v], [step], **kw)
    reference.psi_adam_([p_ref], [g], [m_ref], [v_ref], [torch.zeros((), device=device)], **kw)
    torch.testing.assert_close(p, p_ref)
    assert step.item() == 1
    # step 7 with the same state: the reference with step 6 agrees; step 1 does not.
    p7, p1 = p.clone(), p.clone()
    ops.psi_adam_([p7], [g], [m.clone()], [v.clone()], [torch.full((), 6.0, device=device)], **kw)
    p_ref = p.clone()
    reference.psi_adam_([p_ref], [g], [m.clone()], [v.clone()],
                        [torch.full((), 6.0, device=device)], **kw)
    ops.psi_adam_([p1], [g], [m.clone()], [v.clone()], [torch.zeros((), device=device)], **kw)
    torch.testing.assert_close(p7, p_ref)
    assert not torch.allclose(p7, p1)


def test_zero_and_length_one_groups_do_not_move():
    p = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    g = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.1, -0.2]])
    m = torch.full_like(p, 0.25)
    v = torch.tensor([0.5, 0.5])
    ops.psi_adam_([p], [g], [m], [v], [torch.zeros(())], lr=0.5, manifold="channel")
    assert torch.equal(p[0], torch.zeros(3)) and torch.equal(m[0], torch.full((3,), 0.25))
    assert v[0].item() == 0.5 and v[1].item() != 0.5
    assert not torch.equal(p[1], torch.tensor([1.0, 2.0, 3.0]))
    x = torch.tensor([[2.0], [-3.0]])  # rows of length 1: points of the 0-sphere
    x0, mx, vx = x.clone(), torch.full_like(x, 0.1), torch.full((2,), 0.2)
    ops.psi_adam_([x], [torch.ones_like(x)], [mx], [vx], [torch.zeros(())], lr=0.5,
                  manifold="channel")
    assert torch.equal(x, x0) and torch.equal(mx, torch.full_like(x, 0.1))
    assert torch.equal(vx, torch.full((2,), 0.2))


def test_opcheck():
    case = make_case([(4, 6), (3, 2, 2)], torch.float32, "cpu", "channel")
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                  manifold=1, retraction=1, transport=1, max_grad_norm=0.5,
                  grad_scale=torch.tensor(2.0), found_inf=torch.zeros(()))
    torch.library.opcheck(torch.ops.psi_cuda.psi_adam_.default, case, kwargs)
    torch.library.opcheck(torch.ops.psi_cuda.psi_adam_.default,
                          make_case([(5, 3), ()], torch.float64, "cpu", None),
                          dict(kwargs, weight_decay=0.1, maximize=True, manifold=0, retraction=0,
                               transport=0, max_grad_norm=0.0, grad_scale=None, found_inf=None))
    torch.library.opcheck(torch.ops.psi_cuda.psi_adam_.default,
                          make_case([(5, 3)], torch.bfloat16, "cpu", "tensor"),
                          dict(kwargs, manifold=2, retraction=2, transport=0))


BAD_CALLS = {
    "grad shape": (lambda c: c[1].__setitem__(1, torch.zeros(3, 3)), r"grads\[1\] has shape"),
    "grad dtype": (lambda c: c[1].__setitem__(0, c[1][0].double()), r"grads\[0\] is Double"),
    "exp_avg dtype": (lambda c: c[2].__setitem__(0, c[2][0].half()), r"exp_avgs\[0\]"),
    "exp_avg_sq shape": (lambda c: c[3].__setitem__(1, torch.zeros(3, 2)),
                         r"exp_avg_sqs\[1\] must be a contiguous Float tensor with one element "
                         r"per group \(3 for params\[1\]"),
    "missing exp_avg_sq": (lambda c: c[3].pop(), r"exp_avg_sqs"),
    "sparse grad": (lambda c: c[1].__setitem__(0, c[1][0].to_sparse()), r"grads\[0\] is sparse"),
    "step dtype": (lambda c: c[4].__setitem__(0, torch.zeros((), dtype=torch.int64)),
                   r"state_steps\[0\] must be a float32"),
    "device": (lambda c: c[2].__setitem__(0, c[2][0].to("meta")),
               r"exp_avgs\[0\] is on meta but params\[0\] is on cpu"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_inputs_raise_and_change_nothing(name):
    mutate, pattern = BAD_CALLS[name]
    params, grads, exp_avgs, exp_avg_sqs, steps = make_case([(4, 6), (3, 2)], torch.float32,
                                                            "cpu", "channel")
    before = clone_all(params, exp_avgs, exp_avg_sqs, steps)
    case = [params, list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps)]
    mutate(case)
    with pytest.raises(RuntimeError, match=pattern):
        ops.psi_adam_(*case, lr=0.1, manifold="channel")
    for x, y in zip(params + exp_avgs + exp_avg_sqs + steps, itertools.chain(*before)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kw,pattern", [
    (dict(manifold="sphere"), r"manifold must be one of"),
    (dict(retraction="cayley"), r"retraction must be one of"),
    (dict(transport="parallel"), r"parallel needs retraction=exp"),
    (dict(lr=-1.0), r"lr must be >= 0"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (dict(beta2=-0.1), r"beta2 must be in \[0, 1\)"),
    (dict(eps=-1.0), r"eps must be >= 0"),
])
def test_bad_options_raise(kw, pattern):
    params, grads, exp_avgs, exp_avg_sqs, steps = make_case([(4, 6)], torch.float32, "cpu",
                                                            "channel")
    p0 = params[0].clone()
    with pytest.raises(ValueError, match=pattern):
        ops.psi_adam_(params, grads, exp_avgs, exp_avg_sqs, steps,
                      **{"lr": 0.1, "manifold": "channel", **kw})
    assert torch.equal(params[0], p0) and steps[0].item() == 0


# ---- the optimizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(weight_decay=1e-2),
    dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, maximize=True),
    dict(lr=0.01, betas=(0.0, 0.5), eps=1e-3),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euclidean_groups_match_torch_adamw(device, backend, opts, dtype):
    shapes = [(10, 7), (13,), (2, 3, 3, 3), (), (0, 3)]
    ours = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    theirs = [p.clone() for p in ours]
    opts = dict(dict(lr=0.05, weight_decay=0.0), **opts)  # AdamW defaults to 1e-2
    opt = PSIAdam([{"params": ours, "manifold": None}], backend=backend, **opts)
    ref = torch.optim.AdamW(theirs, foreach=False, **opts)
    step_side_by_side(opt, ours, ref, theirs)
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], **tol)
        assert opt.state[a]["step"].item() == ref.state[b]["step"].item() == 8
    assert not torch.equal(ours[0], torch.zeros_like(ours[0]))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_equivariance_over_100_steps(backend):
    """docs/ALGORITHMS.md 7.1 for PSI-Adam: from w0 and from c*w0 (c per channel in [0.1, 10])
    every iterate stays c times the other and the losses agree; AdamW on the same starts does
    not."""
    kw = dict(lr=0.02, weight_decay=0.0, backend=backend)
    gap, loss_gap, losses = rescaling_gaps(lambda m: PSIAdam(conv_groups(m, True), **kw))
    assert gap < 1e-8 and loss_gap < 1e-8, (gap, loss_gap)
    assert losses[-1] < losses[0]  # it trains
    if backend == "fused":  # AdamW once is enough
        gap, loss_gap, _ = rescaling_gaps(
            lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.0))
        assert gap > 1e-2 and loss_gap > 1e-3, (gap, loss_gap)


def test_param_groups_builds_psiadam_groups():
    """psi_cuda.param_groups puts the conv weights into channel groups: PSIAdam then keeps their
    row norms and stores one second moment per output channel, and trains the model."""
    model = ConvBN()
    built = psi_cuda.param_groups(model, lr=0.01, psi_lr=0.02, weight_decay=1e-2)
    assert {g["manifold"] for g in built} == {"channel", None}
    opt = PSIAdam(built, lr=0.01)
    norms = {n: model.get_parameter(n).detach().flatten(1).norm(dim=1).clone()
             for n in ("c1.weight", "c2.weight")}
    fc0 = model.fc.weight.detach().clone()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    losses = train(model, opt, batches, 30)
    assert losses[-1] < losses[0]
    for n, n0 in norms.items():
        p = model.get_parameter(n)
        torch.testing.assert_close(p.detach().flatten(1).norm(dim=1), n0, rtol=1e-5, atol=0)
        assert opt.state[p]["exp_avg_sq"].shape == (p.size(0),)
    assert opt.state[model.fc.weight]["exp_avg_sq"].shape == model.fc.weight.shape
    assert not torch.equal(model.fc.weight, fc0)


def test_bad_group_options_raise():
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['manifold'\] must be"):
        PSIAdam([{"params": [w], "manifold": "sphere"}])
    with pytest.raises(ValueError, match=r"transport='parallel' needs retraction='exp'"):
        PSIAdam([w], manifold="channel", transport="parallel")
    with pytest.raises(ValueError, match=r"\['lr'\] must be >= 0"):
        PSIAdam([w], manifold="channel", lr=-0.1)
    with pytest.raises(ValueError, match=r"\['betas'\] must be two numbers in \[0, 1\)"):
        PSIAdam([w], manifold="channel", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"\['betas'\]"):
        PSIAdam([{"params": [w], "betas": (0.9,), "manifold": "channel"}])
    with pytest.raises(ValueError, match=r"\['eps'\] must be >= 0"):
        PSIAdam([w], manifold="channel", eps=-1e-8)
    with pytest.raises(ValueError, match=r"\['weight_decay'\] must be >= 0"):
        PSIAdam([w], manifold="channel", weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"\['retraction'\] must be one of"):
        PSIAdam([w], manifold="channel", retraction="cayley")
    with pytest.raises(ValueError, match=r"amsgrad"):
        PSIAdam([w], manifold="channel", amsgrad=True)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        PSIAdam([w], manifold="channel", backend="triton")
    with pytest.raises(ValueError, match=r"max_grad_norm"):
        PSIAdam([w], manifold="channel", max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"dtype torch.int64"):
        PSIAdam([torch.zeros(3, 3, dtype=torch.int64)], manifold="channel")
    with pytest.raises(ValueError, match=r"0-dim tensor"):
        PSIAdam([torch.zeros((), requires_grad=True)], manifold="channel")


def test_step_moves_less_than_lr_per_group():
    """|d| <= about 1 (Adam's normalization): no group turns by much more than lr per step."""
    w = torch.randn(16, 20, dtype=torch.float64)
    p = w.clone().requires_grad_()
    opt = PSIAdam([p], manifold="channel", lr=0.05)
    for _ in range(10):
        prev = p.detach().clone()
        p.grad = tangent_grad_like(p.detach(), "channel") * 100.0
        opt.step()
        cos = (p.detach() * prev).sum(1) / (p.detach().norm(dim=1) * prev.norm(dim=1))
        angle = torch.acos(cos.clamp(-1, 1))
        assert angle.max().item() <= 0.05 * 1.5
        assert angle.min().item() > 0
    assert math.isfinite(p.detach().sum().item())


def test_psisgd_still_exported_next_to_psiadam():
    assert psi_cuda.PSIAdam is PSIAdam and psi_cuda.PSISGD is PSISGD
