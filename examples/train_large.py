"""Train a small GPT-like transformer with PSIAdam under FSDP2 (``fully_shard``).

    torchrun --nproc-per-node 2 examples/train_large.py              # CPU (gloo), about a minute
    torchrun --nproc-per-node 8 examples/train_large.py --dim 1024 --layers 24 --bf16   # 8 GPUs
    python examples/train_large.py                                    # one process
    python examples/train_large.py --optimizer adamw --log-json adamw.json   # the baseline

``--optimizer psi-adam`` (the default) is PSIAdam with the QK weights on their spheres;
``--optimizer adamw`` is the baseline: plain ``torch.optim.AdamW`` on every parameter, with the
same lr, betas and weight decay rule (decay on matrices, none on norms and biases) and the same
data and seeds, so the only difference is how the scale-invariant weights move. ``--log-json
PATH`` writes every step's loss (mean over ranks) and the settings as JSON (rank 0).

The model is pre-LN (``x + attn(LN(x))``, ``x + mlp(LN(x))``) with QK-norm: the query and key
projections are bias-free Linears whose outputs are normalized before attention.

* ``--qk-norm head`` (the default): each head's query and key are normalized on their own, a
  LayerNorm over ``head_dim`` after the view into heads (as in several current open LLM
  families). Each head's ``head_dim`` consecutive rows of ``W_q`` and ``W_k`` are then scale
  invariant on their own, and ``psi_cuda.param_groups`` puts those weights in
  ``manifold="block"`` groups with ``block_rows = head_dim``: PSIAdam moves every head on its
  own sphere. Under FSDP2 the heads that a shard boundary cuts all-reduce their Gram sums (one
  all-reduce per step and param group); the others need no communication.
* ``--qk-norm full``: one LayerNorm over the whole projection (as in OLMo 2), so
  ``LN(c W x) = LN(W x)`` for the whole matrix: ``manifold="tensor"`` groups, each one
  all-reduced under FSDP2.

Everything else (embeddings, value/output projections, MLP, norms, head) is Euclidean and
follows ``torch.optim.AdamW`` inside the same PSIAdam.

Each transformer block and the root are wrapped with ``fully_shard`` on a 1-D mesh (or a 2-D
``(replicate, shard)`` mesh for HSDP with ``--replicate R``). Data is synthetic (a fixed random
bigram language, no download), drawn from a seed of (step, rank), so a resumed run sees the same
batches. Checkpoints use ``torch.distributed.checkpoint`` (``--ckpt DIR --save-every N`` writes
``DIR/step_NNNNNNN``; ``--resume`` continues from the newest one bit for bit, on any number of
ranks: DCP reshards). Backend: nccl and one GPU per rank when CUDA is available,
gloo on CPU otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import psi_cuda
from psi_cuda.optim import PSIAdam


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: str = "head"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"--dim {dim} must be a multiple of --heads {heads}")
        self.heads, self.head_dim, self.per_head = heads, dim // heads, qk_norm == "head"
        # QK-norm per head (over head_dim: block groups) or over the whole projection (tensor
        # groups): either way wq and wk are bias-free and feed the norm directly.
        norm_dim = self.head_dim if self.per_head else dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(norm_dim)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.k_norm = nn.LayerNorm(norm_dim)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        heads = lambda y: y.view(b, t, self.heads, self.head_dim)  # noqa: E731
        if self.per_head:
            q, k = self.q_norm(heads(self.wq(x))), self.k_norm(heads(self.wk(x)))
        else:
            q, k = heads(self.q_norm(self.wq(x))), heads(self.k_norm(self.wk(x)))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), heads(self.wv(x)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: str = "head"):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int,
                 qk_norm: str = "head"):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, qk_norm) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def bigram_table(vocab: int) -> torch.Tensor:
    """A fixed random bigram language: each token has a few likely successors."""
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    return torch.softmax(logits, dim=1)


def batch(table, step: int, rank: int, size: int, seq: int):
    """This rank's batch of ``step``: a function of (step, rank) only (resumes see the same)."""
    g = torch.Generator().manual_seed(step * 1009 + rank)
    tokens = torch.empty(size, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, table.size(0), (size,), generator=g)
    for i in range(seq):
        tokens[:, i + 1] = torch.multinomial(table[tokens[:, i]], 1, generator=g).squeeze(1)
    return tokens[:, :-1], tokens[:, 1:]


def latest_checkpoint(folder: str | None) -> str:
    """The newest ``step_*`` checkpoint in ``folder`` (DCP writes one folder per save)."""
    steps = sorted(d for d in os.listdir(folder or ".") if d.startswith("step_")) \
        if folder and os.path.isdir(folder) else []
    if not steps:
        raise SystemExit(f"--resume: no step_* checkpoint in --ckpt {folder!r}")
    return os.path.join(folder, steps[-1])


def setup():
    """Process group, device and backend: nccl + one GPU per rank when CUDA is available."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # plain `python train_large.py`: a one-rank group
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return torch.device("cuda" if cuda else "cpu")


def build_optimizer(model: nn.Module, named_groups: dict, args) -> torch.optim.Optimizer:
    """PSIAdam groups from the names param_groups classified before sharding (fully_shard
    replaces the parameters by DTensors, so the groups are rebuilt by name). ``--optimizer
    adamw``: torch.optim.AdamW on every parameter, the PSI groups' weights decayed and stepped
    like the other matrices."""
    named = dict(model.named_parameters())
    if args.optimizer == "adamw":
        decay = [q for q in named.values() if q.dim() >= 2]
        other = [q for q in named.values() if q.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                  {"params": other, "weight_decay": 0.0}],
                                 lr=args.lr, betas=(0.9, 0.95))
    groups = []
    for (manifold, block_rows), names in named_groups.items():
        if manifold is None:  # AdamW: decay the matrices, not norms/biases
            decay = [named[n] for n in names if named[n].dim() >= 2]
            other = [named[n] for n in names if named[n].dim() < 2]
            groups += [{"params": decay, "manifold": None, "weight_decay": args.weight_decay},
                       {"params": other, "manifold": None, "weight_decay": 0.0}]
        else:
            groups.append({"params": [named[n] for n in names], "manifold": manifold,
                           "lr": args.psi_lr, "weight_decay": 0.0,
                           **({"block_rows": block_rows} if manifold == "block" else {})})
    return PSIAdam([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW lr (Euclidean groups)")
    p.add_argument("--psi-lr", type=float, default=3e-2,
                   help="PSIAdam lr of the QK weights' groups (about radians per step)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward")
    p.add_argument("--replicate", type=int, default=1,
                   help="HSDP: replicas of the sharded model (mesh replicate x shard)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt", default=None, help="folder for torch.distributed.checkpoint")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --ckpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("psi-adam", "adamw"), default="psi-adam",
                   help="psi-adam (PSIAdam, QK weights on their spheres) or adamw "
                        "(torch.optim.AdamW on every parameter, same lr and weight decay)")
    p.add_argument("--qk-norm", choices=("head", "full"), default="head",
                   help="head: a LayerNorm per head over head_dim (block groups); full: one "
                        "over the whole projection (tensor groups)")
    p.add_argument("--log-json", default=None, metavar="PATH",
                   help="write every step's loss (mean over ranks) and the settings here")
    args = p.parse_args()

    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.replicate:
        raise SystemExit(f"--replicate {args.replicate} must divide the {world} ranks")
    if args.replicate > 1:
        mesh = init_device_mesh(device.type, (args.replicate, world // args.replicate),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = GPT(args.vocab, args.dim, args.layers, args.heads, args.seq, args.qk_norm).to(device)
    # Classify on the plain model (torch.fx), remember the names, then shard.
    ids = {id(q): n for n, q in model.named_parameters()}
    named_groups: dict = {}  # (manifold, block_rows) -> parameter names
    for g in psi_cuda.param_groups(model, lr=args.lr):
        key = (g["manifold"], g.get("block_rows"))
        named_groups.setdefault(key, []).extend(ids[id(q)] for q in g["params"])
    psi_names = {f"{m}" + (f"(block_rows={b})" if b else ""): names
                 for (m, b), names in named_groups.items() if m is not None}
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model, named_groups, args)
    if rank == 0:
        n_params = sum(q.numel() for q in model.parameters())
        print(f"{world} rank(s) on {device.type} ({dist.get_backend()}), mesh {tuple(mesh.shape)},"
              f" {n_params / 1e6:.2f}M parameters, {args.optimizer}, qk-norm {args.qk_norm}; "
              f"PSI groups: {psi_names}", flush=True)

    start = 0
    if args.resume:
        path = latest_checkpoint(args.ckpt)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "step": torch.zeros((), dtype=torch.long)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {path} at step {start}", flush=True)

    table = bigram_table(args.vocab)
    entropy = -(table * table.clamp_min(1e-12).log()).sum(1).mean().item()
    if rank == 0 and start == 0:
        print(f"loss floor (bigram entropy) {entropy:.3f}, uniform {math.log(args.vocab):.3f}",
              flush=True)
    t0, tokens, losses = time.perf_counter(), 0, []
    for step in range(start, args.steps):
        x, y = (t.to(device) for t in batch(table, step, rank, args.batch, args.seq))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += x.numel() * world
        if args.log_json:
            losses.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                rate = tokens / (time.perf_counter() - t0)
                print(f"step {step + 1:5d}  loss {mean.item() / world:.6f}  "
                      f"{rate:,.0f} tokens/s", flush=True)
        if args.ckpt and args.save_every and (step + 1) % args.save_every == 0:
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt),
                      "step": torch.tensor(step + 1)},
                     checkpoint_id=os.path.join(args.ckpt, f"step_{step + 1:07d}"))
    if args.log_json:
        mean = torch.stack(losses).float() if losses else torch.zeros(0, device=device)
        dist.all_reduce(mean)
        if rank == 0:
            with open(args.log_json, "w") as f:
                json.dump(dict(settings=vars(args), world=world, first_step=start + 1,
                               loss_floor=entropy, uniform_loss=math.log(args.vocab),
                               tokens_per_s=tokens / (time.perf_counter() - t0),
                               step_loss=(mean / world).tolist()), f)
    dist.destroy_process_group()
    # gloo's worker threads drop each finished collective a moment after the caller's wait()
    # returns, and dropping one can need the GIL (the tensors of DCP's broadcasts and of the log's
    # all_reduce are Python-owned). If the interpreter is already finalizing, such a thread exits
    # through take_gil and the process aborts ("terminate called without an active exception",
    # about 1 run in 10 on a loaded 2-core machine; a core dump shows ~AsyncWork in
    # ProcessGroupGloo::runLoop). Releasing the GIL for a moment lets the workers finish first.
    time.sleep(0.2)


if __name__ == "__main__":
    main()
