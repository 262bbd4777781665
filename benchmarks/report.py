"""Writes the benchmark table of README.md from the saved JSON (never typed by hand).

    python benchmarks/report.py                 # reads benchmarks/results/step_*.json

The table replaces what stands between the markers `<!-- bench:start -->` and
`<!-- bench:end -->` in README.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(result: dict, source: str) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [f"Measured by `python benchmarks/bench_step.py` ({source}): {where}, torch "
             f"{m['torch']}, {result['dtype']}, median of {result['steps']} steps taken "
             f"round-robin; copy bandwidth measured in the same run: "
             f"{result['copy_bandwidth_gbs']:.1f} GB/s.", ""]
    for model, r in result["models"].items():
        meth = r["methods"]
        floor = meth.get("torch SGD (fused)", {}).get("median_ms")
        fused = meth.get("psi_cuda PSISGD (fused)", {}).get("median_ms")
        lines += [f"**{model}** ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M parameters, "
                  f"{r['bytes_per_step'] / 1e9:.2f} GB moved per momentum step):", "",
                  "| method | median ms | [q1, q3] ms | GB/s | vs torch fused SGD | vs fused PSISGD |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, x in meth.items():
            vs_floor = f"{x['median_ms'] / floor:.2f}x" if floor else "-"
            vs_fused = f"{x['median_ms'] / fused:.2f}x" if fused else "-"
            lines.append(f"| {name} | {x['median_ms']:.1f} | [{x['q1_ms']:.1f}, {x['q3_ms']:.1f}] "
                         f"| {x['gbs']:.1f} | {vs_floor} | {vs_fused} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parts = []
    for path in sorted((HERE / "results").glob("step_*.json")):
        parts.append(table(json.loads(path.read_text()), f"benchmarks/results/{path.name}"))
    if not parts:
        sys.exit("no benchmarks/results/step_*.json: run benchmarks/bench_step.py first")
    text = README.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + START + "\n" + "\n".join(parts) + END + tail)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
