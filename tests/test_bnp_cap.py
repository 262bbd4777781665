"""BNPSGD's step cap (``max_update``, docs/ALGORITHMS.md section 4): the per-unit norms against the
input-normalized layer built by hand (autograd as the oracle), one capped step against the
normalized-coordinate step with each unit's gradient scaled by its closed-form factor, the bound
it guarantees, fused against reference, GradScaler, options, and the learning-rate robustness it
exists for (a BatchNorm-free net at a learning rate where the uncapped step diverges)."""
import copy

import pytest
import torch
from torch import nn

import psi_cuda
from psi_cuda import reference
from psi_cuda.optim import BNPSGD
from helpers import DEVICES

EPS = 1e-5

LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (12, 7)),
    "linear-nobias": (lambda: nn.Linear(7, 5, bias=False), (12, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (5, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), (4, 3, 7, 6)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 2, groups=2), (3, 4, 5, 5)),
    "conv2d-nobias": (lambda: nn.Conv2d(3, 4, 3, bias=False), (4, 3, 6, 6)),
}


def normalized_layer(layer, mean, var, centered):
    """(W~, b~, D per row) of the input-normalized layer computing the same output:
    x_hat = D^-1 (x - mu) (x / sqrt(s + eps) without a bias), W~ = W D, b~ = b + W mu."""
    d = torch.sqrt(var + EPS)
    shift = mean if centered else torch.zeros_like(mean)
    W = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    out, cin_g = W.shape[:2]
    view = (out, cin_g) + (1,) * (W.dim() - 2)
    d_oc = d.view(groups, cin_g).repeat_interleave(out // groups, 0).view(view)
    sh_oc = shift.view(groups, cin_g).repeat_interleave(out // groups, 0).view(view)
    Wt = (W * d_oc).clone().requires_grad_(True)
    bt = None
    if layer.bias is not None:
        bt = (layer.bias.detach() + (W * sh_oc).flatten(1).sum(1)).clone().requires_grad_(True)
    return Wt, bt, d, shift, d_oc, sh_oc


def normalized_forward(layer, x, Wt, bt, d, shift):
    conv = layer.weight.dim() > 2
    cshape = [1] * x.dim()
    cshape[1 if conv else x.dim() - 1] = -1
    x_hat = (x - shift.view(cshape)) / d.view(cshape)
    if not conv:
        return nn.functional.linear(x_hat, Wt, bt)
    fn = {3: nn.functional.conv1d, 4: nn.functional.conv2d}[x.dim()]
    return fn(x_hat, Wt, bt, groups=getattr(layer, "groups", 1))


def setup(name):
    make, xshape = LAYERS[name]
    torch.manual_seed(3)
    layer = make().double()
    x = torch.randn(xshape, dtype=torch.float64) * 2 + 0.7
    target = torch.randn_like(layer(x))
    loss_fn = lambda z: (torch.tanh(z) * target).sum() + 0.5 * (z ** 2).mean()  # noqa: E731
    return layer, x, loss_fn


@pytest.mark.parametrize("name", list(LAYERS))
def test_unit_norms_are_those_of_the_normalized_layer(name):
    """bnp_unit_norms = the row norms of W~ and of dL/dW~ of the input-normalized layer, built
    by hand and differentiated by autograd (float64, 1e-10)."""
    layer, x, loss_fn = setup(name)
    bnp = psi_cuda.BNP(layer, backend="reference")
    loss_fn(layer(x)).backward()
    st = bnp.layers[0]
    mean, s = st.mean.double(), st.sqmean.double()
    centered = layer.bias is not None
    var = s - mean * mean if centered else s
    Wt, bt, d, shift, _, _ = normalized_layer(layer, mean, var, centered)
    loss_fn(normalized_forward(layer, x, Wt, bt, d, shift)).backward()
    w_norm, g_norm = reference.bnp_unit_norms(
        layer.weight, layer.weight.grad, layer.bias.grad if centered else None, st.mean,
        st.sqmean, groups=getattr(layer, "groups", 1), eps=EPS)
    torch.testing.assert_close(w_norm, Wt.detach().flatten(1).norm(dim=1), rtol=1e-10, atol=0)
    torch.testing.assert_close(g_norm, Wt.grad.flatten(1).norm(dim=1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("lr", [1e-6, 0.3, 30.0])
def test_capped_step_is_the_scaled_normalized_step(name, backend, lr):
    """One capped BNPSGD step (no momentum) = one SGD step in the normalized coordinates with
    each unit's gradient (weight row and bias) scaled by c_o = min(1, tau max(|W~_o|, floor) /
    (lr |dL/dW~_o|)), mapped back; and it moves no unit's W~ by more than
    tau max(|W~_o|, floor). lr 1e-6: no unit capped (the exact BNP step); 30: every unit."""
    tau, floor = 1e-3, 1.0
    layer, x, loss_fn = setup(name)
    ref_layer = copy.deepcopy(layer)
    opt = BNPSGD(layer, lr=lr, backend=backend, max_update=tau, update_floor=floor)
    loss_fn(layer(x)).backward()
    st = opt.bnp.layers[0]
    mean, s = st.mean.double(), st.sqmean.double()
    centered = layer.bias is not None
    var = s - mean * mean if centered else s
    Wt, bt, d, shift, d_oc, sh_oc = normalized_layer(ref_layer, mean, var, centered)
    loss_fn(normalized_forward(ref_layer, x, Wt, bt, d, shift)).backward()
    w_norm = Wt.detach().flatten(1).norm(dim=1)
    g_norm = Wt.grad.flatten(1).norm(dim=1)
    c = torch.clamp(tau * w_norm.clamp_min(floor) / (lr * g_norm), max=1.0)
    cw = c.view((-1,) + (1,) * (Wt.dim() - 1))
    with torch.no_grad():
        Wt_new = Wt - lr * cw * Wt.grad
        W_expect = Wt_new / d_oc
        if centered:
            bt_new = bt - lr * c * bt.grad
            b_expect = bt_new - (W_expect * sh_oc).flatten(1).sum(1)
    opt.step()
    assert (layer.weight.detach() - W_expect).abs().max() < 1e-10
    if centered:
        assert (layer.bias.detach() - b_expect).abs().max() < 1e-10
    # The bound, from the new weights alone: |W~_new - W~| <= tau max(|W~|, floor).
    moved = ((layer.weight.detach() - ref_layer.weight.detach()) * d_oc).flatten(1).norm(dim=1)
    assert bool((moved <= tau * w_norm.clamp_min(floor) * (1 + 1e-9)).all())
    if lr == 1e-4:
        assert bool((c == 1).all())
    if lr == 30.0:
        assert bool((c < 1).all())


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.LayerNorm(5))


def data(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 3, 8, 8, generator=g) * 0.2 + 0.5, torch.randint(0, 5, (16,), generator=g)


def run(model, opt, steps, scaler=None, dtype=None):
    for it in range(steps):
        x, y = data(it)
        if dtype is not None:
            x = x.to(dtype)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("opts", [dict(momentum=0.0), dict(momentum=0.9, nesterov=True,
                                                           weight_decay=1e-3),
                                  dict(momentum=0.9, dampening=0.2, maximize=True)],
                         ids=["plain", "nesterov-wd", "dampening-maximize"])
def test_capped_bnpsgd_equals_precondition_cap_then_torch_sgd(opts):
    """The capped BNPSGD = precondition_() + each unit's preconditioned gradient scaled by its
    factor (computed here from the gradients before preconditioning) + torch.optim.SGD."""
    m0 = cnn().double()
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    opt_a = BNPSGD(a, lr=0.5, max_update=1e-3, **opts)
    bnp_b = psi_cuda.BNP(b)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5, **opts)
    capped = 0
    for it in range(4):
        x, y = data(it)
        opt_a.zero_grad()
        nn.functional.cross_entropy(a(x.double()), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        nn.functional.cross_entropy(b(x.double()), y).backward()
        with torch.no_grad():
            facs = []
            for l in bnp_b.layers:
                m = l.module
                gb = m.bias.grad if m.bias is not None else None
                wn, gn = reference.bnp_unit_norms(m.weight, m.weight.grad, gb, l.mean, l.sqmean,
                                                  groups=l.groups, eps=bnp_b.eps)
                facs.append(torch.clamp(1e-3 * wn.clamp_min(1.0) / (0.5 * gn), max=1.0))
            bnp_b.precondition_()
            for l, f in zip(bnp_b.layers, facs):
                capped += int((f < 1).sum())
                l.module.weight.grad.mul_(f.view(-1, *([1] * (l.module.weight.dim() - 1))))
                if l.module.bias is not None:
                    l.module.bias.grad.mul_(f)
        opt_b.step()
    assert capped > 0
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_capped_step_fused_matches_reference(device, dtype):
    torch.manual_seed(1)
    m0 = cnn().to(device=device, dtype=dtype)
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, max_update=2e-3)
    opt_a = BNPSGD(a, backend="fused", **kw)
    opt_b = BNPSGD(b, backend="reference", **kw)

    def go(model, opt):  # bf16: one step (later bf16 forwards amplify one-ulp differences)
        for it in range(1 if dtype == torch.bfloat16 else 4):
            x, y = data(it)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device, dtype)).float(), y.to(device)).backward()
            opt.step()

    go(a, opt_a)
    go(b, opt_b)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_cap_that_never_binds_is_the_exact_step_bit_for_bit():
    """At a learning rate where every factor is 1 the capped optimizer is the uncapped one."""
    m0 = cnn()
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    run(a, BNPSGD(a, lr=1e-7, momentum=0.9, max_update=1e-3), 3)
    run(b, BNPSGD(b, lr=1e-7, momentum=0.9, max_update=None), 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_capped_step_with_grad_scaler_equals_unscaled_step():
    """The factors use the unscaled gradient: a GradScaler run = a plain run."""
    torch.manual_seed(3)
    m0 = cnn()
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    opt_a = BNPSGD(a, lr=0.5, momentum=0.9, max_update=1e-3)
    opt_b = BNPSGD(b, lr=0.5, momentum=0.9, max_update=1e-3)
    run(a, opt_a, 3, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    run(b, opt_b, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cap_options_checked_and_saved():
    model = cnn()
    with pytest.raises(ValueError, match=r"\['max_update'\] must be None or >= 0"):
        BNPSGD(model, lr=0.1, max_update=-1.0)
    with pytest.raises(ValueError, match=r"\['update_floor'\] must be > 0"):
        BNPSGD(model, lr=0.1, update_floor=0.0)
    opt = BNPSGD(model, lr=0.1, max_update=5e-3, update_floor=0.5)
    assert opt.param_groups[0]["max_update"] == 5e-3
    assert opt.param_groups[0]["update_floor"] == 0.5
    other = BNPSGD(cnn(), lr=0.1)
    assert other.param_groups[0]["max_update"] == 1e-3  # the default
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["max_update"] == 5e-3
    assert BNPSGD(cnn(), lr=0.1, max_update=None).param_groups[0]["max_update"] is None


def test_cap_keeps_a_batchnorm_free_resnet_training_where_the_exact_step_diverges():
    """The reason for the cap: the demo's BatchNorm-free ResNet on digits, 2 epochs at a constant
    lr 0.3, batch 64, momentum 0.9. Uncapped BNP-SGD diverges (its usable lrs end near 2e-3);
    with the default cap the loss falls."""
    from psi_cuda.apps.data import load_dataset
    from psi_cuda.apps.models import SmallResNet

    tx, ty, _, _ = load_dataset("digits", None, split_seed=0)
    last = {}
    for cap in (None, BNPSGD(nn.Linear(1, 1)).defaults["max_update"]):
        torch.manual_seed(0)
        model = SmallResNet(norm=False)
        opt = BNPSGD(model, lr=0.3, momentum=0.9, weight_decay=5e-4, max_update=cap)
        order = torch.randperm(ty.numel(), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(2):
            for start in range(0, ty.numel(), 64):
                idx = order[start:start + 64]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(tx[idx]), ty[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
        last[cap] = sum(losses[-10:]) / 10
    uncapped, capped = last[None], last[1e-3]
    assert not uncapped < 2.3  # diverged (inf/NaN, or worse than chance)
    assert capped < 1.0


def test_cap_op_opcheck():
    """The cap is a custom op (opaque to torch.compile): schema, fake and autograd registration."""
    torch.manual_seed(4)
    weights = [torch.randn(5, 7), torch.randn(6, 2, 3, 3)]
    grads = [torch.randn_like(w) for w in weights]
    bgrads = [torch.randn(5), torch.randn(6)]
    means = [torch.randn(7), torch.randn(4)]
    sqs = [m * m + 0.5 for m in means]
    psi_cuda.ops._bnp_cap_grads  # registered on import
    torch.library.opcheck(torch.ops.psi_cuda.bnp_cap_grads.default,
                          (weights, grads, bgrads, means, sqs, [1, 2], EPS, 0.3, 1e-3, 1.0,
                           torch.tensor(4.0)))
    wg, bg = psi_cuda.ops.bnp_cap_grads(weights, grads, bgrads, means, sqs, groups=[1, 2],
                                         eps=EPS, lr=0.3, max_update=1e-3, floor=1.0)
    caps = reference.bnp_update_caps(weights, grads, bgrads, means, sqs, groups=[1, 2], eps=EPS,
                                     lr=0.3, max_update=1e-3, floor=1.0)
    for g, s, c in zip(grads + bgrads, wg + bg, caps + caps):
        torch.testing.assert_close(s, g * c.view((-1,) + (1,) * (g.dim() - 1)))
