"""Batch Normalization Preconditioning (docs/ALGORITHMS.md section 4) for any torch optimizer.

``BNP(model)`` attaches a forward pre-hook to every Linear/Conv layer: in training mode it folds
the per-channel mean and mean of squares of the layer's input into moving averages (one pass over
the input, fused). ``precondition_()`` then rewrites the layers' ``.grad`` with the BNP formula, so
the following step of any optimizer is a step in the input-normalized coordinates of each layer,
without a BatchNorm layer and at any batch size (1 included).
"""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch import Tensor, nn

from . import distributed, ops, reference

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class BNPLayer:
    """One preconditioned layer: its module and its input statistics (per input channel)."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        w = module.weight
        self.spatial_dims = 0 if isinstance(module, nn.Linear) else w.dim() - 2
        self.groups = getattr(module, "groups", 1)
        self.in_channels = w.size(1) * self.groups
        dtype = reference.opmath_dtype(w.dtype)
        # The identity preconditioner until the first training forward: mean 0, mean square 1.
        self.mean = torch.zeros(self.in_channels, dtype=dtype, device=w.device)
        self.sqmean = torch.ones(self.in_channels, dtype=dtype, device=w.device)
        self.step = torch.zeros((), dtype=torch.float32, device=w.device)
        # Non-empty training batches seen; step counts those that entered the averages, so
        # batches - step is the number of non-finite batches (left out, docs/ALGORITHMS.md 4.4).
        self.batches = torch.zeros((), dtype=torch.float32, device=w.device)

    def channel_dim(self, x: Tensor) -> int:
        return x.dim() - 1 if self.spatial_dims == 0 else x.dim() - self.spatial_dims - 1

    def to(self, device: torch.device) -> None:
        self.mean, self.sqmean, self.step, self.batches = (
            t.to(device) for t in (self.mean, self.sqmean, self.step, self.batches))

    def has_bias_grad(self) -> bool:
        b = self.module.bias
        return b is not None and b.grad is not None


class BNP:
    r"""Batch Normalization Preconditioning of the Linear/Conv layers of ``model``.

    Args:
        model: the network (without BatchNorm in front of the preconditioned layers).
        momentum: weight ``rho`` of a new batch in the moving averages (bias-corrected, so the
            first forward sets the statistics to that batch's).
        eps: added to the variance (to the mean square for layers without bias).
        layers: the modules to precondition (default: every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
            of ``model``); each must be one of those types and belong to ``model``.
        backend: ``"fused"`` (C++/CUDA kernels), ``"reference"`` (pure PyTorch) or ``"auto"``.
        sync_stats: after every training forward's update, average each layer's statistics
            over the ranks of ``process_group`` (default: the default process group) with one
            all-reduce, so data-parallel ranks (DDP, FSDP2) keep equal statistics. All ranks start
            equal, so for equal per-rank batch sizes this is the moving average of the whole
            global batch's statistics.
        process_group: the group ``sync_stats`` averages over.

    Statistics update only in training mode (``model.train()``). Then call ``precondition_()``
    after ``backward()`` and before any optimizer's ``step()``; or use
    ``psi_cuda.optim.BNPSGD``, which fuses both.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.1, eps: float = 1e-5,
                 layers=None, backend: str = "auto", sync_stats: bool = False,
                 process_group=None):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"BNP: momentum must be in (0, 1]; got {momentum}")
        if not eps > 0.0:
            raise ValueError(f"BNP: eps must be > 0; got {eps}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"BNP: backend must be one of {ops.BACKENDS}; got {backend!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.backend = backend
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        names = {id(m): n for n, m in model.named_modules()}
        if layers is None:
            modules = [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
        else:
            modules = list(layers)
            for i, m in enumerate(modules):
                if not isinstance(m, LAYER_TYPES):
                    raise TypeError(f"BNP: layers[{i}] is a {type(m).__name__}; only nn.Linear "
                                    "and nn.Conv1d/2d/3d can be preconditioned")
                if id(m) not in names:
                    raise ValueError(f"BNP: layers[{i}] ({type(m).__name__}) is not a module "
                                     "of model")
        seen = set()
        self.layers: list[BNPLayer] = []
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            self.layers.append(BNPLayer(names[id(m)], m))
        self._handles = [layer.module.register_forward_pre_hook(self._hook(layer))
                         for layer in self.layers]

    # -------------------------------------------------------------------- statistics

    def _use_fused(self, device: torch.device) -> bool:
        return ops.use_fused(self.backend, device, "BNP")

    def _hook(self, layer: BNPLayer):
        def hook(module, args):
            if not module.training or not args:
                return None
            x = args[0]
            if not torch.is_tensor(x):
                return None
            if self.sync_stats:  # before the update: a missing process group changes nothing
                distributed.require_process_group()
            if layer.mean.device != x.device:
                layer.to(x.device)
            # The C++ checks name every bad argument: this runs every forward, so it skips the
            # Python-side check.
            fn = partial(ops.bnp_update_stats_, check=False) if self._use_fused(x.device) else \
                reference.bnp_update_stats_
            # One launch on CUDA; batches counts every non-empty batch (in the same launch).
            fn(x.detach(), layer.mean, layer.sqmean, layer.step,
               channel_dim=layer.channel_dim(x), momentum=self.momentum, batches=layer.batches)
            if self.sync_stats:
                distributed.average_([layer.mean, layer.sqmean], self.process_group)
            return None
        return hook

    def remove(self) -> None:
        """Detaches the hooks; the statistics stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -------------------------------------------------------------------- preconditioning

    def buckets(self, layers=None):
        """Layers with a weight gradient, grouped by what one op call can take:
        (device, dtype, has bias gradient) -> list of layers."""
        out = defaultdict(list)
        for layer in (self.layers if layers is None else layers):
            g = layer.module.weight.grad
            if g is None:
                continue
            out[(g.device, g.dtype, layer.has_bias_grad())].append(layer)
        return out

    @torch.no_grad()
    def precondition_(self) -> None:
        """Rewrites ``.grad`` of every preconditioned layer's weight (and bias) in place."""
        buckets = self.buckets()
        for layers in buckets.values():  # every check before the first write
            for layer in layers:
                _check_layer_grads(layer)
                check_sharding(layer, "BNP")
        for (device, _, has_bias), layers in buckets.items():
            for layer in layers:
                if layer.mean.device != device:
                    layer.to(device)
            fn = ops.bnp_precondition_ if self._use_fused(device) else \
                reference.bnp_precondition_
            # DTensor gradients (FSDP2, rows sharded on dim 0): the local rows.
            fn([distributed.local(l.module.weight.grad) for l in layers],
               [distributed.local(l.module.bias.grad) for l in layers] if has_bias else [],
               [l.mean for l in layers], [l.sqmean for l in layers],
               groups=[l.groups for l in layers], eps=self.eps)

    # -------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Options and the statistics of every layer (by module name)."""
        return {
            "momentum": self.momentum,
            "eps": self.eps,
            "layers": {l.name: {"mean": l.mean.clone(), "sqmean": l.sqmean.clone(),
                                "step": l.step.clone(), "batches": l.batches.clone()}
                       for l in self.layers},
        }

    def nonfinite_batches(self) -> dict[str, int]:
        """Per layer (by module name): the training batches left out of the statistics because
        they held an inf or a NaN (docs/ALGORITHMS.md 4.4). A host sync."""
        return {l.name: int((l.batches - l.step).item()) for l in self.layers}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores statistics saved by ``state_dict()`` (bit for bit, in place)."""
        saved = state_dict["layers"]
        mine = {l.name for l in self.layers}
        if set(saved) != mine:
            missing, extra = sorted(mine - set(saved)), sorted(set(saved) - mine)
            raise ValueError(f"BNP.load_state_dict: layers differ; missing {missing}, "
                             f"unexpected {extra}")
        for l in self.layers:
            s = saved[l.name]
            if s["mean"].shape != l.mean.shape:
                raise ValueError(f"BNP.load_state_dict: layer {l.name!r} has "
                                 f"{l.mean.numel()} input channels, the saved state "
                                 f"{s['mean'].numel()}")
        for l in self.layers:
            s = saved[l.name]
            l.mean.copy_(s["mean"])
            l.sqmean.copy_(s["sqmean"])
            l.step.copy_(s["step"])
            l.batches.copy_(s.get("batches", s["step"]))  # states saved before the counter
        self.momentum = float(state_dict["momentum"])
        self.eps = float(state_dict["eps"])

    def __repr__(self) -> str:
        names = ", ".join(l.name or "<model>" for l in self.layers)
        return f"BNP(momentum={self.momentum}, eps={self.eps}, layers=[{names}])"


def check_sharding(layer: BNPLayer, who: str) -> None:
    """A layer whose weight is a DTensor (FSDP2) must keep its output channels (rows) whole:
    Shard(0) or Replicate; grouped convs only replicated (a shard's rows would not start at a
    group boundary). Raises naming the layer."""
    w = layer.module.weight
    if not distributed.is_dtensor(w):
        return
    for what in ("weight", "bias"):
        p = getattr(layer.module, what)
        if p is None:
            continue
        distributed.check_param(p, "channel", f"{who}: {layer.name}.{what}", who)
    if layer.groups != 1 and distributed.is_sharded(w):
        raise ValueError(f"{who}: {layer.name} is a grouped conv (groups={layer.groups}) with "
                         f"a sharded weight {tuple(w.placements)}; BNP supports sharded weights "
                         "of groups=1 layers only (keep this layer replicated)")


def _check_layer_grads(layer: BNPLayer) -> None:
    for what in ("weight", "bias"):
        p = getattr(layer.module, what)
        if p is None or p.grad is None:
            continue
        g = p.grad
        if g.layout != torch.strided:
            raise RuntimeError(f"BNP: {layer.name}.{what} has a sparse gradient; dense needed")
        w = layer.module.weight
        if g.shape != p.shape or g.dtype != w.grad.dtype or g.device != w.grad.device:
            raise RuntimeError(f"BNP: {layer.name}.{what}.grad is {g.dtype} {tuple(g.shape)} "
                               f"on {g.device}; expected {w.grad.dtype} {tuple(p.shape)} on "
                               f"{w.grad.device}")
