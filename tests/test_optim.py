"""PSISGD: oracles (torch.optim.SGD, geoopt, the reference, the equivariance of
docs/ALGORITHMS.md section 7) and its option checks; the optimizer contract (closure, resume,
GradScaler, bad input) is tests/test_contract.py."""

import geoopt
import pytest
import torch

from psi_cuda.optim import PSISGD
from helpers import DEVICES, conv_groups, rescaling_gaps, step_side_by_side


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.7, dampening=0.2, weight_decay=1e-3, maximize=True),
])
def test_euclidean_groups_match_torch_sgd(device, backend, opts):
    shapes = [(10, 7), (13,), (2, 3, 3, 3), ()]
    ours = [torch.randn(s, device=device) for s in shapes]
    theirs = [p.clone() for p in ours]
    opt = PSISGD([{"params": ours, "manifold": None}], lr=0.05, backend=backend, **opts)
    ref = torch.optim.SGD(theirs, lr=0.05, **opts)
    step_side_by_side(opt, ours, ref, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    if opts.get("momentum"):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(opt.state[a]["momentum_buffer"],
                                       ref.state[b]["momentum_buffer"], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_geoopt_riemannian_sgd_on_sphere(device):
    """Momentum 0 and unit rows: PSI-SGD is geoopt's RiemannianSGD on its Sphere."""
    w0 = torch.randn(6, 11, dtype=torch.float64, device=device)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    ours = w0.clone().requires_grad_()
    theirs = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.Sphere())
    opt = PSISGD([ours], manifold="channel", lr=0.2)
    gopt = geoopt.optim.RiemannianSGD([theirs], lr=0.2)
    for _ in range(15):
        g = torch.randn_like(w0)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        gopt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_equivariance_over_100_steps(nesterov):
    """docs/ALGORITHMS.md 7.1: from w0 and from c*w0, every PSI-SGD iterate stays c times the
    other and the losses agree; Euclidean SGD on the same starts does not."""
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov)
    gap, loss_gap, losses = rescaling_gaps(lambda m: PSISGD(conv_groups(m, True), **kw))
    assert gap < 1e-8 and loss_gap < 1e-8, (gap, loss_gap)
    assert losses[-1] < losses[0]  # it trains
    gap, loss_gap, _ = rescaling_gaps(lambda m: PSISGD(conv_groups(m, False), **kw))
    assert gap > 1e-2 and loss_gap > 1e-3, (gap, loss_gap)





def test_bad_group_options_raise():
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['manifold'\] must be"):
        PSISGD([{"params": [w], "manifold": "sphere"}], lr=0.1)
    with pytest.raises(ValueError, match=r"transport='parallel' needs retraction='exp'"):
        PSISGD([w], manifold="channel", lr=0.1, transport="parallel")
    with pytest.raises(ValueError, match=r"\['lr'\] must be >= 0"):
        PSISGD([w], manifold="channel", lr=-0.1)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        PSISGD([w], manifold="channel", lr=0.1, backend="triton")
    with pytest.raises(ValueError, match=r"max_grad_norm"):
        PSISGD([w], manifold="channel", lr=0.1, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"dtype torch.int64"):
        PSISGD([torch.zeros(3, 3, dtype=torch.int64)], manifold="channel", lr=0.1)


def test_vector_in_channel_group_warns():
    with pytest.warns(UserWarning, match="cannot move"):
        PSISGD([torch.randn(7, requires_grad=True)], manifold="channel", lr=0.1)

