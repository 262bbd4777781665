"""The step keeps each param group's op lists from one step to the next (``_Plan`` in
psi_cuda/optim/_base.py). Every change a user can make between steps must still give the step a
fresh optimizer gives: the oracle here is a new optimizer of the same class, loaded with the
tracked optimizer's state_dict and stepped on copies of the same parameters and gradients (a new
optimizer has no plans: it takes the full path), compared bit for bit, and where the step has a
closed form, torch.optim."""
import copy

import pytest
import torch

from psi_cuda.optim import PSIAdam, PSISGD

CASES = [
    (PSISGD, dict(lr=0.05, momentum=0.9)),
    (PSISGD, dict(lr=0.05, momentum=0.0)),
    (PSIAdam, dict(lr=0.01)),
]
IDS = ["psisgd-momentum", "psisgd-plain", "psiadam"]


def _model(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 9), (3, 2, 3, 3), (6,), (5, 7), (2, 3)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
            for s in shapes]


def _groups(ps, manifolds=("channel", None)):
    return [{"params": ps[:2], "manifold": manifolds[0]},
            {"params": ps[2:], "manifold": manifolds[1]}]


def _set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1


def _oracle_step(opt, cls, kw):
    """The step a fresh optimizer takes from ``opt``'s state on copies of its parameters and
    gradients: (params after, state_dict after)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    clones = {id(p): p.detach().clone().requires_grad_(True) for p in params}
    for p in params:
        if p.grad is not None:
            clones[id(p)].grad = p.grad.clone()
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [clones[id(p)] for p in g["params"]]} for g in opt.param_groups]
    fresh = cls(groups, **kw)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not fresh.__dict__.get("_plans")
    fresh.step()
    return [clones[id(p)].detach() for p in params], fresh.state_dict()


def _assert_same_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys(), i
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)


def _step_and_compare(opt, cls, kw):
    expected, expected_state = _oracle_step(opt, cls, kw)
    opt.step()
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, (p, e) in enumerate(zip(params, expected)):
        assert p.dtype == e.dtype and torch.equal(p.detach(), e), f"param {i}"
    _assert_same_state(opt.state_dict(), expected_state)


def _warm(cls, kw, ps=None, steps=3):
    ps = _model() if ps is None else ps
    opt = cls(_groups(ps), **kw)
    for s in range(steps):
        _set_grads(ps, 100 + s)
        opt.step()
    assert len(opt._plans) == 2  # both groups kept their lists
    return ps, opt


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_plans_step_as_a_fresh_optimizer(cls, kw):
    ps, opt = _warm(cls, kw)
    for s in range(3):  # the same gradient tensors (zero_grad(set_to_none=False) + backward)
        with torch.no_grad():
            for p in ps:
                p.grad.mul_(0.5).add_(0.01)
        _step_and_compare(opt, cls, kw)
    for s in range(3):  # new gradient tensors every step (zero_grad() + backward)
        _set_grads(ps, 200 + s)
        _step_and_compare(opt, cls, kw)
    assert len(opt._plans) == 2


def test_plan_steps_are_torch_sgd_on_euclidean_groups():
    ps = _model()
    ref = [p.detach().clone().requires_grad_(True) for p in ps]
    opt = PSISGD(ps, lr=0.1, momentum=0.9, manifold=None)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for s in range(6):
        _set_grads(ps, s)
        _set_grads(ref, s)
        if s == 4:
            opt.param_groups[0]["lr"] = sgd.param_groups[0]["lr"] = 0.03
        opt.step()
        sgd.step()
    assert opt._plans
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_lr_and_options_edited_between_steps(cls, kw):
    ps, opt = _warm(cls, kw)
    opt.param_groups[0]["lr"] = 0.2
    _step_and_compare(opt, cls, kw)
    opt.param_groups[1]["lr"] = torch.tensor(0.003)
    _set_grads(ps, 7)
    _step_and_compare(opt, cls, kw)
    opt.param_groups[1]["weight_decay"] = 0.1
    opt.param_groups[0]["max_grad_norm"] = 0.05
    _step_and_compare(opt, cls, kw)
    opt.param_groups[0]["retraction"] = "exp"
    _step_and_compare(opt, cls, kw)
    if cls is PSISGD:  # momentum switched on changes the op's lists; its value does not
        opt.param_groups[0]["momentum"] = 0.5
        _step_and_compare(opt, cls, kw)
    else:
        opt.param_groups[0]["betas"] = (0.5, 0.9)
        _step_and_compare(opt, cls, kw)
    if cls is PSISGD:  # (PSIAdam's second moments are per group: no switch of manifold)
        opt.param_groups[0]["manifold"] = "tensor"
        _set_grads(ps, 8)
        _step_and_compare(opt, cls, kw)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_param_groups_edited_between_steps(cls, kw):
    ps, opt = _warm(cls, kw)
    extra = _model(seed=3)
    _set_grads(extra, 9)
    opt.add_param_group({"params": extra[:2], "manifold": "tensor"})
    _step_and_compare(opt, cls, kw)
    _step_and_compare(opt, cls, kw)
    opt.param_groups[1]["params"].append(extra[3])  # the list edited in place
    _step_and_compare(opt, cls, kw)
    opt.param_groups[1]["params"] = opt.param_groups[1]["params"][::-1]  # replaced, reordered
    _step_and_compare(opt, cls, kw)
    g0 = opt.param_groups[0]
    opt.param_groups[0] = {**g0, "params": list(g0["params"])}  # the group dict replaced
    _step_and_compare(opt, cls, kw)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_grads_replaced_or_set_to_none(cls, kw):
    ps, opt = _warm(cls, kw)
    ps[0].grad = torch.full_like(ps[0], 0.3)  # one gradient replaced by a new tensor
    _step_and_compare(opt, cls, kw)
    before = ps[3].detach().clone()
    step = opt.state[ps[3]]["step"].clone()
    ps[3].grad = None
    ps[1].grad = None
    _step_and_compare(opt, cls, kw)
    assert torch.equal(ps[3].detach(), before) and torch.equal(opt.state[ps[3]]["step"], step)
    _step_and_compare(opt, cls, kw)  # the plan without them
    _set_grads(ps, 11)  # back
    _step_and_compare(opt, cls, kw)
    ps[4].grad = ps[4].grad.t().contiguous().t()  # a transposed layout: the op copies it
    _step_and_compare(opt, cls, kw)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_dtype_device_and_layout_changed_in_place(cls, kw):
    ps, opt = _warm(cls, kw)
    with torch.no_grad():  # as model.to(torch.bfloat16) does: same objects, new data
        for p in (ps[0], ps[3]):
            p.data = p.data.to(torch.bfloat16)
            p.grad.data = p.grad.data.to(torch.bfloat16)  # the same gradient objects
    _step_and_compare(opt, cls, kw)
    _set_grads(ps, 12)
    _step_and_compare(opt, cls, kw)
    with torch.no_grad():  # channels_last: the state is laid out anew
        ps[1].data = ps[1].data.contiguous(memory_format=torch.channels_last)
    _step_and_compare(opt, cls, kw)
    assert opt.state[ps[1]]["step"].item() > 0
    if kw.get("momentum", 1) == 0:  # no state like the parameter: float64 works too
        with torch.no_grad():
            ps[2].data = ps[2].data.double()
            ps[2].grad = ps[2].grad.double()
        _step_and_compare(opt, cls, kw)
        _step_and_compare(opt, cls, kw)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_state_edited_or_loaded_between_steps(cls, kw):
    ps, opt = _warm(cls, kw)
    saved = copy.deepcopy(opt.state_dict())
    _step_and_compare(opt, cls, kw)
    opt.load_state_dict(saved)  # back two steps: the plans must use the loaded tensors
    _step_and_compare(opt, cls, kw)
    key = "momentum_buffer" if cls is PSISGD else "exp_avg"
    if key in opt.state[ps[0]]:
        opt.state[ps[0]][key] = torch.zeros_like(ps[0])  # a state tensor replaced
        _step_and_compare(opt, cls, kw)
    opt.state[ps[2]] = {}  # one parameter's state dropped
    _step_and_compare(opt, cls, kw)
    opt.state.clear()  # all of it
    _step_and_compare(opt, cls, kw)
    assert opt.state[ps[0]]["step"].item() == 1


def test_a_pickled_optimizer_has_no_plans():
    ps, opt = _warm(PSISGD, dict(lr=0.1, momentum=0.9))
    assert "_plans" not in opt.__getstate__()
    ps2, opt2 = copy.deepcopy((ps, opt))
    assert not opt2.__dict__.get("_plans")
    for p in ps2:
        p.grad = None
    _set_grads(ps, 5)
    _set_grads(ps2, 5)
    opt.step()
    opt2.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_bad_gradient_after_warm_steps_changes_nothing(cls, kw):
    ps, opt = _warm(cls, kw)

    def new_data(make):  # the same gradient object given other data (p.grad.data = ...)
        def set_(p):
            p.grad.data = make(p)
        return set_

    def sparse(p):  # a new gradient object
        p.grad = torch.zeros_like(p).to_sparse()

    bad = [("shape", new_data(lambda p: torch.zeros(p.numel() + 1))),
           ("dtype", new_data(lambda p: torch.zeros_like(p, dtype=torch.float64))),
           ("sparse", sparse)]
    for what, spoil in bad:
        _set_grads(ps, 13)
        opt.step()  # the plans hold these gradient objects
        params_before = [p.detach().clone() for p in ps]
        state_before = copy.deepcopy(opt.state_dict())
        spoil(ps[3])  # the second group: the first would be written first
        with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\]"):
            opt.step()
        for p, b in zip(ps, params_before):
            assert torch.equal(p.detach(), b), what
        _assert_same_state(opt.state_dict(), state_before)
    _set_grads(ps, 14)
    _step_and_compare(opt, cls, kw)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_bad_option_after_warm_steps_changes_nothing(cls, kw):
    ps, opt = _warm(cls, kw)
    before = [p.detach().clone() for p in ps]
    for key, value in (("lr", -1.0), ("retraction", "bogus"), ("max_grad_norm", -2.0)):
        good = opt.param_groups[1][key]
        opt.param_groups[1][key] = value
        with pytest.raises(ValueError, match=rf"param_groups\[1\]\['{key}'\]"):
            opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
        opt.param_groups[1][key] = good
    _step_and_compare(opt, cls, kw)
