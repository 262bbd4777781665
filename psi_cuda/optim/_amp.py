"""Mixed precision and CUDA graphs for the psi_cuda optimizers: fp32 master copies of fp16/bf16
parameters (``master_weights=True``) and the checks of a step taken under CUDA graph capture
(``capturable=True``)."""
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


def master_copy(p: Tensor, state: dict) -> Tensor:
    """``state["master"]``: the fp32 copy of ``p`` the optimizer steps (made from ``p`` on first
    use, laid out like ``p``, re-laid out when ``p`` changed layout)."""
    master = state.get("master")
    if master is None:
        master = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        master.copy_(p)
    elif master.stride() != p.stride():
        master = torch.empty_like(p, dtype=torch.float32,
                                  memory_format=torch.preserve_format).copy_(master)
    state["master"] = master
    return master


def step_target(p: Tensor, state: dict, group: dict, writebacks: list) -> tuple[Tensor, Tensor]:
    """What the kernels step for ``p``: ``(p, p.grad)``, or with master weights on an fp16/bf16
    ``p`` its fp32 master and the gradient cast to fp32; then ``(p, master)`` is appended to
    ``writebacks`` so that ``write_back`` rounds the stepped master into ``p``."""
    if not uses_master(p, group):
        return p, p.grad
    master = master_copy(p, state)
    writebacks.append((p, master))
    return master, p.grad.to(torch.float32)


def write_back(writebacks: list) -> None:
    """``p.copy_(master)`` for every pair: ``p`` becomes its master rounded to nearest. A step
    skipped by found_inf leaves each master, hence ``p = round(master)``, as it was."""
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
