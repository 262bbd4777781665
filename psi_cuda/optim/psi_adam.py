"""PSIAdam: Adam on the PSI manifold for scale-invariant weights, torch.optim.AdamW for the rest."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _gram, distributed, reference
from ._base import (REQUIRED, FusedOptimizer, check_common_options, check_sphere_options,
                    scalar_lr, state_like, step_counter)


def sharded_adam_solve(G, numel, step_old, scalars, *, lr, beta1, beta2, eps, retraction,
                       transport, max_grad_norm, **_):
    """adam.h psi_adam_update of tensor groups from their Gram sums (G already scaled by f):
    (param, buf, [v_new], skip)."""
    (v,), t = scalars, step_old + 1
    skip = ~(G["ww"] > 0) | (numel < 2)
    n = torch.where(skip, torch.ones_like(G["ww"]), G["ww"].clamp_min(0).sqrt())
    q = _gram.tangent(G, n, max_grad_norm)
    q_sq = _gram.dot(q, q, G).clamp_min(0)
    m = _gram.add((0.0, 0.0, beta1), _gram.scale(1.0 - beta1, q))
    v_new = beta2 * v + (1.0 - beta2) * q_sq
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    denom = (v_new / bc2).sqrt() + eps
    coef = torch.where(denom > 0, 1.0 / (bc1 * denom), torch.zeros_like(denom))
    d = _gram.scale(coef, m)
    param, buf, ok = _gram.move_on_sphere(G, n, d, m, lr=lr, retraction=retraction,
                                          transport=transport)
    return param, buf, [v_new], skip | ~ok


class PSIAdam(FusedOptimizer):
    r"""Adam on the PSI manifold (docs/ALGORITHMS.md section 3).

    Groups are made as in :class:`PSISGD`: ``PSIAdam(model, lr=...)`` finds the scale-invariant
    weights with ``psi_cuda.param_groups``; parameters or param groups need a ``manifold``
    (``"channel"``, ``"tensor"``, or ``None`` for Euclidean) per group or as a keyword.

    A PSI group keeps a first moment ``m`` (tangent, scale-free, transported after every step)
    and ONE second-moment scalar ``v`` computed on the scale-free tangent gradient ``q``:

        m = b1 m + (1 - b1) q ;  v = b2 v + (1 - b2) |q|^2
        d = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) ;  u' = R_u(-lr d)

    so ``|d|`` is about 1 and ``lr`` is the angle (radians) a group turns per step; equivalent
    weights ``w`` and ``c w`` stay equivalent. Euclidean groups follow ``torch.optim.AdamW``
    exactly (decoupled weight decay). Weight decay is ignored, with a warning, on PSI groups.

    State per parameter: ``step`` (float32 scalar), ``exp_avg`` (like the parameter, fp32 for
    fp16/bf16 parameters) and ``exp_avg_sq`` (shape ``(rows,)`` for ``"channel"``,
    ``(rows // block_rows,)`` for ``"block"`` (per row, ``(rows,)``, for a sharded DTensor),
    ``()`` for ``"tensor"``, like the parameter for Euclidean groups).

    Args:
        params: the model (an ``nn.Module``), or parameters / param groups (dicts, each with a
            ``manifold`` key unless ``manifold=`` is given).
        lr, betas, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        amsgrad: not supported (must be False).
        retraction, transport, max_grad_norm, backend, master_weights, capturable, manifold,
            skip_nonfinite, psi_lr, verify, sample_input: as in :class:`PSISGD` (with ``master_weights``, state
            also holds ``master``).

    Works with ``torch.amp.GradScaler`` without an unscale pass: scaled gradients are unscaled
    inside the kernel and a step with inf/NaN gradients changes nothing (steps, moments and
    master copies too). ``torch.compile(opt.step, fullgraph=True)`` works with the fused backend.
    """

    name = "PSIAdam"
    op = "psi_adam_"
    solve = distributed.GroupSolve(sharded_adam_solve, buffer=2, scalars=(3,))

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, retraction: str = "normalize",
                 transport: str = "project", max_grad_norm: float | None = None,
                 backend: str = "auto", master_weights: bool = False,
                 capturable: bool = False, *, manifold=REQUIRED, skip_nonfinite: bool = False,
                 psi_lr: float | None = None,
                 verify: bool = False, sample_input=None):
        if amsgrad:
            raise ValueError("PSIAdam: amsgrad=True is not supported (use torch.optim.AdamW "
                             "for amsgrad)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, retraction=retraction, transport=transport,
                        max_grad_norm=max_grad_norm, manifold=manifold,
                        master_weights=master_weights, capturable=capturable,
                        skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults, backend,
                         dict(psi_lr=psi_lr, verify=verify, sample_input=sample_input))

    def _check_options(self, group: dict, where: str) -> None:
        check_common_options(group, where)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{where}['betas'] must be two numbers in [0, 1); got {betas!r}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"{where}['eps'] must be >= 0; got {group['eps']}")
        check_sphere_options(group, where)

    def _state_keys(self, p: Tensor, group: dict) -> list:
        return ["exp_avg", "exp_avg_sq"]

    def _init_state(self, p: Tensor, group: dict, state: dict) -> None:
        manifold = group["manifold"]
        step_counter(p, state)
        state_like(p, state, "exp_avg", manifold)
        if manifold is None:
            state_like(p, state, "exp_avg_sq", manifold)
        elif "exp_avg_sq" not in state:
            # One second moment per group: per row for "channel", per block of block_rows rows
            # for "block", one for "tensor". Per row: a DTensor sharded like p's rows when p is
            # one; per block or tensor: a plain tensor. A block group of a sharded DTensor keeps
            # it per row (each row its block's value: distributed.sharded_group_step), so that
            # it stays with its rows whatever the sharding.
            dtype = reference.opmath_dtype(p.dtype)
            if manifold == "channel" or (manifold == "block" and distributed.is_sharded(p)):
                state["exp_avg_sq"] = distributed.rows_like(p, dtype)
            elif manifold == "block":
                state["exp_avg_sq"] = torch.zeros((p.size(0) // group["block_rows"],),
                                                  dtype=dtype, device=p.device)
            else:
                state["exp_avg_sq"] = torch.zeros((), dtype=dtype, device=p.device)

    def _expected_state(self, p: Tensor, group: dict) -> dict:
        expected = super()._expected_state(p, group)
        if group["manifold"] == "block" and distributed.is_sharded(p):  # per row (_init_state)
            expected["exp_avg_sq"] = torch.empty((p.size(0),), device="meta")
        return expected

    def _op_options(self, group: dict, weight_decay: float) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=weight_decay, maximize=group["maximize"],
                    retraction=group["retraction"], transport=group["transport"],
                    max_grad_norm=group["max_grad_norm"])
