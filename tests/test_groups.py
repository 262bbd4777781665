"""psi_cuda.param_groups: which weights are scale-invariant (docs/ALGORITHMS.md section 1).

The expected groups are written out by hand for each model, and an independent numerical oracle
(``_output_change``: rescale a weight in a float64 copy of the model, run it in training mode,
compare outputs) confirms that every weight put on a PSI manifold really is scale-invariant and
that the Euclidean weights are not.
"""
import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psi_cuda
from psi_cuda import groups as groups_module
from psi_cuda.optim import PSIAdam, PSISGD


# ----------------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronization cost (seconds per
    test on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def manifolds(model, groups):
    """{parameter name: manifold} from the returned groups; fails if a parameter is in two."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for group in groups:
        for p in group["params"]:
            name = name_of[id(p)]
            assert name not in found, f"{name} is in two groups"
            found[name] = group["manifold"]
    return found


def psi_names(model, groups, manifold):
    return {n for n, m in manifolds(model, groups).items() if m == manifold}


def _output_change(model, name, mode, x, seed=0):
    """Relative change of the train-mode output of a float64 copy of ``model`` (all norm eps set
    to 1e-12) when parameter ``name`` is multiplied by random factors in [0.5, 2]: one per dim-0
    row (mode "rows"), one per dim-1 slice (mode "cols") or one for the whole tensor ("tensor")."""
    work = copy.deepcopy(model).double().train()
    for m in work.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                          nn.RMSNorm)):
            m.eps = 1e-12
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        torch.manual_seed(seed)  # same dropout masks in both runs
        before = work(x)
        p = dict(work.named_parameters())[name]
        if mode == "rows":
            shape = (p.shape[0],) + (1,) * (p.dim() - 1)
        elif mode.startswith("block"):  # one factor per block of int(mode[5:]) rows
            shape = (p.shape[0] // int(mode[5:]),) + (1,) * (p.dim() - 1)
        elif mode == "cols":
            shape = (1, p.shape[1]) + (1,) * (p.dim() - 2)
        else:
            shape = ()
        factors = torch.empty(shape, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
        if mode.startswith("block"):
            factors = factors.repeat_interleave(int(mode[5:]), dim=0)
        p.mul_(factors)
        torch.manual_seed(seed)
        after = work(x)
    return float((after - before).norm() / before.norm())


def check_oracle(model, groups, x):
    """Every PSI weight is invariant under its manifold's rescaling (<1e-9 in float64), every
    Euclidean weight of dimension >= 2 changes the output under row rescaling (> 1e-4)."""
    for name, manifold in manifolds(model, groups).items():
        if manifold == "channel":
            assert _output_change(model, name, "rows", x) < 1e-9, name
        elif manifold == "tensor":
            assert _output_change(model, name, "tensor", x) < 1e-9, name
        elif manifold == "block":
            p = dict(model.named_parameters())[name]
            rows = next(g["block_rows"] for g in groups if any(q is p for q in g["params"]))
            assert _output_change(model, name, f"block{rows}", x) < 1e-9, name
        elif dict(model.named_parameters())[name].dim() >= 2:
            assert _output_change(model, name, "rows", x) > 1e-4, name


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == flags


# ------------------------------------------------------------------------------------ models

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)  # bias in front of BN: Euclidean
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


RESNET_CHANNEL = {"stem.0.weight", "block1.conv1.weight", "block1.conv2.weight",
                  "block2.conv1.weight", "block2.conv2.weight", "block2.downsample.0.weight"}


class TransformerBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)       # -> LayerNorm: tensor
        self.ln_q = nn.LayerNorm(d)
        self.k = nn.Linear(d, d, bias=True)        # bias -> LayerNorm: Euclidean
        self.ln_k = nn.LayerNorm(d)
        self.v = nn.Linear(d, d, bias=False)       # residual add before LayerNorm: Euclidean
        self.ln_v = nn.LayerNorm(d)
        self.o = nn.Linear(d, d, bias=False)       # -> RMSNorm: tensor
        self.rms = nn.RMSNorm(d)
        self.up = nn.Linear(d, d, bias=False)      # -> Dropout -> Identity -> LayerNorm: tensor
        self.drop = nn.Dropout(0.25)
        self.ident = nn.Identity()
        self.ln_up = nn.LayerNorm(d)
        self.u = nn.Linear(d, d, bias=False)       # output used by LayerNorm and residual: Eucl.
        self.ln_u = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        a = self.ln_q(self.q(x)) * self.ln_k(self.k(x))
        b = self.ln_v(x + self.v(x))
        c = self.rms(self.o(a + b))
        d = self.ln_up(self.ident(self.drop(self.up(c))))
        h = self.u(d)
        return self.head(self.ln_u(h) + h)


class NormZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_gn1 = nn.Conv2d(3, 8, 3, padding=1)          # GroupNorm one channel/group: channel
        self.gn1 = nn.GroupNorm(8, 8)
        self.c_gn2 = nn.Conv2d(3, 8, 3, padding=1)          # 2 channels/group, bias: Euclidean
        self.gn2 = nn.GroupNorm(4, 8)
        self.c_gn2nb = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # 2 ch/group, no bias: block
        self.gn2nb = nn.GroupNorm(4, 8)
        self.c_in = nn.Conv2d(3, 8, 3, padding=1)           # InstanceNorm: channel
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.ct = nn.ConvTranspose2d(3, 8, 3, padding=1)    # ConvTranspose -> BN: tensor
        self.bn_ct = nn.BatchNorm2d(8)
        self.c1d = nn.Conv1d(3, 8, 3, padding=1, bias=False)  # Conv1d -> BatchNorm1d: channel
        self.bn1d = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 6)                          # Linear -> BatchNorm1d: channel
        self.bn_lin = nn.BatchNorm1d(6)
        self.out = nn.Linear(32 + 8 + 6, 2)

    def forward(self, x):
        maps = (self.gn1(self.c_gn1(x)) + self.gn2(self.c_gn2(x)) + self.gn2nb(self.c_gn2nb(x))
                + self.inorm(self.c_in(x)) + self.bn_ct(self.ct(x)))
        pooled = maps.mean(dim=(2, 3))                                      # (N, 8)
        seq = self.bn1d(self.c1d(x.flatten(2))).mean(2)                     # (N, 8)
        feat = self.bn_lin(self.lin(pooled))                                # (N, 6)
        return self.out(torch.cat([maps.flatten(1)[:, :32], seq, feat], 1))


class DynamicConvNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0:
            x = x + F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class LyingOrder(nn.Module):
    """Untraceable, and its registration order lies: ``liar`` is registered right before ``bn``
    but feeds a residual add; ``good`` really feeds ``bn_good``. Dropout checks that verify
    compares runs with equal masks."""

    def __init__(self):
        super().__init__()
        self.liar = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.feeder = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.good = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_good = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > -1e9:
            h = self.bn(self.feeder(x)) + self.liar(x)
        else:
            h = self.feeder(x)
        h = self.drop(self.bn_good(self.good(h)))
        return self.fc(h.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------- tests

def test_resnet_groups():
    torch.manual_seed(0)
    model = ResNet()
    groups = psi_cuda.param_groups(model, lr=0.1)
    assert [g["manifold"] for g in groups] == ["channel", None]
    found = manifolds(model, groups)
    assert set(found) == {n for n, _ in model.named_parameters()}
    assert psi_names(model, groups, "channel") == RESNET_CHANNEL
    euclidean = psi_names(model, groups, None)
    assert {"stem.0.bias", "block1.conv2.bias", "block2.conv2.bias", "fc.weight", "fc.bias",
            "stem.1.weight", "stem.1.bias", "block2.downsample.1.weight"} <= euclidean
    check_oracle(model, groups, torch.randn(4, 3, 8, 8))


def test_resnet_oracle_is_not_vacuous():
    """In eval mode (running statistics) the BN-fed convs are not invariant: the train-mode
    batch statistics are what the invariance rests on."""
    torch.manual_seed(0)
    model = ResNet()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x)  # non-trivial running statistics
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        before = work(x)
        work.block1.conv1.weight.mul_(torch.rand(8, 1, 1, 1) + 0.5)
        after = work(x)
    assert (after - before).norm() / before.norm() > 1e-3


def test_transformer_block_groups():
    torch.manual_seed(0)
    model = TransformerBlock()
    groups = psi_cuda.param_groups(model, lr=0.1)
    assert psi_names(model, groups, "tensor") == {"q.weight", "o.weight", "up.weight"}
    assert psi_names(model, groups, "channel") == set()
    euclidean = psi_names(model, groups, None)
    assert {"k.weight", "v.weight", "u.weight", "head.weight", "ln_q.weight"} <= euclidean
    check_oracle(model, groups, torch.randn(6, 5, 16))


def test_group_norm_instance_norm_conv_transpose():
    torch.manual_seed(0)
    model = NormZoo()
    groups = psi_cuda.param_groups(model, lr=0.1)
    assert psi_names(model, groups, "channel") == {"c_gn1.weight", "c_in.weight", "c1d.weight",
                                                   "lin.weight"}
    assert psi_names(model, groups, "tensor") == {"ct.weight"}
    assert psi_names(model, groups, "block") == {"c_gn2nb.weight"}
    assert [g["block_rows"] for g in groups if g["manifold"] == "block"] == [2]
    assert {"c_gn2.weight", "out.weight"} <= psi_names(model, groups, None)
    x = torch.randn(4, 3, 4, 4)
    check_oracle(model, groups, x)
    # each GroupNorm group's 2 rows are invariant on their own; rows one by one are not
    assert _output_change(model, "c_gn2nb.weight", "block2", x) < 1e-9
    assert _output_change(model, "c_gn2nb.weight", "rows", x) > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verify=True confirms the block numerically
        verified = psi_cuda.param_groups(model, lr=0.1, verify=True, sample_input=x)
    assert psi_names(model, verified, "block") == {"c_gn2nb.weight"}


def test_conv_transpose_channels_are_dim1():
    """Why ConvTranspose is not "channel": rescaling its dim-0 rows (what PSISGD's channel groups
    are) changes the output; rescaling its dim-1 slices (its output channels) does not."""
    torch.manual_seed(0)
    model = NormZoo()
    x = torch.randn(4, 3, 4, 4)
    assert _output_change(model, "ct.weight", "rows", x) > 1e-3
    assert _output_change(model, "ct.weight", "cols", x) < 1e-9


def test_conservative_cases():
    """A module called twice, tied weights, a weight read in forward: Euclidean."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight
            self.bn_a, self.bn_b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
            self.r = nn.Linear(4, 4, bias=False)
            self.bn_r = nn.BatchNorm1d(4)
            self.ok = nn.Linear(4, 4, bias=False)
            self.bn_ok = nn.BatchNorm1d(4)

        def forward(self, x, z):
            y = self.bn2(self.conv(self.bn1(self.conv(x))))
            w = self.bn_a(self.a(z)) + self.bn_b(self.b(z)) + self.bn_ok(self.ok(z))
            return y.mean() + w + self.bn_r(self.r(z)) * self.r.weight.norm()

    model = Twice()
    groups = psi_cuda.param_groups(model, lr=0.1)
    assert psi_names(model, groups, "channel") == {"ok.weight"}
    assert {"conv.weight", "a.weight", "r.weight"} <= psi_names(model, groups, None)


def test_fallback_on_untraceable_model():
    model = DynamicConvNet()
    with pytest.warns(UserWarning, match=r"could not trace DynamicConvNet .*TraceError.*"
                                         r"heuristic.*verify=True"):
        groups = psi_cuda.param_groups(model, lr=0.1)
    assert psi_names(model, groups, "channel") == {"conv1.weight", "conv2.weight"}
    assert len(manifolds(model, groups)) == len(list(model.parameters()))


def test_verify_drops_wrong_candidate_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = LyingOrder().eval()
    model.drop.train()  # mixed per-module flags must survive too
    x = torch.randn(4, 3, 6, 6)
    # The heuristic alone is fooled:
    with pytest.warns(UserWarning, match="could not trace"):
        unverified = psi_cuda.param_groups(model, lr=0.1)
    assert psi_names(model, unverified, "channel") == {"liar.weight", "good.weight"}
    assert _output_change(model, "liar.weight", "rows", x) > 1e-3  # independent check: it lies

    snap = snapshot(model)
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = psi_cuda.param_groups(model, lr=0.1, verify=True, sample_input=x)
    messages = [str(w.message) for w in caught]
    dropped = [m for m in messages if "verify=True" in m and "not scale-invariant" in m]
    assert len(dropped) == 1
    assert "liar.weight (channel: relative output change" in dropped[0]
    assert "good.weight" not in dropped[0]
    assert psi_names(model, groups, "channel") == {"good.weight"}
    assert "liar.weight" in psi_names(model, groups, None)
    assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)


def test_verify_accepts_true_groups_with_tuple_input_and_dropout():
    torch.manual_seed(0)
    model = TransformerBlock()  # dropout p=0.25 in train mode: verify must reuse the masks
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = psi_cuda.param_groups(model, lr=0.1, verify=True,
                                       sample_input=(torch.randn(6, 5, 16),))
    assert psi_names(model, groups, "tensor") == {"q.weight", "o.weight", "up.weight"}
    assert_unchanged(model, snap)


def test_verify_catches_frozen_batchnorm():
    """A BN kept in eval mode while the model trains uses running stats: not invariant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 7, 7)
    with torch.no_grad():
        model(x)
    model[1].eval()
    assert psi_names(model, psi_cuda.param_groups(model, lr=0.1), "channel") == {"0.weight",
                                                                                  "3.weight"}
    with pytest.warns(UserWarning, match=r"0\.weight \(channel"):
        groups = psi_cuda.param_groups(model, lr=0.1, verify=True, sample_input=x)
    assert psi_names(model, groups, "channel") == {"3.weight"}
    assert not model[1].training and model.training


def test_verify_float32_fallback(monkeypatch):
    """A model that cannot run in float64 is verified in float32 (tolerance 1e-4)."""

    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6, bias=False)
            self.ln = nn.LayerNorm(6)

        def forward(self, x):
            return self.ln(self.lin(x)) @ torch.linspace(-1, 2, 12).view(6, 2)  # float32, made here

    dtypes = []
    real = groups_module._output_changes

    def spy(model, candidates, args, dtype, eps):
        dtypes.append(dtype)
        return real(model, candidates, args, dtype, eps)

    monkeypatch.setattr(groups_module, "_output_changes", spy)
    model = Float32Only()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = psi_cuda.param_groups(model, lr=0.1, verify=True, sample_input=torch.randn(5, 6))
    assert dtypes == [torch.float64, torch.float32]
    assert psi_names(model, groups, "tensor") == {"lin.weight"}


def test_psisgd_end_to_end_keeps_row_norms():
    torch.manual_seed(0)
    model = ResNet()
    groups = psi_cuda.param_groups(model, lr=0.1, weight_decay=1e-4, momentum=0.9)
    opt = PSISGD(groups, lr=0.1, momentum=0.9)
    channel = [p for g in opt.param_groups if g["manifold"] == "channel" for p in g["params"]]
    norms0 = [p.detach().flatten(1).norm(dim=1).clone() for p in channel]
    fc0 = model.fc.weight.detach().clone()
    conv0 = model.block1.conv1.weight.detach().clone()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    for p, n0 in zip(channel, norms0):
        torch.testing.assert_close(p.detach().flatten(1).norm(dim=1), n0, rtol=1e-5, atol=0)
    assert not torch.equal(model.fc.weight, fc0)
    assert not torch.equal(model.block1.conv1.weight, conv0)  # moved, on its sphere


def test_routing_frozen_and_exactly_once():
    torch.manual_seed(0)
    model = TransformerBlock()
    model.head.bias.requires_grad_(False)
    model.o.weight.requires_grad_(False)     # a frozen candidate is excluded, not grouped
    groups = psi_cuda.param_groups(model, lr=0.1, psi_lr=0.02, weight_decay=5e-4,
                                   momentum=0.9, nesterov=True)
    assert [g["manifold"] for g in groups] == ["tensor", None]
    tensor, euclid = groups
    assert tensor["lr"] == 0.02 and tensor["weight_decay"] == 0.0
    assert euclid["lr"] == 0.1 and euclid["weight_decay"] == 5e-4
    for g in groups:
        assert g["momentum"] == 0.9 and g["nesterov"] is True
        assert set(g) == {"params", "manifold", "lr", "weight_decay", "momentum", "nesterov"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len(trainable) == len({id(p) for p in listed})
    assert {id(p) for p in listed} == {id(p) for p in trainable}
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for g in groups:
        idx = [order[id(p)] for p in g["params"]]
        assert idx == sorted(idx)
    assert tensor["params"] == [model.q.weight, model.up.weight]
    PSISGD(groups, lr=0.1, momentum=0.9)  # accepted as is

    default_lr = psi_cuda.param_groups(model, lr=0.3)
    assert all(g["lr"] == 0.3 for g in default_lr)


def test_argument_errors():
    model = ResNet()
    with pytest.raises(TypeError, match="manifold"):
        psi_cuda.param_groups(model, lr=0.1, manifold="channel")
    with pytest.raises(ValueError, match="sample_input"):
        psi_cuda.param_groups(model, lr=0.1, verify=True)


# ------------------------------------------------------- the optimizers built from the model


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_optimizer_from_model_uses_param_groups_without_warnings(cls):
    """``PSISGD(model, lr)``: the conv weights that feed BatchNorm on the channel manifold, every
    other parameter (BN affine, biases, classifier) Euclidean with the weight decay; no warning."""
    torch.manual_seed(0)
    model = ResNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cls(model, lr=0.1, psi_lr=0.05, weight_decay=5e-4)
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        opt.step()
    expected = psi_cuda.param_groups(model, lr=0.1, psi_lr=0.05, weight_decay=5e-4)
    assert [(g["manifold"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == \
        [("channel", 0.05, 0.0), (None, 0.1, 5e-4)]
    assert psi_names(model, opt.param_groups, "channel") == RESNET_CHANNEL
    for g, e in zip(opt.param_groups, expected):
        assert [id(p) for p in g["params"]] == [id(p) for p in e["params"]]


def test_optimizer_from_model_passes_verify_through():
    model = ResNet()
    with pytest.raises(ValueError, match="verify=True\\) needs sample_input"):
        PSISGD(model, lr=0.1, verify=True)
    opt = PSISGD(model, lr=0.1, verify=True, sample_input=torch.randn(4, 3, 8, 8))
    assert psi_names(model, opt.param_groups, "channel") == RESNET_CHANNEL


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_plain_parameter_list_needs_a_manifold(cls):
    """A plain parameter list does not say which weights are scale invariant: an error that says
    what to pass, not a silent channel manifold for every tensor."""
    model = ResNet()
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no 'manifold'.*pass the model"):
        cls(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\] has no 'manifold'"):
        cls([{"params": [model.fc.weight], "manifold": None}, {"params": [model.fc.bias]}],
            lr=0.1)
    # Said once for all groups (a keyword) or per group.
    opt = cls(model.parameters(), lr=0.1, manifold=None)
    assert [g["manifold"] for g in opt.param_groups] == [None]
    opt = cls([{"params": [model.stem[0].weight]}], lr=0.1, manifold="tensor")
    opt.add_param_group({"params": [model.fc.weight], "manifold": "euclidean"})
    assert [g["manifold"] for g in opt.param_groups] == ["tensor", None]
    # psi_lr / verify / sample_input belong to param_groups(model): not to a parameter list.
    with pytest.raises(TypeError, match="psi_lr apply when the first argument is the model"):
        cls(model.parameters(), lr=0.1, manifold=None, psi_lr=0.01)
    with pytest.raises(TypeError, match="manifolds come from psi_cuda.param_groups"):
        cls(model, lr=0.1, manifold="channel")


@pytest.mark.parametrize("cls", [PSISGD, PSIAdam])
def test_required_manifold_survives_pickle_and_deepcopy(cls):
    model = ResNet()
    opt = cls(model, lr=0.1)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        with pytest.raises(ValueError, match="has no 'manifold'"):
            twin.add_param_group({"params": [torch.randn(3, 3, requires_grad=True)]})


def test_one_warning_per_group_for_vectors_on_channel_groups():
    """100 1-D tensors in a channel group: one warning that counts them and lists their shapes."""
    vectors = [torch.randn(4 + i % 3, requires_grad=True) for i in range(100)]
    matrix = torch.randn(4, 4, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PSISGD([matrix] + vectors, lr=0.1, manifold="channel")
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "100 of its 101 tensors are 1-D" in text and "(4,), (5,), (6,)" in text


# --- per-head QK-norm: block groups found in the graph ------------------------------------------

class HeadsAttention(nn.Module):
    """Hand-written attention with per-head QK-norm, in the ways models write the split."""

    def __init__(self, mode, dim=16, heads=4, norm=nn.RMSNorm, affine=True, bias=False):
        super().__init__()
        self.mode, self.h, self.d = mode, heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=bias)
        self.wk = nn.Linear(dim, dim, bias=bias)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.q_norm = norm(self.d, elementwise_affine=affine)
        self.k_norm = norm(self.d, elementwise_affine=affine)
        self.wo = nn.Linear(dim, dim)

    def split(self, t, B, T):
        if self.mode == "view":
            return self.q_or_k_transpose(t.view(B, T, self.h, self.d))
        if self.mode == "reshape_minus1":
            return t.reshape(B, T, -1, self.d).transpose(1, 2)
        return t.unflatten(-1, (self.h, self.d)).transpose(-3, -2)  # unflatten

    def q_or_k_transpose(self, t):
        return t.transpose(1, 2)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_norm(self.split(self.wq(x), B, T))  # (B, H, T, D), normalized over D
        k = self.k_norm(self.split(self.wk(x), B, T))
        v = self.wv(x).view(B, T, self.h, self.d).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, dim=-1) @ v
        return self.wo(a.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("mode", ["view", "reshape_minus1", "unflatten"])
@pytest.mark.parametrize("norm,affine", [(nn.RMSNorm, True), (nn.LayerNorm, False)])
def test_per_head_qk_norm_gives_block_groups(mode, norm, affine):
    torch.manual_seed(0)
    model = HeadsAttention(mode, norm=norm, affine=affine)
    x = torch.randn(3, 5, 16)
    groups = psi_cuda.param_groups(model, lr=0.1)
    assert psi_names(model, groups, "block") == {"wq.weight", "wk.weight"}
    assert [g["block_rows"] for g in groups if g["manifold"] == "block"] == [4]
    for name in ("wq.weight", "wk.weight"):  # per-head invariance holds, per-row does not
        assert _output_change(model, name, "block4", x) < 1e-9
        assert _output_change(model, name, "rows", x) > 1e-4
    assert "wv.weight" in psi_names(model, groups, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verified = psi_cuda.param_groups(model, lr=0.1, verify=True, sample_input=x)
    assert psi_names(model, verified, "block") == {"wq.weight", "wk.weight"}


def test_per_head_norm_not_proven_stays_euclidean():
    """A bias, or a norm over something else than the head dim, is not a block group."""
    torch.manual_seed(0)
    biased = HeadsAttention("view", bias=True)
    assert psi_names(biased, psi_cuda.param_groups(biased, lr=0.1), "block") == set()

    class WrongDim(HeadsAttention):
        def forward(self, x):
            B, T, _ = x.shape
            q = self.wq(x).view(B, T, self.h, self.d).transpose(-1, -2)  # D no longer last
            return self.q_norm(q.transpose(-1, -2).contiguous()).sum()

    wrong = WrongDim("view")
    assert "wq.weight" not in psi_names(wrong, psi_cuda.param_groups(wrong, lr=0.1), "block")
