"""What the kernels step for a parameter, and CUDA graphs: fp32 master copies of fp16/bf16
parameters (``master_weights=True``), contiguous working copies of parameters laid out in a way
the kernels cannot step in place (slices, transposes of channel groups), and the checks of a
step taken under CUDA graph capture (``capturable=True``)."""
from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_flag(group: dict, key: str, where: str) -> None:
    if not isinstance(group.get(key, False), bool):
        raise ValueError(f"{where}['{key}'] must be True or False; got {group[key]!r}")


def uses_master(p: Tensor, group: dict) -> bool:
    """Whether ``p`` is stepped through an fp32 master copy."""
    return bool(group.get("master_weights", False)) and p.dtype in LOW_PRECISION


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory, in any dim order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def steppable(p: Tensor, manifold) -> bool:
    """Whether the kernels step ``p`` in place: dense, and for channel and block groups with
    each row one block of memory (dim 0 outermost), as contiguous and channels-last tensors are."""
    if p.numel() == 0:
        return True
    if not _dense(p):
        return False
    if manifold not in ("channel", "block") or p.dim() == 0 or p.size(0) <= 1:
        return True
    return p.stride(0) == p.numel() // p.size(0)


def laid_out_like(p: Tensor, manifold, dtype: torch.dtype) -> Tensor:
    """An empty tensor for state or a copy of ``p``: laid out like ``p`` where the kernels step
    ``p`` in place, contiguous where they step a contiguous copy."""
    if steppable(p, manifold):
        return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
    return torch.empty(p.shape, dtype=dtype, device=p.device)


def master_copy(p: Tensor, state: dict, manifold) -> Tensor:
    """``state["master"]``: the fp32 copy of ``p`` the optimizer steps (made from ``p`` on first
    use, laid out like ``p``, re-laid out when ``p`` changed layout)."""
    master = state.get("master")
    if master is None:
        master = laid_out_like(p, manifold, torch.float32).copy_(p)
    elif steppable(p, manifold) and master.stride() != p.stride():
        master = laid_out_like(p, manifold, torch.float32).copy_(master)
    state["master"] = master
    return master


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (``(..., 2)``, as torch.optim steps complex parameters
    of elementwise updates); any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def step_target(p: Tensor, state: dict, group: dict, writebacks: list,
                grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """What the kernels step for ``p``: ``(p, p.grad)``; with master weights on an fp16/bf16
    ``p`` its fp32 master and the gradient cast to fp32; for a ``p`` the kernels cannot step in
    place (a slice, a transposed channel group) a contiguous copy. For a master or a copy,
    ``(p, target)`` is appended to ``writebacks`` so that ``write_back`` puts the stepped values
    into ``p``. ``grad`` defaults to ``p.grad`` (given for a view such as ``as_real(p)``)."""
    manifold = group.get("manifold")
    grad = p.grad if grad is None else grad
    if uses_master(p, group):
        master = master_copy(p, state, manifold)
        writebacks.append((p, master))
        return master, grad.to(torch.float32)
    if steppable(p, manifold):
        return p, grad
    copy = laid_out_like(p, manifold, p.dtype).copy_(p)
    writebacks.append((p, copy))
    return copy, grad


def write_back(writebacks: list) -> None:
    """``p.copy_(target)`` for every pair: ``p`` becomes its master rounded to nearest, or its
    stepped copy. A step skipped by found_inf leaves each target, hence ``p``, as it was."""
    if writebacks:
        params, masters = zip(*writebacks)
        torch._foreach_copy_(list(params), list(masters))


def capturing() -> bool:
    """True when a CUDA graph capture is in progress on the current stream (never while
    torch.compile traces: the compiled step is checked when it is captured as a whole)."""
    if torch.compiler.is_compiling() or not torch.cuda.is_initialized():
        return False  # (no capture can run before CUDA is initialized; CPU runs never ask it)
    return torch.cuda.is_current_stream_capturing()


def check_capture(opt, needs_state) -> None:
    """Before a step under CUDA graph capture, every check that would otherwise fail inside the
    capture or make a graph that replays wrongly: every group capturable, params on the GPU with
    the fused kernels, and the state already made (``needs_state(p, group)`` is True when the step
    would create state for ``p``: state made during a capture would be re-zeroed at every
    replay)."""
    if not capturing():
        return
    for gi, group in enumerate(opt.param_groups):
        where = f"{opt.name}: param_groups[{gi}]"
        if not group.get("capturable", False):
            raise RuntimeError(f"{where} has capturable=False but step() is being captured in a "
                               f"CUDA graph; construct {opt.name}(..., capturable=True)")
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.device.type != "cuda" or not opt._use_fused(p.device):
                raise RuntimeError(f"{where}['params'][{pi}] is on {p.device} with backend="
                                   f"{opt.backend!r}: a captured step needs CUDA params and the "
                                   "fused CUDA kernels")
            if needs_state(p, group):
                raise RuntimeError(f"{where}['params'][{pi}] has no optimizer state yet: take "
                                   "one step() before capturing (state made during a capture "
                                   "would be re-zeroed at every replay)")
