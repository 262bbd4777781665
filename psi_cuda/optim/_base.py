"""The optimizer skeleton: ``FusedOptimizer.step`` is written once here. An optimizer names the
state it keeps, makes it, and says which op it calls with which options (docs/ARCHITECTURE.md,
"adding an optimizer"); this module does the rest: building the groups (from a model or from
params), the option and gradient checks made before any write, grouping by device and dtype,
master weights, GradScaler hand-off, sharded tensor groups, and a bit-for-bit
``load_state_dict``; and it keeps each group's op calls from one step to the next (``_Plan``)
while nothing they depend on changes."""
from __future__ import annotations

import warnings
from functools import partial
from itertools import chain
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import distributed, ops, reference
from ..groups import param_groups
from ._amp import (as_real, check_capture, check_flag, laid_out_like, step_target,
                   steppable, uses_master, write_back)

BACKENDS = ops.BACKENDS
PSI_MANIFOLDS = reference.PSI_MANIFOLDS
PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)  # Euclidean groups only


class _Required:
    """The default of ``manifold``: a plain parameter list must say what its groups are."""

    def __repr__(self) -> str:
        return "<required>"

    def __reduce__(self):  # pickle and deepcopy keep the one instance
        return "REQUIRED"


REQUIRED = _Required()


class FusedOptimizer(Optimizer):
    """Base of PSISGD and PSIAdam (BNPSGD builds on PSISGD).

    A subclass sets ``name``, ``op`` (the name of its function in ``psi_cuda.ops`` and in
    ``psi_cuda.reference``; both take ``(params, grads, *state lists, state_steps)``) and
    ``solve`` (a ``distributed.GroupSolve``: the step of a tensor group from its Gram sums, for
    FSDP2-sharded tensor groups), and implements:

    * ``_check_options(group, where)``: its own options; ``ValueError`` naming the key.
    * ``_state_keys(p, group)``: the names of the state lists it passes to ``op`` after the
      gradients, in order (an empty list is passed for a key it returns ``None`` for);
    * ``_init_state(p, group, state)``: makes the missing entries of ``state``, the state of
      ``p`` (``step_counter``, ``state_like``, ...);
    * ``_op_options(group, weight_decay)``: the op's keyword options for the group.
    """

    name = "FusedOptimizer"
    op = ""
    solve: distributed.GroupSolve | None = None
    # GradScaler hands over grad_scale/found_inf instead of unscaling: the kernels unscale and
    # skip the step on inf/NaN.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, backend: str, model_options: dict):
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {BACKENDS}; got {backend!r}")
        self.backend = backend
        self._warned_decay = False
        params = self._groups_from(params, defaults, model_options)
        super().__init__(params, defaults)

    def _groups_from(self, params, defaults: dict, model_options: dict):
        """``params`` as torch.optim takes them; a model becomes ``psi_cuda.param_groups(model)``
        with ``model_options`` (psi_lr, verify, sample_input) passed through."""
        if isinstance(params, nn.Module):
            if defaults["manifold"] is not REQUIRED:
                raise TypeError(f"{self.name}(model, manifold=...): with a model the groups and "
                                "their manifolds come from psi_cuda.param_groups(model); pass "
                                "the parameters instead to give one manifold to all")
            return param_groups(params, defaults["lr"], weight_decay=defaults["weight_decay"],
                                **model_options)
        given = sorted(k for k, v in model_options.items() if v not in (None, False))
        if given:
            raise TypeError(f"{self.name}: {', '.join(given)} apply when the first argument is "
                            "the model (an nn.Module); got parameters. Pass the model, or give "
                            "psi_cuda.param_groups(model, ...) those options")
        return params

    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        where = f"{self.name}: param_groups[{index}]"
        if not isinstance(param_group, dict):
            raise TypeError(f"{where} must be a dict; got {type(param_group).__name__}")
        if "manifold" not in param_group and self.defaults.get("manifold") is REQUIRED:
            raise ValueError(
                f"{where} has no 'manifold' and {self.name} was not given one. A plain parameter "
                "list does not say which weights are scale invariant: pass the model "
                f"({self.name}(model, lr=...)) or psi_cuda.param_groups(model, lr) to find them, "
                "or say it: manifold='channel' (every row of each tensor is scale invariant, "
                "e.g. conv weights feeding BatchNorm), 'tensor' (each whole tensor), or None "
                "(Euclidean, torch.optim behaviour), as a keyword or per group")
        if param_group.get("manifold") == "euclidean":
            param_group = {**param_group, "manifold": None}
        self._drop_plans()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_options(group, where)
        check_params(group, where, self.name)

    def _check_options(self, group: dict, where: str) -> None:
        raise NotImplementedError

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_warned_decay", False)

    def _use_fused(self, device: torch.device) -> bool:
        return ops.use_fused(self.backend, device, self.name)

    # -------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the
        loss."""
        loss, grad_scale, found_inf, plans = self._begin_step(closure)
        check_capture(self, self._needs_state)
        found_inf = self._skip_nonfinite(found_inf)
        for gi, group in enumerate(self.param_groups):
            if plans[gi] is not None:
                self._step_plan(group, gi, plans[gi], grad_scale, found_inf)
                continue
            writebacks = []
            self._step_group(group, gi, grad_scale, found_inf, writebacks)
            write_back(writebacks)
        if not torch.compiler.is_compiling() and self.__dict__.get("_plans"):
            # what the plans' state check compares with at the next step
            self._plan_states = (self.state, list(self.state.values()))
        return loss

    def _step_group(self, group: dict, index: int, grad_scale, found_inf, writebacks: list,
                    params=None, manifold: Any = REQUIRED) -> None:
        """Steps ``params`` (default: the group's) of ``group`` with the optimizer's op, one call
        per (device, dtype)."""
        whole = params is None and manifold is REQUIRED  # the group as it is: kept as a plan
        manifold = group["manifold"] if manifold is REQUIRED else manifold
        weight_decay = self._weight_decay(group, index, manifold)
        copies = len(writebacks)
        buckets = self._lists(group, group["params"] if params is None else params, writebacks)
        if whole and len(writebacks) == copies and not torch.compiler.is_compiling():
            self._keep_plan(group, index, buckets)
        options = self._op_options(group, weight_decay)
        if manifold == "block":
            options["block_rows"] = group["block_rows"]
        for (device, _, _), lists in buckets.items():
            # _begin_step made the fused op's Python-side check: skip it.
            fused = self._use_fused(device)
            fn = (partial(getattr(ops, self.op), check=False) if fused
                  else getattr(reference, self.op))
            # DTensor parameters (FSDP2): local shards; groups cut across ranks all-reduce sums.
            distributed.step_call(fn, lists, manifold=manifold, solve=self.solve,
                                  grams_fn=partial(ops.psi_grams, check=False) if fused else None,
                                  grad_scale=on_device(grad_scale, device),
                                  found_inf=on_device(found_inf, device), **options)

    def _lists(self, group: dict, params, writebacks: list) -> dict:
        """The op's lists (params, grads, *state lists, steps) of ``params`` that have a
        gradient, by (device, dtype of what the op steps: the master copy where there is one,
        occurrence: a parameter listed twice goes to a second call); makes missing state."""
        buckets: dict = {}
        seen: dict = {}  # a parameter listed k times is stepped k times, in k calls (as torch)
        for p in params:
            if p.grad is None:
                continue
            occurrence = seen[id(p)] = seen.get(id(p), -1) + 1
            state = self.state[p]
            real = as_real(p)  # complex parameters (Euclidean groups): their real views
            self._init_state(real, group, state)
            target, grad = step_target(real, state, group, writebacks, as_real(p.grad))
            keys = self._state_keys(p, group)
            key = (p.device, target.dtype, occurrence)
            lists = buckets.get(key)
            if lists is None:
                lists = buckets[key] = [[] for _ in range(len(keys) + 3)]
            lists[0].append(target)
            lists[1].append(grad)
            for i, key in enumerate(keys):
                if key is not None:
                    lists[2 + i].append(state[key])
            lists[-1].append(state["step"])
        return buckets

    def _begin_step(self, closure):
        """Runs the closure, checks every option set not checked yet and every gradient before
        anything is touched (a bad one must leave everything unchanged) and returns (loss,
        grad_scale, found_inf, plans): per group the ``_Plan`` to step it with (its gradients
        checked), or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_changed_options()
        plans = self._ready_plans()
        for gi, group in enumerate(self.param_groups):
            if plans[gi] is not None:
                continue
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    where = f"{self.name}: param_groups[{gi}]['params'][{pi}]"
                    check_grad(p, where, self.name)
                    distributed.check_param(p, group.get("manifold"), where, self.name)
        return loss, getattr(self, "grad_scale", None), getattr(self, "found_inf", None), plans

    # -------------------------------------------------------------------- plans

    def _check_changed_options(self) -> None:
        """``_check_options`` of every group whose options changed since they were last checked
        (at ``add_param_group``, ``load_state_dict`` or a step): a ValueError naming the key
        before anything is written."""
        if torch.compiler.is_compiling():
            return
        checked = self.__dict__.setdefault("_checked_options", {})
        for gi, group in enumerate(self.param_groups):
            seen = checked.get(gi)
            if seen is not None and seen[0] is group and _same_options(seen[1], group):
                continue
            self._check_options(group, f"{self.name}: param_groups[{gi}]")
            checked[gi] = (group, _options_of(group))

    def _drop_plans(self) -> None:
        self.__dict__.pop("_plans", None)
        self.__dict__.pop("_checked_options", None)

    def _plan_key(self, group: dict) -> tuple:
        """What a group's plan depends on besides its tensors: the options that decide its
        state and op lists (the op's scalar options are read at every step)."""
        first = group["params"][0] if group["params"] else None
        return (self.backend, group.get("manifold"), group.get("block_rows"),
                group.get("master_weights"), tuple(self._state_keys(first, group)))

    def _keep_plan(self, group: dict, index: int, buckets: dict) -> None:
        """Keeps the op lists ``_lists`` just made for the whole of ``group`` as its plan, when
        they are the group's own tensors: plain tensors (no DTensor, no complex view), each
        listed once, stepped in place (no master copy or contiguous copy)."""
        plans = self.__dict__.setdefault("_plans", {})
        plans.pop(index, None)
        plan = _Plan.make(self, group, buckets)
        if plan is not None:
            plans[index] = plan

    def _ready_plans(self) -> list:
        """Per group its plan, checked for this step (``_Plan.ready``), or None; plans that no
        longer hold are dropped."""
        plans = self.__dict__.get("_plans")
        ready = [None] * len(self.param_groups)
        if not plans or torch.compiler.is_compiling():
            return ready
        states, values = self.__dict__.get("_plan_states", (None, ()))
        if (states is not self.state or len(values) != len(self.state)
                or not all(map(is_, self.state.values(), values))):
            plans.clear()  # state added, removed or replaced (load_state_dict, state.clear())
            return ready
        for gi, group in enumerate(self.param_groups):
            plan = plans.get(gi)
            if plan is None:
                continue
            if plan.ready(self, group):
                ready[gi] = plan
            else:
                del plans[gi]
        return ready

    def _step_plan(self, group: dict, index: int, plan: "_Plan", grad_scale, found_inf) -> None:
        """``_step_group`` with the lists of ``plan``: the same op calls on the same lists."""
        manifold = group["manifold"]
        options = self._op_options(group, self._weight_decay(group, index, manifold))
        if manifold == "block":
            options["block_rows"] = group["block_rows"]
        for device, fn, lists in plan.calls:
            fn(*lists, manifold=manifold, grad_scale=on_device(grad_scale, device),
               found_inf=on_device(found_inf, device), **options)

    def _skip_nonfinite(self, found_inf):
        """With ``skip_nonfinite=True`` (docs/ALGORITHMS.md 6.6): a 0/1 tensor saying whether a
        gradient of such a group holds an inf or a NaN, or'ed with GradScaler's found_inf; the
        ops then skip the whole step (every group), as under GradScaler, and the per-parameter
        counters ``state['nonfinite_skips']`` count it. Decided on the device: no host sync."""
        checked = [g for g in self.param_groups if g.get("skip_nonfinite")]
        if not checked:
            return found_inf
        grads: dict = {}
        for group in checked:
            for p in group["params"]:
                if p.grad is not None and p.grad.numel() > 0:
                    grads.setdefault(p.grad.device, []).append(as_real(p.grad))
        found = None
        for device, gs in grads.items():
            # the inf-norm of each gradient: inf or NaN exactly when an entry is (no overflow)
            f = (~torch.isfinite(torch.stack(torch._foreach_norm(gs, float("inf"))))).any()
            f = f.to(torch.float32)
            found = f if found is None else torch.maximum(found, f.to(found.device))
        if found is None:
            return found_inf
        if found_inf is not None:
            found = torch.maximum(found_inf.to(found.device, torch.float32).reshape(()), found)
        counters: dict = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    c = self.state[p].get("nonfinite_skips")
                    if c is None:
                        c = self.state[p]["nonfinite_skips"] = torch.zeros(
                            (), dtype=torch.float32, device=p.device)
                    counters.setdefault(c.device, []).append(c)
        for device, cs in counters.items():
            torch._foreach_add_(cs, found.to(device))
        return found

    def nonfinite_skips(self) -> int:
        """How many steps ``skip_nonfinite=True`` skipped (the largest count over the
        parameters; a host sync)."""
        counts = [int(st["nonfinite_skips"].item()) for st in self.state.values()
                  if "nonfinite_skips" in st]
        return max(counts, default=0)

    def _weight_decay(self, group: dict, index: int, manifold) -> float:
        """The group's weight decay; PSI groups ignore it (it only changes the representative),
        with a warning the first time."""
        if manifold is None:
            return group["weight_decay"]
        # Only eager steps warn: dynamo cannot trace warnings.warn (a graph break).
        if group["weight_decay"] != 0 and not self._warned_decay \
                and not torch.compiler.is_compiling():
            warnings.warn(f"{self.name}: weight_decay has no meaning on the PSI manifold and is "
                          f"ignored for param_groups[{index}] (manifold={manifold!r})",
                          stacklevel=4)
            self._warned_decay = True
        return 0.0

    # -------------------------------------------------------------------- state

    def _state_keys(self, p: Tensor, group: dict) -> list:
        raise NotImplementedError

    def _init_state(self, p: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _op_options(self, group: dict, weight_decay: float) -> dict:
        raise NotImplementedError

    def _needs_state(self, p: Tensor, group: dict) -> bool:
        """Whether the next step would create state for ``p`` (the pre-capture check)."""
        state = self.state.get(p, {})
        keys = ["step"] + [k for k in self._state_keys(p, group) if k is not None]
        if any(g.get("skip_nonfinite") for g in self.param_groups):
            keys.append("nonfinite_skips")
        if uses_master(p, group):
            keys.append("master")
        return any(k not in state for k in keys)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads state; unlike torch's default it keeps the state's own dtype (fp32 state for
        fp16/bf16 params), lays state shaped like a param out like it, and keeps per-group
        state (one value per row) as it is, so a resume is bit for bit. A state dict of another
        optimizer, or of one over other shapes, raises ``ValueError`` before anything changes;
        a ``step`` saved as a number (older torch optimizers) becomes the tensor counter."""
        self._check_loadable(state_dict)
        self._drop_plans()
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            state = self.state[p]
            dtype = reference.opmath_dtype(p.dtype)
            for key, value in saved.items():
                if key == "step":
                    state[key] = torch.as_tensor(value).to(device=p.device,
                                                           dtype=torch.float32).clone()
                elif not torch.is_tensor(value):
                    continue
                elif value.shape == p.shape:
                    state[key] = torch.empty_like(p, dtype=dtype,
                                                  memory_format=torch.preserve_format)
                    state[key].copy_(value)
                else:
                    state[key] = value.to(device=p.device, dtype=dtype).clone().contiguous()

    def _check_loadable(self, state_dict: dict) -> None:
        """The checks of ``load_state_dict`` made before anything is written: every saved group
        has this optimizer's options, valid values, and state entries of the shapes this
        optimizer would make for the parameter it is loaded into."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{self.name}.load_state_dict: expected a dict with 'state' and "
                             "'param_groups' (from state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{self.name}.load_state_dict: the state has {len(saved_groups)} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"{self.name}.load_state_dict: param_groups[{gi}]"
            missing = sorted(k for k in self.defaults if k not in saved)
            if missing:
                raise ValueError(f"{where} has no {missing}: the state was not saved by "
                                 f"{self.name} (another optimizer's state cannot be loaded)")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where} has {len(saved['params'])} parameters, this "
                                 f"optimizer's {len(group['params'])}")
            merged = {**saved, "params": group["params"]}
            self._check_options(merged, where)
            for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                entry = state_dict["state"].get(pid)
                if entry:
                    self._check_loaded_state(p, merged, entry, f"{where}['params'][{pi}]")

    def _expected_state(self, p: Tensor, group: dict) -> dict:
        """The state entries (meta tensors: shapes only) this optimizer makes for ``p``."""
        expected: dict = {}
        with torch.device("meta"):  # shapes only, no memory
            self._init_state(as_real(torch.empty(p.shape, dtype=p.dtype)), group, expected)
        return expected

    def _check_loaded_state(self, p: Tensor, group: dict, entry: dict, where: str) -> None:
        expected = self._expected_state(p, group)
        if uses_master(p, group):
            expected["master"] = p
        expected["nonfinite_skips"] = torch.empty(())  # kept when skip_nonfinite was on
        for key, value in entry.items():
            if key not in expected:
                raise ValueError(f"{where}: the state has {key!r}, which {self.name} does not "
                                 f"keep for this parameter (expected {sorted(expected)})")
            if key == "step" and not torch.is_tensor(value):
                if not isinstance(value, (int, float)):
                    raise ValueError(f"{where}: 'step' is {type(value).__name__}, expected a "
                                     "number or a one-element tensor")
                continue
            want = tuple(expected[key].shape)
            if not torch.is_tensor(value) or tuple(value.shape) != want:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{where}: state {key!r} has shape {got}, expected {want} "
                                 f"(a parameter of shape {tuple(p.shape)})")


_grad = attrgetter("grad")
_shape = attrgetter("shape")
_dtype = attrgetter("dtype")
_device = attrgetter("device")
_layout = attrgetter("layout")
_PLAIN_TYPES = (Tensor, nn.Parameter)


class _Plan:
    """The op calls of one param group, kept from one step to the next so that a step does not
    redo per tensor what did not change: grouping by device and dtype, state lookups, the checks
    of ``_init_state`` and ``step_target``, the lists. Made by ``_step_group`` from the lists
    ``_lists`` made (``make``) for a group whose tensors are plain, each listed once and stepped
    in place; used while ``ready`` holds:

    * the group is the same dict, its ``params`` the same tensors, ``_plan_key`` the same (the
      optimizer's backend, manifold, block_rows, master_weights, state keys: lr and the op's
      other scalar options are read at every step);
    * every parameter has the same data pointer (a parameter given new data, ``p.data = ...``:
      another dtype, device or memory layout, is re-planned);
    * the state tensors in the lists are still the state (``opt.state[p][key]`` replaced,
      ``load_state_dict``, ``opt.state.clear()``: re-planned; the optimizer's ``_ready_plans``
      checks the per-parameter state dicts);
    * the same parameters have a gradient. Gradients that are the same tensors with the same
      data pointers as at the last step are used as they are; new gradient tensors (after
      ``zero_grad()``) or new data (``p.grad.data = ...``) are checked here as ``check_grad``
      checks them (plain dense tensors of the parameter's shape, dtype and device), and any
      that is not sends the group to the full path, whose checks name it. (A gradient changed
      in place on the same memory, by ``resize_`` or ``as_strided_``, is left to the op's own
      checks, which raise before that call writes anything.)
    """

    __slots__ = ("group", "params", "key", "grads", "present", "absent", "stepped", "ptrs",
                 "shapes", "calls", "positions", "kinds", "states", "state_keys", "state_tensors",
                 "present_grads", "grad_ptrs")

    @classmethod
    def make(cls, opt: "FusedOptimizer", group: dict, buckets: dict) -> "_Plan | None":
        params = list(group["params"])
        grads = list(map(_grad, params))
        present = [i for i, g in enumerate(grads) if g is not None]
        stepped = [params[i] for i in present]
        if len(set(map(id, stepped))) != len(stepped):
            return None  # a parameter listed twice: stepped twice, in two calls
        for p in stepped:
            if (type(p) not in _PLAIN_TYPES or type(p.grad) is not Tensor or p.is_complex()
                    or p.grad.layout != torch.strided):
                return None
        positions: dict = {}
        for j, p in enumerate(stepped):
            positions.setdefault((p.device, p.dtype, 0), []).append(j)
        if set(positions) != set(buckets):
            return None
        self = cls()
        self.group, self.params, self.key = group, params, opt._plan_key(group)
        self.grads, self.present, self.stepped = grads, present, stepped
        self.absent = [i for i, g in enumerate(grads) if g is None]
        self.present_grads = [grads[i] for i in present]
        self.grad_ptrs = list(map(Tensor.data_ptr, self.present_grads))
        self.ptrs = [p.data_ptr() for p in stepped]
        self.shapes = [p.shape for p in stepped]
        self.calls, self.positions, self.kinds = [], [], []
        for key, lists in buckets.items():
            pos = positions[key]
            if len(lists[0]) != len(pos) or not all(map(is_, lists[0], (stepped[j] for j in pos))):
                return None
            device = key[0]
            fn = (partial(getattr(ops, opt.op), check=False) if opt._use_fused(device)
                  else getattr(reference, opt.op))
            self.calls.append((device, fn, lists))
            self.positions.append(pos)
            self.kinds.append((key[1], device))
        self.states, self.state_keys, self.state_tensors = [], [], []
        for p in stepped:
            state = opt.state[p]
            for k in ["step"] + [k for k in opt._state_keys(p, group) if k is not None]:
                self.states.append(state)
                self.state_keys.append(k)
                self.state_tensors.append(state[k])
        return self

    def ready(self, opt: "FusedOptimizer", group: dict) -> bool:
        """Whether the plan still steps ``group`` as ``_step_group`` would; with new gradient
        tensors, checks them and puts them in the lists."""
        params = group["params"]
        if (group is not self.group or len(params) != len(self.params)
                or not all(map(is_, params, self.params)) or opt._plan_key(group) != self.key):
            return False
        if list(map(Tensor.data_ptr, self.stepped)) != self.ptrs:
            return False
        if not all(map(is_, map(dict.get, self.states, self.state_keys), self.state_tensors)):
            return False
        grads = list(map(_grad, params))
        if (all(map(is_, grads, self.grads))
                and list(map(Tensor.data_ptr, self.present_grads)) == self.grad_ptrs):
            return True
        present = [grads[i] for i in self.present]
        if any(grads[i] is not None for i in self.absent):
            return False
        if set(map(type, present)) - {Tensor} or list(map(_shape, present)) != self.shapes:
            return False  # None, a subclass (DTensor), or another shape
        single = len(self.calls) == 1
        for (dtype, device), pos in zip(self.kinds, self.positions):
            gs = present if single else [present[j] for j in pos]
            if (set(map(_dtype, gs)) != {dtype} or set(map(_device, gs)) != {device}
                    or set(map(_layout, gs)) != {torch.strided}):
                return False
        for (_, _, lists), pos in zip(self.calls, self.positions):
            lists[1] = present if single else [present[j] for j in pos]
        self.grads, self.present_grads = grads, present
        self.grad_ptrs = list(map(Tensor.data_ptr, present))
        return True


def _options_of(group: dict) -> tuple:
    return tuple((k, v) for k, v in group.items() if k != "params")


def _same_value(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (bool, int, float, str)):
        return a == b
    if isinstance(a, tuple):
        return len(a) == len(b) and all(map(_same_value, a, b))
    return False  # another object (a tensor lr, a list): the same only if it is the same object


def _same_options(seen: tuple, group: dict) -> bool:
    """Whether ``group``'s options are those of ``_options_of`` ``seen``: same keys, same
    values (numbers, strings and tuples of them by value, other objects by identity)."""
    if len(seen) != len(group) - ("params" in group):
        return False
    for k, v in seen:
        if k not in group or not _same_value(v, group[k]):
            return False
    return True


def state_like(p: Tensor, state: dict, key: str, manifold=None) -> Tensor:
    """``state[key]``: a zero buffer shaped like ``p`` in the opmath dtype, laid out like what the
    kernels step for ``p`` (``p`` itself, or a contiguous copy of a ``p`` they cannot step in
    place), made on first use and re-laid out when ``p`` changed layout (e.g. to
    channels_last)."""
    buf = state.get(key)
    if buf is None:
        buf = laid_out_like(p, manifold, reference.opmath_dtype(p.dtype)).zero_()
    elif steppable(p, manifold) and buf.stride() != p.stride():
        buf = laid_out_like(p, manifold, buf.dtype).copy_(buf)
    state[key] = buf
    return buf


def step_counter(p: Tensor, state: dict) -> Tensor:
    """``state["step"]``: a float32 scalar on ``p``'s device (the kernels read and bump it)."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    return state["step"]


def scalar_lr(lr) -> float:
    """The learning rate as the ops take it (a one-element tensor lr is read on the host)."""
    return float(lr) if torch.is_tensor(lr) else lr


def on_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    """GradScaler's grad_scale / found_inf as float32 on ``device`` (None stays None)."""
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)


def check_common_options(group: dict, where: str) -> None:
    """Options every psi_cuda optimizer shares; ValueError naming the offending key."""
    manifold = group.get("manifold")
    if manifold not in (None,) + PSI_MANIFOLDS:
        raise ValueError(f"{where}['manifold'] must be one of {PSI_MANIFOLDS} or None "
                         f"(Euclidean); got {manifold!r}")
    lr = group["lr"]
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"{where}['lr'] must be >= 0; got {group['lr']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"{where}['weight_decay'] must be >= 0; got {group['weight_decay']}")


def check_sphere_options(group: dict, where: str) -> None:
    """retraction / transport / max_grad_norm / master_weights / capturable of the PSI
    optimizers."""
    if group["retraction"] not in ops.RETRACTIONS:
        raise ValueError(f"{where}['retraction'] must be one of {tuple(ops.RETRACTIONS)}; "
                         f"got {group['retraction']!r}")
    if group["transport"] not in ops.TRANSPORTS:
        raise ValueError(f"{where}['transport'] must be one of {tuple(ops.TRANSPORTS)}; "
                         f"got {group['transport']!r}")
    if group["transport"] == "parallel" and group["retraction"] != "exp":
        raise ValueError(f"{where}: transport='parallel' needs retraction='exp'")
    mgn = group["max_grad_norm"]
    if mgn is not None and not mgn > 0:
        raise ValueError(f"{where}['max_grad_norm'] must be None or > 0; got {mgn}")
    rows = group.get("block_rows")
    if group.get("manifold") == "block":
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"{where}: manifold='block' needs 'block_rows', an int >= 1 (each "
                             f"group is that many consecutive rows); got {rows!r}")
    elif rows not in (None, 1):
        raise ValueError(f"{where}['block_rows'] applies to manifold='block'; got {rows!r} with "
                         f"manifold={group.get('manifold')!r}")
    check_flag(group, "master_weights", where)
    check_flag(group, "capturable", where)


def check_params(group: dict, where: str, name: str) -> None:
    """Parameter dtypes, and shapes that cannot be channel groups (one warning per group)."""
    manifold = group.get("manifold")
    frozen = []
    for pi, p in enumerate(group["params"]):
        if p.dtype in COMPLEX_DTYPES and manifold is not None:
            raise ValueError(f"{where}['params'][{pi}] is complex ({p.dtype}); {name} steps "
                             "complex parameters in Euclidean groups only (manifold=None, as "
                             "torch.optim does, on their real views): the PSI manifolds are "
                             "defined for real weights")
        if p.dtype not in PARAM_DTYPES + COMPLEX_DTYPES:
            raise ValueError(f"{where}['params'][{pi}] has dtype {p.dtype}; {name} needs "
                             "float32, float64, float16 or bfloat16 parameters (complex64 or "
                             "complex128 in Euclidean groups)")
        if manifold in ("channel", "block") and p.dim() == 0:
            raise ValueError(f"{where}['params'][{pi}] is a 0-dim tensor; manifold={manifold!r} "
                             "needs at least one dimension (use manifold=None or 'tensor')")
        if manifold == "block" and p.size(0) % group["block_rows"]:
            raise ValueError(f"{where}['params'][{pi}] has shape {tuple(p.shape)}: block_rows="
                             f"{group['block_rows']} must divide its size of dim 0 (its rows)")
        if manifold == "channel" and p.dim() == 1 and p.numel() > 0:
            frozen.append((pi, tuple(p.shape)))
    if frozen:
        shapes = sorted(set(s for _, s in frozen))
        listed = ", ".join(str(s) for s in shapes[:8]) + (", ..." if len(shapes) > 8 else "")
        indices = [i for i, _ in frozen]
        warnings.warn(f"{where} (manifold='channel'): {len(frozen)} of its "
                      f"{len(group['params'])} tensors are 1-D (shapes {listed}; params "
                      f"{indices[:8]}{' ...' if len(indices) > 8 else ''}): their channel "
                      "groups have length 1 and cannot move. Put them in a group with "
                      "manifold=None (psi_cuda.param_groups(model, lr) does)", stacklevel=4)


def check_grad(p: Tensor, where: str, name: str) -> None:
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{where} has a sparse gradient; {name} needs dense gradients")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(f"{where}: gradient is {g.dtype} {tuple(g.shape)} on {g.device}, "
                           f"expected {p.dtype} {tuple(p.shape)} on {p.device}")
