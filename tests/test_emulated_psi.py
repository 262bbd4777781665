"""psi_sgd_ and psi_adam_: the CUDA kernels (csrc/cuda/psi_*_cuda.cu), run in the CPU emulator,
against the CPU kernels (tolerance) and across thread/block schedules (bit for bit).

The cases hit every kernel path and boundary: groups of 1, 2, 32, 33 (the thread-per-group
limit kThreadGroup = 32), 255, 256, 257 (the warp-per-group limit kWarpGroup = 256; many tiny
groups per block), 2047, 2048, 2049 elements (the register
limit of a block's group, kRegisterGroup = 2048), 8191, 8192, 8193 and
3 * 8192 + 1 (chunk edges of the short path's Gram sums, kChunk = 8192), 65535, 65536, 65537 (the
one-block limit kShortGroup = 65536) and 8 * 8192 + 8193 (chunk edges of the long-group path),
long, medium and tiny groups in one call, tables with many tensors (the
binary search over first units), lists of 1 and 500 tensors, empty tensors, zero rows,
channels-last params, transposed grads, all four dtypes, every option set, grad_scale/found_inf
and a step tensor passed twice.
"""
import pytest
import torch

from psi_cuda import emulated, ops
from emulated_helpers import (SCHEDULE_IDS, SCHEDULES, ScheduleCache,
                              assert_launches_within_limits, needs_emulator)
from helpers import assert_close_rel, clone_all
import test_psi_adam as adam_cases
import test_psi_sgd as sgd_cases

pytestmark = needs_emulator

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SMALL_SHAPES = [(7, 3, 3, 3), (5, 1), (3, 17), (2, 9000), (64, 129), (0, 4), (33,), (1, 1)]
BOUNDARY_LENGTHS = [1, 2, 32, 33, 255, 256, 257, 2047, 2048, 2049, 8191, 8192, 8193,
                    3 * 8192 + 1, 65535, 65536, 65537, 8 * 8192 + 8193]

_cache = ScheduleCache()


def make(op, shapes, dtype, manifold, momentum=0.9, **flags):
    if op == "psi_sgd_":
        return list(sgd_cases.make_case(shapes, dtype, "cpu", manifold, momentum, **flags))
    return list(adam_cases.make_case(shapes, dtype, "cpu", manifold, **flags))


def step_kw(op, manifold, **kw):
    """Arguments of a step of `op` on a case made by make(): momentum 0.9 for psi_sgd_."""
    extra = dict(momentum=0.9) if op == "psi_sgd_" else {}
    return dict(lr=0.1, manifold=manifold, **extra, **kw)


def _copy(t):
    """A clone that keeps t's element offset into its buffer (the vector-alignment cases)."""
    return t.clone() if t.storage_offset() == 0 else _at_offset(t, t.storage_offset())


def _at_offset(t, k):
    """A copy of t (contiguous) that starts k elements into a fresh buffer (k = 0: the
    allocator's alignment; else misaligned for 16-byte vectors unless k elements are 16 bytes)."""
    buf = torch.empty(t.numel() + k, dtype=t.dtype)
    out = buf[k:].view(t.shape)
    out.copy_(t)
    return out


def run(fn, case, steps, kw):
    out = [[_copy(t) for t in lst] for lst in case]
    for _ in range(steps):
        fn(*out, **kw)
    return out


def check(key, op, case, kw, sched, dtype, steps=2):
    """Emulated CUDA == CPU kernel (tolerance, steps exactly) and == forward schedule (bits)."""
    expected = run(getattr(ops, op), case, steps, kw)

    def emulate():
        return run(getattr(emulated, op), case, steps, kw)

    with emulated.schedule(*sched):
        out = emulate()
    assert_launches_within_limits()
    for i, (a_list, e_list) in enumerate(zip(out, expected)):
        for j, (a, e) in enumerate(zip(a_list, e_list)):
            assert a.stride() == case[i][j].stride()
            if i == len(out) - 1:  # state steps
                assert torch.equal(a, e), f"state_steps[{j}]: {a.item()} != {e.item()}"
                continue
            # NaN/inf where the CPU kernel has them (eps=0 on an underflowed second moment, a
            # non-finite gradient), else close; optimizer state at the params' tolerance (it is
            # made of rounded params).
            fin = torch.isfinite(e)
            assert torch.equal(torch.isfinite(a), fin), f"{op} list {i} tensor {j}: inf/NaN pattern"
            bad_a, bad_e = a[~fin], e[~fin]  # the same NaNs, the same infs
            assert torch.equal(torch.isnan(bad_a), torch.isnan(bad_e)), f"{op} list {i} tensor {j}"
            assert torch.equal(bad_a[~torch.isnan(bad_a)], bad_e[~torch.isnan(bad_e)])
            assert_close_rel(a[fin], e[fin], dtype, f"{op} list {i} tensor {j} {tuple(a.shape)}")
    _cache.check(key, emulate, sched, out)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_group_length_boundaries(op, length, manifold, sched):
    shapes = [(2, length)] if manifold == "channel" else [(length,)]
    case = make(op, shapes, torch.float32, manifold)
    check(("len", op, length, manifold), op, case, step_kw(op, manifold), sched, torch.float32)


# One call mixing a long group of many chunks with medium (read twice), tiny, empty and
# register-limit groups; a table of 37 tensors with uneven unit counts; one tensor; 500 tensors.
LISTS = {
    "mixed": [(2, 65537), (2, 3 * 8192 + 1), (5, 3), (1, 1), (0, 4), (4, 2049), (64, 129),
              (7, 3, 3, 3)],
    "uneven37": [(k % 7 + 1, (k * 13) % 40 + 1) for k in range(37)],
    "one": [(3, 5)],
    "many500": [(2, 3)] * 500,
}


# Groups of at most 32 elements are stepped by one thread each, 256 to a block, longer ones of
# at most 256 by one warp each, 8 to a block: rows of 7 (300 rows: two units, the second's
# threads partly idle), 31 and 32 (the thread limit; 513 rows of 32: three units, the last with
# one group), 33 and 255-257 (a warp each, around the warp limit), frozen length-1 groups, and
# tiny groups beside block-sized ones in one call.
TINY = [(300, 7), (17, 256), (9, 257), (5, 255), (8, 32), (513, 32), (3, 31), (2, 33), (4, 1),
        (3, 3, 3, 3), (2, 4000)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_many_tiny_groups(op, manifold, dtype, sched):
    case = make(op, TINY, dtype, manifold)
    check(("tiny", op, manifold, dtype), op, case, step_kw(op, manifold), sched, dtype)


# Element offsets of (params, grads, buffers, second moments): all aligned (16-byte vectors and a
# tail), the params off, the grads off, only the state off (the vector loop needs all four).
OFFSETS = {"aligned": (0, 0, 0, 0), "params": (1, 0, 0, 0), "grads": (0, 3, 0, 0),
           "state": (0, 0, 1, 3)}
# Rows read in place by one block (4000, 4001: a tail), a long group (70001), Euclidean tensors.
VECTOR_SHAPES = {"channel": [(3, 4000), (2, 4001)], "tensor": [(70001,), (2, 4001)],
                 None: [(3, 4001), (8195,), (7,)]}


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("where", list(OFFSETS))
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_vector_loads_aligned_and_not(op, manifold, where, dtype, sched):
    """The 16-byte vector loops and their scalar tails and fallbacks: tensors at offsets that
    misalign one stream at a time give the CPU kernel's result (and the same bits under every
    schedule; the sanitized build checks every vector access's alignment)."""
    case = make(op, VECTOR_SHAPES[manifold], dtype, manifold)
    offs = OFFSETS[where]
    lists = [0, 1, 2] + ([3] if op == "psi_adam_" else [])
    for li, k in zip(lists, offs):
        case[li] = [_at_offset(t, k) for t in case[li]]
    assert all(t.storage_offset() == k for li, k in zip(lists, offs) for t in case[li])
    check(("vec", op, manifold, where, dtype), op, case, step_kw(op, manifold), sched, dtype)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("name", list(LISTS))
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_lists(op, name, manifold, sched):
    case = make(op, LISTS[name], torch.float32, manifold)
    check(("list", op, name, manifold), op, case, step_kw(op, manifold), sched, torch.float32)


def _option_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("opts", sgd_cases.OPTIONS, ids=_option_id)
def test_psi_sgd_options(opts, manifold, dtype, sched):
    case = make("psi_sgd_", SMALL_SHAPES, dtype, manifold, opts["momentum"])
    check(("sgd-opt", _option_id(opts), manifold, dtype), "psi_sgd_", case,
          dict(lr=0.1, manifold=manifold, **opts), sched, dtype)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("opts", adam_cases.OPTIONS, ids=_option_id)
def test_psi_adam_options(opts, manifold, dtype, sched):
    case = make("psi_adam_", SMALL_SHAPES, dtype, manifold)
    check(("adam-opt", _option_id(opts), manifold, dtype), "psi_adam_", case,
          dict(lr=0.01, manifold=manifold, **opts), sched, dtype)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_layouts(op, dtype, sched):
    """Channels-last params with zero rows; transposed (non-contiguous) grads."""
    shapes = [(6, 4, 3, 3), (5, 9), (3, 2100)]
    case = make(op, shapes, dtype, "channel", zero_rows=True, channels_last=True)
    grads = case[1]
    grads[1] = grads[1].t().contiguous().t()  # same shape, transposed strides
    grads[2] = grads[2].t().contiguous().t()
    check(("layout", op, dtype), op, case, step_kw(op, "channel"), sched, dtype)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_grad_scale(op, manifold, sched):
    case = make(op, SMALL_SHAPES, torch.float32, manifold)
    case[1] = [g * 4 for g in case[1]]
    kw = step_kw(op, manifold, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    check(("scale", op, manifold), op, case, kw, sched, torch.float32)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_found_inf_changes_nothing(op, manifold, sched):
    case = make(op, SMALL_SHAPES + [(2, 3 * 8192 + 1), (1, 65537)], torch.float32, manifold)
    case[-1] = [torch.tensor(float(i % 3)) for i in range(len(case[-1]))]
    before = clone_all(*case)
    with emulated.schedule(*sched):
        getattr(emulated, op)(*case, **step_kw(op, manifold, grad_scale=torch.tensor(2.0),
                                                   found_inf=torch.tensor(1.0)))
    for b_list, a_list in zip(before, case):
        for b, a in zip(b_list, a_list):
            assert torch.equal(b, a)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_step_tensor_passed_twice(op, sched):
    """One step tensor shared by two params is read by both (first-step rule) and incremented
    twice, as on the CPU."""
    case = make(op, [(3, 5), (4, 7), (2, 2049)], torch.float32, "channel")
    shared = torch.tensor(0.0)
    case[-1] = [shared, shared, torch.tensor(0.0)]
    expected = clone_all(*case)
    # clone_all breaks the sharing: restore it in both copies.
    expected[-1][1] = expected[-1][0]
    getattr(ops, op)(*expected, **step_kw(op, "channel"))
    with emulated.schedule(*sched):
        getattr(emulated, op)(*case, **step_kw(op, "channel"))
    assert shared.item() == 2.0 and expected[-1][0].item() == 2.0
    for i in range(len(case) - 1):
        for a, e in zip(case[i], expected[i]):
            assert_close_rel(a, e, torch.float32, f"list {i}")


def _psisgd_step_launches(shape_list):
    """The launches of one PSISGD step over `shape_list` (name, shape, manifold): one psi_sgd_
    call per manifold, as the optimizer buckets its groups."""
    names = []
    for manifold in ("channel", None):
        shapes = [shape for _, shape, m in shape_list if m == manifold]
        case = make("psi_sgd_", shapes, torch.float32, manifold, 0.9)
        emulated.psi_sgd_(*case, lr=0.1, momentum=0.9, manifold=manifold)
        names += [r["kernel"] for r in assert_launches_within_limits()]
    return names


def test_resnet50_launches_do_not_grow_with_tensors():
    """Launches per step are a constant of the call (one per kind of work present), not of the
    number of tensors: the 161 tensors of ResNet-50 take the same launches as 5 of them that
    have the same kinds of work (rows held in registers, rows over 2048 elements, Euclidean).
    Every row of ResNet-50 is at most 65536 elements: one launch per psi_sgd_ call."""
    from psi_cuda.apps.shapes import resnet50

    full = resnet50()
    few = [full[0], full[1], full[-3], full[-1]] + [e for e in full if e[1] == (512, 512, 3, 3)][:1]
    launches = {"few": _psisgd_step_launches(few), "full": _psisgd_step_launches(full)}
    print(f"ResNet-50 PSISGD step: {len(launches['full'])} launches: {launches['full']}")
    assert launches["few"] == launches["full"]
    # the steps are advanced by the last block of each call's last kernel: no launch of their own
    assert launches["full"] == ["psi_short_groups_kernel<scalar_t>", "euclidean_sgd_kernel<scalar_t>"]


CALL_KINDS = {  # the last kernel of the call, which advances the steps
    "short": [(300, 7), (2, 5)], "medium": [(2, 9000), (1, 3000)],
    "long": [(2, 65537), (1, 70000)], "short+long": [(5, 4), (1, 65537)]}


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("manifold", ["channel", None])
@pytest.mark.parametrize("kind", list(CALL_KINDS))
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_steps_advance_once_from_the_last_block(op, kind, manifold, sched):
    """Each step advances by exactly one per call, done by whichever block of the last kernel
    arrives last (many blocks: 300 rows), also for a step tensor listed twice (+2, as on the
    CPU); found_inf leaves every step alone; a call of empty tensors only takes
    increment_steps_kernel. No launch of its own otherwise."""
    shapes = CALL_KINDS[kind]
    case = make(op, shapes, torch.float32, manifold)
    shared = torch.tensor(5.0)
    case[-1] = [shared, shared] + [torch.tensor(float(k)) for k in range(len(shapes) - 2)]
    kw = step_kw(op, manifold)
    with emulated.schedule(*sched):
        out = clone_all(*case)
        out[-1] = [out[-1][0], out[-1][0]] + out[-1][2:]
        getattr(emulated, op)(*out, **kw)
        names = [r["kernel"] for r in emulated.launches()]
        assert "increment_steps_kernel" not in names
        assert out[-1][0].item() == 7.0
        assert [s.item() for s in out[-1][2:]] == [k + 1.0 for k in range(len(shapes) - 2)]
        getattr(emulated, op)(*out, **kw, found_inf=torch.ones(()))
        assert out[-1][0].item() == 7.0
        empty = make(op, [(0, 3), (0,)], torch.float32, manifold)
        getattr(emulated, op)(*empty, **kw)
        assert [r["kernel"] for r in emulated.launches()] == ["increment_steps_kernel"]
        assert all(s.item() == 1.0 for s in empty[-1])


@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_float32_step_counter_saturates_harmlessly(op):
    """state_steps are float32 (as torch's capturable optimizers keep them): past 2**24 the
    increment rounds away and the counter stays at 16777216, on the CPU and in the CUDA kernels.
    What reads the step cannot tell: the first-step rule needs step == 0, and Adam's bias
    corrections 1 - beta**t are 1 in double for t > 2**24 at the default betas, so a step at
    2**24 equals a step at 2**25 bit for bit."""
    big = float(2 ** 24)
    results = []
    for fn in (getattr(ops, op), getattr(emulated, op)):
        for t in (big, 2 * big):
            torch.manual_seed(0)
            case = make(op, [(3, 5), (4,)], torch.float32, "channel")
            case[-1] = [torch.tensor(t) for _ in case[-1]]
            fn(*case, **step_kw(op, "channel"))
            assert all(s.item() == t for s in case[-1])  # t + 1 rounds to t
            results.append(case[0])
    # results: CPU at 2**24, CPU at 2**25, emulated at 2**24, emulated at 2**25.
    for first, second in ((results[0], results[1]), (results[2], results[3])):
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        assert_close_rel(b, a, torch.float32, "emulated vs CPU")


def _edge_case(op, length, manifold):
    """One tensor per edge (docs/ALGORITHMS.md 6.6, 6.7): groups at 2^-83 (1e-25), 2^66 (7e19)
    and 2^101 (3e30) with gradients about 1/s, a gradient of about 2^64 at unit |w|, a NaN and
    an inf in one group's gradient, and a plain unit-scale tensor."""
    case = make(op, [(3, length)] * 7, torch.float32, manifold)
    params, grads = case[0], case[1]
    for k, s in enumerate([2.0 ** -83, 2.0 ** 66, 2.0 ** 101]):
        params[k].mul_(s)
        grads[k].div_(s)
    if op == "psi_adam_":
        # (with PSI-SGD momentum the buffer transported after such a jump is the difference of
        # two vectors of about 1e19 that cancel to about 1e4: ill-conditioned in any precision,
        # so CPU and CUDA sums legitimately differ there; test_edges.py checks one step)
        grads[3].mul_(2.0 ** 64)
    grads[4][1, 5] = float("nan")
    grads[5][2, length - 1] = float("inf")
    return case


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("manifold", ["channel", "tensor"])
@pytest.mark.parametrize("length", [70, 9000, 65600])  # registers; read twice; long (chunked)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_edges_of_the_range_and_nonfinite_gradients(op, length, manifold, sched):
    """The double fallbacks of the Gram sums and of the writes, and the NaN policy, in the CUDA
    kernels: equal to the CPU kernel (which test_edges.py checks against the oracles), the same
    NaN pattern, and bit for bit across schedules."""
    case = _edge_case(op, length, manifold)
    expected = run(getattr(ops, op), case, 2, step_kw(op, manifold))
    for k in range(4):  # the CPU kernel itself: finite, moved
        assert torch.isfinite(expected[0][k]).all() and not torch.equal(expected[0][k], case[0][k])
    bad_rows = (1, 2) if manifold == "channel" else (slice(None), slice(None))
    assert torch.isnan(expected[0][4][bad_rows[0]]).all()
    assert torch.isnan(expected[0][5][bad_rows[1]]).all()
    check(("edges", op, length, manifold), op, case, step_kw(op, manifold), sched, torch.float32)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("shape,b", [((8, 70), 2), ((6, 700), 3), ((4, 3000), 2), ((4, 40000), 2),
                                     ((3, 5), 3)], ids=str)
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_block_groups(op, shape, b, sched):
    """manifold="block" (docs/ALGORITHMS.md 1.2b): groups of b rows on the short-group kernel
    (140, 2100 elements in registers, 6000 read twice), the long chunked path (80000), and a block
    that is the whole tensor."""
    case = make(op, [shape, (2 * b, 9)], torch.float32, "channel")
    if op == "psi_adam_":
        case[3] = [torch.zeros(p.size(0) // b) for p in case[0]]
    kw = dict(step_kw(op, "block"), block_rows=b)
    check(("block", op, shape, b), op, case, kw, sched, torch.float32)


_NEW_TENSORS: list = []  # see test_tables_are_reused_until_a_tensor_changes


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("kind", list(CALL_KINDS))
@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_"])
def test_tables_are_reused_until_a_tensor_changes(op, kind, sched):
    """A call whose tensors (addresses, sizes, steps) equal an earlier call's reuses that call's
    device table: no upload, and the same results as the CPU kernel over several steps (the
    arrivals counter of the step bump is back at zero for the next call). A new tensor in the
    list (another address) makes a new table."""
    case = make(op, CALL_KINDS[kind], torch.float32, "channel")
    kw = step_kw(op, "channel")
    expected = clone_all(*case)
    with emulated.schedule(*sched):
        out = clone_all(*case)
        copies = []
        for _ in range(3):
            getattr(emulated, op)(*out, **kw)
            copies.append(emulated.host_copies())
            getattr(ops, op)(*expected, **kw)
        assert copies[1:] == [0, 0]
        for a_list, e_list in zip(out, expected):
            for a, e in zip(a_list, e_list):
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
        # A new tensor: another address. Kept alive for the rest of the session, so that no later
        # case's new tensor lands at this address and finds this call's table in the cache
        # (tables are keyed on their words; equal words are rightly reused).
        out[0][0] = out[0][0].clone()
        _NEW_TENSORS.append(out[0][0])
        getattr(emulated, op)(*out, **kw)
        assert emulated.host_copies() == 1
        assert all(s.item() == 4.0 for s in out[-1])
