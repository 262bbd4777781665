"""The demo's data loader, training loop and command line (fast: tiny runs only)."""
import json

import pytest
import torch

from psi_cuda import __main__ as cli
from psi_cuda.data import load_digits, split_indices, train_test_split
from psi_cuda.train import DigitsResNet, make_optimizer, run


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


def test_psi_sgd_puts_every_conv_on_the_manifold():
    model = DigitsResNet()
    _, groups = make_optimizer("psi-sgd", model, 0.05, 0.1, 0.9)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert groups == {"channel": convs, "euclidean": sum(1 for _ in model.parameters()) - convs}


@pytest.mark.parametrize("name", ["sgd", "psi-sgd"])
def test_run_is_deterministic(name, small_data):
    a = run(name, epochs=1, batch_size=32, seed=3, data=small_data)
    b = run(name, epochs=1, batch_size=32, seed=3, data=small_data)
    assert a["step_loss"] == b["step_loss"] and len(a["step_loss"]) == 8
    assert a["epochs"][0]["test_acc"] == b["epochs"][0]["test_acc"]
    c = run(name, epochs=1, batch_size=32, seed=4, data=small_data)
    assert c["step_loss"] != a["step_loss"]


def test_run_restores_global_settings(small_data):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    run("sgd", epochs=1, batch_size=128, threads=1, data=small_data)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


@pytest.mark.parametrize("name", ["sgd", "psi-sgd"])
def test_short_run_decreases_training_loss(name, small_data):
    record = run(name, epochs=3, batch_size=32, data=small_data)
    losses = record["step_loss"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    train_losses = [e["train_loss"] for e in record["epochs"]]
    assert train_losses[-1] < train_losses[0]
    assert record["final"]["test_acc"] > 0.3  # chance is 0.1


def test_psi_sgd_keeps_conv_row_norms(small_data):
    """Norm preservation of the PSI groups, seen from the outside: weights are unchanged in
    norm after training (SGD with weight decay would change them)."""
    torch.manual_seed(0)
    model = DigitsResNet()
    norms = {n: p.detach().flatten(1).norm(dim=1) for n, p in model.named_parameters()
             if p.dim() == 4}
    opt, _ = make_optimizer("psi-sgd", model, 0.05, 0.1, 0.9)
    x, y = small_data[0][:64], small_data[1][:64]
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in norms:
            torch.testing.assert_close(p.detach().flatten(1).norm(dim=1), norms[n])


def test_interrupt_keeps_what_was_logged(small_data):
    def stop_after_first(entry):
        raise KeyboardInterrupt

    record = run("psi-sgd", epochs=3, batch_size=64, data=small_data, on_epoch=stop_after_first)
    assert record["interrupted"] and record["final"]["epochs_done"] == 1
    assert len(record["step_loss"]) == 4


def test_cli_train_writes_json(tmp_path, capsys):
    code = cli.main(["train", "--optimizer", "psi-sgd", "--epochs", "1", "--batch-size", "256",
                     "--seed", "1", "--psi-lr", "0.07", "--threads", "1", "--out",
                     str(tmp_path)])
    assert code == 0
    path = tmp_path / "psi-sgd-seed1.json"
    record = json.loads(path.read_text())
    assert set(record) >= {"settings", "environment", "step_loss", "epochs", "final",
                           "interrupted", "param_groups", "num_parameters"}
    assert record["settings"]["psi_lr"] == 0.07 and record["settings"]["batch_size"] == 256
    assert len(record["step_loss"]) == 6 and not record["interrupted"]
    assert set(record["epochs"][0]) >= {"epoch", "train_loss", "test_loss", "test_acc", "wall_s",
                                        "samples_per_s"}
    assert set(record["final"]) >= {"train_loss", "test_acc", "wall_s", "samples_per_s"}
    out = capsys.readouterr().out
    assert "epoch  1/1" in out and str(tmp_path) in out


def test_cli_train_zero_epochs_and_nan_losses_write_valid_json(tmp_path, monkeypatch):
    assert cli.main(["train", "--epochs", "0", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "psi-sgd-seed0.json").read_text())
    assert record["final"]["epochs_done"] == 0 and record["final"]["test_acc"] is None
    # A diverged run: NaN losses are written as null, not as the non-standard NaN.
    record["step_loss"] = [1.0, float("nan"), float("inf")]
    path = cli._write(record, tmp_path)
    assert json.loads(path.read_text(), parse_constant=pytest.fail)["step_loss"] == [1.0, None,
                                                                                      None]


def test_cli_demo_tiny(tmp_path, capsys):
    code = cli.main(["demo", "--epochs", "1", "--seeds", "1", "--threads", "1",
                     "--out", str(tmp_path)])
    assert code == 0
    assert {p.name for p in tmp_path.iterdir()} == {"sgd-seed0.json", "psi-sgd-seed0.json",
                                                    "summary.json"}
    out = capsys.readouterr().out
    assert "test acc" in out and "samples/s" in out
    table = json.loads((tmp_path / "summary.json").read_text())["table"]
    assert table.splitlines()[0].startswith("optimizer") and "psi-sgd" in table
    assert table in out


def test_cli_demo_interrupted_still_writes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second run: exit code 130, both records and the summary written."""
    printer = cli._epoch_printer

    def interrupting_printer(settings):
        show = printer(settings)
        if settings["optimizer"] != "psi-sgd":
            return show

        def interrupt(entry):
            show(entry)
            raise KeyboardInterrupt
        return interrupt

    monkeypatch.setattr(cli, "_epoch_printer", interrupting_printer)
    code = cli.main(["demo", "--epochs", "2", "--seeds", "2", "--threads", "1",
                     "--out", str(tmp_path)])
    assert code == 130
    sgd = json.loads((tmp_path / "sgd-seed0.json").read_text())
    psi = json.loads((tmp_path / "psi-sgd-seed0.json").read_text())
    assert not sgd["interrupted"] and sgd["final"]["epochs_done"] == 2
    assert psi["interrupted"] and psi["final"]["epochs_done"] == 1
    assert not (tmp_path / "sgd-seed1.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"]
    assert "Interrupted" in capsys.readouterr().out


def test_cli_defaults_to_demo(monkeypatch):
    seen = []

    def fake_demo(args):
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "demo", fake_demo)
    assert cli.main([]) == 0 and seen[-1].command == "demo"
    assert cli.main(["--epochs", "2"]) == 0 and seen[-1].epochs == 2


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "adam"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "-1"])
