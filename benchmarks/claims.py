"""The papers' claims, reproduced at the scale of the built-in digits data (2 CPU cores).

    python benchmarks/claims.py            # sweep, a, b, c (c, 8 seeds: about 10 minutes)
    python benchmarks/claims.py --only a   # sweep, a, b, c: one part (a and b need the sweep's
                                           # results, benchmarks/results/claims_sweep.json)
    python benchmarks/claims.py --readme   # also rewrite the README block from the JSON files
    python benchmarks/claims.py --only robustness   # "When does PSI help?" (benchmarks/psi_study.py,
                                           # about 15 minutes; --full for more seeds and settings)

Parts (every run is ``psi_cuda.apps.train.run``, the function behind ``psi-cuda train``):

* sweep: a small learning-rate grid per optimizer (SmallResNet with BatchNorm; bnp-sgd on its
  BN-free twin), 6 epochs, batch 64, seeds 100 and 101 (not the evaluation seeds); the setting
  with the lowest mean final training loss wins. -> claims_sweep.json
* a: PSI-SGD vs SGD (and PSI-Adam vs AdamW) at their swept settings, seeds 0-4: steps and
  training seconds to a trailing-mean training loss of 0.3 / 0.1 / 0.05, final training loss and
  test accuracy. SGD and PSI-SGD runs alternate, so machine noise hits both alike.
  -> claims_a.json, claims_a.png
* b: equivalent starts: the same initialization with every conv output channel multiplied by a
  factor log-uniform in [1/4, 4] (BatchNorm makes it the same network). SGD's trajectory and
  result change; PSI-SGD's do not (up to BatchNorm's eps and float rounding). -> claims_b.json,
  claims_b.png
* robustness: benchmarks/psi_study.py, PSI-SGD vs SGD and PSI-Adam vs AdamW across learning
  rates, init scales, weight decay and schedule, batch sizes and a transformer, 8 seeds per cell,
  paired 95% intervals. -> claims_robustness.json, claims_robustness.png. The README's (a) and
  (b) come from its cells (8 seeds) rather than from parts a and b (5 and 3 seeds), which stay.
* c: BNP at batch sizes 1, 2 and 4 against BatchNorm (SGD on the BN model) and plain SGD (the
  BN-free twin), 2 epochs, lr picked per method and batch size on seed 100 from a grid, then
  seeds 0-7 (--c-seeds). -> claims_c.json, claims_c.png
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import psi_study
from psi_cuda.apps import bench, train
from psi_cuda.apps.data import load_dataset
from psi_cuda.apps.train import SPLIT_SEED, TrainSettings, smoothed, time_to_target

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- claims:start -->", "<!-- claims:end -->"
STUDY_BEGIN, STUDY_END = "<!-- psi-study:start -->", "<!-- psi-study:end -->"
TARGETS = (0.3, 0.1, 0.05)
EPOCHS = 6
SWEEP_SEEDS = (100, 101)
GRID = {
    "sgd": [dict(lr=lr) for lr in (0.05, 0.1, 0.2, 0.4, 0.8)],
    "psi-sgd": [dict(lr=lr, psi_lr=p) for lr in (0.1, 0.2, 0.4, 0.8)
                for p in (0.025, 0.05, 0.1, 0.2)],
    "psi-adam": [dict(lr=lr, psi_lr=p) for lr in (1e-2, 3e-2, 0.1) for p in (0.03, 0.1, 0.3)],
    "adamw": [dict(lr=lr) for lr in (3e-3, 1e-2, 3e-2, 0.1)],
    "bnp-sgd": [dict(lr=lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2)],
}
C_BATCHES = (1, 2, 4)
C_EPOCHS = 2
C_METHODS = {  # label -> (optimizer, norm, lr grid)
    "SGD, no BN": ("sgd", "none", (3e-3, 1e-2, 3e-2, 0.1)),
    "SGD + BatchNorm": ("sgd", "bn", (3e-3, 1e-2, 3e-2, 0.1)),
    # BNPSGD's default step cap makes large lrs usable (benchmarks/bnp_lr_window.py): the grid
    # runs up to its default lr, 0.1.
    "BNP-SGD, no BN": ("bnp-sgd", "none", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)),
}


def run(optimizer: str, *, data, init_hook=None, **settings) -> dict:
    """One run of ``psi_cuda.apps.train.run`` on ``data``."""
    return train.run(TrainSettings(optimizer, **settings), data=data, init_hook=init_hook)


def summary(record: dict) -> dict:
    """What the claims keep of a run: settings, final numbers, time to each target."""
    return dict(settings=record["settings"], final=record["final"],
                to_target={str(t): time_to_target(record, t) for t in TARGETS})


def finite_loss(s: dict) -> float:
    v = s["final"]["train_loss"]
    return v if v is not None and math.isfinite(v) else math.inf


def mean_std(values, fmt=".3f"):
    return train.mean_std(values, fmt, pm="±")


def machine() -> dict:
    """psi-cuda bench's machine description, with the load average and the date."""
    return dict(bench.machine("cpu"), load_average=bench.load_average(),
                date=time.strftime("%Y-%m-%d %H:%M"))


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        sys.exit(f"{path} is missing: run `python benchmarks/claims.py --only "
                 f"{name.split('_', 1)[1]}` first")
    return json.loads(path.read_text())


def sweep(data, names=None) -> dict:
    """The grid of every optimizer in ``names`` (default all); the others' results are kept
    from the saved claims_sweep.json."""
    results = {}
    if names:
        results = load("claims_sweep")["results"]
    for name, grid in GRID.items():
        if names and name not in names:
            continue
        rows = []
        for options in grid:
            runs = [summary(run(name, epochs=EPOCHS, seed=s, data=data, **options))
                    for s in SWEEP_SEEDS]
            loss = statistics.mean(finite_loss(r) for r in runs)
            acc = statistics.mean(r["final"]["test_acc"] or 0 for r in runs)
            rows.append(dict(options=options, train_loss=loss, test_acc=acc))
            print(f"sweep {name:>8} {options}: train loss {loss:.4f}, test acc {acc:.4f}",
                  flush=True)
        best = min(rows, key=lambda r: r["train_loss"])
        results[name] = dict(grid=rows, best=best["options"])
        print(f"sweep {name:>8}: best {best['options']}", flush=True)
    return save("claims_sweep", dict(machine=machine(), epochs=EPOCHS, seeds=SWEEP_SEEDS,
                                     criterion="lowest mean final training loss",
                                     results=results))


def part_a(data, seeds) -> dict:
    best = load("claims_sweep")["results"]
    records = {}
    for seed in seeds:
        for name in ("sgd", "psi-sgd", "adamw", "psi-adam"):
            r = run(name, epochs=EPOCHS, seed=seed, data=data, **best[name]["best"])
            records.setdefault(name, []).append(r)
            print(f"a {name:>8} seed {seed}: loss {r['final']['train_loss']:.4f}, "
                  f"acc {r['final']['test_acc']:.4f}, to 0.1: {time_to_target(r, 0.1)}",
                  flush=True)
    plot_runs(records, RESULTS / "claims_a.png",
              "PSI-SGD vs SGD, PSI-Adam vs AdamW at swept settings (digits, seeds "
              f"{seeds[0]}-{seeds[-1]})")
    return save("claims_a", dict(machine=machine(), epochs=EPOCHS, seeds=list(seeds),
                                 targets=TARGETS, settings={k: best[k]["best"] for k in records},
                                 runs={k: [summary(r) for r in v] for k, v in records.items()},
                                 curves={k: [r["step_loss"] for r in v]
                                         for k, v in records.items()}))


def nudge_one_weight(model) -> None:
    """The noise floor of part b: one weight of the stem conv made larger by 2 ulp (a change
    of the size of float32 rounding)."""
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0].mul_(1 + 2.0 ** -22)


def divergence(base: dict, other: dict) -> dict:
    diff = [abs(a - b) for a, b in zip(base["step_loss"], other["step_loss"])]
    return dict(max_loss_diff=max(diff),
                first_step_diff_over_1e3=next((i + 1 for i, d in enumerate(diff) if d > 1e-3),
                                              None),
                final=other["final"])


def small_bn_eps(model) -> None:
    """BatchNorm eps 1e-5 -> 1e-10: the network becomes scale-invariant to float precision."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-10


def part_b(data, seeds, spread=4.0) -> dict:
    """Per setting (the swept one, a gentler lr 0.1 / psi_lr 0.1, and the swept one with
    BatchNorm's eps made 1e-10), optimizer and seed: the run from the original start, from the
    channel-rescaled start, and from the original start with one weight nudged by 2 ulp (how far
    float rounding alone moves a trajectory)."""
    best = load("claims_sweep")["results"]
    swept = {k: best[k]["best"] for k in ("sgd", "psi-sgd")}
    settings = {"swept": swept,
                "lr 0.1": {"sgd": dict(lr=0.1), "psi-sgd": dict(lr=0.1, psi_lr=0.1)},
                "swept, BN eps 1e-10": swept}
    hooks = {"swept, BN eps 1e-10": small_bn_eps}
    out, curves = {}, {}
    for label, options in settings.items():
        hook = hooks.get(label)
        nudge = nudge_one_weight if hook is None else (
            lambda m, hook=hook: (hook(m), nudge_one_weight(m)))
        for name in ("sgd", "psi-sgd"):
            for seed in seeds:
                kw = dict(epochs=EPOCHS, seed=seed, data=data, **options[name])
                base = run(name, init_hook=hook, **kw)
                rec = run(name, rescale=spread, init_hook=hook, **kw)
                moved = divergence(base, rec)
                nudged = divergence(base, run(name, init_hook=nudge, **kw))
                out.setdefault(label, {}).setdefault(name, []).append(dict(
                    seed=seed, base=base["final"], rescaled=moved, nudged=nudged))
                if label == "swept":
                    curves.setdefault(name, []).append(dict(base=base["step_loss"],
                                                            rescaled=rec["step_loss"]))
                print(f"b {label} {name:>8} seed {seed}: rescaled max |loss diff| "
                      f"{moved['max_loss_diff']:.3g} (first > 1e-3 at "
                      f"{moved['first_step_diff_over_1e3']}), nudged "
                      f"{nudged['max_loss_diff']:.3g} ({nudged['first_step_diff_over_1e3']})",
                      flush=True)
    plot_b(curves, RESULTS / "claims_b.png", spread)
    return save("claims_b", dict(machine=machine(), epochs=EPOCHS, seeds=list(seeds),
                                 spread=spread, settings=settings, results=out, curves=curves))


def part_c(data, seeds) -> dict:
    chosen, grid_rows, runs = {}, [], {}
    for label, (name, norm, grid) in C_METHODS.items():
        for batch in C_BATCHES:
            trials = []
            for lr in grid:
                r = run(name, lr=lr, norm=norm, batch_size=batch, epochs=C_EPOCHS, seed=100,
                        data=data)
                trials.append((finite_loss(summary(r)), lr))
                grid_rows.append(dict(method=label, batch=batch, lr=lr,
                                      train_loss=finite_loss(summary(r)),
                                      test_acc=r["final"]["test_acc"]))
                print(f"c sweep {label} b{batch} lr {lr:g}: {trials[-1][0]:.4f}", flush=True)
            lr = min(trials)[1]
            chosen[f"{label} b{batch}"] = lr
            for seed in seeds:
                r = run(name, lr=lr, norm=norm, batch_size=batch, epochs=C_EPOCHS, seed=seed,
                        data=data)
                runs.setdefault(label, {}).setdefault(str(batch), []).append(summary(r))
                print(f"c {label} b{batch} seed {seed}: loss {r['final']['train_loss']:.4f}, "
                      f"acc {r['final']['test_acc']:.4f}", flush=True)
    plot_c(runs, RESULTS / "claims_c.png")
    return save("claims_c", dict(machine=machine(), epochs=C_EPOCHS, seeds=list(seeds),
                                 bnp_step_cap=True,  # BNPSGD's default (step cap on)
                                 batches=C_BATCHES, lr=chosen, grid=grid_rows, runs=runs))


# ---------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_runs(records: dict, path: Path, title: str) -> None:
    from psi_cuda.apps.plots import plot_records

    plot_records([r for v in records.values() for r in v], path, title)


def plot_b(curves: dict, path: Path, spread: float) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ("sgd", "psi-sgd")):
        for i, c in enumerate(curves[name]):
            w = 23
            ax.plot(smoothed(c["base"], w), color=f"C{i}", lw=1.2,
                    label=f"seed {i}: original start" if True else None)
            ax.plot(smoothed(c["rescaled"], w), color=f"C{i}", lw=1.2, ls="--",
                    label=f"seed {i}: channels rescaled")
        ax.set_yscale("log")
        ax.set_title(f"{name}: original (solid) vs rescaled start (dashed)")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("training loss (trailing mean over one epoch)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Equivalent starts: every conv output channel x U_log[1/{spread:g}, "
                 f"{spread:g}], same network")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_c(runs: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, by_batch) in enumerate(runs.items()):
        batches = sorted(by_batch, key=int)
        loss = [statistics.mean(finite_loss(r) for r in by_batch[b]) for b in batches]
        acc = [100 * statistics.mean(r["final"]["test_acc"] for r in by_batch[b])
               for b in batches]
        axes[0].plot([int(b) for b in batches], loss, marker="o", color=f"C{i}", label=label)
        axes[1].plot([int(b) for b in batches], acc, marker="o", color=f"C{i}", label=label)
    axes[0].set_ylabel(f"final training loss (epoch {C_EPOCHS})")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("batch size")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle("BNP at small batch sizes (digits, mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- README

def readme_block() -> str:
    """The claims block: the sweep's learning rates, (a) and (b) from the cells of the
    robustness study (8 seeds, paired 95% intervals), (c) from part c."""
    sweep_ = load("claims_sweep")
    c = load("claims_c")
    study = load("claims_robustness")
    cells = {e["name"]: e for e in study["cells"]}
    n = study["config"]["seeds"]
    ci = psi_study.fmt_ci
    n_c = len(c["seeds"])
    lines = [f"Measured by `python benchmarks/claims.py` ({study['machine']['cpu']}, "
             f"{study['machine']['cores']} cores, 1 thread per run, torch "
             f"{study['machine']['torch']}; results in `benchmarks/results/claims_*.json` and "
             "`.png`). (a) and (b) are cells of the robustness study (`--only robustness`, "
             f"{n} seeds, mean [95% t-interval]; the comparisons paired over seeds); (c) is "
             f"part c ({n_c} seeds, "
             + ("mean [95% t-interval])." if n_c >= 8 else "mean ± std)."), ""]
    best = {k: v["best"] for k, v in sweep_["results"].items()}

    def opts_text(k, opts):
        text = f"{k} " + ", ".join(f"{o} {v:g}" for o, v in opts.items())
        if k == "bnp-sgd":
            text += (" (the exact BNP step, before BNPSGD's step cap; with the cap the default "
                     "is lr 0.1, see [BNP](#bnp-batchnorms-conditioning-without-a-batchnorm-"
                     "layer))")
        return text

    width = study.get("lr_width", {})
    lines += ["**Learning rates** (sweep: " + ", ".join(
        f"{k} {len(v['grid'])} settings" for k, v in sweep_["results"].items())
        + f", {sweep_['epochs']} epochs, seeds {sweep_['seeds'][0]} and "
        f"{sweep_['seeds'][1]}, lowest final training loss; `claims_sweep.json`): "
        + "; ".join(opts_text(k, opts) for k, opts in best.items()) + "."
        + (f" Checked with {n} seeds on the study's lr grid (each setting's lrs times 2^k, "
           "lowest mean final training loss at): " + "; ".join(
               f"{k} x{psi_study._fmt_mult(v['best_mult'])}" for k, v in width.items())
           + " (x1: the sweep's choice)." if width else ""), ""]

    base = cells["lr x1"]
    lines += [f"**(a) PSI-SGD vs SGD, PSI-Adam vs AdamW** at the swept settings "
              f"({study['config']['epochs']} epochs, batch 64, cosine, seeds 0-{n - 1}; steps "
              "until the mean training loss over the last epoch of steps is at most "
              f"{study['target']:g}; the study's `lr x1` cell):", "",
              f"| optimizer | steps to {study['target']:g} | final train loss | test acc % |",
              "| --- | ---: | ---: | ---: |"]
    for name, v in base["methods"].items():
        st = v["stats"]
        reach = "" if st["reached"] == st["n"] else f" ({st['reached']}/{st['n']} reach it)"
        lines.append(f"| {name} | {ci(st['steps_to_target'], '.0f', True)}{reach} | "
                     f"{ci(st['loss'], '.4f', True)} | {ci(st['test_acc'], '.2f', True)} |")
    for pair, comp in base["compare"].items():
        a, b = pair.split(" vs ")
        lines.append(f"| {a} against {b} | {ci(comp['steps_diff'], '.1f')} steps "
                     f"({comp['steps_diff']['n']} pairs) | x{ci(comp['loss_ratio'], '.2f', True)}"
                     f" | {ci(comp['test_acc_diff'], '.2f')} points |")
    lines += ["", "PSI's effect at other learning rates, init scales, weight decays, schedules and "
              "batch sizes: [When PSI helps](#when-psi-helps).", ""]

    init = [e for e in study["cells"] if e["part"] == "init" and not e.get("same_as")]
    lines += ["**(b) Equivalent starts** (the same seed, data order and settings, from the "
              "start changed by the row: conv weights times a constant, or every conv output "
              "channel times its own log-uniform factor; BatchNorm makes every one of them the "
              "same network up to its eps. The noise floor: one weight nudged by 2 ulp. Largest "
              "per-step difference in training loss from the unchanged start, and the final "
              "loss of the changed start over the unchanged one, paired over seeds):", "",
              "| start | " + " | ".join(f"{m}: max \\|loss diff\\|" for m in ("sgd", "psi-sgd"))
              + " | " + " | ".join(f"{m}: final loss ratio" for m in ("sgd", "psi-sgd")) + " |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for e in init:
        diffs, ratios = [], []
        for m in ("sgd", "psi-sgd"):
            diffs.append(ci(e["methods"][m]["stats"]["max_loss_diff"], ".2g", True))
            ratios.append("x" + ci(psi_study.ratio_interval(
                [r["loss"] for r in e["methods"][m]["runs"]],
                [r["loss"] for r in base["methods"][m]["runs"]]), ".2f", True))
        lines.append(f"| {e['name']} | " + " | ".join(diffs + ratios) + " |")
    lines += ["", "PSI-Adam and AdamW in the same cells: [When PSI helps](#when-psi-helps). "
              "`python benchmarks/claims.py --only b` (`claims_b.json`, `claims_b.png`; 3 "
              "seeds, so not restated here) also runs these starts at lr 0.1 and with "
              "BatchNorm's eps made 1e-10.", ""]

    capped = c.get("bnp_step_cap", False)
    lines += [f"**(c) BNP at small batches** ({c['epochs']} epochs, lr per method and batch "
              f"size from a grid on seed 100, then seeds {c['seeds'][0]}-{c['seeds'][-1]}; "
              "final training loss / test accuracy %, "
              + ("mean [95% t-interval]; the last columns: BNP-SGD's test accuracy minus the "
                 "baseline's, paired over seeds" if n_c >= 8 else
                 f"mean ± std over {n_c} seeds, fewer than the 8 of (a) and (b), so read it as "
                 "an indication")
              + ("; BNP-SGD with BNPSGD's default step cap" if capped else
                 "; BNP-SGD with the exact step, measured before the step cap: `python "
                 "benchmarks/claims.py --only c --readme` refreshes it") + "):", ""]
    labels = list(c["runs"])
    bnp, others = labels[-1], labels[:-1]
    extra = [f"{bnp} − {o}" for o in others] if n_c >= 8 else []
    lines += ["| batch | " + " | ".join(labels + extra) + " |",
              "| ---: | " + " | ".join("---" for _ in labels + extra) + " |"]

    def loss_acc(rs):
        losses = [r["final"]["train_loss"] for r in rs]
        accs = [100 * r["final"]["test_acc"] for r in rs]
        if n_c >= 8:
            return (f"{psi_study.fmt_ci(psi_study.interval(losses), '.3f', True)} / "
                    f"{psi_study.fmt_ci(psi_study.interval(accs), '.1f', True)}")
        return f"{mean_std(losses, '.3f')} / {mean_std(accs, '.1f')}"

    for batch in c["batches"]:
        cells = [f"{loss_acc(c['runs'][label][str(batch)])} (lr "
                 f"{c['lr'][f'{label} b{batch}']:g}{_edge(c, label, batch)})" for label in labels]
        for o in (others if extra else ()):
            a, b = c["runs"][bnp][str(batch)], c["runs"][o][str(batch)]
            d = psi_study.interval([100 * (x["final"]["test_acc"] - y["final"]["test_acc"])
                                    for x, y in zip(a, b)])
            cells.append(f"{psi_study.fmt_ci(d, '.1f')} points")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += ["", "![claim c](benchmarks/results/claims_c.png)", ""]
    lines += ["What this shows, at this small scale (every number and direction below is "
              "generated from the JSON files):", ""] + what_this_shows(study, c)
    return "\n".join(lines)


def _edge(c: dict, label: str, batch: int) -> str:
    """``", grid edge"`` when part c's chosen lr is the largest or smallest of its grid."""
    grid = sorted(r["lr"] for r in c["grid"] if r["method"] == label and r["batch"] == batch)
    lr = c["lr"][f"{label} b{batch}"]
    return ", grid edge" if grid and lr in (grid[0], grid[-1]) else ""


def _dir(stat: dict, null: float, up: str, down: str, same: str) -> str:
    """``up`` / ``down`` when the interval lies above / below ``null``, else ``same``."""
    if stat.get("lo") is None:
        return same
    return up if stat["lo"] > null else down if stat["hi"] < null else same


def what_this_shows(study: dict, c: dict) -> list[str]:
    ci = psi_study.fmt_ci
    cells = {e["name"]: e for e in study["cells"]}
    base = cells["lr x1"]
    out = []
    for pair, comp in base["compare"].items():
        a, b = (psi_study.LABELS[x] for x in pair.split(" vs "))
        steps, loss, acc = comp["steps_diff"], comp["loss_ratio"], comp["test_acc_diff"]
        out.append(
            f"- **(a)** At the swept settings {a} needs {ci(steps, '.1f')} steps more than {b} "
            f"to reach a training loss of {study['target']:g} (paired over the "
            f"{steps['n']} seeds where both do; "
            f"{_dir(steps, 0, 'later', 'sooner', 'no difference the seeds can resolve')}), "
            f"ends at {ci(loss, '.2f', True)} times its final loss "
            f"({_dir(loss, 1, 'higher', 'lower', 'no resolvable difference')}) and at "
            f"{ci(acc, '.2f')} points of test accuracy "
            f"({_dir(acc, 0, 'higher', 'lower', 'no resolvable difference')}).")
    init = [e for e in study["cells"] if e["part"] == "init" and not e.get("same_as")]
    floor = next((e for e in init if "ulp" in e["name"]), None)
    starts = [e for e in init if e is not floor]
    for m in ("sgd", "psi-sgd"):
        label = psi_study.LABELS[m]
        parts = []
        for e in starts:
            st = e["methods"][m]["stats"]["max_loss_diff"]
            ratio = psi_study.ratio_interval([r["loss"] for r in e["methods"][m]["runs"]],
                                             [r["loss"] for r in base["methods"][m]["runs"]])
            parts.append(f"{e['name'].replace('init ', '')}: {ci(st, '.2g', True)}, final loss "
                         f"x{ci(ratio, '.2f', True)} "
                         f"({_dir(ratio, 1, 'higher', 'lower', 'unchanged within the interval')})")
        fl = ci(floor["methods"][m]["stats"]["max_loss_diff"], ".2g", True) if floor else "-"
        out.append(f"- **(b)** {label} from equivalent starts: largest per-step loss difference "
                   f"from the unchanged start, " + "; ".join(parts)
                   + f" (2-ulp nudge: {fl}).")
    out.append("  PSI-SGD's step is angular, so only BatchNorm's eps (1e-5, not scaled with the "
               "weights) and float rounding separate its equivalent starts; SGD's effective "
               "step is lr/|w|², so a start with 10x larger weights takes 100x smaller steps.")
    if len(c["seeds"]) >= 8:
        labels = list(c["runs"])
        bnp, plain, bn = labels[-1], labels[0], labels[1]
        rows = []
        for batch in c["batches"]:
            r = {k: c["runs"][k][str(batch)] for k in labels}
            acc = {k: psi_study.interval([100 * x["final"]["test_acc"] for x in v])
                   for k, v in r.items()}
            d_plain = psi_study.interval([100 * (x["final"]["test_acc"] - y["final"]["test_acc"])
                                          for x, y in zip(r[bnp], r[plain])])
            d_bn = psi_study.interval([100 * (x["final"]["test_acc"] - y["final"]["test_acc"])
                                       for x, y in zip(r[bnp], r[bn])])
            rows.append(f"batch {batch}: {bnp} {ci(acc[bnp], '.1f', True)}% against {plain} "
                        f"{ci(acc[plain], '.1f', True)}% ({ci(d_plain, '.1f')} points, "
                        f"{_dir(d_plain, 0, 'higher', 'lower', 'no resolvable difference')}) "
                        f"and {bn} {ci(acc[bn], '.1f', True)}% ({ci(d_bn, '.1f')} points, "
                        f"{_dir(d_bn, 0, 'higher', 'lower', 'no resolvable difference')})")
        out.append(f"- **(c)** Test accuracy after {c['epochs']} epochs, {len(c['seeds'])} "
                   "seeds: " + "; ".join(rows) + ".")
    else:
        out.append(f"- **(c)** {len(c['seeds'])} seeds only: see the table; "
                   "`python benchmarks/claims.py --only c --readme` measures 8.")
    return out


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        sys.exit(f"README.md has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + body + "\n" + end + tail


def write_readme() -> None:
    """Rewrites the claims block and the "When PSI helps" block from the JSON files."""
    text = replace_block(README.read_text(), BEGIN, END, readme_block())
    text = replace_block(text, STUDY_BEGIN, STUDY_END,
                         psi_study.readme_section(load("claims_robustness")))
    README.write_text(text)
    print(f"wrote the claims and PSI-study blocks of {README}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("sweep", "a", "b", "c", "robustness"),
                   default=["sweep", "a", "b", "c"],
                   help="parts to run (default sweep a b c; robustness: benchmarks/psi_study.py)")
    p.add_argument("--seeds", type=int, default=5, help="evaluation seeds of part a (default 5)")
    p.add_argument("--c-seeds", type=int, default=8,
                   help="evaluation seeds of part c (default 8)")
    p.add_argument("--sweep-optimizers", nargs="+", choices=tuple(GRID), default=None,
                   help="re-sweep only these optimizers, keeping the others' saved results")
    p.add_argument("--readme", action="store_true", help="rewrite the README block")
    p.add_argument("--readme-only", action="store_true",
                   help="only rewrite the README block from the saved JSON")
    psi_study.add_arguments(p)
    args = p.parse_args(argv)
    if not args.readme_only:
        torch.set_num_threads(1)
        data = load_dataset("digits", split_seed=SPLIT_SEED)
        started = time.perf_counter()
        if "sweep" in args.only:
            sweep(data, args.sweep_optimizers)
        if "a" in args.only:
            part_a(data, tuple(range(args.seeds)))
        if "b" in args.only:
            part_b(data, (0, 1, 2))
        if "c" in args.only:
            part_c(data, tuple(range(args.c_seeds)))
        if "robustness" in args.only:
            psi_study.run_from_args(args)
        print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    if args.readme or args.readme_only:
        write_readme()


if __name__ == "__main__":
    main()
