"""Parameter groups for PSISGD: find the scale-invariant weights of a model (docs/ALGORITHMS.md 1).

``param_groups(model, lr)`` reads the model's forward with ``torch.fx``, finds every Linear/Conv
weight whose output goes straight into a normalization layer, decides from the rule table in its
docstring whether that weight is scale-invariant per output channel (``manifold="channel"``), as
a whole (``manifold="tensor"``) or not at all (``manifold=None``), and returns param groups for
``psi_cuda.optim.PSISGD``.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_FEATURE_NORMS = (nn.LayerNorm, nn.RMSNorm)
# Modules allowed between a layer and its norm: they multiply each element by a factor that does
# not depend on the layer's weight (1, or a dropout mask / (1 - p)), so they commute with scaling.
_PASS_THROUGH = (nn.Identity, nn.Dropout)
# Every normalization whose eps is shrunk for verification (see _output_changes).
_NORMS = _BATCH_NORMS + _INSTANCE_NORMS + _FEATURE_NORMS + (nn.GroupNorm,)

# (dtype, eps given to every normalization, tolerance on the relative output change) for the
# numerical check, tried in this order: float64 first, float32 when the model cannot run in it.
_VERIFY_PRECISIONS = ((torch.float64, 1e-12, 1e-7), (torch.float32, 1e-8, 1e-4))
# The random positive factors of the numerical check are drawn log-uniformly from [1/2, 2].
_LOG_MAX_FACTOR = math.log(2.0)

_RESERVED_KEYS = ("params", "manifold")

SampleInput = Tensor | tuple


def param_groups(model: nn.Module, lr: float, psi_lr: float | None = None,
                 weight_decay: float = 0.0, verify: bool = False, *,
                 sample_input: SampleInput | None = None,
                 **defaults: Any) -> list[dict[str, Any]]:
    r"""Param groups for :class:`psi_cuda.optim.PSISGD`, scale-invariant weights on PSI manifolds.

    A weight is scale-invariant when the model output does not change if it is multiplied by
    positive factors (docs/ALGORITHMS.md section 1). Each trainable parameter goes to exactly one
    group:

    * ``manifold="channel"``: ``W`` of a layer whose output feeds a per-channel normalization;
      ``L(c_i w_i) = L(w_i)`` for every row ``w_i = W.view(out, -1)[i]`` and ``c_i > 0``.
    * ``manifold="block"`` with ``block_rows = C / G``: ``W`` of a bias-free conv whose output
      feeds GroupNorm(G, C) with several channels per group; each block of ``C / G``
      consecutive rows is invariant on its own (one group per distinct ``block_rows``).
    * ``manifold="tensor"``: ``W`` of a layer whose output feeds a normalization over several
      channels at once; only ``L(c W) = L(W)`` for one common ``c > 0`` holds.
    * ``manifold=None``: everything else (norm affine parameters, biases, classifier, embeddings,
      and every weight the rules below do not cover).

    Rules, for a layer ``P`` whose output goes to a normalization ``N`` (``out`` = output
    features/channels of ``P``, which must equal ``N``'s number of features/channels):

    ============================  =================================================  ===========
    ``P``                         ``N``                                              manifold
    ============================  =================================================  ===========
    Linear                        BatchNorm1d, SyncBatchNorm                         ``channel``
    Linear without bias           LayerNorm / RMSNorm with ``normalized_shape ==     ``tensor``
                                  (out,)``
    Conv1d/2d/3d                  BatchNorm*, SyncBatchNorm, InstanceNorm*,          ``channel``
                                  GroupNorm with ``num_groups == num_channels``
    Conv1d/2d/3d without bias     GroupNorm with ``num_groups < num_channels``       ``block``
                                  (``block_rows = num_channels // num_groups``)
    Linear without bias, output   LayerNorm / RMSNorm with ``normalized_shape ==     ``block``
    split into heads of D         (D,)`` (per-head QK-norm; ``block_rows = D``)
    ConvTranspose1d/2d/3d         same per-channel norms as Conv                     ``tensor``
    ConvTranspose without bias    GroupNorm with ``num_groups < num_channels``       ``tensor``
    ============================  =================================================  ===========

    A bias in front of a per-channel normalization is removed by its mean subtraction (zero
    gradient) and stays Euclidean; in front of LayerNorm/RMSNorm/multi-channel GroupNorm it breaks
    the invariance, hence "without bias". A ConvTranspose weight is ``(in, out/groups, k...)``: its
    output channels lie along dim 1, not along the dim-0 rows that ``manifold="channel"`` moves on
    their own spheres, so only the common-factor case of its per-channel invariance is used.
    Layer and norm types are matched exactly (no subclasses); a parametrized weight (weight_norm,
    spectral_norm) is not a plain ``weight`` parameter and stays Euclidean.

    How "goes to" is decided: ``torch.fx.symbolic_trace(model)``; the layer's output node must
    have exactly one user, which is the norm, either directly or through a chain of
    ``nn.Identity`` / ``nn.Dropout`` modules (each again with one user) and nothing else. So a
    residual add, an activation, a reshape or any other use of the output in between or besides
    breaks the edge. The one reshape allowed is the split of a bias-free Linear's output into
    heads: a ``view``/``reshape``/``unflatten(-1, ...)`` whose last size D divides the features,
    then only transposes/permutes that provably keep D last (and ``contiguous``), then the norm
    over (D,). Conservatively Euclidean as well: a layer or norm module called more than
    once, a weight registered under several names (shared/tied), a weight read directly in
    ``forward`` (``self.fc.weight``). When tracing fails (data-dependent control flow, ...), a
    warning says why and the heuristic fallback pairs each Linear/Conv with the module that
    immediately follows it in ``model.named_modules()`` order, by the same table, without knowing
    whether the forward really connects them; use ``verify=True`` then.

    The invariance holds in training mode, where BatchNorm/InstanceNorm use the statistics of the
    current batch; a BatchNorm kept in eval mode during training (frozen BN) is not invariant, and
    a Linear output must have its features at dim 1 (``(N, features)``) for BatchNorm1d. Neither
    is visible in the graph; ``verify=True`` measures both.

    Args:
        model: the model. It is never changed: it is traced (its forward's Python code runs
            once on torch.fx proxies), and ``verify`` runs a deep copy.
        lr: learning rate of the Euclidean group (and of the PSI groups when ``psi_lr`` is None).
        psi_lr: learning rate of the ``channel``/``tensor`` groups (radians per step, about).
        weight_decay: weight decay of the Euclidean group; PSI groups get 0 (it has no meaning on
            the quotient).
        verify: check every candidate numerically on ``sample_input`` and keep as Euclidean (with
            a warning naming it and its measured relative output change) every one that fails.
            A deep copy of the model, converted to float64 (float32 if it cannot run in float64),
            in training mode, with the ``eps`` of every normalization shrunk so the exact
            invariance is what is measured, is run once as is and once per candidate with the
            candidate multiplied by random positive factors in ``[1/2, 2]`` (one per row for
            ``channel``, one for ``tensor``); the candidate passes when
            ``|y' - y| <= tol * |y|`` over all floating-point outputs (``tol`` 1e-7 in float64,
            1e-4 in float32). Dropout draws the same masks in every run. ``model``, its
            parameters, buffers and training flags, and the global RNG state are left untouched.
        sample_input: (keyword only, needed by ``verify``) a tensor, or a tuple of positional
            arguments, for ``model(...)``; BatchNorm needs more than one sample per channel.
        **defaults: other options put in every group (``momentum=0.9``, ``nesterov=True``, ...).

    Returns:
        A list of param-group dicts, in this order and omitting empty ones:
        ``{"params", "manifold": "channel", "lr": psi_lr or lr, "weight_decay": 0.0, **defaults}``,
        the same with ``"manifold": "tensor"``, and
        ``{"params", "manifold": None, "lr": lr, "weight_decay": weight_decay, **defaults}``.
        Only parameters with ``requires_grad``, each once, in ``model.parameters()`` order.

    Example::

        opt = psi_cuda.optim.PSISGD(psi_cuda.param_groups(model, lr=0.1, weight_decay=5e-4,
                                                          momentum=0.9), lr=0.1)
    """
    reserved = [key for key in _RESERVED_KEYS if key in defaults]
    if reserved:
        raise TypeError(f"param_groups() sets {reserved} itself; do not pass them")
    if verify and sample_input is None:
        raise ValueError("param_groups(verify=True) needs sample_input= (a tensor or a tuple of "
                         "positional arguments for model(...))")

    try:
        candidates = _traced_candidates(model)
    except Exception as exc:  # tracing can fail in many ways (TraceError, TypeError, ...)
        warnings.warn(
            f"psi_cuda.param_groups: torch.fx could not trace {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); falling back to module registration order (a "
            "Linear/Conv followed in model.named_modules() by a matching normalization). This is "
            "a heuristic: the forward may not connect them that way. Pass verify=True, "
            "sample_input=... to check the groups numerically.", stacklevel=2)
        candidates = _registration_candidates(model)

    names_per_tensor = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    candidates = {name: candidates[name] for name, p in trainable
                  if name in candidates and names_per_tensor[id(p)] == 1}

    if verify and candidates:
        changes, tol = _verify(model, candidates, sample_input)
        failed = {name: change for name, change in changes.items() if not change <= tol}
        if failed:
            listing = ", ".join(f"{name} ({candidates[name]}: relative output change {change:.3g})"
                                for name, change in failed.items())
            warnings.warn(f"psi_cuda.param_groups(verify=True): {len(failed)} candidate(s) are "
                          f"not scale-invariant on sample_input (tolerance {tol:g}) and stay "
                          f"Euclidean: {listing}", stacklevel=2)
            candidates = {name: m for name, m in candidates.items() if name not in failed}

    # No "param_names" key: torch.optim would then refuse any later add_param_group without it.
    psi = dict(lr=lr if psi_lr is None else psi_lr, weight_decay=0.0)
    groups = [
        {"params": [p for name, p in trainable if candidates.get(name) == manifold],
         "manifold": manifold, **psi, **defaults}
        for manifold in ("channel", "tensor")
    ]
    # block groups ("block:<rows>" candidates), one group per block_rows
    for rows in sorted({r for r in map(_block_rows, candidates.values()) if r is not None}):
        groups.append({"params": [p for name, p in trainable
                                  if candidates.get(name) == f"block:{rows}"],
                       "manifold": "block", "block_rows": rows, **psi, **defaults})
    groups.append({"params": [p for name, p in trainable if name not in candidates],
                   "manifold": None, "lr": lr, "weight_decay": weight_decay, **defaults})
    return [group for group in groups if group["params"]]


def _block_rows(candidate: str) -> int | None:
    """The block_rows of a ``"block:<rows>"`` candidate; None for the other manifolds."""
    return int(candidate[len("block:"):]) if candidate.startswith("block:") else None


def _manifold_of(layer: nn.Module, norm: nn.Module) -> str | None:
    """The manifold of ``layer.weight`` when ``layer``'s output goes straight into ``norm``
    (the rule table of :func:`param_groups`), or None when it is not scale-invariant."""
    kind, norm_kind = type(layer), type(norm)
    if kind in _LINEAR:
        out, per_channel_norms = layer.out_features, _BATCH_NORMS
    elif kind in _CONV + _CONV_TRANSPOSE:
        out, per_channel_norms = layer.out_channels, _BATCH_NORMS + _INSTANCE_NORMS
    else:
        return None
    if (norm_kind in per_channel_norms and norm.num_features == out) or (
            norm_kind is nn.GroupNorm and kind not in _LINEAR
            and norm.num_channels == norm.num_groups == out):
        # Per-channel invariance; a ConvTranspose has its output channels along dim 1 of its
        # weight, so only the common factor of the whole tensor is a group PSISGD can move.
        return "tensor" if kind in _CONV_TRANSPOSE else "channel"
    if layer.bias is not None:
        return None
    if norm_kind is nn.GroupNorm and kind not in _LINEAR and norm.num_channels == out:
        # each GroupNorm group of C / G consecutive output channels is invariant on its own: a
        # block group (docs/ALGORITHMS.md 1.2b); a ConvTranspose's channels lie along dim 1
        if kind in _CONV_TRANSPOSE:
            return "tensor"
        return f"block:{out // norm.num_groups}"
    if norm_kind in _FEATURE_NORMS and kind in _LINEAR and tuple(norm.normalized_shape) == (out,):
        return "tensor"
    return None


def _traced_candidates(model: nn.Module) -> dict[str, str]:
    """{weight name: manifold} from the graph of ``torch.fx.symbolic_trace(model)``."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    read_directly = {node.target for node in graph.nodes if node.op == "get_attr"}
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        norm_node = _norm_fed_by(node, modules)
        if norm_node is None:  # per-head: a bias-free Linear viewed as (..., H, D), norm over D
            norm_node, manifold = _heads_norm_fed_by(node, modules)
        else:
            manifold = None
        if norm_node is None or calls[norm_node.target] != 1:
            continue
        if manifold is None:
            manifold = _manifold_of(modules[node.target], modules[norm_node.target])
        name = f"{node.target}.weight"
        if manifold is not None and name not in read_directly:
            found[name] = manifold
    return found


def _norm_fed_by(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The call_module node that is the only consumer of ``node``'s output, through a chain of
    pass-through modules each with a single user; None if the chain branches or ends elsewhere."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or user.all_input_nodes != [node]:
            return None
        if type(modules[user.target]) not in _PASS_THROUGH:
            return user
        node = user
    return None


_SPLITS = ("view", "reshape", "unflatten")


def _heads_norm_fed_by(node: torch.fx.Node, modules: dict[str, nn.Module]):
    """(norm node, manifold) when the output of the bias-free Linear ``node`` (features last,
    contiguous) is split into heads by a view/reshape/unflatten whose last size D divides the
    features, kept with D last through transposes/permutes/contiguous (and Identity/Dropout), and
    fed to a LayerNorm/RMSNorm over exactly (D,): each head's D consecutive rows of the weight are
    then scale invariant on their own (``"block:D"``; ``"tensor"`` if D is all the features).
    (None, None) for anything else."""
    layer = modules[node.target]
    if type(layer) not in _LINEAR or layer.bias is not None:
        return None, None
    out, d, rank = layer.out_features, None, None
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not user.args or user.args[0] is not node:
            return None, None
        if user.op == "call_method" and user.target in _SPLITS and d is None:
            if user.target == "unflatten":
                dim, sizes = user.args[1], user.args[2]
                if dim != -1 or not isinstance(sizes, (tuple, list)):
                    return None, None
                shape = list(sizes)
            else:
                shape = list(user.args[1]) if len(user.args) == 2 and isinstance(
                    user.args[1], (tuple, list)) else list(user.args[1:])
            last = shape[-1] if shape else None
            if not isinstance(last, int) or last <= 0 or out % last:
                return None, None
            d = last
            rank = len(shape) if user.target != "unflatten" else None
        elif user.op == "call_method" and user.target in ("transpose", "permute", "contiguous"):
            if d is None:
                return None, None
            if user.target == "contiguous":
                pass
            elif rank is None:  # after unflatten the rank is unknown: only negative dims other
                dims = user.args[1:3]  # than -1 provably leave D last
                if user.target != "transpose" or not all(isinstance(x, int) and -1 > x
                                                         for x in dims):
                    return None, None
            elif user.target == "transpose":
                dims = [x % rank if isinstance(x, int) else None for x in user.args[1:3]]
                if None in dims or rank - 1 in dims:
                    return None, None
            else:
                perm = user.args[1] if len(user.args) == 2 else user.args[1:]
                if not perm or not isinstance(perm[-1], int) or perm[-1] % rank != rank - 1:
                    return None, None
        elif user.op == "call_module" and user.all_input_nodes == [node]:
            kind = type(modules[user.target])
            if kind in _PASS_THROUGH:
                pass
            elif kind in _FEATURE_NORMS and d is not None:
                if tuple(modules[user.target].normalized_shape) != (d,):
                    return None, None
                return user, ("tensor" if d == out else f"block:{d}")
            else:
                return None, None
        else:
            return None, None
        node = user
    return None, None


def _registration_candidates(model: nn.Module) -> dict[str, str]:
    """{weight name: manifold} pairing each module with the next one in ``named_modules()``."""
    named = list(model.named_modules())
    found = {}
    for (name, layer), (_, following) in zip(named, named[1:]):
        manifold = _manifold_of(layer, following)
        if manifold is not None:
            found[f"{name}.weight"] = manifold
    return found


def _verify(model: nn.Module, candidates: dict[str, str],
            sample_input: SampleInput) -> tuple[dict[str, float], float]:
    """({name: relative output change when rescaled}, tolerance), in float64 when the model runs
    in float64, else in float32."""
    args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
    (dtype, eps, tol), (fallback_dtype, fallback_eps, fallback_tol) = _VERIFY_PRECISIONS
    try:
        return _output_changes(model, candidates, args, dtype, eps), tol
    except RuntimeError:  # e.g. a float32 tensor made inside forward meets float64 weights
        return _output_changes(model, candidates, args, fallback_dtype, fallback_eps), fallback_tol


def _output_changes(model: nn.Module, candidates: dict[str, str], args: tuple,
                    dtype: torch.dtype, eps: float) -> dict[str, float]:
    """Relative change of the output of a ``dtype`` copy of ``model`` (normalization eps set to
    ``eps``, training mode) when each candidate alone is multiplied by random positive factors."""
    work = copy.deepcopy(model).to(dtype)
    if not work.training:  # keep per-module modes (a frozen BN) when the model is training
        work.train()
    for module in work.modules():
        if type(module) in _NORMS:
            module.eps = eps
    params = dict(work.named_parameters())
    inputs = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a
                   for a in args)
    factors_rng = torch.Generator().manual_seed(0)
    changes = {}
    with torch.no_grad():
        reference = _run(work, inputs)
        for name, manifold in candidates.items():
            p = params[name]
            rows = 1 if manifold == "channel" else _block_rows(manifold)  # None: one factor
            shape = () if rows is None else (p.shape[0] // rows,) + (1,) * (p.dim() - 1)
            factors = torch.empty(shape, dtype=dtype).uniform_(
                -_LOG_MAX_FACTOR, _LOG_MAX_FACTOR, generator=factors_rng).exp_()
            if rows is not None:  # one factor per block of rows
                factors = factors.repeat_interleave(rows, dim=0)
            saved = p.clone()
            p.mul_(factors.to(p.device))
            changes[name] = _relative_change(_run(work, inputs), reference)
            p.copy_(saved)
    return changes


def _run(model: nn.Module, inputs: tuple) -> list[Tensor]:
    """The floating-point outputs of ``model(*inputs)``. Every call starts from the current RNG
    state and restores it afterwards, so all calls draw the same random numbers (dropout masks)
    and the global RNG state is left as it was."""
    tensors = [*model.parameters(), *model.buffers(), *(a for a in inputs if torch.is_tensor(a))]
    cuda_devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        outputs = _float_leaves(model(*inputs))
    if not outputs:
        raise ValueError("param_groups(verify=True): the model output holds no floating-point "
                         "tensor to compare")
    return outputs


def _float_leaves(output: Any) -> list[Tensor]:
    """The floating-point tensors in a (nested) tensor / tuple / list / dict output."""
    if torch.is_tensor(output):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in _float_leaves(item)]
    return []


def _relative_change(outputs: list[Tensor], reference: list[Tensor]) -> float:
    """``|outputs - reference| / |reference|`` over all tensors together (inf if the reference is
    zero and the outputs are not; NaN propagates so a non-finite output fails the check)."""
    diff = math.sqrt(sum(float((o.double() - r.double()).square().sum())
                         for o, r in zip(outputs, reference)))
    norm = math.sqrt(sum(float(r.double().square().sum()) for r in reference))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm
