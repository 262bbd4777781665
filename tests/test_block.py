"""Block groups (manifold="block", block_rows=b; docs/ALGORITHMS.md 1.2b): the ops against the
reference, the identities with the channel (b = 1) and tensor (b = rows) manifolds, per-block
equivariance of PSISGD and PSIAdam (and its failure for SGD and tensor groups), the errors, the
optimizer state and a bit-for-bit resume."""
import copy

import pytest
import torch

import psi_cuda
from psi_cuda import ops, reference
from helpers import assert_close_rel

SHAPES_ROWS = [((8, 3, 3, 3), 2), ((8, 3, 3, 3), 8), ((12, 70), 3), ((6, 700), 3),
               ((4, 40000), 2), ((5, 9), 1)]  # (4, 40000) / 2: groups of 80000, the chunked path
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def case(shapes_rows, dtype, seed=0, adam=False, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    ps, gs, ms, vs, st = [], [], [], [], []
    for shape, b in shapes_rows:
        p = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        ps.append(p)
        gs.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).reshape(p.shape)
                  .contiguous(memory_format=torch.channels_last if channels_last and p.dim() == 4
                              else torch.contiguous_format))
        sdt = reference.opmath_dtype(dtype)
        ms.append(torch.zeros_like(p, dtype=sdt))
        vs.append(torch.zeros(shape[0] // b, dtype=sdt))
        st.append(torch.zeros(()))
    return (ps, gs, ms, vs, st) if adam else (ps, gs, ms, st)


def clone(c):
    return tuple([t.clone(memory_format=torch.preserve_format) for t in lst] for lst in c)


def step(mod, op, c, b, steps=3, **kw):
    c = clone(c)
    for i in range(steps):
        # |q| = |w| |g| about 0.5 whatever the group length L: steps of a few degrees
        grads = [g * (0.5 * (1 + 0.5 * i) / (b * g.numel() // g.size(0))) for g in c[1]]
        getattr(mod, op)(c[0], grads, *c[2:], lr=0.1, manifold="block", block_rows=b, **kw)
    return c


SGD_OPTS = [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, max_grad_norm=0.5),
            dict(momentum=0.9, retraction="exp", transport="parallel"),
            dict(momentum=0.0, retraction="none", maximize=True)]
ADAM_OPTS = [dict(), dict(retraction="exp", transport="parallel", max_grad_norm=0.3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_rows", SHAPES_ROWS, ids=str)
@pytest.mark.parametrize("op,opts", [("psi_sgd_", o) for o in SGD_OPTS] +
                         [("psi_adam_", o) for o in ADAM_OPTS])
def test_fused_block_groups_equal_reference(op, opts, shape_rows, dtype):
    c = case([shape_rows], dtype, adam=op == "psi_adam_")
    if op == "psi_sgd_" and opts.get("momentum", 0) == 0:
        c = (c[0], c[1], [], c[3])
    b = shape_rows[1]
    fused = step(ops, op, c, b, **opts)
    ref = step(reference, op, c, b, **opts)
    for name, a, e in zip(("params", "grads", "state", "v", "steps"), fused, ref):
        for x, y in zip(a, e):
            tol_dtype = dtype if name == "params" else reference.opmath_dtype(dtype)
            assert_close_rel(x, y, tol_dtype if dtype != torch.bfloat16 else dtype, f"{op} {name}")
    assert not torch.equal(fused[0][0], c[0][0])


@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_block_rows_one_is_channel_and_all_rows_is_tensor(op):
    """Exact identities: b = 1 steps like "channel", b = size(0) like "tensor", bit for bit."""
    adam = op == "psi_adam_"
    kw = {} if adam else dict(momentum=0.9)
    for b, other in ((1, "channel"), (6, "tensor")):
        c = case([((6, 3, 5), b)], torch.float32, adam=adam)
        blk = clone(c)
        getattr(ops, op)(blk[0], blk[1], *blk[2:], lr=0.1, manifold="block", block_rows=b, **kw)
        ref = clone(c)
        if adam and other == "tensor":
            ref[3][0] = ref[3][0].reshape(())
        getattr(ops, op)(ref[0], ref[1], *ref[2:], lr=0.1, manifold=other, **kw)
        assert torch.equal(blk[0][0], ref[0][0]) and torch.equal(blk[2][0], ref[2][0])


def test_channels_last_block_groups():
    c = case([((8, 3, 3, 3), 4)], torch.float32, channels_last=True)
    plain = tuple([t.contiguous() for t in lst] for lst in c)
    a = step(ops, "psi_sgd_", c, 4, momentum=0.9)
    e = step(ops, "psi_sgd_", plain, 4, momentum=0.9)
    assert a[0][0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a[0][0], e[0][0], rtol=1e-6, atol=1e-6)


def test_block_errors():
    c = case([((6, 4), 2)], torch.float32)
    with pytest.raises(ValueError, match=r"block_rows=4 does not divide|params\[0\].*block_rows=4"):
        ops.psi_sgd_(*c[:2], c[2], c[3], lr=0.1, momentum=0.9, manifold="block", block_rows=4)
    with pytest.raises(ValueError, match="needs block_rows"):
        ops.psi_sgd_(*c[:2], c[2], c[3], lr=0.1, momentum=0.9, manifold="block")
    with pytest.raises(ValueError, match="applies to manifold='block'"):
        ops.psi_sgd_(*c[:2], c[2], c[3], lr=0.1, momentum=0.9, manifold="channel", block_rows=2)
    with pytest.raises(ValueError, match=r"block_rows=4 must divide"):
        reference.psi_sgd_(*c[:2], c[2], c[3], lr=0.1, momentum=0.9, manifold="block",
                           block_rows=4)
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"block_rows=4 must divide"):
        psi_cuda.PSISGD([{"params": [w], "manifold": "block", "block_rows": 4}], lr=0.1)
    with pytest.raises(ValueError, match="needs 'block_rows'"):
        psi_cuda.PSIAdam([{"params": [w], "manifold": "block"}], lr=0.1)
    with pytest.raises(ValueError, match="applies to manifold='block'"):
        psi_cuda.PSISGD([{"params": [w], "manifold": "channel", "block_rows": 2}], lr=0.1)


# --- equivariance: rescaling each block by its own factor ---------------------------------------

class HeadNormAttentionScore(torch.nn.Module):
    """q = x Wq, k = x Wk (no bias), reshaped into H heads of D and RMS-normalized over D per
    head (per-head QK-norm), then a loss of the scores: each head's D rows of Wq and Wk are
    scale invariant on their own."""

    def __init__(self, dim=12, heads=3, head_dim=4):
        super().__init__()
        self.h, self.d = heads, head_dim
        self.wq = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.out = torch.nn.Linear(heads, 1)

    def forward(self, x):  # x: (B, T, dim)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.d)
        k = self.wk(x).view(B, T, self.h, self.d)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-12)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-12)
        s = torch.einsum("bthd,bshd->bhts", q, k).mean((-1, -2))  # (B, H)
        return self.out(s).pow(2).mean()


def _run(make_opt, scales, steps=60):
    torch.manual_seed(0)
    model = HeadNormAttentionScore().double()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (twin.wq, twin.wk):
            lin.weight.mul_(scales.repeat_interleave(4)[:, None])
    xs = [torch.randn(4, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
          for i in range(steps)]
    gaps = []
    for m in (model, twin):
        opt = make_opt(m)
        for x in xs:
            opt.zero_grad()
            m(x).backward()
            opt.step()
    for lin_a, lin_b in ((model.wq, twin.wq), (model.wk, twin.wk)):
        a = lin_a.weight.detach().view(3, -1)
        b = lin_b.weight.detach().view(3, -1)
        # directions per block: equal for an equivariant optimizer
        gaps.append((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True))
                    .abs().max().item())
    return max(gaps)


def _groups(m, manifold):
    extra = {"block_rows": 4} if manifold == "block" else {}
    return [{"params": [m.wq.weight, m.wk.weight], "manifold": manifold, **extra},
            {"params": list(m.out.parameters()), "manifold": None}]


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_per_head_rescaling_equivariance(backend):
    """Each head of Wq and Wk rescaled by its own factor in [0.1, 10]: PSISGD and PSIAdam with
    block groups keep the two runs' per-head directions equal (float64, 60 steps); SGD, AdamW and
    tensor groups do not."""
    scales = torch.tensor([0.1, 3.0, 10.0], dtype=torch.float64)
    sgd = lambda m, man: psi_cuda.PSISGD(_groups(m, man), lr=0.05, momentum=0.9,  # noqa: E731
                                         backend=backend)
    adam = lambda m, man: psi_cuda.PSIAdam(_groups(m, man), lr=0.01, backend=backend)  # noqa
    assert _run(lambda m: sgd(m, "block"), scales) < 1e-8
    assert _run(lambda m: adam(m, "block"), scales) < 1e-8
    assert _run(lambda m: sgd(m, "tensor"), scales) > 1e-3
    assert _run(lambda m: adam(m, "tensor"), scales) > 1e-3
    assert _run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), scales) > 1e-3
    assert _run(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), scales) > 1e-3


def test_optimizer_state_and_resume():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 8, 3, bias=False)
    make = lambda: psi_cuda.PSIAdam([{"params": [conv.weight], "manifold": "block",  # noqa
                                      "block_rows": 2}], lr=0.01)
    opt = make()
    for _ in range(2):
        conv.weight.grad = torch.randn_like(conv.weight)
        opt.step()
    assert opt.state[conv.weight]["exp_avg_sq"].shape == (4,)
    saved_w, saved = conv.weight.detach().clone(), copy.deepcopy(opt.state_dict())
    g = torch.randn_like(conv.weight)
    conv.weight.grad = g.clone()
    opt.step()
    after = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.copy_(saved_w)
    fresh = make()
    fresh.load_state_dict(saved)
    conv.weight.grad = g.clone()
    fresh.step()
    assert torch.equal(conv.weight.detach(), after)
