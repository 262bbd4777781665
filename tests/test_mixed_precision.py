"""Mixed precision: fp32 master weights for fp16/bf16 parameters (master_weights=True) and
torch.amp.GradScaler end to end (autocast, inf/NaN steps) for PSISGD, PSIAdam and BNPSGD."""
import copy

import pytest
import torch
from torch import nn

import psi_cuda
from psi_cuda.optim import BNPSGD, PSIAdam, PSISGD

from helpers import tangent_grad_like

LOW = [torch.bfloat16, torch.float16]


def groups_of(ps):
    """Channel, tensor and Euclidean groups over a list of 5 tensors."""
    return [{"params": ps[:2], "manifold": "channel"}, {"params": ps[2:3], "manifold": "tensor"},
            {"params": ps[3:], "manifold": None, "weight_decay": 0.01}]


def shapes():
    return [(8, 3, 3, 3), (5, 7), (6, 4), (9,), (4, 3)]


def make_opt(cls, params, **kw):
    opts = dict(lr=0.05, momentum=0.9) if cls is PSISGD else dict(lr=0.01)
    opts.update(kw)
    return cls(groups_of(params), **opts)


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# ---- master weights --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
@pytest.mark.parametrize("dtype", LOW)
def test_master_step_is_the_fp32_step_of_the_master(cls, dtype):
    """The master copy takes exactly the step the fp32 optimizer takes on an fp32 copy with the
    gradients cast to fp32; the parameter is the master rounded; every state tensor agrees."""
    torch.manual_seed(0)
    ref = [torch.randn(s, dtype=torch.float32).to(dtype).float().requires_grad_() for s in shapes()]
    low = [p.detach().to(dtype).requires_grad_() for p in ref]
    opt_low, opt_ref = make_opt(cls, low, master_weights=True), make_opt(cls, ref)
    for step in range(4):
        for g in opt_low.param_groups:
            for p in g["params"]:
                p.grad = tangent_grad_like(p.float(), g["manifold"]).to(dtype)
        for p, q in zip(low, ref):
            q.grad = p.grad.float()
        opt_low.step()
        opt_ref.step()
        for p, q in zip(low, ref):
            s, r = opt_low.state[p], opt_ref.state[q]
            assert s["master"].dtype == torch.float32
            assert torch.equal(s["master"], q), f"step {step}: master != fp32 step"
            assert torch.equal(p, q.to(dtype)), f"step {step}: param != rounded master"
            assert set(s) == set(r) | {"master"}
            for k in r:
                assert torch.equal(s[k], r[k]), f"step {step}: state {k!r} differs"


@pytest.mark.parametrize("dtype", LOW)
def test_master_weights_bnp_sgd_is_the_fp32_step(dtype):
    """BNPSGD with master weights: the fp32 BNPSGD step of an fp32 copy (same statistics, grads
    cast to fp32), bit for bit."""
    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4),
                             nn.ReLU(), nn.Linear(4, 3, bias=False))

    ref = model()
    for p in ref.parameters():  # start from values representable in `dtype`
        p.data = p.data.to(dtype).float()
    low = copy.deepcopy(ref).to(dtype)
    opt_low = BNPSGD(low, lr=0.05, momentum=0.9, weight_decay=1e-3, master_weights=True)
    opt_ref = BNPSGD(ref, lr=0.05, momentum=0.9, weight_decay=1e-3)
    for la, lb in zip(opt_low.bnp.layers, opt_ref.bnp.layers):  # the same non-trivial statistics
        mean = torch.randn(la.mean.shape)
        la.mean.copy_(mean), lb.mean.copy_(mean)
        la.sqmean.copy_(mean.square() + 0.5), lb.sqmean.copy_(mean.square() + 0.5)
    for step in range(3):
        for p, q in zip(low.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape).to(dtype)
            q.grad = p.grad.float()
        opt_low.step()
        opt_ref.step()
        for p, q in zip(low.parameters(), ref.parameters()):
            s, r = opt_low.state[p], opt_ref.state[q]
            assert torch.equal(s["master"], q), f"step {step}: master != fp32 step"
            assert torch.equal(p, q.to(dtype))
            for k in r:
                assert torch.equal(s[k], r[k]), f"step {step}: state {k!r} differs"


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_bf16_with_master_tracks_the_fp32_model(cls):
    """Same init, the fp32 model's gradients given (cast) to the bf16 copies: with master weights
    the bf16 params stay within bf16 rounding of the fp32 run; without, small steps are rounded
    away and the bf16 run falls behind (oracle: the fp32 optimizer on the fp32 model). The
    gradients keep one direction per tensor (plus noise), so the fp32 run travels far."""
    torch.manual_seed(0)
    lr = dict(lr=1e-3, momentum=0.9) if cls is PSISGD else dict(lr=2e-4)
    ref = [torch.randn(s).to(torch.bfloat16).float().requires_grad_() for s in shapes()]
    plain = [p.detach().bfloat16().requires_grad_() for p in ref]
    master = [p.detach().bfloat16().requires_grad_() for p in ref]
    opts = [make_opt(cls, ref, **lr), make_opt(cls, plain, **lr),
            make_opt(cls, master, master_weights=True, **lr)]
    direction = [torch.randn(p.shape) for p in ref]
    for _ in range(150):
        for p, d in zip(ref, direction):
            p.grad = d + 0.3 * torch.randn(p.shape)
        for p, a, b in zip(ref, plain, master):
            a.grad = b.grad = p.grad.bfloat16()
        for o in opts:
            o.step()

    def rel_err(ps):
        return max(((p.float() - q).norm() / q.norm()).item() for p, q in zip(ps, ref))

    err_plain, err_master = rel_err(plain), rel_err(master)
    assert err_master < 2 ** -8, err_master  # bf16 rounding of the fp32 run (8 mantissa bits)
    assert err_plain > 5 * err_master, (err_plain, err_master)


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_master_weights_resume_bit_for_bit(cls):
    torch.manual_seed(0)
    ps = [torch.randn(s).bfloat16().requires_grad_() for s in shapes()]
    opt = make_opt(cls, ps, master_weights=True)

    def step(o, seed):
        gen = torch.Generator().manual_seed(seed)
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1).bfloat16()
        o.step()

    for i in range(3):
        step(opt, i)
    saved_params = [p.detach().clone() for p in ps]
    saved = copy.deepcopy(opt.state_dict())
    for i in range(3, 6):
        step(opt, i)

    ps2 = [p.clone().requires_grad_() for p in saved_params]
    opt2 = make_opt(cls, ps2, master_weights=True)
    opt2.load_state_dict(saved)
    for p in ps2:
        assert opt2.state[p]["master"].dtype == torch.float32
    for i in range(3, 6):
        step(opt2, i)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), k


def test_master_weights_leave_fp32_params_alone():
    """fp32 params of a master_weights optimizer get no master copy and the plain fp32 step."""
    torch.manual_seed(0)
    a = [torch.randn(s, requires_grad=True) for s in shapes()]
    b = [p.detach().clone().requires_grad_() for p in a]
    oa, ob = make_opt(PSISGD, a, master_weights=True), make_opt(PSISGD, b)
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    oa.step(), ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q) and "master" not in oa.state[p]


# ---- GradScaler end to end -------------------------------------------------------------------


def cnn(bn: bool):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, bias=not bn)] + ([nn.BatchNorm2d(6)] if bn else []) + [
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 5)]
    return nn.Sequential(*layers)


def make_amp_opt(cls, model, master):
    if cls is BNPSGD:
        return BNPSGD(model, lr=0.01, momentum=0.9, master_weights=master)
    groups = psi_cuda.param_groups(model, lr=0.05, weight_decay=1e-3)
    kw = dict(lr=0.05, momentum=0.9) if cls is PSISGD else dict(lr=0.01)
    return cls(groups, master_weights=master, **kw)


def snapshot(model, opt):
    """Every parameter, buffer (BN running stats), state tensor and BNP statistic, cloned."""
    snap = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    for p in all_params(opt):
        snap += [v.clone() for v in opt.state[p].values() if torch.is_tensor(v)]
    if isinstance(opt, BNPSGD):
        snap += [t.clone() for l in opt.bnp.layers for t in (l.mean, l.sqmean, l.step)]
    return snap


# (params dtype, autocast dtype or None, master weights)
AMP_CASES = [(torch.float32, torch.bfloat16, False),  # fp32 params under bf16 autocast
             (torch.bfloat16, None, False),           # bf16 params, no master
             (torch.bfloat16, None, True),            # bf16 params with fp32 masters
             (torch.float16, None, False),            # fp16 params, no master
             (torch.float16, None, True)]             # fp16 params with fp32 masters


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam, BNPSGD])
@pytest.mark.parametrize("param_dtype,autocast,master", AMP_CASES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_scaler_end_to_end(cls, param_dtype, autocast, master, bad):
    """Model A trains with torch.amp.GradScaler("cpu") (scaled loss, the kernels unscale); twin
    model B takes the same steps unscaled with the same optimizer, no scaler. Steps 0, 1 and 3:
    A equals B bit for bit (power-of-two scaling is exact), except for fp16 params: there B's
    unscaled fp16 backward rounds tiny gradients into subnormals (what loss scaling is for), so
    A and B agree to fp16 precision only. Step 2 gets an inf/NaN in one
    gradient of A: every parameter, BN buffer, state tensor (step, momentum, moments, master)
    and BNP statistic is bitwise unchanged by scaler.step, and the scale is halved; B skips it."""
    model_a, model_b = cnn(bn=cls is not BNPSGD), cnn(bn=cls is not BNPSGD)
    model_a.to(param_dtype), model_b.to(param_dtype)
    opt_a, opt_b = make_amp_opt(cls, model_a, master), make_amp_opt(cls, model_b, master)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def loss_of(model, x, y):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return nn.functional.cross_entropy(model(x).float(), y)

    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 6, 6, generator=gen).to(param_dtype)
        y = torch.randint(0, 5, (4,), generator=gen)
        opt_a.zero_grad(), opt_b.zero_grad()
        scaler.scale(loss_of(model_a, x, y)).backward()
        loss_of(model_b, x, y).backward()
        if step == 2:
            next(model_a.parameters()).grad.view(-1)[3] = bad
            before, scale = snapshot(model_a, opt_a), scaler.get_scale()
            scaler.step(opt_a)
            scaler.update()
            after = snapshot(model_a, opt_a)
            assert len(after) == len(before)
            for t0, t1 in zip(before, after):
                assert torch.equal(t0, t1), "a skipped step changed a tensor"
            assert scaler.get_scale() == scale / 2
            continue
        scaler.step(opt_a)
        scaler.update()
        opt_b.step()
        same = torch.equal if param_dtype != torch.float16 else \
            lambda a, b: torch.allclose(a.float(), b.float(), rtol=2e-3, atol=1e-5)
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            assert same(p, q), f"step {step}: scaled and unscaled steps differ"
        for p, q in zip(all_params(opt_a), all_params(opt_b)):
            for k, v in opt_b.state[q].items():
                assert same(opt_a.state[p][k], v), f"step {step}: state {k!r} differs"
    steps = [opt_a.state[p]["step"].item() for p in all_params(opt_a) if "step" in opt_a.state[p]]
    assert steps and all(s == 3.0 for s in steps)
    if master and param_dtype != torch.float32:
        assert all("master" in opt_a.state[p] for p in all_params(opt_a))
