"""What PSISGD, PSIAdam and BNPSGD share: backends, option and gradient checks done before any
write, GradScaler hand-off, the weight-decay warning, and a bit-for-bit ``load_state_dict``."""
from __future__ import annotations

import warnings
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed, ops, reference

BACKENDS = ("auto", "fused", "reference")
PSI_MANIFOLDS = ("channel", "tensor")
PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class FusedOptimizer(Optimizer):
    """Base of the psi_cuda optimizers. Subclasses set ``name`` and implement ``_check_options``
    (their own group options) and ``step``."""

    name = "FusedOptimizer"
    # GradScaler hands over grad_scale/found_inf instead of unscaling: the kernels unscale and
    # skip the step on inf/NaN.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {BACKENDS}; got {backend!r}")
        self.backend = backend
        self._warned_decay = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        where = f"{self.name}: param_groups[{index}]"
        self._check_options(group, where)
        check_params(group, where, self.name)

    def _check_options(self, group: dict, where: str) -> None:
        raise NotImplementedError

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_warned_decay", False)

    def _use_fused(self, device: torch.device) -> bool:
        return ops.use_fused(self.backend, device, self.name)

    def _begin_step(self, closure):
        """Runs the closure, checks every gradient before anything is touched (a bad one must
        leave everything unchanged) and returns (loss, grad_scale, found_inf)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    where = f"{self.name}: param_groups[{gi}]['params'][{pi}]"
                    check_grad(p, where, self.name)
                    distributed.check_param(p, group.get("manifold"), where, self.name)
        return loss, getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _weight_decay(self, group: dict, index: int) -> float:
        """The group's weight decay; PSI groups ignore it (it only changes the representative),
        with a warning the first time."""
        manifold = group.get("manifold")
        if manifold is None:
            return group["weight_decay"]
        # Only eager steps warn: dynamo cannot trace warnings.warn (a graph break).
        if group["weight_decay"] != 0 and not self._warned_decay \
                and not torch.compiler.is_compiling():
            warnings.warn(f"{self.name}: weight_decay has no meaning on the PSI manifold and is "
                          f"ignored for param_groups[{index}] (manifold={manifold!r})",
                          stacklevel=3)
            self._warned_decay = True
        return 0.0

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads state; unlike torch's default it keeps the state's own dtype (fp32 state for
        fp16/bf16 params), lays state shaped like a param out like it, and keeps per-group
        state (one value per row) as it is, so a resume is bit for bit."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            state = self.state[p]
            dtype = reference.opmath_dtype(p.dtype)
            for key, value in saved.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    state[key] = value.to(device=p.device, dtype=torch.float32).clone()
                elif value.shape == p.shape:
                    state[key] = torch.empty_like(p, dtype=dtype,
                                                  memory_format=torch.preserve_format)
                    state[key].copy_(value)
                else:
                    state[key] = value.to(device=p.device, dtype=dtype).clone().contiguous()


def state_like(p: Tensor, state: dict, key: str) -> Tensor:
    """``state[key]``: a zero buffer shaped and laid out like ``p`` in the opmath dtype, made on
    first use and re-laid out when ``p`` changed layout (e.g. to channels_last)."""
    buf = state.get(key)
    if buf is None:
        buf = torch.zeros_like(p, dtype=reference.opmath_dtype(p.dtype),
                               memory_format=torch.preserve_format)
    elif buf.stride() != p.stride():
        buf = torch.empty_like(p, dtype=buf.dtype, memory_format=torch.preserve_format).copy_(buf)
    state[key] = buf
    return buf


def step_counter(p: Tensor, state: dict) -> Tensor:
    """``state["step"]``: a float32 scalar on ``p``'s device (the kernels read and bump it)."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    return state["step"]


def on_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    """GradScaler's grad_scale / found_inf as float32 on ``device`` (None stays None)."""
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)


def check_common_options(group: dict, where: str) -> None:
    """Options every psi_cuda optimizer shares; ValueError naming the offending key."""
    manifold = group.get("manifold")
    if manifold not in (None,) + PSI_MANIFOLDS:
        raise ValueError(f"{where}['manifold'] must be 'channel', 'tensor' or None; "
                         f"got {manifold!r}")
    if not 0.0 <= group["lr"]:
        raise ValueError(f"{where}['lr'] must be >= 0; got {group['lr']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"{where}['weight_decay'] must be >= 0; got {group['weight_decay']}")


def check_sphere_options(group: dict, where: str) -> None:
    """retraction / transport / max_grad_norm of the PSI optimizers."""
    if group["retraction"] not in ops.RETRACTIONS:
        raise ValueError(f"{where}['retraction'] must be one of {tuple(ops.RETRACTIONS)}; "
                         f"got {group['retraction']!r}")
    if group["transport"] not in ops.TRANSPORTS:
        raise ValueError(f"{where}['transport'] must be one of {tuple(ops.TRANSPORTS)}; "
                         f"got {group['transport']!r}")
    if group["transport"] == "parallel" and group["retraction"] != "exp":
        raise ValueError(f"{where}: transport='parallel' needs retraction='exp'")
    mgn = group["max_grad_norm"]
    if mgn is not None and not mgn > 0:
        raise ValueError(f"{where}['max_grad_norm'] must be None or > 0; got {mgn}")


def check_params(group: dict, where: str, name: str) -> None:
    """Parameter dtypes, and shapes that cannot be channel groups."""
    manifold = group.get("manifold")
    for pi, p in enumerate(group["params"]):
        if not p.is_floating_point() or p.dtype not in PARAM_DTYPES:
            raise ValueError(f"{where}['params'][{pi}] has dtype {p.dtype}; {name} needs "
                             "float32, float64, float16 or bfloat16 parameters")
        if manifold == "channel" and p.dim() == 0:
            raise ValueError(f"{where}['params'][{pi}] is a 0-dim tensor; manifold='channel' "
                             "needs at least one dimension (use manifold=None or 'tensor')")
        if manifold == "channel" and p.dim() == 1 and p.numel() > 0:
            warnings.warn(f"{where}['params'][{pi}] has shape {tuple(p.shape)}: its channel "
                          "groups have length 1 and cannot move; give it manifold=None",
                          stacklevel=3)


def check_grad(p: Tensor, where: str, name: str) -> None:
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{where} has a sparse gradient; {name} needs dense gradients")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(f"{where}: gradient is {g.dtype} {tuple(g.shape)} on {g.device}, "
                           f"expected {p.dtype} {tuple(p.shape)} on {p.device}")
