"""Writes the benchmark tables of README.md from the saved JSON (never typed by hand).

    python benchmarks/report.py                 # reads benchmarks/results/step_*.json
    psi-cuda bench --readme                     # runs the benchmark first (apps/bench.py)

The tables replace what stands between the markers `<!-- bench:start -->` and
`<!-- bench:end -->` in README.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# The targets on the ResNet-50 list (CPU) and for GPUs (100M+ parameter list).
CPU_TARGETS = (("PSISGD fused / torch SGD fused", "<=", 1.3),
               ("best PSISGD reference / PSISGD fused", ">=", 4.0))
CPU_COPY_FRACTION = 0.6
GPU_COPY_FRACTION, GPU_REFERENCE_RATIO = 0.8, 10.0


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _copy_line(model: str, fused: dict, target: float) -> str:
    """The target line of the fused step's fraction of the copy bandwidth."""
    ok = fused["frac_copy_bw"] >= target
    return (f"- {model}: fused PSISGD at {100 * fused['frac_copy_bw']:.0f}% of the copy "
            f"bandwidth (target >= {100 * target:.0f}%): {'met' if ok else 'NOT met'}")


def targets(result: dict) -> list[str]:
    gpu = "gpu" in result["machine"]
    lines = []
    if gpu:
        for model, r in result["models"].items():
            if r["params"] < 100e6:
                continue
            f = r["methods"].get("psi_cuda PSISGD (fused)")
            if f:
                lines.append(_copy_line(model, f, GPU_COPY_FRACTION))
            ref = r["ratios"].get("best PSISGD reference / PSISGD fused")
            if ref:
                ok = ref >= GPU_REFERENCE_RATIO
                lines.append(f"- {model}: best pure-torch reference / fused PSISGD = {ref:.1f}x "
                             f"(target >= {GPU_REFERENCE_RATIO:.0f}x): {'met' if ok else 'NOT met'}")
        return lines
    r = result["models"].get("resnet50")
    if not r:
        return lines
    for key, op, bound in CPU_TARGETS:
        v = r["ratios"].get(key)
        if v is None:
            continue
        ok = v <= bound if op == "<=" else v >= bound
        lines.append(f"- resnet50: {key} = {v:.2f}x (target {op} {bound:g}x): "
                     f"{'met' if ok else 'NOT met'}")
    f = r["methods"].get("psi_cuda PSISGD (fused)")
    if f:
        lines.append(_copy_line("resnet50", f, CPU_COPY_FRACTION))
    return lines


def table(result: dict, source: str, root: Path | None = None) -> str:
    """The README text of one result file (``source``: its path relative to the checkout
    ``root``, where the chart next to it is looked for)."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads"
    cmd = result.get("command", "psi-cuda bench")
    bw_end = result.get("copy_bandwidth_end_gbs")
    bw = (f"{result['copy_bandwidth_gbs']:.1f} GB/s" +
          (f" at the start, {bw_end:.1f} GB/s at the end" if bw_end else ""))
    lines = [f"Measured by `{cmd.strip()}` ({source}): {where}, torch {m['torch']}, "
             f"{result['dtype']}, median of {result['steps']} steps per method taken round-robin "
             f"after {result['warmup']} warm-up steps; copy bandwidth (`dst.copy_(src)`, read + "
             f"write) measured in the same run: {bw}; load average at the start "
             f"{result.get('load_average_start')}.", ""]
    tl = targets(result)
    if tl:
        lines += ["Targets:", ""] + tl + [""]
    for model, r in result["models"].items():
        meth = r["methods"]
        floor = meth.get("torch SGD (fused)", {}).get("median_ms")
        fused = meth.get("psi_cuda PSISGD (fused)", {}).get("median_ms")
        lines += [f"**{model}** ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M parameters, "
                  f"{r['bytes_per_step'] / 1e9:.2f} GB moved per momentum step; load average "
                  f"{r.get('load_average_before')}):", "",
                  "| method | median ms | [q1, q3] ms | GB/s | % of copy bw | vs torch fused SGD "
                  "| vs fused PSISGD |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, x in meth.items():
            vs_floor = f"{x['median_ms'] / floor:.2f}x" if floor else "-"
            vs_fused = f"{x['median_ms'] / fused:.2f}x" if fused else "-"
            lines.append(f"| {name} | {_ms(x['median_ms'])} | [{_ms(x['q1_ms'])}, "
                         f"{_ms(x['q3_ms'])}] | {x['gbs']:.1f} | {100 * x['frac_copy_bw']:.0f}% "
                         f"| {vs_floor} | {vs_fused} |")
        lines.append("")
    sc = result.get("scaling")
    if sc:
        names = list(dict.fromkeys(k for p in sc["points"] for k in p["methods"]))
        lines += [f"**Scaling** ({sc['lists']}; median ms per step, GB/s in brackets):", "",
                  "| parameters | " + " | ".join(n.replace("psi_cuda ", "") for n in names) + " |",
                  "| ---: | " + " | ".join("---:" for _ in names) + " |"]
        for p in sc["points"]:
            cells = []
            for n in names:
                x = p["methods"].get(n)
                cells.append(f"{_ms(x['median_ms'])} ({x['gbs']:.1f})" if x else "-")
            lines.append(f"| {p['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
        lines.append("")
    png = Path(source).with_suffix(".png")
    if root is not None and (root / png).exists():
        lines += [f"![step benchmark]({png.as_posix()})", ""]
    return "\n".join(lines)


def main(root: Path) -> None:
    """Rewrites the section of ``root``/README.md (a source checkout) from
    ``root``/benchmarks/results/step_*.json."""
    readme = root / "README.md"
    parts = []
    for path in sorted((root / "benchmarks" / "results").glob("step_*.json")):
        parts.append(table(json.loads(path.read_text()), f"benchmarks/results/{path.name}", root))
    if not parts:
        sys.exit("no benchmarks/results/step_*.json: run psi-cuda bench first")
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + "\n".join(parts) + END + tail)
    print(f"updated {readme}")
