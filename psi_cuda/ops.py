"""The only module that touches ``torch.ops.psi_cuda``: typed wrappers and fake implementations.

String options map to the integer codes of ``csrc/include/psi/math.h``; their names are listed
once, in code order, in ``reference.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the ops)
from . import reference

BACKENDS = ("auto", "fused", "reference")  # the backend= option of the optimizers and BNP
# "block" is the kernels' channel code with block_rows > 1 (groups of consecutive rows).
MANIFOLDS = {None: 0, "euclidean": 0, "channel": 1, "tensor": 2, "block": 1}
assert set(MANIFOLDS) == {None, *reference.MANIFOLDS}
RETRACTIONS = {name: code for code, name in enumerate(reference.RETRACTIONS)}
TRANSPORTS = {name: code for code, name in enumerate(reference.TRANSPORTS)}


# The library the wrappers below call. psi_cuda.emulated binds the same wrappers to psi_cuda_emu,
# the CUDA kernels run by the CPU emulator, whose ops have the same schemas. The wrappers call
# each op's `.default` overload: the packet (`_OPS.psi_sgd_(...)`) first resolves the overload
# from the arguments, about 10 us a call.
_OPS = torch.ops.psi_cuda

# Read once: a constant for torch.compile, which cannot trace the dispatcher query.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("psi_cuda::psi_sgd_", "CUDA")


def has_cuda_kernels() -> bool:
    """True when this build registered CUDA kernels (a CUDA build, whether or not a GPU is present)."""
    return _HAS_CUDA_KERNELS


def use_fused(backend: str, device: torch.device, who: str) -> bool:
    """Whether ``backend`` ("auto", "fused" or "reference") runs the fused kernels on ``device``;
    "fused" without a kernel for the device is an error naming ``who``."""
    if backend == "reference":
        return False
    available = device.type == "cpu" or (device.type == "cuda" and has_cuda_kernels())
    if backend == "fused" and not available:
        raise RuntimeError(f"{who}(backend='fused'): no fused kernel for device {device} in "
                           "this build of psi_cuda (rebuild with PSI_CUDA_BUILD_CUDA=1)")
    return available


def psi_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    manifold: str | None = "channel",
    retraction: str = "normalize",
    transport: str = "project",
    max_grad_norm: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    check: bool = True,
    block_rows: int | None = None,
    grams: Tensor | None = None,
) -> None:
    """One fused PSI-SGD step (or torch.optim.SGD step with ``manifold=None``) over a tensor list.

    Updates ``params``, ``momentum_buffers`` (empty when ``momentum == 0``) and ``state_steps``
    in place. All params must share one device and dtype. ``check=False`` skips the Python-side
    layout/device check (for callers that made it already); the kernels check everything else.
    ``manifold="block"`` takes ``block_rows``: each group is that many consecutive rows of
    ``p.reshape(p.size(0), -1)``. ``grams`` (PSI manifolds): the Gram sums of every group, given
    instead of computed (:func:`psi_grams`' float64 ``(groups, 7)`` table, e.g. all-reduced over
    the ranks that hold parts of each group); the op then skips its reduction and takes each
    group's length from the table.
    """
    if check:
        _check_dispatchable("psi_sgd_", params=params, grads=grads,
                            momentum_buffers=momentum_buffers, state_steps=state_steps)
    _OPS.psi_sgd_.default(
        params,
        grads,
        momentum_buffers,
        state_steps,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        **_sphere_options(manifold, retraction, transport, max_grad_norm, block_rows),
        grad_scale=grad_scale,
        found_inf=found_inf,
        grams=grams,
    )


def psi_grams(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], *,
              manifold: str = "channel", block_rows: int | None = None,
              check: bool = True) -> Tensor:
    """The Gram sums of every PSI group of a list in one fused read of (w, g, m): a float64
    tensor of shape ``(groups, 7)``, one row per group (tensor by tensor, groups in order; empty
    tensors have none), columns ``<w,w>, <w,g>, <w,m>, <g,g>, <g,m>, <m,m>`` of the raw
    parameter, gradient (as stored: scaled, not negated) and buffer (``buffers`` empty: m = 0),
    then the group's number of elements. Rows of parts of one group add up to the group's row
    (what an all-reduce over ranks does). Summed as :func:`psi_sgd_` and :func:`psi_adam_` sum
    them, so passing the result back as their ``grams`` gives their step (to rounding: the
    write loops differ)."""
    if check:
        _check_dispatchable("psi_grams", params=params, grads=grads, buffers=buffers)
    opts = _sphere_options(manifold, "normalize", "project", None, block_rows)
    if opts["manifold"] == 0:
        raise ValueError("psi_grams: manifold must be 'channel', 'block' or 'tensor'; got "
                         f"{manifold!r}")
    return _OPS.psi_grams.default(params, grads, buffers, manifold=opts["manifold"],
                          block_rows=opts["block_rows"])


@torch.library.register_fake("psi_cuda::psi_grams")
def _psi_grams_fake(params, grads, buffers, *, manifold, block_rows=1):
    groups = 0
    for p in params:
        if p.numel() > 0:
            groups += (p.size(0) // block_rows) if manifold == 1 else 1
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((groups, 7), dtype=torch.float64, device=device)


def psi_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    manifold: str | None = "channel",
    retraction: str = "normalize",
    transport: str = "project",
    max_grad_norm: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    check: bool = True,
    block_rows: int | None = None,
    grams: Tensor | None = None,
) -> None:
    """One fused PSI-Adam step (or torch.optim.AdamW step with ``manifold=None``) over a list.

    Updates ``params``, ``exp_avgs`` (shaped like params), ``exp_avg_sqs`` (one scalar per group:
    shape ``(rows,)`` for ``"channel"``, ``(rows // block_rows,)`` for ``"block"``, ``()`` for
    ``"tensor"``; shaped like params for ``None``) and ``state_steps`` in place.
    ``weight_decay`` is decoupled (AdamW) and applies to Euclidean tensors only. ``grams``: as
    in :func:`psi_sgd_`.
    """
    if check:
        _check_dispatchable("psi_adam_", params=params, grads=grads, exp_avgs=exp_avgs,
                            exp_avg_sqs=exp_avg_sqs, state_steps=state_steps)
    _OPS.psi_adam_.default(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
        **_sphere_options(manifold, retraction, transport, max_grad_norm, block_rows),
        grad_scale=grad_scale,
        found_inf=found_inf,
        grams=grams,
    )


def _check_dispatchable(op: str, **lists: list[Tensor]) -> None:
    """Checks what the dispatcher acts on before any kernel runs: sparse tensors and tensors on
    another device than the first tensor would otherwise be routed to a wrong kernel or a vague
    error. The kernels check everything else."""
    first = next(iter(lists))
    device = lists[first][0].device if lists[first] else None
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise RuntimeError(f"{op}: {name}[{i}] is sparse ({t.layout}); "
                                   "dense tensors are needed")
            if t.device != device:
                raise RuntimeError(f"{op}: {name}[{i}] is on {t.device} but {first}[0] is on "
                                   f"{device}; all tensors of one call must share a device")


def _sphere_options(manifold, retraction, transport, max_grad_norm, block_rows=None) -> dict:
    """The PSI options as the ops take them: integer codes, 0.0 for no clipping, block_rows 1
    unless manifold is "block" (the kernels check that it divides every tensor's rows)."""
    return dict(block_rows=reference.op_block_rows(manifold, block_rows),
                manifold=_code(MANIFOLDS, manifold, "manifold"),
                retraction=_code(RETRACTIONS, retraction, "retraction"),
                transport=_code(TRANSPORTS, transport, "transport"),
                max_grad_norm=float(max_grad_norm or 0.0))


def _code(table: dict, value, name: str) -> int:
    try:
        return table[value]
    except (KeyError, TypeError):
        choices = ", ".join(repr(k) for k in table)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None


@torch.library.register_fake("psi_cuda::psi_sgd_")
def _psi_sgd_fake(params, grads, momentum_buffers, state_steps, *, lr, momentum, dampening,
                  nesterov, weight_decay, maximize, manifold, retraction, transport,
                  max_grad_norm, grad_scale=None, found_inf=None, block_rows=1, grams=None):
    torch._check(len(grads) == len(params), lambda: "psi_sgd_: params and grads differ in length")
    torch._check(len(state_steps) == len(params),
                 lambda: "psi_sgd_: params and state_steps differ in length")
    return None


# --- BNP ----------------------------------------------------------------------------------------


def bnp_update_stats_(input: Tensor, mean: Tensor, sqmean: Tensor, step: Tensor, *,
                      channel_dim: int, momentum: float, batches: Tensor | None = None,
                      check: bool = True) -> None:
    """Folds the per-channel batch mean and mean of squares of ``input`` (channels on
    ``channel_dim``) into the bias-corrected moving averages ``mean``/``sqmean``; ``step += 1``.
    One pass over ``input``; contiguous and channels-last inputs are read in place. An empty
    batch changes nothing; a batch whose sums are not finite changes nothing but ``batches``
    (float32 scalar, optional), which counts every non-empty batch, in the same launch.
    ``check=False`` skips the Python-side check (the kernels check every argument)."""
    if check:
        _check_dispatchable("bnp_update_stats_", input=[input], mean=[mean], sqmean=[sqmean],
                            step=[step], batches=[] if batches is None else [batches])
    _OPS.bnp_update_stats_.default(input, mean, sqmean, step, channel_dim=channel_dim,
                                   momentum=momentum, batches=batches)


def bnp_precondition_(weight_grads: list[Tensor], bias_grads: list[Tensor], means: list[Tensor],
                      sqmeans: list[Tensor], *, groups: list[int], eps: float) -> None:
    """Rewrites weight (and bias) gradients in place with the BNP formula. ``bias_grads`` is
    empty (the uncentered no-bias variant for every layer) or one per weight gradient."""
    _check_dispatchable("bnp_precondition_", weight_grads=weight_grads, bias_grads=bias_grads,
                        means=means, sqmeans=sqmeans)
    _OPS.bnp_precondition_.default(weight_grads, bias_grads, means, sqmeans,
                                   groups=list(groups), eps=eps)


def bnp_sgd_(weights: list[Tensor], biases: list[Tensor], weight_grads: list[Tensor],
             bias_grads: list[Tensor], weight_momentum_buffers: list[Tensor],
             bias_momentum_buffers: list[Tensor], state_steps: list[Tensor], means: list[Tensor],
             sqmeans: list[Tensor], *, groups: list[int], eps: float, lr: float,
             momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
             weight_decay: float = 0.0, maximize: bool = False,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
             check: bool = True) -> None:
    """BNP preconditioning fused with one ``torch.optim.SGD`` step of every weight and bias."""
    if check:
        _check_dispatchable("bnp_sgd_", weights=weights, biases=biases,
                            weight_grads=weight_grads,
                            bias_grads=bias_grads,
                            weight_momentum_buffers=weight_momentum_buffers,
                            bias_momentum_buffers=bias_momentum_buffers,
                            state_steps=state_steps, means=means, sqmeans=sqmeans)
    _OPS.bnp_sgd_.default(weights, biases, weight_grads, bias_grads,
                          weight_momentum_buffers, bias_momentum_buffers, state_steps,
                          means, sqmeans, groups=list(groups), eps=eps, lr=lr,
                          momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=maximize,
                          grad_scale=grad_scale, found_inf=found_inf)


@torch.library.register_fake("psi_cuda::bnp_update_stats_")
def _bnp_update_stats_fake(input, mean, sqmean, step, *, channel_dim, momentum, batches=None):
    return None


@torch.library.register_fake("psi_cuda::bnp_precondition_")
def _bnp_precondition_fake(weight_grads, bias_grads, means, sqmeans, *, groups, eps):
    torch._check(len(means) == len(weight_grads),
                 lambda: "bnp_precondition_: weight_grads and means differ in length")
    return None


@torch.library.register_fake("psi_cuda::bnp_sgd_")
def _bnp_sgd_fake(weights, biases, weight_grads, bias_grads, weight_momentum_buffers,
                  bias_momentum_buffers, state_steps, means, sqmeans, *, groups, eps, lr,
                  momentum, dampening, nesterov, weight_decay, maximize, grad_scale=None,
                  found_inf=None):
    torch._check(len(weight_grads) == len(weights),
                 lambda: "bnp_sgd_: weights and weight_grads differ in length")
    return None


@torch.library.custom_op("psi_cuda::bnp_cap_grads", mutates_args=())
def _bnp_cap_grads(weights: list[Tensor], weight_grads: list[Tensor], bias_grads: list[Tensor],
                   means: list[Tensor], sqmeans: list[Tensor], groups: list[int], eps: float,
                   lr: float, max_update: float, floor: float,
                   grad_scale: Tensor | None) -> list[Tensor]:
    # An op of its own (torch ops inside, no C++ kernel) so that torch.compile treats it as one
    # opaque call: a compiled step then computes the same factors as an eager one, bit for bit.
    caps = reference.bnp_update_caps(weights, weight_grads, bias_grads, means, sqmeans,
                                     groups=groups, eps=eps, lr=lr, max_update=max_update,
                                     floor=floor, grad_scale=grad_scale)
    return ([reference.scale_rows(g, c) for g, c in zip(weight_grads, caps)]
            + [reference.scale_rows(g, c) for g, c in zip(bias_grads, caps)])


@_bnp_cap_grads.register_fake
def _bnp_cap_grads_fake(weights, weight_grads, bias_grads, means, sqmeans, groups, eps, lr,
                        max_update, floor, grad_scale):
    return [torch.empty_like(g) for g in list(weight_grads) + list(bias_grads)]


def bnp_cap_grads(weights: list[Tensor], weight_grads: list[Tensor], bias_grads: list[Tensor],
                  means: list[Tensor], sqmeans: list[Tensor], *, groups: list[int], eps: float,
                  lr: float, max_update: float, floor: float,
                  grad_scale: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Copies of the weight and bias gradients with each unit (output channel) scaled by its
    step-cap factor ``min(1, max_update * max(|W~_o|, floor) / (lr * |G~_o|))``
    (``reference.bnp_update_caps``; BNPSGD's ``max_update``). ``bias_grads`` is empty or one per
    weight gradient. Returns ``(weight_grads, bias_grads)``."""
    out = _bnp_cap_grads(list(weights), list(weight_grads), list(bias_grads), list(means),
                         list(sqmeans), list(groups), float(eps), float(lr), float(max_update),
                         float(floor), grad_scale)
    n = len(weight_grads)
    return out[:n], out[n:]


@torch.library.register_fake("psi_cuda::psi_adam_")
def _psi_adam_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                   weight_decay, maximize, manifold, retraction, transport, max_grad_norm,
                   grad_scale=None, found_inf=None, block_rows=1, grams=None):
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        torch._check(len(lst) == len(params),
                     lambda name=name: f"psi_adam_: params and {name} differ in length")
    return None
