"""The torch.optim contract, the same for every psi_cuda optimizer (PSISGD, PSIAdam, BNPSGD):
closure and zero_grad, a bit-for-bit resume from a state dict, GradScaler (a step with inf/NaN
gradients changes nothing; a scaled step equals the unscaled one), bad gradients refused before
anything changes, maximize, and PSI groups ignoring weight decay. The cases are built in
tests/helpers.py (``OPTIMIZERS``)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from psi_cuda.optim import BNPSGD, PSIAdam, PSISGD
from helpers import (OPTIMIZERS, ConvBN, assert_close_rel, batches, conv_groups,
                     step_side_by_side, tangent_grad_like, train)

CASES = pytest.mark.parametrize("case", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())


def quiet(fn, *args):
    """``fn(*args)`` with the weight-decay-ignored warning of PSI groups silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


@CASES
def test_closure_and_zero_grad(case):
    model = case.model()
    opt = case.make(model)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(5):
        last = opt.step(closure).item()
    assert last < first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@CASES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_for_bit(case, dtype):
    model = case.model().to(dtype)
    data = batches(3, dtype)
    opt = case.make(model)
    quiet(train, model, opt, data, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    quiet(train, model, opt, data, 5)

    buf.seek(0)
    saved = torch.load(buf)
    resumed = case.model().to(dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = case.make(resumed)
    opt2.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        for key, value in opt2.state[p].items():
            if key != "step":  # state in the opmath dtype (fp32 for bf16 parameters)
                assert value.dtype == torch.float32, key
    quiet(train, resumed, opt2, data, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    for la, lb in zip(*(getattr(getattr(o, "bnp", None), "layers", []) for o in (opt, opt2))):
        assert torch.equal(la.mean, lb.mean) and torch.equal(la.sqmean, lb.sqmean)
        assert torch.equal(la.step, lb.step)


@CASES
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_scaler_nonfinite_step_changes_nothing(case, bad):
    model = case.model()
    opt = case.make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches(1)[0]

    def scaled_step(poison=False):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if poison:
            case.poison(model).grad.view(-1)[0] = bad
        quiet(scaler.step, opt)
        scaler.update()

    scaled_step()
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    scaled_step(poison=True)
    assert scaler.get_scale() == 2.0**9
    for p, q, st in zip(model.parameters(), params, state):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == st.keys()
        assert set(case.state_keys) <= set(st) or not st
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v)
    assert all(s["step"].item() == 1 for s in opt.state.values() if "step" in s)


@CASES
def test_grad_scaler_step_equals_unscaled_step(case):
    model = case.model()
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt, opt2 = case.make(model), case.make(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(3):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        quiet(scaler.step, opt)
        scaler.update()
        opt2.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        quiet(opt2.step)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(p, s) for p, s in zip(model.parameters(), start))


@CASES
def test_sparse_gradient_raises_and_changes_nothing(case):
    model = case.model()
    opt = case.make(model)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    p = case.poison(model)
    p.grad = p.grad.to_sparse()
    before = [q.detach().clone() for q in model.parameters()]
    with pytest.raises(RuntimeError, match=r"param_groups\[\d+\]\['params'\]\[\d+\] has a "
                                           "sparse gradient"):
        opt.step()
    for q, b in zip(model.parameters(), before):
        assert torch.equal(q, b)
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls,kw", [
    (PSISGD, dict(lr=0.1, momentum=0.9, retraction="exp", transport="parallel", max_grad_norm=1.0)),
    (PSIAdam, dict(lr=0.02, retraction="exp", transport="parallel", max_grad_norm=1.0)),
], ids=["PSISGD", "PSIAdam"])
def test_fused_and_reference_backends_agree_on_a_model(cls, kw):
    model = ConvBN()
    twin = copy.deepcopy(model)
    data = batches(3)
    la = train(model, cls(conv_groups(model, True), backend="fused", **kw), data, 10)
    lb = train(twin, cls(conv_groups(twin, True), backend="reference", **kw), data, 10)
    assert la == pytest.approx(lb, rel=1e-4)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_maximize_flips_the_step(cls):
    w = torch.randn(5, 9, dtype=torch.float64)
    g = tangent_grad_like(w, "channel")
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    a.grad, b.grad = g.clone(), -g
    cls([a], manifold="channel", lr=0.1, maximize=True).step()
    cls([b], manifold="channel", lr=0.1).step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert not torch.equal(a, w)


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_weight_decay_on_psi_group_warns_and_is_ignored(cls):
    w = torch.randn(4, 6)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    g = tangent_grad_like(w, "channel")
    a.grad, b.grad = g.clone(), g.clone()
    with pytest.warns(UserWarning, match="weight_decay has no meaning"):
        cls([a], manifold="channel", lr=0.1, weight_decay=0.5).step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([b], manifold="channel", lr=0.1).step()
    assert torch.equal(a, b)
    assert not torch.equal(a, w)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()])


def _assert_same(model, opt, snap):
    params, states = snap
    for p, q, st in zip(model.parameters(), params, states):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v)


@CASES
def test_loading_another_optimizers_state_raises_before_any_change(case):
    model = case.model()
    opt = case.make(model)
    quiet(train, model, opt, batches(1), 2)
    snap = _snapshot(model, opt)
    sgd = torch.optim.SGD([{"params": g["params"]} for g in opt.param_groups], lr=0.1,
                          momentum=0.9)
    quiet(train, model, sgd, batches(1), 1)  # SGD state (momentum buffers)
    with torch.no_grad():
        for p, q in zip(model.parameters(), snap[0]):
            p.copy_(q)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no \[.*was not saved by"):
        opt.load_state_dict(sgd.state_dict())
    _assert_same(model, opt, snap)


@CASES
def test_loading_state_of_other_shapes_raises_before_any_change(case):
    model = case.model()
    opt = case.make(model)
    quiet(train, model, opt, batches(1), 2)
    saved = opt.state_dict()
    other = case.model()
    with torch.no_grad():  # the same model with one parameter of another shape
        p = case.poison(other)
        p.data = torch.randn(p.shape[0] + 1, *p.shape[1:])
    other_opt = case.make(other)
    snap = _snapshot(other, other_opt)
    with pytest.raises(ValueError, match=r"\['params'\]\[\d+\]: state '\w+' has shape"):
        other_opt.load_state_dict(saved)
    _assert_same(other, other_opt, snap)


@CASES
def test_numeric_step_in_a_loaded_state_becomes_the_tensor_counter(case):
    """Older torch optimizers saved ``step`` as a number: it loads, and the next steps equal
    those from the tensor counter."""
    model = case.model()
    opt = case.make(model)
    data = batches(2)
    quiet(train, model, opt, data, 3)
    saved = opt.state_dict()
    as_numbers = copy.deepcopy(saved)
    for st in as_numbers["state"].values():
        if "step" in st:
            st["step"] = float(st["step"])
    runs = []
    for state in (saved, as_numbers):
        twin = copy.deepcopy(model)
        twin_opt = case.make(twin)
        twin_opt.load_state_dict(state)
        quiet(train, twin, twin_opt, data, 2)
        runs.append(twin)
    for p, q in zip(*(r.parameters() for r in runs)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_tensor_lr(cls):
    """A one-element tensor lr steps like the float; a longer one is torch's ValueError."""
    w = torch.randn(5, 9)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([w.clone().requires_grad_()], manifold="channel", lr=torch.tensor([0.1, 0.2]))
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    g = tangent_grad_like(w, "channel")
    a.grad, b.grad = g.clone(), g.clone()
    lr = torch.tensor(0.1)  # float32: its value is not the double 0.1
    cls([a], manifold="channel", lr=lr).step()
    cls([b], manifold="channel", lr=lr.item()).step()
    assert torch.equal(a, b) and not torch.equal(a, w)


def _strided_views():
    """(name, make) pairs: ``make(t)`` gives a non-contiguous tensor holding the values of the
    contiguous ``t``, as parameters come out of slicing or transposing."""
    def sliced(t):  # every other column of a wider tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]

    def transposed(t):  # dense, but rows not contiguous
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    return [("sliced", sliced), ("transposed", transposed)]


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("view", ["sliced", "transposed"])
@pytest.mark.parametrize("master", [False, True])
def test_non_contiguous_parameters_step_like_their_contiguous_copies(cls, manifold, backend,
                                                                     view, master):
    """torch.optim steps any strided parameter; so do the psi_cuda optimizers, with the same
    result as for a contiguous copy (a channel group is still a row of p.reshape(p.size(0), -1)),
    up to the order of the sums; gradients of any strides included, and the parameter stays the
    same tensor."""
    dtype = torch.bfloat16 if master else torch.float32
    make = dict(_strided_views())[view]
    w = torch.randn(6, 10).to(dtype)
    ours = make(w).requires_grad_()
    assert not ours.is_contiguous()
    twin = w.clone().requires_grad_()
    kw = dict(lr=0.05, manifold=manifold, backend=backend, master_weights=master)
    opt, twin_opt = cls([ours], **kw), cls([twin], **kw)
    storage = ours.data_ptr()
    for _ in range(3):
        g = tangent_grad_like(w.float(), manifold or "tensor").to(dtype)
        ours.grad, twin.grad = make(g), g.clone()
        opt.step()
        twin_opt.step()
    assert ours.data_ptr() == storage and not ours.is_contiguous()
    # Equal up to the order of the sums (a dense transposed tensor is summed in memory order).
    assert_close_rel(ours.detach(), twin.detach(), dtype, view)
    assert not torch.equal(twin.detach(), w)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("cls,torch_cls,kw", [
    (PSISGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (PSIAdam, torch.optim.AdamW, dict(lr=0.05, weight_decay=1e-2)),
], ids=["PSISGD", "PSIAdam"])
def test_complex_parameters_in_euclidean_groups_step_as_in_torch(backend, cls, torch_cls, kw):
    """Complex parameters in Euclidean groups step like torch.optim's (as real views); on a
    PSI group they are refused with a clear error."""
    shapes = [(4, 3), (5,), ()]
    ours = [torch.randn(s, dtype=torch.complex64) for s in shapes]
    theirs = [p.clone() for p in ours]
    opt = cls(ours, manifold=None, backend=backend, **kw)
    ref = torch_cls(theirs, foreach=False, **kw)
    step_side_by_side(opt, ours, ref, theirs, steps=5)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.complex64
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] is complex .* Euclidean groups only"):
        cls([torch.randn(4, 3, dtype=torch.complex64)], manifold="channel", lr=0.1)


def _drift_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64, generator=g)
            for s in [(16, 3, 3, 3), (24, 300), (2, 3000), (40,), ()]]


@pytest.mark.parametrize("name", ["PSISGD", "PSIAdam", "BNPSGD"])
def test_1000_float64_steps_fused_stay_within_1e9_of_reference(name):
    """Long-run drift (the defect most reported of fused optimizers): 1000 float64 steps with the
    fused kernels and with the reference, on the same gradient sequence, end within 1e-9
    relative of each other. The gradients give steps of realistic angles (|q| lr well below a
    radian): with steps of many radians per step (gradients 1000x larger here) the exp-map
    iterates are chaotic, and any two correct implementations part ways within a few hundred
    steps (measured: float64 rounding grows to O(1))."""
    runs = []
    for backend in ("fused", "reference"):
        if name == "BNPSGD":
            torch.manual_seed(0)
            model = OPTIMIZERS["BNPSGD"].model().double()
            opt = BNPSGD(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4,
                         backend=backend)
            model(batches(1)[0][0].double())  # the BNP statistics
            params = list(model.parameters())
        else:
            params = [p.requires_grad_() for p in _drift_params()]
            cls = PSISGD if name == "PSISGD" else PSIAdam
            kw = (dict(lr=0.01, momentum=0.9, nesterov=True, retraction="exp",
                       transport="parallel") if cls is PSISGD else dict(lr=0.003))
            opt = cls([{"params": params[:2], "manifold": "channel"},
                       {"params": params[2:3], "manifold": "tensor"},
                       {"params": params[3:], "manifold": None}], backend=backend, **kw)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(1000):
                for p in params:
                    p.grad = 1e-3 * torch.randn(p.shape, dtype=p.dtype, generator=g)
                opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item()
        assert err <= 1e-9 * scale, f"{tuple(a.shape)}: {err:.3g} of {scale:.3g}"


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
@pytest.mark.parametrize("manifold", [None, "channel"])
def test_parameter_lists_as_torch_optim_takes_them(cls, manifold):
    """A parameter listed twice in a group is stepped twice (torch.optim warns and does so);
    one in two groups, or no parameters at all, is torch's ValueError; a group with no
    parameters and a parameter without a gradient are skipped."""
    w = torch.randn(3, 4, dtype=torch.float64)
    g = tangent_grad_like(w, "channel")
    twice, once = w.clone().requires_grad_(), w.clone().requires_grad_()
    idle = torch.randn(2, 2, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = cls([{"params": [twice, idle, twice]}, {"params": []}], lr=0.1,
                  manifold=manifold)
    ref = cls([once], lr=0.1, manifold=manifold)
    twice.grad, once.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    ref.step()
    torch.testing.assert_close(twice, once, rtol=1e-14, atol=1e-14)
    assert opt.state[twice]["step"].item() == 2 and idle not in opt.state
    if manifold is None and cls is PSISGD:  # and torch.optim.SGD does the same
        theirs = w.clone().requires_grad_()
        theirs.grad = g.clone()
        with pytest.warns(UserWarning, match="duplicate parameters"):
            torch.optim.SGD([theirs, theirs], lr=0.1).step()
        torch.testing.assert_close(twice, theirs, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        cls([{"params": [once]}, {"params": [once]}], lr=0.1, manifold=manifold)
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([], lr=0.1, manifold=manifold)
