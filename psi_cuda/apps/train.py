"""Training runs: PSI-SGD, PSI-Adam and BNP against SGD and AdamW on real data.

A run is described by one :class:`TrainSettings` (the optimizer, the net, the learning rates,
the data, the device, ...). ``run(TrainSettings("psi-sgd"))`` trains a small ResNet-style CNN
with BatchNorm (every conv feeds a BatchNorm, so every conv weight is scale-invariant per output
channel and goes on the PSI manifold), or its BatchNorm-free twin (``norm="none"``, the net of
``bnp-sgd``), on the built-in digits data or on CIFAR-10 from a local folder, and returns a
JSON-ready record: per-step losses and times, per-epoch train loss / test loss / test accuracy /
wall time / throughput, final numbers and the settings. Runs are deterministic for a seed, stop
cleanly on Ctrl-C, and can write a checkpoint after every epoch and resume from it bit for bit.
``python -m psi_cuda train`` (psi_cuda.apps.cli) is the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..groups import param_groups
from ..optim import BNPSGD, PSIAdam, PSISGD
from .data import DATASETS, NUM_CLASSES, load_dataset
from .models import SmallResNet, rescale_channels

OPTIMIZERS = ("sgd", "psi-sgd", "psi-adam", "adamw", "bnp-sgd")
PSI_OPTIMIZERS = ("psi-sgd", "psi-adam")  # the ones with a psi_lr
NORMS = ("bn", "none")  # the net: SmallResNet with BatchNorm, or its BN-free twin
NET_LABELS = {"bn": "BN", "none": "no BN"}
NET_DESCRIPTIONS = {
    "bn": "SmallResNet with a BatchNorm after every conv (convs without bias)",
    "none": "the same net without BatchNorm (convs with biases)",
}
SCHEDULES = ("cosine", "constant")
SPLIT_SEED = 0  # the digits train/test split is fixed; the seed changes init and shuffling only
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 64
# Defaults per optimizer, on its own net ("norm"): the winners of the sweep in
# benchmarks/claims.py (lowest final training loss on digits, 6 epochs, batch 64, momentum 0.9 /
# beta1 0.9, cosine schedule, seeds 100-101; every winner is inside its grid; results in
# benchmarks/results/claims_sweep.json).
# weight_decay: L2 for the SGD family, decoupled for the Adam pair; never applied to PSI groups
# (it would only change the representative of a point). bnp-sgd: BNPSGD's default step cap makes
# every lr from 3e-3 to 3 usable (benchmarks/bnp_lr_window.py, bnp_lr_window.json); 0.1 is the
# middle of that window on a log scale (the exact, uncapped step's only usable lr was about 1e-3).
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": dict(norm="bn", lr=0.4, psi_lr=None, weight_decay=5e-4),
    "psi-sgd": dict(norm="bn", lr=0.4, psi_lr=0.05, weight_decay=5e-4),
    "psi-adam": dict(norm="bn", lr=0.03, psi_lr=0.1, weight_decay=1e-2),
    "adamw": dict(norm="bn", lr=0.03, psi_lr=None, weight_decay=1e-2),
    "bnp-sgd": dict(norm="none", lr=0.1, psi_lr=None, weight_decay=5e-4),
}
# Learning rates of an optimizer on the other net, where the one of DEFAULTS does not carry over.
# SGD on the BN-free net (BNP-SGD's baseline in the demo), swept as above: lr 0.1, 0.15, 0.2,
# 0.25, 0.3, 0.4 on seeds 100-101 (psi-cuda train --optimizer sgd --norm none --epochs 6
# --seed 100 --seeds 2 --lr L) end at mean final training loss 2.28, 2.14, 1.71, 1.47, 1.43,
# 1.45: at every lr one of the two seeds stays near chance (loss 2.26-2.29), and below 0.15 or
# above 0.4 (0.8-3.2, seed 0) neither trains. Only lr sets the window; no lr trains every seed.
DEFAULT_LR_ON_NET: dict[tuple[str, str], float] = {
    ("sgd", "none"): 0.3,
}
# Settings that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("device", "threads", "data_dir")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run.

    ``None`` means the default of the optimizer on its net (:data:`DEFAULTS`,
    :data:`DEFAULT_LR_ON_NET`); :func:`resolve_settings` fills those in (``run`` does, once, when
    given settings with gaps). Making a TrainSettings with a bad value or combination raises
    ValueError naming it.

    Attributes:
        optimizer: ``"sgd"`` (torch.optim.SGD, L2 weight decay on everything), ``"psi-sgd"``
            (PSISGD on ``psi_cuda.param_groups``: conv weights on the PSI manifold, no weight
            decay there; BN affine parameters and the classifier Euclidean with it),
            ``"psi-adam"`` (PSIAdam on the same groups; Euclidean groups follow AdamW),
            ``"adamw"`` (torch.optim.AdamW) or ``"bnp-sgd"`` (BNPSGD).
        norm: the net: ``"bn"`` (SmallResNet with BatchNorm) or ``"none"`` (its BN-free twin;
            the default for bnp-sgd).
        lr: Euclidean learning rate; psi_lr: the PSI groups' (psi-sgd / psi-adam only; None for
            the others). momentum: SGD momentum, or beta1 for the Adam pair.
        weight_decay: L2 for the SGD family, decoupled for the Adam pair.
        schedule: ``"cosine"`` (every group's lr follows ``0.5 (1 + cos(pi t / T))`` over the
            ``T`` steps of the run) or ``"constant"``.
        batch_size, epochs, seed: the usual; ``seed`` sets the initialization, the shuffling
            and the augmentation (the digits train/test split is fixed by ``split_seed``).
        width: channels of the stem (the second block has twice as many).
        dataset: ``"digits"`` (built in) or ``"cifar10"`` (python version in ``data_dir``, never
            downloaded). augment: random crop + flip (default: on for CIFAR-10 only).
        rescale: multiply each conv output channel by a factor log-uniform in
            ``[1/rescale, rescale]`` after initialization (an equivalent start, see
            :func:`~psi_cuda.apps.models.rescale_channels`); BN net only.
        device: where to train. threads: ``torch.set_num_threads`` during the run (None: leave
            as is); 1 is fastest for the digits model on CPU.
    """

    optimizer: str = "psi-sgd"
    norm: str | None = None
    lr: float | None = None
    psi_lr: float | None = None
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float | None = None
    schedule: str = "cosine"
    batch_size: int = DEFAULT_BATCH_SIZE
    epochs: int = 10
    seed: int = 0
    width: int = 16
    dataset: str = "digits"
    data_dir: str | None = None
    augment: bool | None = None
    rescale: float | None = None
    split_seed: int = SPLIT_SEED
    device: str = "cpu"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {self.norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {DATASETS}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("width", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}; got {getattr(self, name)}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a torch device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: torch finds no CUDA device here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None; got {self.threads}")
        for name in ("lr", "psi_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0; got {value}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.optimizer in PSI_OPTIMIZERS and self.net == "none":
            raise ValueError(f"{self.optimizer} needs norm='bn': without BatchNorm no weight is "
                             "scale-invariant, so nothing would go on the PSI manifold")
        if self.rescale is not None and self.net != "bn":
            raise ValueError("rescale needs norm='bn' (only weights feeding BatchNorm are "
                             "scale-invariant)")
        if self.rescale is not None and not self.rescale >= 1.0:
            raise ValueError(f"rescale must be >= 1; got {self.rescale}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            object.__setattr__(self, "data_dir", os.fspath(self.data_dir))
        object.__setattr__(self, "device", str(self.device))

    @property
    def net(self) -> str:
        """``norm``, or the optimizer's net when it is None."""
        return DEFAULTS[self.optimizer]["norm"] if self.norm is None else self.norm

    @property
    def resolved(self) -> bool:
        """True when every default is filled in (what :func:`resolve_settings` returns)."""
        return (None not in (self.norm, self.lr, self.weight_decay, self.augment)
                and (self.psi_lr is not None) == (self.optimizer in PSI_OPTIMIZERS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        """The settings of a record (``record["settings"]``; keys that are not fields, such as
        ``n_train``, are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve_settings(settings: TrainSettings) -> TrainSettings:
    """``settings`` with every default filled in: the net, lr, psi_lr (None for optimizers
    without PSI groups), weight decay and augmentation."""
    defaults, net = DEFAULTS[settings.optimizer], settings.net
    psi_lr = None
    if settings.optimizer in PSI_OPTIMIZERS:
        psi_lr = defaults["psi_lr"] if settings.psi_lr is None else settings.psi_lr
    return dataclasses.replace(
        settings, norm=net, psi_lr=psi_lr,
        lr=(DEFAULT_LR_ON_NET.get((settings.optimizer, net), defaults["lr"])
            if settings.lr is None else settings.lr),
        weight_decay=(defaults["weight_decay"] if settings.weight_decay is None
                      else settings.weight_decay),
        augment=(settings.dataset == "cifar10") if settings.augment is None else settings.augment)


def _resolved(settings: TrainSettings) -> TrainSettings:
    return settings if settings.resolved else resolve_settings(settings)


def run_name(settings: TrainSettings) -> str:
    """``<optimizer>[-<norm>]-seed<seed>``; the norm only where it is not the optimizer's own
    net (``sgd-none``: SGD on the BN-free twin). The file name of the run's log."""
    name = settings.optimizer
    if settings.net != DEFAULTS[name]["norm"]:
        name += f"-{settings.net}"
    return f"{name}-seed{settings.seed}"


def run_label(settings: TrainSettings) -> str:
    """``<optimizer> (<net>)``, e.g. ``sgd (no BN)``: one setting's name in plots (its seeds
    share it)."""
    return f"{settings.optimizer} ({NET_LABELS[settings.net]})"


def load_data(settings: TrainSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)`` of ``settings.dataset``."""
    return load_dataset(settings.dataset, settings.data_dir, split_seed=settings.split_seed)


def build_model(settings: TrainSettings, in_channels: int = 1,
                num_classes: int = NUM_CLASSES) -> SmallResNet:
    """SmallResNet of ``settings.width`` on ``settings.net`` (with or without BatchNorm)."""
    return SmallResNet(width=settings.width, num_classes=num_classes, in_channels=in_channels,
                       norm=settings.net == "bn")


def make_optimizer(model: nn.Module, settings: TrainSettings
                   ) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """The optimizer of ``settings`` for ``model`` and {manifold: number of parameter tensors}.

    ``momentum`` is SGD's momentum, or beta1 for ``psi-adam`` / ``adamw`` (beta2 0.999).
    """
    s = _resolved(settings)
    n_params = sum(1 for _ in model.parameters())
    if s.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                              weight_decay=s.weight_decay)
        return opt, {"euclidean": n_params}
    if s.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(s.momentum, 0.999),
                                weight_decay=s.weight_decay)
        return opt, {"euclidean": n_params}
    if s.optimizer == "bnp-sgd":
        opt = BNPSGD(model, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        return opt, {"bnp": len(opt.bnp.layers), "euclidean": n_params - len(opt.bnp.layers)}
    if s.optimizer == "psi-sgd":
        groups = param_groups(model, s.lr, psi_lr=s.psi_lr, weight_decay=s.weight_decay,
                              momentum=s.momentum)
        opt = PSISGD(groups, lr=s.lr, momentum=s.momentum)
    else:
        groups = param_groups(model, s.lr, psi_lr=s.psi_lr, weight_decay=s.weight_decay)
        opt = PSIAdam(groups, lr=s.lr, betas=(s.momentum, 0.999))
    counts: dict[str, int] = {}
    for g in groups:
        key = str(g["manifold"] or "euclidean")
        counts[key] = counts.get(key, 0) + len(g["params"])
    return opt, counts


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's lr times ``0.5 (1 + cos(pi t / total_steps))`` (cosine) or 1 (constant)."""
    if settings.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)


def augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip per image, drawn from ``gen``."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@contextlib.contextmanager
def deterministic(threads: int | None):
    """torch.use_deterministic_algorithms(True) (warn only: a CUDA op without a deterministic
    version warns instead of failing), cudnn.benchmark off and ``threads`` CPU threads, all
    restored afterwards."""
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
    return total_loss / max(1, labels.numel()), correct / max(1, labels.numel())


# --- one run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """What a run carries from step to step (and what its checkpoint holds)."""

    settings: TrainSettings
    data: tuple[Tensor, Tensor, Tensor, Tensor]  # on the device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    shuffle: torch.Generator
    augment_gen: torch.Generator
    record: dict[str, Any]
    train_time: float = 0.0  # training seconds (no evaluation) of the finished epochs
    # The steps of the epoch in progress, not yet in the record.
    pending_loss: list[Tensor] = dataclasses.field(default_factory=list)
    pending_time: list[float] = dataclasses.field(default_factory=list)

    @property
    def n_train(self) -> int:
        return self.data[1].numel()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.settings.batch_size)

    def flush_pending(self) -> None:
        """Moves the steps of the epoch in progress into the record."""
        self.record["step_loss"].extend(float(loss) for loss in self.pending_loss)
        self.record["step_time"].extend(self.pending_time[:len(self.pending_loss)])
        self.pending_loss, self.pending_time = [], []


def _start(settings: TrainSettings, data: tuple[Tensor, Tensor, Tensor, Tensor],
           init_hook: Callable[[nn.Module], None] | None) -> _Run:
    """The model (seeded, rescaled, hooked), optimizer, schedule and generators of a run, and
    its empty record."""
    train_x, train_y, _, test_y = data
    num_classes = max(NUM_CLASSES, int(train_y.max()) + 1,
                      int(test_y.max()) + 1 if test_y.numel() else 0)
    torch.manual_seed(settings.seed)
    model = build_model(settings, train_x.shape[1], num_classes).to(train_x.device)
    if settings.rescale is not None:
        rescale_channels(model, settings.rescale, settings.seed + 1_000_003)
    if init_hook is not None:
        init_hook(model)
    optimizer, groups = make_optimizer(model, settings)
    total_steps = max(1, settings.epochs * math.ceil(train_y.numel() / settings.batch_size))
    record: dict[str, Any] = {
        "settings": dict(settings.to_dict(), n_train=train_y.numel(), n_test=test_y.numel()),
        "environment": dict(psi_cuda=__version__, torch=torch.__version__,
                            python=platform.python_version(), machine=platform.machine()),
        "step_loss": [],
        "step_time": [],  # training seconds (no evaluation) from the start to each step's end
        "epochs": [],
        "interrupted": False,
        "resumed_from_epoch": None,
        "param_groups": groups,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return _Run(settings, data, model, optimizer, make_scheduler(optimizer, settings, total_steps),
                torch.Generator().manual_seed(settings.seed),
                torch.Generator().manual_seed(settings.seed + 1), record)


def _checkpoint(state: _Run) -> dict[str, Any]:
    return dict(settings=state.record["settings"], model=state.model.state_dict(),
                optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                shuffle_rng=state.shuffle.get_state(), augment_rng=state.augment_gen.get_state(),
                torch_rng=torch.get_rng_state(),
                record={k: state.record[k] for k in ("step_loss", "step_time", "epochs")})


def _save_checkpoint(state: _Run, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_checkpoint(state), tmp)
    os.replace(tmp, path)


def _resume(state: _Run, path: Path) -> None:
    """Continues ``state`` from the checkpoint at ``path``; ValueError if it is of another run."""
    # weights_only: a checkpoint holds tensors and plain data only, so loading one from
    # elsewhere cannot run code.
    saved = torch.load(path, map_location=state.data[0].device, weights_only=True)
    here, there = state.record["settings"], saved["settings"]
    changed = sorted(k for k in set(there) | set(here)
                     if k not in RESUMABLE_CHANGES and there.get(k) != here.get(k))
    if changed:
        raise ValueError(f"checkpoint {path} is of a different run: "
                         + ", ".join(f"{k} {there.get(k)!r} there, {here.get(k)!r} here"
                                     for k in changed))
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.shuffle.set_state(saved["shuffle_rng"])
    state.augment_gen.set_state(saved["augment_rng"])
    torch.set_rng_state(saved["torch_rng"])
    for key in ("step_loss", "step_time", "epochs"):
        state.record[key] = list(saved["record"][key])
    state.train_time = state.record["step_time"][-1] if state.record["step_time"] else 0.0
    state.record["resumed_from_epoch"] = len(state.record["epochs"])


def _progress_bar(state: _Run, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=state.settings.epochs * state.steps_per_epoch,
                initial=len(state.record["epochs"]) * state.steps_per_epoch,
                desc=run_name(state.settings), unit="step", leave=False, dynamic_ncols=True,
                mininterval=0.5)


def _train_epoch(state: _Run, epoch: int, bar) -> dict[str, Any]:
    """One epoch of steps, then the evaluation; returns the epoch's entry (also recorded)."""
    s, (train_x, train_y, test_x, test_y) = state.settings, state.data
    n_train = state.n_train
    t0 = time.perf_counter()
    state.model.train()
    order = torch.randperm(n_train, generator=state.shuffle).to(train_x.device)
    for start in range(0, n_train, s.batch_size):
        idx = order[start:start + s.batch_size]
        x = train_x[idx]
        if s.augment:
            x = augment(x, state.augment_gen)
        loss = F.cross_entropy(state.model(x), train_y[idx])
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.pending_loss.append(loss.detach())
        state.pending_time.append(state.train_time + time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            if len(state.pending_loss) % 10 == 1:  # a host sync every 10 steps only
                seconds = state.pending_time[-1] - state.train_time
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", epoch=epoch,
                                img_s=f"{start / max(1e-9, seconds):.0f}" if start else "-")
    # One host sync per epoch, not per step.
    losses = torch.stack(state.pending_loss).float().cpu().tolist()
    if train_x.device.type == "cuda":
        torch.cuda.synchronize(train_x.device)
    t1 = time.perf_counter()
    state.pending_loss = []
    state.record["step_loss"].extend(losses)
    state.record["step_time"].extend(state.pending_time)
    state.pending_time = []
    test_loss, test_acc = evaluate(state.model, test_x, test_y)
    t2 = time.perf_counter()
    state.train_time += t1 - t0
    weights = [min(s.batch_size, n_train - b) for b in range(0, n_train, s.batch_size)]
    entry = dict(epoch=epoch, step=len(state.record["step_loss"]),
                 train_loss=sum(w * l for w, l in zip(weights, losses)) / n_train,
                 test_loss=test_loss, test_acc=test_acc, train_s=t1 - t0, wall_s=t2 - t0,
                 train_time=state.train_time, samples_per_s=n_train / (t1 - t0))
    state.record["epochs"].append(entry)
    return entry


def _final(record: dict[str, Any], n_train: int, wall_s: float) -> dict[str, Any]:
    """The final numbers; None (JSON null) where no epoch finished."""
    done = record["epochs"]
    last = done[-1] if done else {}
    train_s = sum(e["train_s"] for e in done)
    return dict(epochs_done=len(done), steps=len(record["step_loss"]),
                train_loss=last.get("train_loss"), test_loss=last.get("test_loss"),
                test_acc=last.get("test_acc"),
                best_test_acc=max((e["test_acc"] for e in done), default=None),
                wall_s=wall_s, train_time=last.get("train_time"),
                samples_per_s=len(done) * n_train / train_s if train_s else None)


def run(settings: TrainSettings, *, data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        progress: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        init_hook: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Trains the net of ``settings`` with its optimizer and returns the record.

    Args:
        settings: the run (defaults filled in here, with :func:`resolve_settings`, unless
            ``settings.resolved``).
        data: ``(train_x, train_y, test_x, test_y)`` to use instead of loading
            ``settings.dataset``.
        checkpoint: a file written after every epoch (model, optimizer, scheduler, random
            generators, the record so far). resume: continue from ``checkpoint`` if it exists;
            the settings must be the same (device, thread count and data folder may differ).
        progress: show a tqdm progress bar with the loss and images/s.
        on_epoch: called with each epoch's entry as soon as it is done (for printing).
        init_hook: called with the model after its initialization (and ``rescale``), before the
            optimizer is made; for experiments (it is not recorded in the settings, so a
            checkpoint cannot check it).

    Deterministic: the same settings give the same losses bit for bit on the same machine and
    thread count (``torch.manual_seed(seed)``, seeded generators for the shuffling and the
    augmentation, ``torch.use_deterministic_algorithms``), and so does a run interrupted and
    resumed from its checkpoint. A KeyboardInterrupt stops training cleanly: the record then
    holds the steps and epochs finished so far and ``"interrupted": True``.
    """
    settings = _resolved(settings)
    device = torch.device(settings.device)
    data = tuple(t.to(device) for t in (load_data(settings) if data is None else data))
    if data[1].numel() == 0:
        raise ValueError("the training set is empty")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    with deterministic(settings.threads):
        state = _start(settings, data, init_hook)
        if resume and checkpoint is not None and checkpoint.exists():
            _resume(state, checkpoint)
        started = time.perf_counter()
        bar = _progress_bar(state, progress)
        try:
            for epoch in range(len(state.record["epochs"]) + 1, settings.epochs + 1):
                entry = _train_epoch(state, epoch, bar)
                if checkpoint is not None:
                    _save_checkpoint(state, checkpoint)
                if bar is not None:
                    bar.clear()
                if on_epoch is not None:
                    on_epoch(entry)
        except KeyboardInterrupt:
            state.record["interrupted"] = True
            state.flush_pending()  # the steps of the unfinished epoch (no epoch entry for it)
        finally:
            if bar is not None:
                bar.close()
        wall_s = time.perf_counter() - started
    state.record["final"] = _final(state.record, state.n_train, wall_s)
    return state.record


# --- summaries of records -----------------------------------------------------------------------


def mean_std(values: list[float | None], fmt: str = ".4f", pm: str = "+-") -> str:
    """Mean and sample std over the seeds, ``"-"`` when no run has a value (None values are
    left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} {pm} {statistics.stdev(values):{fmt}}"


def mean_std_reached(values: list[float | None], fmt: str, pm: str = "+-",
                     missed: str = "{hit}/{total}") -> str:
    """:func:`mean_std` over the runs that reached something (value not None), followed by
    ``(<missed>)`` when some did not."""
    misses = sum(v is None for v in values)
    text = mean_std(values, fmt, pm)
    if not misses:
        return text
    return f"{text} ({missed.format(hit=len(values) - misses, miss=misses, total=len(values))})"


def smoothed(losses: list[float | None], window: int) -> list[float]:
    """Trailing mean of the last ``window`` step losses at each step (fewer at the start);
    a None (diverged) loss makes the rest inf."""
    out, total, bad = [], 0.0, False
    for i, value in enumerate(losses):
        if value is None or not math.isfinite(value):
            bad = True
        if bad:
            out.append(math.inf)
            continue
        total += value
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out


def time_to_target(record: dict[str, Any], target: float,
                   window: int | None = None) -> dict[str, float | int | None]:
    """The first step (1-based) and its training time at which the trailing mean of the step
    losses over ``window`` steps (default: one epoch's worth) is at most ``target``; None for
    both when the run never gets there."""
    steps = record["step_loss"]
    if window is None:
        window = math.ceil(record["settings"]["n_train"] / record["settings"]["batch_size"])
    for i, value in enumerate(smoothed(steps, window)):
        if i + 1 >= window and value <= target:
            return {"step": i + 1, "seconds": record["step_time"][i]}
    return {"step": None, "seconds": None}
