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
  the elements: each rank sums its shard (``ops.psi_grams``, one fused read of every such
  shard), ONE all-reduce per optimizer call sums the table of all such groups over the mesh
  dimensions they are sharded on, and every rank writes its shard with the whole group's step
  (``ops.psi_sgd_``/``psi_adam_`` with ``grams=``: one fused read-modify-write, no host
  synchronisation). The reference backend does the same in torch (:class:`GroupSolve`).
* A block group (``manifold="block"``, ``Shard(0)`` over one mesh dimension, uneven shards
  included) is cut by the shard boundaries that fall inside a block: those blocks take the
  path of tensor groups (a row of the same table per cut block), and the runs of blocks that
  lie wholly inside a shard are stepped locally, with no communication, like channel groups.
* Scalar state (``step``, a tensor group's second moment ``v`` of shape ``()``) stays a plain
  tensor: it is the same on every rank (the update is computed from all-reduced sums), torch's
  own optimizers keep ``step`` the same way under FSDP2, and ``torch.distributed.checkpoint``
  saves a plain tensor once and loads it on every rank. Per-row state (PSIAdam's ``exp_avg_sq``
  of a channel group, shape ``(rows,)``) is a DTensor sharded like the parameter's dim 0; so is
  the second moment of a sharded block group, stored per row (each row holds its block's
  value), which keeps it with its rows when DCP reshards.
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
    if manifold == "block":
        sharded = [pl for pl in p.placements if pl.is_shard()]
        if len(sharded) > 1 or any(not pl.is_shard(0) for pl in sharded):
            raise ValueError(f"{where}: manifold='block' needs its rows (dim 0) sharded over at "
                             f"most one mesh dimension, i.e. placements Shard(0) or Replicate "
                             f"(FSDP2, HSDP); got {tuple(p.placements)}")
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


@dataclass(frozen=True)
class GroupSolve:
    """What an optimizer hands :func:`step_call` for its sharded tensor groups: the step of a
    group from its (all-reduced) Gram sums, vectorized over the groups (``psi_cuda._gram``): the
    torch path of the reference backend for groups cut across ranks.

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


def step_call(fn, lists: list[list], *, manifold: str | None, solve: GroupSolve | None,
              grams_fn: Callable | None = None, **kw) -> None:
    """Calls the op ``fn`` (fused or reference) on ``lists`` (params first, each list empty or
    one entry per param). Plain tensors go straight through; DTensors are replaced by their
    local shards. Groups cut across ranks (sharded tensor groups, and the blocks of sharded
    block groups that a shard boundary cuts) take :func:`sharded_group_step`: local sums with
    ``grams_fn`` (the fused ``ops.psi_grams``; None: in torch), one all-reduce, the apply with
    the given sums (``fn(..., grams=...)`` when ``grams_fn`` is given, else the optimizer's
    ``solve`` in torch). Blocks that lie wholly inside a shard need no communication."""
    params = lists[0]
    if not any(is_dtensor(p) for p in params):
        fn(*lists, manifold=manifold, **kw)
        return
    n = len(params)
    cut = [i for i, p in enumerate(params)
           if manifold in ("tensor", "block") and is_sharded(p)]
    if cut and solve is None and grams_fn is None:
        raise NotImplementedError("this optimizer has no step for sharded tensor or block groups")
    rest = [i for i in range(n) if i not in set(cut)]
    pick = lambda idx: [[local(l[i]) for i in idx] if l else [] for l in lists]  # noqa: E731
    if rest:  # local shards: Euclidean, channel rows, unsharded groups (each bumps its steps)
        fn(*pick(rest), manifold=manifold, **kw)
    if cut:
        sharded_group_step(fn, [[l[i] for i in cut] if l else [] for l in lists],
                           manifold=manifold, solve=solve, grams_fn=grams_fn, **kw)


def _shard_rows(p: Tensor) -> tuple[int, int, list[int]]:
    """Rows ``[r0, r1)`` of ``p`` (a DTensor sharded on dim 0 over one mesh dimension) held by
    this rank, and the row boundaries between all ranks' shards (torch.chunk sharding, as
    FSDP2's ``fully_shard``)."""
    dims = [d for d, pl in enumerate(p.placements) if pl.is_shard()]
    if len(dims) != 1 or not p.placements[dims[0]].is_shard(0):
        raise NotImplementedError(f"manifold='block' on a DTensor placed {tuple(p.placements)}: "
                                  "only Shard(0) over one mesh dimension (FSDP2, HSDP) is "
                                  "supported")
    rows, size = p.size(0), p.device_mesh.size(dims[0])
    chunk = -(-rows // size)
    r0 = min(p.device_mesh.get_local_rank(dims[0]) * chunk, rows)
    r1 = min(r0 + chunk, rows)
    if r1 - r0 != p._local_tensor.size(0):
        raise RuntimeError(f"a block group of shape {tuple(p.shape)} placed "
                           f"{tuple(p.placements)}: local rows {p._local_tensor.size(0)} do not "
                           "follow torch.chunk sharding")
    return r0, r1, [k * chunk for k in range(1, size) if k * chunk < rows]


@dataclass
class _Piece:
    """Rows ``[a, b)`` of a local shard that form one group (or part of one) on this rank."""
    param: int        # index in the lists
    a: int
    b: int
    row: int = -1     # cut groups: row of the all-reduced table; -1: a run of whole blocks


def _pieces(params: list[Tensor], manifold: str, block_rows: int) -> tuple[list[_Piece], list]:
    """The pieces of every local shard, and for each row of the table of cut groups the param
    it belongs to. The same table on every rank: it follows from the global shapes."""
    pieces, table = [], []
    for i, p in enumerate(params):
        if manifold == "tensor":
            lp = p._local_tensor
            pieces.append(_Piece(i, 0, lp.size(0) if lp.dim() else 1, len(table)))
            table.append(i)
            continue
        r0, r1, bounds = _shard_rows(p)
        cut, spans = block_pieces(r0, r1, bounds, block_rows)
        first = len(table)
        table.extend([i] * len(cut))
        for a, b, j in spans:
            pieces.append(_Piece(i, a - r0, b - r0, first + cut.index(j) if j >= 0 else -1))
    return pieces, table


def block_pieces(r0: int, r1: int, bounds: list[int], block_rows: int):
    """How the rows ``[r0, r1)`` of one rank split into groups of ``block_rows`` rows when the
    shards' boundaries are ``bounds``: returns the blocks that a boundary falls inside (sorted;
    the same on every rank) and this rank's spans ``(a, b, j)`` of rows: part of cut block
    ``j``, or (``j = -1``) a run of whole blocks. Only a shard's first and last block can be
    cut, so there are at most three spans."""
    b = block_rows
    cut = sorted({x // b for x in bounds if x % b})
    spans, r = [], r0
    while r < r1:
        j = r // b
        if j in cut:
            e = min(r1, (j + 1) * b)
            spans.append((r, e, j))
        else:  # whole blocks up to the next cut one or the end of the shard
            e = r
            while e < r1 and e // b not in cut:
                e += b
            spans.append((r, e, -1))
        r = e
    return cut, spans


def _all_reduce_rows(params: list[Tensor], owner: list[int], table: Tensor) -> None:
    """Sums the rows of ``table`` over the mesh dimensions their parameter (``owner``) is
    sharded on, in place: one all-reduce per distinct (mesh, sharded dims), usually one."""
    keys: dict = {}
    for r, i in enumerate(owner):
        p = params[i]
        dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
        keys.setdefault((id(p.device_mesh), dims), (p.device_mesh, dims, []))[2].append(r)
    for mesh, dims, rows in keys.values():
        whole = len(keys) == 1
        sub = table if whole else table[rows].contiguous()
        for d in dims:
            dist.all_reduce(sub, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        if not whole:
            table[rows] = sub


@torch.no_grad()
def sharded_group_step(fn, lists: list[list], *, manifold: str, solve: GroupSolve | None,
                       grams_fn: Callable | None, **kw) -> None:
    """One step of tensor and block groups whose parameters are DTensors sharded across ranks.

    Each local shard is cut into pieces: parts of groups that extend to other ranks (a sharded
    tensor group; a block that a shard boundary falls inside) and runs of whole blocks. The
    local Gram sums of the first kind (one fused ``grams_fn`` call, or torch) fill one table,
    all-reduced once; the fused op (``fn`` with ``grams=``) or the torch ``solve`` then writes
    each piece with its whole group's step. Runs of whole blocks take ``fn`` as they are, with
    no communication. ``lists`` are the op's (params, grads, *state lists, steps); each param's
    step counter advances once. The second moments of block groups (PSIAdam) are stored per
    row for sharded params (``rows_like``): each group's value is read from its first row and
    written to all of its rows."""
    params, steps = lists[0], lists[-1]
    scalar_idx = set(solve.scalars) if solve is not None else ({3} if len(lists) == 5 else set())
    block_rows = kw.pop("block_rows", 1)
    pieces, owner = _pieces(params, manifold, block_rows)
    device = local(params[0]).device
    calls = {True: ([[] for _ in lists], []), False: ([[] for _ in lists], [])}  # cut?, whole
    spread = []  # (per-row second moments of a piece, the per-group copy the op steps, rows/group)
    stepped, old_steps = set(), {}
    for pc in pieces:
        if local(params[pc.param]).dim() and pc.b <= pc.a:
            continue  # an empty shard
        call_lists, call_pieces = calls[pc.row >= 0]
        call_pieces.append(pc)
        for k in range(len(lists) - 1):
            if not lists[k]:
                continue
            t = local(lists[k][pc.param])
            if k in scalar_idx and manifold == "block":
                per = pc.b - pc.a if pc.row >= 0 else block_rows
                v = t[pc.a:pc.b].view(-1, per)[:, 0].contiguous()
                spread.append((t[pc.a:pc.b], v, per))
            elif k in scalar_idx:  # a tensor group's one second moment
                v = t
            else:
                v = t[pc.a:pc.b] if t.dim() else t
            call_lists[k].append(v)
        if pc.param in stepped:  # a later piece of the param: a copy of the old counter
            old = old_steps.setdefault(pc.param, steps[pc.param].clone())
            call_lists[-1].append(old.clone())
        else:
            call_lists[-1].append(steps[pc.param])
            stepped.add(pc.param)

    cut_lists, cut_pieces = calls[True]
    if owner:  # every rank joins the all-reduce, with or without a piece of its own
        table = torch.zeros((len(owner), 7), dtype=torch.float64, device=device)
        idx = torch.tensor([pc.row for pc in cut_pieces], dtype=torch.long, device=device)
        bufs = cut_lists[2] if len(lists) > 3 else []
        if cut_pieces:
            sums = (grams_fn(cut_lists[0], cut_lists[1], bufs, manifold="tensor")
                    if grams_fn is not None else _torch_grams(cut_lists[0], cut_lists[1], bufs))
            table.index_add_(0, idx, sums)
        _all_reduce_rows(params, owner, table)
        if cut_pieces:
            given = table.index_select(0, idx)
            if grams_fn is not None:
                fn(*cut_lists, manifold="tensor", grams=given, **kw)
            else:
                _torch_apply(cut_lists, given, solve=solve, **kw)
    whole_lists, whole_pieces = calls[False]
    if whole_pieces:
        fn(*whole_lists, manifold="block", block_rows=block_rows, **kw)
    for rows, v, per in spread:
        rows.view(-1, per).copy_(v.view(-1, 1).expand(-1, per))
    # params whose shard is empty on this rank
    _advance_steps([s for i, s in enumerate(steps) if i not in stepped], kw.get("found_inf"),
                   device)


def _advance_steps(steps: list[Tensor], found_inf: Tensor | None, device) -> None:
    """Every step += 1, or += 0 where found_inf is set (decided on the device)."""
    if not steps:
        return
    inc = torch.ones((), dtype=torch.float32, device=device)
    if found_inf is not None:
        inc = (found_inf.to(device).reshape(()) == 0).to(torch.float32)
    for s in steps:
        s.add_(inc.to(s.device))


def _torch_grams(ws: list[Tensor], gs: list[Tensor], ms: list[Tensor]) -> Tensor:
    """psi_grams' table of the pieces (one group each) in torch: the reference backend's."""
    rows = []
    for i, (w, g) in enumerate(zip(ws, gs)):
        dt = reference.opmath_dtype(w.dtype)
        sums = _gram.gram_local([w.to(dt), g.to(dt)] + ([ms[i]] if ms else []))
        rows.append(torch.cat([sums, sums.new_tensor([w.numel()])]))
    return torch.stack(rows)


def _torch_apply(lists: list[list], grams: Tensor, *, solve: GroupSolve,
                 lr: float, weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None,
                 **opts) -> None:
    """The step of groups given their (all-reduced) Gram sums, in torch: ``solve`` on every rank
    (the same result everywhere), then the update of the local pieces. ``lists`` are the op's
    (params, grads, *state lists, steps) of the pieces."""
    params, grads, steps = lists[0], lists[1], lists[-1]
    bufs = lists[solve.buffer] if solve.buffer is not None else []
    bufs = bufs if bufs else [None] * len(params)
    scalar_lists = [lists[i] for i in solve.scalars]
    device = params[0].device
    f64 = dict(dtype=torch.float64, device=device)
    opm = [reference.opmath_dtype(w.dtype) for w in params]
    # opmath views (copies for float16/bfloat16 parameters and for the gradients of those)
    wf = [w.to(dt) for w, dt in zip(params, opm)]
    gf = [g.to(dt) for g, dt in zip(grads, opm)]
    f = torch.full((), -1.0 if maximize else 1.0, **f64)
    if grad_scale is not None:
        f = f / grad_scale.to(**f64)
    G = dict(zip(_gram.GRAM_KEYS, grams[:, :6].unbind(1)))
    G["wg"], G["gm"], G["gg"] = G["wg"] * f, G["gm"] * f, G["gg"] * f * f
    numel = grams[:, 6]
    step_old = torch.stack([s.reshape(()) for s in steps]).to(**f64)
    scalars_old = [torch.stack([v.reshape(()) for v in vs]).to(**f64) for vs in scalar_lists]
    param, buf, scalars_new, skip = solve.fn(G, numel, step_old, scalars_old, lr=lr, **opts)
    # The non-finite policy (math.h poisoned): a group with an inf or NaN in w, g or m gets NaN.
    bad = ~torch.isfinite(grams[:, :6].sum(1))
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
    for i, (w, m) in enumerate(zip(params, bufs)):
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
    _advance_steps(steps, found_inf, device)


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
           "rows_like", "sharded_group_step", "step_call"]
