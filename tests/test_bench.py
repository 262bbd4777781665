"""Smoke test of the step benchmark (psi_cuda/apps/bench.py): a tiny run produces the JSON, chart
and README table it promises. No timing assertions."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

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
                         "--scaling-steps", "1", "--copy-mib", "32", "--host-tensors", "3",
                         "--host-steps", "2", "--out", str(tmp_path), "--name", "step_cpu"])
    saved = json.loads((tmp_path / "step_cpu.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "step_cpu.png").stat().st_size > 0
    for key in ("machine", "device", "dtype", "steps", "copy_bandwidth_gbs", "models", "scaling",
                "host"):
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
    # the yardstick: the stream-limit loop ran beside the methods, each row has its fraction
    assert bench.STREAM_LIMIT in names
    for row in tiny["methods"].values():
        assert row["frac_stream_limit"] > 0
    assert f"psi_cuda PSISGD (fused) / {bench.STREAM_LIMIT}" in tiny["ratios"]
    pts = saved["scaling"]["points"]
    assert len(pts) == 2 and pts[0]["params"] >= 100_000 and pts[-1]["params"] >= 300_000
    assert _finite_numbers(saved)

    text = bench_report.table(saved, "benchmarks/results/step_cpu.json")
    assert "| psi_cuda PSISGD (fused) |" in text and "**Scaling**" in text
    assert list(saved["host"]["sizes"]) == ["3"]


def test_stream_limit_is_a_momentum_step_pattern():
    """psi_cuda_bench::stream_limit_ reads w, g, m and writes m = 0.9 m + g, w -= 1e-3 m
    (against torch on the same values; lengths across its chunks and vector tails); bad
    arguments raise ValueError naming them."""
    for n in (1, 7, 32768, 32768 * 3 + 5):
        w, g, m = (torch.randn(n) for _ in range(3))
        want_m = torch.addcmul(g, m, torch.tensor(0.9))
        want_w = w - 1e-3 * want_m
        torch.ops.psi_cuda_bench.stream_limit_(w, g, m)
        torch.testing.assert_close(m, want_m, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6)
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="g must be a contiguous float32"):
        torch.ops.psi_cuda_bench.stream_limit_(x, torch.zeros(8, dtype=torch.float64), x.clone())
    with pytest.raises(ValueError, match="m must have 8 elements"):
        torch.ops.psi_cuda_bench.stream_limit_(x, x.clone(), torch.zeros(9))
    with pytest.raises(ValueError, match="w must be a contiguous"):
        torch.ops.psi_cuda_bench.stream_limit_(torch.zeros(4, 4).t(), torch.zeros(16),
                                               torch.zeros(16))


def _check_host(host, sizes, steps):
    assert host["shape"] == [4, 9] and host["steps"] == steps and host["threads"] == 1
    assert list(host["sizes"]) == [str(n) for n in sizes]
    for n in sizes:
        r = host["sizes"][str(n)]
        assert r["tensors"] == n
        assert set(r["methods"]) == set(bench.HOST_METHODS)
        for row in r["methods"].values():
            assert row["steps"] == steps
            for key in ("median_us_per_tensor", "q1_us_per_tensor", "q3_us_per_tensor",
                        "median_ms_per_step"):
                assert math.isfinite(row[key]) and row[key] > 0
            assert row["q1_us_per_tensor"] <= row["median_us_per_tensor"] <= row["q3_us_per_tensor"]
            # the per-tensor figure is the step's median over the list size
            assert math.isclose(row["median_us_per_tensor"] * n, row["median_ms_per_step"] * 1e3)
        assert set(r["ratios"]) == {f"{a} / {b}" for a, b in bench.HOST_RATIOS}
        assert all(math.isfinite(v) and v > 0 for v in r["ratios"].values())


def test_host_only_writes_the_host_section(tmp_path, capsys):
    report = bench.main(["--host-only", "--host-tensors", "2", "5", "--host-steps", "3",
                         "--warmup", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "host_cpu.json").read_text())  # not step_cpu.json
    assert saved == json.loads(json.dumps(report))
    assert saved["models"] == {} and "scaling" not in saved and _finite_numbers(saved)
    assert not (tmp_path / "step_cpu.json").exists() and not list(tmp_path.glob("*.png"))
    _check_host(saved["host"], [2, 5], 3)
    out = capsys.readouterr().out
    assert "host time per tensor" in out and "PSISGD (channel)" in out


def test_host_steps_step_the_lists():
    """Every host-time method steps its list: the parameters move, and the PSI channel groups
    keep their row norms."""
    steps = bench.host_methods(3, "cpu", torch.float32)
    assert list(steps) == list(bench.HOST_METHODS)
    for name, step in steps.items():
        opt = step.__self__
        ps = [p for g in opt.param_groups for p in g["params"]]
        assert len(ps) == 3 and all(p.shape == (4, 9) and p.grad is not None for p in ps)
        before = [p.detach().clone() for p in ps]
        step()
        for p, b in zip(ps, before):
            assert not torch.equal(p, b), name
            if "channel" in name:
                torch.testing.assert_close(p.norm(dim=1), b.norm(dim=1))


def test_defaults_of_the_host_section():
    full, quick = bench.parse_args([]), bench.parse_args(["--quick"])
    assert full.host and full.host_tensors == [100, 1000, 10_000] and full.host_steps == 30
    assert full.host_threads == 1
    assert quick.host and quick.host_tensors == [100, 1000] and quick.host_steps == 10
    assert quick.models == ["resnet50", "vit_b16"] and not quick.scaling
    assert not bench.parse_args(["--no-host"]).host
    only = bench.parse_args(["--host-only"])
    assert only.host and only.models == [] and not only.scaling


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


def test_kernel_paths_quick_run_reports_every_list(tmp_path):
    """benchmarks/bench_kernel_paths.py (run by scripts/gpu_check.sh on a GPU): the smoke run on
    the CPU times every path and every statistics input, and each ratio is the ratio of the
    saved medians."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_kernel_paths as kp
    finally:
        sys.path.pop(0)
    report = kp.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--name", "kp"])
    saved = json.loads((tmp_path / "kp.json").read_text())
    assert set(saved["lists"]) == set(kp.LISTS) and set(saved["stats"]) == set(kp.STATS)
    for entry in saved["stats"].values():
        rows = entry["methods"]
        assert set(rows) == {"bnp_update_stats_", "torch BN stats"}
        for row in rows.values():
            assert len(row["times_s"]) == 5 and row["median_s"] > 0
            assert row["vs_torch"] == pytest.approx(
                row["median_s"] / rows["torch BN stats"]["median_s"])
    assert report["stats"].keys() == saved["stats"].keys()
