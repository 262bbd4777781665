"""PSISGD: SGD on the PSI manifold for scale-invariant weights, torch.optim.SGD for the rest."""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import Tensor

from .. import distributed, ops, reference
from ._amp import check_capture, check_flag, step_target, uses_master, write_back
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
        master_weights: keep an fp32 copy (``state["master"]``) of every fp16/bf16 parameter,
            step that copy (with the gradient cast to fp32) and write it back rounded into the
            parameter. The copy is then the parameter's true value: a parameter changed by hand
            is overwritten at the next step (reload the optimizer state after such a change).
            No effect on fp32/fp64 parameters.
        capturable: allow ``step()`` to be captured in a CUDA graph (``torch.cuda.graph``); take
            one eager step first, so the state exists. Step counters are device tensors in any
            case and the kernels never wait for the host; on CPU parameters this changes
            nothing. Capturing a step with ``capturable=False`` is an error.

    Works with ``torch.amp.GradScaler`` without an unscale pass: scaled gradients are unscaled
    inside the kernel and a step with inf/NaN gradients changes nothing (master copies included).
    ``torch.compile(opt.step, fullgraph=True)`` works with the fused backend.
    """

    name = "PSISGD"

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False,
                 retraction: str = "normalize", transport: str = "project",
                 max_grad_norm: float | None = None, backend: str = "auto",
                 master_weights: bool = False, capturable: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, retraction=retraction,
                        transport=transport, max_grad_norm=max_grad_norm, manifold="channel",
                        master_weights=master_weights, capturable=capturable)
        super().__init__(params, defaults, backend)

    def _check_options(self, group: dict, where: str) -> None:
        check_common_options(group, where)
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"{where}['momentum'] must be >= 0; got {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0")
        check_sphere_options(group, where)
        check_flag(group, "master_weights", where)
        check_flag(group, "capturable", where)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss, grad_scale, found_inf = self._begin_step(closure)
        check_capture(self, self._needs_state)
        for gi, group in enumerate(self.param_groups):
            weight_decay = self._weight_decay(group, gi)
            writebacks = []
            buckets = self._sgd_lists(group, group["params"], writebacks)
            for (device, _), lists in buckets.items():
                self._sgd_call(device, lists, group, group["manifold"], weight_decay,
                               grad_scale, found_inf)
            write_back(writebacks)
        return loss

    def _sgd_lists(self, group: dict, params, writebacks: list) -> dict:
        """The op's (params, grads, momentum_buffers, steps) lists of ``params`` that have a
        gradient, by (device, dtype of what the op steps: the master copy where there is one);
        creates missing state."""
        buckets = defaultdict(lambda: ([], [], [], []))
        for p in params:
            if p.grad is None:
                continue
            state = self._init_state(p, group)
            target, grad = step_target(p, state, group, writebacks)
            targets, grads, bufs, steps = buckets[(p.device, target.dtype)]
            targets.append(target)
            grads.append(grad)
            steps.append(state["step"])
            if group["momentum"] != 0:
                bufs.append(state["momentum_buffer"])
        return buckets

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

    def _state_keys(self, p: Tensor, group: dict) -> list:
        """The state a step of ``p`` uses (``_init_state`` makes it)."""
        return (["step"] + (["momentum_buffer"] if group["momentum"] != 0 else [])
                + (["master"] if uses_master(p, group) else []))

    def _needs_state(self, p: Tensor, group: dict) -> bool:
        """Whether the next step would create state for ``p``."""
        state = self.state.get(p, {})
        return any(k not in state for k in self._state_keys(p, group))
