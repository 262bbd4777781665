"""PSIAdam: Adam on the PSI manifold for scale-invariant weights, torch.optim.AdamW for the rest."""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import Tensor

from .. import distributed, ops, reference
from ._amp import check_capture, check_flag, step_target, uses_master, write_back
from ._base import (FusedOptimizer, check_common_options, check_sphere_options, on_device,
                    state_like, step_counter)


class PSIAdam(FusedOptimizer):
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
        retraction, transport, max_grad_norm, backend, master_weights, capturable: as in
            :class:`PSISGD` (with ``master_weights``, state also holds ``master``).

    Works with ``torch.amp.GradScaler`` without an unscale pass: scaled gradients are unscaled
    inside the kernel and a step with inf/NaN gradients changes nothing (steps, moments and
    master copies too). ``torch.compile(opt.step, fullgraph=True)`` works with the fused backend.
    """

    name = "PSIAdam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, retraction: str = "normalize",
                 transport: str = "project", max_grad_norm: float | None = None,
                 backend: str = "auto", master_weights: bool = False,
                 capturable: bool = False):
        if amsgrad:
            raise ValueError("PSIAdam: amsgrad=True is not supported (use torch.optim.AdamW "
                             "for amsgrad)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, retraction=retraction, transport=transport,
                        max_grad_norm=max_grad_norm, manifold="channel",
                        master_weights=master_weights, capturable=capturable)
        super().__init__(params, defaults, backend)

    def _check_options(self, group: dict, where: str) -> None:
        check_common_options(group, where)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{where}['betas'] must be two numbers in [0, 1); got {betas!r}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"{where}['eps'] must be >= 0; got {group['eps']}")
        check_sphere_options(group, where)
        check_flag(group, "master_weights", where)
        check_flag(group, "capturable", where)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss, grad_scale, found_inf = self._begin_step(closure)
        check_capture(self, self._needs_state)
        for gi, group in enumerate(self.param_groups):
            manifold = group["manifold"]
            weight_decay = self._weight_decay(group, gi)
            buckets = defaultdict(lambda: ([], [], [], [], []))
            writebacks = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, manifold)
                target, grad = step_target(p, state, group, writebacks)
                params, grads, exp_avgs, exp_avg_sqs, steps = buckets[(p.device, target.dtype)]
                params.append(target)
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            for (device, _), lists in buckets.items():
                # _begin_step made the fused op's Python-side check: skip it.
                fn = (partial(ops.psi_adam_, check=False) if self._use_fused(device)
                      else reference.psi_adam_)
                # DTensor parameters (FSDP2): local shards; sharded tensor groups all-reduce.
                distributed.step_call(
                    fn, lists, kind="adam", lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=weight_decay, maximize=group["maximize"],
                    manifold=manifold, retraction=group["retraction"],
                    transport=group["transport"], max_grad_norm=group["max_grad_norm"],
                    grad_scale=on_device(grad_scale, device),
                    found_inf=on_device(found_inf, device))
            write_back(writebacks)
        return loss

    def _init_state(self, p: Tensor, manifold: str | None) -> dict:
        state = self.state[p]
        step_counter(p, state)
        state_like(p, state, "exp_avg")
        if manifold is None:
            state_like(p, state, "exp_avg_sq")
        elif "exp_avg_sq" not in state:
            # One second moment per group: per row for "channel", one for "tensor".
            # Per row: a DTensor sharded like p's rows when p is one; per tensor: a plain scalar.
            dtype = reference.opmath_dtype(p.dtype)
            state["exp_avg_sq"] = (distributed.rows_like(p, dtype) if manifold == "channel" else
                                   torch.zeros((), dtype=dtype, device=p.device))
        return state

    def _needs_state(self, p: Tensor, group: dict) -> bool:
        """Whether the next step would create state for ``p`` (see ``_init_state``)."""
        state = self.state.get(p, {})
        needed = ["step", "exp_avg", "exp_avg_sq"] + (["master"] if uses_master(p, group) else [])
        return any(k not in state for k in needed)
