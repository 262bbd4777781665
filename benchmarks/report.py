"""Rewrites the benchmark tables of README.md from benchmarks/results/step_*.json without running
the benchmark (``psi-cuda bench --readme`` runs it first); the code is
psi_cuda/apps/bench_report.py.

    python benchmarks/report.py
"""
from pathlib import Path

from psi_cuda.apps.bench_report import main

if __name__ == "__main__":
    main(Path(__file__).resolve().parents[1])
