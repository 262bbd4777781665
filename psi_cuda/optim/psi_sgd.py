"""PSISGD: SGD on the PSI manifold for scale-invariant weights, torch.optim.SGD for the rest."""
from __future__ import annotations

import warnings
from collections import defaultdict
from functools import partial
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops, reference

BACKENDS = ("auto", "fused", "reference")
PSI_MANIFOLDS = ("channel", "tensor")


class PSISGD(Optimizer):
    r"""Stochastic gradient descent on the PSI manifold (ALGORITHMS.md section 2).

    Each parameter group has a ``manifold``:

    * ``"channel"`` (default): every row of ``p.view(p.size(0), -1)`` (an output channel) is a
      scale-invariant group: its step is taken on the unit sphere of that row, so ``c * w`` and
      ``w`` stay equivalent for every positive ``c``, and its norm is kept.
    * ``"tensor"``: the whole tensor is one group (weights feeding LayerNorm/RMSNorm).
    * ``None``: Euclidean, exactly ``torch.optim.SGD`` (weight decay, maximize, nesterov, ...).

    ``psi_cuda.param_groups(model, lr)`` builds these groups for a model. Weight decay has no
    meaning on the quotient and is ignored (with a warning) for PSI groups. Momentum buffers are
    stored scale-free, tangent to the sphere, and transported after every step.

    Args:
        params: parameters or param groups (dicts, optionally with a ``manifold`` key).
        lr: learning rate (for PSI groups: about the angle, in radians, a group turns per step).
        momentum, dampening, nesterov, weight_decay, maximize: as in ``torch.optim.SGD``.
        retraction: ``"normalize"`` (default), ``"exp"`` (geodesic) or ``"none"`` (plain
            quotient move; the norm then grows slowly).
        transport: ``"project"`` (default) or ``"parallel"`` (needs ``retraction="exp"``).
        max_grad_norm: clip the scale-free tangent gradient of each group to this norm.
        backend: ``"fused"`` (the C++/CUDA kernels), ``"reference"`` (pure PyTorch) or
            ``"auto"`` (fused when available for the parameters' device).

    Works with ``torch.amp.GradScaler`` without an unscale pass: scaled gradients are unscaled
    inside the kernel and a step with inf/NaN gradients changes nothing.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False,
                 retraction: str = "normalize", transport: str = "project",
                 max_grad_norm: float | None = None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, retraction=retraction,
                        transport=transport, max_grad_norm=max_grad_norm, manifold="channel")
        self.backend = backend
        self._warned_decay = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_warned_decay", False)

    def _use_fused(self, device: torch.device) -> bool:
        if self.backend == "reference":
            return False
        available = device.type == "cpu" or (device.type == "cuda" and ops.has_cuda_kernels())
        if self.backend == "fused" and not available:
            raise RuntimeError(f"PSISGD(backend='fused'): no fused kernel for device {device} in "
                               "this build of psi_cuda (rebuild with PSI_CUDA_BUILD_CUDA=1)")
        return available

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Check every gradient before touching anything: a bad one must leave all unchanged.
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    _check_grad(p, gi, pi)
        for gi, group in enumerate(self.param_groups):
            manifold = group["manifold"]
            if manifold in PSI_MANIFOLDS and group["weight_decay"] != 0 and not self._warned_decay:
                warnings.warn("PSISGD: weight_decay has no meaning on the PSI manifold and is "
                              f"ignored for param_groups[{gi}] (manifold={manifold!r})",
                              stacklevel=2)
                self._warned_decay = True
            buckets = defaultdict(lambda: ([], [], [], []))
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                params, grads, bufs, steps = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                steps.append(state["step"])
                if group["momentum"] != 0:
                    bufs.append(state["momentum_buffer"])
            for (device, _), (params, grads, bufs, steps) in buckets.items():
                # _check_grad made the fused op's Python-side check: skip it.
                fn = (partial(ops.psi_sgd_, check=False) if self._use_fused(device)
                      else reference.psi_sgd_)
                fn(params, grads, bufs, steps, lr=group["lr"], momentum=group["momentum"],
                   dampening=group["dampening"], nesterov=group["nesterov"],
                   weight_decay=group["weight_decay"] if manifold is None else 0.0,
                   maximize=group["maximize"], manifold=manifold,
                   retraction=group["retraction"], transport=group["transport"],
                   max_grad_norm=group["max_grad_norm"],
                   grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device))
        return loss

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if group["momentum"] != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=reference.opmath_dtype(p.dtype), memory_format=torch.preserve_format)
            elif buf.stride() != p.stride():  # the param changed layout (e.g. to channels_last)
                state["momentum_buffer"] = torch.empty_like(
                    p, dtype=buf.dtype, memory_format=torch.preserve_format).copy_(buf)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads state; unlike torch's default it keeps the state's own dtype (fp32 buffers for
        fp16/bf16 params) and lays buffers out like their params, so a resume is bit for bit."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    state[key] = value.to(device=p.device, dtype=torch.float32).clone()
                else:
                    state[key] = torch.empty_like(p, dtype=reference.opmath_dtype(p.dtype),
                                                  memory_format=torch.preserve_format)
                    state[key].copy_(value)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)


def _check_group(group: dict, index: int) -> None:
    """Validates the options of one param group; raises ValueError naming the offending key."""
    where = f"PSISGD: param_groups[{index}]"
    manifold = group.get("manifold")
    if manifold not in (None,) + PSI_MANIFOLDS:
        raise ValueError(f"{where}['manifold'] must be 'channel', 'tensor' or None; "
                         f"got {manifold!r}")
    if not 0.0 <= group["lr"]:
        raise ValueError(f"{where}['lr'] must be >= 0; got {group['lr']}")
    if not 0.0 <= group["momentum"]:
        raise ValueError(f"{where}['momentum'] must be >= 0; got {group['momentum']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"{where}['weight_decay'] must be >= 0; got {group['weight_decay']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0")
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
    for pi, p in enumerate(group["params"]):
        if not p.is_floating_point() or p.dtype not in (torch.float32, torch.float64,
                                                         torch.float16, torch.bfloat16):
            raise ValueError(f"{where}['params'][{pi}] has dtype {p.dtype}; PSISGD needs "
                             "float32, float64, float16 or bfloat16 parameters")
        if manifold == "channel" and p.dim() == 0:
            raise ValueError(f"{where}['params'][{pi}] is a 0-dim tensor; manifold='channel' "
                             "needs at least one dimension (use manifold=None or 'tensor')")
        if manifold == "channel" and p.dim() == 1 and p.numel() > 0:
            warnings.warn(f"{where}['params'][{pi}] has shape {tuple(p.shape)}: its channel "
                          "groups have length 1 and cannot move; give it manifold=None",
                          stacklevel=3)


def _check_grad(p: Tensor, gi: int, pi: int, name: str = "PSISGD") -> None:
    g = p.grad
    where = f"{name}: param_groups[{gi}]['params'][{pi}]"
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{where} has a sparse gradient; {name} needs dense gradients")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(f"{where}: gradient is {g.dtype} {tuple(g.shape)} on {g.device}, "
                           f"expected {p.dtype} {tuple(p.shape)} on {p.device}")
