"""Smoke test of the step benchmark (psi_cuda/apps/bench.py): a tiny run produces the JSON, chart
and README table it promises. No timing assertions."""
import json
import math

import pytest

from psi_cuda.apps import bench, bench_report, shapes


def _finite_numbers(x):
    if isinstance(x, dict):
        return all(_finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite_numbers(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_tiny_run_writes_json_chart_and_table(tmp_path):
    pytest.importorskip("matplotlib")
    report = bench.main(["--models", "tiny", "--steps", "2", "--warmup", "1", "--scaling",
                         "--large-values", "300000", "--scaling-start", "100000",
                         "--scaling-steps", "1", "--copy-mib", "32",
                         "--out", str(tmp_path), "--name", "step_cpu"])
    saved = json.loads((tmp_path / "step_cpu.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "step_cpu.png").stat().st_size > 0
    for key in ("machine", "device", "dtype", "steps", "copy_bandwidth_gbs", "models", "scaling"):
        assert key in saved
    assert {"cpu", "cores", "torch", "torch_threads"} <= set(saved["machine"])
    assert saved["copy_bandwidth_gbs"] > 0
    tiny = saved["models"]["tiny"]
    names = set(tiny["methods"])
    for name in ("psi_cuda PSISGD (fused)", "psi_cuda PSISGD (reference, foreach)",
                 "psi_cuda PSISGD (reference, for-loop)", "torch SGD (fused)",
                 "psi_cuda PSIAdam (fused)", "psi_cuda BNPSGD (fused op)"):
        assert name in names
    for row in tiny["methods"].values():
        assert row["median_ms"] > 0 and row["gbs"] > 0 and row["steps"] == 2
    assert "PSISGD fused / torch SGD fused" in tiny["ratios"]
    pts = saved["scaling"]["points"]
    assert len(pts) == 2 and pts[0]["params"] >= 100_000 and pts[-1]["params"] >= 300_000
    assert _finite_numbers(saved)

    text = bench_report.table(saved, "benchmarks/results/step_cpu.json")
    assert "| psi_cuda PSISGD (fused) |" in text and "**Scaling**" in text


def test_cli_has_bench(capsys):
    from psi_cuda.apps.cli import main
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_lists_are_model_sized():
    assert abs(shapes.numel(shapes.resnet50()) - 25.56e6) < 0.01e6
    assert abs(shapes.numel(shapes.vit_b16()) - 86.6e6) < 0.3e6
    big = shapes.large(500_000_000)
    assert 500e6 <= shapes.numel(big) < 501e6
