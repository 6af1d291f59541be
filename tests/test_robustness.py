"""robustness.py: attacks at epsilon 0 leave the clean accuracy, PGD hurts more as epsilon grows,
the EP input gradient matches backpropagation on settled networks, CIFAR-10-C files are read in
their released layout, generated corruptions keep every image size, and bad input stops with
one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_datasets import write_fake_cifar10

import main_fast
import records
import robustness
import runs
import storage
from lca_utils_ep_fast import LCA_CNN
from utils_ep_fast import P_CNN, P_MLP

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_FLAGS = ["--model", "CNN", "--task", "DIGITS", "--channels", "8", "--kernels", "3",
               "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10",
               "--lrs", "0.1", "0.05", "--T1", "10", "--T2", "3", "--betas", "0.0", "0.5",
               "--thirdphase", "--loss", "cel", "--softmax", "--mbs", "32", "--epochs", "3",
               "--seed", "0", "--device", "cpu", "--save"]  # fmt: skip
EPSILONS = [0.0, 0.05, 0.1, 0.3]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A small RCNN trained with EP on the digits for 3 epochs, saved in its run folder."""
    results = tmp_path_factory.mktemp("robustness_runs")
    assert main_fast.main(TRAIN_FLAGS + ["--results-dir", str(results)]) == 0
    (run_dir,) = runs.find_runs(results)
    return run_dir


@pytest.fixture(scope="module")
def evaluated(digits_run) -> dict:
    """robustness.py run once on ``digits_run`` with every attack and two corruptions."""
    argv = ["--load-path", str(digits_run), "--device", "cpu", "--n-samples", "60",
            "--eps", *map(str, EPSILONS), "--eps-l2", "0", "2", "--steps", "5",
            "--queries", "5", "--corruptions", "gaussian_noise", "contrast",
            "--severities", "1", "5"]  # fmt: skip
    assert robustness.main(argv) == 0
    rows = storage.read_csv_rows(digits_run / robustness.ROBUSTNESS_CSV)
    return {"dir": digits_run, "rows": rows}


def clean_accuracy(rows: list[dict]) -> float:
    (clean,) = [row["accuracy"] for row in rows if row["attack"] == "clean"]
    return clean


def test_every_attack_at_epsilon_zero_leaves_the_clean_accuracy(evaluated):
    rows = evaluated["rows"]
    at_zero = [row for row in rows if row["norm"] in ("linf", "l2") and row["epsilon"] == 0]
    attacks = {(row["attack"], row["gradient"]) for row in at_zero}
    assert attacks == {
        (attack, gradient)
        for attack in robustness.ATTACKS[1:]
        for gradient in (("none",) if attack.startswith("square") else ("bptt", "ep"))
    }
    for row in at_zero:
        assert row["accuracy"] == clean_accuracy(rows), row


def test_pgd_accuracy_falls_as_epsilon_grows(evaluated):
    rows = evaluated["rows"]
    clean = clean_accuracy(rows)
    assert clean > 0.7
    for gradient in ("bptt", "ep"):
        curve = [
            row["accuracy"]
            for eps in EPSILONS
            for row in rows
            if (row["attack"], row["gradient"], row["epsilon"]) == ("pgd-linf", gradient, eps)
        ]
        assert len(curve) == len(EPSILONS)
        assert all(later <= earlier for earlier, later in zip(curve, curve[1:], strict=False))
        assert curve[-1] < 0.5 * clean, gradient


def test_output_files(evaluated):
    run_dir, rows = evaluated["dir"], evaluated["rows"]
    assert list(rows[0]) == list(robustness.CSV_COLUMNS)
    assert all(row["samples"] == 60 and row["seconds"] >= 0 for row in rows)
    corruptions = [row for row in rows if row["attack"] in ("gaussian_noise", "contrast")]
    assert sorted((row["attack"], row["severity"]) for row in corruptions) == [
        ("contrast", 1), ("contrast", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)
    ]  # fmt: skip
    (mean,) = [row["accuracy"] for row in rows if row["attack"] == "corruption_mean"]
    assert mean == pytest.approx(np.mean([row["accuracy"] for row in corruptions]))
    assert (run_dir / robustness.ROBUSTNESS_PNG).read_bytes().startswith(PNG_MAGIC)
    summary = (run_dir / runs.HYPERPARAMETERS_TXT).read_text()
    assert f"robustness model.pt (epoch {records.load_model_file(run_dir)[0]['epoch']}" in summary
    assert f"clean: {clean_accuracy(rows):.4f}" in summary


def test_masking_flag_names_white_box_attacks_weaker_than_square():
    def row(attack, gradient, accuracy):
        return {"attack": attack, "norm": "linf", "epsilon": 0.1, "gradient": gradient,
                "accuracy": accuracy}  # fmt: skip

    rows = [row("square-linf", "none", 0.4), row("pgd-linf", "bptt", 0.3),
            row("pgd-linf", "ep", 0.6)]  # fmt: skip
    (flag,) = robustness.masking_flags(rows)
    assert flag.startswith("pgd-linf (ep) at eps 0.1: 0.600 > square 0.400")


# ---- the EP input gradient against backpropagation ------------------------------------------


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: P_CNN(8, 1, [4, 8], [3, 3], [1, 1], [1, 1], "mm", [10], softmax=True, loss="cel"),
        lambda: P_CNN(8, 1, [4], [3], [1], [1], "a", [10], activation="mysig"),
        lambda: P_MLP([64, 32, 10], activation="mysig"),
    ],
    ids=["cnn-max-softmax", "cnn-avg-mse", "mlp-mse"],
)
def test_ep_input_gradient_matches_backpropagation(build):
    torch.manual_seed(0)
    model = build().double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    free = model(x, y, model.init_neurons(x), 300)
    estimate = model.input_gradient_ep(x, y, free, 100, 1e-3)
    x_tracked = x.clone().requires_grad_(True)
    final = model(x_tracked, y, model.init_neurons(x), 300, track_grad=True)
    (exact,) = torch.autograd.grad(model.loss(final, y).sum(), x_tracked)
    assert cosines(estimate, exact).min() >= 0.99
    assert estimate.norm() == pytest.approx(exact.norm().item(), rel=1e-2)


def test_ep_pixel_gradient_of_trained_cnn_and_lcacnn(digits_run):
    record, _ = records.load_model_file(digits_run)
    trained = records.restore_model(record).double().eval()
    torch.manual_seed(0)
    lca_model = LCA_CNN(8, 1, 4, 3, 1, 0.1, 5.0, 0.01, 10, [4, 8], [3], [1], [1], "im", [10],
                        softmax=True, loss="cel", scale_feedback=1.0).double()  # fmt: skip
    pixels = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(8) % 10
    for model in (trained, lca_model):
        net = robustness.PixelClassifier(model, "DIGITS", T1=300, T2=150, beta=1e-3, chunk=3)
        net = net.double()
        through_dynamics = net.input_gradient(pixels, labels, "bptt")
        by_ep = net.input_gradient(pixels, labels, "ep")
        assert through_dynamics.abs().sum() > 0
        assert cosines(by_ep, through_dynamics).min() >= 0.99, type(model).__name__


# ---- corruptions -----------------------------------------------------------------------------


def write_release(folder: Path, name: str, n_test: int, shape=(32, 32, 3)) -> np.ndarray:
    """A CIFAR-10-C-style file whose image ``i`` of severity ``s`` is filled with ``10 s + i``,
    and labels.npy (the same ``(i * 3) % 10`` in every block)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = np.concatenate([10 * s + np.arange(n_test) for s in range(1, 6)]).astype(np.uint8)
    images = np.broadcast_to(values[:, None, None, None], (5 * n_test, *shape)).copy()
    np.save(folder / f"{name}.npy", images)
    labels = np.tile((np.arange(n_test) * 3) % 10, 5).astype(np.int64)
    np.save(folder / "labels.npy", labels)
    return labels


def test_release_files_are_read_by_severity_block(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    write_release(folder, "fog", n_test=6)
    indices = torch.tensor([1, 4])
    read = robustness.read_release(folder, "fog", 6, (3, 32, 32), indices)
    assert sorted(read) == [1, 2, 3, 4, 5]
    for severity, (pixels, labels) in read.items():
        assert pixels.shape == (2, 3, 32, 32)
        for row, index in enumerate(indices.tolist()):
            assert torch.all(pixels[row] == (10 * severity + index) / 255.0)
        assert labels.tolist() == [3, 12 % 10]


def cifar_run(tmp_path: Path) -> Path:
    """A run folder holding an untrained CIFAR-10 RCNN's model.pt, reading ``tmp_path/data``."""
    run_dir = tmp_path / "run_1"
    run_dir.mkdir()
    kwargs = {"in_size": 32, "in_channels": 3, "channels": [4], "kernels": [5], "strides": [2],
              "paddings": [0], "pools": "m", "fc": [10]}  # fmt: skip
    config = {"model": "CNN", "kwargs": kwargs}
    args = {"task": "CIFAR10", "model": "CNN", "T1": 3, "T2": 2, "data_dir": str(tmp_path / "data")}
    model = records.build_model(config)
    storage.atomic_save(
        records.model_record(model, config, 1, 0.1, args), run_dir / records.BEST_MODEL
    )
    write_fake_cifar10(tmp_path / "data", n_test=6)
    return run_dir


def test_cli_reads_the_release_and_rejects_a_wrong_shape(tmp_path, capsys):
    run_dir = cifar_run(tmp_path)
    release = tmp_path / "data" / "CIFAR-10-C"
    labels = write_release(release, "fog", n_test=6)
    argv = ["--load-path", str(run_dir), "--device", "cpu", "--attacks", "corruptions",
            "--corruptions", "fog"]  # fmt: skip
    assert robustness.main(argv) == 0
    rows = storage.read_csv_rows(run_dir / robustness.ROBUSTNESS_CSV)
    assert [row["severity"] for row in rows if row["attack"] == "fog"] == [1, 2, 3, 4, 5]
    assert "read from" in capsys.readouterr().out
    # each block scored against its own labels: severity 1's images, checked by hand
    record, _ = records.load_model_file(run_dir)
    net = robustness.PixelClassifier(records.restore_model(record), "CIFAR10", 3, 2, 0.01, 4)
    block = torch.from_numpy(np.load(release / "fog.npy")[:6]).permute(0, 3, 1, 2) / 255.0
    expected = net.accuracy(block.float(), torch.from_numpy(labels[:6]), 6)
    (severity_1,) = [row for row in rows if row["attack"] == "fog" and row["severity"] == 1]
    assert severity_1["accuracy"] == pytest.approx(expected)

    np.save(release / "fog.npy", np.zeros((25, 32, 32, 3), dtype=np.uint8))
    before = (run_dir / robustness.ROBUSTNESS_CSV).read_bytes()
    assert robustness.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fog.npy holds uint8 (25, 32, 32, 3), expected uint8 (30, 32, 32, 3)" in err
    assert (run_dir / robustness.ROBUSTNESS_CSV).read_bytes() == before


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_generated_corruptions_keep_the_image_size(shape):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((2, *shape), dtype=np.float32)).permute(0, 3, 1, 2)
    for name in robustness.CORRUPTIONS:
        corrupted = robustness.generate_corruption(pixels, name, 5, seed=0)
        assert corrupted.shape == pixels.shape, name
        assert corrupted.min() >= 0 and corrupted.max() <= 1, name
        assert not torch.equal(corrupted, pixels), name


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attacks", "fgsm"], "--attacks: unknown 'fgsm'"),
        (["--eps", "0.1", "-0.1"], "--eps takes epsilons >= 0, got -0.1"),
        (["--eps-l2", "-1"], "--eps-l2 takes epsilons >= 0, got -1.0"),
        (["--corruptions", "rain"], "--corruptions: unknown 'rain'"),
        (["--severities", "6"], "--severities: unknown 6"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--beta", "0"], "--beta must be > 0"),
    ],
)
def test_bad_flags_stop_with_one_line(extra, message, tmp_path, capsys):
    assert robustness.main(["--load-path", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_missing_run_folder(tmp_path, capsys):
    assert robustness.main(["--load-path", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model file not found" in err
