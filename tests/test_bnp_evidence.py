"""Smoke test of benchmarks/bnp_evidence.py: a tiny --quick run writes its JSON/PNG files."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bnp_evidence.py"


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("bnp_evidence", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_results(evidence, tmp_path, capsys):
    # Smaller than --quick alone: 128 examples, 2 timing rounds, a 4-wide big net.
    out = evidence.main(["--quick", "--out", str(tmp_path), "--train-subset", "128",
                         "--reps", "3", "--big-reps", "2", "--big-width", "8",
                         "--big-batch", "4"])
    printed = capsys.readouterr().out
    assert "final train loss" in printed and "Hook overhead" in printed

    for name in ("bnp_training.json", "bnp_training.png", "bnp_overhead.json"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "bnp_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    training = json.loads((tmp_path / "bnp_training.json").read_text())
    assert set(training) >= {"config", "chosen_lr", "summary", "runs", "lr_sweep", "machine"}
    assert training["config"]["batch_sizes"] == [1, 4, 128]
    methods = {"sgd", "sgd+bn", "bnp-sgd"}
    assert set(training["chosen_lr"]) == methods
    seen = {(r["method"], r["batch_size"]) for r in training["runs"]}
    assert seen == {(m, b) for m in methods for b in (1, 4, 128)}
    for r in training["runs"]:
        assert set(r) >= {"method", "batch_size", "lr", "seed", "curve", "final_train_loss",
                          "test_acc", "wall_s"}
        assert not r["diverged"] and r["examples_seen"] == 128
        assert math.isfinite(r["final_train_loss"]) and 0 <= r["test_acc"] <= 1
        assert r["curve"] and all(math.isfinite(loss) for _, loss in r["curve"])
        assert r["curve"][-1][0] == 128
    assert training == out["training"]

    overhead = json.loads((tmp_path / "bnp_overhead.json").read_text())
    assert set(overhead) >= {"machine", "models", "target_pct", "threads"}
    assert set(overhead["machine"]) >= {"cpu", "cores", "torch", "torch_threads"}
    assert len(overhead["models"]) == 2
    for m in overhead["models"]:
        v = m["variants"]
        assert set(v) >= {"plain", "BNP hooks (fused)", "BNP hooks (reference)",
                          "no-op pre-hooks"}
        for row in v.values():
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert math.isfinite(v["BNP hooks (fused)"]["overhead_pct"])
