"""BNP ops: the CUDA kernels (csrc/cuda/bnp_cuda.cu), run in the CPU emulator, against the CPU
kernels with the tolerances of tests/test_bnp_cuda.py, and across schedules bit for bit; on the
cases of tests/test_bnp_cuda.py and on the kernels' boundaries (row and plane paths, rows of more
than one block, grid-stride tables, many layers)."""
import pytest
import torch

from psi_cuda import emulated, ops
from emulated_helpers import (SCHEDULE_IDS, SCHEDULES, ScheduleCache,
                              assert_launches_within_limits, needs_emulator)
import test_bnp_cuda as bnp_cuda_cases
from test_bnp_cuda import DTYPES, LAYERS, SGD_OPTIONS, STATS_CASES, close, opmath

pytestmark = needs_emulator

_cache = ScheduleCache()

# More statistics inputs. Columns kernel (inner < 32: rows of C * inner columns): inner == 1
# with C above one tile of 32 columns and rows over several chunks; inner 4, 17, 25, 31 (a
# channel's columns across two tiles). Planes kernel (inner >= 32): inner 32, 33, planes over
# one kStatsChunk (16384).
EXTRA_STATS = [((3000, 37), 1, None), ((1, 70), 1, None), ((2, 3, 9000), 1, None),
               ((5, 4, 17), 1, None), ((3, 6, 2, 2), 1, None), ((600, 40), 1, None),
               ((70, 3, 5, 5), 1, None), ((4, 5, 31), 1, None), ((4, 5, 32), 1, None),
               ((3, 2, 33), 1, None)]


def stats_inputs(case, dtype):
    shape, cd, fmt = case
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype=dtype)
    if fmt == "t":
        x = x.t()
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, cd


def run_stats(fn, case, dtype):
    x, cd = stats_inputs(case, dtype)
    C = x.size(cd)
    sdt = opmath(dtype)
    mean, sqmean = torch.zeros(C, dtype=sdt), torch.ones(C, dtype=sdt)
    step = torch.zeros((), dtype=torch.float32)
    for _ in range(3):  # first update (a = 1) and two blended ones
        fn(x, mean, sqmean, step, channel_dim=cd, momentum=0.1)
        x = x * 0.5 + 1
    return [[mean, sqmean, step]]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STATS_CASES + EXTRA_STATS, ids=str)
def test_update_stats(case, dtype, sched):
    expected = run_stats(ops.bnp_update_stats_, case, dtype)

    def emulate():
        return run_stats(emulated.bnp_update_stats_, case, dtype)

    with emulated.schedule(*sched):
        out = emulate()
    assert_launches_within_limits()
    sdt = opmath(dtype)
    for a, e in zip(out[0], expected[0]):
        close(a, e, sdt if dtype in (torch.float32, torch.float64) else torch.float32)
    _cache.check(("stats", str(case), dtype), emulate, sched, out)


# The layers of tests/test_bnp_cuda.py plus rows longer than a block (kThreads = 256) in both
# row layouts, and a Linear with many rows.
EXTRA_LAYERS = [((3, 700), 1, None), ((4, 40, 3, 3), 1, torch.channels_last), ((300, 6), 1, None)]


def make_layers(dtype, with_bias, layers):
    return bnp_cuda_cases.make_layers(dtype, "cpu", with_bias, layers=layers)


def run_precondition(fn, dtype, with_bias, layers):
    _, _, gws, gbs, means, sqmeans, groups = make_layers(dtype, with_bias, layers)
    fn(gws, gbs, means, sqmeans, groups=groups, eps=1e-5)
    return [gws, gbs]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_precondition(dtype, with_bias, sched):
    layers = LAYERS + EXTRA_LAYERS
    expected = run_precondition(ops.bnp_precondition_, dtype, with_bias, layers)

    def emulate():
        return run_precondition(emulated.bnp_precondition_, dtype, with_bias, layers)

    with emulated.schedule(*sched):
        out = emulate()
    assert_launches_within_limits()
    for a_list, e_list in zip(out, expected):
        for a, e in zip(a_list, e_list):
            close(a, e, dtype)
    _cache.check(("precondition", dtype, with_bias), emulate, sched, out)


def run_sgd(fn, dtype, with_bias, opts, scaled, layers, found_inf=0.0):
    ws, bs, gws, gbs, means, sqmeans, groups = make_layers(dtype, with_bias, layers)
    st = opmath(dtype)
    mom = opts["momentum"] != 0
    wbufs = [torch.randn_like(w, dtype=st) for w in ws] if mom else []
    bbufs = [torch.randn_like(b, dtype=st) for b in bs] if mom else []
    # Mixed first and later steps: the update is chosen per layer from its step.
    steps = [torch.tensor(float(i % 2)) for i in range(len(ws))]
    scale = torch.tensor(4.0) if scaled else None
    inf = torch.tensor(found_inf) if scaled else None
    fn(ws, bs, gws, gbs, wbufs, bbufs, steps, means, sqmeans, groups=groups, eps=1e-5, lr=0.1,
       grad_scale=scale, found_inf=inf, **opts)
    return [ws, bs, wbufs, bbufs, steps]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                      o.items()))
@pytest.mark.parametrize("scaled", [False, True])
def test_sgd(dtype, with_bias, opts, scaled, sched):
    layers = LAYERS + EXTRA_LAYERS
    expected = run_sgd(ops.bnp_sgd_, dtype, with_bias, opts, scaled, layers)

    def emulate():
        return run_sgd(emulated.bnp_sgd_, dtype, with_bias, opts, scaled, layers)

    with emulated.schedule(*sched):
        out = emulate()
    assert_launches_within_limits()
    for a_list, e_list in zip(out, expected):
        for a, e in zip(a_list, e_list):
            close(a, e, dtype if a.dtype == dtype else a.dtype)
    _cache.check(("sgd", dtype, with_bias, str(opts), scaled), emulate, sched, out)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_sgd_found_inf_changes_nothing(sched):
    layers = LAYERS + EXTRA_LAYERS
    before = run_sgd(lambda *a, **k: None, torch.float32, True, dict(momentum=0.9), True, layers)
    with emulated.schedule(*sched):
        after = run_sgd(emulated.bnp_sgd_, torch.float32, True, dict(momentum=0.9), True, layers,
                        found_inf=1.0)
    for b_list, a_list in zip(before, after):
        for b, a in zip(b_list, a_list):
            assert torch.equal(b, a)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_many_layers(sched):
    """A table of 60 layers of uneven row counts (the binary search over first rows)."""
    layers = [((k % 9 + 1, k % 5 + 2), 1, None) for k in range(60)]
    expected = run_sgd(ops.bnp_sgd_, torch.float32, True, dict(momentum=0.9), False, layers)

    def emulate():
        return run_sgd(emulated.bnp_sgd_, torch.float32, True, dict(momentum=0.9), False, layers)

    with emulated.schedule(*sched):
        out = emulate()
    for a_list, e_list in zip(out, expected):
        for a, e in zip(a_list, e_list):
            close(a, e, torch.float32)
    _cache.check(("many", ), emulate, sched, out)


@pytest.mark.parametrize("shape", [(4096, 16), (512, 8, 4, 4), (64, 16, 32, 32), (8, 4, 40000)],
                         ids=str)
def test_stats_accurate_far_from_zero_mean(shape):
    """Inputs 300 + N(0, 1): the variance sqmean - mean^2 is 1e-5 of sqmean, so float running
    sums must reach double often. Float64 statistics against a float64 oracle; both the row
    (inner == 1) and plane paths. (Summed in float per block, the plane path lost 1% of the
    variance; the CPU kernel keeps it to 1e-3.) (512, 8, 4, 4): the columns kernel with inner 16."""
    torch.manual_seed(0)
    x = (300 + torch.randn(shape, dtype=torch.float64)).float()
    dims = [d for d in range(x.dim()) if d != 1]
    var_true = x.double().var(dim=dims, correction=0)
    C = x.size(1)
    for fn in (ops.bnp_update_stats_, emulated.bnp_update_stats_):
        mean, sqmean = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
        fn(x, mean, sqmean, torch.zeros(()), channel_dim=1, momentum=0.1)
        rel = ((sqmean - mean * mean - var_true).abs() / var_true).max().item()
        assert rel < 5e-3, f"{fn.__module__}: variance off by {rel:.2e}"


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", [((300, 6), 1, None), ((3, 6, 2, 2), 1, None),
                                  ((600, 40), 1, None), ((2, 3, 9000), 1, None),
                                  ((2, 5, 40000), 1, None)], ids=str)
def test_update_stats_skips_nonfinite_batch(case, bad, sched):
    """The finalizing block's check: a batch with one inf/NaN (in one channel, in one chunk of
    one tile) leaves every channel's mean and sqmean and the step as they are (the CPU kernel
    too), between two finite batches that blend, and counts in ``batches``; the workspace's
    counters are left at zero for the next call."""
    def run(fn):
        x, cd = stats_inputs(case, torch.float32)
        C = x.size(cd)
        mean, sqmean = torch.zeros(C), torch.ones(C)
        step, batches = torch.zeros((), dtype=torch.float32), torch.zeros(())
        kw = dict(channel_dim=cd, momentum=0.1, batches=batches)
        fn(x, mean, sqmean, step, **kw)
        poisoned = x.clone()
        poisoned.view(-1)[x.numel() // 2] = bad
        fn(poisoned, mean, sqmean, step, **kw)
        fn(x * 0.5 + 1, mean, sqmean, step, **kw)
        return [[mean, sqmean, step, batches]]

    expected = run(ops.bnp_update_stats_)
    assert expected[0][2].item() == 2 and torch.isfinite(expected[0][0]).all()
    assert expected[0][3].item() == 3  # batches: every non-empty batch, in the same launch
    with emulated.schedule(*sched):
        out = run(emulated.bnp_update_stats_)
    assert_launches_within_limits()
    for a, e in zip(out[0], expected[0]):
        close(a, e, torch.float32)
    _cache.check(("stats-nonfinite", str(case), bad), lambda: run(emulated.bnp_update_stats_),
                 sched, out)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_sgd_steps_advance_from_the_last_rows_block(sched):
    """bnp_sgd_'s steps advance by one per call, done by the last block of the rows kernel (no
    launch of their own), with the table reused by the next calls (gradients in the weights'
    layout: a transposed one is copied at every call, so its table is new each time); a call
    whose layers have no rows takes increment_steps_kernel."""
    layers = [layer for layer in LAYERS + EXTRA_LAYERS if layer[2] != "t"]
    ws, bs, gws, gbs, means, sqmeans, groups = make_layers(torch.float32, True, layers)
    bufs = [torch.zeros_like(w) for w in ws], [torch.zeros_like(b) for b in bs]
    steps = [torch.tensor(float(i)) for i in range(len(ws))]
    kw = dict(groups=groups, eps=1e-5, lr=0.1, momentum=0.9)
    with emulated.schedule(*sched):
        copies = []
        for _ in range(3):
            emulated.bnp_sgd_(ws, bs, gws, gbs, *bufs, steps, means, sqmeans, **kw)
            copies.append(emulated.host_copies())
            names = [r["kernel"] for r in emulated.launches()]
            assert "increment_steps_kernel" not in names and len(names) == 2, names
        assert copies[1:] == [0, 0]
        assert [s.item() for s in steps] == [i + 3.0 for i in range(len(ws))]
        w0, g0 = torch.zeros(0, 5), torch.zeros(0, 5)
        empty_steps = [torch.tensor(2.0)]
        emulated.bnp_sgd_([w0], [], [g0], [], [], [], empty_steps, [torch.zeros(5)],
                          [torch.ones(5)], groups=[1], eps=1e-5, lr=0.1)
        assert [r["kernel"] for r in emulated.launches()] == ["increment_steps_kernel"]
        assert empty_steps[0].item() == 3.0


# (case, the kernel that must take it)
ONE_LAUNCH = [(((600, 40), 1, None), "stats_columns_kernel"),
              (((70, 3, 5, 5), 1, None), "stats_columns_kernel"),
              (((4, 5, 31), 1, None), "stats_columns_kernel"),
              (((4, 5, 32), 1, None), "stats_planes_kernel"),
              (((2, 3, 40000), 1, None), "stats_planes_kernel")]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("case,kernel", ONE_LAUNCH, ids=[str(c[0]) for c in ONE_LAUNCH])
def test_update_stats_one_launch_no_allocation(case, kernel, sched):
    """bnp_update_stats_ is one launch (the block that completes the call finalizes and advances
    the step) and allocates nothing once the stream's workspace is as large as the call needs:
    a larger input grows it, then every call of the smaller one reuses it. Under capture the
    call takes a fresh workspace of the graph's own (zeroed counters, scratch) and gives the same result bit for
    bit."""
    with emulated.schedule(*sched):
        big = torch.randn(20000, 40)  # columns: 313 chunks of 2 tiles, the largest workspace here
        emulated.bnp_update_stats_(big, torch.zeros(40), torch.ones(40), torch.zeros(()),
                                   channel_dim=1, momentum=0.1)
        expected = run_stats(ops.bnp_update_stats_, case, torch.float32)
        x, cd = stats_inputs(case, torch.float32)
        C = x.size(cd)
        runs = []
        for capture in (False, True):
            mean, sqmean, step = torch.zeros(C), torch.ones(C), torch.zeros(())
            with emulated.capture(capture):
                for _ in range(3):
                    emulated.bnp_update_stats_(x, mean, sqmean, step, channel_dim=cd,
                                               momentum=0.1)
                    assert [r["kernel"] for r in emulated.launches()] == [f"{kernel}<scalar_t>"]
                    assert emulated.device_allocations() == (2 if capture else 0)
                    x = x * 0.5 + 1
            x, _ = stats_inputs(case, torch.float32)
            runs.append([mean, sqmean, step])
    for a, e in zip(runs[0], expected[0]):
        close(a, e, torch.float32)
    for a, e in zip(runs[1], runs[0]):
        assert torch.equal(a, e)


def test_update_stats_layouts_in_sequence():
    """Calls of different layouts one after another on the stream's one workspace (columns and
    planes, more and fewer tiles, chunks and channels than the call before): each call's
    counters start at zero whatever the previous call left in the workspace, so every call
    equals the CPU kernel."""
    cases = [((64, 1000), 1, None), ((4, 33, 70), 1, None), ((600, 40), 1, None),
             ((2, 5, 40000), 1, None), ((3, 6, 2, 2), 1, None), ((70, 3, 5, 5), 1, None),
             ((1, 70), 1, None), ((4, 5, 32), 1, None)]
    for _ in range(2):
        for case in cases:
            close_all = []
            for fn in (ops.bnp_update_stats_, emulated.bnp_update_stats_):
                x, cd = stats_inputs(case, torch.float32)
                C = x.size(cd)
                st = [torch.zeros(C), torch.ones(C), torch.zeros(())]
                fn(x, *st, channel_dim=cd, momentum=0.1)
                close_all.append(st)
            for a, e in zip(close_all[1], close_all[0]):
                close(a, e, torch.float32)
