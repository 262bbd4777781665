"""reference.psi_sgd_foreach_ (the torch._foreach_* baseline of the benchmarks) equals
reference.psi_sgd_ (the per-tensor reference) over a few steps and option sets."""
import pytest
import torch

from psi_cuda import reference
from helpers import assert_close_rel, state_dtype, tangent_grad_like

SHAPES = [(8, 3, 3, 3), (16, 8, 1, 1), (5, 7), (4,), (3, 1), (1, 6)]
OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1, nesterov=False),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.5, maximize=True),
]


def _state(manifold, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    params[1][3].zero_()  # a zero row: does not move
    grads = [tangent_grad_like(p, manifold) for p in params]
    bufs = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(state_dtype(dtype)) * 0.1
            for p in params]
    steps = [torch.zeros(()) for _ in params]
    return params, grads, bufs, steps


def _assert_lists_close(actual, expected, dtype):
    """Params, then buffers, each as one flat vector: the tolerance is relative to the list's
    scale (a buffer row that cancels to ~0 carries only rounding noise of its inputs)."""
    for k, what in ((0, "params"), (2, "momentum buffers")):
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        assert_close_rel(flat(actual[k]), flat(expected[k]), dtype, what)


def _clone(state):
    return tuple([t.clone() for t in ts] for ts in state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("manifold", ["channel", "tensor", None])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_foreach_matches_reference(dtype, manifold, opts):
    a = _state(manifold, dtype, 0)
    b = _clone(a)
    kw = dict(lr=0.1, manifold=manifold, **opts)
    if manifold is None:
        kw["weight_decay"] = 1e-2
    for _ in range(3):  # the first step (buffer = gradient) and later ones
        reference.psi_sgd_(a[0], a[1], a[2], a[3], **kw)
        reference.psi_sgd_foreach_(b[0], b[1], b[2], b[3], **kw)
    _assert_lists_close(b, a, dtype)
    assert all(s.item() == 3 for s in b[3])


def test_foreach_mixed_first_steps():
    a = _state("channel", torch.float32, 1)
    b = _clone(a)
    for s in a[3][:2] + b[3][:2]:
        s.fill_(4)
    kw = dict(lr=0.1, momentum=0.9, manifold="channel")
    reference.psi_sgd_(*a, **kw)
    reference.psi_sgd_foreach_(*b, **kw)
    _assert_lists_close(b, a, torch.float32)


@pytest.mark.parametrize("kw", [dict(retraction="exp"), dict(max_grad_norm=1.0),
                                dict(grad_scale=torch.ones(()))])
def test_foreach_unsupported_options_raise(kw):
    p = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match="does not support"):
        reference.psi_sgd_foreach_(p, [torch.randn(4, 3)], [], [torch.zeros(())], lr=0.1, **kw)
