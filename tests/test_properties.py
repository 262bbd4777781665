"""Property-based tests (hypothesis): inputs nobody chose, for every op, fused against the
pure-torch reference, plus the invariants of docs/ALGORITHMS.md section 7 that hold for any
input: norms kept, buffers tangent, found_inf changes nothing, the same result for 1 and 2
threads.

Profiles (tests/conftest.py): ``ci`` (the default: derandomized, a fixed number of examples,
bounded time) and ``long`` (``pytest tests/test_properties.py --hypothesis-profile=long``: many
more random examples, a fresh seed each run)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from psi_cuda import ops, reference  # noqa: E402
from helpers import assert_close_rel, state_dtype  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Row lengths around the CPU kernels' boundaries: vector tails (8, 16), short rows, the
# single-pass limit (65536) and the chunked reduction above it, plus 0 and 1.
ROW_LENGTHS = st.one_of(st.integers(0, 40), st.sampled_from([63, 64, 65, 255, 256, 257, 1023,
                                                             1024, 1025, 4097, 65535, 65537]))


@st.composite
def shapes(draw, manifold):
    """A parameter shape: (rows, *cols) with a row length from ROW_LENGTHS (cut to a total of at
    most ~300k elements), sometimes 1-D or 0-D (not for channel groups), sometimes 4-D."""
    kind = draw(st.sampled_from(["2d", "4d", "1d", "0d"] if manifold != "channel"
                                else ["2d", "4d", "2d"]))
    if kind == "0d":
        return ()
    if kind == "1d":
        return (draw(st.integers(0, 70)),)
    cols = draw(ROW_LENGTHS)
    rows = draw(st.integers(0 if cols else 1, max(1, min(9, 300_000 // max(cols, 1)))))
    if kind == "4d" and cols > 0:
        k = draw(st.sampled_from([1, 3]))
        c = max(1, cols // (k * k))
        return (rows, c, k, k)
    return (rows, cols)


def make_param(shape, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(shape, dtype=torch.float64, generator=g)
         * torch.exp(torch.randn((), dtype=torch.float64, generator=g) * 2))
    p = p.to(dtype)
    if channels_last and p.dim() == 4:
        p = p.contiguous(memory_format=torch.channels_last)
    return p


def make_grad(p, manifold, seed, scale):
    """A gradient of about the size a step turns by ~lr radians (|q| ~ scale), with a radial part."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(p.shape, dtype=torch.float64, generator=g)
    if p.numel() == 0:
        return x.to(p.dtype)
    rows = p.size(0) if manifold == "channel" and p.dim() > 0 else 1
    w = p.double().reshape(rows, -1)
    n = w.norm(dim=1, keepdim=True).clamp_min(1e-3)
    x = scale * x.reshape(rows, -1) / (n * w.shape[1] ** 0.5) + 0.1 * w / n ** 2
    return x.reshape(p.shape).to(p.dtype)


# The options both PSI ops take (drawn last, after each op's own).
SHARED_OPTIONS = {
    "maximize": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 1e-2]),
    "retraction": st.sampled_from(["normalize", "exp", "none"]),
    "transport": st.sampled_from(["project", "parallel"]),
    "max_grad_norm": st.sampled_from([None, 0.05, 10.0]),
    "lr": st.sampled_from([1e-3, 0.05, 0.3]),
}

SGD_OPTIONS = st.fixed_dictionaries({
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "dampening": st.sampled_from([0.0, 0.3]),
    "nesterov": st.booleans(),
    **SHARED_OPTIONS,
})

ADAM_OPTIONS = st.fixed_dictionaries({
    "beta1": st.sampled_from([0.0, 0.8, 0.9]),
    "beta2": st.sampled_from([0.0, 0.99, 0.999]),
    "eps": st.sampled_from([1e-8, 1e-3]),
    **SHARED_OPTIONS,
})


def legal(opts, manifold):
    """Option sets the ops accept (others are tested to raise elsewhere)."""
    opts = dict(opts, manifold=manifold)
    if opts["transport"] == "parallel" and opts["retraction"] != "exp":
        opts["transport"] = "project"
    if opts.get("nesterov") and (opts["momentum"] == 0 or opts["dampening"] != 0):
        opts["nesterov"] = False
    if manifold is None and opts.get("eps", 1) == 0.0:
        opts["eps"] = 1e-8
    return opts


@st.composite
def cases(draw, op):
    manifold = draw(st.sampled_from(["channel", "tensor", None]))
    dtype = draw(st.sampled_from(DTYPES))
    shape_list = draw(st.lists(shapes(manifold), min_size=1, max_size=4))
    opts = legal(draw(SGD_OPTIONS if op == "sgd" else ADAM_OPTIONS), manifold)
    channels_last = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    amp = draw(st.sampled_from([None, "scale", "inf"]))
    steps = draw(st.integers(1, 3))
    return manifold, dtype, shape_list, opts, channels_last, seed, amp, steps


def build(op, manifold, dtype, shape_list, opts, channels_last, seed):
    params = [make_param(s, dtype, channels_last, seed + i) for i, s in enumerate(shape_list)]
    sd = state_dtype(dtype)
    like = lambda p: torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)  # noqa
    steps = [torch.zeros(()) for _ in params]
    if op == "sgd":
        bufs = [like(p) for p in params] if opts["momentum"] else []
        return [params, bufs, steps]
    if manifold == "channel":
        vs = [torch.zeros(p.size(0), dtype=sd) for p in params]
    elif manifold == "tensor":
        vs = [torch.zeros((), dtype=sd) for p in params]
    else:
        vs = [like(p) for p in params]
    return [params, [like(p) for p in params], vs, steps]


def run_op(fn, op, state, grads, opts, grad_scale, found_inf):
    lists = [state[0], grads] + state[1:]
    fn(*lists, grad_scale=grad_scale, found_inf=found_inf, **opts)


def clone(state):
    return [[t.clone() for t in lst] for lst in state]


def check_against_reference(op, case):
    manifold, dtype, shape_list, opts, channels_last, seed, amp, n_steps = case
    note(f"{op} {manifold} {dtype} {shape_list} {opts} cl={channels_last} amp={amp}")
    fused_fn = ops.psi_sgd_ if op == "sgd" else ops.psi_adam_
    ref_fn = reference.psi_sgd_ if op == "sgd" else reference.psi_adam_
    start = build(op, manifold, dtype, shape_list, opts, channels_last, seed)
    fused, ref = clone(start), clone(start)
    scale = torch.tensor(1024.0) if amp else None
    for k in range(n_steps):
        grads = [make_grad(p, manifold, seed + 100 * k + i, 1.0)
                 for i, p in enumerate(start[0])]
        if amp:
            grads = [(g.double() * 1024).to(dtype) for g in grads]
        # Finite gradients (GradScaler sets found_inf otherwise; non-finite ones without it
        # are tests/test_contract.py's).
        assume(all(torch.isfinite(g).all() for g in grads))
        found_inf = None
        if amp == "inf" and k == n_steps - 1 and grads and grads[0].numel():
            grads[0].view(-1)[0] = float("inf")
            found_inf = torch.ones(())
        elif amp:
            found_inf = torch.zeros(())
        before = clone(fused)
        run_op(fused_fn, op, fused, [g.clone() for g in grads], opts, scale, found_inf)
        run_op(ref_fn, op, ref, [g.clone() for g in grads], opts, scale, found_inf)
        if found_inf is not None and found_inf.item():
            for a, b in zip(sum(fused, []), sum(before, [])):
                assert torch.equal(a, b), "a step with found_inf changed something"
    for i, (a, e) in enumerate(zip(fused[0], ref[0])):
        assert a.stride() == start[0][i].stride()
        assert_close_rel(a, e, dtype, f"params[{i}] {tuple(a.shape)}")
    for lst_f, lst_r in zip(fused[1:-1], ref[1:-1]):
        for a, e in zip(lst_f, lst_r):
            assert_close_rel(a, e, dtype, "state")
    for a, e in zip(fused[-1], ref[-1]):
        assert a.item() == e.item()


@given(cases("sgd"))
def test_psi_sgd_fused_matches_reference(case):
    check_against_reference("sgd", case)


@given(cases("adam"))
def test_psi_adam_fused_matches_reference(case):
    check_against_reference("adam", case)


@given(op=st.sampled_from(["sgd", "adam"]), manifold=st.sampled_from(["channel", "tensor"]),
       shape_list=st.lists(shapes("channel"), min_size=1, max_size=3),
       opts=st.data(), seed=st.integers(0, 2**16))
def test_norms_kept_and_buffers_tangent(op, manifold, shape_list, opts, seed):
    """float64, retraction normalize/exp: every group keeps its norm, its buffer stays tangent."""
    o = legal(opts.draw(SGD_OPTIONS if op == "sgd" else ADAM_OPTIONS), manifold)
    assume(o["retraction"] != "none" and (op == "adam" or o["momentum"] > 0))
    state = build(op, manifold, torch.float64, shape_list, o, False, seed)
    rows = lambda p: p.size(0) if manifold == "channel" else 1  # noqa: E731
    norms = [p.reshape(rows(p), -1).norm(dim=1) if p.numel() else None for p in state[0]]
    fn = ops.psi_sgd_ if op == "sgd" else ops.psi_adam_
    for k in range(3):
        grads = [make_grad(p, manifold, seed + k + i, 1.0) for i, p in enumerate(state[0])]
        run_op(fn, op, state, grads, o, None, None)
    for p, m, n0 in zip(state[0], state[1], norms):
        if p.numel() == 0 or p[0].numel() < 2:
            continue
        w, mm = p.reshape(rows(p), -1), m.reshape(rows(p), -1)
        torch.testing.assert_close(w.norm(dim=1), n0, rtol=1e-12, atol=0)
        u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
        radial = (mm * u).sum(dim=1).abs()
        assert (radial <= 1e-10 * mm.norm(dim=1).clamp_min(1e-300) + 1e-300).all()


@given(cases("sgd"), st.sampled_from(["sgd", "adam"]))
def test_one_and_two_threads_give_the_same_bits(case, op):
    manifold, dtype, shape_list, opts, channels_last, seed, _, _ = case
    if op == "adam":
        opts = legal(dict(beta1=0.9, beta2=0.999, eps=1e-8, maximize=opts["maximize"],
                          weight_decay=opts["weight_decay"], retraction=opts["retraction"],
                          transport=opts["transport"], max_grad_norm=opts["max_grad_norm"],
                          lr=opts["lr"]), manifold)
    start = build(op, manifold, dtype, shape_list, opts, channels_last, seed)
    grads = [make_grad(p, manifold, seed, 1.0) for p in start[0]]
    fn = ops.psi_sgd_ if op == "sgd" else ops.psi_adam_
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = clone(start)
            run_op(fn, op, state, [g.clone() for g in grads], opts, None, None)
            results.append(state)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(sum(results[0], []), sum(results[1], [])):
        assert torch.equal(a, b)


# --- BNP ----------------------------------------------------------------------------------------


@st.composite
def stats_inputs(draw):
    kind = draw(st.sampled_from(["linear", "linear3d", "conv1d", "conv2d"]))
    c = draw(st.integers(1, 9))
    n = draw(st.integers(0, 5))
    if kind == "linear":
        return (n, c), 1
    if kind == "linear3d":
        return (n, draw(st.integers(1, 7)), c), 2
    if kind == "conv1d":
        return (n, c, draw(st.integers(1, 40))), 1
    return (n, c, draw(st.integers(1, 9)), draw(st.integers(1, 9))), 1


@given(stats_inputs(), st.sampled_from(DTYPES), st.sampled_from([0.1, 0.5, 1.0]),
       st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_bnp_stats_fused_matches_reference(inp, dtype, momentum, updates, channels_last, seed):
    shape, channel_dim = inp
    g = torch.Generator().manual_seed(seed)
    c = shape[channel_dim]
    sd = state_dtype(dtype)
    states = [[torch.zeros(c, dtype=sd), torch.ones(c, dtype=sd), torch.zeros(())]
              for _ in range(2)]
    for _ in range(updates):
        x = (torch.randn(shape, dtype=torch.float64, generator=g) * 3 + 1).to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ops.bnp_update_stats_(x, *states[0], channel_dim=channel_dim, momentum=momentum)
        reference.bnp_update_stats_(x, *states[1], channel_dim=channel_dim, momentum=momentum)
    for a, e in zip(states[0][:2], states[1][:2]):
        assert_close_rel(a, e, dtype if dtype != torch.float64 else torch.float64)
    assert states[0][2].item() == states[1][2].item()


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5), st.sampled_from([0, 1, 3]),
                          st.sampled_from([1, 2])), min_size=1, max_size=4),
       st.sampled_from(DTYPES), st.booleans(), st.sampled_from([0.0, 0.9]),
       st.booleans(), st.integers(0, 2**16))
def test_bnp_sgd_fused_matches_reference(layers, dtype, with_bias, momentum, nesterov, seed):
    g = torch.Generator().manual_seed(seed)
    sd = state_dtype(dtype)
    lists = [[] for _ in range(9)]
    groups = []
    for out_per_group, cin_per_group, k, grp in layers:
        grp = grp if k else 1  # a Linear has no groups
        shape = (out_per_group * grp, cin_per_group) + ((k, k) if k else ())
        rnd = lambda s: torch.randn(s, dtype=torch.float64, generator=g).to(dtype)  # noqa
        w = rnd(shape)
        cin = cin_per_group * grp
        mu = torch.randn(cin, dtype=torch.float64, generator=g)
        lists[0].append(w)
        lists[2].append(rnd(shape))
        if with_bias:
            lists[1].append(rnd(shape[0]))
            lists[3].append(rnd(shape[0]))
        if momentum:
            lists[4].append(torch.zeros_like(w, dtype=sd))
            if with_bias:
                lists[5].append(torch.zeros(shape[0], dtype=sd))
        lists[6].append(torch.zeros(()))
        lists[7].append(mu.to(sd))
        lists[8].append((mu * mu + torch.rand(cin, dtype=torch.float64, generator=g) + 0.1)
                        .to(sd))
        groups.append(grp)
    kw = dict(groups=groups, eps=1e-5, lr=0.05, momentum=momentum,
              nesterov=nesterov and momentum > 0, weight_decay=1e-3)
    fused, ref = clone(lists), clone(lists)
    ops.bnp_sgd_(*fused, **kw)
    reference.bnp_sgd_(*ref, **kw)
    for which in (0, 1, 4, 5):
        for a, e in zip(fused[which], ref[which]):
            assert_close_rel(a, e, dtype, f"list {which}")
    assert all(math.isfinite(t.double().sum().item()) for t in fused[0])


def test_the_profiles_are_registered():
    assert settings.get_profile("ci").derandomize
    assert settings.get_profile("long").max_examples > settings.get_profile("ci").max_examples
