"""BNP (docs/ALGORITHMS.md section 4): exactness against normalized-coordinate descent, statistics
against torch.var_mean / torch.cov, the fused ops against the reference, the optimizer contract."""
import copy

import pytest
import torch
from torch import nn

import psi_cuda
from psi_cuda import ops, reference
from helpers import DEVICES, assert_close_rel, state_dtype

EPS = 1e-5
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def batch_stats(x, channel_dim):
    """Oracle: torch.var_mean (population variance) over every dimension but the channel one."""
    dims = reference.stats_dims(x, channel_dim)
    if not dims:  # one sample of a 1-D input: dim=[] would reduce everything
        return x.double(), torch.zeros_like(x, dtype=torch.float64)
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    return mean, var


def stats_of(layer):
    mean, s = layer.mean.double(), layer.sqmean.double()
    return mean, s - mean * mean


# ------------------------------------------------------------------ exactness (the oracle)


def normalized_step(layer, x, loss_fn, lr, mean, var, centered, eps=EPS):
    """One plain SGD step on the input-normalized layer, mapped back to (W, b).

    x_hat = D^-1 (x - mu), D = diag(sqrt(var + eps)) (centered); x_hat = x / sqrt(s + eps)
    otherwise. W~ = W D and b~ = b + W mu make the normalized layer compute the same output."""
    d = torch.sqrt(var + eps)  # uncentered (no bias): var is the mean square s
    shift = mean if centered else torch.zeros_like(mean)
    conv = layer.weight.dim() > 2
    groups = getattr(layer, "groups", 1)
    W = layer.weight.detach()
    cin_g = W.size(1)
    out = W.size(0)
    per_group = out // groups
    # Per (output channel, channel in group): the input channel's d and shift.
    d_oc = d.view(groups, cin_g).repeat_interleave(per_group, 0)
    sh_oc = shift.view(groups, cin_g).repeat_interleave(per_group, 0)
    view = (out, cin_g) + (1,) * (W.dim() - 2)
    Wt = (W * d_oc.view(view)).clone().requires_grad_(True)
    bt = None
    if layer.bias is not None:
        bt = (layer.bias.detach() + (W * sh_oc.view(view)).flatten(1).sum(1)).clone()
        bt.requires_grad_(True)
    cshape = [1] * x.dim()
    cd = 1 if conv else x.dim() - 1
    cshape[cd] = -1
    x_hat = (x - shift.view(cshape)) / d.view(cshape)
    if conv:
        fn = {3: nn.functional.conv1d, 4: nn.functional.conv2d, 5: nn.functional.conv3d}[x.dim()]
        z = fn(x_hat, Wt, bt, groups=groups)
    else:
        z = nn.functional.linear(x_hat, Wt, bt)
    loss_fn(z).backward()
    with torch.no_grad():
        Wt_new = Wt - lr * Wt.grad
        W_new = Wt_new / d_oc.view(view)
        b_new = None
        if bt is not None:
            b_new = bt - lr * bt.grad - (W_new * sh_oc.view(view)).flatten(1).sum(1)
    return W_new, b_new


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (12, 7)),
    "linear-3d-input": (lambda: nn.Linear(6, 4), (3, 5, 6)),
    "linear-nobias": (lambda: nn.Linear(7, 5, bias=False), (12, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (5, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), (4, 3, 7, 6)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 2, groups=2), (3, 4, 5, 5)),
    "conv2d-nobias": (lambda: nn.Conv2d(3, 4, 3, bias=False), (4, 3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 3)),
}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_bnp_step_equals_normalized_coordinate_step(name, backend):
    """After one training forward the statistics are the batch's mean and population variance,
    and precondition_() + one plain SGD step equals one plain SGD step in the input-normalized
    coordinates mapped back (float64, tolerance 1e-10; padding 0 so the identity is exact)."""
    make, xshape = LAYERS[name]
    layer = make().double()
    x = (torch.randn(xshape, dtype=torch.float64) * 2 + 0.7)
    target = torch.randn_like(layer(x))
    loss_fn = lambda z: (torch.tanh(z) * target).sum() + 0.5 * (z ** 2).mean()  # noqa: E731
    bnp = psi_cuda.BNP(layer, backend=backend)
    layer.train()
    z = layer(x)
    channel_dim = 1 if layer.weight.dim() > 2 else -1
    mean, var = batch_stats(x, channel_dim)
    got_mean, got_var = stats_of(bnp.layers[0])
    torch.testing.assert_close(got_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_var, var, rtol=0, atol=1e-12)

    centered = layer.bias is not None
    s = bnp.layers[0].sqmean.double()
    W_expect, b_expect = normalized_step(layer, x, loss_fn, 0.3, mean,
                                         var if centered else s, centered)
    loss_fn(z).backward()
    bnp.precondition_()
    torch.optim.SGD(layer.parameters(), lr=0.3).step()
    assert (layer.weight.detach() - W_expect).abs().max() < 1e-10
    if centered:
        assert (layer.bias.detach() - b_expect).abs().max() < 1e-10


# ------------------------------------------------------------------ statistics


STAT_INPUTS = [  # (input shape, channel_dim, channels_last)
    ((16, 7), -1, False),
    ((4, 5, 6), -1, False),
    ((9,), 0, False),
    ((6, 3, 11), 1, False),
    ((5, 4, 7, 6), 1, False),
    ((5, 4, 7, 6), 1, True),
    ((3, 16, 3, 3), 1, True),
    ((2, 3, 4, 5, 3), 1, False),
    ((3, 7, 5), 0, False),  # unbatched conv1d input (C, L)
    ((1, 3, 300, 300), 1, False),  # many elements per channel: parallel chunks
    ((40000, 3), -1, False),  # many rows: parallel row blocks
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channel_dim,channels_last", STAT_INPUTS)
def test_stats_first_update_equals_var_mean(device, shape, channel_dim, channels_last):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = x.shape[channel_dim]
    mean = torch.zeros(C, dtype=torch.float64, device=device)
    sq = torch.ones(C, dtype=torch.float64, device=device)
    step = torch.zeros((), device=device)
    ops.bnp_update_stats_(x, mean, sq, step, channel_dim=channel_dim, momentum=0.1)
    m, v = batch_stats(x, channel_dim)
    torch.testing.assert_close(mean, m, rtol=0, atol=1e-12)
    torch.testing.assert_close(sq - mean * mean, v, rtol=1e-12, atol=1e-12)
    assert step.item() == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 0.01, 1.0])
def test_stats_batch_size_one_over_many_steps(device, momentum):
    """Batch size 1, 300 steps: the statistics are the bias-corrected exponential average, i.e.
    the weighted mean and weighted population variance (torch.cov with aweights) of the samples
    with weights rho (1 - rho)^(T - t)."""
    T, C = 300, 5
    xs = torch.randn(T, 1, C, 4, 4, dtype=torch.float64, device=device) * torch.linspace(
        0.5, 3, C, dtype=torch.float64, device=device).view(1, 1, C, 1, 1) + 2
    layer = nn.Conv2d(C, 2, 1).double().to(device)
    bnp = psi_cuda.BNP(layer, momentum=momentum)
    for t in range(T):
        layer(xs[t])
    w = momentum * (1 - momentum) ** torch.arange(T - 1, -1, -1, dtype=torch.float64)
    w = (w / w.sum()).to(device)
    per_sample = xs.squeeze(1).permute(1, 0, 2, 3).reshape(C, T, 16)  # (C, T, positions)
    samples = per_sample.reshape(C, T * 16)
    weights = w.repeat_interleave(16)
    mean = (samples * weights).sum(1) / weights.sum()
    var = torch.stack([torch.cov(samples[c], aweights=weights, correction=0) for c in range(C)])
    got_mean, got_var = stats_of(bnp.layers[0])
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_var, var, rtol=1e-9, atol=1e-10)
    assert bnp.layers[0].step.item() == T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channel_dim,channels_last", STAT_INPUTS[:9])
def test_stats_fused_matches_reference(device, dtype, shape, channel_dim, channels_last):
    sdt = state_dtype(dtype)
    x0 = torch.randn(shape, device=device) * 2 + 0.5
    C = x0.shape[channel_dim]
    fused = [torch.zeros(C, dtype=sdt, device=device), torch.ones(C, dtype=sdt, device=device),
             torch.zeros((), device=device)]
    ref = [t.clone() for t in fused]
    for i in range(4):
        x = (x0 * (1 + 0.1 * i)).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ops.bnp_update_stats_(x, *fused, channel_dim=channel_dim, momentum=0.2)
        reference.bnp_update_stats_(x, *ref, channel_dim=channel_dim, momentum=0.2)
    tol = {torch.float64: 1e-12}.get(sdt, 1e-6)
    for a, e in zip(fused, ref):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_non_contiguous_input(device):
    x = torch.randn(6, 10, 4, dtype=torch.float64, device=device).transpose(0, 2)  # (4, 10, 6)
    assert not x.is_contiguous()
    st = [torch.zeros(10, dtype=torch.float64, device=device),
          torch.ones(10, dtype=torch.float64, device=device), torch.zeros((), device=device)]
    ops.bnp_update_stats_(x, *st, channel_dim=1, momentum=0.1)
    m, v = batch_stats(x, 1)
    torch.testing.assert_close(st[0], m, rtol=0, atol=1e-12)
    torch.testing.assert_close(st[1] - st[0] ** 2, v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_empty_batch_changes_nothing(device):
    st = [torch.full((3,), 0.5, device=device), torch.full((3,), 2.0, device=device),
          torch.full((), 4.0, device=device)]
    before = [t.clone() for t in st]
    ops.bnp_update_stats_(torch.empty(0, 3, device=device), *st, channel_dim=-1, momentum=0.1)
    for a, b in zip(st, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_stats_batches_counts_every_nonempty_batch(backend, device):
    """``batches`` (optional) counts every non-empty batch, a non-finite one included, in the
    same call; ``step`` only those that entered the averages; an empty batch neither."""
    fn = ops.bnp_update_stats_ if backend == "fused" else reference.bnp_update_stats_
    torch.manual_seed(0)
    x = torch.randn(16, 5, device=device)
    st = [torch.zeros(5, device=device), torch.ones(5, device=device),
          torch.zeros((), device=device)]
    batches = torch.zeros((), device=device)
    poisoned = x.clone()
    poisoned[3, 2] = float("nan")
    for inp in (x, poisoned, x[:0], x * 2, poisoned):
        fn(inp, *st, channel_dim=-1, momentum=0.1, batches=batches)
    assert batches.item() == 4.0 and st[2].item() == 2.0
    twin = [torch.zeros(5, device=device), torch.ones(5, device=device),
            torch.zeros((), device=device)]
    for inp in (x, x * 2):  # without batches: the same averages
        fn(inp, *twin, channel_dim=-1, momentum=0.1)
    for a, b in zip(st, twin):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["rows", "planes"])  # Linear input; NCHW conv input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_stats_nonfinite_batch_changes_nothing(backend, bad, layout, device):
    """A batch holding one inf or NaN does not enter the averages (it would poison them for
    good) and does not count as a step; the next finite batch blends as if it had not been."""
    fn = ops.bnp_update_stats_ if backend == "fused" else reference.bnp_update_stats_
    shape, cd = ((64, 5), -1) if layout == "rows" else ((4, 5, 6, 6), 1)
    torch.manual_seed(0)
    x1, x2 = torch.randn(shape, device=device), torch.randn(shape, device=device) + 1
    st = [torch.zeros(5, device=device), torch.ones(5, device=device),
          torch.zeros((), device=device)]
    twin = [t.clone() for t in st]
    fn(x1, *st, channel_dim=cd, momentum=0.1)
    fn(x1, *twin, channel_dim=cd, momentum=0.1)
    before = [t.clone() for t in st]
    poisoned = x2.clone()
    poisoned.view(-1)[7] = bad
    fn(poisoned, *st, channel_dim=cd, momentum=0.1)
    assert all(torch.equal(a, b) for a, b in zip(st, before))
    fn(x2, *st, channel_dim=cd, momentum=0.1)
    fn(x2, *twin, channel_dim=cd, momentum=0.1)
    assert all(torch.equal(a, b) for a, b in zip(st, twin))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_bnp_counts_nonfinite_batches(backend):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    bnp = psi_cuda.BNP(model, backend=backend)
    x = torch.randn(5, 2, 4, 4)
    model(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    model(bad)  # both layers see NaN (it propagates through the conv)
    model(torch.empty(0, 2, 4, 4))  # empty: not counted
    model(x)
    assert bnp.nonfinite_batches() == {"0": 1, "3": 1}
    assert all(torch.isfinite(l.mean).all() and l.step.item() == 2 for l in bnp.layers)
    other = psi_cuda.BNP(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(12, 4)), backend=backend)
    other.load_state_dict(bnp.state_dict())
    assert other.nonfinite_batches() == {"0": 1, "3": 1}
    old = bnp.state_dict()
    for entry in old["layers"].values():  # a state saved before the counter existed
        del entry["batches"]
    other.load_state_dict(old)
    assert other.nonfinite_batches() == {"0": 0, "3": 0}


def test_eval_mode_and_removed_hooks_leave_statistics_untouched():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    bnp = psi_cuda.BNP(model)
    x = torch.randn(5, 2, 4, 4)
    model(x)
    saved = bnp.state_dict()
    model.eval()
    model(x + 1)
    after = bnp.state_dict()
    for name in saved["layers"]:
        for key in ("mean", "sqmean", "step"):
            assert torch.equal(saved["layers"][name][key], after["layers"][name][key])
    model.train()
    bnp.remove()
    model(x + 1)
    for name in saved["layers"]:
        assert torch.equal(saved["layers"][name]["step"], bnp.state_dict()["layers"][name]["step"])
    assert [l.name for l in bnp.layers] == ["0", "3"]


# ------------------------------------------------------------------ preconditioning, fused vs reference


PRECOND_LAYERS = [  # (weight shape, groups)
    ((5, 7), 1),
    ((64, 129), 1),
    ((6, 4, 3), 1),
    ((8, 3, 3, 3), 1),
    ((6, 2, 3, 3), 2),
    ((12, 1, 3, 3), 12),  # depthwise
    ((4, 16, 1, 1), 1),
    ((3, 2, 2, 2, 2), 1),
    ((0, 3), 1),
]


def make_layers(dtype, device, bias, channels_last=False):
    grads, bgrads, means, sqs, groups = [], [], [], [], []
    for shape, g in PRECOND_LAYERS:
        G = torch.randn(shape, device=device).to(dtype)
        if channels_last and G.dim() == 4:
            G = G.contiguous(memory_format=torch.channels_last)
        grads.append(G)
        bgrads.append(torch.randn(shape[0], device=device).to(dtype))
        C = shape[1] * g
        mu = torch.randn(C, dtype=torch.float64, device=device)
        means.append(mu.to(state_dtype(dtype)))
        sqs.append((mu * mu + torch.rand(C, dtype=torch.float64, device=device) + 0.1)
                   .to(state_dtype(dtype)))
        groups.append(g)
    return grads, (bgrads if bias else []), means, sqs, groups


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_precondition_fused_matches_reference(device, dtype, bias, channels_last):
    grads, bgrads, means, sqs, groups = make_layers(dtype, device, bias, channels_last)
    f = ([g.clone() for g in grads], [g.clone() for g in bgrads])
    r = ([g.clone() for g in grads], [g.clone() for g in bgrads])
    ops.bnp_precondition_(*f, means, sqs, groups=groups, eps=EPS)
    reference.bnp_precondition_(*r, means, sqs, groups=groups, eps=EPS)
    for i, (a, e) in enumerate(zip(f[0] + f[1], r[0] + r[1])):
        assert a.stride() == (grads + bgrads)[i].stride()
        assert_close_rel(a, e, dtype, f"grad {i} {tuple(a.shape)}")


SGD_OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.8, dampening=0.3, maximize=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_bnp_sgd_fused_matches_reference(device, dtype, bias, opts):
    grads, bgrads, means, sqs, groups = make_layers(dtype, device, bias, channels_last=True)
    weights = [torch.randn_like(g, dtype=torch.float32).to(dtype) for g in grads]
    biases = [torch.randn_like(g, dtype=torch.float32).to(dtype) for g in bgrads]
    sdt = state_dtype(dtype)
    mom = opts["momentum"] != 0

    def state():
        return ([w.clone() for w in weights], [b.clone() for b in biases],
                [torch.zeros_like(w, dtype=sdt) for w in weights] if mom else [],
                [torch.zeros_like(b, dtype=sdt) for b in biases] if mom else [],
                [torch.zeros((), device=device) for _ in weights])

    fw, fb, fwb, fbb, fs = state()
    rw, rb, rwb, rbb, rs = state()
    kw = dict(groups=groups, eps=EPS, lr=0.05, **opts)
    for i in range(3):
        g = [x * (1 + i) for x in grads]
        gb = [x * (1 - i) for x in bgrads]
        ops.bnp_sgd_(fw, fb, g, gb, fwb, fbb, fs, means, sqs, **kw)
        reference.bnp_sgd_(rw, rb, g, gb, rwb, rbb, rs, means, sqs, **kw)
    for i, (a, e) in enumerate(zip(fw + fb + fwb + fbb, rw + rb + rwb + rbb)):
        assert_close_rel(a, e, dtype, f"tensor {i} {tuple(a.shape)}")
    for a, w in zip(fw, weights):
        assert a.stride() == w.stride()
    assert all(s.item() == 3 for s in fs)


@pytest.mark.parametrize("device", DEVICES)
def test_bnp_sgd_grad_scale_and_found_inf(device):
    grads, bgrads, means, sqs, groups = make_layers(torch.float32, device, True)
    weights = [torch.randn_like(g) for g in grads]
    biases = [torch.randn_like(g) for g in bgrads]
    kw = dict(groups=groups, eps=EPS, lr=0.1, momentum=0.9)

    def state():
        return ([w.clone() for w in weights], [b.clone() for b in biases],
                [torch.zeros_like(w) for w in weights], [torch.zeros_like(b) for b in biases],
                [torch.zeros((), device=device) for _ in weights])

    s_inf = state()
    before = [t.clone() for lst in s_inf for t in lst]
    w, b, wb, bb, st = s_inf
    ops.bnp_sgd_(w, b, [g * float("inf") for g in grads], bgrads, wb, bb, st, means, sqs,
                 grad_scale=torch.tensor(8.0, device=device),
                 found_inf=torch.ones((), device=device), **kw)
    for x, y in zip([t for lst in s_inf for t in lst], before):
        assert torch.equal(x, y)
    scaled, plain = state(), state()
    ops.bnp_sgd_(*scaled[:2], [g * 64 for g in grads], [g * 64 for g in bgrads], *scaled[2:],
                 means, sqs, grad_scale=torch.tensor(64.0, device=device),
                 found_inf=torch.zeros((), device=device), **kw)
    ops.bnp_sgd_(*plain[:2], grads, bgrads, *plain[2:], means, sqs, **kw)
    for x, y in zip([t for lst in scaled for t in lst], [t for lst in plain for t in lst]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_opcheck():
    grads, bgrads, means, sqs, groups = make_layers(torch.float32, "cpu", True)
    grads, bgrads, means, sqs, groups = grads[:4], bgrads[:4], means[:4], sqs[:4], groups[:4]
    torch.library.opcheck(torch.ops.psi_cuda.bnp_precondition_.default,
                          (grads, bgrads, means, sqs), dict(groups=groups, eps=EPS))
    weights = [torch.randn_like(g) for g in grads]
    biases = [torch.randn_like(b) for b in bgrads]
    torch.library.opcheck(
        torch.ops.psi_cuda.bnp_sgd_.default,
        (weights, biases, grads, bgrads, [torch.zeros_like(w) for w in weights],
         [torch.zeros_like(b) for b in biases], [torch.zeros(()) for _ in weights], means, sqs),
        dict(groups=groups, eps=EPS, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
             weight_decay=0.0, maximize=False, grad_scale=torch.tensor(2.0),
             found_inf=torch.zeros(())))
    torch.library.opcheck(torch.ops.psi_cuda.bnp_update_stats_.default,
                          (torch.randn(4, 3, 5, 5), torch.zeros(3), torch.ones(3),
                           torch.zeros(())), dict(channel_dim=1, momentum=0.1))
    torch.library.opcheck(torch.ops.psi_cuda.bnp_update_stats_.default,
                          (torch.randn(4, 3, 5, 5), torch.zeros(3), torch.ones(3),
                           torch.zeros(())), dict(channel_dim=1, momentum=0.1,
                                                  batches=torch.zeros(())))


# ------------------------------------------------------------------ bad inputs


def stats_args():
    return [torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3), torch.zeros(())]


BAD_STATS = {
    "mean shape": (lambda a, k: a.__setitem__(1, torch.zeros(4)), r"mean\[0\] must be .* 3 input"),
    "mean dtype": (lambda a, k: a.__setitem__(1, torch.zeros(3, dtype=torch.float16)), r"mean"),
    "sqmean dtype": (lambda a, k: a.__setitem__(2, torch.ones(3, dtype=torch.float64)),
                     r"sqmean is Double but mean is Float"),
    "step": (lambda a, k: a.__setitem__(3, torch.zeros(2)), r"step must be a float32"),
    "int input": (lambda a, k: a.__setitem__(0, torch.ones(4, 3, 5, dtype=torch.int32)),
                  r"input must be float"),
    "channel_dim": (lambda a, k: k.__setitem__("channel_dim", 3), r"channel_dim 3 is out of range"),
    "momentum": (lambda a, k: k.__setitem__("momentum", 0.0), r"momentum must be in \(0, 1\]"),
    "batches dtype": (lambda a, k: k.__setitem__("batches", torch.zeros((), dtype=torch.int64)),
                      r"batches must be a float32 tensor with one element"),
    "batches size": (lambda a, k: k.__setitem__("batches", torch.zeros(2)),
                     r"batches must be a float32 tensor with one element"),
    "batches is step": (lambda a, k: k.__setitem__("batches", a[3]),
                        r"batches and step must be different tensors"),
}


@pytest.mark.parametrize("bad", list(BAD_STATS))
def test_stats_bad_inputs_raise_and_change_nothing(bad):
    args, kw = stats_args(), dict(channel_dim=1, momentum=0.1)
    mutate, match = BAD_STATS[bad]
    mutate(args, kw)
    outs = args[1:] + ([kw["batches"]] if "batches" in kw else [])
    before = [t.clone() for t in outs]
    # Bad options are ValueErrors, bad tensors RuntimeErrors (as in torch).
    with pytest.raises(ValueError if bad in ("channel_dim", "momentum") else RuntimeError,
                       match=match):
        ops.bnp_update_stats_(*args, **kw)
    for a, b in zip(outs, before):
        assert torch.equal(a, b)


BAD_PRECOND = {
    "groups": (lambda c: c[4].__setitem__(4, 4), r"groups\[4\] = 4 must be >= 1 and divide"),
    "means length": (lambda c: c[2].pop(), r"but 8 means"),
    "means size": (lambda c: c[2].__setitem__(3, torch.zeros(5)), r"means\[3\] must be .* 3 input"),
    "bias shape": (lambda c: c[1].__setitem__(2, torch.zeros(5)), r"bias_grads\[2\] must be"),
    "bias count": (lambda c: c[1].pop(), r"got 8 bias_grads for 9 weight_grads"),
    "mixed dtype": (lambda c: c[0].__setitem__(5, c[0][5].double()), r"weight_grads\[5\] is Double"),
    "1-d weight": (lambda c: c[0].__setitem__(1, torch.zeros(64)), r"weight_grads\[1\] has shape"),
    "sparse": (lambda c: c[0].__setitem__(1, c[0][1].to_sparse()), r"weight_grads\[1\] is sparse"),
}


@pytest.mark.parametrize("bad", list(BAD_PRECOND))
def test_precondition_bad_inputs_raise_and_change_nothing(bad):
    case = list(make_layers(torch.float32, "cpu", True))
    case = [list(x) for x in case]
    mutate, match = BAD_PRECOND[bad]
    mutate(case)
    before = [t.clone() for t in case[0] + case[1] if t.layout == torch.strided]
    with pytest.raises(ValueError if bad == "groups" else RuntimeError, match=match):
        ops.bnp_precondition_(case[0], case[1], case[2], case[3], groups=case[4], eps=EPS)
    after = [t for t in case[0] + case[1] if t.layout == torch.strided]
    for a, b in zip(after, before):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.bnp_precondition_(*make_layers(torch.float32, "cpu", True)[:4], groups=[1] * 9,
                              eps=0.0)


def test_bnp_constructor_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match=r"layers\[0\] is a BatchNorm1d"):
        psi_cuda.BNP(model, layers=[model[1]])
    with pytest.raises(ValueError, match=r"layers\[0\] \(Linear\) is not a module of model"):
        psi_cuda.BNP(model, layers=[nn.Linear(3, 4)])
    with pytest.raises(ValueError, match="momentum must be in"):
        psi_cuda.BNP(model, momentum=1.5)
    with pytest.raises(ValueError, match="eps must be > 0"):
        psi_cuda.BNP(model, eps=0)
    with pytest.raises(TypeError, match="first argument must be the model"):
        psi_cuda.optim.BNPSGD(list(model.parameters()), lr=0.1)


# ------------------------------------------------------------------ optimizer contract


def cnn(bias=True):
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5), nn.LayerNorm(5))


def data(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("opts", [dict(momentum=0.0), dict(momentum=0.9, nesterov=True,
                                                           weight_decay=1e-3),
                                  dict(momentum=0.9, dampening=0.2, maximize=True)],
                         ids=["plain", "nesterov-wd", "dampening-maximize"])
def test_bnpsgd_equals_precondition_then_torch_sgd(backend, opts):
    """Without the step cap (max_update=None; the capped step: tests/test_bnp_cap.py)."""
    m0 = cnn().double()
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    opt_a = psi_cuda.optim.BNPSGD(a, lr=0.05, backend=backend, max_update=None, **opts)
    bnp_b = psi_cuda.BNP(b, backend=backend)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, **opts)
    for it in range(5):
        x, y = data(it)
        for model, opt, bnp in ((a, opt_a, None), (b, opt_b, bnp_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
            if bnp is not None:
                bnp.precondition_()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # The LayerNorm's parameters are not preconditioned layers: plain SGD for them.
    assert len(opt_a.bnp.layers) == 3


def train_steps(model, opt, steps, start=0, scaler=None):
    for it in range(start, start + steps):
        x, y = data(it)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def test_bnp_state_dict_round_trip_and_mismatch():
    model = cnn()
    bnp = psi_cuda.BNP(model, momentum=0.3)
    model(data(0)[0])
    other = psi_cuda.BNP(cnn(), momentum=0.1)
    other.load_state_dict(bnp.state_dict())
    assert other.momentum == 0.3
    for la, lb in zip(bnp.layers, other.layers):
        assert torch.equal(la.mean, lb.mean) and torch.equal(la.step, lb.step)
    smaller = psi_cuda.BNP(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match="layers differ"):
        smaller.load_state_dict(bnp.state_dict())


def test_precondition_works_with_any_optimizer():
    """precondition_() only rewrites .grad: torch.optim.AdamW then steps on the BNP gradient
    (oracle: AdamW fed the reference-preconditioned gradients)."""
    m0 = cnn().double()
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    bnp_a = psi_cuda.BNP(a)
    bnp_b = psi_cuda.BNP(b, backend="reference")
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for it in range(3):
        x, y = data(it)
        for model, opt, bnp in ((a, opt_a, bnp_a), (b, opt_b, bnp_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
            bnp.precondition_()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


def test_bnp_and_psi_groups_in_one_model_with_psiadam():
    """docs/ALGORITHMS.md section 5: a conv feeding BatchNorm is a PSI group, the BN-free conv and the
    classifier are BNP-preconditioned, both under one PSIAdam (AdamW for the Euclidean groups).
    Fused kernels against the pure-torch reference of every op, float64."""
    def make():
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 5)).double()

    runs = []
    for backend in ("fused", "reference"):
        model = make()
        groups = psi_cuda.param_groups(model, lr=1e-2)
        assert any(g.get("manifold") == "channel" for g in groups)
        bnp = psi_cuda.BNP(model, layers=[model[3], model[6]], backend=backend)
        opt = psi_cuda.optim.PSIAdam(groups, lr=1e-2, backend=backend)
        losses = []
        for it in range(5):
            x, y = data(it)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x.double()), y)
            loss.backward()
            bnp.precondition_()
            opt.step()
            losses.append(loss.item())
        runs.append((model, losses))
    (a, la), (b, lb) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert la == pytest.approx(lb, rel=1e-9)
    assert la[-1] < la[0]
