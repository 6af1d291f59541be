"""robustness.py: attacks at epsilon 0 leave the clean accuracy, PGD hurts more as epsilon grows,
the EP input gradient matches backpropagation on settled networks, CIFAR-10-C files are read in
their released layout, generated corruptions keep every image size, and bad input stops with
one line."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_datasets import write_fake_cifar10
from helpers import (
    DIGITS_CNN,
    ROOT,
    WAIT,
    first_line,
    one_error_line,
    printed_args,
    start,
    wait_for,
)

import data_utils
import main_fast
import robustness
from experiment import entry, records, runs, storage
from lca_utils_ep_fast import LCA_CNN
from learning import estimators
from robust_eval import attacks, autoattack, evaluation, measure
from robust_eval.config import DEFAULT_ATTACKS
from robust_eval.corruptions import CORRUPTIONS, generate_corruption, read_release
from robust_eval.evaluation import LOCK_FILE, ROBUSTNESS_CSV, ROBUSTNESS_PNG, ROBUSTNESS_TXT
from robust_eval.jobs import masking_flags
from robust_eval.measure import AUTOATTACK_FOLDER, sample_test_pixels
from robust_eval.pixel_classifier import PixelClassifier
from robust_eval.results import CSV_COLUMNS
from utils_ep_fast import P_CNN, P_MLP

# one worker builds the trained digits runs and their evaluations
pytestmark = pytest.mark.xdist_group("robustness")

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
    rows = storage.read_csv_rows(digits_run / ROBUSTNESS_CSV)
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
        for attack in DEFAULT_ATTACKS[1:]
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
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert all(row["samples"] == 60 and row["seconds"] >= 0 for row in rows)
    corruptions = [row for row in rows if row["attack"] in ("gaussian_noise", "contrast")]
    assert sorted((row["attack"], row["severity"]) for row in corruptions) == [
        ("contrast", 1), ("contrast", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)
    ]  # fmt: skip
    (mean,) = [row["accuracy"] for row in rows if row["attack"] == "corruption_mean"]
    assert mean == pytest.approx(np.mean([row["accuracy"] for row in corruptions]))
    assert (run_dir / ROBUSTNESS_PNG).read_bytes().startswith(PNG_MAGIC)
    summary = (run_dir / ROBUSTNESS_TXT).read_text()
    assert "robustness model.pt" not in (run_dir / runs.HYPERPARAMETERS_TXT).read_text()
    assert f"robustness model.pt (epoch {records.load_model_file(run_dir)[0]['epoch']}" in summary
    assert f"clean: {clean_accuracy(rows):.4f}" in summary


def test_masking_flag_names_white_box_attacks_weaker_than_square():
    def row(attack, gradient, accuracy):
        return {"attack": attack, "norm": "linf", "epsilon": 0.1, "gradient": gradient,
                "accuracy": accuracy}  # fmt: skip

    rows = [row("square-linf", "none", 0.4), row("pgd-linf", "bptt", 0.3),
            row("pgd-linf", "ep", 0.6)]  # fmt: skip
    (flag,) = masking_flags(rows)
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
    estimate = estimators.input_gradient(model, x, y, free, 100, 1e-3)
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
        net = PixelClassifier(model, "DIGITS", T1=300, T2=150, beta=1e-3, chunk=3)
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
    read = read_release(folder, "fog", 6, (3, 32, 32), indices)
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
    argv = ["--model", "CNN", "--task", "CIFAR10", "--channels", "4", "--kernels", "5",
            "--strides", "2", "--paddings", "0", "--pools", "m", "--fc", "10", "--lrs", "0.1",
            "0.1", "--T1", "3", "--T2", "2", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    settings = main_fast.check_args(vars(main_fast.parse_args(argv)[0]))
    model = records.build_model(settings.network_config())
    storage.atomic_save(
        records.model_record(model, 1, 0.1, settings.plain()), run_dir / records.BEST_MODEL
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
    rows = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
    assert [row["severity"] for row in rows if row["attack"] == "fog"] == [1, 2, 3, 4, 5]
    assert "read from" in capsys.readouterr().out
    # each block scored against its own labels: severity 1's images, checked by hand
    record, _ = records.load_model_file(run_dir)
    net = PixelClassifier(records.restore_model(record), "CIFAR10", 3, 2, 0.01, 4)
    block = torch.from_numpy(np.load(release / "fog.npy")[:6]).permute(0, 3, 1, 2) / 255.0
    expected = net.accuracy(block.float(), torch.from_numpy(labels[:6]), 6)
    (severity_1,) = [row for row in rows if row["attack"] == "fog" and row["severity"] == 1]
    assert severity_1["accuracy"] == pytest.approx(expected)

    np.save(release / "fog.npy", np.zeros((25, 32, 32, 3), dtype=np.uint8))
    before = (run_dir / ROBUSTNESS_CSV).read_bytes()
    assert robustness.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fog.npy holds uint8 (25, 32, 32, 3), expected uint8 (30, 32, 32, 3)" in err
    assert (run_dir / ROBUSTNESS_CSV).read_bytes() == before


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_generated_corruptions_keep_the_image_size(shape):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((2, *shape), dtype=np.float32)).permute(0, 3, 1, 2)
    for name in CORRUPTIONS:
        corrupted = generate_corruption(pixels, name, 5, seed=0)
        assert corrupted.shape == pixels.shape, name
        assert corrupted.min() >= 0 and corrupted.max() <= 1, name
        assert not torch.equal(corrupted, pixels), name


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attacks", "fgsm"], "--attacks: unknown 'fgsm'"),
        (["--eps", "0.1", "-0.1"], "--eps takes finite epsilons >= 0, got -0.1"),
        (["--eps-l2", "-1"], "--eps-l2 takes finite epsilons >= 0, got -1.0"),
        (["--eps-l2", "inf"], "--eps-l2 takes finite epsilons >= 0, got inf"),
        (["--eps-l2", "0.5", "nan"], "--eps-l2 takes finite epsilons >= 0, got nan"),
        (["--eps", "nan"], "--eps takes finite epsilons >= 0, got nan"),
        (["--eps", "inf"], "--eps takes finite epsilons >= 0, got inf"),
        (["--T1", "5", "5"], "--T1 lists a value twice"),
        (["--restarts", "0"], "--restarts must be at least 1"),
        (["--corruptions", "rain"], "--corruptions: unknown 'rain'"),
        (["--severities", "6"], "--severities: unknown 6"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--beta", "0"], "--beta must be > 0"),
    ],
)
def test_bad_flags_stop_with_one_line(extra, message, lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    before = sorted(run_dir.iterdir())
    assert robustness.main(["--load-path", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(run_dir.iterdir()) == before  # nothing written


def test_missing_run_folder(tmp_path, capsys):
    assert robustness.main(["--load-path", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model file not found" in err


# ---- the lifecycle: resume, reuse, locks, exit statuses --------------------------------------

LIFECYCLE_FLAGS = ["--device", "cpu", "--n-samples", "12", "--attacks", "corruptions",
                   "pgd-linf", "square-linf", "--gradients", "bptt", "ep", "--eps", "0", "0.2",
                   "--steps", "2", "--queries", "2", "--corruptions", "gaussian_noise",
                   "--severities", "1", "3"]  # fmt: skip
# clean, 2 corruptions and their mean, pgd at 2 epsilons x 2 gradients, square at 2 epsilons
LIFECYCLE_ROWS = 1 + 2 + 1 + 4 + 2
PGD_ROWS = 4


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory) -> Path:
    """The tiny digits CNN of the helpers, trained one epoch (one batch) at T1 3."""
    results = tmp_path_factory.mktemp("lifecycle_runs")
    argv = [
        *DIGITS_CNN,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--save",
        "--results-dir",
        str(results),
    ]
    assert main_fast.main(argv) == 0
    (run_dir,) = runs.find_runs(results)
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy of the training run's files (none of an evaluation's)."""
    ignore = shutil.ignore_patterns("robustness.*", ".robustness.lock", "autoattack")
    return Path(shutil.copytree(run_dir, tmp_path / name, ignore=ignore))


def evaluate(run_dir: Path, capsys, *extra: str, status: int = 0) -> tuple[str, str]:
    """robustness.py on ``run_dir`` with the lifecycle flags; its (stdout, stderr)."""
    assert robustness.main(["--load-path", str(run_dir), *LIFECYCLE_FLAGS, *extra]) == status
    captured = capsys.readouterr()
    return captured.out, captured.err


def without_seconds(run_dir: Path) -> list[dict]:
    rows = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def reused_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("reused ")]
    return line


def test_resumed_evaluation_equals_the_uninterrupted_one(lifecycle_run, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    whole, stopped = copy_run(lifecycle_run, tmp_path, "whole"), copy_run(lifecycle_run, tmp_path)
    real = entry.raise_if_stopped
    calls = {"n": 0, "stop_at": None}

    def counting_safe_point() -> None:  # SIGTERM recorded at the chosen safe point
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            entry.request_stop(signal.SIGTERM)
        real()

    monkeypatch.setattr(entry, "raise_if_stopped", counting_safe_point)
    evaluate(whole, capsys)
    calls.update(n=0, stop_at=calls["n"] // 2)  # in the middle: inside an attack's dynamics
    _, err = evaluate(stopped, capsys, status=143)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-2].startswith("terminated (SIGTERM); robustness.csv keeps the rows measured")
    command = printed_args(lines[-1], "robustness.py")
    kept = len(storage.read_csv_rows(stopped / ROBUSTNESS_CSV))
    assert 0 < kept < LIFECYCLE_ROWS
    assert robustness.main(command) == 0  # the printed command continues it
    assert reused_line(capsys.readouterr().out).startswith(f"reused {kept} rows")
    assert without_seconds(stopped) == without_seconds(whole)


def test_a_repeated_evaluation_reuses_every_row(lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    evaluate(run_dir, capsys)
    written = (run_dir / ROBUSTNESS_CSV).read_bytes()
    out, _ = evaluate(run_dir, capsys)
    assert reused_line(out) == f"reused {LIFECYCLE_ROWS} rows of robustness.csv; 0 to compute"
    assert (run_dir / ROBUSTNESS_CSV).read_bytes() == written


@pytest.mark.slow
def test_a_changed_setting_recomputes_the_rows_it_changes(lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    evaluate(run_dir, capsys)
    out, _ = evaluate(run_dir, capsys, "--steps", "3")  # PGD's rows only
    assert reused_line(out) == (
        f"reused {LIFECYCLE_ROWS - PGD_ROWS} rows of robustness.csv; {PGD_ROWS} to compute"
    )
    out, _ = evaluate(run_dir, capsys, "--beta", "0.02")  # the EP gradient's rows only
    assert reused_line(out).endswith(f"; {PGD_ROWS // 2} to compute")
    out, _ = evaluate(run_dir, capsys, "--seed", "1")  # another sample set: everything
    assert reused_line(out).startswith("reused 0 rows")
    rows = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
    assert len(rows) == 2 * LIFECYCLE_ROWS + PGD_ROWS + PGD_ROWS // 2

    # the model rewritten (training went on): its rows are recomputed
    record, model_path = records.load_model_file(run_dir)
    record["model_state"] = {k: v + 1e-3 for k, v in record["model_state"].items()}
    storage.atomic_save(record, model_path)
    out, _ = evaluate(run_dir, capsys)
    assert reused_line(out).startswith("reused 0 rows")


def test_fresh_recomputes_every_row_in_place(lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    evaluate(run_dir, capsys)
    before = without_seconds(run_dir)
    seconds = [r["seconds"] for r in storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)]
    out, _ = evaluate(run_dir, capsys, "--fresh")
    assert reused_line(out) == f"reused 0 rows of robustness.csv; {LIFECYCLE_ROWS} to compute"
    assert without_seconds(run_dir) == before  # recomputed: the same results, the same rows
    again = [r["seconds"] for r in storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)]
    assert again != seconds


def test_an_older_eight_column_csv_is_read_and_kept(lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    old = "attack,norm,epsilon,severity,gradient,accuracy,samples,seconds\n"
    old += "clean,none,0.0,0,none,0.25,12,0.5\npgd-linf,linf,0.2,0,bptt,0.125,12,1.5\n"
    (run_dir / ROBUSTNESS_CSV).write_text(old)
    out, _ = evaluate(run_dir, capsys)
    assert reused_line(out).startswith("reused 0 rows")  # no settings recorded: no match
    rows = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
    assert len(rows) == 2 + LIFECYCLE_ROWS
    assert (rows[1]["attack"], rows[1]["accuracy"], rows[1]["seconds"]) == ("pgd-linf", 0.125, 1.5)
    assert np.isnan(rows[1]["T1"]) and list(rows[0]) == list(CSV_COLUMNS)


def test_an_unwritable_run_folder_exits_74_before_any_attack(lifecycle_run, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    folder = tmp_path / "mounted"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs to make read-only")
    try:
        run_dir = copy_run(lifecycle_run, folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        monkeypatch.setattr(measure, "attack_images", lambda *a: pytest.fail("attacked"))
        monkeypatch.setattr(evaluation, "sample_test_pixels", lambda *a: pytest.fail("read"))
        _, err = evaluate(run_dir, capsys, status=74)
        (line,) = err.strip().splitlines()
        assert line.startswith(f"error: cannot write or read a file ({run_dir}")
        assert "Read-only file system" in line and "pass a writable --load-path" in line
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_two_evaluations_of_one_run_cannot_interleave(lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    with storage.FolderLock(run_dir, LOCK_FILE, clean_temp_files=False):
        _, err = evaluate(run_dir, capsys, status=75)
    assert f"{run_dir} is being written by process {os.getpid()}" in err
    assert not (run_dir / ROBUSTNESS_CSV).exists()


def test_an_evaluation_leaves_a_live_training_runs_files_alone(lifecycle_run, tmp_path, capsys):
    run_dir = copy_run(lifecycle_run, tmp_path)
    half_written = run_dir / f".checkpoint.pt.abc123.{os.getpid()}@{socket.gethostname()}.tmp"
    training_files = {name: (run_dir / name).read_bytes()
                      for name in ("hyperparameters.txt", "results.csv", "model.pt")}  # fmt: skip
    with storage.FolderLock(run_dir):  # a training run holds its folder
        half_written.write_bytes(b"half a checkpoint")
        lock_line = (run_dir / storage.LOCK_FILE).read_text()
        evaluate(run_dir, capsys)
        assert (run_dir / storage.LOCK_FILE).read_text() == lock_line
        assert half_written.read_bytes() == b"half a checkpoint"
    for name, content in training_files.items():
        assert (run_dir / name).read_bytes() == content, name
    assert (run_dir / ROBUSTNESS_TXT).read_text().startswith("robustness model.pt")


# An evaluation's write of robustness.csv, held open until the parent says "go" on stdin.
WRITE_ON_GO = """
import sys
from pathlib import Path
from experiment import storage
from robust_eval.evaluation import LOCK_FILE, ROBUSTNESS_CSV
folder = Path(sys.argv[1])
def write(f):
    f.write(b"attack,accuracy\\nclean,0.5\\n")
    f.flush()
    print("writing", flush=True)  # its temp file is there
    assert sys.stdin.readline() == "go\\n"
with storage.FolderLock(folder, LOCK_FILE):
    storage.atomic_write(folder / ROBUSTNESS_CSV, write)
"""


def test_a_training_requeue_leaves_a_running_evaluations_temp_file_alone(
    lifecycle_run, tmp_path, capsys
):
    run_dir = copy_run(lifecycle_run, tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", WRITE_ON_GO, str(run_dir)], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first_line(child) == "writing\n"
        (temp,) = run_dir.glob(f".{ROBUSTNESS_CSV}.*.tmp")
        assert main_fast.main(["--save", "--load-path", str(run_dir)]) == 0  # a no-op requeue
        out = capsys.readouterr().out
        assert "the run is complete" in out and "removed" not in out
        assert temp.is_file()
        _, err = child.communicate("go\n", timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert (run_dir / ROBUSTNESS_CSV).read_text() == "attack,accuracy\nclean,0.5\n"
    assert not list(run_dir.glob(".*.tmp"))


def test_a_robustness_csv_that_is_not_text_is_refused_before_anything(
    lifecycle_run, tmp_path, capsys
):
    run_dir = copy_run(lifecycle_run, tmp_path)
    damaged = b"attack,norm\n\xff\xfe,linf\n"
    (run_dir / ROBUSTNESS_CSV).write_bytes(damaged)
    _, err = evaluate(run_dir, capsys, status=2)
    line = one_error_line(err)
    assert line.startswith(f"error: cannot read {run_dir / ROBUSTNESS_CSV}: it is not a CSV text")
    assert line.endswith("move it aside (its rows are measured again) or restore it from a copy")
    assert (run_dir / ROBUSTNESS_CSV).read_bytes() == damaged
    assert not (run_dir / ROBUSTNESS_TXT).exists() and not (run_dir / LOCK_FILE).exists()


SMALL_AA = ["--device", "cpu", "--n-samples", "12", "--gradients", "bptt", "--eps", "0.1",
            "--eps-l2", "0", "--aa-iterations", "2", "--aa-queries", "5",
            "--aa-targets", "1"]  # fmt: skip


def test_a_zero_byte_autoattack_component_is_refused_before_any_row(
    lifecycle_run, tmp_path, capsys
):
    run_dir = copy_run(lifecycle_run, tmp_path)
    assert robustness.main(["--load-path", str(run_dir), *SMALL_AA, "--attacks", "autoattack"]) == 0
    (table,) = (run_dir / AUTOATTACK_FOLDER).glob("*_linf_*.csv")
    (damaged,) = (run_dir / AUTOATTACK_FOLDER).glob(f"{table.name.split('_')[0]}_square.pt")
    damaged.write_bytes(b"")
    before = (run_dir / ROBUSTNESS_CSV).read_bytes()
    capsys.readouterr()
    more = ["--load-path", str(run_dir), *SMALL_AA, "--attacks", "pgd-linf", "autoattack"]
    assert robustness.main(more) == 2  # a new PGD row comes first in the plan
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot read {damaged}: it is corrupt or not a saved AutoAttack")
    assert line.endswith("delete it (that component is run again) or pass --fresh")
    assert (run_dir / ROBUSTNESS_CSV).read_bytes() == before
    assert robustness.main([*more, "--fresh"]) == 0  # the fix it names
    assert damaged.stat().st_size > 0


@pytest.mark.slow
def test_autoattack_l2_follows_the_seed_whatever_pythons_generator_held(
    digits_run, tmp_path, capsys
):
    """ART's L2 Square draws from Python's generator: three evaluations on fresh copies, each
    after another Python seed, give the same rows and the same per-image results (which
    images each component fooled, and its adversarial images), component by component."""
    flags = ["--device", "cpu", "--n-samples", "40", "--attacks", "autoattack", "--gradients",
             "bptt", "--eps", "0", "--eps-l2", "1.0", "--aa-iterations", "2", "--aa-queries",
             "20", "--aa-targets", "1"]  # fmt: skip
    evaluations = []
    for trial in range(3):
        run_dir = copy_run(digits_run, tmp_path, f"copy_{trial}")
        random.seed(trial)
        assert robustness.main(["--load-path", str(run_dir), *flags]) == 0
        components = {
            path.name: storage.safe_load(path, "component")
            for path in sorted((run_dir / AUTOATTACK_FOLDER).glob("*.pt"))
        }
        evaluations.append((without_seconds(run_dir), components))
    rows, components = evaluations[0]
    (square,) = [r for r in rows if r["attack"] == "autoattack/square" and r["norm"] == "l2"]
    assert 0 < square["accuracy"] < clean_accuracy(rows)  # it fooled some images, not all
    assert len(rows) == 1 + 2 * (len(autoattack.available_components()) + 1)
    assert len(components) == 2 * len(autoattack.available_components())
    for other_rows, other_components in evaluations[1:]:
        for row, again in zip(rows, other_rows, strict=True):
            assert row == again
        assert other_components.keys() == components.keys()
        for name, saved in components.items():
            for tensor in ("robust", "adversarial"):
                assert torch.equal(other_components[name][tensor], saved[tensor]), name


# ---- input gradients of an attack's own cost -------------------------------------------------


@pytest.mark.parametrize("kind", ["ce", "dlr", "dlr-targeted"])
@pytest.mark.parametrize(
    "build",
    [
        lambda: P_CNN(8, 1, [4, 8], [3, 3], [1, 1], [1, 1], "mm", [10], softmax=True, loss="cel"),
        lambda: P_CNN(8, 1, [4], [3], [1], [1], "a", [10], activation="mysig"),
    ],
    ids=["cnn-softmax", "cnn-mse"],
)
def test_ep_gradient_of_an_attack_cost_follows_that_cost(build, kind):
    """EP nudged by the cost's own ``-dA/ds_L`` estimates ``dA/dp``: autograd of that cost
    through the settled dynamics, not the gradient of the model's loss. (DLR's small
    denominators curve it sharply: a small beta keeps the finite difference accurate.)"""
    torch.manual_seed(0)
    model = build().double()
    net = PixelClassifier(model, "DIGITS", T1=300, T2=150, beta=1e-5, chunk=4)
    net = net.double()
    pixels = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(6) % 10
    targets = (labels + 3) % 10 if kind == "dlr-targeted" else None
    cost = attacks.LogitCost(kind, labels, targets)
    by_ep = net.ep_gradient(pixels, cost)
    tracked = pixels.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(cost.value(net.logits_with_graph(tracked)).sum(), tracked)
    sizable = exact.flatten(1).norm(dim=1) > 1e-6 * exact.flatten(1).norm(dim=1).max()
    assert cosines(by_ep, exact)[sizable].min() >= 0.99  # saturated samples: ~1e-11, noise
    lengths = by_ep.flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert torch.median(lengths).item() == pytest.approx(1.0, rel=2e-2)
    if kind != "ce":  # the model's own loss has another gradient
        by_loss = net.input_gradient(pixels, labels, "ep")
        assert cosines(by_loss, exact).min() < 0.99


# ---- AutoAttack and the T1 sweep on the trained digits RCNN --------------------------------

AA_FLAGS = ["--device", "cpu", "--n-samples", "40", "--attacks", "autoattack", "--gradients",
            "bptt", "--eps", "0", "0.1", "--eps-l2", "0", "--aa-iterations", "5",
            "--aa-queries", "20", "--aa-targets", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def autoattacked(digits_run, tmp_path_factory) -> dict:
    """robustness.py --attacks autoattack on a copy of the trained digits RCNN."""
    run_dir = copy_run(digits_run, tmp_path_factory.mktemp("autoattack"))
    assert robustness.main(["--load-path", str(run_dir), *AA_FLAGS]) == 0
    return {"dir": run_dir, "rows": storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)}


def test_autoattack_at_epsilon_zero_leaves_the_clean_accuracy(autoattacked):
    rows = autoattacked["rows"]
    at_zero = [row for row in rows if row["attack"].startswith("autoattack") and
               row["epsilon"] == 0]  # fmt: skip
    assert len(at_zero) == 2 * (len(autoattack.available_components()) + 1)  # L-inf and L2
    assert all(row["accuracy"] == clean_accuracy(rows) for row in at_zero)


def test_autoattack_keeps_valid_misclassified_images_and_the_table_counts(autoattacked):
    run_dir, rows = autoattacked["dir"], autoattacked["rows"]
    (worst,) = [row for row in rows if row["attack"] == "autoattack" and row["epsilon"] == 0.1]
    (table_path,) = (run_dir / "autoattack").glob("*_linf_eps0.1_bptt_*.csv")
    table = storage.read_csv_rows(table_path)
    assert worst["accuracy"] == sum(row["robust"] for row in table) / len(table) < 1
    assert worst["accuracy"] < clean_accuracy(rows)
    # every kept image, checked from scratch with a network rebuilt from the model file
    record, _ = records.load_model_file(run_dir)
    net = PixelClassifier(records.restore_model(record), "DIGITS", 10, 3, 0.01, 8)
    indices, pixels, labels, _ = sample_test_pixels("DIGITS", "./data", False, 40, 0)
    assert [int(row["index"]) for row in table] == indices.tolist()
    prefix = table_path.name.split("_")[0]
    fooled_somewhere = torch.zeros(len(labels), dtype=torch.bool)
    for component in (run_dir / "autoattack").glob(f"{prefix}_*.pt"):
        result = storage.safe_load(component, "component")
        fooled = ~result["robust"] & torch.tensor([bool(row["clean"]) for row in table])
        kept = result["adversarial"][fooled]
        assert (kept - pixels[fooled]).abs().max() <= 0.1 + 1e-6
        assert kept.min() >= 0 and kept.max() <= 1
        assert (net(kept).argmax(1) != labels[fooled]).all(), component.name
        fooled_somewhere |= fooled
    robust_count = sum(row["clean"] for row in table) - int(fooled_somewhere.sum())
    assert worst["accuracy"] == robust_count / len(table)


def test_the_summary_states_the_budget_of_the_attacks_that_ran(autoattacked):
    header = (autoattacked["dir"] / ROBUSTNESS_TXT).read_text().splitlines()[0]
    assert "AutoAttack 5 iterations, 20 queries, 2 targets, 1 restarts" in header
    assert " steps" not in header, "no PGD or Square ran, so their budget is not stated"


def test_the_T1_sweep_at_the_runs_own_T1_equals_a_single_evaluation(digits_run, tmp_path,
                                                                    capsys):  # fmt: skip
    single, sweep = copy_run(digits_run, tmp_path, "single"), copy_run(digits_run, tmp_path)
    flags = ["--device", "cpu", "--n-samples", "30", "--attacks", "corruptions", "pgd-linf",
             "square-linf", "--eps", "0.1", "--steps", "3", "--queries", "5", "--corruptions",
             "contrast", "--severities", "2"]  # fmt: skip
    assert robustness.main(["--load-path", str(single), *flags]) == 0
    assert robustness.main(["--load-path", str(sweep), *flags, "--T1", "4", "10"]) == 0
    capsys.readouterr()
    by_sweep = [row for row in without_seconds(sweep) if row["T1"] == 10]
    assert by_sweep == without_seconds(single)
    assert {row["T1"] for row in without_seconds(sweep)} == {4.0, 10.0}
    assert (sweep / ROBUSTNESS_PNG).read_bytes().startswith(PNG_MAGIC)


def test_the_sweep_epsilon_is_the_largest_below_the_first_that_leaves_nothing():
    def rows(*pairs):
        return [{"epsilon": eps, "accuracy": acc} for eps, acc in pairs]

    assert data_utils.sweep_epsilon(rows((0.1, 0.5), (0.2, 0.1), (0.3, 0.0), (0.4, 0.0))) == 0.2
    assert data_utils.sweep_epsilon(rows((0.1, 0.5), (0.3, 0.2))) == 0.3  # never 0%: the largest
    assert data_utils.sweep_epsilon(rows((0.1, 0.0), (0.3, 0.0))) == 0.1  # 0% from the start


def test_the_adaptive_checks_line_follows_the_measured_rows(digits_run, tmp_path, capsys):
    run_dir = copy_run(digits_run, tmp_path)
    argv = ["--load-path", str(run_dir), "--device", "cpu", "--n-samples", "30", "--attacks",
            "pgd-linf", "--gradients", "bptt", "--eps", "0.1", "--steps", "3", "--queries",
            "10", "--checks"]  # fmt: skip
    assert robustness.main(argv) == 0
    capsys.readouterr()
    rows = {row["attack"]: row for row in storage.read_csv_rows(run_dir / "robustness.csv")}
    base = rows["check/pgd base"]["accuracy"]
    assert base == rows["pgd-linf"]["accuracy"]  # the same PGD as the attack's own row
    assert (rows["check/pgd 4x steps"]["steps"], rows["check/pgd 5 restarts"]["restarts"]) == (
        12, 5
    )  # fmt: skip
    verdicts = {
        "convergence": all(
            base - rows[f"check/pgd {label}"]["accuracy"] <= 0.01 + 1e-9
            for label in ("2x steps", "4x steps", "5 restarts")
        ),
        "unbounded": rows["check/unbounded"]["accuracy"] <= 0.01,
        "white-box vs square": base <= rows["check/square"]["accuracy"],
    }
    (line,) = [line for line in (run_dir / "robustness.txt").read_text().splitlines()
               if "adaptive checks" in line]  # fmt: skip
    passed = line.split("passed: ", 1)[1].split(";")[0].split(", ")
    assert sorted(passed) == sorted(name for name, ok in verdicts.items() if ok) or (
        passed == ["none"] and not any(verdicts.values())
    )
    assert ("gradient masking suspected" in line) == (not all(verdicts.values()))


@pytest.mark.slow
def test_a_resumed_autoattack_reuses_saved_components_to_the_same_worst_case(autoattacked, capsys):
    run_dir = autoattacked["dir"]
    before = without_seconds(run_dir)
    argv = ["--load-path", str(run_dir), *AA_FLAGS]
    capsys.readouterr()
    assert robustness.main(argv) == 0
    assert reused_line(capsys.readouterr().out).endswith("; 0 to compute")
    (table_path,) = (run_dir / "autoattack").glob("*_linf_eps0.1_bptt_*.csv")
    (apgd_t,) = (run_dir / "autoattack").glob(f"{table_path.name.split('_')[0]}_apgd-t.pt")
    apgd_t.unlink()  # as if stopped during APGD-T: neither its row nor the worst case is
    assert robustness.main(argv) == 0  # reused without its per-image results
    assert reused_line(capsys.readouterr().out).endswith("; 2 to compute")
    assert without_seconds(run_dir) == before


@pytest.mark.slow
def test_ctrl_c_to_an_autoattack_process_exits_130_and_its_command_continues(
    digits_run, autoattacked, tmp_path
):
    """A real SIGINT, sent when the first component's results appear; the printed command,
    run as written, ends with the rows of the evaluation that was never stopped."""
    run_dir = copy_run(digits_run, tmp_path)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = start(["robustness.py", "--load-path", str(run_dir), *AA_FLAGS], env=environment)
    try:
        components = run_dir / AUTOATTACK_FOLDER
        wait_for(lambda: any(components.glob("*.pt")) or child.poll() is not None, "a component")
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in err, err
    note, command = err.strip().splitlines()[-2:]
    assert note == "interrupted; robustness.csv keeps the rows measured so far; continue with:"
    assert robustness.main(printed_args(command, "robustness.py", ROOT)) == 0
    assert without_seconds(run_dir) == without_seconds(autoattacked["dir"])
