"""Tests of the dictionary-learning script on the bundled DIGITS data."""

import csv
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

import cifar_dictlearning
import entry
import storage
from records import load_dictionary, load_subset_indices

SMALL_RUN = [
    "--task", "DIGITS", "--features", "16", "--kernel-size", "3", "--stride", "1",
    "--lca-iters", "30", "--tau", "5", "--lambda", "0.2", "--lambda-every", "0",
    "--eta", "0.5", "--batch-size", "64", "--max-batches", "3", "--epochs", "3",
    "--device", "cpu", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("digits_dict")
    args = cifar_dictlearning.build_parser().parse_args(SMALL_RUN + ["--out-dir", str(out_dir)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only pay for thread synchronisation
    try:
        lca = cifar_dictlearning.run(args)
    finally:
        torch.set_num_threads(threads)
    with open(out_dir / "dictlearning.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out_dir, lca, rows


def test_learning_lowers_reconstruction_error_at_fixed_lambda(small_run):
    _, _, rows = small_run
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {float(r["lambda"]) for r in rows} == {0.2}
    errors = [float(r["recon_error"]) for r in rows]
    assert errors[-1] < errors[0]
    for r in rows:
        total = float(r["recon_error"]) + float(r["l1_sparsity"])
        assert float(r["total_energy"]) == pytest.approx(total)
        assert 0.0 < float(r["frac_active"]) < 1.0


def test_saved_dictionary_reloads_bit_for_bit(small_run):
    out_dir, lca, _ = small_run
    weights, config = load_dictionary(str(out_dir / "dictionary.pt"), expected_shape=(16, 1, 3, 3))
    assert torch.equal(weights, lca.weights.detach())
    assert (config["out_neurons"], config["kernel_size"], config["stride"]) == (16, 3, 1)
    assert config["lambda_"] == 0.2 and config["lca_iters"] == 30
    norms = weights.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(16), atol=1e-5, rtol=0)


def test_subset_indices_are_half_of_the_training_set(small_run):
    out_dir, _, _ = small_run
    indices = load_subset_indices(str(out_dir / "dictionary.pt"))
    # DIGITS has 1437 training images; half of them, rounded.
    assert indices.dtype == torch.int64 and indices.shape == (718,)
    assert indices.unique().numel() == 718
    assert int(indices.min()) >= 0 and int(indices.max()) < 1437
    other_seed = cifar_dictlearning.draw_subset(1437, 0.5, seed=4)
    assert not torch.equal(indices, other_seed)


def test_plots_are_written(small_run):
    out_dir, _, _ = small_run
    for name in ["dictionary.png", "dictlearning_curves.png"]:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_defaults_are_the_original_run():
    args = cifar_dictlearning.build_parser().parse_args([])
    got = (
        args.task, args.lca_feats, args.lca_ksize, args.lca_stride, args.lca_lambda,
        args.lambda_increment, args.lca_iters, args.lca_tau, args.lca_eta, args.mbs,
        args.epochs, args.subset_fraction,
    )  # fmt: skip
    assert got == ("CIFAR10", 64, 9, 2, 0.2, 0.1, 600, 100.0, 0.01, 200, 35, 0.5)


def test_lambda_schedule():
    # 35 epochs, raised every 35 // 7 = 5 epochs: 0.2 for epochs 0-4, ..., 0.8 for 30-34.
    lambdas = [cifar_dictlearning.lambda_at_epoch(e, 0.2, 0.1, 5) for e in range(35)]
    expected = [0.2 + 0.1 * (e // 5) for e in range(35)]
    assert lambdas == pytest.approx(expected)
    assert lambdas[4] == pytest.approx(0.2) and lambdas[5] == pytest.approx(0.3)
    assert lambdas[-1] == pytest.approx(0.8)
    assert cifar_dictlearning.lambda_at_epoch(20, 0.2, 0.1, 0) == 0.2


def test_dash_and_underscore_spellings():
    parser = cifar_dictlearning.build_parser()
    dashed = parser.parse_args(["--data-dir", "d", "--lca-iters", "5", "--max-batches", "2"])
    underscored = parser.parse_args(["--data_dir", "d", "--lca_iters", "5", "--max_batches", "2"])
    assert vars(dashed) == vars(underscored)
    assert (dashed.data_dir, dashed.lca_iters, dashed.max_batches) == ("d", 5, 2)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--task", "NOPE"], "unknown task"),
        (["--task", "CIFAR10", "--no-download"], "CIFAR10 data not found"),
        (["--task", "DIGITS", "--subset-fraction", "1.5"], "--subset-fraction"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, extra, needle):
    code = cifar_dictlearning.main(
        extra + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Continuing an interrupted run
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
WAIT = 180  # seconds a child process may take (a busy machine imports torch slowly)
# Two epochs of two batches: seven safe points (the start, a boundary before each batch, one
# once each epoch's files are written)
TWO_BY_TWO = [
    "--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
    "--lca-iters", "10", "--tau", "5", "--lambda", "0.2", "--lambda-increment", "0.1",
    "--lambda-every", "1", "--eta", "0.5", "--batch-size", "64", "--max-batches", "2",
    "--epochs", "2", "--device", "cpu", "--seed", "3",
]  # fmt: skip


def learn(argv: list[str], out_dir: Path, capsys=None) -> int:
    """``cifar_dictlearning.main`` on ``argv`` into ``out_dir`` at one thread; its output is
    read away when ``capsys`` is given."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cifar_dictlearning.main([*argv, "--out-dir", str(out_dir)])
    finally:
        torch.set_num_threads(threads)
    if capsys is not None:
        capsys.readouterr()
    return status


def csv_without_seconds(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "dictlearning.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row.pop("seconds")) >= 0
    return rows


def assert_same_result(out_dir: Path, reference: Path) -> None:
    """The dictionary (weights bit for bit, settings, subset) and the CSV but its seconds."""
    weights, config = load_dictionary(out_dir / "dictionary.pt")
    expected, expected_config = load_dictionary(reference / "dictionary.pt")
    assert torch.equal(weights, expected) and config == expected_config
    subset = load_subset_indices(out_dir / "dictionary.pt")
    assert torch.equal(subset, load_subset_indices(reference / "dictionary.pt"))
    assert csv_without_seconds(out_dir) == csv_without_seconds(reference)


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """The uninterrupted TWO_BY_TWO run, and the callers of its safe points in order."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    callers = []
    real = entry.raise_if_stopped

    def recording():
        caller = sys._getframe(1)
        if caller.f_code.co_name == "stop_agreed":  # the batch boundary or the epoch's end
            caller = caller.f_back
        callers.append(caller.f_code.co_name)
        real()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(entry, "raise_if_stopped", recording)
        assert learn(TWO_BY_TWO, out_dir) == 0
    return out_dir, callers


def stop_at(monkeypatch, call: int, signum: int = signal.SIGTERM) -> None:
    """The ``call``-th safe point (1-based) finds a stop request for ``signum`` waiting."""
    real, calls = entry.raise_if_stopped, []

    def stopping():
        calls.append(1)
        if len(calls) == call:
            entry.request_stop(signum)
        real()

    monkeypatch.setattr(entry, "raise_if_stopped", stopping)


def continue_command(err: str) -> list[str]:
    """The arguments of the ``continue with: python cifar_dictlearning.py ...`` line."""
    (line,) = [line for line in err.splitlines() if line.startswith("continue with: ")]
    command = shlex.split(line.removeprefix("continue with: "))
    assert command[:2] == ["python", "cifar_dictlearning.py"], line
    return command[2:]


def test_the_safe_points_are_the_start_every_batch_and_every_epoch(two_by_two):
    _, callers = two_by_two
    epoch = ["_parts", "_parts", "learn"]
    assert callers == ["with_signals", *epoch, *epoch]


def test_a_stop_at_any_safe_point_continues_to_the_uninterrupted_dictionary(
    two_by_two, tmp_path, monkeypatch, capsys
):
    reference, callers = two_by_two
    for call in range(1, len(callers) + 1):
        out_dir = tmp_path / f"stopped_at_{call}"
        with monkeypatch.context() as patch:
            stop_at(patch, call)
            assert learn(TWO_BY_TWO, out_dir) == 143
        err = capsys.readouterr().err
        assert "terminated (SIGTERM); the dictionary of the last finished epoch is kept" in err
        argv = continue_command(err)
        done = sum(caller == "learn" for caller in callers[:call])  # epochs kept
        if done:
            assert len(csv_without_seconds(out_dir)) == done
        assert cifar_dictlearning.main(argv) == 0, call
        out = capsys.readouterr().out
        if done == 2:  # stopped once the last epoch's files were written
            assert "the run is complete (2 epochs); nothing to do" in out
        assert_same_result(out_dir, reference)


def test_ctrl_c_while_a_figure_is_drawn_stops_once_the_epoch_is_saved(
    two_by_two, tmp_path, monkeypatch, capsys
):
    reference, _ = two_by_two
    real_save = storage.save_figure

    def save_with_ctrl_c(fig, path):  # SIGINT arrives while the first grid is written
        entry.request_stop(signal.SIGINT)
        real_save(fig, path)

    monkeypatch.setattr(storage, "save_figure", save_with_ctrl_c)
    assert learn(TWO_BY_TWO, tmp_path) == 130
    assert (
        "\ninterrupted; the dictionary of the last finished epoch is kept"
        in capsys.readouterr().err
    )
    state = torch.load(tmp_path / "dictlearning_state.pt", weights_only=True)
    assert state["epoch"] == 1 and (tmp_path / "dictlearning_curves.png").is_file()
    monkeypatch.undo()
    assert learn(TWO_BY_TWO, tmp_path, capsys) == 0
    assert_same_result(tmp_path, reference)
