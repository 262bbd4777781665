"""Distributed training: DDP, FSDP2 (DTensor parameters), BNP sync_stats, DCP checkpoints.

One ``torchrun --nproc-per-node 2`` run of tests/dist_worker.py (CPU, gloo) computes every
multi-rank scenario against its oracle (the single-process run on the whole batch, or an
uninterrupted run); the tests below assert on what it measured. The single-process tests check
the step of sharded tensor groups (psi_cuda.distributed: fused psi_grams + grams=, and the torch
path of the reference backend) against the fused op on whole tensors, over the options, with a
one-rank process group (the same code path, one all-reduce of one rank), and the split of block
groups by shard boundaries (distributed.block_pieces) over many shapes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from psi_cuda import distributed, ops
from psi_cuda.optim import PSIAdam, PSISGD

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def torchrun(args: list[str], timeout: int = 600, nproc: int = 2, **env):
    """Runs ``torchrun --standalone`` (a free port) with this interpreter and psi_cuda on the
    path; returns the CompletedProcess."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    out = folder / "results.json"
    proc = torchrun([str(WORKER), str(out), str(folder / "ckpt")])
    assert proc.returncode == 0 and out.exists(), \
        f"worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


# --- (a) DDP -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["psisgd", "psiadam"])
def test_ddp_half_batches_equal_whole_batch(results, kind):
    assert results[f"ddp_{kind}"]["max_diff"] < 1e-6


def test_ddp_bnpsgd_with_sync_stats_equals_whole_batch(results):
    assert results["ddp_bnpsgd_sync1"]["max_diff"] < 1e-5
    # Without the synchronisation each rank preconditions with its half batch's statistics.
    assert results["ddp_bnpsgd_sync0"]["max_diff"] > 1e-3


# --- (c) BNP sync_stats -----------------------------------------------------------------------

def test_sync_stats_equal_whole_batch_statistics(results):
    r = results["sync_stats1"]
    assert r["max_diff"] <= 4 * torch.finfo(torch.float32).eps * r["scale"]
    assert results["sync_stats0"]["max_diff"] > 1e-3  # the halves really differ


# --- (b) FSDP2 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["psisgd", "psiadam"])
def test_fsdp2_sharded_steps_equal_unsharded(results, kind):
    r = results[f"fsdp_{kind}"]
    assert r["moved"] > 1e-2  # five steps really moved the parameters
    assert r["max_diff"] < 1e-6
    assert r["row_norm_change"] < 1e-6 and r["tensor_norm_change"] < 1e-6
    # uneven shards: 5 conv rows as 3 + 2, 7 tensor-group rows as 4 + 3, 1 row as 1 + 0
    assert r["param_local_rows"] == [3, 4, 1]
    assert r["buf_is_dtensor_shard0"] and r["step_is_plain"]
    if kind == "psiadam":
        assert r["rows_v_dtensor"] and r["tensor_v_plain"]


@pytest.mark.parametrize("kind", ["psisgd", "psiadam"])
def test_fsdp2_grad_scaler_handoff(results, kind):
    r = results[f"fsdp_amp_{kind}"]
    assert r["skipped_change"] == 0.0 and r["steps_after_skip"] == 0.0
    assert r["max_diff"] < 1e-6


def test_fsdp2_torch_grad_scaler(results):
    r = results["fsdp_grad_scaler"]
    assert r["steps"] == 3.0  # 4 steps, the overflowing one skipped
    assert r["scales"][1] == r["scales"][0] / 2  # the scaler saw the overflow and backed off
    assert r["max_diff"] < 1e-6


def test_fsdp2_bnpsgd_equals_unsharded(results):
    r = results["fsdp_bnpsgd"]
    assert r["sharded"] and r["max_diff"] < 1e-6


@pytest.mark.parametrize("kind", ["psisgd", "psiadam"])
def test_fsdp2_block_groups_equal_unsharded(results, kind):
    """Uneven shards whose boundaries fall inside a block (GroupNorm conv: 12 rows as 6 + 6 in
    blocks of 4; per-head keys: 10 rows as 5 + 5 in heads of 2) and between blocks (per-head
    queries: 8 rows as 4 + 4 in heads of 4): the unsharded run, blocks keep their norms, and
    the group whose blocks all lie inside a shard makes no all-reduce."""
    r = results[f"fsdp_blocks_{kind}"]
    assert r["moved"] > 1e-2
    assert r["max_diff"] < 1e-6
    assert r["block_norm_change"] < 1e-5
    assert r["local_rows"] == [6, 4, 5]
    assert r["all_reduces"] == [1, 0, 1, 0]  # conv, q (aligned), k, Euclidean
    if kind == "psiadam":  # the second moment of a sharded block group: per row, a DTensor
        assert r["v_rows_dtensor"] and r["v_diff"] < 1e-6


def test_channel_group_sharded_on_dim1_is_refused(results):
    r = results["error_shard1"]
    assert "manifold='channel'" in r["message"] and "Shard(dim=1)" in r["message"]
    assert r["untouched"]
    assert "Partial" in results["error_partial"]["message"]


# --- (d) DCP ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["psisgd", "psiadam", "bnpsgd", "psiadam_blocks"])
def test_dcp_resume_is_bit_for_bit(results, kind):
    r = results[f"dcp_{kind}"]
    assert r["n_state"] > 0 and r["params_equal"] and r["state_equal"] and r["max_diff"] == 0.0


# --- sharded tensor groups, one rank: the pure-torch path against the fused op ------------------

@pytest.fixture
def one_rank_mesh():
    from torch.distributed.tensor import init_device_mesh
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9, nesterov=True, max_grad_norm=0.3),
    dict(momentum=0.9, dampening=0.5, maximize=True),
    dict(momentum=0.9, retraction="exp", transport="parallel"),
    dict(momentum=0.9, retraction="none"),
]
ADAM_CASES = [dict(), dict(retraction="exp", transport="parallel", max_grad_norm=0.2),
              dict(retraction="none", maximize=True)]


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (3, 2, 3), (1, 5), (0, 3), (2, 1)]
    ws = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ws[1].zero_()  # a zero group does not move
    gs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return ws, gs


# The two ways of the sharded path: the fused ops (psi_grams, then psi_sgd_/psi_adam_ with
# grams=) and the torch one of the reference backend (each optimizer's GroupSolve).
PATHS = [pytest.param(ops.psi_grams, id="fused"), pytest.param(None, id="torch")]


@pytest.mark.parametrize("grams_fn", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind,opts", [("sgd", c) for c in SGD_CASES] +
                         [("adam", c) for c in ADAM_CASES])
def test_sharded_tensor_groups_match_fused_op(one_rank_mesh, dtype, kind, opts, grams_fn):
    from torch.distributed.tensor import Shard, distribute_tensor
    ws, gs = _tensors(dtype)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    n = len(ws)
    lr = 0.1
    state_fused = [torch.zeros_like(w, dtype=opmath) for w in ws]
    state_dt = [distribute_tensor(m.clone(), one_rank_mesh, [Shard(0)]) for m in state_fused]
    w_fused = [w.clone() for w in ws]
    w_dt = [distribute_tensor(w.clone(), one_rank_mesh, [Shard(0)]) for w in ws]
    steps_f = [torch.zeros(()) for _ in range(n)]
    steps_d = [torch.zeros(()) for _ in range(n)]
    v_f = [torch.zeros((), dtype=opmath) for _ in range(n)]
    v_d = [torch.zeros((), dtype=opmath) for _ in range(n)]
    opts = dict(opts)
    for it in range(3):
        g_f = [(g * (it + 1)).clone() for g in gs]
        g_d = [distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)]) for g in g_f]
        scale = torch.tensor(2.0) if it == 1 else None
        if scale is not None:
            g_f = [g * 2 for g in g_f]
            g_d = [g * 2 for g in g_d]
        if kind == "sgd":
            mom = opts.get("momentum", 0.0)
            ops.psi_sgd_(w_fused, g_f, state_fused if mom else [], steps_f, lr=lr,
                         manifold="tensor", grad_scale=scale, **opts)
            distributed.step_call(ops.psi_sgd_, [w_dt, g_d, state_dt if mom else [], steps_d],
                                  manifold="tensor", solve=PSISGD.solve, lr=lr,
                                  grad_scale=scale, grams_fn=grams_fn,
                                  **{**dict(momentum=0.0, dampening=0.0, nesterov=False,
                                            weight_decay=0.0, maximize=False,
                                            retraction="normalize", transport="project",
                                            max_grad_norm=None), **opts})
        else:
            ops.psi_adam_(w_fused, g_f, state_fused, v_f, steps_f, lr=lr, manifold="tensor",
                          grad_scale=scale, **opts)
            distributed.step_call(ops.psi_adam_, [w_dt, g_d, state_dt, v_d, steps_d],
                                  manifold="tensor", solve=PSIAdam.solve, lr=lr,
                                  grad_scale=scale, grams_fn=grams_fn,
                                  **{**dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                            maximize=False, retraction="normalize",
                                            transport="project", max_grad_norm=None), **opts})
    # float32: both are about 1e-5 from the float64 result on the exp/parallel case (the buffer
    # coefficients cancel); bfloat16: an ulp.
    tol = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4),
           torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}[dtype]
    for a, b in zip(w_fused, w_dt):
        torch.testing.assert_close(b.to_local(), a, **tol)
    for a, b in zip(state_fused, state_dt):
        torch.testing.assert_close(b.to_local(), a, **tol)
    for a, b in zip(steps_f, steps_d):
        assert a.item() == b.item() == 3
    if kind == "adam":
        for a, b in zip(v_f, v_d):
            torch.testing.assert_close(b, a, **tol)
    assert torch.equal(w_dt[1].to_local(), ws[1])  # the zero group did not move
    assert not torch.equal(w_dt[0].to_local(), ws[0])


@pytest.mark.parametrize("grams_fn", PATHS)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_sharded_tensor_group_nonfinite_gradient_propagates(one_rank_mesh, kind, grams_fn):
    """The one non-finite policy on the sharded path too (docs/ALGORITHMS.md 6.6): a NaN in a
    tensor group's gradient makes that group NaN, as the fused op does; the others step as the
    fused op steps them."""
    from torch.distributed.tensor import Shard, distribute_tensor
    ws, gs = _tensors(torch.float32)
    gs[0][2, 1] = float("nan")
    w_f = [x.clone() for x in ws]
    w_d = [distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)]) for x in ws]
    g_d = [distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)]) for x in gs]
    m_f = [torch.zeros_like(x) for x in ws]
    m_d = [distribute_tensor(torch.zeros_like(x), one_rank_mesh, [Shard(0)]) for x in ws]
    s_f = [torch.zeros(()) for _ in ws]
    s_d = [torch.zeros(()) for _ in ws]
    common = dict(maximize=False, retraction="normalize", transport="project",
                  max_grad_norm=None, weight_decay=0.0)
    if kind == "sgd":
        opts = dict(momentum=0.9, dampening=0.0, nesterov=False, **common)
        ops.psi_sgd_(w_f, [g.clone() for g in gs], m_f, s_f, lr=0.1, manifold="tensor", **opts)
        distributed.step_call(ops.psi_sgd_, [w_d, g_d, m_d, s_d], manifold="tensor",
                              solve=PSISGD.solve, lr=0.1, grad_scale=None, grams_fn=grams_fn,
                              **opts)
    else:
        v_f = [torch.zeros(()) for _ in ws]
        v_d = [torch.zeros(()) for _ in ws]
        opts = dict(beta1=0.9, beta2=0.999, eps=1e-8, **common)
        ops.psi_adam_(w_f, [g.clone() for g in gs], m_f, v_f, s_f, lr=0.1, manifold="tensor",
                      **opts)
        distributed.step_call(ops.psi_adam_, [w_d, g_d, m_d, v_d, s_d], manifold="tensor",
                              solve=PSIAdam.solve, lr=0.1, grad_scale=None, grams_fn=grams_fn,
                              **opts)
        assert torch.isnan(v_f[0]) and torch.isnan(v_d[0])
    assert torch.isnan(w_f[0]).all() and torch.isnan(w_d[0].to_local()).all()
    assert torch.isnan(m_d[0].to_local()).all()
    for a, b in zip(w_f[1:], w_d[1:]):
        torch.testing.assert_close(b.to_local(), a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grams_fn", PATHS)
def test_sharded_tensor_group_found_inf_changes_nothing(one_rank_mesh, grams_fn):
    from torch.distributed.tensor import Shard, distribute_tensor
    ws, gs = _tensors(torch.float32)
    w = [distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)]) for x in ws]
    g = [distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)]) for x in gs]
    g[0].to_local()[0, 0] = float("inf")
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros(()) for _ in w]
    steps = [torch.ones(()) for _ in w]
    distributed.step_call(ops.psi_adam_, [w, g, m, v, steps], manifold="tensor",
                          solve=PSIAdam.solve, grams_fn=grams_fn, lr=0.1, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                          retraction="normalize", transport="project", max_grad_norm=None,
                          found_inf=torch.ones(()))
    for a, b in zip(w, ws):
        assert torch.equal(a.to_local(), b)
    assert all(not x.to_local().any() for x in m) and all(x.item() == 0 for x in v)
    assert all(s.item() == 1 for s in steps)


def test_sync_stats_without_process_group_raises():
    import psi_cuda
    model = torch.nn.Linear(3, 2)
    bnp = psi_cuda.BNP(model, sync_stats=True)
    with pytest.raises(RuntimeError, match=r"BNP\(sync_stats=True\) needs torch.distributed"):
        model(torch.randn(4, 3))
    layer = bnp.layers[0]  # refused before the update
    assert layer.step.item() == 0 and torch.equal(layer.mean, torch.zeros(3))


# --- examples/train_large.py ----------------------------------------------------------------------

EXAMPLE = str(ROOT / "examples" / "train_large.py")
SMALL = ["--seq", "32", "--batch", "8"]  # keeps each run to a few seconds


def _losses(stdout: str) -> dict[int, float]:
    return {int(line.split()[1]): float(line.split()[3]) for line in stdout.splitlines()
            if line.startswith("step ")}


def test_train_large_example_learns_and_resumes(tmp_path):
    """2 ranks, FSDP2 + PSIAdam with per-head QK-norm (block groups, the default; 3 heads of 16
    rows: the shard boundary at row 24 cuts a head): the loss falls, and a run resumed from its
    step-10 DCP checkpoint prints the same losses as the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    args = [EXAMPLE, *SMALL, "--dim", "48", "--heads", "3"]
    run = torchrun([*args, "--steps", "30", "--log-every", "5", "--ckpt", str(ckpt),
                    "--save-every", "10"])
    assert run.returncode == 0, run.stderr[-6000:]
    assert ("PSI groups: {'block(block_rows=16)': ['blocks.0.attn.wq.weight', "
            "'blocks.0.attn.wk.weight'") in run.stdout
    losses = _losses(run.stdout)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5] - 0.5  # from about 3.5 to about 2.2 (uniform: 4.16)
    for later in ("step_0000020", "step_0000030"):
        shutil.rmtree(ckpt / later)
    resumed = torchrun([*args, "--steps", "20", "--log-every", "5", "--ckpt", str(ckpt),
                        "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "at step 10" in resumed.stdout
    again = _losses(resumed.stdout)
    assert again == {15: losses[15], 20: losses[20]}


@pytest.mark.parametrize("qk", [["--qk-norm", "full"], ["--qk-norm", "head", "--dim", "48",
                                                         "--heads", "2"]], ids=["full", "head"])
def test_train_large_hsdp_equals_fsdp(tmp_path, qk):
    """HSDP (2-D mesh: 2 replicas x 2 shards) and FSDP over 4 ranks see the same data and must
    train the same: the groups cut across ranks reduce their Gram sums over the shard dimension
    only. Per head (2 heads of 24 rows of 48): FSDP's shards of 12 rows cut every head, HSDP's
    shards of 24 rows cut none (no all-reduce), so the cut path must equal the local one."""
    args = [EXAMPLE, *SMALL, *qk, "--steps", "10", "--log-every", "5"]
    fsdp = torchrun(args, nproc=4)
    hsdp = torchrun(args + ["--replicate", "2"], nproc=4)
    assert fsdp.returncode == 0 and hsdp.returncode == 0, fsdp.stderr[-3000:] + hsdp.stderr[-3000:]
    assert "mesh (2, 2)" in hsdp.stdout
    a, b = _losses(fsdp.stdout), _losses(hsdp.stdout)
    assert sorted(a) == [5, 10] and a == pytest.approx(b, abs=2e-6)


# --- block groups: the split by shard boundaries, and the one-rank path ----------------------------

def test_block_pieces_cover_every_row_once():
    """For every row count, rank count (torch.chunk shards, FSDP2's) and block size: each rank's
    spans tile its shard, runs of whole blocks are whole aligned blocks, and the cut blocks are
    exactly those a boundary falls inside, their parts over all ranks making the whole block."""
    for rows in range(1, 31):
        for ranks in range(1, 5):
            chunk = -(-rows // ranks)
            bounds = [k * chunk for k in range(1, ranks) if k * chunk < rows]
            for b in (d for d in range(1, rows + 1) if rows % d == 0):
                expected_cut = sorted({j for j in range(rows // b) for x in bounds
                                       if j * b < x < (j + 1) * b})
                covered = []
                parts: dict = {}
                for r in range(ranks):
                    r0, r1 = min(r * chunk, rows), min(r * chunk + chunk, rows)
                    cut, spans = distributed.block_pieces(r0, r1, bounds, b)
                    assert cut == expected_cut
                    assert len(spans) <= 3
                    pos = r0
                    for a, e, j in spans:
                        assert a == pos and e > a
                        pos = e
                        covered.extend(range(a, e))
                        if j < 0:
                            assert a % b == 0 and e % b == 0
                            assert not set(range(a // b, e // b)) & set(cut)
                        else:
                            assert j * b <= a < e <= (j + 1) * b
                            parts.setdefault(j, []).extend(range(a, e))
                    assert pos == r1
                assert covered == list(range(rows)), (rows, ranks, b)
                assert sorted(parts) == expected_cut
                for j, rs in parts.items():
                    assert sorted(rs) == list(range(j * b, (j + 1) * b))


@pytest.mark.parametrize("grams_fn", PATHS)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_sharded_block_groups_one_rank_match_fused_op(one_rank_mesh, kind, grams_fn):
    """Block groups of DTensors (one rank: every block whole) step as the fused op steps plain
    tensors; PSIAdam's second moments are per row, each row holding its block's value."""
    from torch.distributed.tensor import Shard, distribute_tensor
    g = torch.Generator().manual_seed(4)
    shapes, b = [(6, 5), (4, 3, 2), (2, 7)], 2
    ws = [torch.randn(s, generator=g) for s in shapes]
    gs = [torch.randn(s, generator=g) for s in shapes]
    dt = lambda ts: [distribute_tensor(t.clone(), one_rank_mesh, [Shard(0)]) for t in ts]  # noqa: E731
    w_f, w_d = [w.clone() for w in ws], dt(ws)
    m_f, m_d = [torch.zeros_like(w) for w in ws], dt([torch.zeros_like(w) for w in ws])
    s_f, s_d = [torch.zeros(()) for _ in ws], [torch.zeros(()) for _ in ws]
    v_f = [torch.zeros(w.size(0) // b) for w in ws]
    v_d = [distributed.rows_like(w, torch.float32) for w in w_d]
    for it in range(3):
        grads = [x * (it + 1) for x in gs]
        if kind == "sgd":
            opts = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                        maximize=False, retraction="normalize", transport="project",
                        max_grad_norm=None)
            ops.psi_sgd_(w_f, grads, m_f, s_f, lr=0.1, manifold="block", block_rows=b, **opts)
            distributed.step_call(ops.psi_sgd_, [w_d, dt(grads), m_d, s_d], manifold="block",
                                  solve=PSISGD.solve, grams_fn=grams_fn, lr=0.1, block_rows=b,
                                  **opts)
        else:
            opts = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                        retraction="normalize", transport="project", max_grad_norm=None)
            ops.psi_adam_(w_f, grads, m_f, v_f, s_f, lr=0.1, manifold="block", block_rows=b,
                          **opts)
            distributed.step_call(ops.psi_adam_, [w_d, dt(grads), m_d, v_d, s_d],
                                  manifold="block", solve=PSIAdam.solve, grams_fn=grams_fn,
                                  lr=0.1, block_rows=b, **opts)
    for a, d in zip(w_f + m_f, w_d + m_d):
        torch.testing.assert_close(d.to_local(), a, atol=1e-6, rtol=1e-6)
    assert all(x.item() == y.item() == 3 for x, y in zip(s_f, s_d))
    if kind == "adam":
        for a, d in zip(v_f, v_d):
            torch.testing.assert_close(d.to_local(), a.repeat_interleave(b))
