"""When does PSI help? PSI-SGD against SGD and PSI-Adam against AdamW across the settings users
vary, with enough seeds and a confidence interval on every comparison.

    python benchmarks/claims.py --only robustness            # the default study, then --readme
    python benchmarks/claims.py --only robustness --full     # more seeds, a wider lr grid
    python benchmarks/psi_study.py --study-seeds 2 --epochs 1  # the same module, run directly

Every digits run is ``psi_cuda.apps.train.run`` (SmallResNet with BatchNorm, the function behind
``psi-cuda train``), each method at its ``DEFAULTS`` setting (the winners of claims.py's sweep),
6 epochs, batch 64, cosine schedule, momentum / beta1 0.9, unless the cell changes it. Cells:

* lr: lr times 2^k for k = -3..3 (a 64x range; --full: k = -4..4, 256x). For PSI-SGD and
  PSI-Adam both lr (Euclidean groups) and psi_lr (the sphere) move together.
* init: every conv weight multiplied by 0.1 or 10 after initialization (BatchNorm makes it the
  same network), each method at its scale-1 setting; also every conv output channel multiplied
  by its own factor log-uniform in [1/4, 4] (claims.py part b's equivalent start), and one
  weight nudged by 2 ulp (the floor: how far float rounding alone moves a trajectory).
* wd: SGD and PSI-SGD with weight decay 0 and 5e-4, cosine and constant lr.
* batch: 16, 64, 256 with the linear scaling rule (every lr times batch / 64).
* transformer: ``examples/train_large.py --optimizer adamw|psi-adam`` (same data and seeds),
  at the example's size (--dim 64) and 4x wider (--dim 256); the loss (mean of the 20 step
  losses up to the step) at fixed steps.

Statistics: every cell has the same seeds for every method (the same initialization and data
order), so comparisons are paired over seeds: the 95% t-interval of the mean paired difference
(test accuracy in points, steps to the target), or of the mean log ratio (final training loss,
reported as a ratio). A final loss that is not finite (diverged) or above chance counts as
chance, ln 10. "Reaches the target": the trailing mean of the training loss over one epoch of
steps gets to 0.1 within the run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "train_large.py"

METHODS = ("sgd", "psi-sgd", "adamw", "psi-adam")
PAIRS = (("psi-sgd", "sgd"), ("psi-adam", "adamw"))
LABELS = {"sgd": "SGD", "psi-sgd": "PSI-SGD", "adamw": "AdamW", "psi-adam": "PSI-Adam"}
TARGET = 0.1
CHANCE = math.log(10)
BASE_BATCH = 64
GPT_WINDOW = 20
PARTS = ("lr", "init", "wd", "batch", "transformer")

# t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df) to 3 decimals).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclasses.dataclass(frozen=True)
class Config:
    """The size of the study."""

    seeds: int = 8
    epochs: int = 6
    lr_span: int = 3  # lr x 2^k, k = -lr_span..lr_span
    init_scales: tuple = (0.1, 10.0)
    spread: float = 4.0
    weight_decays: tuple = (0.0, 5e-4)
    schedules: tuple = ("cosine", "constant")
    batches: tuple = (16, 64, 256)
    gpt_seeds: int = 5
    gpt_steps: int = 300
    gpt_dims: tuple = (64, 256)
    gpt_checkpoints: int = 3  # losses at steps/3, 2 steps/3, steps
    dataset: str = "digits"
    data_dir: str | None = None
    device: str = "cpu"
    parts: tuple = PARTS

    @classmethod
    def full(cls, **kw) -> Config:
        return cls(**dict(dict(seeds=16, lr_span=4, batches=(8, 16, 64, 256, 512), gpt_seeds=8,
                               gpt_steps=600), **kw))


# --------------------------------------------------------------------------------- statistics

def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion, within 1e-3 of the exact value)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values) -> dict:
    """Mean and 95% t-interval over ``values`` (None values left out); no interval below 2."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return dict(n=0, mean=None, lo=None, hi=None, sd=None)
    mean = statistics.fmean(values)
    if n < 2:
        return dict(n=n, mean=mean, lo=None, hi=None, sd=None)
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return dict(n=n, mean=mean, lo=mean - half, hi=mean + half, sd=sd)


def ratio_interval(a, b) -> dict:
    """Geometric mean of a/b over pairs and its 95% interval (the t-interval of the mean log
    ratio, exponentiated)."""
    s = interval([math.log(x / y) for x, y in zip(a, b)])
    return {k: (math.exp(v) if v is not None and k in ("mean", "lo", "hi") else v)
            for k, v in s.items()}


def verdict(stat: dict, null: float, lower_is_better: bool = True) -> str:
    """``"better"``, ``"worse"`` or ``"same"`` (the interval contains ``null``) for the first
    method of a comparison."""
    if stat.get("lo") is None:
        return "n/a"
    if stat["hi"] < null:
        return "better" if lower_is_better else "worse"
    if stat["lo"] > null:
        return "worse" if lower_is_better else "better"
    return "same"


# -------------------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class InitHook:
    """Applied after initialization: every conv weight times ``scale``; ``nudge``: one weight of
    the stem conv made larger by 2 ulp."""

    scale: float = 1.0
    nudge: bool = False

    def __call__(self, model: nn.Module) -> None:
        with torch.no_grad():
            if self.scale != 1.0:
                for m in model.modules():
                    if isinstance(m, nn.Conv2d):
                        m.weight.mul_(self.scale)
            if self.nudge:
                model.stem[0].weight[0, 0, 0, 0].mul_(1 + 2.0 ** -22)


def digits_job(method: str, seed: int, cfg: Config, *, lr_mult: float = 1.0,
               init_scale: float = 1.0, rescale: float | None = None, nudge: bool = False,
               weight_decay: float | None = None, schedule: str = "cosine",
               batch_size: int = BASE_BATCH) -> tuple:
    """A hashable description of one training run (the same run in two cells runs once)."""
    from psi_cuda.apps.train import DEFAULTS

    wd = DEFAULTS[method]["weight_decay"] if weight_decay is None else weight_decay
    return ("train", method, seed, cfg.epochs, float(lr_mult), float(init_scale), rescale,
            bool(nudge), float(wd), schedule, int(batch_size), cfg.dataset, cfg.data_dir,
            cfg.device)


def gpt_job(method: str, seed: int, dim: int, steps: int) -> tuple:
    return ("gpt", method, seed, dim, steps)


_DATA: dict = {}


def _data(dataset: str, data_dir: str | None, device: str):
    from psi_cuda.apps.data import load_dataset
    from psi_cuda.apps.train import SPLIT_SEED

    key = (dataset, data_dir)
    if key not in _DATA:
        _DATA[key] = load_dataset(dataset, data_dir, split_seed=SPLIT_SEED)
    return tuple(t.to(device) for t in _DATA[key])


def run_job(job: tuple) -> dict:
    """Runs one job; returns what the study keeps of it (with the step losses, which the parent
    drops after computing the trajectory differences and curves)."""
    started = time.perf_counter()
    out = _run_gpt(job) if job[0] == "gpt" else _run_train(job)
    out["seconds"] = time.perf_counter() - started
    return out


def _run_train(job: tuple) -> dict:
    from psi_cuda.apps import train

    (_, method, seed, epochs, lr_mult, init_scale, rescale, nudge, wd, schedule, batch,
     dataset, data_dir, device) = job
    d = train.DEFAULTS[method]
    settings = train.TrainSettings(
        method, lr=d["lr"] * lr_mult,
        psi_lr=None if d["psi_lr"] is None else d["psi_lr"] * lr_mult,
        weight_decay=wd, schedule=schedule, batch_size=batch, epochs=epochs, seed=seed,
        rescale=rescale, dataset=dataset, data_dir=data_dir, device=device, threads=1)
    hook = InitHook(init_scale, nudge) if (init_scale != 1.0 or nudge) else None
    rec = train.run(settings, data=_data(dataset, data_dir, device), init_hook=hook)
    loss = rec["final"]["train_loss"]
    finite = loss is not None and math.isfinite(loss)
    to = train.time_to_target(rec, TARGET)
    per_epoch = math.ceil(rec["settings"]["n_train"] / batch)
    return dict(train_loss=loss if finite else None,
                loss=min(loss, CHANCE) if finite else CHANCE, diverged=not finite,
                test_acc=rec["final"]["test_acc"], steps_to_target=to["step"],
                epochs_to_target=None if to["step"] is None else to["step"] / per_epoch,
                steps=len(rec["step_loss"]), step_loss=rec["step_loss"])


def _run_gpt(job: tuple) -> dict:
    _, method, seed, dim, steps = job
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(EXAMPLE), "--optimizer", method, "--seed", str(seed),
               "--dim", str(dim), "--steps", str(steps), "--log-every", str(steps),
               "--log-json", str(log)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not log.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        saved = json.loads(log.read_text())
    return dict(step_loss=saved["step_loss"], loss_floor=saved["loss_floor"],
                tokens_per_s=saved["tokens_per_s"], settings=saved["settings"])


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_jobs(jobs: list[tuple], n_jobs: int = 1) -> dict[tuple, dict]:
    """Every job once (``n_jobs`` processes; 1: in this process), longest first; prints one
    line per finished run. Each run uses one thread and is deterministic, so the results do not
    depend on ``n_jobs``."""
    order = sorted(set(jobs), key=_cost, reverse=True)
    results: dict[tuple, dict] = {}

    def report(job, res):
        results[job] = res
        what = (f"loss {res['train_loss'] if res.get('train_loss') is not None else 'nan'}"
                if job[0] == "train" else f"loss {res['step_loss'][-1]:.4f}")
        print(f"[{len(results)}/{len(order)}] {job[:-3] if job[0] == 'train' else job} "
              f"{what} ({res['seconds']:.1f} s)", flush=True)

    if n_jobs <= 1:
        torch.set_num_threads(1)
        for job in order:
            report(job, run_job(job))
        return results
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(run_job, job): job for job in order}
        for fut in cf.as_completed(futures):
            report(futures[fut], fut.result())
    return results


def _cost(job: tuple) -> float:
    """A rough cost, to start the long runs first."""
    if job[0] == "gpt":
        return job[4] * (job[3] / 64) ** 1.3
    return job[3] * (4 + 1437 / job[10])


# ------------------------------------------------------------------------------------- cells

def cells(cfg: Config) -> list[dict]:
    """Every cell of the study: part, name, the methods and their jobs (one per seed)."""
    seeds = range(cfg.seeds)
    out = []

    def cell(part, name, methods, **kw):
        out.append(dict(part=part, name=name, options=kw,
                        jobs={m: [digits_job(m, s, cfg, **kw) for s in seeds] for m in methods}))

    if "lr" in cfg.parts:
        for k in range(-cfg.lr_span, cfg.lr_span + 1):
            cell("lr", f"lr x{_pow2(k)}", METHODS, lr_mult=2.0 ** k)
    if "init" in cfg.parts:
        for scale in sorted((*cfg.init_scales, 1.0)):
            cell("init", f"init x{scale:g}", METHODS, init_scale=scale)
        cell("init", f"init channels x U[1/{cfg.spread:g}, {cfg.spread:g}]", METHODS,
             rescale=cfg.spread)
        cell("init", "init x1, one weight +2 ulp", METHODS, nudge=True)
    if "wd" in cfg.parts:
        for schedule in cfg.schedules:
            for wd in cfg.weight_decays:
                cell("wd", f"wd {wd:g}, {schedule}", ("sgd", "psi-sgd"), weight_decay=wd,
                     schedule=schedule)
    if "batch" in cfg.parts:
        for b in cfg.batches:
            cell("batch", f"batch {b}", METHODS, batch_size=b, lr_mult=b / BASE_BATCH)
    if "transformer" in cfg.parts:
        for dim in cfg.gpt_dims:
            out.append(dict(part="transformer", name=f"transformer dim {dim}",
                            options=dict(dim=dim, steps=cfg.gpt_steps),
                            jobs={m: [gpt_job(m, s, dim, cfg.gpt_steps)
                                      for s in range(cfg.gpt_seeds)]
                                  for m in ("adamw", "psi-adam")}))
    return out


def _pow2(k: int) -> str:
    return f"{2 ** k:g}" if k >= 0 else f"1/{2 ** -k:g}"


def _max_diff(a: list, b: list) -> float:
    d = [abs(x - y) for x, y in zip(a, b)]
    d = [x if math.isfinite(x) else math.inf for x in d]
    return max(d) if d else 0.0


def _mean_curve(curves: list[list[float]], window: int) -> list[float]:
    from psi_cuda.apps.train import smoothed

    sm = [smoothed(c, window) for c in curves]
    n = min(len(c) for c in sm)
    return [float(f"{statistics.fmean(c[i] for c in sm):.5g}") for i in range(n)]


def summarize(cfg: Config, results: dict[tuple, dict]) -> list[dict]:
    """The cells with their runs, per-method intervals and paired comparisons."""
    out = []
    all_cells = cells(cfg)
    reference = {c["name"]: c for c in all_cells}
    for c in all_cells:
        runs = {m: [dict(results[j]) for j in jobs] for m, jobs in c["jobs"].items()}
        entry = dict(part=c["part"], name=c["name"], options=c["options"], methods={},
                     compare={})
        default = reference.get("lr x1")
        if (c["part"] != "lr" and default is not None
                and all(js == default["jobs"].get(m) for m, js in c["jobs"].items())):
            entry["same_as"] = "lr x1"  # the same runs as the default cell
        if c["options"].get("nudge"):
            entry["floor"] = True  # the noise floor of the trajectory differences
        if c["part"] == "transformer":
            _summarize_gpt(cfg, entry, runs)
            out.append(entry)
            continue
        ref = reference.get("init x1") if c["part"] == "init" else None
        for m, rs in runs.items():
            if ref is not None:  # trajectory difference from the scale-1 start, same seed
                for r, j in zip(rs, ref["jobs"][m]):
                    r["max_loss_diff"] = _max_diff(r["step_loss"], results[j]["step_loss"])
            window = math.ceil(len(rs[0]["step_loss"]) / cfg.epochs)
            if c["name"] in ("lr x1",) or c["part"] in ("init",):
                entry.setdefault("curves", {})[m] = _mean_curve([r["step_loss"] for r in rs],
                                                               window)
            stats = dict(loss=interval([r["loss"] for r in rs]),
                         test_acc=interval([100 * r["test_acc"] for r in rs]),
                         steps_to_target=interval([r["steps_to_target"] for r in rs]),
                         epochs_to_target=interval([r["epochs_to_target"] for r in rs]),
                         reached=sum(r["steps_to_target"] is not None for r in rs),
                         diverged=sum(r["diverged"] for r in rs), n=len(rs))
            if ref is not None:
                stats["max_loss_diff"] = interval([r["max_loss_diff"] for r in rs])
            entry["methods"][m] = dict(stats=stats, runs=[
                {k: v for k, v in r.items() if k != "step_loss"} for r in rs])
        for a, b in PAIRS:
            if a in runs and b in runs:
                entry["compare"][f"{a} vs {b}"] = _compare(runs[a], runs[b])
        out.append(entry)
    return out


def _compare(ra: list[dict], rb: list[dict]) -> dict:
    both = [(x["steps_to_target"], y["steps_to_target"]) for x, y in zip(ra, rb)
            if x["steps_to_target"] is not None and y["steps_to_target"] is not None]
    loss = ratio_interval([r["loss"] for r in ra], [r["loss"] for r in rb])
    acc = interval([100 * (x["test_acc"] - y["test_acc"]) for x, y in zip(ra, rb)])
    steps = interval([x - y for x, y in both])
    return dict(loss_ratio=dict(loss, verdict=verdict(loss, 1.0)),
                test_acc_diff=dict(acc, verdict=verdict(acc, 0.0, lower_is_better=False)),
                steps_diff=dict(steps, verdict=verdict(steps, 0.0)),
                reached=[sum(r["steps_to_target"] is not None for r in ra),
                         sum(r["steps_to_target"] is not None for r in rb)], n=len(ra))


def _summarize_gpt(cfg: Config, entry: dict, runs: dict) -> None:
    steps = cfg.gpt_steps
    marks = sorted({max(GPT_WINDOW, round(steps * (i + 1) / cfg.gpt_checkpoints))
                    for i in range(cfg.gpt_checkpoints)})
    entry["checkpoints"] = marks
    entry["window"] = GPT_WINDOW
    # The example's settings (its defaults included); runs saved before they were recorded
    # used the example's only QK-norm then, over the whole projection (tensor groups).
    first = runs["psi-adam"][0]
    entry["example_settings"] = first.get("settings") or dict(qk_norm="full")

    def at(r, s):
        return statistics.fmean(r["step_loss"][s - GPT_WINDOW:s])

    for m, rs in runs.items():
        entry["methods"][m] = dict(
            stats={str(s): interval([at(r, s) for r in rs]) for s in marks},
            runs=[dict(seed=i, loss={str(s): at(r, s) for s in marks},
                       tokens_per_s=r["tokens_per_s"]) for i, r in enumerate(rs)],
            loss_floor=rs[0]["loss_floor"])
        entry.setdefault("curves", {})[m] = _mean_curve([r["step_loss"] for r in rs],
                                                        GPT_WINDOW)
    a, b = runs["psi-adam"], runs["adamw"]
    entry["compare"]["psi-adam vs adamw"] = {
        str(s): dict(d, verdict=verdict(d, 0.0))
        for s in marks for d in [interval([at(x, s) - at(y, s) for x, y in zip(a, b)])]}


def lr_width(entries: list[dict], cfg: Config) -> dict:
    """Per method: which lr multipliers get every seed to the target, the widest contiguous
    range of them (max/min; ``open`` ends touch the grid's edge, so the true range may be wider)
    and the multiplier with the lowest mean final loss."""
    grid = [e for e in entries if e["part"] == "lr"]
    mults = [e["options"]["lr_mult"] for e in grid]
    out = {}
    for m in METHODS:
        if not grid or m not in grid[0]["methods"]:
            continue
        reached = [e["methods"][m]["stats"]["reached"] for e in grid]
        n = grid[0]["methods"][m]["stats"]["n"]
        ok = [r == n for r in reached]
        best_run, run = (0, -1), None
        for i, good in enumerate(ok + [False]):
            if good and run is None:
                run = i
            if not good and run is not None:
                if i - run > best_run[1] - best_run[0] + 1:
                    best_run = (run, i - 1)
                run = None
        losses = [e["methods"][m]["stats"]["loss"]["mean"] for e in grid]
        best = min(range(len(grid)), key=lambda i: losses[i])
        lo, hi = best_run
        width = mults[hi] / mults[lo] if hi >= lo else None
        out[m] = dict(mults=mults, reached=reached, n=n, width=width,
                      range=[mults[lo], mults[hi]] if hi >= lo else None,
                      open_low=hi >= lo and lo == 0, open_high=hi >= lo and hi == len(grid) - 1,
                      best_mult=mults[best], best_loss=losses[best])
    return out


# -------------------------------------------------------------------------------------- main

def study(cfg: Config, n_jobs: int = 1, name: str = "claims_robustness",
          out_dir: Path = RESULTS, plot: bool = True, raw: Path | None = None,
          from_raw: Path | None = None) -> dict:
    """Runs the study of ``cfg`` and saves ``<name>.json`` (and ``.png``) in ``out_dir``.
    ``raw``: also save every run's result (step losses included) there; ``from_raw``: take the
    runs from such a file instead of running them (to redo the summaries)."""
    from psi_cuda.apps.train import DEFAULTS

    all_cells = cells(cfg)
    jobs = [j for c in all_cells for js in c["jobs"].values() for j in js]
    started = time.perf_counter()
    if from_raw is not None:
        saved = json.loads(Path(from_raw).read_text())
        results = {tuple(r["job"]): r["result"] for r in saved["runs"]}
        wall = saved["wall_seconds"]
        machine = saved.get("machine") or _machine()
    else:
        results = run_jobs(jobs, n_jobs)
        wall = time.perf_counter() - started
        machine = _machine()
        if raw is not None:
            Path(raw).write_text(json.dumps(dict(wall_seconds=wall, machine=machine, runs=[
                dict(job=list(j), result=r) for j, r in results.items()])))
    entries = summarize(cfg, results)
    payload = dict(
        machine=machine, config=dataclasses.asdict(cfg), jobs=n_jobs, runs=len(results),
        wall_seconds=wall, run_seconds=sum(r["seconds"] for r in results.values()),
        target=TARGET, chance=CHANCE,
        settings={m: {k: DEFAULTS[m][k] for k in ("lr", "psi_lr", "weight_decay")}
                  for m in METHODS},
        cells=entries, lr_width=lr_width(entries, cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    print(f"wrote {path} ({len(results)} runs, {wall:.0f} s wall, "
          f"{payload['run_seconds']:.0f} s of runs)", flush=True)
    if plot:
        try:
            plot_study(payload, out_dir / f"{name}.png")
            print(f"wrote {out_dir / f'{name}.png'}", flush=True)
        except ImportError:
            print("matplotlib is missing: no plot", flush=True)
    print(headline_table(payload), flush=True)
    return payload


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x))


def _machine() -> dict:
    from psi_cuda.apps import bench

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return dict(bench.machine("cpu"), load_average=bench.load_average(),
                date=time.strftime("%Y-%m-%d %H:%M"), git_commit=commit)


# ------------------------------------------------------------------------------------ report

def fmt_ci(s: dict, fmt: str = ".3f", ratio: bool = False) -> str:
    """``mean [lo, hi]`` (``mean`` alone without an interval, ``-`` without values)."""
    if not s or s.get("mean") is None:
        return "-"
    if s.get("lo") is None:
        return f"{s['mean']:{fmt}}"
    sign = "" if ratio else "+"
    return f"{s['mean']:{sign}{fmt}} [{s['lo']:{sign}{fmt}}, {s['hi']:{sign}{fmt}}]"


def _mark(v: str) -> str:
    return {"better": " ✓", "worse": " ✗"}.get(v, "")


def headline_table(payload: dict) -> str:
    """One row per digits cell: PSI-SGD vs SGD and PSI-Adam vs AdamW (final loss ratio, test
    accuracy difference, how many seeds reach the target); one per transformer size."""
    n = payload["config"]["seeds"]
    lines = ["| setting | PSI-SGD / SGD final loss | PSI-SGD − SGD test acc (pp) | reach "
             f"{payload['target']:g}: PSI-SGD, SGD | PSI-Adam / AdamW final loss | "
             "PSI-Adam − AdamW test acc (pp) | reach: PSI-Adam, AdamW |",
             "| --- | ---: | ---: | :---: | ---: | ---: | :---: |"]
    for e in payload["cells"]:
        if e["part"] == "transformer" or e.get("same_as") or e.get("floor"):
            continue
        cols = []
        for a, b in PAIRS:
            c = e["compare"].get(f"{a} vs {b}")
            if c is None:
                cols += ["", "", ""]
                continue
            cols += [fmt_ci(c["loss_ratio"], ".2f", ratio=True) + _mark(c["loss_ratio"]
                                                                       ["verdict"]),
                     fmt_ci(c["test_acc_diff"], ".2f") + _mark(c["test_acc_diff"]["verdict"]),
                     f"{c['reached'][0]}/{n}, {c['reached'][1]}/{n}"]
        lines.append(f"| {_cell_label(e)} | " + " | ".join(cols) + " |")
    for e in payload["cells"]:
        if e["part"] != "transformer":
            continue
        last = str(e["checkpoints"][-1])
        d = e["compare"]["psi-adam vs adamw"][last]
        lines.append(f"| {e['name']}, loss at step {last} (PSI-Adam − AdamW, "
                     f"{d['n']} seeds) | | | | {fmt_ci(d, '.4f')}{_mark(d['verdict'])} | | |")
    return "\n".join(lines)


def _cell_label(e: dict) -> str:
    if e["name"] == "lr x1":
        return "lr x1 (each method's default lr)"
    return e["name"]


def lr_table(payload: dict) -> str:
    w = payload["lr_width"]
    grid = [e for e in payload["cells"] if e["part"] == "lr"]
    n = payload["config"]["seeds"]
    lines = ["| method | " + " | ".join(e["name"] for e in grid)
             + " | width reaching the target | lowest mean loss at |",
             "| --- | " + " | ".join("---:" for _ in grid) + " | ---: | ---: |"]
    for m, v in w.items():
        cells_ = []
        for e in grid:
            s = e["methods"][m]["stats"]
            cells_.append(f"{s['loss']['mean']:.3f} ({s['reached']}/{n})")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells_) + f" | {_width(v)} | "
                     f"x{_fmt_mult(v['best_mult'])} |")
    return "\n".join(lines)


def _fmt_mult(m: float) -> str:
    return f"{m:g}" if m >= 1 else f"1/{1 / m:g}"


def _width(v: dict) -> str:
    if v["width"] is None:
        return "none"
    ge = "≥ " if (v["open_low"] or v["open_high"]) else ""
    return (f"{ge}{v['width']:g}x (x{_fmt_mult(v['range'][0])} to "
            f"x{_fmt_mult(v['range'][1])})")


def gpt_table(payload: dict) -> str:
    lines = ["| model | step | AdamW loss | PSI-Adam loss | PSI-Adam − AdamW |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for e in payload["cells"]:
        if e["part"] != "transformer":
            continue
        for s in e["checkpoints"]:
            d = e["compare"]["psi-adam vs adamw"][str(s)]
            lines.append(f"| {e['name']} ({d['n']} seeds) | {s} | "
                         f"{fmt_ci(e['methods']['adamw']['stats'][str(s)], '.4f', True)} | "
                         f"{fmt_ci(e['methods']['psi-adam']['stats'][str(s)], '.4f', True)} | "
                         f"{fmt_ci(d, '.4f')}{_mark(d['verdict'])} |")
    return "\n".join(lines)


PART_LABELS = {"lr": "learning rate (x the default)", "init": "init scale",
               "wd": "weight decay and schedule", "batch": "batch size (linear lr scaling)"}


def _settings(payload: dict, pair: str) -> list[dict]:
    """The digits cells of a comparison that are settings of their own (not repeats of the
    default cell, not the noise floor)."""
    return [e for e in payload["cells"] if pair in e["compare"] and e["part"] != "transformer"
            and not e.get("same_as") and not e.get("floor")]


def _short(name: str) -> str:
    return name.replace("lr ", "").replace("init ", "").replace("batch ", "")


def findings(payload: dict) -> list[str]:
    """Sentences generated from the results (every number and every direction comes from the
    JSON): per comparison and part, where PSI's final loss and test accuracy are resolvably
    better, worse or not different (paired 95% intervals)."""
    out = []
    n = payload["config"]["seeds"]
    cells_ = {e["name"]: e for e in payload["cells"]}
    for a, b in PAIRS:
        pair = f"{a} vs {b}"
        settings = _settings(payload, pair)
        if not settings:
            continue
        text = f"**{LABELS[a]} against {LABELS[b]}** ({len(settings)} settings x {n} seeds)."
        base = cells_.get("lr x1")
        if base and pair in base["compare"]:
            c = base["compare"][pair]
            text += (f" At the default lr: final loss x{fmt_ci(c['loss_ratio'], '.2f', True)}, "
                     f"test accuracy {fmt_ci(c['test_acc_diff'], '.2f')} points, steps to "
                     f"{payload['target']:g} {fmt_ci(c['steps_diff'], '.1f')} "
                     f"({_word(c['loss_ratio']['verdict'])} in loss, "
                     f"{_word(c['test_acc_diff']['verdict'])} in accuracy, "
                     f"{_word(c['steps_diff']['verdict'])} in steps).")
        for part, label in PART_LABELS.items():
            group = [e for e in settings if e["part"] == part]
            if not group:
                continue
            bits = []
            for key, what in (("loss_ratio", "loss"), ("test_acc_diff", "accuracy")):
                by = {v: [_short(e["name"]) for e in group
                          if e["compare"][pair][key]["verdict"] == v]
                      for v in ("better", "worse", "same")}
                sides = [f"{side} at {', '.join(by[side])}" for side in ("better", "worse")
                         if by[side]]
                bits.append(f"{what} " + (", ".join(sides) if sides
                                          else "no resolvable difference"))
            text += f" {label.capitalize()}: " + "; ".join(bits) + "."
        out.append(text)
    w = payload.get("lr_width", {})
    if w:
        out.append("**Learning-rate range** that gets every seed to a training loss of "
                   f"{payload['target']:g}: " + "; ".join(
                       f"{LABELS[m]} {_width(v)}" for m, v in w.items()) + ".")
    init = [e for e in payload["cells"] if e["part"] == "init" and not e.get("same_as")]
    if init:
        parts = []
        for e in init:
            parts.append(f"{e['name']}: " + ", ".join(
                f"{LABELS[m]} {fmt_ci(e['methods'][m]['stats']['max_loss_diff'], '.2g', True)}"
                for m in METHODS if m in e["methods"]))
        out.append("**Equivalent starts**: the largest per-step difference in training loss "
                   "from the same seed's scale-1 run (mean [95% interval] over seeds): "
                   + "; ".join(parts) + ".")
    for e in payload["cells"]:
        if e["part"] == "transformer":
            last = str(e["checkpoints"][-1])
            d = e["compare"]["psi-adam vs adamw"][last]
            word = {"better": "lower than", "worse": "higher than",
                    "same": "indistinguishable from"}.get(d["verdict"], "?")
            out.append(f"**{e['name']}**: PSI-Adam's loss at step {last} is {word} AdamW's "
                       f"({fmt_ci(d, '.4f')}, {d['n']} seeds; loss floor "
                       f"{e['methods']['adamw']['loss_floor']:.3f}).")
    return out


def _word(v: str) -> str:
    return {"better": "PSI better", "worse": "PSI worse", "same": "no resolvable difference"
            }.get(v, "too few seeds")


def readme_section(payload: dict) -> str:
    """The body of the README's "When PSI helps" block."""
    cfg = payload["config"]
    lines = [f"Measured by `python benchmarks/claims.py --only robustness` "
             f"(`benchmarks/psi_study.py`; {payload['machine']['cpu']}, "
             f"{payload['machine']['cores']} cores, 1 thread per run, {payload['jobs']} runs at a "
             f"time, {payload['runs']} runs in {payload['wall_seconds'] / 60:.0f} minutes, load "
             f"average {payload['machine']['load_average'][0]:.1f} at the end; "
             "`benchmarks/results/claims_robustness.json` and `.png`). Digits, SmallResNet with "
             f"BatchNorm, {cfg['epochs']} epochs, {cfg['seeds']} seeds per cell (the same seeds "
             "for every method: same initialization and data order), each method at its "
             "default setting (" + "; ".join(
                 f"{LABELS[m]} " + ", ".join(f"{k} {v:g}" for k, v in s.items() if v is not None)
                 for m, s in payload["settings"].items())
             + ") unless the row changes it. Ratios and differences are paired over seeds with "
             "95% t-intervals (final loss: geometric mean of the ratio; a diverged run counts "
             "as chance, ln 10); ✓ / ✗: the interval excludes no difference, in PSI's favour / "
             "against it; better / worse below mean the same. `reach`: seeds whose training loss (mean over one epoch of steps) "
             f"gets to {payload['target']:g}.", ""]
    lines += findings_block(payload)
    lines += ["", headline_table(payload), "",
              f"Final training loss per lr multiplier (mean over {cfg['seeds']} seeds; seeds "
              "reaching the target in brackets); PSI methods move lr and psi_lr together:", "",
              lr_table(payload), ""]
    if any(e["part"] == "transformer" for e in payload["cells"]):
        gpt = next(e for e in payload["cells"] if e["part"] == "transformer")
        ex = gpt.get("example_settings") or dict(qk_norm="full")
        qk = ("per-head QK-norm: block groups" if ex.get("qk_norm") == "head" else
              "QK-norm over the whole projection: tensor groups")
        lines += ["Transformer (`examples/train_large.py --optimizer adamw|psi-adam`, "
                  f"{ex.get('layers', 2)} layers, {ex.get('heads', 4)} heads, {qk}; lr "
                  f"{ex.get('lr', 3e-3):g}, psi_lr {ex.get('psi_lr', 3e-2):g}, weight decay "
                  f"{ex.get('weight_decay', 0.1):g} on matrices, the same synthetic bigram "
                  "batches for every seed; loss = mean of the last "
                  f"{GPT_WINDOW} step losses; mean [95% interval] over seeds):", "",
                  gpt_table(payload), ""]
    lines += ["![PSI study](benchmarks/results/claims_robustness.png)"]
    return "\n".join(lines)


def findings_block(payload: dict) -> list[str]:
    return [f"- {s}" for s in findings(payload)]


# ------------------------------------------------------------------------------------- plots

def plot_study(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    grid = [e for e in payload["cells"] if e["part"] == "lr"]
    for key, ax, label in (("loss", axes[0, 0], "final training loss"),
                           ("test_acc", axes[0, 1], "test accuracy (%)")):
        for m in METHODS:
            if not grid or m not in grid[0]["methods"]:
                continue
            x = [e["options"]["lr_mult"] for e in grid]
            s = [e["methods"][m]["stats"][key] for e in grid]
            ax.errorbar(x, [v["mean"] for v in s],
                        yerr=[[v["mean"] - (v["lo"] if v["lo"] is not None else v["mean"])
                               for v in s],
                              [(v["hi"] if v["hi"] is not None else v["mean"]) - v["mean"]
                               for v in s]],
                        marker="o", capsize=3, color=colors[m], label=LABELS[m])
        ax.set_xscale("log", base=2)
        if key == "loss":
            ax.set_yscale("log")
        ax.set_xlabel("lr / default lr")
        ax.set_ylabel(label)
        ax.set_title(f"learning rate ({label}), 95% CI")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _bars(axes[0, 2], [e for e in payload["cells"] if e["part"] == "init"], colors,
          "init scale: final training loss")
    _bars(axes[1, 0], [e for e in payload["cells"] if e["part"] == "wd"], colors,
          "SGD family: weight decay and schedule")
    _bars(axes[1, 1], [e for e in payload["cells"] if e["part"] == "batch"], colors,
          "batch size (linear lr scaling)")
    ax = axes[1, 2]
    for i, e in enumerate(e for e in payload["cells"] if e["part"] == "transformer"):
        for m, style in (("adamw", "-"), ("psi-adam", "--")):
            c = e["curves"][m]
            ax.plot(range(1, len(c) + 1), c, ls=style, color=f"C{i + 4}",
                    label=f"{e['name']}: {LABELS[m]}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {GPT_WINDOW} steps, over seeds)")
    ax.set_title("transformer: AdamW (solid) vs PSI-Adam (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"When does PSI help? digits, {payload['config']['seeds']} seeds per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax, entries: list[dict], colors: dict, title: str) -> None:
    if not entries:
        ax.set_visible(False)
        return
    methods = [m for m in METHODS if m in entries[0]["methods"]]
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs, ys, err = [], [], [[], []]
        for i, e in enumerate(entries):
            s = e["methods"][m]["stats"]["loss"]
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ys.append(s["mean"])
            err[0].append(s["mean"] - (s["lo"] if s["lo"] is not None else s["mean"]))
            err[1].append((s["hi"] if s["hi"] is not None else s["mean"]) - s["mean"])
        err[0] = [min(e, y * 0.999) for e, y in zip(err[0], ys)]  # log axis: stay above 0
        ax.bar(xs, ys, width, yerr=err, capsize=2, color=colors[m], label=LABELS[m])
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([e["name"].replace("init ", "").replace(", one weight", "\n")
                        for e in entries], fontsize=7, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("final training loss (mean, 95% CI)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("robustness study (benchmarks/psi_study.py)")
    g.add_argument("--full", action="store_true",
                   help="16 seeds, lr grid 256x, batches 8-512, transformer 8 seeds x 600 steps")
    g.add_argument("--study-seeds", type=int, default=None, help="seeds per cell (default 8)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per digits run (default 6)")
    g.add_argument("--lr-span", type=int, default=None,
                   help="lr grid: default lr x 2^k for |k| <= this (default 3)")
    g.add_argument("--parts", nargs="+", choices=PARTS, default=None)
    g.add_argument("--gpt-seeds", type=int, default=None)
    g.add_argument("--gpt-steps", type=int, default=None)
    g.add_argument("--gpt-dims", type=int, nargs="+", default=None)
    g.add_argument("--jobs", type=int, default=2,
                   help="runs at a time (processes, one thread each; default 2)")
    g.add_argument("--data-dir", default=None,
                   help="CIFAR-10 (python version) here: also run the study on it "
                        "(claims_robustness_cifar10.json; no transformer part)")
    g.add_argument("--device", default="cpu", help="device of the CIFAR-10 runs")
    g.add_argument("--out", type=Path, default=RESULTS)
    g.add_argument("--raw", type=Path, default=None,
                   help="also save every run (step losses included) in this JSON file")
    g.add_argument("--from-raw", type=Path, default=None,
                   help="summarize the runs of a --raw file instead of running them")


def config_from_args(args, **extra) -> Config:
    kw = {k: v for k, v in dict(seeds=getattr(args, "study_seeds", None), epochs=args.epochs,
                                lr_span=args.lr_span, gpt_seeds=args.gpt_seeds,
                                gpt_steps=args.gpt_steps,
                                gpt_dims=tuple(args.gpt_dims) if args.gpt_dims else None,
                                parts=tuple(args.parts) if args.parts else None).items()
          if v is not None}
    kw.update(extra)
    return Config.full(**kw) if args.full else Config(**kw)


def run_from_args(args) -> dict:
    cfg = config_from_args(args)
    payload = study(cfg, args.jobs, out_dir=args.out, raw=args.raw, from_raw=args.from_raw)
    if args.data_dir:
        parts = tuple(p for p in cfg.parts if p != "transformer")
        study(dataclasses.replace(cfg, dataset="cifar10", data_dir=args.data_dir,
                                  device=args.device, parts=parts),
              1 if args.device != "cpu" else args.jobs, name="claims_robustness_cifar10",
              out_dir=args.out)
    return payload


if __name__ == "__main__":
    main()
