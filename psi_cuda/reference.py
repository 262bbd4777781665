"""Pure-PyTorch implementation of every psi_cuda op: the oracle of the tests, the baseline of
the benchmarks, and the ``backend="reference"`` of the optimizers.

It follows docs/ALGORITHMS.md one formula per line. Groups are handled as the rows of a 2-D view
(channel groups: ``p.reshape(p.size(0), -1)``; a tensor group: one row), all rows at once.
Math runs in float32 (float64 for float64 parameters); state is kept in that dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

EXP_MIN_ANGLE = 1e-7  # below this the exponential map falls back to "normalize"

# Option names, in the order of their integer codes in csrc/include/psi/math.h (ops.py maps them).
# None also means "euclidean"; "block": groups of block_rows consecutive rows (the kernels'
# channel code with block_rows > 1, docs/ALGORITHMS.md 1.2b)
MANIFOLDS = ("euclidean", "channel", "tensor", "block")
PSI_MANIFOLDS = MANIFOLDS[1:]  # the scale-invariant ones
RETRACTIONS = ("normalize", "exp", "none")
TRANSPORTS = ("project", "parallel")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the math and of the optimizer state for a parameter dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def opmath_pair(p: Tensor, grad: Tensor, grad_scale: Tensor | None,
                maximize: bool) -> tuple[Tensor, Tensor]:
    """(w, g) in the opmath dtype, g unscaled by ``grad_scale`` and negated for ``maximize``."""
    dt = opmath_dtype(p.dtype)
    g = grad.to(dt)
    if grad_scale is not None:
        g = g / grad_scale.to(dt)
    return p.detach().to(dt), -g if maximize else g


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot product <a, b>, shape (rows, 1)."""
    return (a * b).sum(dim=1, keepdim=True)


def rownorm(a: Tensor) -> Tensor:
    """Per-row Euclidean norm |a|, shape (rows, 1)."""
    return a.norm(dim=1, keepdim=True)


def rownorm_wide(w: Tensor) -> Tensor:
    """Row norms of ``w`` summed in float64, so that rows of finite entries beyond float's
    square range (|w| ~ 1e-25 or 1e20 in float32) keep a finite, nonzero norm
    (docs/ALGORITHMS.md 6.7)."""
    return w.double().square().sum(dim=1, keepdim=True).sqrt().to(w.dtype)


def nonfinite_rows(*ts: Tensor | None) -> Tensor:
    """Rows (groups) holding an inf or a NaN in any of the given row tensors, shape (rows, 1):
    their step is NaN, not hidden (docs/ALGORITHMS.md 6.6)."""
    bad = None
    for t in ts:
        if t is not None and t.dim() == 2:
            b = ~torch.isfinite(t).all(dim=1, keepdim=True)
            bad = b if bad is None else bad | b
    return bad


def poison_rows(t: Tensor | None, bad: Tensor) -> Tensor | None:
    return None if t is None else torch.where(bad, torch.full_like(t, float("nan")), t)


def project_tangent(g: Tensor, w: Tensor) -> Tensor:
    """h = g - (<g,w>/|w|^2) w: remove the radial component of g."""
    return g - rowdot(g, w) / rowdot(w, w) * w


def clip_rows(q: Tensor, max_norm: float | None) -> Tensor:
    """q *= min(1, max_norm / |q|) per row (no-op when max_norm is falsy)."""
    if not max_norm:
        return q
    qn = rownorm(q)
    return q * torch.where(qn > max_norm, max_norm / qn, torch.ones_like(qn))


def retract_normalize(u: Tensor, d: Tensor, lr: float) -> Tensor:
    """u' = (u - lr d) / |u - lr d| (geoopt's Sphere.retr)."""
    v = u - lr * d
    return v / rownorm(v)


def retract_exp(u: Tensor, d: Tensor, t: Tensor, d_norm: Tensor) -> Tensor:
    """Exponential map of the sphere: u' = cos(t) u - sin(t) d / |d|, t = lr |d|."""
    return torch.cos(t) * u - torch.sin(t) * d / d_norm


def transport_project(m: Tensor, u_new: Tensor) -> Tensor:
    """m <- m - <m, u'> u'."""
    return m - rowdot(m, u_new) * u_new


def transport_parallel(m: Tensor, u: Tensor, d: Tensor, t: Tensor, d_norm: Tensor) -> Tensor:
    """Parallel transport along the geodesic of retract_exp, e = -d/|d|:
    m <- m - <m, e> (sin(t) u + (1 - cos(t)) e)."""
    e = -d / d_norm
    return m - rowdot(m, e) * (torch.sin(t) * u + (1 - torch.cos(t)) * e)


def move_on_sphere(w, u, n, d, buf, *, lr, retraction, transport):
    """The move of PSI-SGD and PSI-Adam from the unit rows ``u`` (norms ``n``) along the search
    direction ``d``, and the transport of the buffer ``buf`` (or None) to the new point.
    Returns (w', u', buf'); degenerate rows are the caller's to mask."""
    geodesic = torch.zeros_like(n, dtype=torch.bool)
    if retraction == "none":
        w_new = w - lr * n * d  # the plain quotient move
        u_new = w_new / rownorm(w_new)
    else:
        u_new = retract_normalize(u, d, lr)
        if retraction == "exp":
            d_norm = rownorm(d)
            t = lr * d_norm
            geodesic = t >= EXP_MIN_ANGLE
            d_safe = torch.where(geodesic, d_norm, torch.ones_like(d_norm))
            u_new = torch.where(geodesic, retract_exp(u, d, t, d_safe), u_new)
        w_new = n * u_new
    if buf is None:
        return w_new, u_new, None
    buf_new = transport_project(buf, u_new)
    if transport == "parallel" and retraction == "exp":
        buf_new = torch.where(geodesic, transport_parallel(buf, u, d, t, d_safe), buf_new)
    return w_new, u_new, buf_new


def group_rows(p: Tensor, manifold, block_rows) -> int:
    """The number of groups of ``p`` as rows of ``p.reshape(rows, -1)``: every row for
    ``"channel"``, ``p.size(0) // block_rows`` for ``"block"``, one for ``"tensor"``."""
    if manifold == "channel":
        return p.size(0)
    if manifold == "block":
        return p.size(0) // block_rows
    return 1


def op_block_rows(manifold, block_rows) -> int:
    """block_rows as the ops take it: an int >= 1 for manifold "block", else 1 (None or 1
    given); ValueError otherwise."""
    if manifold != "block":
        if block_rows not in (None, 1):
            raise ValueError(f"block_rows applies to manifold='block'; got block_rows="
                             f"{block_rows!r} with manifold={manifold!r}")
        return 1
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"manifold='block' needs block_rows, an int >= 1; got {block_rows!r}")
    return block_rows


def check_block_rows(params, manifold, block_rows) -> int:
    """:func:`op_block_rows`, and a ValueError naming the tensor whose dim 0 it does not
    divide."""
    block_rows = op_block_rows(manifold, block_rows)
    if manifold != "block":
        return 1
    for i, p in enumerate(params):
        if p.dim() == 0 or p.size(0) % block_rows:
            raise ValueError(f"params[{i}] has shape {tuple(p.shape)}: block_rows={block_rows} "
                             "must divide its size of dim 0 (its rows)")
    return block_rows


def check_sphere_options(manifold, retraction, transport) -> None:
    """The option checks of psi_sgd_ and psi_adam_ (the ops reject the same values)."""
    if manifold not in (None,) + MANIFOLDS:
        raise ValueError(f"manifold must be one of {MANIFOLDS} or None; got {manifold!r}")
    if retraction not in RETRACTIONS or transport not in TRANSPORTS:
        raise ValueError(f"unknown retraction {retraction!r} or transport {transport!r}")
    if transport == "parallel" and retraction != "exp":
        raise ValueError("transport='parallel' needs retraction='exp'")


def psi_sgd_rows(w, g, m, *, first, lr, momentum, dampening, nesterov, retraction, transport,
                 max_grad_norm):
    """One PSI-SGD step of the groups that are the rows of ``w`` (docs/ALGORITHMS.md section 2).

    ``g`` is the gradient already unscaled (and negated for maximize); ``m`` the momentum buffer
    rows or None. Returns the new (w, m). Rows with |w| = 0, and rows of length 1, do not move.
    """
    n = rownorm_wide(w)
    bad = nonfinite_rows(w, g, m)
    frozen = (n == 0) | (w.shape[1] < 2)
    n_safe = torch.where(frozen, torch.ones_like(n), n)
    u = w / n_safe
    q = n_safe * project_tangent(g, u)  # tangent gradient at the unit representative
    q = clip_rows(q, max_grad_norm)
    if momentum != 0:
        buf = q if first else momentum * m + (1 - dampening) * q
        d = q + momentum * buf if nesterov else buf
    else:
        buf, d = None, q
    w_new, u_new, m_new = move_on_sphere(w, u, n_safe, d, buf, lr=lr, retraction=retraction,
                                         transport=transport)
    # Rows that cannot move, or whose retraction degenerates, keep their old values.
    keep = frozen | ~(rownorm(u_new) > 0)  # also catches u - lr d = 0 (0/0 = nan)
    w_new = torch.where(keep, w, w_new)
    if m_new is not None:
        m_new = torch.where(keep, m, m_new)
    return poison_rows(w_new, bad), poison_rows(m_new, bad)


def euclidean_sgd(w, g, m, *, first, lr, momentum, dampening, nesterov, weight_decay):
    """One torch.optim.SGD step (g already unscaled and negated for maximize)."""
    if weight_decay != 0:
        g = g + weight_decay * w
    if momentum != 0:
        buf = g.clone() if first else momentum * m + (1 - dampening) * g
        d = g + momentum * buf if nesterov else buf
    else:
        buf, d = None, g
    return w - lr * d, buf


@torch.no_grad()
def psi_sgd_(params, grads, momentum_buffers, state_steps, *, lr, momentum=0.0, dampening=0.0,
             nesterov=False, weight_decay=0.0, maximize=False, manifold="channel",
             retraction="normalize", transport="project", max_grad_norm=None, grad_scale=None,
             found_inf=None, block_rows=None):
    """Reference of ``psi_cuda.ops.psi_sgd_`` (same arguments, same in-place effects)."""
    check_sphere_options(manifold, retraction, transport)
    block_rows = check_block_rows(params, manifold, block_rows)
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (p, grad) in enumerate(zip(params, grads)):
        step = state_steps[i]
        first = step.item() == 0
        w, g = opmath_pair(p, grad, grad_scale, maximize)
        m = momentum_buffers[i] if momentum != 0 else None
        if p.numel() == 0:
            step.add_(1)
            continue
        if manifold in (None, "euclidean"):
            w_new, m_new = euclidean_sgd(w, g, m, first=first, lr=lr, momentum=momentum,
                                         dampening=dampening, nesterov=nesterov,
                                         weight_decay=weight_decay)
        else:
            rows = group_rows(p, manifold, block_rows)
            as_rows = lambda t: t.reshape(rows, -1)  # noqa: E731
            w_rows, m_rows = psi_sgd_rows(
                as_rows(w), as_rows(g), as_rows(m) if m is not None else None, first=first,
                lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                retraction=retraction, transport=transport, max_grad_norm=max_grad_norm)
            w_new = w_rows.reshape(p.shape)
            m_new = m_rows.reshape(p.shape) if m_rows is not None else None
        p.copy_(w_new)
        if m_new is not None:
            m.copy_(m_new)
        step.add_(1)


def _rowsums(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """Per-row <x, y> of each 2-D pair, shape (rows, 1): the one step foreach cannot express."""
    return [t.sum(dim=1, keepdim=True) for t in torch._foreach_mul(xs, ys)]


@torch.no_grad()
def psi_sgd_foreach_(params, grads, momentum_buffers, state_steps, *, lr, momentum=0.0,
                     dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                     manifold="channel", retraction="normalize", transport="project",
                     max_grad_norm=None, grad_scale=None, found_inf=None):
    """``psi_sgd_`` written with ``torch._foreach_*`` calls, as torch's own ``foreach=True``
    optimizers are: one call per elementwise formula over the whole list (only the per-row
    sums are per tensor). The "foreach" pure-torch baseline of the benchmarks; equal to
    :func:`psi_sgd_` to float tolerance. Supports the options of a plain training step:
    retraction "normalize", transport "project", momentum/dampening/nesterov, maximize,
    weight_decay (Euclidean only, as in ``psi_sgd_``); anything else raises ValueError.
    """
    if manifold not in (None,) + MANIFOLDS:
        raise ValueError(f"manifold must be one of {MANIFOLDS} or None; got {manifold!r}")
    unsupported = {"manifold='block'": manifold == "block",
                   "retraction": retraction != "normalize", "transport": transport != "project",
                   "max_grad_norm": bool(max_grad_norm), "grad_scale": grad_scale is not None,
                   "found_inf": found_inf is not None}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"psi_sgd_foreach_ does not support {', '.join(bad)} "
                         "(use reference.psi_sgd_)")
    if not params:
        return
    # Tensors on their first step (no momentum yet) and the others take different formulas.
    firsts = [bool(s.item() == 0) for s in state_steps]
    for first in (True, False):
        idx = [i for i, f in enumerate(firsts) if f == first and params[i].numel() > 0]
        if idx:
            _psi_sgd_foreach_part([params[i] for i in idx], [grads[i] for i in idx],
                                  [momentum_buffers[i] for i in idx] if momentum != 0 else [],
                                  first=first, lr=lr, momentum=momentum, dampening=dampening,
                                  nesterov=nesterov, weight_decay=weight_decay,
                                  maximize=maximize, manifold=manifold)
    torch._foreach_add_(list(state_steps), 1)


def _psi_sgd_foreach_part(params, grads, bufs, *, first, lr, momentum, dampening, nesterov,
                          weight_decay, maximize, manifold):
    dt = opmath_dtype(params[0].dtype)
    ws = [p.detach().to(dt) for p in params]  # no copies for float32/float64 parameters
    gs = [g.to(dt) for g in grads]
    if maximize:
        gs = torch._foreach_neg(gs)
    if manifold in (None, "euclidean"):
        if weight_decay != 0:
            gs = torch._foreach_add(gs, ws, alpha=weight_decay)
        d = gs
        if momentum != 0:
            if first:
                torch._foreach_copy_(bufs, gs)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, gs, alpha=1 - dampening)
            d = torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(ws, d, alpha=-lr)
        if ws[0].data_ptr() != params[0].data_ptr():
            torch._foreach_copy_([p.detach() for p in params], ws)
        return
    rows = [p.size(0) if manifold == "channel" else 1 for p in params]
    W = [w.reshape(r, -1) for w, r in zip(ws, rows)]
    G = [g.reshape(r, -1) for g, r in zip(gs, rows)]
    M = [m.reshape(r, -1) for m, r in zip(bufs, rows)]
    ww, wg = _rowsums(W, W), _rowsums(W, G)
    n = torch._foreach_sqrt(ww)
    # Rows that cannot move (|w| = 0, or a single element) use n = 1 and are restored at the end.
    frozen = [(x == 0) | (w.shape[1] < 2) for x, w in zip(n, W)]
    n = [torch.where(f, torch.ones_like(x), x) for f, x in zip(frozen, n)]
    # u = w / n;  q = n (g - <g, u> u) = n g - (<w, g> / n) w
    u = torch._foreach_div(W, n)
    q = torch._foreach_mul(G, n)
    torch._foreach_addcmul_(q, W, torch._foreach_neg(torch._foreach_div(wg, n)))
    if momentum != 0:
        if first:
            buf = q
        else:
            buf = torch._foreach_mul(M, momentum)
            torch._foreach_add_(buf, q, alpha=1 - dampening)
        d = torch._foreach_add(q, buf, alpha=momentum) if nesterov else buf
    else:
        buf, d = None, q
    v = torch._foreach_add(u, d, alpha=-lr)  # retraction "normalize": u' = v / |v|
    vn = torch._foreach_sqrt(_rowsums(v, v))
    # keep: frozen rows and rows whose retraction degenerates (v = 0) keep their values.
    good = [((x > 0) & ~f).to(dt) for x, f in zip(vn, frozen)]
    keep = torch._foreach_sub([torch.ones_like(x) for x in good], good)
    vn = [torch.where(x > 0, x, torch.ones_like(x)) for x in vn]
    u_new = torch._foreach_div(v, vn)
    if buf is not None:  # m' = buf - <buf, u'> u', kept rows keep m
        bu = _rowsums(buf, u_new)
        m_new = torch._foreach_addcmul(buf, u_new, torch._foreach_neg(bu))
        torch._foreach_mul_(m_new, good)
        torch._foreach_addcmul_(m_new, M, keep)
        torch._foreach_copy_(bufs, [x.reshape(b.shape) for x, b in zip(m_new, bufs)])
    # w' = n u' on moving rows, w on kept ones
    w_new = torch._foreach_mul(u_new, torch._foreach_mul(n, good))
    torch._foreach_addcmul_(w_new, W, keep)
    torch._foreach_copy_([p.detach() for p in params],
                         [x.reshape(p.shape) for x, p in zip(w_new, params)])


# --- Batch Normalization Preconditioning (docs/ALGORITHMS.md section 4) ---------------------------


def bnp_batch_weight(momentum: float, step: float) -> float:
    """Weight of the batch in the bias-corrected moving average at its ``step + 1``-th update.

    The statistics are stored bias-corrected: with ``c_t = 1 - (1 - rho)^t`` the corrected EMA
    obeys ``x_t = (1 - a_t) x_{t-1} + a_t batch_t`` with ``a_t = rho / c_t``, so ``a_1 = 1``: after
    the first forward the statistics are exactly that batch's.
    """
    t = step + 1.0
    if t <= 1.0 or momentum >= 1.0:
        return 1.0
    return momentum / (1.0 - (1.0 - momentum) ** t)


def stats_dims(x: Tensor, channel_dim: int) -> list[int]:
    """Dimensions of ``x`` that the statistics average over (all but the channel dimension)."""
    cd = channel_dim % x.dim()
    return [d for d in range(x.dim()) if d != cd]


@torch.no_grad()
def bnp_update_stats_(x: Tensor, mean: Tensor, sqmean: Tensor, step: Tensor, *,
                      channel_dim: int, momentum: float, batches: Tensor | None = None) -> None:
    """Reference of ``ops.bnp_update_stats_``: per-channel batch mean and mean of squares of the
    layer input ``x``, folded into the bias-corrected moving averages ``mean`` and ``sqmean``
    (state dtype: float32, or float64). ``step`` (float32 scalar) counts the updates,
    ``batches`` (optional) every non-empty batch. An empty batch, and a batch whose statistics
    are not finite, change nothing else."""
    if x.numel() == 0:
        return
    if batches is not None:
        batches.add_(1)
    xf = x.detach().to(torch.float64)
    dims = stats_dims(x, channel_dim)
    batch_mean = xf.mean(dims) if dims else xf
    batch_sqmean = (xf * xf).mean(dims) if dims else xf * xf
    a = bnp_batch_weight(momentum, step.item())
    # A batch with an inf or a NaN does not enter the averages nor count as a step
    # (docs/ALGORITHMS.md 4.4); decided with tensors.
    ok = torch.isfinite(batch_mean).all() & torch.isfinite(batch_sqmean).all()
    mean.copy_(torch.where(ok, (1 - a) * mean.double() + a * batch_mean, mean.double()))
    sqmean.copy_(torch.where(ok, (1 - a) * sqmean.double() + a * batch_sqmean, sqmean.double()))
    step.add_(ok.to(step.dtype))


def bnp_channel_coefs(mean: Tensor, sqmean: Tensor, eps: float, centered: bool):
    """Per input channel ``(shift, inv)`` with ``G' = (G - g_b shift) inv``: with a bias,
    ``shift = mu`` and ``inv = 1 / (max(s - mu^2, 0) + eps)``; without one (no centering),
    ``shift = 0`` and ``inv = 1 / (s + eps)``."""
    mu, s = mean.double(), sqmean.double()
    if centered:
        return mu, 1.0 / ((s - mu * mu).clamp_min(0) + eps)
    return torch.zeros_like(mu), 1.0 / (s + eps)


def bnp_precondition_rows(G: Tensor, gb: Tensor | None, shift: Tensor, inv: Tensor,
                          groups: int):
    """BNP formula on a weight gradient ``G`` (out, in/groups, *kernel) and bias gradient ``gb``
    (out,) or None; ``shift``/``inv`` are per input channel (in,). Returns (G', g_b')."""
    out, cin_g = G.shape[0], G.shape[1]
    per_group = out // groups
    # Input channel of each (output channel, channel-in-group) pair: group o // per_group.
    sh = shift.view(groups, cin_g).repeat_interleave(per_group, 0).view(out, cin_g, 1)
    iv = inv.view(groups, cin_g).repeat_interleave(per_group, 0).view(out, cin_g, 1)
    G3 = G.reshape(out, cin_g, G[0, 0].numel() if G.numel() else 1)
    if gb is None:
        return (G3 * iv).view(G.shape), None
    Gp = (G3 - gb.view(out, 1, 1) * sh) * iv
    gbp = gb - (Gp * sh).sum(dim=(1, 2))
    return Gp.view(G.shape), gbp


@torch.no_grad()
def bnp_precondition_(weight_grads, bias_grads, means, sqmeans, *, groups, eps) -> None:
    """Reference of ``ops.bnp_precondition_``: rewrites the gradients in place. ``bias_grads`` is
    empty (the no-bias variant for every layer) or one per weight gradient."""
    for i, gw in enumerate(weight_grads):
        gb = bias_grads[i] if bias_grads else None
        dt = torch.float64
        shift, inv = bnp_channel_coefs(means[i], sqmeans[i], eps, gb is not None)
        Gp, gbp = bnp_precondition_rows(gw.to(dt), None if gb is None else gb.to(dt), shift, inv,
                                        groups[i])
        gw.copy_(Gp)
        if gb is not None:
            gb.copy_(gbp)


def _per_row(v: Tensor, groups: int, out: int, cin_g: int) -> Tensor:
    """A per-input-channel vector ``v`` (in,) laid out per (output channel, channel in group):
    shape (out, cin_g, 1); row ``o`` reads the channels of its group ``o // (out / groups)``."""
    return v.view(groups, cin_g).repeat_interleave(out // groups, 0).view(out, cin_g, 1)


@torch.no_grad()
def bnp_unit_norms(weight: Tensor, weight_grad: Tensor, bias_grad: Tensor | None, mean: Tensor,
                   sqmean: Tensor, *, groups: int, eps: float,
                   dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per output channel ``o`` (a unit: row ``o`` of the weight and entry ``o`` of the bias), the
    norms of its weight and of its weight gradient in the input-normalized coordinates of
    docs/ALGORITHMS.md section 4: ``(|W~_o|, |G~_o|)``, each of shape (out,), with

        W~ = W D,   G~ = (G - g_b mu^T) D^-1,   D = diag(sqrt(max(s - mu^2, 0) + eps))

    (without a bias: ``G~ = G D^-1`` and ``D^2 = s + eps``). ``G~`` is the gradient of the loss
    with respect to ``W~``, and ``-lr G~`` is the change of ``W~`` that one BNP step makes
    (before momentum). Computed in ``dtype`` (default: the opmath dtype of the gradient)."""
    dt = dtype or opmath_dtype(weight_grad.dtype)
    out = weight_grad.shape[0]
    if out == 0:
        empty = torch.zeros(0, dtype=dt, device=weight_grad.device)
        return empty, empty.clone()
    cin_g = weight_grad.shape[1]
    mu, s = mean.to(dt), sqmean.to(dt)
    centered = bias_grad is not None
    d2 = ((s - mu * mu).clamp_min(0) if centered else s) + eps  # D^2, per input channel

    def per_row(v):
        return v.view(1, cin_g, 1) if groups == 1 else _per_row(v, groups, out, cin_g)

    G = weight_grad.reshape(out, cin_g, -1).to(dt)
    if centered:
        G = G - bias_grad.to(dt).view(out, 1, 1) * per_row(mu)
    W = weight.reshape(out, cin_g, -1).to(dt)
    d2 = per_row(d2)
    return (W * W * d2).sum(dim=(1, 2)).sqrt(), (G * G / d2).sum(dim=(1, 2)).sqrt()


@torch.no_grad()
def bnp_update_caps(weights, weight_grads, bias_grads, means, sqmeans, *, groups, eps, lr,
                    max_update, floor, grad_scale=None) -> list[Tensor]:
    """Per-unit factors of the capped BNP-SGD step (docs/ALGORITHMS.md section 4, "step cap"):

        c_o = min(1, max_update * max(|W~_o|, floor) / (lr * |G~_o|))

    with the norms of :func:`bnp_unit_norms` and ``G`` the unscaled gradient (``grad / grad_scale``
    under a GradScaler). Scaling row ``o`` of the weight gradient and entry ``o`` of the bias
    gradient by ``c_o`` scales the unit's BNP gradient by ``c_o`` (the formula is linear and acts
    on each unit alone), so a step moves no unit's input-normalized weights by more than
    ``max_update * max(|W~_o|, floor)`` before momentum. A zero gradient or ``lr == 0`` gives 1.
    One tensor (out,) per layer, in the opmath dtype of its gradient."""
    caps = []
    for i, (w, g) in enumerate(zip(weights, weight_grads)):
        gb = bias_grads[i] if bias_grads else None
        w_norm, g_norm = bnp_unit_norms(w, g, gb, means[i], sqmeans[i], groups=groups[i], eps=eps)
        if lr == 0:
            caps.append(torch.ones_like(g_norm))
            continue
        if grad_scale is not None:
            g_norm = g_norm / grad_scale.to(g_norm.dtype)
        bound = max_update * w_norm.clamp_min(floor)
        caps.append((bound / (lr * g_norm)).clamp_max(1.0))  # g_norm 0: inf -> 1
    return caps


def scale_rows(t: Tensor, factors: Tensor) -> Tensor:
    """``t`` with its row ``o`` (dim 0) multiplied by ``factors[o]``, in ``t``'s dtype and
    layout (a new tensor)."""
    return t * factors.to(t.dtype).view((-1,) + (1,) * (t.dim() - 1))


@torch.no_grad()
def bnp_sgd_(weights, biases, weight_grads, bias_grads, weight_momentum_buffers,
             bias_momentum_buffers, state_steps, means, sqmeans, *, groups, eps, lr,
             momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
             grad_scale=None, found_inf=None) -> None:
    """Reference of ``ops.bnp_sgd_``: BNP-precondition copies of the gradients, then one
    ``torch.optim.SGD`` step of every weight and bias (the gradients are not modified)."""
    if found_inf is not None and found_inf.item() != 0:
        return
    wg = [g.clone() for g in weight_grads]
    bg = [g.clone() for g in bias_grads]
    bnp_precondition_(wg, bg, means, sqmeans, groups=groups, eps=eps)
    params = list(weights) + list(biases)
    grads = wg + bg
    bufs = list(weight_momentum_buffers) + list(bias_momentum_buffers)
    # One step counter per layer serves its weight and its bias.
    first = [s.clone() for s in state_steps] + ([s.clone() for s in state_steps] if biases else [])
    psi_sgd_(params, grads, bufs, first, lr=lr, momentum=momentum, dampening=dampening,
             nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, manifold=None,
             grad_scale=grad_scale, found_inf=None)
    for s in state_steps:
        s.add_(1)


def psi_adam_rows(w, g, m, v, *, step, lr, beta1, beta2, eps, retraction, transport,
                  max_grad_norm):
    """One PSI-Adam step of the groups that are the rows of ``w`` (docs/ALGORITHMS.md section 3).

    ``g`` is the gradient already unscaled (and negated for maximize), ``m`` the first-moment
    rows, ``v`` the second moments, shape (rows, 1), ``step`` the number of this step (1 first).
    Returns the new (w, m, v). Rows with |w| = 0, and rows of length 1, do not move.
    """
    n = rownorm_wide(w)
    bad = nonfinite_rows(w, g, m)
    frozen = (n == 0) | (w.shape[1] < 2)
    n_safe = torch.where(frozen, torch.ones_like(n), n)
    u = w / n_safe
    q = n_safe * project_tangent(g, u)  # tangent gradient at the unit representative
    q = clip_rows(q, max_grad_norm)
    m_new = beta1 * m + (1 - beta1) * q
    v_new = beta2 * v + (1 - beta2) * rowdot(q, q)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    denom = torch.sqrt(v_new / bc2) + eps
    d = torch.where(denom > 0, m_new / (bc1 * denom), torch.zeros_like(m_new))
    w_new, u_new, m_moved = move_on_sphere(w, u, n_safe, d, m_new, lr=lr, retraction=retraction,
                                           transport=transport)
    # Rows that cannot move, or whose retraction degenerates, keep their old values.
    keep = frozen | ~(rownorm(u_new) > 0)  # also catches u - lr d = 0 (0/0 = nan)
    return (poison_rows(torch.where(keep, w, w_new), bad),
            poison_rows(torch.where(keep, m, m_moved), bad),
            poison_rows(torch.where(keep, v, v_new), bad))


def euclidean_adamw(w, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """One torch.optim.AdamW step (g already unscaled and negated for maximize)."""
    w = w * (1 - lr * weight_decay)
    m_new = m + (1 - beta1) * (g - m)
    v_new = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    return w - (lr / bc1) * m_new / (v_new.sqrt() / bc2_sqrt + eps), m_new, v_new


@torch.no_grad()
def psi_adam_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, maximize=False, manifold="channel",
              retraction="normalize", transport="project", max_grad_norm=None, grad_scale=None,
              found_inf=None, block_rows=None):
    """Reference of ``psi_cuda.ops.psi_adam_`` (same arguments, same in-place effects)."""
    check_sphere_options(manifold, retraction, transport)
    block_rows = check_block_rows(params, manifold, block_rows)
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"betas must be in [0, 1); got ({beta1}, {beta2})")
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (p, grad) in enumerate(zip(params, grads)):
        step_t = state_steps[i]
        step = step_t.item() + 1  # the number of this step
        w, g = opmath_pair(p, grad, grad_scale, maximize)
        m, v = exp_avgs[i], exp_avg_sqs[i]
        if p.numel() == 0:
            step_t.add_(1)
            continue
        kw = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        if manifold in (None, "euclidean"):
            w_new, m_new, v_new = euclidean_adamw(w, g, m, v, weight_decay=weight_decay, **kw)
        else:
            rows = group_rows(p, manifold, block_rows)
            as_rows = lambda t: t.reshape(rows, -1)  # noqa: E731
            w_rows, m_rows, v_rows = psi_adam_rows(
                as_rows(w), as_rows(g), as_rows(m), v.reshape(rows, 1), retraction=retraction,
                transport=transport, max_grad_norm=max_grad_norm, **kw)
            w_new, m_new, v_new = (w_rows.reshape(p.shape), m_rows.reshape(p.shape),
                                   v_rows.reshape(v.shape))
        p.copy_(w_new)
        m.copy_(m_new)
        v.copy_(v_new)
        step_t.add_(1)
