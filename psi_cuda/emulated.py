"""The CUDA kernels of psi_cuda, run on the CPU by an emulator of the CUDA execution model.

``psi_cuda.emulated.psi_sgd_`` (and ``psi_adam_``, ``psi_grams``, ``bnp_update_stats_``, ``bnp_precondition_``,
``bnp_sgd_``) take exactly the arguments of the same functions in :mod:`psi_cuda.ops`, on CPU
tensors, and run the host code and kernels of ``csrc/cuda/*.cu`` compiled as C++ (``csrc/emu/``):
every thread of a block is a fiber, ``__syncthreads()`` a switch between them, shared memory is
poisoned at the start of each block, launches are checked against the limits of real GPUs.

    with psi_cuda.emulated.schedule("random", seed=3):   # order of threads and blocks
        psi_cuda.emulated.psi_sgd_(params, grads, bufs, steps, lr=0.1, momentum=0.9)
    psi_cuda.emulated.launches()   # [{'kernel': ..., 'grid': (x, y, z), 'block': ..., ...}]

The emulator is part of builds made with ``PSI_CUDA_BUILD_EMULATOR=1`` (``scripts/setup.sh``
sets it); :func:`available` says whether this build has it. It is a test tool: slow (a fiber
switch per thread and barrier) and single-threaded. See docs/EMULATOR.md for what it shows and
what it cannot (memory model, warp-synchronous timing, occupancy, speed).
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch

from . import ops

try:
    from . import _emu  # noqa: F401  (loading the library registers the psi_cuda_emu ops)
except ImportError:  # a build without PSI_CUDA_BUILD_EMULATOR=1
    _emu = None

ORDERS = ("forward", "reverse", "random")

__all__ = ["available", "schedule", "capture", "launches", "host_copies", "device_allocations",
           "psi_sgd_", "psi_adam_", "psi_grams", "bnp_update_stats_", "bnp_precondition_",
           "bnp_sgd_", "ORDERS"]


def available() -> bool:
    """Whether this build of psi_cuda has the emulator (built with PSI_CUDA_BUILD_EMULATOR=1)."""
    return _emu is not None


def _require() -> None:
    if _emu is None:
        raise RuntimeError("psi_cuda.emulated: this build has no emulator; rebuild psi_cuda with "
                           "PSI_CUDA_BUILD_EMULATOR=1 (scripts/setup.sh does)")


_state = {"order": "forward", "seed": 0, "capture": False}


@contextlib.contextmanager
def schedule(order: str, seed: int = 0) -> Iterator[None]:
    """Runs the emulated ops inside in schedule ``order``: ``"forward"`` (threads and blocks in
    index order), ``"reverse"`` or ``"random"`` (a permutation drawn from ``seed`` at every round
    between barriers and for the blocks of every launch)."""
    _require()
    if order not in ORDERS:
        raise ValueError(f"schedule order must be one of {ORDERS}; got {order!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"schedule seed must be a non-negative int; got {seed!r}")
    before = dict(_state)
    _state.update(order=order, seed=seed)
    torch.ops.psi_cuda_emu._set_schedule(ORDERS.index(order), seed)
    try:
        yield
    finally:
        _state.update(before)
        torch.ops.psi_cuda_emu._set_schedule(ORDERS.index(before["order"]), before["seed"])


@contextlib.contextmanager
def capture(on: bool = True) -> Iterator[None]:
    """Inside, the emulated stream reports that it is being captured into a CUDA graph, so the
    ops take their capture paths (metadata tables as kernel arguments, no pinned buffers)."""
    _require()
    before = _state["capture"]
    _state["capture"] = bool(on)
    torch.ops.psi_cuda_emu._set_capture(bool(on))
    try:
        yield
    finally:
        _state["capture"] = before
        torch.ops.psi_cuda_emu._set_capture(before)


def launches() -> list[dict]:
    """The kernel launches of the last emulated op, in launch order: dicts with ``kernel`` (name
    as written at the launch), ``grid`` and ``block`` (3-tuples) and ``shared_bytes`` (static
    shared memory the kernel used plus dynamic)."""
    _require()
    out = []
    for line in torch.ops.psi_cuda_emu._launches().splitlines():
        kernel, grid, block, shared = line.split("\t")
        out.append({"kernel": kernel, "grid": tuple(int(v) for v in grid.split(",")),
                    "block": tuple(int(v) for v in block.split(",")),
                    "shared_bytes": int(shared)})
    return out


def host_copies() -> int:
    """The host-to-device copies (metadata table uploads) the last emulated op queued: 0 when
    it reused a table an earlier call uploaded (csrc/cuda/device_table.cuh)."""
    _require()
    return int(torch.ops.psi_cuda_emu._host_copies())


def device_allocations() -> int:
    """The device tensors the last emulated op allocated (from torch's allocator, which stands
    for CUDA's caching allocator during an op): 0 when it reused every buffer it needs."""
    _require()
    return int(torch.ops.psi_cuda_emu._device_allocations())


def _bind(fn):
    """``fn`` of psi_cuda.ops, calling the psi_cuda_emu library instead of psi_cuda."""
    globals_ = dict(fn.__globals__)
    globals_["_OPS"] = torch.ops.psi_cuda_emu
    bound = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__,
                               fn.__closure__)
    bound.__kwdefaults__ = fn.__kwdefaults__
    bound.__doc__ = (f"The emulated CUDA kernels of :func:`psi_cuda.ops.{fn.__name__}` (same "
                     "arguments, CPU tensors).")
    bound.__annotations__ = dict(fn.__annotations__)
    bound.__module__ = __name__
    bound.__qualname__ = fn.__qualname__

    def run(*args, **kwargs):
        _require()
        return bound(*args, **kwargs)

    run.__wrapped__ = bound  # inspect.signature(run) is that of psi_cuda.ops.<op>
    for attr in ("__name__", "__qualname__", "__doc__", "__module__", "__annotations__"):
        setattr(run, attr, getattr(bound, attr))
    return run


psi_sgd_ = _bind(ops.psi_sgd_)
psi_adam_ = _bind(ops.psi_adam_)
psi_grams = _bind(ops.psi_grams)
bnp_update_stats_ = _bind(ops.bnp_update_stats_)
bnp_precondition_ = _bind(ops.bnp_precondition_)
bnp_sgd_ = _bind(ops.bnp_sgd_)
