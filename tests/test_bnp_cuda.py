"""BNP ops: the CUDA kernels against the CPU kernels (their semantic reference), over shapes,
layouts, dtypes and options. Skipped without a GPU."""
import pytest
import torch

from psi_cuda import ops
from helpers import HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA or not ops.has_cuda_kernels(),
                                reason="no GPU or no CUDA kernels in this build")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6),
       torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol)


def on(device, ts):
    return [t.to(device) for t in ts]


# (shape, channel_dim, memory format or "t" for a transposed (non-contiguous) input)
STATS_CASES = [
    ((5, 7), -1, None), ((3,), 0, None), ((1, 9), 1, None), ((2000, 3), 1, None),
    ((64, 1000), 1, None), ((4, 33, 70), 1, None), ((2, 3, 5, 5), 1, None),
    ((2, 3, 5, 5), 1, torch.channels_last), ((2, 5, 3, 4, 2), 1, torch.channels_last_3d),
    ((3, 2, 40000), 1, None), ((7, 5), 0, "t"), ((0, 5), 1, None), ((3, 0, 4), 1, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", STATS_CASES)
def test_update_stats_matches_cpu(case, dtype):
    shape, cd, fmt = case
    sdt = opmath(dtype)
    outs = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
        if fmt == "t":
            x = x.t()
        elif fmt is not None:
            x = x.contiguous(memory_format=fmt)
        C = x.size(cd)
        mean = torch.zeros(C, dtype=sdt, device=device)
        sqmean = torch.ones(C, dtype=sdt, device=device)
        step = torch.zeros((), dtype=torch.float32, device=device)
        for _ in range(3):  # first update (a = 1) and two blended ones
            ops.bnp_update_stats_(x, mean, sqmean, step, channel_dim=cd, momentum=0.1)
            x = x * 0.5 + 1
        outs[device] = (mean, sqmean, step)
    for a, b in zip(outs["cpu"], outs["cuda"]):
        close(a, b, sdt if dtype in (torch.float32, torch.float64) else torch.float32)


# (weight shape, groups, memory format or "t" for a transposed grad)
LAYERS = [((7, 5), 1, None), ((6, 4, 3, 3), 1, None), ((6, 4, 3, 3), 1, torch.channels_last),
          ((6, 2, 3, 3), 2, None), ((4, 3, 5), 1, None), ((0, 3), 1, None), ((3, 300), 1, None),
          ((5, 7), 1, "t"), ((8, 2, 1, 1), 4, None)]


def make_layers(dtype, device, with_bias, grad_fmt=True, layers=LAYERS):
    torch.manual_seed(1)
    ws, bs, gws, gbs, means, sqmeans, groups = [], [], [], [], [], [], []
    for shape, g, fmt in layers:
        cin = shape[1] * g
        w = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
        gw = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
        if fmt == "t":
            gw = gw.t().contiguous().t() if grad_fmt else gw
        elif fmt is not None:
            w = w.contiguous(memory_format=fmt)
            gw = gw.contiguous(memory_format=fmt) if grad_fmt else gw
        ws.append(w)
        gws.append(gw)
        bs.append(torch.randn(shape[0], dtype=torch.float64).to(device=device, dtype=dtype))
        gbs.append(torch.randn(shape[0], dtype=torch.float64).to(device=device, dtype=dtype))
        mu = torch.randn(cin, dtype=torch.float64)
        means.append(mu.to(device=device, dtype=opmath(dtype)))
        sqmeans.append((mu * mu + torch.rand(cin, dtype=torch.float64) + 0.1)
                       .to(device=device, dtype=opmath(dtype)))
        groups.append(g)
    if not with_bias:
        bs, gbs = [], []
    return ws, bs, gws, gbs, means, sqmeans, groups


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_precondition_matches_cpu(dtype, with_bias):
    outs = {}
    for device in ("cpu", "cuda"):
        _, _, gws, gbs, means, sqmeans, groups = make_layers(dtype, device, with_bias)
        ops.bnp_precondition_(gws, gbs, means, sqmeans, groups=groups, eps=1e-5)
        outs[device] = gws + gbs
    for a, b in zip(outs["cpu"], outs["cuda"]):
        close(a, b, dtype)


SGD_OPTIONS = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
               dict(momentum=0.8, dampening=0.3, weight_decay=0.01, maximize=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("opts", SGD_OPTIONS)
@pytest.mark.parametrize("scaled", [False, True])
def test_sgd_matches_cpu(dtype, with_bias, opts, scaled):
    outs = {}
    for device in ("cpu", "cuda"):
        ws, bs, gws, gbs, means, sqmeans, groups = make_layers(dtype, device, with_bias)
        st = opmath(dtype)
        mom = opts["momentum"] != 0
        wbufs = [torch.randn_like(w, dtype=st) for w in ws] if mom else []
        bbufs = [torch.randn_like(b, dtype=st) for b in bs] if mom else []
        # Mixed first and later steps: the update is chosen per layer from its step.
        steps = [torch.tensor(float(i % 2), device=device) for i in range(len(ws))]
        scale = torch.tensor(4.0, device=device) if scaled else None
        inf = torch.zeros((), device=device) if scaled else None
        ops.bnp_sgd_(ws, bs, gws, gbs, wbufs, bbufs, steps, means, sqmeans, groups=groups,
                     eps=1e-5, lr=0.1, grad_scale=scale, found_inf=inf, **opts)
        outs[device] = ws + bs + wbufs + bbufs + steps
    for a, b in zip(outs["cpu"], outs["cuda"]):
        close(a, b, dtype if a.dtype == dtype else a.dtype)


def test_sgd_found_inf_changes_nothing():
    ws, bs, gws, gbs, means, sqmeans, groups = make_layers(torch.float32, "cuda", True)
    wbufs = [torch.randn_like(w) for w in ws]
    bbufs = [torch.randn_like(b) for b in bs]
    steps = [torch.tensor(3.0, device="cuda") for _ in ws]
    before = [t.clone() for t in ws + bs + wbufs + bbufs + steps]
    ops.bnp_sgd_(ws, bs, gws, gbs, wbufs, bbufs, steps, means, sqmeans, groups=groups, eps=1e-5,
                 lr=0.1, momentum=0.9, grad_scale=torch.tensor(2.0, device="cuda"),
                 found_inf=torch.ones((), device="cuda"))
    for a, b in zip(before, ws + bs + wbufs + bbufs + steps):
        assert torch.equal(a, b)


def test_update_stats_is_deterministic():
    x = torch.randn(4096, 257, device="cuda")
    res = []
    for _ in range(2):
        mean, sqmean = torch.zeros(257, device="cuda"), torch.ones(257, device="cuda")
        step = torch.zeros((), device="cuda")
        ops.bnp_update_stats_(x, mean, sqmean, step, channel_dim=1, momentum=0.1)
        res.append((mean, sqmean))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
