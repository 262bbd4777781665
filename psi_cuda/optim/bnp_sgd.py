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

# The step cap's defaults (see BNPSGD's max_update): chosen by the lr sweep in
# benchmarks/bnp_lr_window.py (results in benchmarks/results/bnp_lr_window.json).
DEFAULT_MAX_UPDATE = 1e-3
DEFAULT_UPDATE_FLOOR = 1.0


class BNPSGD(PSISGD):
    r"""SGD whose step on the BNP-preconditioned layers of ``model`` uses the BNP gradient
    (docs/ALGORITHMS.md section 4), fused with the momentum update in one pass over each layer.

    With ``max_update=None`` this is ``bnp.precondition_()`` followed by ``torch.optim.SGD`` with
    the same options (weight decay is added to the preconditioned gradient, as torch's SGD
    would), but the gradients are left as they are. By default each unit's step is capped (see
    ``max_update``). The other parameters of ``model`` take plain ``torch.optim.SGD`` steps.

    Args:
        model: the network; its parameters are the optimizer's.
        lr, momentum, dampening, nesterov, weight_decay, maximize: as in ``torch.optim.SGD``.
        bnp: a ``psi_cuda.BNP`` attached to ``model`` (default: ``BNP(model)``, every
            Linear/Conv layer, ``momentum=0.1``, ``eps=1e-5``).
        max_update: cap on each unit's step (a unit: one output channel of a preconditioned
            layer, its weight row and its bias). Its BNP gradient is scaled by
            ``c_o = min(1, max_update * max(|W~_o|, update_floor) / (lr * |G~_o|))``, with
            ``W~``, ``G~`` the weight and gradient in the layer's input-normalized coordinates
            (``psi_cuda.reference.bnp_unit_norms``), so that before momentum no step moves a unit
            by more than ``max_update`` times the norm of its normalized weights (or of
            ``update_floor``). The direction of the BNP step is kept. Without it BNP-SGD on a
            BatchNorm-free net trains in a narrow band of learning rates only and diverges just
            above it (its preconditioned curvature grows about 160x in the first 40 steps,
            ``benchmarks/results/bnp_sharpness.json``); with it the usable learning rates span
            three orders of magnitude (``benchmarks/results/bnp_lr_window.json``): the cap
            bounds every step, so past the stability limit the weights oscillate in a bounded
            band instead of diverging. ``None`` (or 0): the exact BNP step. Weight decay is
            added after the cap.
        update_floor: the smallest normalized weight norm the cap is relative to, so that units
            whose normalized weights start near zero (an init made for unnormalized inputs)
            still move.
        backend: ``"fused"``, ``"reference"`` or ``"auto"`` (fused where available).
        master_weights, capturable: as in :class:`PSISGD` (fp32 master copies of fp16/bf16
            parameters; CUDA graph capture of ``step()``).
        sync_stats: for the default ``bnp``: average the statistics over the data-parallel
            ranks after every training forward (``BNP(sync_stats=True)``).
        skip_nonfinite: as in :class:`PSISGD`: skip (and count) a step whose gradients hold an
            inf or a NaN, instead of letting them propagate.

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
                 sync_stats: bool = False, max_update: float | None = DEFAULT_MAX_UPDATE,
                 update_floor: float = DEFAULT_UPDATE_FLOOR, skip_nonfinite: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError("BNPSGD: the first argument must be the model (an nn.Module), got "
                            f"{type(model).__name__}")
        super().__init__([{"params": list(model.parameters()), "manifold": None}], lr=lr,
                         momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay, maximize=maximize, backend=backend,
                         master_weights=master_weights, capturable=capturable,
                         skip_nonfinite=skip_nonfinite)
        self.defaults.update(max_update=max_update, update_floor=update_floor)
        for gi, group in enumerate(self.param_groups):
            group.setdefault("max_update", max_update)
            group.setdefault("update_floor", update_floor)
            self._check_options(group, f"{self.name}: param_groups[{gi}]")
        self.bnp = bnp if bnp is not None else BNP(model, backend=backend,
                                                   sync_stats=sync_stats)
        self._layers = {id(l.module.weight): l for l in self.bnp.layers}
        self._bias_layers = {id(l.module.bias): l for l in self.bnp.layers
                             if l.module.bias is not None}

    name = "BNPSGD"

    def _check_options(self, group: dict, where: str) -> None:
        super()._check_options(group, where)
        cap = group.get("max_update")
        if cap is not None and not (isinstance(cap, (int, float)) and cap >= 0):
            raise ValueError(f"{where}['max_update'] must be None or >= 0; got {cap!r}")
        floor = group.get("update_floor", DEFAULT_UPDATE_FLOOR)
        if not (isinstance(floor, (int, float)) and floor > 0):
            raise ValueError(f"{where}['update_floor'] must be > 0; got {floor!r}")

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
        weights, biases, wgrads, bgrads = loc(weights), loc(biases), loc(wgrads), loc(bgrads)
        grad_scale = on_device(grad_scale, device)
        cap = group.get("max_update", self.defaults["max_update"])
        if cap:
            # The capped step: each unit's gradient scaled by its factor (copies; the
            # gradients themselves stay as they are).
            wgrads, bgrads = ops.bnp_cap_grads(
                weights, wgrads, bgrads, [l.mean for l in layers], [l.sqmean for l in layers],
                groups=[l.groups for l in layers], eps=self.bnp.eps, lr=scalar_lr(group["lr"]),
                max_update=cap, floor=group.get("update_floor", self.defaults["update_floor"]),
                grad_scale=grad_scale)
        fn(weights, biases, wgrads, bgrads, loc(wbufs), loc(bbufs),
           steps, [l.mean for l in layers], [l.sqmean for l in layers],
           groups=[l.groups for l in layers], eps=self.bnp.eps, lr=scalar_lr(group["lr"]),
           momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
           weight_decay=group["weight_decay"], maximize=group["maximize"],
           grad_scale=grad_scale, found_inf=on_device(found_inf, device))

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
