"""The emulator itself: each kind of defect it claims to catch is caught, in a kernel written to
have it (csrc/emu/emu_selftest.cpp), and the correct twin passes; warp collectives and launch
limits behave as on a GPU; psi_cuda.emulated has the signatures of psi_cuda.ops."""
import inspect

import pytest
import torch

from psi_cuda import emulated, ops
from emulated_helpers import SCHEDULE_IDS, SCHEDULES, needs_emulator

pytestmark = needs_emulator

T = 64  # threads per block of the self-test kernels


def selftest(name, n=8 * T, order="forward", seed=0):
    out = torch.full((n,), -7.0)
    with emulated.schedule(order, seed):
        torch.ops.psi_cuda_emu._selftest(name, out)
    return out


def test_same_signatures_as_ops():
    for name in ("psi_sgd_", "psi_adam_", "bnp_update_stats_", "bnp_precondition_", "bnp_sgd_"):
        assert inspect.signature(getattr(emulated, name)) == inspect.signature(getattr(ops, name))


def test_missing_barrier_is_a_schedule_dependent_result():
    """Thread t reads what thread t + 1 wrote without a barrier: in index order thread t runs
    before t + 1 and reads poison (the block's shared memory is NaN bytes at its start); in
    reverse order it reads t + 1. With the barrier every schedule reads t + 1."""
    forward = selftest("race", order="forward")[:2 * T]
    reverse = selftest("race", order="reverse")[:2 * T]
    assert torch.isnan(forward[:T - 1]).all()
    assert torch.equal(reverse[:T - 1], torch.arange(1, T, dtype=torch.float32))
    expected = (torch.arange(2 * T) % T + 1) % T
    for order, seed in SCHEDULES:
        assert torch.equal(selftest("synced", order=order, seed=seed)[:2 * T], expected.float())


def test_shared_memory_is_poisoned_per_block():
    out = selftest("stale_shared")[:2 * T]
    assert (out[:T] == 1).all()  # block 0 wrote it
    assert torch.isnan(out[T:]).all()  # block 1 did not: what block 0 left is not visible


@pytest.mark.parametrize("name,pattern", [
    ("divergent_barrier", "different __syncthreads"),
    ("barrier_after_exit", "after 1 threads of the block exited"),
    ("lane_outside_mask", "does not include it"),
    ("mask_names_exited_lane", "which has exited"),
    ("mismatched_masks", "mask 0xffffffff waits for lane 0, which has exited"),
    ("warp_sync_against_barrier", "deadlock: 16 threads wait in warp collectives, 48 at"),
    ("partial_warp_full_mask", "names lanes that do not exist"),
    ("block_too_large", "invalid configuration argument"),
    ("grid_y_too_large", "invalid configuration argument"),
    ("empty_grid", "invalid configuration argument"),
    ("shared_too_large", "bytes of shared memory"),
])
def test_defects_are_errors(name, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        selftest(name)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_reduction_aggregate_only_in_thread_zero(sched):
    out = selftest("reduce_everywhere", order=sched[0], seed=sched[1])[:T]
    assert out[0].item() == sum(range(T))
    assert torch.isnan(out[1:]).all()


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_warp_collectives(sched):
    out = selftest("warp_ops", order=sched[0], seed=sched[1])[:5 * T].view(T, 5)
    t = torch.arange(T)
    lane = t % 32
    base = t - lane
    down = torch.where(lane + 3 < 32, t + 3, t)
    up = torch.where(lane >= 5, t - 5, t)
    xor = base + (lane ^ 7)
    idx16 = base + (lane // 16) * 16 + 9  # width 16: lane 9 of each half warp
    ballot = sum(1 << k for k in range(32) if k % 3 == 0)
    assert torch.equal(out[:, 0], down.float())
    assert torch.equal(out[:, 1], up.float())
    assert torch.equal(out[:, 2], xor.float())
    assert torch.equal(out[:, 3], idx16.float())
    assert (out[:, 4] == float(ballot)).all()


def test_pinned_buffer_freed_before_its_copy_is_caught():
    """The table upload records the pinned block's use on the stream (as torch's caching host
    allocator does for copy_): the copy reads the table. A copy that does not record it reads
    the poison the block was filled with when the host freed it."""
    good = selftest("pinned_recorded", n=16)
    assert torch.equal(good, torch.arange(1, 17, dtype=torch.float32))
    bad = selftest("pinned_unrecorded", n=16)
    assert (bad == -1).all()  # int64 0xFF...FF


def test_launch_log_and_schedule_arguments():
    p, g = [torch.randn(3, 5)], [torch.randn(3, 5)]
    emulated.psi_sgd_(p, g, [], [torch.tensor(0.0)], lr=0.1)
    log = emulated.launches()
    assert [r["kernel"] for r in log] == ["psi_short_groups_kernel<scalar_t>"]
    # three rows of 5: one block, one warp per row (groups of at most 256 elements)
    assert log[0]["grid"] == (1, 1, 1) and log[0]["block"] == (256, 1, 1)
    assert 0 < log[0]["shared_bytes"] <= 48 * 1024
    with pytest.raises(ValueError, match="schedule order"):
        with emulated.schedule("sideways"):
            pass


@pytest.mark.parametrize("op", ["psi_sgd_", "psi_adam_", "bnp_sgd_", "bnp_precondition_"])
def test_capture_path_equals_pinned_path(op):
    """Under (emulated) CUDA graph capture the metadata tables travel as kernel arguments
    (write_table_kernel launches) instead of a pinned buffer: same results, bit for bit, and no
    pinned allocation (an error under capture) is made."""
    from test_emulated_bnp import LAYERS, make_layers

    def run(capturing):
        torch.manual_seed(0)
        if op in ("psi_sgd_", "psi_adam_"):
            # More tensors than one write_table_kernel launch carries (480 words).
            shapes = [(k % 5 + 1, 7) for k in range(60)] + [(2, 9000)]
            params = [torch.randn(s) for s in shapes]
            grads = [torch.randn(s) for s in shapes]
            steps = [torch.tensor(1.0) for _ in shapes]
            if op == "psi_sgd_":
                lists = [params, grads, [torch.randn(s) for s in shapes], steps]
                kw = dict(lr=0.1, momentum=0.9)
            else:
                lists = [params, grads, [torch.randn(s) for s in shapes],
                         [torch.rand(s[0]) for s in shapes], steps]
                kw = dict(lr=0.01)
        else:
            ws, bs, gws, gbs, means, sqmeans, groups = make_layers(torch.float32, True,
                                                                   LAYERS * 8)
            if op == "bnp_sgd_":
                lists = [ws, bs, gws, gbs, [], [], [torch.tensor(1.0) for _ in ws], means,
                         sqmeans]
                kw = dict(groups=groups, eps=1e-5, lr=0.1)
            else:
                lists = [gws, gbs, means, sqmeans]
                kw = dict(groups=groups, eps=1e-5)
        with emulated.capture(capturing):
            getattr(emulated, op)(*lists, **kw)
        kernels = [r["kernel"] for r in emulated.launches()]
        return lists, kernels

    eager, eager_kernels = run(False)
    captured, captured_kernels = run(True)
    assert "write_table_kernel" not in eager_kernels
    assert captured_kernels.count("write_table_kernel") >= 2
    for a_list, b_list in zip(eager, captured):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_index_arithmetic_past_2_to_31_elements():
    """chunk_of_group and find_tensor (csrc/cuda/multi_tensor.cuh), as the kernels run them, on
    groups and unit counts past 2**31 (no such tensor is allocated): 64-bit all the way."""
    chunk = 8192
    for group_len in (3 * 2**31 + 5, 2**40 + 1, 8192, 8193):
        chunks = -(-group_len // chunk)
        for first in (0, 2**33):
            for local in (0, 1, chunks - 1, chunks, 5 * chunks + chunks - 1):
                got = torch.ops.psi_cuda_emu._chunk_of_group(group_len, first, first + local)
                g, start = divmod(local, chunks)
                begin = g * group_len + start * chunk
                assert got == [g, begin, min(chunk, group_len - start * chunk)], (group_len, local)
    firsts = [0, 5, 2**31 - 1, 2**31, 2**32 + 7, 2**40]
    for unit, want in [(0, 0), (4, 0), (5, 1), (2**31 - 2, 1), (2**31 - 1, 2), (2**31, 3),
                       (2**32 + 6, 3), (2**32 + 7, 4), (2**40 - 1, 4), (2**40 + 2**35, 5)]:
        assert torch.ops.psi_cuda_emu._find_tensor(firsts, unit) == want, unit
