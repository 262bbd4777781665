"""The training command: data loaders, models, runs, checkpoints, plots and the CLI (tiny runs)."""
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from psi_cuda.apps import cli
from psi_cuda.apps.data import load_cifar10, load_digits, split_indices, train_test_split
from psi_cuda.apps.models import SmallResNet, rescale_channels
from psi_cuda.apps.train import (OPTIMIZERS, TrainSettings, augment, make_optimizer, run,
                                 smoothed, time_to_target)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def small_data(digits):
    """A 256/128 subset of the split, so a run takes a fraction of a second."""
    train_x, train_y, test_x, test_y = train_test_split(*digits)
    return train_x[:256], train_y[:256], test_x[:128], test_y[:128]


def test_load_digits(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert ((images * 16).round() == images * 16).all()  # pixel counts 0..16, exactly
    assert labels.min() == 0 and labels.max() == 9
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 1797 and (counts >= 170).all()


def test_split_is_stratified_and_deterministic(digits):
    _, labels = digits
    train, test = split_indices(labels)
    assert train.numel() + test.numel() == 1797
    assert torch.cat([train, test]).sort().values.equal(torch.arange(1797))
    counts, test_counts = torch.bincount(labels), torch.bincount(labels[test], minlength=10)
    assert ((test_counts - 0.2 * counts).abs() <= 0.5).all()
    again = split_indices(labels)
    assert train.equal(again[0]) and test.equal(again[1])
    assert not test.equal(split_indices(labels, seed=1)[1])


def _fake_cifar(folder, per_batch=6, seed=0):
    """CIFAR-10's python format (pickled dicts of uint8 rows and labels) with random images."""
    rng = np.random.default_rng(seed)
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, labels)
    return batches


def test_load_cifar10_reads_the_python_format(tmp_path):
    batches = _fake_cifar(tmp_path)
    for folder in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train_x, train_y, test_x, test_y = load_cifar10(folder)
        assert train_x.shape == (30, 3, 32, 32) and test_x.shape == (6, 3, 32, 32)
        raw = torch.from_numpy(np.concatenate([batches[f"data_batch_{i}"][0]
                                               for i in range(1, 6)])).float()
        raw = raw.view(-1, 3, 32, 32)
        mean, std = raw.mean(dim=(0, 2, 3), keepdim=True), raw.std(dim=(0, 2, 3), keepdim=True)
        torch.testing.assert_close(train_x, (raw - mean) / std)
        # Row layout: 1024 red, then green, then blue values, each row-major 32x32.
        first = batches["test_batch"][0][0]
        expected = (torch.tensor(first[1024 + 5 * 32 + 7], dtype=torch.float32) - mean[0, 1, 0, 0])
        torch.testing.assert_close(test_x[0, 1, 5, 7], expected / std[0, 1, 0, 0])
        assert train_y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        assert test_y.tolist() == batches["test_batch"][1]


def test_load_cifar10_missing_folder_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*never downloads"):
        load_cifar10(tmp_path)


def test_augment_is_a_crop_and_flip_per_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = augment(x, torch.Generator().manual_seed(7), pad=2)
    gen = torch.Generator().manual_seed(7)  # the same draws, applied by hand
    offsets = torch.randint(0, 5, (2, 2), generator=gen)
    flip = torch.rand(2, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        oy, ox = offsets[0, i].item(), offsets[1, i].item()
        crop = padded[i, :, oy:oy + 5, ox:ox + 5]
        assert out[i].equal(crop.flip(2) if flip[i] else crop)


def test_bn_free_twin_and_bnp_groups():
    model = SmallResNet(norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    opt, groups = make_optimizer(model, TrainSettings("bnp-sgd", lr=0.01))
    assert groups == {"bnp": len(convs) + 1, "euclidean": sum(1 for _ in model.parameters())
                      - len(convs) - 1}


@pytest.mark.parametrize("name", ["psi-sgd", "psi-adam"])
def test_psi_optimizers_put_every_conv_on_the_manifold(name):
    model = SmallResNet()
    _, groups = make_optimizer(model, TrainSettings(name, lr=0.05, psi_lr=0.1))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert groups == {"channel": convs, "euclidean": sum(1 for _ in model.parameters()) - convs}


def test_rescale_channels_keeps_the_function(small_data):
    torch.manual_seed(0)
    model = SmallResNet()
    x = small_data[0][:32]
    before = model(x)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    factors = rescale_channels(model, 4.0, seed=3)
    assert len(factors) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    for name, p in model.named_parameters():
        if name in factors:
            c = factors[name]
            assert (c >= 0.25).all() and (c <= 4.0).all() and c.std() > 0.1
            torch.testing.assert_close(p.detach().flatten(1), old[name].flatten(1)
                                       * c.float()[:, None])
        else:
            assert p.equal(old[name])
    torch.testing.assert_close(model(x), before, atol=1e-3, rtol=1e-3)  # BN's eps: not exact


def test_smoothed_and_time_to_target():
    assert smoothed([4.0, 2.0, 0.0, 1.0], 2) == [4.0, 3.0, 1.0, 0.5]
    assert smoothed([1.0, None, 1.0], 2) == [1.0, float("inf"), float("inf")]
    record = {"settings": {"n_train": 4, "batch_size": 2}, "step_loss": [4.0, 2.0, 0.0, 1.0],
              "step_time": [0.1, 0.2, 0.3, 0.4]}
    assert time_to_target(record, 1.0) == {"step": 3, "seconds": 0.3}
    assert time_to_target(record, 0.5) == {"step": 4, "seconds": 0.4}
    assert time_to_target(record, 0.1) == {"step": None, "seconds": None}
    assert time_to_target(record, 3.5, window=1) == {"step": 2, "seconds": 0.2}


@pytest.mark.parametrize("name", ["sgd", "psi-sgd", "bnp-sgd"])
def test_run_is_deterministic(name, small_data):
    a = run(TrainSettings(name, epochs=1, batch_size=32, seed=3), data=small_data)
    b = run(TrainSettings(name, epochs=1, batch_size=32, seed=3), data=small_data)
    assert a["step_loss"] == b["step_loss"] and len(a["step_loss"]) == 8
    assert a["epochs"][0]["test_acc"] == b["epochs"][0]["test_acc"]
    c = run(TrainSettings(name, epochs=1, batch_size=32, seed=4), data=small_data)
    assert c["step_loss"] != a["step_loss"]


def test_run_restores_global_settings(small_data):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    run(TrainSettings("sgd", epochs=1, batch_size=128, threads=1), data=small_data)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_short_run_decreases_training_loss(name, small_data):
    options = {"sgd": dict(lr=0.1), "psi-sgd": dict(lr=0.1, psi_lr=0.1),
               "bnp-sgd": dict(lr=0.003), "psi-adam": dict(lr=0.01, psi_lr=0.1),
               "adamw": dict(lr=0.01)}[name]
    record = run(TrainSettings(name, epochs=3, batch_size=32, **options), data=small_data)
    losses = record["step_loss"]
    assert len(losses) == 24 and len(record["step_time"]) == 24
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert record["step_time"] == sorted(record["step_time"])
    train_losses = [e["train_loss"] for e in record["epochs"]]
    assert train_losses[-1] < train_losses[0]
    assert record["final"]["test_acc"] > 0.3  # chance is 0.1
    assert record["settings"]["norm"] == ("none" if name == "bnp-sgd" else "bn")


def test_psi_sgd_keeps_conv_row_norms(small_data):
    """Norm preservation of the PSI groups, seen from the outside: weights are unchanged in
    norm after training (SGD with weight decay would change them)."""
    torch.manual_seed(0)
    model = SmallResNet()
    norms = {n: p.detach().flatten(1).norm(dim=1) for n, p in model.named_parameters()
             if p.dim() == 4}
    opt, _ = make_optimizer(model, TrainSettings("psi-sgd", lr=0.05, psi_lr=0.1))
    x, y = small_data[0][:64], small_data[1][:64]
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in norms:
            torch.testing.assert_close(p.detach().flatten(1).norm(dim=1), norms[n])


def test_equivalent_start_psi_sgd_stays_sgd_moves(small_data):
    """Claim (b) in small: a per-channel rescaled start changes SGD's losses at once, PSI-SGD's
    only by BatchNorm's eps and rounding."""
    diff = {}
    for name, options in (("sgd", dict(lr=0.1)), ("psi-sgd", dict(lr=0.1, psi_lr=0.1))):
        a = run(TrainSettings(name, epochs=1, batch_size=32, **options), data=small_data)
        b = run(TrainSettings(name, epochs=1, batch_size=32, rescale=4.0, **options),
                data=small_data)
        diff[name] = max(abs(x - y) for x, y in zip(a["step_loss"], b["step_loss"]))
    assert diff["psi-sgd"] < 2e-3 and diff["sgd"] > 10 * diff["psi-sgd"]


def test_interrupt_keeps_what_was_logged(small_data):
    def stop_after_first(entry):
        raise KeyboardInterrupt

    record = run(TrainSettings("psi-sgd", epochs=3, batch_size=64), data=small_data,
                 on_epoch=stop_after_first)
    assert record["interrupted"] and record["final"]["epochs_done"] == 1
    assert len(record["step_loss"]) == 4


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_checkpoint_is_bit_for_bit(name, small_data, tmp_path):
    settings = TrainSettings(name, epochs=3, batch_size=64)
    full = run(settings, data=small_data, checkpoint=tmp_path / "a.pt")

    def stop_at_2(entry):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt

    part = run(settings, data=small_data, checkpoint=tmp_path / "b.pt", on_epoch=stop_at_2)
    assert part["interrupted"] and part["final"]["epochs_done"] == 2
    resumed = run(settings, data=small_data, checkpoint=tmp_path / "b.pt", resume=True)
    assert resumed["resumed_from_epoch"] == 2 and not resumed["interrupted"]
    assert resumed["step_loss"] == full["step_loss"]
    assert [e["test_acc"] for e in resumed["epochs"]] == [e["test_acc"] for e in full["epochs"]]
    a, b = (torch.load(tmp_path / f, weights_only=False) for f in ("a.pt", "b.pt"))
    for key in a["model"]:
        assert a["model"][key].equal(b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.equal(b["optimizer"]["state"][pid][key]), (pid, key)
    # A finished checkpoint resumes to the same record without training.
    again = run(settings, data=small_data, checkpoint=tmp_path / "b.pt", resume=True)
    assert again["step_loss"] == full["step_loss"] and again["resumed_from_epoch"] == 3


def test_resume_refuses_a_different_run(small_data, tmp_path):
    run(TrainSettings("sgd", epochs=1, batch_size=64), data=small_data,
        checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"different run: lr 0.4 there, 0.2 here"):
        run(TrainSettings("sgd", lr=0.2, epochs=1, batch_size=64), data=small_data,
            checkpoint=tmp_path / "c.pt", resume=True)


class _RunsCode:
    """Unpickling this runs ``touch``: what a checkpoint from elsewhere could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_loads_tensors_and_plain_data_only(small_data, tmp_path):
    """Checkpoints load with weights_only=True: one holding a pickled object is refused and its
    code does not run; the run's own checkpoints load (the resume test above)."""
    marker = tmp_path / "code-ran"
    torch.save({"settings": {}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run(TrainSettings("sgd", epochs=1, batch_size=64), data=small_data,
            checkpoint=tmp_path / "evil.pt", resume=True)
    assert not marker.exists()


def test_run_rejects_bad_settings(small_data):
    with pytest.raises(ValueError, match="psi-sgd needs norm='bn'"):
        run(TrainSettings("psi-sgd", norm="none"), data=small_data)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        run(TrainSettings("adam"), data=small_data)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run(TrainSettings("sgd", batch_size=0), data=small_data)
    with pytest.raises(ValueError, match="rescale needs norm='bn'"):
        run(TrainSettings("sgd", norm="none", rescale=2.0), data=small_data)


def test_progress_bar_shows_loss(small_data, capsys):
    run(TrainSettings("sgd", epochs=1, batch_size=32), data=small_data, progress=True)
    err = capsys.readouterr().err
    assert "sgd-seed0" in err and "loss=" in err


def test_plot_records_writes_a_png(small_data, tmp_path):
    from psi_cuda.apps.plots import plot_records

    records = [run(TrainSettings(n, epochs=2, batch_size=64, seed=s), data=small_data)
               for n in ("sgd", "psi-sgd") for s in (0, 1)]
    path = plot_records(records, tmp_path / "p.png", "title")
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1210, 825)  # 11 x 7.5 inches at 110 dpi


def test_cli_train_writes_json(tmp_path, capsys):
    code = cli.main(["train", "--optimizer", "psi-sgd", "--epochs", "1", "--batch-size", "256",
                     "--seed", "1", "--psi-lr", "0.07", "--threads", "1", "--out",
                     str(tmp_path)])
    assert code == 0
    path = tmp_path / "psi-sgd-seed1.json"
    record = json.loads(path.read_text())
    assert set(record) >= {"settings", "environment", "step_loss", "step_time", "epochs",
                           "final", "interrupted", "param_groups", "num_parameters"}
    assert record["settings"]["psi_lr"] == 0.07 and record["settings"]["batch_size"] == 256
    assert len(record["step_loss"]) == 6 and not record["interrupted"]
    assert set(record["epochs"][0]) >= {"epoch", "train_loss", "test_loss", "test_acc", "wall_s",
                                        "samples_per_s", "step", "train_time"}
    assert set(record["final"]) >= {"train_loss", "test_acc", "wall_s", "samples_per_s"}
    assert (tmp_path / "plots.png").exists() and (tmp_path / "checkpoints" /
                                                 "psi-sgd-seed1.pt").exists()
    out = capsys.readouterr().out
    assert "epoch  1/1" in out and str(tmp_path) in out and "plots.png" in out


def test_cli_train_compares_optimizers_and_seeds(tmp_path, capsys):
    code = cli.main(["train", "--optimizer", "sgd", "adamw", "--seeds", "2", "--epochs", "1",
                     "--batch-size", "512", "--out", str(tmp_path)])
    assert code == 0
    names = {p.name for p in tmp_path.glob("*.json")}
    assert names == {"sgd-seed0.json", "sgd-seed1.json", "adamw-seed0.json",
                     "adamw-seed1.json", "summary.json"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["table"].splitlines()
    assert rows[0].startswith("run") and len(rows) == 4
    assert rows[2].startswith("sgd ") and " 2 " in rows[2] and rows[3].startswith("adamw")
    assert summary["plots"] == str(tmp_path / "plots.png")


def test_cli_train_sgd_without_bn_is_its_own_run(tmp_path):
    assert cli.main(["train", "--optimizer", "sgd", "--norm", "none", "--epochs", "1",
                     "--batch-size", "512", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "sgd-none-seed0.json").read_text())
    assert record["settings"]["norm"] == "none"


def test_cli_train_cifar10_from_a_folder(tmp_path, capsys):
    _fake_cifar(tmp_path / "data", per_batch=8)
    code = cli.main(["train", "--optimizer", "sgd", "--data", "cifar10", "--data-dir",
                     str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16",
                     "--width", "4", "--out", str(tmp_path / "out")])
    assert code == 0
    record = json.loads((tmp_path / "out" / "sgd-seed0.json").read_text())
    s = record["settings"]
    assert s["dataset"] == "cifar10" and s["augment"] and s["n_train"] == 40
    assert len(record["step_loss"]) == 3
    assert "cifar10: 40 train / 8 test images" in capsys.readouterr().out


def test_cli_nan_losses_write_valid_json(tmp_path):
    assert cli.main(["train", "--optimizer", "sgd", "--epochs", "1", "--batch-size", "256",
                     "--out", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "sgd-seed0.json").read_text())
    assert record["final"]["epochs_done"] == 1
    # A diverged run: NaN losses are written as null, not as the non-standard NaN.
    record["step_loss"] = [1.0, float("nan"), float("inf")]
    path = cli._write(record, tmp_path)
    assert json.loads(path.read_text(), parse_constant=pytest.fail)["step_loss"] == [1.0, None,
                                                                                      None]


def test_cli_demo_tiny(tmp_path, capsys):
    code = cli.main(["demo", "--epochs", "1", "--seeds", "1", "--threads", "1",
                     "--out", str(tmp_path)])
    assert code == 0
    # Every optimizer on its own net, and SGD on the BN-free net too: BNP-SGD's baseline.
    assert {p.name for p in tmp_path.glob("*.json")} == {
        f"{n}-seed0.json" for n in OPTIMIZERS} | {"sgd-none-seed0.json", "summary.json"}
    out = capsys.readouterr().out
    assert "test acc" in out and "samples/s" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = summary["table"]
    assert table.splitlines()[0].startswith("run") and "psi-sgd" in table and "no BN" in table
    assert table in out
    rows = [line.split()[:3] for line in table.splitlines()[2:]]
    assert [r[0] for r in rows] == [o for o, _ in cli.DEMO_RUNS]
    assert [r for r in rows if r[1:] == ["no", "BN"]] == [["sgd", "no", "BN"],
                                                          ["bnp-sgd", "no", "BN"]]
    assert summary["nets"] in out and "no BN = " in summary["nets"]
    assert f"Plots: {tmp_path / 'plots.png'}" in out and (tmp_path / "plots.png").exists()


def _interrupting_printer(monkeypatch, victim):
    printer = cli._epoch_printer

    def interrupting_printer(settings):
        show = printer(settings)
        if settings.optimizer != victim:
            return show

        def interrupt(entry):
            show(entry)
            raise KeyboardInterrupt
        return interrupt

    monkeypatch.setattr(cli, "_epoch_printer", interrupting_printer)


def test_cli_interrupted_still_writes_and_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second run: exit code 130, both records and the summary written; the
    same command with --resume skips the finished run, continues the interrupted one from its
    checkpoint, and ends with the same losses as an uninterrupted command."""
    args = ["train", "--optimizer", "sgd", "psi-sgd", "--seeds", "2", "--epochs", "2",
            "--batch-size", "256"]
    with monkeypatch.context() as m:
        _interrupting_printer(m, "psi-sgd")
        assert cli.main(args + ["--out", str(tmp_path / "a")]) == 130
    sgd = json.loads((tmp_path / "a" / "sgd-seed0.json").read_text())
    psi = json.loads((tmp_path / "a" / "psi-sgd-seed0.json").read_text())
    assert not sgd["interrupted"] and sgd["final"]["epochs_done"] == 2
    assert psi["interrupted"] and psi["final"]["epochs_done"] == 1
    assert not (tmp_path / "a" / "sgd-seed1.json").exists()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["interrupted"]
    assert "Interrupted" in capsys.readouterr().out

    assert cli.main(args + ["--out", str(tmp_path / "a"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "sgd-seed0  finished before" in out and "psi-sgd-seed0  resumed after epoch 1" in out
    assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
    for name in ("sgd-seed0", "psi-sgd-seed0", "sgd-seed1", "psi-sgd-seed1"):
        a = json.loads((tmp_path / "a" / f"{name}.json").read_text())
        b = json.loads((tmp_path / "b" / f"{name}.json").read_text())
        assert a["step_loss"] == b["step_loss"], name
        assert not a["interrupted"]


def test_cli_defaults_to_demo(monkeypatch):
    seen = []

    def fake_demo(args):
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "demo", fake_demo)
    assert cli.main([]) == 0 and seen[-1].command == "demo"
    assert cli.main(["--epochs", "2"]) == 0 and seen[-1].epochs == 2


@pytest.mark.parametrize("argv", [
    ["train", "--optimizer", "adam"],
    ["train", "--epochs", "-1"],
    ["train", "--epochs", "0"],
    ["train", "--device", "not-a-device"],
    pytest.param(["train", "--device", "cuda"], marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is present")),
    ["train", "--optimizer", "psi-sgd", "--norm", "none"],
    ["train", "--data", "cifar10"],
    ["train", "--data", "cifar10", "--data-dir", "/nonexistent"],
    ["train", "--lr", "0"],
])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
