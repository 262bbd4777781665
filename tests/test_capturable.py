"""capturable=True: a step captured in a CUDA graph and replayed equals the same eager steps (GPU
tests, skipped without a GPU), and the capture checks and the CPU behaviour (run everywhere)."""
import pytest
import torch
from torch import nn

from psi_cuda import ops
from psi_cuda.optim import BNPSGD, PSIAdam, PSISGD

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and ops.has_cuda_kernels()),
                               reason="needs a GPU and the CUDA build of psi_cuda")


def psi_params(device, dtype):
    """Channel groups (rows held in registers; rows of 5000 elements, read twice by one block; a
    row of 70000 > 65536, the chunked path), a
    tensor group and 60 small Euclidean tensors (a table of more than 480 words, so the captured
    table upload takes several launches)."""
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_()
    return [
        {"params": [mk(8, 3, 3, 3), mk(3, 5000), mk(1, 70000)], "manifold": "channel"},
        {"params": [mk(6, 7)], "manifold": "tensor"},
        {"params": [mk(5) for _ in range(60)] + [mk(4, 3)], "manifold": None,
         "weight_decay": 0.01},
    ]


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def set_grads(params, seed, scale=1.0):
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, device=p.device, generator=gen) * scale
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.copy_(g)  # in place: the captured graph reads these very tensors


def assert_same(opt_a, opt_b, what):
    for p, q in zip(all_params(opt_a), all_params(opt_b)):
        assert torch.equal(p, q), f"{what}: params differ"
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{what}: state {k!r} differs"


def capture_and_compare(make, params_a, params_b, amp=False, steps=4):
    """Optimizer B: one eager warm-up step (makes the state), then one step captured in a CUDA
    graph and replayed `steps` times with fresh gradients (copied into the same .grad tensors).
    Optimizer A: the same steps eagerly. Both must agree bit for bit after every step (the same
    kernels on the same inputs); with amp, a replay with found_inf = 1 must change nothing."""
    opt_a, opt_b = make(params_a), make(params_b)
    pa, pb = all_params(opt_a), all_params(opt_b)
    scale = torch.full((), 8.0, device="cuda")
    found_inf = torch.zeros((), device="cuda")
    if amp:
        opt_b.grad_scale, opt_b.found_inf = scale, found_inf  # static tensors, read by the graph
    set_grads(pa, 0, 8.0 if amp else 1.0)
    set_grads(pb, 0, 8.0 if amp else 1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
        opt_b.step()
    torch.cuda.current_stream().wait_stream(side)
    if amp:
        opt_a.grad_scale, opt_a.found_inf = scale.clone(), found_inf.clone()
    opt_a.step()
    assert_same(opt_a, opt_b, "warm-up step")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_b.step()
    for i in range(1, steps + 1):
        skip = amp and i == 2
        set_grads(pa, i, 8.0 if amp else 1.0)
        set_grads(pb, i, 8.0 if amp else 1.0)
        found_inf.fill_(1.0 if skip else 0.0)
        before = [p.clone() for p in pb]
        if amp:
            opt_a.found_inf = found_inf.clone()
        if not skip:
            opt_a.step()
        graph.replay()
        torch.cuda.synchronize()
        assert_same(opt_a, opt_b, f"replay {i}")
        if skip:
            for p, q in zip(before, pb):
                assert torch.equal(p, q)
    steps_b = [opt_b.state[p]["step"].item() for p in pb if "step" in opt_b.state[p]]
    assert steps_b == [float(steps + 1 - (1 if amp else 0))] * len(steps_b)


@needs_gpu
@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False),
                                          (torch.bfloat16, True)])
@pytest.mark.parametrize("amp", [False, True])
def test_captured_step_replays_like_eager_steps(cls, dtype, master, amp):
    kw = dict(lr=0.05, momentum=0.9, nesterov=True) if cls is PSISGD else dict(lr=0.01)

    def make(groups):
        return cls(groups, capturable=True, master_weights=master, backend="fused", **kw)

    capture_and_compare(make, psi_params("cuda", dtype), psi_params("cuda", dtype), amp=amp)


def bnp_model(device):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5),
                      nn.ReLU(), nn.Linear(5, 3, bias=False)).to(device)
    return m


@needs_gpu
@pytest.mark.parametrize("amp", [False, True])
def test_captured_bnp_sgd_replays_like_eager_steps(amp):
    ma, mb = bnp_model("cuda"), bnp_model("cuda")
    x = torch.randn(4, 3, 8, 8, device="cuda")

    def make(params):
        model = ma if params is pa else mb
        opt = BNPSGD(model, lr=0.01, momentum=0.9, capturable=True, backend="fused")
        model(x)  # BNP statistics of one batch, the same in both
        return opt

    pa, pb = list(ma.parameters()), list(mb.parameters())
    capture_and_compare(make, pa, pb, amp=amp)


@needs_gpu
def test_capture_without_capturable_is_an_error():
    p = torch.randn(4, 3, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = PSISGD([p], manifold="channel", lr=0.1, momentum=0.9)
    opt.step()
    before = p.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] has capturable=False"):
        with torch.cuda.graph(graph):
            opt.step()
    assert torch.equal(p, before)


@needs_gpu
@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_capture_before_the_first_step_is_an_error(cls):
    p = torch.randn(4, 3, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = cls([p], lr=0.1, capturable=True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"no optimizer state yet: take one step\(\)"):
        with torch.cuda.graph(graph):
            opt.step()
    assert not opt.state


# ---- everywhere ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_capturable_on_cpu_changes_nothing(cls):
    """capturable=True on CPU params: the same steps as capturable=False, bit for bit (the step
    counters are tensors and the kernels take no host value from them either way)."""
    a, b = psi_params("cpu", torch.float32), psi_params("cpu", torch.float32)
    opt_a, opt_b = cls(a, lr=0.05), cls(b, lr=0.05, capturable=True)
    for i in range(3):
        set_grads(all_params(opt_a), i)
        set_grads(all_params(opt_b), i)
        opt_a.step()
        opt_b.step()
        assert_same(opt_a, opt_b, f"step {i}")


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
@pytest.mark.parametrize("key", ["capturable", "master_weights"])
def test_flags_must_be_bool(cls, key):
    p = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\] must be True or False"):
        cls([{"params": [p], key: "yes", "manifold": "channel"}], lr=0.1)


def bnp_sgd_on_cpu(**kw):
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2, bias=False), nn.ReLU(),
                      nn.Linear(2, 3))
    opt = BNPSGD(m, lr=0.1, momentum=0.9, **kw)
    m(torch.randn(3, 4))
    return m, opt


@pytest.mark.parametrize("case", ["sgd", "sgd-nomomentum", "adam", "bnp", "sgd-master",
                                  "adam-master", "bnp-master"])
def test_needs_state_matches_the_state_a_step_makes(case):
    """The pre-capture check ``_needs_state`` says True for every param before its first step and
    False after it: it asks for exactly the state the step makes (a bias of a BNP layer shares
    its weight's step counter; master copies only with master_weights on bf16 params)."""
    master = case.endswith("master")
    dtype = torch.bfloat16 if master else torch.float32
    if case.startswith("bnp"):
        model, opt = bnp_sgd_on_cpu(master_weights=master)
        model.to(dtype)
    else:
        cls = PSIAdam if case.startswith("adam") else PSISGD
        kw = dict(momentum=0.0 if "nomomentum" in case else 0.9) if cls is PSISGD else {}
        opt = cls(psi_params("cpu", dtype), lr=0.01, master_weights=master, **kw)
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    set_grads([p for p, _ in params], 0)
    assert all(opt._needs_state(p, g) for p, g in params)
    opt.step()
    assert not any(opt._needs_state(p, g) for p, g in params)
    assert master == all("master" in opt.state[p] for p, _ in params)


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_capture_checks_run_before_anything_changes(cls, monkeypatch):
    """With a capture reported in progress (the probe patched: no GPU here), step() refuses
    capturable=False groups and CPU params with an error naming them, before touching any
    tensor."""
    from psi_cuda.optim import _amp
    groups = psi_params("cpu", torch.float32)
    opt = cls(groups, lr=0.01)
    set_grads(all_params(opt), 0)
    before = [p.clone() for p in all_params(opt)]
    monkeypatch.setattr(_amp, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] has capturable=False"):
        opt.step()
    opt2 = cls(psi_params("cpu", torch.float32), lr=0.01, capturable=True)
    set_grads(all_params(opt2), 0)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] is on cpu"):
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(before, all_params(opt)))
    assert not opt.state and not opt2.state
