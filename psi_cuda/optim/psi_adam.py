"""PSIAdam: Adam on the PSI manifold for scale-invariant weights, torch.optim.AdamW for the rest."""
from __future__ import annotations

import warnings
from collections import defaultdict
from functools import partial
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops, reference
from .psi_sgd import BACKENDS, PSI_MANIFOLDS, _check_grad, _on


class PSIAdam(Optimizer):
    r"""Adam on the PSI manifold (ALGORITHMS.md section 3).

    Groups are chosen by the ``manifold`` key as in :class:`PSISGD` (``"channel"`` default,
    ``"tensor"``, or ``None`` for Euclidean). A PSI group keeps a first moment ``m`` (tangent,
    scale-free, transported after every step) and ONE second-moment scalar ``v`` computed on the
    scale-free tangent gradient ``q``:

        m = b1 m + (1 - b1) q ;  v = b2 v + (1 - b2) |q|^2
        d = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) ;  u' = R_u(-lr d)

    so ``|d|`` is about 1 and ``lr`` is the angle (radians) a group turns per step; equivalent
    weights ``w`` and ``c w`` stay equivalent. Euclidean groups follow ``torch.optim.AdamW``
    exactly (decoupled weight decay). Weight decay is ignored, with a warning, on PSI groups.

    State per parameter: ``step`` (float32 scalar), ``exp_avg`` (like the parameter, fp32 for
    fp16/bf16 parameters) and ``exp_avg_sq`` (shape ``(rows,)`` for ``"channel"``, ``()`` for
    ``"tensor"``, like the parameter for Euclidean groups).

    Args:
        params: parameters or param groups (dicts, optionally with a ``manifold`` key);
            ``psi_cuda.param_groups(model, lr)`` builds them.
        lr, betas, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        amsgrad: not supported (must be False).
        retraction, transport, max_grad_norm, backend: as in :class:`PSISGD`.

    Works with ``torch.amp.GradScaler`` without an unscale pass: scaled gradients are unscaled
    inside the kernel and a step with inf/NaN gradients changes nothing (steps and moments too).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, retraction: str = "normalize",
                 transport: str = "project", max_grad_norm: float | None = None,
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if amsgrad:
            raise ValueError("PSIAdam: amsgrad=True is not supported (use torch.optim.AdamW "
                             "for amsgrad)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, retraction=retraction, transport=transport,
                        max_grad_norm=max_grad_norm, manifold="channel")
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
            raise RuntimeError(f"PSIAdam(backend='fused'): no fused kernel for device {device} "
                               "in this build of psi_cuda (rebuild with PSI_CUDA_BUILD_CUDA=1)")
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
                    _check_grad(p, gi, pi, "PSIAdam")
        for gi, group in enumerate(self.param_groups):
            manifold = group["manifold"]
            if manifold in PSI_MANIFOLDS and group["weight_decay"] != 0 and not self._warned_decay:
                warnings.warn("PSIAdam: weight_decay has no meaning on the PSI manifold and is "
                              f"ignored for param_groups[{gi}] (manifold={manifold!r})",
                              stacklevel=2)
                self._warned_decay = True
            buckets = defaultdict(lambda: ([], [], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, manifold)
                params, grads, exp_avgs, exp_avg_sqs, steps = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            for (device, _), lists in buckets.items():
                # _check_grad made the fused op's Python-side check: skip it.
                fn = (partial(ops.psi_adam_, check=False) if self._use_fused(device)
                      else reference.psi_adam_)
                fn(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"] if manifold is None else 0.0,
                   maximize=group["maximize"], manifold=manifold,
                   retraction=group["retraction"], transport=group["transport"],
                   max_grad_norm=group["max_grad_norm"],
                   grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device))
        return loss

    def _init_state(self, p: Tensor, manifold: str | None) -> dict:
        state = self.state[p]
        dtype = reference.opmath_dtype(p.dtype)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        sq_shape = _second_moment_shape(p, manifold)
        for key, shape in (("exp_avg", p.shape), ("exp_avg_sq", sq_shape)):
            buf = state.get(key)
            if buf is None:
                state[key] = (torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                              if shape == p.shape else
                              torch.zeros(shape, dtype=dtype, device=p.device))
            elif shape == p.shape and buf.shape == p.shape and buf.stride() != p.stride():
                # the param changed layout (e.g. to channels_last)
                state[key] = torch.empty_like(p, dtype=buf.dtype,
                                              memory_format=torch.preserve_format).copy_(buf)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads state; unlike torch's default it keeps the state's own dtype (fp32 moments for
        fp16/bf16 params), lays moments shaped like their params out like them, and keeps the
        shape of per-group second moments, so a resume is bit for bit."""
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


def _second_moment_shape(p: Tensor, manifold: str | None) -> torch.Size:
    """One second moment per group: per row, one for the tensor, or per element."""
    if manifold == "channel":
        return torch.Size([p.size(0)])
    if manifold == "tensor":
        return torch.Size([])
    return p.shape


def _check_group(group: dict, index: int) -> None:
    """Validates the options of one param group; raises ValueError naming the offending key."""
    where = f"PSIAdam: param_groups[{index}]"
    manifold = group.get("manifold")
    if manifold not in (None,) + PSI_MANIFOLDS:
        raise ValueError(f"{where}['manifold'] must be 'channel', 'tensor' or None; "
                         f"got {manifold!r}")
    if not 0.0 <= group["lr"]:
        raise ValueError(f"{where}['lr'] must be >= 0; got {group['lr']}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{where}['betas'] must be two numbers in [0, 1); got {betas!r}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"{where}['eps'] must be >= 0; got {group['eps']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"{where}['weight_decay'] must be >= 0; got {group['weight_decay']}")
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
            raise ValueError(f"{where}['params'][{pi}] has dtype {p.dtype}; PSIAdam needs "
                             "float32, float64, float16 or bfloat16 parameters")
        if manifold == "channel" and p.dim() == 0:
            raise ValueError(f"{where}['params'][{pi}] is a 0-dim tensor; manifold='channel' "
                             "needs at least one dimension (use manifold=None or 'tensor')")
        if manifold == "channel" and p.dim() == 1 and p.numel() > 0:
            warnings.warn(f"{where}['params'][{pi}] has shape {tuple(p.shape)}: its channel "
                          "groups have length 1 and cannot move; give it manifold=None",
                          stacklevel=3)
