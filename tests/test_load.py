"""Load and leaks: many steps over a long list of tiny tensors plus a few large ones keep the
process' resident memory flat after warm-up, and the step time does not grow.

The steps: 10,000 op calls over 2,003 tensors (``PSI_CUDA_LOAD_STEPS`` changes it), and 1,000
optimizer steps (``PSISGD`` and ``PSIAdam``, state, groups and the Python layer included). The
time check compares medians of the first and last blocks of steps with a wide margin (3x): it
catches a per-step cost that grows with the step count (a list or table that is never freed
grows it linearly), not noise.
"""
import os
import statistics
import time

import pytest
import torch

import psi_cuda
from psi_cuda import ops

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="resident memory is read from /proc/self/statm")

STEPS = int(os.environ.get("PSI_CUDA_LOAD_STEPS", "10000"))
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3)] * 2000 + [(64, 576), (128, 1152), (4096,)]
    return [torch.randn(s, generator=gen) for s in shapes]


def run_and_watch(step, steps: int, warmup: int, block: int = 100):
    """Runs step() `steps` times; returns (RSS after warm-up, RSS at the end, median time of a
    step in the first and in the last `block`-step blocks after warm-up)."""
    for _ in range(warmup):
        step()
    rss0 = rss_mb()
    times = []
    for _ in range(steps - warmup):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    first = statistics.median(times[:block * 3])
    last = statistics.median(times[-block * 3:])
    return rss0, rss_mb(), first, last


def test_op_10000_steps_over_2000_tiny_tensors_no_growth():
    params, grads = tensors(0), tensors(1)
    grads = [g * 1e-3 for g in grads]
    bufs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    norms0 = torch.stack([p.reshape(p.size(0), -1).norm(dim=1).sum() for p in params[:-1]])

    def step():
        ops.psi_sgd_(params, grads, bufs, steps, lr=0.01, momentum=0.9, manifold="channel")

    rss0, rss1, first, last = run_and_watch(step, STEPS, warmup=min(500, STEPS // 4))
    assert rss1 - rss0 < 8.0, f"resident memory grew by {rss1 - rss0:.1f} MB"
    assert last < 3 * first, f"step time grew from {first * 1e3:.2f} to {last * 1e3:.2f} ms"
    # the steps were real: every counter at STEPS, channel norms kept
    assert all(s.item() == STEPS for s in steps)
    norms = torch.stack([p.reshape(p.size(0), -1).norm(dim=1).sum() for p in params[:-1]])
    # (each step keeps the norm to float rounding; over 10,000 steps a row drifts by ~1e-4)
    torch.testing.assert_close(norms, norms0, rtol=1e-3, atol=0)


@pytest.mark.parametrize("cls", [psi_cuda.PSISGD, psi_cuda.PSIAdam], ids=["PSISGD", "PSIAdam"])
def test_optimizer_1000_steps_no_growth(cls):
    params = [torch.nn.Parameter(t) for t in tensors(0)]
    for p, g in zip(params, tensors(1)):
        p.grad = g * 1e-3
    groups = [{"params": params[:2000], "manifold": "channel"},
              {"params": params[2000:], "manifold": None, "weight_decay": 0.01}]
    opt = cls(groups, lr=0.01)
    n = min(1000, STEPS)
    rss0, rss1, first, last = run_and_watch(opt.step, n, warmup=n // 5, block=50)
    assert rss1 - rss0 < 8.0, f"resident memory grew by {rss1 - rss0:.1f} MB"
    assert last < 3 * first, f"step time grew from {first * 1e3:.2f} to {last * 1e3:.2f} ms"
    assert opt.state[params[0]]["step"].item() == n
