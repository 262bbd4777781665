"""PSISGD: oracles (torch.optim.SGD, geoopt, the reference, the equivariance of ALGORITHMS.md
section 7) and the optimizer contract (closure, state_dict resume, GradScaler, bad input)."""
import copy
import io
import warnings

import geoopt
import pytest
import torch
from torch import nn

from psi_cuda.optim import PSIAdam, PSISGD
from conftest import DEVICES
from helpers import tangent_grad_like


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.7, dampening=0.2, weight_decay=1e-3, maximize=True),
])
def test_euclidean_groups_match_torch_sgd(device, backend, opts):
    shapes = [(10, 7), (13,), (2, 3, 3, 3), ()]
    ours = [torch.randn(s, device=device) for s in shapes]
    theirs = [p.clone() for p in ours]
    opt = PSISGD([{"params": ours, "manifold": None}], lr=0.05, backend=backend, **opts)
    ref = torch.optim.SGD(theirs, lr=0.05, **opts)
    for _ in range(8):
        grads = [torch.randn_like(p) for p in ours]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    if opts.get("momentum"):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(opt.state[a]["momentum_buffer"],
                                       ref.state[b]["momentum_buffer"], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_geoopt_riemannian_sgd_on_sphere(device):
    """Momentum 0 and unit rows: PSI-SGD is geoopt's RiemannianSGD on its Sphere."""
    w0 = torch.randn(6, 11, dtype=torch.float64, device=device)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    ours = w0.clone().requires_grad_()
    theirs = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.Sphere())
    opt = PSISGD([ours], manifold="channel", lr=0.2)
    gopt = geoopt.optim.RiemannianSGD([theirs], lr=0.2)
    for _ in range(15):
        g = torch.randn_like(w0)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        gopt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)


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


def train(model, opt, batches, steps):
    losses = []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


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


def groups(model, psi):
    conv = [model.c1.weight, model.c2.weight]
    rest = [p for n, p in model.named_parameters() if n not in ("c1.weight", "c2.weight")]
    return [{"params": conv, "manifold": "channel" if psi else None},
            {"params": rest, "manifold": None}]


@pytest.mark.parametrize("nesterov", [False, True])
def test_equivariance_over_100_steps(nesterov):
    """ALGORITHMS.md 7.1: from w0 and from c*w0, every PSI-SGD iterate stays c times the other
    and the losses agree; Euclidean SGD on the same starts does not."""
    torch.set_default_dtype(torch.float64)
    try:
        model = ConvBN()
        batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(4)]
        results = {}
        for psi in (True, False):
            a = copy.deepcopy(model)
            b, factors = rescaled_copy(model)
            kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov)
            la = train(a, PSISGD(groups(a, psi), **kw), batches, 100)
            lb = train(b, PSISGD(groups(b, psi), **kw), batches, 100)
            gap = max(((getattr(b, n).weight / factors[n].view(-1, 1, 1, 1)
                        - getattr(a, n).weight).abs().max() / getattr(a, n).weight.abs().max())
                      .item() for n in ("c1", "c2"))
            results[psi] = (gap, max(abs(x - y) for x, y in zip(la, lb)), la)
        gap, loss_gap, losses = results[True]
        assert gap < 1e-8 and loss_gap < 1e-8, results[True][:2]
        assert losses[-1] < losses[0]  # it trains
        gap, loss_gap, _ = results[False]
        assert gap > 1e-2 and loss_gap > 1e-3, results[False][:2]
    finally:
        torch.set_default_dtype(torch.float32)


def test_fused_and_reference_backends_agree_on_a_model():
    model = ConvBN()
    twin = copy.deepcopy(model)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    kw = dict(lr=0.1, momentum=0.9, retraction="exp", transport="parallel", max_grad_norm=1.0)
    la = train(model, PSISGD(groups(model, True), backend="fused", **kw), batches, 10)
    lb = train(twin, PSISGD(groups(twin, True), backend="reference", **kw), batches, 10)
    assert la == pytest.approx(lb, rel=1e-4)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# PSISGD and PSIAdam share these contract tests (the Adam-specific ones are in test_psi_adam.py).
MAKERS = {
    "psisgd": lambda params: PSISGD(params, lr=0.1, momentum=0.9),
    "psiadam": lambda params: PSIAdam(params, lr=0.02),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_closure_and_zero_grad(make):
    model = ConvBN()
    opt = make(groups(model, True))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(5):
        last = opt.step(closure).item()
    assert last < first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_for_bit(dtype):
    model = ConvBN().to(dtype)
    batches = [(torch.randn(8, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (8,)))
               for _ in range(3)]
    kw = dict(lr=0.1, momentum=0.9, nesterov=True)
    opt = PSISGD(groups(model, True), **kw)
    train(model, opt, batches, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, batches, 5)

    buf.seek(0)
    saved = torch.load(buf)
    resumed = ConvBN().to(dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = PSISGD(groups(resumed, True), **kw)
    opt2.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        assert opt2.state[p]["momentum_buffer"].dtype == torch.float32
    train(resumed, opt2, batches, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
        assert torch.equal(opt.state[p]["step"], opt2.state[q]["step"])


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_grad_scaler_inf_step_changes_nothing(make):
    model = ConvBN()
    opt = make(groups(model, True))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))

    def scaled_step(poison=False):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if poison:
            model.c2.weight.grad[0, 0, 0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    scaled_step()
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    scaled_step(poison=True)
    assert scaler.get_scale() == 2.0**9
    for p, q, st in zip(model.parameters(), params, state):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v)
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_grad_scaler_step_equals_unscaled_step(make):
    model = ConvBN()
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = make(groups(model, True))
    opt2 = make(groups(twin, True))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt2.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.c1.weight, start[0])  # the scaled steps did move


def test_bad_group_options_raise():
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['manifold'\] must be"):
        PSISGD([{"params": [w], "manifold": "sphere"}], lr=0.1)
    with pytest.raises(ValueError, match=r"transport='parallel' needs retraction='exp'"):
        PSISGD([w], manifold="channel", lr=0.1, transport="parallel")
    with pytest.raises(ValueError, match=r"\['lr'\] must be >= 0"):
        PSISGD([w], manifold="channel", lr=-0.1)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        PSISGD([w], manifold="channel", lr=0.1, backend="triton")
    with pytest.raises(ValueError, match=r"max_grad_norm"):
        PSISGD([w], manifold="channel", lr=0.1, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"dtype torch.int64"):
        PSISGD([torch.zeros(3, 3, dtype=torch.int64)], manifold="channel", lr=0.1)


def test_sparse_grad_raises_and_changes_nothing():
    emb = nn.Embedding(10, 4, sparse=True)
    dense = torch.randn(5, 3, requires_grad=True)
    opt = PSISGD([{"params": [dense], "manifold": "channel"}, {"params": emb.parameters(), "manifold": None}],
                 lr=0.1, momentum=0.9)
    before = (dense.detach().clone(), emb.weight.detach().clone())
    dense.grad = torch.randn(5, 3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\] has a sparse"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(emb.weight, before[1])
    assert len(opt.state) == 0


def test_weight_decay_on_psi_group_warns_and_is_ignored():
    w = torch.randn(4, 6)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    g = tangent_grad_like(w, "channel")
    a.grad, b.grad = g.clone(), g.clone()
    with pytest.warns(UserWarning, match="weight_decay has no meaning"):
        PSISGD([a], manifold="channel", lr=0.1, weight_decay=0.5).step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PSISGD([b], manifold="channel", lr=0.1).step()
    assert torch.equal(a, b)


def test_vector_in_channel_group_warns():
    with pytest.warns(UserWarning, match="cannot move"):
        PSISGD([torch.randn(7, requires_grad=True)], manifold="channel", lr=0.1)


def test_maximize_flips_the_step():
    w = torch.randn(5, 9, dtype=torch.float64)
    g = tangent_grad_like(w, "channel")
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    a.grad, b.grad = g.clone(), -g
    PSISGD([a], manifold="channel", lr=0.1, maximize=True).step()
    PSISGD([b], manifold="channel", lr=0.1).step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
