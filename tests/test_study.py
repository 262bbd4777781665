"""Smoke tests of the "When does PSI help?" study (benchmarks/psi_study.py, claims.py --only
robustness): a tiny study on a slice of the digits data writes the cells it promises, with
intervals that hold their means; PSI-SGD's trajectories from conv weights scaled by 0.1 and 10
are the scale-1 trajectory (BatchNorm makes the nets the same and PSI-SGD's step is angular)
while SGD's are not; the transformer example's two optimizers see the same start and data."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import psi_study  # noqa: E402


def test_t_quantiles():
    assert psi_study.t975(7) == pytest.approx(2.365)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 7, 15, 30, 31, 40, 100, 1000):
        assert psi_study.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1.5e-3)


def test_intervals():
    s = psi_study.interval([1.0, 2.0, 3.0, None])
    assert s["n"] == 3 and s["mean"] == 2.0
    assert s["hi"] - s["mean"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    r = psi_study.ratio_interval([2.0, 4.0, 2.0], [1.0, 2.0, 1.0])
    assert r["mean"] == pytest.approx(2.0) and r["lo"] == pytest.approx(2.0)
    assert psi_study.verdict(r, 1.0) == "worse"  # a ratio above 1 with an interval above 1
    assert psi_study.verdict(dict(lo=-1, hi=1), 0.0) == "same"
    assert psi_study.interval([5.0])["lo"] is None


@pytest.fixture
def small_digits(monkeypatch):
    """The digits data cut to 256 training and 120 test images (runs of a few steps)."""
    from psi_cuda.apps.data import load_dataset

    x, y, tx, ty = load_dataset("digits", split_seed=0)
    monkeypatch.setitem(psi_study._DATA, ("digits", None), (x[:256], y[:256], tx[:120], ty[:120]))


def test_tiny_study(tmp_path, small_digits):
    cfg = psi_study.Config(seeds=2, epochs=2, lr_span=1, parts=("lr", "init", "wd", "batch"),
                           batches=(32, 64))
    payload = psi_study.study(cfg, 1, out_dir=tmp_path, plot=False)
    saved = json.loads((tmp_path / "claims_robustness.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(payload["cells"]))
    names = [c["name"] for c in saved["cells"]]
    assert names == ["lr x1/2", "lr x1", "lr x2", "init x0.1", "init x1", "init x10",
                     "init channels x U[1/4, 4]", "init x1, one weight +2 ulp",
                     "wd 0, cosine", "wd 0.0005, cosine", "wd 0, constant",
                     "wd 0.0005, constant", "batch 32", "batch 64"]
    cells = {c["name"]: c for c in saved["cells"]}
    # The cells that repeat the default setting are the same runs, marked so.
    for name in ("init x1", "wd 0.0005, cosine", "batch 64"):
        assert cells[name]["same_as"] == "lr x1"
        for m, v in cells[name]["methods"].items():
            assert ([{k: x for k, x in r.items() if k != "max_loss_diff"} for r in v["runs"]]
                    == cells["lr x1"]["methods"][m]["runs"])
    assert "same_as" not in cells["batch 32"]
    for c in saved["cells"]:
        assert set(c["methods"]) == ({"sgd", "psi-sgd"} if c["part"] == "wd"
                                     else set(psi_study.METHODS))
        for v in c["methods"].values():
            assert v["stats"]["n"] == 2 and len(v["runs"]) == 2
            loss = v["stats"]["loss"]
            assert loss["lo"] <= loss["mean"] <= loss["hi"]
        assert set(c["compare"]) == ({"psi-sgd vs sgd"} if c["part"] == "wd"
                                     else {"psi-sgd vs sgd", "psi-adam vs adamw"})
        for comp in c["compare"].values():
            for key in ("loss_ratio", "test_acc_diff"):
                s = comp[key]
                assert s["n"] == 2 and s["lo"] <= s["mean"] <= s["hi"]
                assert s["verdict"] in ("better", "worse", "same")
    # The lr grid moves both of PSI-SGD's learning rates.
    assert [c["options"]["lr_mult"] for c in saved["cells"][:3]] == [0.5, 1.0, 2.0]
    assert set(saved["lr_width"]) == set(psi_study.METHODS)
    # Equivalent starts: PSI-SGD's trajectory from conv weights x0.1 or x10 is the scale-1 one
    # (up to BatchNorm's eps); SGD's effective step changes by 1/scale^2 and its losses move.
    for name in ("init x0.1", "init x10"):
        psi = cells[name]["methods"]["psi-sgd"]["runs"]
        sgd = cells[name]["methods"]["sgd"]["runs"]
        assert max(r["max_loss_diff"] for r in psi) < 0.01, name
        assert min(r["max_loss_diff"] for r in sgd) > 0.05, name
    nudged = cells["init x1, one weight +2 ulp"]["methods"]["psi-sgd"]["runs"]
    assert max(r["max_loss_diff"] for r in nudged) < 1e-3
    text = psi_study.readme_section(saved)
    assert "| setting | PSI-SGD / SGD final loss" in text and "lr x1/2" in text
    assert "**PSI-SGD against SGD**" in text


def test_runs_do_not_depend_on_the_process(tmp_path, small_digits):
    job = psi_study.digits_job("psi-sgd", 3, psi_study.Config(epochs=1), init_scale=10.0)
    a = psi_study.run_job(job)
    b = psi_study.run_job(job)
    assert a["step_loss"] == b["step_loss"]


def test_transformer_cells(tmp_path):
    cfg = psi_study.Config(seeds=2, parts=("transformer",), gpt_seeds=2, gpt_steps=24,
                           gpt_dims=(16,))
    raw = tmp_path / "raw.json"
    payload = psi_study.study(cfg, 1, out_dir=tmp_path, plot=False, raw=raw)
    (cell,) = payload["cells"]
    assert cell["name"] == "transformer dim 16" and cell["checkpoints"] == [20, 24]
    runs = {tuple(r["job"]): r["result"] for r in json.loads(raw.read_text())["runs"]}
    for seed in (0, 1):
        a = runs[("gpt", "adamw", seed, 16, 24)]["step_loss"]
        p = runs[("gpt", "psi-adam", seed, 16, 24)]["step_loss"]
        assert len(a) == len(p) == 24
        assert a[0] == p[0]  # the same initialization and first batch, before any step
        assert a[-1] != p[-1]  # and different optimizers after
    d = cell["compare"]["psi-adam vs adamw"]["24"]
    assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
    assert "| transformer dim 16 (2 seeds) | 24 |" in psi_study.gpt_table(payload)


def test_readme_blocks_come_from_the_saved_results():
    import claims

    if not (claims.RESULTS / "claims_robustness.json").exists():
        pytest.skip("no saved study (python benchmarks/claims.py --only robustness)")
    block = claims.readme_block()
    assert "**(a) PSI-SGD vs SGD, PSI-Adam vs AdamW**" in block
    assert "| psi-sgd against sgd |" in block and "**(b) Equivalent starts**" in block
    section = psi_study.readme_section(json.loads(
        (claims.RESULTS / "claims_robustness.json").read_text()))
    assert "| setting | PSI-SGD / SGD final loss" in section
    # The README holds what the saved JSON gives (python benchmarks/claims.py --readme-only).
    readme = claims.README.read_text()
    assert block in readme and section in readme


def test_cifar10_cells(tmp_path):
    """--data-dir: the digits cells on CIFAR-10 (here a fake folder of 80 + 16 images)."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 6)] + [("test_batch", 16)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    cfg = psi_study.Config(seeds=2, epochs=1, parts=("init",), init_scales=(10.0,),
                           dataset="cifar10", data_dir=str(tmp_path))
    payload = psi_study.study(cfg, 1, name="claims_robustness_cifar10", out_dir=tmp_path,
                              plot=False)
    assert (tmp_path / "claims_robustness_cifar10.json").exists()
    assert payload["config"]["dataset"] == "cifar10"
    (x10,) = [c for c in payload["cells"] if c["name"] == "init x10"]
    assert x10["methods"]["sgd"]["stats"]["n"] == 2
    assert max(r["max_loss_diff"] for r in x10["methods"]["psi-sgd"]["runs"]) < 0.01
