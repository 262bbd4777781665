"""psi_grams and the grams= option of psi_sgd_/psi_adam_ (the fused path of groups cut across
ranks, psi_cuda.distributed): the CPU kernels and the CUDA kernels in the emulator.

Oracles: the Gram sums and lengths computed in float64 by torch; the op's own step on the whole
group (a group cut into row pieces, its pieces' tables added up as an all-reduce would, then
each piece written with grams= equals the whole group stepped at once); a length-1 group stays
put with given sums too; bad tables are refused before anything is written.
"""
import pytest
import torch

from psi_cuda import emulated, ops
from emulated_helpers import SCHEDULE_IDS, SCHEDULES, assert_bitwise, needs_emulator

BACKENDS = [pytest.param(ops, id="cpu"),
            pytest.param(emulated, id="emulated", marks=needs_emulator)]
# short rows, a long row (CPU and CUDA chunks past 65536), rows of 3000 (CUDA: one block, read
# twice), an empty tensor, groups of one element
SHAPES = [(6, 4), (3, 2, 3), (1, 5), (0, 3), (2, 1), (2, 70000), (4, 3000)]
GROUPS = {"channel": (None, SHAPES), "tensor": (None, SHAPES),
          "block": (2, [(6, 4), (4, 3, 2), (2, 70000), (0, 3), (4, 1), (2, 1500)])}


def _case(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    w = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    gr = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    m = [torch.randn(s, generator=g).to(opm) for s in shapes]
    return w, gr, m


def _oracle(w, g, m, manifold, block_rows):
    rows = []
    for a, b, c in zip(w, g, m or [None] * len(w)):
        if a.numel() == 0:
            continue
        r = {"channel": a.size(0), "tensor": 1, "block": a.size(0) // (block_rows or 1)}[manifold]
        A, B = a.double().reshape(r, -1), b.double().reshape(r, -1)
        C = c.double().reshape(r, -1) if c is not None else torch.zeros_like(A)
        cols = [(A * A).sum(1), (A * B).sum(1), (A * C).sum(1), (B * B).sum(1),
                (B * C).sum(1), (C * C).sum(1), torch.full((r,), float(A.size(1)),
                                                           dtype=torch.float64)]
        rows.append(torch.stack(cols, 1))
    return torch.cat(rows) if rows else torch.zeros((0, 7), dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_buffer", [True, False])
@pytest.mark.parametrize("manifold", list(GROUPS))
def test_grams_equal_float64_sums(backend, manifold, with_buffer, dtype):
    block_rows, shapes = GROUPS[manifold]
    w, g, m = _case(shapes, dtype)
    m = m if with_buffer else []
    got = backend.psi_grams(w, g, m, manifold=manifold, block_rows=block_rows)
    want = _oracle(w, g, m, manifold, block_rows)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.equal(got[:, 6], want[:, 6])  # lengths, exactly
    # float32 sums over blocks of 1024 (then double): relative to the sum of |terms|
    scale = _oracle([x.abs() for x in w], [x.abs() for x in g], [x.abs() for x in m],
                    manifold, block_rows)[:, :6]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((got[:, :6] - want[:, :6]).abs() <= tol * scale + 1e-30).all()


def _step(backend, op, w, g, m, v, steps, **kw):
    if op == "psi_sgd_":
        backend.psi_sgd_(w, g, m, steps, lr=0.2, momentum=0.9, nesterov=True, **kw)
    else:
        backend.psi_adam_(w, g, m, v, steps, lr=0.05, **kw)


def _state(op, w, m, manifold, block_rows, first=True):
    steps = [torch.zeros(()) if first else torch.ones(()) for _ in w]
    if op == "psi_sgd_":
        return m, None, steps
    per = {"channel": lambda p: (p.size(0),), "tensor": lambda p: (),
           "block": lambda p: (p.size(0) // block_rows,)}[manifold]
    gen = torch.Generator().manual_seed(7)
    v = [torch.rand(per(p), generator=gen).to(mm.dtype) for p, mm in zip(w, m)]
    return m, v, steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
@pytest.mark.parametrize("manifold", list(GROUPS))
def test_given_grams_give_the_ops_own_step(backend, op, manifold):
    """psi_sgd_(grams=psi_grams(...)) is psi_sgd_(...): the sums are the op's own (the write
    loops differ, so to float rounding), and length-1 groups stay put."""
    block_rows, shapes = GROUPS[manifold]
    w, g, m = _case(shapes, torch.float32)
    m, v, steps = _state(op, w, m, manifold, block_rows, first=False)
    kw = dict(manifold=manifold, block_rows=block_rows)
    a = [[x.clone() for x in lst] for lst in (w, m, v or [], steps)]
    b = [[x.clone() for x in lst] for lst in (w, m, v or [], steps)]
    _step(backend, op, a[0], g, a[1], a[2], a[3], **kw)
    table = backend.psi_grams(w, g, m, **kw)
    _step(backend, op, b[0], g, b[1], b[2], b[3], grams=table, **kw)
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)
    for x, x0 in zip(b[0], w):  # a group of one element never moves (docs/ALGORITHMS.md 1.2)
        if x.numel() and x.numel() // max(x.size(0), 1) == 1 and manifold == "channel":
            assert torch.equal(x, x0)
    assert not torch.equal(b[0][0], w[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
@pytest.mark.parametrize("cuts", [(1,), (3,), (1, 4), (2, 3)])
def test_pieces_with_added_tables_equal_the_whole_group(backend, op, cuts):
    """A tensor group cut into row pieces (as shards of ranks), the pieces' tables added up (the
    all-reduce), each piece written with grams=: the whole tensor's step. Includes a piece of a
    single element (its length comes from the table, so it moves with its group)."""
    whole_w, whole_g, whole_m = _case([(5, 1)], torch.float32, seed=3)
    bounds = [0, *cuts, 5]
    m_, v, steps = _state(op, whole_w, whole_m, "tensor", None)
    ref = [[x.clone() for x in lst] for lst in (whole_w, m_, v or [], steps)]
    _step(backend, op, ref[0], whole_g, ref[1], ref[2], ref[3], manifold="tensor")

    w = whole_w[0].clone()
    m = m_[0].clone()
    pw = [w[a:b] for a, b in zip(bounds, bounds[1:])]
    pg = [whole_g[0][a:b] for a, b in zip(bounds, bounds[1:])]
    pm = [m[a:b] for a, b in zip(bounds, bounds[1:])]
    tables = backend.psi_grams(pw, pg, pm, manifold="tensor")
    total = tables.sum(0, keepdim=True)
    assert total[0, 6] == 5
    for k in range(len(pw)):
        vk = [v[0].clone()] if v else []
        stepk = [steps[0].clone()]
        _step(backend, op, [pw[k]], [pg[k]], [pm[k]], vk, stepk, manifold="tensor", grams=total)
        assert stepk[0].item() == 1
        if v:
            torch.testing.assert_close(vk[0], ref[2][0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(w, ref[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m, ref[1][0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_tables_are_refused_before_any_write(backend):
    w, g, m = _case([(3, 4), (2, 5)], torch.float32)
    steps = [torch.zeros(()) for _ in w]
    before = [x.clone() for x in w]
    good = backend.psi_grams(w, g, m, manifold="channel")
    bad = {"shape": good[:4], "dtype": good.float(), "columns": good[:, :6].contiguous(),
           "layout": good.t().contiguous().t()}
    for name, t in bad.items():
        with pytest.raises(RuntimeError, match="grams must be a contiguous float64 tensor"):
            backend.psi_sgd_(w, g, m, steps, lr=0.1, momentum=0.9, manifold="channel", grams=t)
    with pytest.raises(ValueError, match="grams .* not to manifold=0"):
        backend.psi_sgd_(w, g, m, steps, lr=0.1, momentum=0.9, manifold=None, grams=good)
    with pytest.raises(ValueError, match="psi_grams: manifold must be"):
        backend.psi_grams(w, g, m, manifold=None)
    with pytest.raises(RuntimeError, match="psi_grams: got 2 buffers for 1 params"):
        backend.psi_grams(w[:1], g[:1], m, manifold="channel")
    assert all(torch.equal(a, b) for a, b in zip(w, before))
    assert all(s.item() == 0 for s in steps)


@needs_emulator
@pytest.mark.parametrize("sched", SCHEDULES[1:], ids=SCHEDULE_IDS[1:])
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_emulated_grams_paths_bitwise_across_schedules(op, sched):
    """psi_grams and the given-sums paths (groups in registers, groups read twice by one block,
    long chunked groups) of the CUDA kernels give the same bits under every schedule."""
    shapes = [(6, 4), (2, 70000), (3, 2100), (1, 1)]

    def run():
        w, g, m = _case(shapes, torch.float32, seed=5)
        m, v, steps = _state(op, w, m, "channel", None, first=False)
        table = emulated.psi_grams(w, g, m, manifold="channel")
        _step(emulated, op, w, g, m, v, steps, manifold="channel", grams=table)
        return [[table], w, m, v or []]

    with emulated.schedule(*SCHEDULES[0]):
        base = run()
    with emulated.schedule(*sched):
        out = run()
    assert_bitwise(base, out, f"grams {op} under {sched}")


def test_opcheck_psi_grams_and_given_grams():
    """The schemas, fakes and dispatch of psi_grams and of grams= (torch.library.opcheck)."""
    w, g, m = _case([(3, 4), (2, 5)], torch.float32)
    torch.library.opcheck(torch.ops.psi_cuda.psi_grams.default, (w, g, m),
                          dict(manifold=1, block_rows=1))
    table = ops.psi_grams(w, g, m, manifold="channel")
    steps = [torch.ones(()) for _ in w]
    torch.library.opcheck(torch.ops.psi_cuda.psi_sgd_.default, (w, g, m, steps),
                          dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                               weight_decay=0.0, maximize=False, manifold=1, retraction=0,
                               transport=0, max_grad_norm=0.0, grams=table))
