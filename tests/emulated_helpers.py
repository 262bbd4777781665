"""Shared pieces of the emulated CUDA tests (tests/test_emulated_*.py): the schedules, the
bitwise comparison across schedules and the launch-limit check."""
import pytest
import torch

from psi_cuda import emulated

# (order, seed): every order, and two seeds of the random one.
SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
SCHEDULE_IDS = [f"{o}{s}" if o == "random" else o for o, s in SCHEDULES]

needs_emulator = pytest.mark.skipif(not emulated.available(),
                                    reason="psi_cuda built without PSI_CUDA_BUILD_EMULATOR=1")

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """The tensor's elements as integers of the same width (NaNs compare by their bits)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(_INT_OF_SIZE[flat.element_size()])


def assert_bitwise(a_lists, b_lists, what):
    for i, (a_list, b_list) in enumerate(zip(a_lists, b_lists)):
        for j, (a, b) in enumerate(zip(a_list, b_list)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(bits(a), bits(b)), (
                f"{what}: list {i}, tensor {j} {tuple(a.shape)} differs between schedules "
                f"(max |diff| {(a.double() - b.double()).abs().max().item():.3e})")


def assert_launches_within_limits():
    """Every launch of the last emulated op fits a real GPU; returns the log."""
    log = emulated.launches()
    for r in log:
        gx, gy, gz = r["grid"]
        bx, by, bz = r["block"]
        assert 1 <= bx * by * bz <= 1024 and bz <= 64, r
        assert 1 <= gx < 2**31 and 1 <= gy <= 65535 and 1 <= gz <= 65535, r
        assert r["shared_bytes"] <= 48 * 1024, r
    return log


class ScheduleCache:
    """Outputs of the forward schedule per case, so each other schedule is compared with it bit
    for bit (computed on first use)."""

    def __init__(self):
        self._out = {}

    def check(self, key, run, sched, out):
        if sched == SCHEDULES[0]:
            self._out[key] = out
            return
        if key not in self._out:
            with emulated.schedule(*SCHEDULES[0]):
                self._out[key] = run()
        assert_bitwise(self._out[key], out, f"{key} under {sched}")
