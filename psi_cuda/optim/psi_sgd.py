"""PSISGD: SGD on the PSI manifold for scale-invariant weights, torch.optim.SGD for the rest."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _gram
from ..distributed import GroupSolve
from ._base import (REQUIRED, FusedOptimizer, check_common_options, check_sphere_options,
                    scalar_lr, state_like, step_counter)


def sharded_sgd_solve(G, numel, step_old, scalars, *, lr, momentum, dampening, nesterov,
                      retraction, transport, max_grad_norm, **_):
    """math.h psi_sgd_update of tensor groups from their Gram sums (G already scaled by f):
    (param, buf, [], skip)."""
    first = step_old == 0
    skip = ~(G["ww"] > 0) | (numel < 2)
    n = torch.where(skip, torch.ones_like(G["ww"]), G["ww"].clamp_min(0).sqrt())
    q = _gram.tangent(G, n, max_grad_norm)
    buf, d = None, q
    if momentum != 0:
        later = _gram.add((0.0, 0.0, momentum), _gram.scale(1.0 - dampening, q))
        buf = tuple(torch.where(first, a, b) for a, b in zip(q, later))
        d = _gram.add(q, _gram.scale(momentum, buf)) if nesterov else buf
    param, buf, ok = _gram.move_on_sphere(G, n, d, buf, lr=lr, retraction=retraction,
                                          transport=transport)
    return param, buf, [], skip | ~ok


class PSISGD(FusedOptimizer):
    r"""Stochastic gradient descent on the PSI manifold (docs/ALGORITHMS.md section 2).

    Give it the model and it finds the scale-invariant weights itself::

        opt = PSISGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)

    builds its groups with ``psi_cuda.param_groups(model, lr, psi_lr=..., weight_decay=...,
    verify=..., sample_input=...)``: weights that feed a normalization take PSI steps, everything
    else (norm affine parameters, biases, the classifier, embeddings) takes
    ``torch.optim.SGD`` steps with ``weight_decay``.

    Given parameters or param groups instead, each group needs a ``manifold``, from the group
    dict or from the ``manifold=`` keyword (a plain parameter list without it is an error: it
    does not say which weights are scale invariant):

    * ``"channel"``: every row of ``p.reshape(p.size(0), -1)`` (an output channel) is a
      scale-invariant group: its step is taken on the unit sphere of that row, so ``c * w`` and
      ``w`` stay equivalent for every positive ``c``, and its norm is kept.
    * ``"tensor"``: the whole tensor is one group (weights feeding LayerNorm/RMSNorm).
    * ``None`` (or ``"euclidean"``): exactly ``torch.optim.SGD`` (weight decay, maximize,
      nesterov, ...).

    Weight decay has no meaning on the quotient and is ignored (with a warning) for PSI groups.
    Momentum buffers are stored scale-free, tangent to the sphere, and transported after every
    step.

    Args:
        params: the model (an ``nn.Module``), or parameters / param groups (dicts, each with a
            ``manifold`` key unless ``manifold=`` is given).
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
        manifold: (keyword) the manifold of groups that do not name one.
        skip_nonfinite: (keyword) when a gradient of a group with this option holds an inf or a
            NaN, skip the whole step (every group; as GradScaler does, decided on the device)
            and count it in ``state["nonfinite_skips"]`` (``nonfinite_skips()`` reads it).
            Default False: as in torch.optim, non-finite values propagate into the parameters
            (a PSI group with one becomes NaN as a whole), so a divergence is seen.
        psi_lr, verify, sample_input: (keyword, with a model only) passed to
            ``psi_cuda.param_groups``: the learning rate of the PSI groups (default ``lr``), and
            the numerical check of every scale-invariant candidate.

    Works with ``torch.amp.GradScaler`` without an unscale pass: scaled gradients are unscaled
    inside the kernel and a step with inf/NaN gradients changes nothing (master copies included).
    ``torch.compile(opt.step, fullgraph=True)`` works with the fused backend.
    """

    name = "PSISGD"
    op = "psi_sgd_"
    solve = GroupSolve(sharded_sgd_solve, buffer=2)

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False,
                 retraction: str = "normalize", transport: str = "project",
                 max_grad_norm: float | None = None, backend: str = "auto",
                 master_weights: bool = False, capturable: bool = False, *,
                 manifold=REQUIRED, skip_nonfinite: bool = False, psi_lr: float | None = None,
                 verify: bool = False, sample_input=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, retraction=retraction,
                        transport=transport, max_grad_norm=max_grad_norm, manifold=manifold,
                        master_weights=master_weights, capturable=capturable,
                        skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults, backend,
                         dict(psi_lr=psi_lr, verify=verify, sample_input=sample_input))

    def _check_options(self, group: dict, where: str) -> None:
        check_common_options(group, where)
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"{where}['momentum'] must be >= 0; got {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0")
        check_sphere_options(group, where)

    def _state_keys(self, p: Tensor, group: dict) -> list:
        return ["momentum_buffer" if group["momentum"] != 0 else None]

    def _init_state(self, p: Tensor, group: dict, state: dict) -> None:
        step_counter(p, state)
        if group["momentum"] != 0:
            state_like(p, state, "momentum_buffer", group["manifold"])

    def _op_options(self, group: dict, weight_decay: float) -> dict:
        return dict(lr=scalar_lr(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], weight_decay=weight_decay,
                    maximize=group["maximize"], retraction=group["retraction"],
                    transport=group["transport"], max_grad_norm=group["max_grad_norm"])
