"""PNG plots of training records: loss and test accuracy against steps and against wall time."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from .train import TrainSettings, run_label, smoothed


def label_of(record: dict[str, Any]) -> str:
    """``<optimizer> (<net>)``, e.g. ``sgd (no BN)``: the seeds of one setting share it."""
    return run_label(TrainSettings.from_dict(record["settings"]))


def _mean(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def plot_records(records: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                 label: Callable[[dict[str, Any]], str] = label_of) -> Path:
    """Writes a 2x2 figure to ``path``: training loss (trailing mean over one epoch of steps,
    log scale) against steps and against training time, test accuracy against steps and
    against training time. One colour per label: thin lines per seed, a thick line for the
    mean over seeds. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(label(r), []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, (name, runs) in enumerate(by_label.items()):
        colour = f"C{i % 10}"
        losses, times, accs, acc_steps, acc_times = [], [], [], [], []
        for r in runs:
            s = r["settings"]
            window = max(1, math.ceil(s["n_train"] / s["batch_size"]))
            curve = smoothed(r["step_loss"], window)
            steps = list(range(1, len(curve) + 1))
            t = r.get("step_time") or steps
            for ax, x in ((axes[0, 0], steps), (axes[0, 1], t)):
                ax.plot(x[:len(curve)], curve, color=colour, lw=0.6, alpha=0.35)
            es = r["epochs"]
            for ax, x in ((axes[1, 0], [e["step"] for e in es]),
                          (axes[1, 1], [e["train_time"] for e in es])):
                ax.plot(x, [100 * e["test_acc"] for e in es], color=colour, lw=0.6,
                        alpha=0.35, marker=".", ms=3)
            losses.append(curve)
            times.append(t)
            accs.append([100 * e["test_acc"] for e in es])
            acc_steps.append([e["step"] for e in es])
            acc_times.append([e["train_time"] for e in es])
        if not all(losses):
            continue
        mean_loss = _mean(losses)
        axes[0, 0].plot(range(1, len(mean_loss) + 1), mean_loss, color=colour, lw=1.8,
                        label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        axes[0, 1].plot(_mean(times)[:len(mean_loss)], mean_loss, color=colour, lw=1.8)
        if all(accs):
            mean_acc = _mean(accs)
            axes[1, 0].plot(_mean(acc_steps), mean_acc, color=colour, lw=1.8, marker="o", ms=3)
            axes[1, 1].plot(_mean(acc_times), mean_acc, color=colour, lw=1.8, marker="o", ms=3)
    for ax in axes[0]:
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, min(top, 10.0))  # a diverged run would squash the others
        ax.set_ylabel("training loss (trailing mean, 1 epoch)")
    for ax in axes[1]:
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[:, 0]:
        ax.set_xlabel("step")
    for ax in axes[:, 1]:
        ax.set_xlabel("training time (s, evaluation excluded)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
