"""Tests of the dictionary-learning script on the bundled DIGITS data."""

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import WAIT, printed_args, start, wait_for

import cifar_dictlearning
from experiment import entry, storage
from experiment.records import load_dictionary, load_subset_indices

# one worker builds the dictionaries learnt once for many tests
pytestmark = pytest.mark.xdist_group("cifar_dictlearning")

SMALL_RUN = [
    "--task", "DIGITS", "--features", "16", "--kernel-size", "3", "--stride", "1",
    "--lca-iters", "30", "--tau", "5", "--lambda", "0.2", "--lambda-every", "0",
    "--eta", "0.5", "--batch-size", "64", "--max-batches", "3", "--epochs", "3",
    "--device", "cpu", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("digits_dict")
    flags = cifar_dictlearning.build_parser().parse_args(SMALL_RUN + ["--out-dir", str(out_dir)])
    lca = cifar_dictlearning.run(cifar_dictlearning.dictionary_config(vars(flags)))
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
# Two epochs of two batches: seven safe points (the start, a boundary before each batch, one
# once each epoch's files are written)
TWO_BY_TWO = [
    "--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
    "--lca-iters", "10", "--tau", "5", "--lambda", "0.2", "--lambda-increment", "0.1",
    "--lambda-every", "1", "--eta", "0.5", "--batch-size", "64", "--max-batches", "2",
    "--epochs", "2", "--device", "cpu", "--seed", "3",
]  # fmt: skip


def learn(argv: list[str], out_dir: Path | None, capsys=None) -> int:
    """``cifar_dictlearning.main`` on ``argv`` (into ``out_dir`` unless None: ``argv`` names
    it); its output is read away when ``capsys`` is given."""
    where = [] if out_dir is None else ["--out-dir", str(out_dir)]
    status = cifar_dictlearning.main([*argv, *where])
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
    """The arguments of the ``continue with: cd ... && python ...`` line."""
    (line,) = [line for line in err.splitlines() if line.startswith("continue with: ")]
    return printed_args(line.removeprefix("continue with: "), "cifar_dictlearning.py")


def test_the_safe_points_are_the_start_every_batch_and_every_epoch(two_by_two):
    _, callers = two_by_two
    epoch = ["_parts", "_parts", "learn"]
    assert callers == ["with_signals", *epoch, *epoch]


def test_a_stop_at_any_safe_point_continues_to_the_uninterrupted_dictionary(
    two_by_two, tmp_path, monkeypatch, capsys
):
    reference, callers = two_by_two
    # the figures take most of the time and hold no safe point: not drawn here
    monkeypatch.setattr(cifar_dictlearning.OutputFolder, "draw", lambda *args: None)
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
        assert learn(argv, None) == 0, call
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


def stopped_after_epoch_one(tmp_path: Path, monkeypatch) -> Path:
    """A TWO_BY_TWO run stopped by SIGTERM once its first epoch's files are written."""
    out_dir = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_at(patch, 4)  # the start, two batches, the end of epoch 1
        assert learn(TWO_BY_TWO, out_dir) == 143
    return out_dir


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        (["--lca-iters", "20"], "--lca-iters 20: pass --lca-iters 10 to continue it"),
        (["--eta", "0.25"], "--lca-eta 0.25: pass --lca-eta 0.5 to continue it"),
        (["--seed", "4"], "--seed 4: pass --seed 3 to continue it"),
        (["--max-batches", "3"], "--max-batches 3: pass --max-batches 2 to continue it"),
        (["--epochs", "1"], "holds 2 finished epochs, more than --epochs 1: pass --epochs 2"),
    ],
)
def test_a_changed_flag_is_refused_naming_it_and_the_fixes(
    two_by_two, tmp_path, capsys, change, fix
):
    reference, _ = two_by_two
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert learn(TWO_BY_TWO + change, out_dir) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"error: {out_dir / 'dictlearning_state.pt'} holds " in line
    assert fix in line and line.endswith("or --fresh to start over")
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_more_epochs_than_the_lambda_schedule_allows_are_refused(two_by_two, tmp_path, capsys):
    reference, _ = two_by_two
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    at = TWO_BY_TWO.index("--lambda-every")
    default_every = TWO_BY_TWO[:at] + TWO_BY_TWO[at + 2 :]  # raised every epochs // 7 epochs
    assert learn([*default_every, "--epochs", "14"], out_dir) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--epochs 14 raises lambda every 2 epochs (epochs // 7): pass --lambda-every 1" in line


THREE_EPOCHS = [*TWO_BY_TWO, "--epochs", "3"]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """The uninterrupted run of THREE_EPOCHS."""
    out_dir = tmp_path_factory.mktemp("three_epochs")
    assert learn(THREE_EPOCHS, out_dir) == 0
    return out_dir


def test_more_epochs_continue_to_the_longer_run(two_by_two, three_epochs, tmp_path, capsys):
    reference, _ = two_by_two
    out_dir = tmp_path / "two_then_three"
    shutil.copytree(reference, out_dir)
    capsys.readouterr()
    assert learn(THREE_EPOCHS, out_dir) == 0
    assert "continuing after epoch 2" in capsys.readouterr().out
    assert_same_result(out_dir, three_epochs)
    assert len(csv_without_seconds(out_dir)) == 3


def test_a_finished_run_says_so_and_rewrites_its_missing_files(two_by_two, tmp_path, capsys):
    reference, _ = two_by_two
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    for name in ("dictionary.pt", "subset_indices.pt", "dictlearning.csv", "dictionary.png"):
        (out_dir / name).unlink()
    assert learn(TWO_BY_TWO, out_dir) == 0
    out = capsys.readouterr().out
    assert "notice: rewrote dictionary.pt, dictlearning.csv, dictionary.png" in out
    assert "the run is complete (2 epochs); nothing to do (--fresh learns it again)" in out
    assert_same_result(out_dir, reference)
    assert (out_dir / "dictionary.png").read_bytes()[:4] == b"\x89PNG"
    assert learn(TWO_BY_TWO, out_dir) == 0
    assert "notice" not in capsys.readouterr().out  # nothing left to rewrite


def test_files_ahead_of_the_state_are_redone_from_it(two_by_two, tmp_path, monkeypatch, capsys):
    """Killed after epoch 2's dictionary and CSV row, before its state: the state of epoch 1
    stands, and epoch 2 is learnt again, once."""
    reference, _ = two_by_two
    stopped = stopped_after_epoch_one(tmp_path, monkeypatch)
    out_dir = tmp_path / "ahead"
    shutil.copytree(reference, out_dir)
    shutil.copy(stopped / "dictlearning_state.pt", out_dir / "dictlearning_state.pt")
    capsys.readouterr()
    assert learn(TWO_BY_TWO, out_dir) == 0
    assert "notice: rewrote dictionary.pt, dictlearning.csv from" in capsys.readouterr().out
    assert_same_result(out_dir, reference)


def test_fresh_starts_over(two_by_two, tmp_path, monkeypatch, capsys):
    reference, _ = two_by_two
    out_dir = stopped_after_epoch_one(tmp_path, monkeypatch)
    capsys.readouterr()
    assert learn([*TWO_BY_TWO, "--lca-iters", "20", "--fresh"], out_dir) == 0
    assert "continuing" not in capsys.readouterr().out
    state = torch.load(out_dir / "dictlearning_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["settings"]["lca_iters"] == 20
    assert [row["epoch"] for row in csv_without_seconds(out_dir)] == ["1", "2"]
    assert learn([*TWO_BY_TWO, "--fresh"], out_dir, capsys) == 0
    assert_same_result(out_dir, reference)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda path: path.write_bytes(path.read_bytes()[:1000]), "it is corrupt or not a"),
        (lambda path: torch.save({"epoch": 1}, path), "is damaged or from another program"),
        (
            lambda path: torch.save({**torch.load(path, weights_only=True), "rows": []}, path),
            "rows are not the CSV rows of epochs 1 to 1",
        ),
    ],
)
def test_a_damaged_state_is_refused_naming_the_file_and_fresh(
    two_by_two, tmp_path, monkeypatch, capsys, damage, problem
):
    reference, _ = two_by_two
    out_dir = stopped_after_epoch_one(tmp_path, monkeypatch)
    state_path = out_dir / "dictlearning_state.pt"
    damage(state_path)
    capsys.readouterr()
    assert learn(TWO_BY_TWO, out_dir) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(state_path.resolve() if "corrupt" in problem else state_path) in line
    assert problem in line and line.endswith(
        "pass --fresh to learn the dictionary again from epoch 1"
    )
    assert learn([*TWO_BY_TWO, "--fresh"], out_dir, capsys) == 0
    assert_same_result(out_dir, reference)


@pytest.mark.slow
def test_sigterm_to_a_child_process_stops_it_and_the_printed_command_continues(
    three_epochs, tmp_path
):
    """A real SIGTERM, sent when the first epoch's state appears (most often it lands while
    the second epoch's figures are drawn); the command printed, run as written, ends where
    the uninterrupted run ends."""
    argv = THREE_EPOCHS
    out_dir = tmp_path / "stopped"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = start(["cifar_dictlearning.py", *argv, "--out-dir", str(out_dir)], env=environment)
    try:
        first_epoch = out_dir / "dictlearning_state.pt"
        wait_for(lambda: first_epoch.exists() or child.poll() is not None, "the first epoch")
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=WAIT)
    finally:
        child.kill()
    assert child.returncode == 143 and "Traceback" not in err, err
    assert torch.load(out_dir / "dictlearning_state.pt", weights_only=True)["epoch"] < 3
    done = subprocess.run(
        ["python", "cifar_dictlearning.py", *continue_command(err)], cwd=ROOT, env=environment,
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continuing after epoch" in done.stdout
    assert_same_result(out_dir, three_epochs)


@pytest.mark.slow
def test_two_processes_continue_a_run_of_one(two_by_two, tmp_path, monkeypatch):
    """Every process reads the state; the dictionary is the one-process one up to the order of
    floating-point sums, and the CSV keeps the first epoch's row as it was."""
    reference, _ = two_by_two
    out_dir = stopped_after_epoch_one(tmp_path, monkeypatch)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "cifar_dictlearning.py", *TWO_BY_TWO,
               "--out-dir", str(out_dir)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing after epoch 1" in done.stdout
    weights, _ = load_dictionary(out_dir / "dictionary.pt")
    expected, _ = load_dictionary(reference / "dictionary.pt")
    assert (weights - expected).norm() / expected.norm() <= 1e-5
    rows, expected_rows = csv_without_seconds(out_dir), csv_without_seconds(reference)
    assert rows[0] == expected_rows[0]
    for name in cifar_dictlearning.METRICS:
        assert float(rows[1][name]) == pytest.approx(float(expected_rows[1][name]), rel=1e-5)


@pytest.mark.parametrize(("call", "keeps_fresh"), [(1, True), (2, False)])
def test_a_fresh_run_stopped_continues_itself_not_the_earlier_one(
    two_by_two, tmp_path, monkeypatch, capsys, call, keeps_fresh
):
    """Stopped at the start, nothing of the earlier run is gone yet and the command keeps
    --fresh; stopped at the first batch, the earlier run is gone and it drops it."""
    reference, _ = two_by_two
    out_dir = stopped_after_epoch_one(tmp_path, monkeypatch)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        stop_at(patch, call)
        assert learn([*TWO_BY_TWO, "--lca-iters", "20", "--fresh"], out_dir) == 143
    argv = continue_command(capsys.readouterr().err)
    assert ("--fresh" in argv) == keeps_fresh
    assert learn(argv, None) == 0
    state = torch.load(out_dir / "dictlearning_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["settings"]["lca_iters"] == 20


def test_a_dictionary_that_stops_being_finite_exits_1_keeping_the_last_finite_epoch(
    tmp_path, monkeypatch, capsys
):
    out_dir = tmp_path / "diverged"
    real = cifar_dictlearning.learn_one_epoch
    epochs = []

    def diverging_in_epoch_two(lca, *args, **kwargs):
        metrics = real(lca, *args, **kwargs)
        epochs.append(len(epochs) + 1)
        if len(epochs) == 2:
            with torch.no_grad():
                lca.weights[0, 0, 0, 0] = float("nan")
        return metrics

    monkeypatch.setattr(cifar_dictlearning, "learn_one_epoch", diverging_in_epoch_two)
    assert learn(TWO_BY_TWO, out_dir) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert line == (
        "error: dictionary learning diverged in epoch 2: the dictionary not finite; epoch 1's "
        f"dictionary is kept in {out_dir}; start again with --fresh and a smaller --lca_eta"
    )
    state = torch.load(out_dir / "dictlearning_state.pt", weights_only=True)
    saved = torch.load(out_dir / "dictionary.pt", weights_only=True)["weights"]
    assert state["epoch"] == 1 and torch.isfinite(saved).all()
    assert [row["epoch"] for row in csv.DictReader((out_dir / "dictlearning.csv").open())] == ["1"]


# --------------------------------------------------------------------------------- bad numbers


@pytest.mark.parametrize("flag", ["--lambda", "--tau", "--eta", "--d-update-clip"])
def test_dictionary_learning_refuses_nan(tmp_path, capsys, flag):
    out = tmp_path / "out"
    argv = ["--task", "DIGITS", "--epochs", "1", "--lca-iters", "2", "--out-dir", str(out)]
    assert cifar_dictlearning.main([*argv, flag, "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a" in err and "got nan" in err
    assert not (out / "dictionary.pt").exists()
