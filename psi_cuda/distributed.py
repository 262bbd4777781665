"""DTensor support of the psi_cuda optimizers (FSDP2's ``fully_shard``, tensor parallelism).

Under ``torch.distributed.fsdp.fully_shard`` every parameter and gradient is a ``DTensor``
sharded on dim 0 (``Shard(0)``, uneven or empty local shards included) over a device mesh. The
optimizers keep their state as DTensors placed like the parameter (so
``torch.distributed.checkpoint`` saves and reshards it) and hand the local tensors to the ops:

* Euclidean tensors are elementwise: any placement works, no communication.
* Channel groups (rows of ``W.view(out, -1)``) stay whole under ``Shard(0)``: the fused op runs
  on the local rows, no communication. Any other ``Shard(d)`` would cut rows apart: error.
* A tensor group (``manifold="tensor"``) is the whole tensor. Its step is a function of the 6
  entries of the Gram matrix of (w, g, m) (``csrc/include/psi/math.h``), which are sums over
  the elements: each rank sums its shard, ONE all-reduce per optimizer call sums the Gram
  matrices of all sharded tensor groups over the mesh dimensions they are sharded on, and every
  rank then solves the (identical) group update and applies it to its shard. This path is pure
  PyTorch (:func:`sharded_tensor_group_step`, the math of ``math.h``/``adam.h`` vectorized over
  the groups, no host synchronisation), not a fused kernel: a stacked copy of (w, g, m) for the
  Gram matmul, then ``mul``/``addcmul`` passes with two temporaries, several times the memory
  traffic of the fused op (README: Distributed training).
* Scalar state (``step``, a tensor group's second moment ``v`` of shape ``()``) stays a plain
  tensor: it is the same on every rank (the update is computed from all-reduced sums), torch's
  own optimizers keep ``step`` the same way under FSDP2, and ``torch.distributed.checkpoint``
  saves a plain tensor once and loads it on every rank. Per-row state (PSIAdam's ``exp_avg_sq``
  of a channel group, shape ``(rows,)``) is a DTensor sharded like the parameter's dim 0.
* ``Partial`` placements (unreduced gradients) are rejected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import _gram, reference

try:  # torch >= 2.5: public DTensor API
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor import zeros as _dtensor_zeros
except ImportError:  # pragma: no cover - torch without torch.distributed.tensor
    DTensor = Shard = None
    _dtensor_zeros = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (a view that writes through), any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def is_sharded(t: Tensor) -> bool:
    return is_dtensor(t) and any(pl.is_shard() for pl in t.placements)


def check_param(p: Tensor, manifold: str | None, where: str, name: str) -> None:
    """Rejects placements the optimizers cannot step locally (before anything is written):
    ``Partial`` parameters or gradients, a gradient placed unlike its parameter, and a channel
    group sharded on any dimension but 0."""
    if not is_dtensor(p):
        if p.grad is not None and is_dtensor(p.grad):
            raise RuntimeError(f"{where}: the parameter is a plain tensor but its gradient is a "
                               f"DTensor; {name} needs both plain or both DTensors")
        return
    g = p.grad
    if g is not None and (not is_dtensor(g) or g.placements != p.placements
                          or g.device_mesh != p.device_mesh):
        got = (f"placements {tuple(g.placements)}" if is_dtensor(g) else "a plain tensor")
        raise RuntimeError(f"{where}: the parameter is a DTensor with placements "
                           f"{tuple(p.placements)} but its gradient has {got}; {name} needs "
                           "the gradient placed like the parameter")
    for t, what in ((p, "parameter"), (g, "gradient")):
        if t is not None and any(pl.is_partial() for pl in t.placements):
            raise RuntimeError(f"{where}: the {what} has a Partial placement "
                               f"{tuple(t.placements)}; {name} needs reduced (Shard/Replicate) "
                               "DTensors")
    if manifold == "block" and any(pl.is_shard() for pl in p.placements):
        raise NotImplementedError(f"{where}: manifold='block' on a sharded DTensor (placements "
                                  f"{tuple(p.placements)}) is not supported yet; use "
                                  "manifold='tensor' or None for sharded parameters")
    if manifold == "channel":
        bad = [pl for pl in p.placements if pl.is_shard() and not pl.is_shard(0)]
        if bad:
            raise ValueError(f"{where}: manifold='channel' needs its rows (dim 0) whole on each "
                             f"rank, i.e. placements Shard(0) or Replicate; got "
                             f"{tuple(p.placements)} (use manifold='tensor' or None, or shard "
                             "on dim 0)")


def rows_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros of shape ``(p.size(0),)``: one value per channel group, sharded like ``p``'s dim 0
    when ``p`` is a DTensor (uneven shards as ``p``'s)."""
    if not is_dtensor(p):
        return torch.zeros((p.size(0),), dtype=dtype, device=p.device)
    placements = [pl if not pl.is_shard() else Shard(0) for pl in p.placements]
    out = _dtensor_zeros((p.size(0),), dtype=dtype, device_mesh=p.device_mesh,
                         placements=placements)
    if out._local_tensor.size(0) != p._local_tensor.size(0):  # a custom (non-chunk) sharding
        raise RuntimeError(f"per-row state of a parameter of shape {tuple(p.shape)} placed "
                           f"{tuple(p.placements)}: local rows {p._local_tensor.size(0)} do not "
                           "follow torch.chunk sharding")
    return out


def step_call(fn, lists: list[list], *, manifold: str | None, solve: GroupSolve | None,
              **kw) -> None:
    """Calls the op ``fn`` (fused or reference) on ``lists`` (params first, each list empty or
    one entry per param). Plain tensors go straight through; DTensors are replaced by their
    local shards, and sharded tensor groups take :func:`sharded_tensor_group_step` with the
    optimizer's ``solve`` (the op's keyword options in ``kw``)."""
    params = lists[0]
    if not any(is_dtensor(p) for p in params):
        fn(*lists, manifold=manifold, **kw)
        return
    n = len(params)
    sharded = [i for i, p in enumerate(params) if manifold == "tensor" and is_sharded(p)]
    if sharded and solve is None:
        raise NotImplementedError("this optimizer has no step for sharded tensor groups")
    rest = [i for i in range(n) if i not in set(sharded)]
    # Both parts go to the ops unchanged: rest (local shards) to the fused/reference op, sharded
    # tensor groups to the Gram path; each bumps its own step counters.
    pick = lambda idx: [[local(l[i]) for i in idx] if l else [] for l in lists]  # noqa: E731
    if rest:
        fn(*pick(rest), manifold=manifold, **kw)
    if sharded:
        sharded_tensor_group_step([[l[i] for i in sharded] if l else [] for l in lists],
                                  solve=solve, **kw)


def _all_reduce_grams(params: list[Tensor], grams: Tensor) -> Tensor:
    """Sums each row of ``grams`` (k, 6) over the mesh dimensions its parameter is sharded on:
    one all-reduce per distinct (mesh, sharded dims), usually one in all."""
    keys: dict = {}
    for i, p in enumerate(params):
        dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
        keys.setdefault((id(p.device_mesh), dims), (p.device_mesh, dims, []))[2].append(i)
    for mesh, dims, idx in keys.values():
        sub = grams[idx].contiguous()
        for d in dims:
            dist.all_reduce(sub, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        grams[idx] = sub
    return grams


@dataclass(frozen=True)
class GroupSolve:
    """What an optimizer hands :func:`step_call` for its sharded tensor groups: the step of a
    group from its (all-reduced) Gram sums, vectorized over the groups (``psi_cuda._gram``).

    ``fn(G, numel, step_old, scalars_old, *, lr, **options)`` gets the Gram entries ``G`` (a dict
    of float64 tensors of shape ``(k,)``, with the gradient already multiplied by the factor ``f``
    of maximize and grad_scale), the groups' element counts and old step counters, the old values
    of the per-group scalar state, the learning rate and the op's other keyword options; it returns
    ``(param, buf, scalars_new, skip)``: the combos of the new parameter and buffer (``buf`` None
    without a buffer), the new scalar state, and the groups to leave unchanged.

    ``buffer``: index, in the op's lists, of the state shaped like the parameter that takes part
    in the step (SGD's momentum buffer, Adam's first moment); its list may be empty (no momentum).
    ``scalars``: indices of lists of per-group scalar state (shape ``()``, Adam's second moment).
    """
    fn: Callable
    buffer: int | None = 2
    scalars: tuple[int, ...] = ()


@torch.no_grad()
def sharded_tensor_group_step(lists: list[list], *, solve: GroupSolve, lr: float,
                              weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None,
                              **opts) -> None:
    """One step of tensor groups whose parameters are sharded DTensors: local Gram sums, one
    all-reduce, ``solve`` on every rank (the same result everywhere), the update of the local
    shards. ``lists`` are the op's (params, grads, *state lists, steps); state steps and scalar
    state are plain tensors."""
    params, grads, steps = lists[0], lists[1], lists[-1]
    bufs = lists[solve.buffer] if solve.buffer is not None else []
    bufs = bufs if bufs else [None] * len(params)
    scalar_lists = [lists[i] for i in solve.scalars]
    device = local(params[0]).device
    f64 = dict(dtype=torch.float64, device=device)
    ws = [local(p) for p in params]
    gs = [local(g) for g in grads]
    ms = [local(m) for m in bufs]
    opm = [reference.opmath_dtype(w.dtype) for w in ws]
    # opmath views (copies for float16/bfloat16 parameters and for the gradients of those)
    wf = [w.to(dt) for w, dt in zip(ws, opm)]
    gf = [g.to(dt) for g, dt in zip(gs, opm)]
    grams = (torch.stack([_gram.gram_local([w, g] + ([m] if m is not None else []))
                          for w, g, m in zip(wf, gf, ms)])
             if ws else torch.zeros((0, 6), **f64))
    grams = _all_reduce_grams(params, grams)
    f = torch.full((), -1.0 if maximize else 1.0, **f64)
    if grad_scale is not None:
        f = f / grad_scale.to(**f64)
    G = dict(zip(_gram.GRAM_KEYS, grams.unbind(1)))
    G["wg"], G["gm"], G["gg"] = G["wg"] * f, G["gm"] * f, G["gg"] * f * f
    numel = torch.tensor([p.numel() for p in params], **f64)
    step_old = torch.stack([s.reshape(()) for s in steps]).to(**f64)
    scalars_old = [torch.stack([v.reshape(()) for v in vs]).to(**f64) for vs in scalar_lists]
    param, buf, scalars_new, skip = solve.fn(G, numel, step_old, scalars_old, lr=lr, **opts)
    # The non-finite policy (math.h poisoned): a group with an inf or NaN in w, g or m gets NaN.
    bad = ~torch.isfinite(grams.sum(1))
    nan = torch.full((), float("nan"), **f64)
    param = tuple(torch.where(bad, nan, x) for x in param)
    buf = tuple(torch.where(bad, nan, x) for x in buf) if buf is not None else None
    scalars_new = [torch.where(bad, nan, x) for x in scalars_new]
    skip = skip & ~bad
    if found_inf is not None:
        skip = skip | (found_inf.to(device).reshape(()) != 0)
    # The coefficients of the raw gradient carry the factor f (math.h fold_grad_factor).
    param = (param[0], param[1] * f, param[2])
    if buf is not None:
        buf = (buf[0], buf[1] * f, buf[2])
    if found_inf is None:  # skipped groups: w' = 1 w + 0 g + 0 m, exactly w (g is finite)
        param = _gram.keep(param, (1.0, 0.0, 0.0), skip)
        buf = _gram.keep(buf, (0.0, 0.0, 1.0), skip) if buf is not None else None
    for i, (w, m) in enumerate(zip(ws, ms)):
        if w.numel() == 0:
            continue
        c = lambda combo, j: combo[j][i].to(opm[i])  # noqa: E731
        # new tensors from the old (w, g, m), then the writes: 3 reads, 2 temporaries
        w_new = torch.mul(wf[i], c(param, 0)).addcmul_(gf[i], c(param, 1))
        if m is not None:
            m_new = torch.mul(wf[i], c(buf, 0)).addcmul_(gf[i], c(buf, 1)).addcmul_(m, c(buf, 2))
            w_new.addcmul_(m, c(param, 2))
        if found_inf is not None:  # GradScaler: g may be inf/nan, keep skipped groups as they are
            w_new = torch.where(skip[i], wf[i], w_new)
            if m is not None:
                m_new = torch.where(skip[i], m, m_new)
        w.copy_(w_new)
        if m is not None:
            m.copy_(m_new)
    for vs, old, new in zip(scalar_lists, scalars_old, scalars_new):
        for i, v in enumerate(vs):
            v.copy_(torch.where(skip[i], old[i], new[i]).reshape(v.shape))
    inc = torch.ones((), dtype=torch.float32, device=device)
    if found_inf is not None:
        inc = (found_inf.to(device).reshape(()) == 0).to(torch.float32)
    for s in steps:
        s.add_(inc.to(s.device))


# --- BNP statistics across data-parallel ranks ----------------------------------------------------


def require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("BNP(sync_stats=True) needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) before the first training "
                           "forward")


def average_(tensors: list[Tensor], group=None) -> None:
    """Averages ``tensors`` (same dtype/device) over the ranks of ``group`` (default: the default
    process group) in place, with one all-reduce."""
    require_process_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(size)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


__all__ = ["GroupSolve", "average_", "check_param", "is_dtensor", "is_sharded", "local",
           "rows_like", "sharded_tensor_group_step", "step_call"]
