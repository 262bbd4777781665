"""A short, deterministic training run: PSI-SGD vs plain SGD on the built-in digits data.

``run("psi-sgd")`` trains a small ResNet-style CNN with BatchNorm (every conv feeds a BatchNorm,
so every conv weight is scale-invariant per output channel and goes on the PSI manifold) and
returns a JSON-ready record: per-step losses, per-epoch train loss / test accuracy / wall time /
throughput, final numbers and the settings. ``python -m psi_cuda`` is the command-line front end.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .data import NUM_CLASSES, load_digits, train_test_split
from .groups import param_groups
from .optim import PSISGD

OPTIMIZERS = ("sgd", "psi-sgd")
WEIGHT_DECAY = 5e-4
# Defaults chosen by a small sweep on this data (see run()'s docstring). The same Euclidean lr for
# both, so the two runs differ only in how the conv weights move.
DEFAULT_LR = {"sgd": 0.1, "psi-sgd": 0.1}
DEFAULT_PSI_LR = 0.1
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 64
SCHEDULES = ("cosine", "constant")
SPLIT_SEED = 0  # the train/test split is fixed; --seed changes init and shuffling only


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem conv3x3(1 -> w)-BN-ReLU, BasicBlock(w -> w), BasicBlock(w -> 2w, stride 2) (8x8 ->
    4x4), global average pool, Linear(2w -> classes). All convs have bias=False."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_optimizer(name: str, model: nn.Module, lr: float, psi_lr: float | None,
                   momentum: float) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """The optimizer ``name`` for ``model`` and {manifold: number of parameter tensors}."""
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                              weight_decay=WEIGHT_DECAY)
        return opt, {"euclidean": sum(1 for _ in model.parameters())}
    if name == "psi-sgd":
        groups = param_groups(model, lr, psi_lr=psi_lr, weight_decay=WEIGHT_DECAY,
                              momentum=momentum)
        counts = {str(g["manifold"] or "euclidean"): len(g["params"]) for g in groups}
        return PSISGD(groups, lr=lr, momentum=momentum), counts
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


@contextlib.contextmanager
def _deterministic(threads: int | None):
    """torch.use_deterministic_algorithms(True) (warn only: a CUDA op without a deterministic
    version warns instead of failing) and ``threads`` CPU threads, both restored afterwards."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    old_benchmark = torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_benchmark
        torch.set_num_threads(old_threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, labels.numel(), batch_size):
        logits = model(images[start:start + batch_size])
        target = labels[start:start + batch_size]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train()
    return total_loss / labels.numel(), correct / labels.numel()


def run(optimizer_name: str = "psi-sgd", lr: float | None = None, psi_lr: float | None = None,
        momentum: float = DEFAULT_MOMENTUM, batch_size: int = DEFAULT_BATCH_SIZE,
        epochs: int = 10, seed: int = 0, device: str | torch.device = "cpu",
        threads: int | None = 1, *, schedule: str = "cosine", width: int = 16,
        data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``DigitsResNet`` on digits with ``optimizer_name`` and return the record.

    Args:
        optimizer_name: ``"sgd"`` (torch.optim.SGD, weight decay 5e-4 on everything) or
            ``"psi-sgd"`` (PSISGD on ``psi_cuda.param_groups(model, lr, psi_lr=psi_lr,
            weight_decay=5e-4, momentum=momentum)``: conv weights on the PSI manifold, no
            weight decay there; BN affine parameters and the classifier Euclidean with it).
        lr: Euclidean learning rate (default ``DEFAULT_LR[optimizer_name]``).
        psi_lr: PSI groups' learning rate (psi-sgd only; default ``DEFAULT_PSI_LR``).
        momentum, batch_size, epochs, seed: the usual; ``seed`` sets the initialization and the
            shuffling (the train/test split is fixed).
        device: where to train. threads: ``torch.set_num_threads`` during the run (None: leave
            as is); 1 is fastest for this tiny model on CPU.
        schedule: ``"cosine"`` (every group's lr follows ``0.5 (1 + cos(pi t / T))`` over the
            ``T`` steps of the run, stepped once per step) or ``"constant"``.
        width: channels of the stem (the second block has twice as many).
        data: ``(train_x, train_y, test_x, test_y)`` to reuse; default: the digits split.
        on_epoch: called with each epoch's entry as soon as it is done (for printing).

    Deterministic: the same arguments give the same losses bit for bit on the same machine and
    thread count (``torch.manual_seed(seed)``, a seeded ``torch.Generator`` for the shuffling,
    ``torch.use_deterministic_algorithms``). A KeyboardInterrupt stops training cleanly: the
    record then holds the steps and epochs finished so far and ``"interrupted": True``.

    Default learning rates: a sweep on this data (momentum 0.9, batch 64, 6 epochs, seeds 0-2,
    cosine schedule) of SGD lr in {0.05, 0.1, 0.2} and PSI-SGD psi_lr in {0.02, 0.05, 0.1, 0.2}
    x lr in {0.05, 0.1}; all of them reach 98-99.7% test accuracy, SGD lr 0.1 and PSI-SGD
    lr 0.1 / psi_lr 0.1 are among the best in final test loss and accuracy. With a constant lr
    PSI-SGD needs a smaller psi_lr (0.02-0.05): it keeps turning the conv weights at the same
    angle per step, whereas under SGD their norms grow and the angle shrinks by itself (the
    implicit lr decay of scale-invariant weights), which the cosine schedule makes explicit.
    """
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; choose from {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1; got {epochs}, {batch_size}")
    lr = DEFAULT_LR[optimizer_name] if lr is None else lr
    if optimizer_name == "psi-sgd":
        psi_lr = DEFAULT_PSI_LR if psi_lr is None else psi_lr
    else:
        psi_lr = None
    device = torch.device(device)
    if data is None:
        data = train_test_split(*load_digits(), seed=SPLIT_SEED)
    train_x, train_y, test_x, test_y = (t.to(device) for t in data)
    n_train = train_y.numel()

    record: dict[str, Any] = {
        "settings": dict(optimizer=optimizer_name, lr=lr, psi_lr=psi_lr, momentum=momentum,
                         weight_decay=WEIGHT_DECAY, schedule=schedule,
                         batch_size=batch_size, epochs=epochs,
                         seed=seed, device=str(device), threads=threads, width=width,
                         n_train=n_train, n_test=test_y.numel(), split_seed=SPLIT_SEED),
        "environment": dict(psi_cuda=__version__, torch=torch.__version__,
                            python=platform.python_version(), machine=platform.machine()),
        "step_loss": [],
        "epochs": [],
        "interrupted": False,
    }
    with _deterministic(threads):
        torch.manual_seed(seed)
        model = DigitsResNet(width=width).to(device)
        optimizer, groups = make_optimizer(optimizer_name, model, lr, psi_lr, momentum)
        record["param_groups"] = groups
        record["num_parameters"] = sum(p.numel() for p in model.parameters())
        total_steps = max(1, epochs * math.ceil(n_train / batch_size))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps))
            if schedule == "cosine" else 1.0)
        shuffle = torch.Generator().manual_seed(seed)
        start_all = time.perf_counter()
        train_time = 0.0
        step_losses: list[Tensor] = []  # this epoch's losses, not yet in the record
        try:
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                model.train()
                order = torch.randperm(n_train, generator=shuffle).to(device)
                step_losses = []
                for start in range(0, n_train, batch_size):
                    idx = order[start:start + batch_size]
                    loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step_losses.append(loss.detach())
                # One host sync per epoch, not per step.
                losses, step_losses = torch.stack(step_losses).float().cpu().tolist(), []
                _sync(device)
                t1 = time.perf_counter()
                test_loss, test_acc = evaluate(model, test_x, test_y)
                t2 = time.perf_counter()
                train_time += t1 - t0
                record["step_loss"].extend(losses)
                weights = [min(batch_size, n_train - s) for s in range(0, n_train, batch_size)]
                entry = dict(epoch=epoch,
                             train_loss=sum(w * l for w, l in zip(weights, losses)) / n_train,
                             test_loss=test_loss, test_acc=test_acc,
                             train_s=t1 - t0, wall_s=t2 - t0,
                             samples_per_s=n_train / (t1 - t0))
                record["epochs"].append(entry)
                if on_epoch is not None:
                    on_epoch(entry)
        except KeyboardInterrupt:
            record["interrupted"] = True
            # Keep the steps of the unfinished epoch too (no epoch entry for it).
            record["step_loss"].extend(float(loss) for loss in step_losses)
        total = time.perf_counter() - start_all

    # None (JSON null) where no epoch finished (interrupted at once, or epochs=0).
    last = record["epochs"][-1] if record["epochs"] else {}
    record["final"] = dict(
        epochs_done=len(record["epochs"]), steps=len(record["step_loss"]),
        train_loss=last.get("train_loss"), test_loss=last.get("test_loss"),
        test_acc=last.get("test_acc"),
        best_test_acc=max((e["test_acc"] for e in record["epochs"]), default=None),
        wall_s=total,
        samples_per_s=len(record["epochs"]) * n_train / train_time if train_time else None)
    return record
