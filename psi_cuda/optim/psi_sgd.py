"""PSISGD: SGD on the PSI manifold for scale-invariant weights, torch.optim.SGD for the rest."""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import Tensor

from .. import distributed, ops, reference
from ._base import (FusedOptimizer, check_common_options, check_sphere_options, on_device,
                    state_like, step_counter)


class PSISGD(FusedOptimizer):
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

    name = "PSISGD"

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False,
                 retraction: str = "normalize", transport: str = "project",
                 max_grad_norm: float | None = None, backend: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, retraction=retraction,
                        transport=transport, max_grad_norm=max_grad_norm, manifold="channel")
        super().__init__(params, defaults, backend)

    def _check_options(self, group: dict, where: str) -> None:
        check_common_options(group, where)
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"{where}['momentum'] must be >= 0; got {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0")
        check_sphere_options(group, where)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss, grad_scale, found_inf = self._begin_step(closure)
        for gi, group in enumerate(self.param_groups):
            weight_decay = self._weight_decay(group, gi)
            buckets = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                params, grads, bufs, steps = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                steps.append(state["step"])
                if group["momentum"] != 0:
                    bufs.append(state["momentum_buffer"])
            for (device, _), lists in buckets.items():
                self._sgd_call(device, lists, group, group["manifold"], weight_decay,
                               grad_scale, found_inf)
        return loss

    def _sgd_call(self, device, lists, group, manifold, weight_decay, grad_scale, found_inf):
        # _begin_step made the fused op's Python-side check: skip it.
        fn = (partial(ops.psi_sgd_, check=False) if self._use_fused(device)
              else reference.psi_sgd_)
        # DTensor parameters (FSDP2): local shards; sharded tensor groups all-reduce their sums.
        distributed.step_call(
            fn, lists, kind="sgd", lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], weight_decay=weight_decay,
            maximize=group["maximize"], manifold=manifold,
            retraction=group.get("retraction", "normalize"),
            transport=group.get("transport", "project"),
            max_grad_norm=group.get("max_grad_norm"), grad_scale=on_device(grad_scale, device),
            found_inf=on_device(found_inf, device))

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        step_counter(p, state)
        if group["momentum"] != 0:
            state_like(p, state, "momentum_buffer")
        return state
