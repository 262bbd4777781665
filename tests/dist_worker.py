"""Worker of tests/test_distributed.py: run by ``torchrun --nproc-per-node 2`` on CPU (gloo).

Every scenario compares a 2-rank run (DDP, FSDP2, BNP sync_stats, DCP resume) with an
independent oracle computed in the same process: the single-process run on the whole batch
(plain tensors, no process group involved), or an uninterrupted run. Rank 0 writes the measured
differences to the JSON file given as argv[1] (argv[2]: a folder both ranks can write
checkpoints to); tests/test_distributed.py asserts on them.
"""
from __future__ import annotations

import copy
import json
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import psi_cuda
from psi_cuda.optim import BNPSGD, PSIAdam, PSISGD

RANK = WORLD = 0
MESH = None
RESULTS: dict = {}


class Net(nn.Module):
    """Channel groups (conv -> BatchNorm, 5 rows: shards of 3 and 2; a 1-row Linear -> BN1d:
    rank 1 holds none of it), a tensor group (bias-free Linear -> LayerNorm, 7 rows) and
    Euclidean parameters. ``per_sample=True`` swaps the BatchNorms for per-sample norms
    (GroupNorm with one channel per group) so that a half batch gives the same per-sample
    outputs as the whole batch (the DDP scenarios)."""

    def __init__(self, per_sample: bool = False):
        super().__init__()
        # No conv bias: the norm removes it, its gradient is rounding noise that Adam would
        # normalise to lr-sized steps of arbitrary sign.
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn = nn.GroupNorm(5, 5) if per_sample else nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5, 7, bias=False)
        self.ln = nn.LayerNorm(7)
        self.per_sample = per_sample
        if not per_sample:
            self.fc2 = nn.Linear(7, 1, bias=False)
            self.bn2 = nn.BatchNorm1d(1)
        self.head = nn.Linear(8 if not per_sample else 7, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        t = F.relu(self.ln(self.fc1(h)))
        if not self.per_sample:
            t = torch.cat([t, self.bn2(self.fc2(t))], 1)
        return self.head(t)


class BNPNet(nn.Module):
    """A BN-free net for BNP: conv (bias) -> relu -> linear (bias) -> linear (no bias)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.out(F.relu(self.fc(h)))


class BlockNet(nn.Module):
    """Block groups (docs/ALGORITHMS.md 1.2b) that the 2-rank shards cut or not: a bias-free
    conv into GroupNorm(3, 12) (blocks of 4 rows; 12 rows as 6 + 6: the boundary falls inside
    block 1), a per-head query projection (8 rows, heads of 4: 4 + 4, the boundary between
    blocks: no communication) and key projection (10 rows, heads of 2: 5 + 5, inside block 2),
    each head normalized (LayerNorm, RMSNorm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(3, 12)
        self.q = nn.Linear(12, 8, bias=False)
        self.q_norm = nn.LayerNorm(4)
        self.k = nn.Linear(12, 10, bias=False)
        self.k_norm = nn.RMSNorm(2)
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.conv(x))).mean((2, 3))
        q = self.q_norm(self.q(h).view(-1, 2, 4)).flatten(1)
        k = self.k_norm(self.k(h).view(-1, 5, 2)).flatten(1)
        return self.head(torch.cat([q, k], 1))


BLOCKS = {"conv.weight": 4, "q.weight": 4, "k.weight": 2}


def block_groups(model):
    named = dict(model.named_parameters())
    return ([{"params": [named[n]], "manifold": "block", "block_rows": b}
             for n, b in BLOCKS.items()]
            + [{"params": [p for n, p in named.items() if n not in BLOCKS], "manifold": None}])


def make_block_opt(kind, model):
    if kind == "psisgd":
        return PSISGD(block_groups(model), lr=0.05, momentum=0.9)
    return PSIAdam(block_groups(model), lr=0.01)


def shard_blocks(model):
    for name in ("conv", "q", "k"):
        fully_shard(getattr(model, name), mesh=MESH)
    fully_shard(model, mesh=MESH)
    return model


def block_norms(model):
    named = {n: full(p).detach() for n, p in model.named_parameters()}
    return {n: named[n].reshape(named[n].size(0) // b, -1).norm(dim=1) for n, b in BLOCKS.items()}


def scenario_fsdp_blocks():
    """FSDP2 with block groups == the unsharded run; whole blocks need no all-reduce."""
    for kind in ("psisgd", "psiadam"):
        torch.manual_seed(0)
        ref = BlockNet()
        init = copy.deepcopy(ref)
        model = shard_blocks(copy.deepcopy(ref))
        n0 = block_norms(ref)
        opt_ref, opt = make_block_opt(kind, ref), make_block_opt(kind, model)
        train(ref, opt_ref, 4)
        train(model, opt, 4)
        # the all-reduces of one optimizer step, per param group (FSDP's own collectives run in
        # forward/backward, not in the step)
        x, y = data(99)
        opt.zero_grad()
        opt_ref.zero_grad()
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        calls = []
        real = dist.all_reduce

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        per_group = []
        dist.all_reduce = counting
        try:
            for gi, group in enumerate(opt.param_groups):
                before = len(calls)
                opt._step_group(group, gi, None, None, [])
                per_group.append(len(calls) - before)
        finally:
            dist.all_reduce = real
        opt_ref.step()
        n1 = block_norms(model)
        named = dict(model.named_parameters())
        extra = {}
        if kind == "psiadam":
            v = opt.state[named["conv.weight"]]["exp_avg_sq"]
            v_ref = opt_ref.state[dict(ref.named_parameters())["conv.weight"]]["exp_avg_sq"]
            extra = dict(v_rows_dtensor=isinstance(v, DTensor) and v.shape == (12,),
                         v_diff=(full(v).view(3, 4) - v_ref.view(3, 1)).abs().max().item())
        record(f"fsdp_blocks_{kind}", max_diff=max_diff(ref, model), moved=max_diff(init, model),
               block_norm_change=max((n1[n] - n0[n]).abs().max().item() for n in n0),
               local_rows=[named[n].to_local().size(0) for n in BLOCKS],
               all_reduces=per_group, **extra)


CHANNEL = ("conv.weight", "fc2.weight")
TENSOR = ("fc1.weight",)


def groups(model, **tensor_opts):
    """Hand-written groups by name (the names survive fully_shard, the tensors do not)."""
    named = dict(model.named_parameters())
    return [{"params": [named[n] for n in CHANNEL if n in named], "manifold": "channel"},
            {"params": [named[n] for n in TENSOR], "manifold": "tensor", **tensor_opts},
            {"params": [p for n, p in named.items() if n not in CHANNEL + TENSOR],
             "manifold": None}]


def data(step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_diff(model_a, model_b) -> float:
    sa, sb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    sb = {k.removeprefix("module."): v for k, v in sb.items()}
    return max((full(sa[k]).detach() - full(sb[k]).detach()).abs().max().item() for k in sa)


def train(model, opt, steps, *, first=0, shard=None, bnp_model=False):
    for s in range(first, first + steps):
        x, y = data(s)
        if shard is not None:  # this rank's half of the batch
            x, y = x.chunk(WORLD)[shard], y.chunk(WORLD)[shard]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def make_opt(kind, model):
    if kind == "psisgd":
        return PSISGD(groups(model, retraction="exp", transport="parallel", max_grad_norm=0.5),
                      lr=0.05, momentum=0.9, nesterov=True)
    if kind == "psiadam":
        return PSIAdam(groups(model), lr=0.01, weight_decay=0.1)
    raise ValueError(kind)


def record(name, **values):
    RESULTS[name] = values


# --- (a) DDP: 2 ranks with half batches == one process with the whole batch ----------------------

def scenario_ddp():
    for kind in ("psisgd", "psiadam"):
        torch.manual_seed(0)
        ref = Net(per_sample=True)
        model = copy.deepcopy(ref)
        train(ref, make_opt(kind, ref), 4)
        ddp = DDP(model)
        train(ddp, make_opt(kind, ddp.module), 4, shard=RANK)
        record(f"ddp_{kind}", max_diff=max_diff(ref, ddp.module))
    # BNPSGD: the statistics must be synchronised for the preconditioner to be the whole batch's.
    for sync in (True, False):
        torch.manual_seed(0)
        ref = BNPNet()
        model = copy.deepcopy(ref)
        train(ref, BNPSGD(ref, lr=0.01, momentum=0.9), 4)
        ddp = DDP(model)
        train(ddp, BNPSGD(ddp.module, lr=0.01, momentum=0.9, sync_stats=sync), 4, shard=RANK)
        record(f"ddp_bnpsgd_sync{int(sync)}", max_diff=max_diff(ref, ddp.module))


# --- (c) BNP sync_stats: statistics of half batches, averaged == the whole batch's ----------------

def scenario_sync_stats():
    for sync in (True, False):
        torch.manual_seed(0)
        ref = BNPNet()
        model = copy.deepcopy(ref)
        bnp_ref = psi_cuda.BNP(ref)
        bnp = psi_cuda.BNP(model, sync_stats=sync)
        for s in range(3):
            x, _ = data(s)
            ref(x)
            model(x.chunk(WORLD)[RANK])
        diff = max(max((a.mean - b.mean).abs().max().item(),
                       (a.sqmean - b.sqmean).abs().max().item())
                   for a, b in zip(bnp_ref.layers, bnp.layers))
        scale = max(b.sqmean.abs().max().item() for b in bnp_ref.layers)
        record(f"sync_stats{int(sync)}", max_diff=diff, scale=scale)


# --- (b) FSDP2: sharded steps == unsharded steps on the same data ---------------------------------

def shard(model):
    fully_shard(model.fc1, mesh=MESH)
    fully_shard(model, mesh=MESH)
    return model


def norms(model):
    named = {n: full(p).detach() for n, p in model.named_parameters()}
    rows = {n: named[n].reshape(named[n].size(0), -1).norm(dim=1) for n in CHANNEL if n in named}
    whole = {n: named[n].norm() for n in TENSOR}
    return rows, whole


def scenario_fsdp():
    for kind in ("psisgd", "psiadam"):
        torch.manual_seed(0)
        ref = Net()
        init = copy.deepcopy(ref)
        model = shard(copy.deepcopy(ref))
        rows0, whole0 = norms(ref)
        opt_ref, opt = make_opt(kind, ref), make_opt(kind, model)
        train(ref, opt_ref, 5)
        train(model, opt, 5)
        rows, whole = norms(model)
        st = opt.state
        named = dict(model.named_parameters())
        w_conv, w_fc1 = named["conv.weight"], named["fc1.weight"]
        buf_key = "momentum_buffer" if kind == "psisgd" else "exp_avg"
        layout = {
            "param_local_rows": [named[n].to_local().size(0) for n in ("conv.weight",
                                                                      "fc1.weight",
                                                                      "fc2.weight")],
            "buf_is_dtensor_shard0": isinstance(st[w_conv][buf_key], DTensor)
            and st[w_conv][buf_key].placements == (Shard(0),)
            and st[w_fc1][buf_key].to_local().shape == w_fc1.to_local().shape,
            "step_is_plain": not isinstance(st[w_conv]["step"], DTensor),
        }
        if kind == "psiadam":
            v_rows, v_tensor = st[w_conv]["exp_avg_sq"], st[w_fc1]["exp_avg_sq"]
            layout["rows_v_dtensor"] = (isinstance(v_rows, DTensor) and v_rows.shape == (5,)
                                        and v_rows.to_local().shape == (w_conv.to_local().size(0),))
            layout["tensor_v_plain"] = not isinstance(v_tensor, DTensor) and v_tensor.shape == ()
        record(f"fsdp_{kind}", max_diff=max_diff(ref, model),
               row_norm_change=max((rows[n] - rows0[n]).abs().max().item() for n in rows),
               tensor_norm_change=max((whole[n] - whole0[n]).abs().item() for n in whole),
               moved=max_diff(init, model),
               **layout)


def scenario_fsdp_amp():
    """GradScaler's hand-off under FSDP2: found_inf set -> nothing changes; grads scaled by 4 with
    grad_scale=4 -> the unscaled step."""
    torch.manual_seed(0)
    ref = Net()
    model = shard(copy.deepcopy(ref))
    for kind in ("psisgd", "psiadam"):
        opt_ref, opt = make_opt(kind, ref), make_opt(kind, model)
        x, y = data(0)
        for m in (ref, model):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        before = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
        opt.step()
        skipped = max((full(p).detach() - before[n]).abs().max().item()
                      for n, p in model.named_parameters())
        steps_after_skip = [s["step"].item() for s in opt.state.values()]
        for p in model.parameters():
            p.grad.mul_(4)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        opt_ref.step()
        record(f"fsdp_amp_{kind}", skipped_change=skipped,
               steps_after_skip=max(steps_after_skip), max_diff=max_diff(ref, model))


def scenario_fsdp_grad_scaler():
    """torch.amp.GradScaler end to end under FSDP2 (its found_inf is all-reduced by DTensor),
    including a step with an inf loss scale overflow, against the unsharded run."""
    torch.manual_seed(0)
    ref = Net()
    model = shard(copy.deepcopy(ref))
    opts = [make_opt("psiadam", ref), make_opt("psiadam", model)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) for _ in range(2)]
    skipped = []
    for s in range(4):
        x, y = data(s)
        for m, opt, scaler in zip((ref, model), opts, scalers):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            if s == 1:
                loss = loss * float("inf")  # overflow: this step must be skipped everywhere
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        skipped.append(scalers[1].get_scale())
    record("fsdp_grad_scaler", max_diff=max_diff(ref, model), scales=skipped,
           steps=max(s["step"].item() for s in opts[1].state.values()))


def scenario_fsdp_bnpsgd():
    torch.manual_seed(0)
    ref = BNPNet()
    model = copy.deepcopy(ref)
    opt_ref = BNPSGD(ref, lr=0.01, momentum=0.9)
    bnp = psi_cuda.BNP(model, sync_stats=True)
    fully_shard(model, mesh=MESH)
    opt = BNPSGD(model, lr=0.01, momentum=0.9, bnp=bnp)
    train(ref, opt_ref, 4)
    train(model, opt, 4)
    record("fsdp_bnpsgd", max_diff=max_diff(ref, model),
           sharded=isinstance(model.fc.weight, DTensor))


def scenario_errors():
    """A channel group sharded on dim 1 is refused before anything is written."""
    w = torch.randn(4, 6)
    p = nn.Parameter(distribute_tensor(w, MESH, [Shard(1)]))
    p.grad = distribute_tensor(torch.randn(4, 6), MESH, [Shard(1)])
    q = nn.Parameter(torch.randn(3, 3))
    q.grad = torch.randn(3, 3)
    q0 = q.detach().clone()
    opt = PSISGD([{"params": [q], "manifold": None}, {"params": [p], "manifold": "channel"}],
                 lr=0.1)
    try:
        opt.step()
        msg = ""
    except ValueError as e:
        msg = str(e)
    record("error_shard1", message=msg, untouched=bool(torch.equal(q.detach(), q0)
                                                       and torch.equal(full(p).detach(), w)))
    # An unreduced (Partial) gradient is refused too.
    from torch.distributed.tensor import Partial, Replicate
    r = nn.Parameter(distribute_tensor(torch.randn(4, 6), MESH, [Replicate()]))
    r.grad = DTensor.from_local(torch.randn(4, 6), MESH, [Partial()])
    try:
        PSIAdam([{"params": [r], "manifold": "tensor"}]).step()
        msg = ""
    except RuntimeError as e:
        msg = str(e)
    record("error_partial", message=msg)


# --- (d) DCP: save under FSDP2, load into fresh objects, continue == uninterrupted ----------------

def scenario_dcp(folder):
    for kind in ("psisgd", "psiadam", "bnpsgd", "psiadam_blocks"):
        def build(seed):
            torch.manual_seed(seed)
            if kind == "psiadam_blocks":
                m = shard_blocks(BlockNet())
                return m, make_block_opt("psiadam", m)
            if kind == "bnpsgd":
                m = BNPNet()
                bnp = psi_cuda.BNP(m, sync_stats=True)
                fully_shard(m, mesh=MESH)
                return m, BNPSGD(m, lr=0.01, momentum=0.9, bnp=bnp)
            m = shard(Net())
            return m, make_opt(kind, m)

        model, opt = build(0)
        train(model, opt, 3)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        if kind == "bnpsgd":
            state["bnp"] = opt.bnp.state_dict()
        path = f"{folder}/{kind}"
        dcp.save(state, checkpoint_id=path)
        train(model, opt, 3, first=3)

        fresh, fresh_opt = build(1)
        state = {"model": get_model_state_dict(fresh),
                 "optim": get_optimizer_state_dict(fresh, fresh_opt)}
        if kind == "bnpsgd":
            state["bnp"] = fresh_opt.bnp.state_dict()
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
        if kind == "bnpsgd":
            fresh_opt.bnp.load_state_dict(state["bnp"])
        train(fresh, fresh_opt, 3, first=3)

        def flat_state(o):
            out = []
            for p in (p for g in o.param_groups for p in g["params"]):
                for k, v in sorted(o.state[p].items()):
                    out.append(full(v).detach())
            return out

        sa, sb = flat_state(opt), flat_state(fresh_opt)
        state_equal = len(sa) == len(sb) > 0 and all(torch.equal(a, b) for a, b in zip(sa, sb))
        params_equal = all(torch.equal(full(a).detach(), full(b).detach())
                           for a, b in zip(model.parameters(), fresh.parameters()))
        record(f"dcp_{kind}", params_equal=params_equal, state_equal=state_equal,
               n_state=len(sa), max_diff=max_diff(model, fresh))


def main():
    global RANK, WORLD, MESH
    dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    MESH = init_device_mesh("cpu", (WORLD,))
    torch.set_num_threads(1)
    scenarios = [scenario_ddp, scenario_sync_stats, scenario_fsdp, scenario_fsdp_amp,
                 scenario_fsdp_grad_scaler, scenario_fsdp_bnpsgd, scenario_fsdp_blocks,
                 scenario_errors, lambda: scenario_dcp(sys.argv[2])]
    for fn in scenarios:
        try:
            fn()
        except Exception:  # recorded, so one broken scenario does not hide the others
            RESULTS[f"crash_{getattr(fn, '__name__', 'dcp')}_{len(RESULTS)}"] = {
                "traceback": traceback.format_exc()}
            raise
    if RANK == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(RESULTS, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.2)  # let gloo's workers drop their last works first: see examples/train_large.py


if __name__ == "__main__":
    main()
