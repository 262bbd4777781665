"""Time one optimizer step on model-shaped parameter lists, all methods side by side in one run.

The program is psi_cuda/apps/bench.py (also ``psi-cuda bench`` / ``python -m psi_cuda bench``);
this file runs it from a source checkout:

    python benchmarks/bench_step.py --quick
    python benchmarks/bench_step.py                      # full CPU run, ~10 min
    python benchmarks/bench_step.py --device cuda        # GPU: bf16, large list 1B values
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psi_cuda.apps.bench import copy_bandwidth, machine, main, time_steps  # noqa: E402,F401

if __name__ == "__main__":
    main()
