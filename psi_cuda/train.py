"""Training runs: PSI-SGD, PSI-Adam and BNP against SGD and AdamW on real data.

``run("psi-sgd")`` trains a small ResNet-style CNN with BatchNorm (every conv feeds a BatchNorm,
so every conv weight is scale-invariant per output channel and goes on the PSI manifold), or its
BatchNorm-free twin (``norm="none"``, the default for ``bnp-sgd``), on the built-in digits data or
on CIFAR-10 from a local folder, and returns a JSON-ready record: per-step losses and times,
per-epoch train loss / test loss / test accuracy / wall time / throughput, final numbers and the
settings. Runs are deterministic for a seed, stop cleanly on Ctrl-C, and can write a checkpoint
after every epoch and resume from it bit for bit. ``python -m psi_cuda`` is the command line.
"""
from __future__ import annotations

import contextlib
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

from . import __version__
from .data import NUM_CLASSES, load_dataset
from .groups import param_groups
from .optim import BNPSGD, PSIAdam, PSISGD

OPTIMIZERS = ("sgd", "psi-sgd", "psi-adam", "adamw", "bnp-sgd")
NORMS = ("bn", "none")
SCHEDULES = ("cosine", "constant")
SPLIT_SEED = 0  # the digits train/test split is fixed; the seed changes init and shuffling only
# Defaults per optimizer: the winners of the sweep in benchmarks/claims.py (lowest final training
# loss on digits, 6 epochs, batch 64, momentum 0.9 / beta1 0.9, cosine schedule, seeds 100-101;
# every winner is inside its grid; results in benchmarks/results/claims_sweep.json).
# weight_decay: L2 for the SGD family, decoupled for the Adam pair; never applied to PSI groups
# (it would only change the representative of a point). bnp-sgd: BNPSGD's default step cap makes
# every lr from 3e-3 to 3 usable (benchmarks/bnp_lr_window.py, bnp_lr_window.json); 0.1 is the
# middle of that window on a log scale (the exact, uncapped step's only usable lr was about 1e-3).
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=0.4, psi_lr=None, weight_decay=5e-4, norm="bn"),
    "psi-sgd": dict(lr=0.4, psi_lr=0.05, weight_decay=5e-4, norm="bn"),
    "psi-adam": dict(lr=0.03, psi_lr=0.1, weight_decay=1e-2, norm="bn"),
    "adamw": dict(lr=0.03, psi_lr=None, weight_decay=1e-2, norm="bn"),
    "bnp-sgd": dict(lr=0.1, psi_lr=None, weight_decay=5e-4, norm="none"),
}
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 64
# Kept for callers of the first version of this module.
DEFAULT_LR = {name: d["lr"] for name, d in DEFAULTS.items()}
DEFAULT_PSI_LR = DEFAULTS["psi-sgd"]["psi_lr"]
WEIGHT_DECAY = DEFAULTS["sgd"]["weight_decay"]
# Settings that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("device", "threads")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU.
    With ``norm=False`` every BN is left out and the convs get a bias instead (the BN-free twin
    that BNP trains)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: bool = True):
        super().__init__()
        bn = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not norm)
        self.bn1 = bn(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not norm)
        self.bn2 = bn(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not norm), bn(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv3x3(in -> w)-BN-ReLU, BasicBlock(w -> w), BasicBlock(w -> 2w, stride 2), global
    average pool, Linear(2w -> classes). With ``norm=True`` all convs have bias=False and feed a
    BatchNorm; with ``norm=False`` there is no BatchNorm and the convs have biases."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES, in_channels: int = 1,
                 norm: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=not norm),
                                  nn.BatchNorm2d(width) if norm else nn.Identity(), nn.ReLU())
        self.block1 = BasicBlock(width, width, norm=norm)
        self.block2 = BasicBlock(width, 2 * width, stride=2, norm=norm)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


DigitsResNet = SmallResNet  # its first name


def make_optimizer(name: str, model: nn.Module, lr: float, psi_lr: float | None,
                   momentum: float, weight_decay: float | None = None
                   ) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """The optimizer ``name`` for ``model`` and {manifold: number of parameter tensors}.

    ``momentum`` is SGD's momentum, or beta1 for ``psi-adam`` / ``adamw`` (beta2 0.999).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    wd = DEFAULTS[name]["weight_decay"] if weight_decay is None else weight_decay
    n_params = sum(1 for _ in model.parameters())
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        return opt, {"euclidean": n_params}
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(momentum, 0.999),
                                weight_decay=wd)
        return opt, {"euclidean": n_params}
    if name == "bnp-sgd":
        opt = BNPSGD(model, lr=lr, momentum=momentum, weight_decay=wd)
        return opt, {"bnp": len(opt.bnp.layers), "euclidean": n_params - len(opt.bnp.layers)}
    if name == "psi-sgd":
        groups = param_groups(model, lr, psi_lr=psi_lr, weight_decay=wd, momentum=momentum)
        opt = PSISGD(groups, lr=lr, momentum=momentum)
    else:
        groups = param_groups(model, lr, psi_lr=psi_lr, weight_decay=wd)
        opt = PSIAdam(groups, lr=lr, betas=(momentum, 0.999))
    counts: dict[str, int] = {}
    for g in groups:
        key = str(g["manifold"] or "euclidean")
        counts[key] = counts.get(key, 0) + len(g["params"])
    return opt, counts


def rescale_channels(model: nn.Module, spread: float, seed: int) -> dict[str, Tensor]:
    """Multiplies every output channel (row of ``W.view(out, -1)``) of every conv weight that
    feeds a BatchNorm by its own factor, log-uniform in ``[1/spread, spread]`` (drawn from
    ``seed``). The network computes the same function (BatchNorm in training mode undoes the
    scales, up to its ``eps``); returns the factors by parameter name."""
    if not spread >= 1.0:
        raise ValueError(f"rescale spread must be >= 1; got {spread}")
    gen = torch.Generator().manual_seed(seed)
    groups = param_groups(model, 1.0)
    channel = {id(p) for g in groups if g["manifold"] == "channel" for p in g["params"]}
    factors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) not in channel:
                continue
            u = torch.rand(p.shape[0], generator=gen, dtype=torch.float64)
            c = torch.exp((2 * u - 1) * math.log(spread))
            p.mul_(c.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))
            factors[name] = c
    return factors


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
    return total_loss / max(1, labels.numel()), correct / max(1, labels.numel())


def resolve_settings(optimizer_name: str = "psi-sgd", lr: float | None = None,
                     psi_lr: float | None = None, momentum: float = DEFAULT_MOMENTUM,
                     batch_size: int = DEFAULT_BATCH_SIZE, epochs: int = 10, seed: int = 0,
                     *, weight_decay: float | None = None, norm: str | None = None,
                     schedule: str = "cosine", width: int = 16, dataset: str = "digits",
                     augment_data: bool | None = None, rescale: float | None = None
                     ) -> dict[str, Any]:
    """The settings of a run with every default filled in; ValueError naming a bad one."""
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; choose from {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    defaults = DEFAULTS[optimizer_name]
    norm = defaults["norm"] if norm is None else norm
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if width < 1:
        raise ValueError(f"width must be >= 1; got {width}")
    lr = defaults["lr"] if lr is None else lr
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if optimizer_name in ("psi-sgd", "psi-adam"):
        psi_lr = defaults["psi_lr"] if psi_lr is None else psi_lr
        if not psi_lr > 0:
            raise ValueError(f"psi_lr must be > 0; got {psi_lr}")
        if norm == "none":
            raise ValueError(f"{optimizer_name} needs norm='bn': without BatchNorm no weight is "
                             "scale-invariant, so nothing would go on the PSI manifold")
    else:
        psi_lr = None
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}")
    weight_decay = defaults["weight_decay"] if weight_decay is None else weight_decay
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    if rescale is not None and norm != "bn":
        raise ValueError("rescale needs norm='bn' (only weights feeding BatchNorm are "
                         "scale-invariant)")
    if rescale is not None and not rescale >= 1.0:
        raise ValueError(f"rescale must be >= 1; got {rescale}")
    return dict(optimizer=optimizer_name, lr=lr, psi_lr=psi_lr, momentum=momentum,
                weight_decay=weight_decay, norm=norm, schedule=schedule,
                batch_size=batch_size, epochs=epochs, seed=seed, width=width, dataset=dataset,
                augment=(dataset == "cifar10") if augment_data is None else bool(augment_data),
                rescale=rescale, split_seed=SPLIT_SEED)


def run_name(settings: dict[str, Any]) -> str:
    """``<optimizer>[-<norm>]-seed<seed>``; the norm only where it is not the optimizer's
    default (``sgd-none``: SGD on the BN-free twin)."""
    name = settings["optimizer"]
    if settings.get("norm", DEFAULTS[name]["norm"]) != DEFAULTS[name]["norm"]:
        name += f"-{settings['norm']}"
    return f"{name}-seed{settings['seed']}"


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _progress(total: int, initial: int, label: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", leave=False,
                dynamic_ncols=True, mininterval=0.5)


def run(optimizer_name: str = "psi-sgd", lr: float | None = None, psi_lr: float | None = None,
        momentum: float = DEFAULT_MOMENTUM, batch_size: int = DEFAULT_BATCH_SIZE,
        epochs: int = 10, seed: int = 0, device: str | torch.device = "cpu",
        threads: int | None = 1, *, schedule: str = "cosine", width: int = 16,
        weight_decay: float | None = None, norm: str | None = None,
        dataset: str = "digits", data_dir: str | os.PathLike | None = None,
        augment_data: bool | None = None, rescale: float | None = None,
        data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        progress: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        init_hook: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Train ``SmallResNet`` with ``optimizer_name`` and return the record.

    Args:
        optimizer_name: ``"sgd"`` (torch.optim.SGD, L2 weight decay on everything),
            ``"psi-sgd"`` (PSISGD on ``psi_cuda.param_groups``: conv weights on the PSI
            manifold, no weight decay there; BN affine parameters and the classifier Euclidean
            with it), ``"psi-adam"`` (PSIAdam on the same groups; Euclidean groups follow
            AdamW), ``"adamw"`` (torch.optim.AdamW) or ``"bnp-sgd"`` (BNPSGD on the BN-free
            twin).
        lr: Euclidean learning rate; psi_lr: the PSI groups' (psi-sgd / psi-adam). Defaults in
            ``DEFAULTS``. momentum: SGD momentum, or beta1 for the Adam pair.
        batch_size, epochs, seed: the usual; ``seed`` sets the initialization, the shuffling
            and the augmentation (the digits train/test split is fixed).
        device: where to train. threads: ``torch.set_num_threads`` during the run (None: leave
            as is); 1 is fastest for the digits model on CPU.
        schedule: ``"cosine"`` (every group's lr follows ``0.5 (1 + cos(pi t / T))`` over the
            ``T`` steps of the run) or ``"constant"``.
        width: channels of the stem (the second block has twice as many).
        weight_decay: default ``DEFAULTS[optimizer]``; norm: ``"bn"`` (with BatchNorm) or
            ``"none"`` (the BN-free twin; default for bnp-sgd).
        dataset: ``"digits"`` (built in) or ``"cifar10"`` (python version in ``data_dir``, never
            downloaded). augment_data: random crop + flip (default: on for CIFAR-10 only).
        rescale: multiply each conv output channel by a factor log-uniform in
            ``[1/rescale, rescale]`` after initialization (an equivalent start, see
            :func:`rescale_channels`).
        data: ``(train_x, train_y, test_x, test_y)`` to use instead of loading ``dataset``.
        checkpoint: a file written after every epoch (model, optimizer, scheduler, random
            generators, the record so far). resume: continue from ``checkpoint`` if it exists;
            the settings must be the same (device and thread count may differ).
        progress: show a tqdm progress bar with the loss and images/s.
        on_epoch: called with each epoch's entry as soon as it is done (for printing).
        init_hook: called with the model after its initialization (and ``rescale``), before the
            optimizer is made; for experiments (it is not recorded in the settings, so a
            checkpoint cannot check it).

    Deterministic: the same arguments give the same losses bit for bit on the same machine and
    thread count (``torch.manual_seed(seed)``, seeded generators for the shuffling and the
    augmentation, ``torch.use_deterministic_algorithms``), and so does a run interrupted and
    resumed from its checkpoint. A KeyboardInterrupt stops training cleanly: the record then
    holds the steps and epochs finished so far and ``"interrupted": True``.
    """
    settings = resolve_settings(optimizer_name, lr, psi_lr, momentum, batch_size, epochs, seed,
                                weight_decay=weight_decay, norm=norm, schedule=schedule,
                                width=width, dataset=dataset, augment_data=augment_data,
                                rescale=rescale)
    device = torch.device(device)
    if data is None:
        data = load_dataset(dataset, data_dir, split_seed=SPLIT_SEED)
    train_x, train_y, test_x, test_y = (t.to(device) for t in data)
    n_train = train_y.numel()
    if n_train == 0:
        raise ValueError("the training set is empty")
    settings.update(device=str(device), threads=threads, n_train=n_train,
                    n_test=test_y.numel())
    num_classes = max(NUM_CLASSES, int(train_y.max()) + 1,
                      int(test_y.max()) + 1 if test_y.numel() else 0)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    checkpoint = Path(checkpoint) if checkpoint is not None else None

    record: dict[str, Any] = {
        "settings": settings,
        "environment": dict(psi_cuda=__version__, torch=torch.__version__,
                            python=platform.python_version(), machine=platform.machine()),
        "step_loss": [],
        "step_time": [],  # training seconds (no evaluation) from the start to each step's end
        "epochs": [],
        "interrupted": False,
        "resumed_from_epoch": None,
    }
    with _deterministic(threads):
        torch.manual_seed(seed)
        model = SmallResNet(width=width, num_classes=num_classes, in_channels=train_x.shape[1],
                            norm=settings["norm"] == "bn").to(device)
        if rescale is not None:
            rescale_channels(model, rescale, seed + 1_000_003)
        if init_hook is not None:
            init_hook(model)
        optimizer, groups = make_optimizer(optimizer_name, model, settings["lr"],
                                           settings["psi_lr"], momentum,
                                           settings["weight_decay"])
        record["param_groups"] = groups
        record["num_parameters"] = sum(p.numel() for p in model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps))
            if schedule == "cosine" else 1.0)
        shuffle = torch.Generator().manual_seed(seed)
        augment_gen = torch.Generator().manual_seed(seed + 1)
        start_epoch, train_time = 1, 0.0
        if resume and checkpoint is not None and checkpoint.exists():
            saved = torch.load(checkpoint, map_location=device, weights_only=False)
            changed = sorted(k for k in set(saved["settings"]) | set(settings)
                             if k not in RESUMABLE_CHANGES
                             and saved["settings"].get(k) != settings.get(k))
            if changed:
                raise ValueError(f"checkpoint {checkpoint} is of a different run: "
                                 + ", ".join(f"{k} {saved['settings'].get(k)!r} there, "
                                             f"{settings.get(k)!r} here" for k in changed))
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            shuffle.set_state(saved["shuffle_rng"])
            augment_gen.set_state(saved["augment_rng"])
            torch.set_rng_state(saved["torch_rng"])
            for key in ("step_loss", "step_time", "epochs"):
                record[key] = list(saved["record"][key])
            start_epoch = len(record["epochs"]) + 1
            train_time = record["step_time"][-1] if record["step_time"] else 0.0
            record["resumed_from_epoch"] = len(record["epochs"])

        start_all = time.perf_counter()
        step_losses: list[Tensor] = []  # this epoch's losses, not yet in the record
        step_times: list[float] = []
        bar = _progress(epochs * steps_per_epoch, (start_epoch - 1) * steps_per_epoch,
                        f"{run_name(settings)}", progress)
        try:
            for epoch in range(start_epoch, epochs + 1):
                t0 = time.perf_counter()
                model.train()
                order = torch.randperm(n_train, generator=shuffle).to(device)
                step_losses, step_times = [], []
                for start in range(0, n_train, batch_size):
                    idx = order[start:start + batch_size]
                    x = train_x[idx]
                    if settings["augment"]:
                        x = augment(x, augment_gen)
                    loss = F.cross_entropy(model(x), train_y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step_losses.append(loss.detach())
                    step_times.append(train_time + time.perf_counter() - t0)
                    if bar is not None:
                        bar.update(1)
                        if len(step_losses) % 10 == 1:  # a host sync every 10 steps only
                            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", epoch=epoch,
                                            img_s=f"{start / max(1e-9, step_times[-1] - train_time):.0f}"
                                            if start else "-")
                # One host sync per epoch, not per step.
                losses, step_losses = torch.stack(step_losses).float().cpu().tolist(), []
                _sync(device)
                t1 = time.perf_counter()
                test_loss, test_acc = evaluate(model, test_x, test_y)
                t2 = time.perf_counter()
                train_time += t1 - t0
                record["step_loss"].extend(losses)
                record["step_time"].extend(step_times)
                weights = [min(batch_size, n_train - s) for s in range(0, n_train, batch_size)]
                entry = dict(epoch=epoch, step=len(record["step_loss"]),
                             train_loss=sum(w * l for w, l in zip(weights, losses)) / n_train,
                             test_loss=test_loss, test_acc=test_acc,
                             train_s=t1 - t0, wall_s=t2 - t0, train_time=train_time,
                             samples_per_s=n_train / (t1 - t0))
                record["epochs"].append(entry)
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, dict(
                        settings=settings, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        shuffle_rng=shuffle.get_state(), augment_rng=augment_gen.get_state(),
                        torch_rng=torch.get_rng_state(),
                        record={k: record[k] for k in ("step_loss", "step_time", "epochs")}))
                if bar is not None:
                    bar.clear()
                if on_epoch is not None:
                    on_epoch(entry)
        except KeyboardInterrupt:
            record["interrupted"] = True
            # Keep the steps of the unfinished epoch too (no epoch entry for it).
            record["step_loss"].extend(float(loss) for loss in step_losses)
            record["step_time"].extend(step_times[:len(step_losses)])
        finally:
            if bar is not None:
                bar.close()
        total = time.perf_counter() - start_all

    # None (JSON null) where no epoch finished (interrupted at once, or epochs=0).
    last = record["epochs"][-1] if record["epochs"] else {}
    done = record["epochs"]
    train_s = sum(e["train_s"] for e in done)
    record["final"] = dict(
        epochs_done=len(done), steps=len(record["step_loss"]),
        train_loss=last.get("train_loss"), test_loss=last.get("test_loss"),
        test_acc=last.get("test_acc"),
        best_test_acc=max((e["test_acc"] for e in done), default=None),
        wall_s=total, train_time=last.get("train_time"),
        samples_per_s=len(done) * n_train / train_s if train_s else None)
    return record


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
