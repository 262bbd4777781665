"""BNPSGD: SGD with Batch Normalization Preconditioning fused into the step."""
from __future__ import annotations

from collections import defaultdict
from functools import partial

from torch import nn

from .. import distributed, ops, reference
from ..bnp import BNP, check_sharding
from ._amp import step_target, uses_master
from ._base import on_device, scalar_lr, state_like
from .psi_sgd import PSISGD


class BNPSGD(PSISGD):
    r"""SGD whose step on the BNP-preconditioned layers of ``model`` uses the BNP gradient
    (docs/ALGORITHMS.md section 4), fused with the momentum update in one pass over each layer.

    Equivalent to ``bnp.precondition_()`` followed by ``torch.optim.SGD`` with the same options
    (weight decay is added to the preconditioned gradient, as torch's SGD would), but the
    gradients are left as they are. The other parameters of ``model`` take plain
    ``torch.optim.SGD`` steps.

    Args:
        model: the network; its parameters are the optimizer's.
        lr, momentum, dampening, nesterov, weight_decay, maximize: as in ``torch.optim.SGD``.
        bnp: a ``psi_cuda.BNP`` attached to ``model`` (default: ``BNP(model)``, every
            Linear/Conv layer, ``momentum=0.1``, ``eps=1e-5``).
        backend: ``"fused"``, ``"reference"`` or ``"auto"`` (fused where available).
        master_weights, capturable: as in :class:`PSISGD` (fp32 master copies of fp16/bf16
            parameters; CUDA graph capture of ``step()``).
        sync_stats: for the default ``bnp``: average the statistics over the data-parallel
            ranks after every training forward (``BNP(sync_stats=True)``).

    Under FSDP2 (build the optimizer after ``fully_shard``) weights and biases are DTensors
    sharded on dim 0 (output channels): each rank preconditions and steps its own rows with the
    full per-input-channel statistics, without communication.

    ``state_dict()`` holds the BNP statistics too, so one checkpoint resumes training bit for
    bit. Works with ``torch.amp.GradScaler`` (unscaling and the inf/NaN skip are in the kernel).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 maximize: bool = False, bnp: BNP | None = None, backend: str = "auto",
                 master_weights: bool = False, capturable: bool = False,
                 sync_stats: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError("BNPSGD: the first argument must be the model (an nn.Module), got "
                            f"{type(model).__name__}")
        super().__init__([{"params": list(model.parameters()), "manifold": None}], lr=lr,
                         momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay, maximize=maximize, backend=backend,
                         master_weights=master_weights, capturable=capturable)
        self.bnp = bnp if bnp is not None else BNP(model, backend=backend,
                                                   sync_stats=sync_stats)
        self._layers = {id(l.module.weight): l for l in self.bnp.layers}
        self._bias_layers = {id(l.module.bias): l for l in self.bnp.layers
                             if l.module.bias is not None}

    name = "BNPSGD"

    def _begin_step(self, closure):
        out = super()._begin_step(closure)
        for layer in self.bnp.layers:  # before any write
            check_sharding(layer, self.name)
        return out

    def _step_group(self, group: dict, index: int, grad_scale, found_inf, writebacks: list,
                    params=None, manifold=None) -> None:
        """The preconditioned layers' weights (and biases) with the fused BNP op, one call per
        (device, dtype, has bias); the other parameters with PSISGD's Euclidean step."""
        in_group = {id(p) for p in group["params"]}
        fused = defaultdict(list)  # (device, dtype, has bias) -> layers
        taken = set()
        for p in group["params"]:
            layer = self._layers.get(id(p))
            if layer is None or p.grad is None:
                continue
            b = layer.module.bias
            has_bias = b is not None and b.grad is not None and id(b) in in_group
            fused[(p.device, p.dtype, has_bias)].append(layer)
            taken.add(id(p))
            if has_bias:
                taken.add(id(b))
        for (device, _, has_bias), layers in fused.items():
            self._fused_step(group, layers, has_bias, device, grad_scale, found_inf, writebacks)
        super()._step_group(group, index, grad_scale, found_inf, writebacks,
                            params=[p for p in group["params"] if id(p) not in taken],
                            manifold=None)

    def _fused_step(self, group, layers, has_bias, device, grad_scale, found_inf, writebacks):
        momentum = group["momentum"]
        weights, biases, wgrads, bgrads, wbufs, bbufs, steps = [], [], [], [], [], [], []
        for layer in layers:
            if layer.mean.device != device:
                layer.to(device)
            w = layer.module.weight
            state = self.state[w]
            self._init_state(w, group, state)
            target, grad = step_target(w, state, group, writebacks)
            weights.append(target)
            wgrads.append(grad)
            steps.append(state["step"])
            if momentum != 0:
                wbufs.append(state["momentum_buffer"])
            if has_bias:
                b = layer.module.bias
                target, grad = step_target(b, self.state[b], group, writebacks)
                biases.append(target)
                bgrads.append(grad)
                if momentum != 0:
                    # The bias shares its weight's step counter; it keeps only a buffer.
                    bbufs.append(state_like(b, self.state[b], "momentum_buffer"))
        fn = (partial(ops.bnp_sgd_, check=False) if self._use_fused(device)
              else reference.bnp_sgd_)
        # DTensors (FSDP2, rows sharded on dim 0): the local rows; statistics are per input
        # channel.
        loc = lambda ts: [distributed.local(t) for t in ts]  # noqa: E731
        fn(loc(weights), loc(biases), loc(wgrads), loc(bgrads), loc(wbufs), loc(bbufs),
           steps, [l.mean for l in layers], [l.sqmean for l in layers],
           groups=[l.groups for l in layers], eps=self.bnp.eps, lr=scalar_lr(group["lr"]),
           momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
           weight_decay=group["weight_decay"], maximize=group["maximize"],
           grad_scale=on_device(grad_scale, device), found_inf=on_device(found_inf, device))

    def _needs_state(self, p, group) -> bool:
        """Whether the next step would create state for ``p``; the bias of a preconditioned
        layer shares its weight's step counter."""
        layer = self._bias_layers.get(id(p))
        if layer is None or layer.module.weight.grad is None:
            return super()._needs_state(p, group)
        state = self.state.get(p, {})
        keys = [k for k in self._state_keys(p, group) if k is not None]
        return any(k not in state for k in keys + (["master"] if uses_master(p, group) else []))

    def state_dict(self) -> dict:
        """The optimizer state plus the BNP statistics (key ``"bnp"``)."""
        sd = super().state_dict()
        sd["bnp"] = self.bnp.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        bnp_state = state_dict.pop("bnp", None)
        super().load_state_dict(state_dict)
        if bnp_state is not None:
            self.bnp.load_state_dict(bnp_state)
