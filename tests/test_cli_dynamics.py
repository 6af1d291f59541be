"""--dynamics and --tol on the command line: defaults unchanged, saved with the run, reported."""

import os
import shlex
import subprocess

import torch
from helpers import DIGITS_CNN_BATCHED as DIGITS_CNN
from helpers import ROOT, load, only_run_dir, read_csv, seed_argv

import main_fast

HARD = DIGITS_CNN + ["--act", "my_hard_sig", "--epochs", "1", "--save"]


def trained_weights(tmp_path, name: str, extra: list[str]) -> dict:
    results = tmp_path / name
    assert main_fast.main(HARD + ["--results-dir", str(results), *extra]) == 0
    return load(only_run_dir(results) / "final_model.pt")


def test_default_flags_are_the_sync_dynamics_bit_for_bit(tmp_path, capsys):
    default = trained_weights(tmp_path, "default", [])
    sync = trained_weights(tmp_path, "sync", ["--dynamics", "sync"])
    asyn = trained_weights(tmp_path, "async", ["--dynamics", "async"])
    capsys.readouterr()
    assert default["args"]["dynamics"] == "sync" and default["args"]["tol"] is None
    assert asyn["args"]["dynamics"] == "async"
    for key, value in default["model_state"].items():
        assert torch.equal(value, sync["model_state"][key]), key
    changed = [
        not torch.equal(value, asyn["model_state"][key])
        for key, value in default["model_state"].items()
    ]
    assert any(changed)


def test_tol_run_reports_steps_per_phase_and_plots_them(tmp_path, capsys):
    results = tmp_path / "tol"
    argv = HARD + ["--results-dir", str(results), "--dynamics", "async", "--tol", "1e-3"]
    argv += ["--T1", "40", "--T2", "6", "--betas", "0.0", "0.5", "--thirdphase"]
    assert main_fast.main(argv) == 0
    out = capsys.readouterr().out
    run_dir = only_run_dir(results)
    row = read_csv(run_dir)[0]
    assert 1 <= float(row["free_steps"]) <= 40 and 1 <= float(row["nudged_steps"]) <= 6
    assert 0 <= float(row["free_at_cap"]) <= 1 and 0 <= float(row["nudged_at_cap"]) <= 1
    assert "% at cap)" in out.splitlines()[-2]  # the epoch line: free ... steps (N% at cap)
    for figure in ("phase_steps.png", "phases_at_cap.png", "settling.png"):
        assert (run_dir / figure).is_file(), figure


def test_runs_saved_before_the_flags_resume_and_evaluate_with_the_defaults(tmp_path, capsys):
    """A run folder whose saved arguments lack dynamics and tol (as written before they
    existed) resumes and evaluates with sync steps and fixed T1/T2."""
    assert main_fast.main(HARD + ["--results-dir", str(tmp_path)]) == 0
    run_dir = only_run_dir(tmp_path)
    for name in ("checkpoint.pt", "model.pt", "final_model.pt"):
        record = load(run_dir / name)
        del record["args"]["dynamics"], record["args"]["tol"]
        torch.save(record, run_dir / name)
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    assert load(run_dir / "checkpoint.pt")["args"]["dynamics"] == "sync"
    assert "free_steps" not in read_csv(run_dir)[1]
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0
    assert "T1 3, sync): train_acc" in capsys.readouterr().out
    argv = ["--todo", "evaluate", "--load-path", str(run_dir), "--dynamics", "async"]
    assert main_fast.main(argv + ["--tol", "1e-4"]) == 0
    assert "T1 3, async, tol 0.0001): train_acc" in capsys.readouterr().out


def test_bad_tol_is_a_usage_error(tmp_path, capsys):
    for bad in ("0", "-1e-3", "inf", "nan"):
        assert main_fast.main(DIGITS_CNN + [f"--tol={bad}"]) == 2
        assert "--tol must be a positive number" in capsys.readouterr().err


def test_fast_script_runs_the_seed_command_with_async_and_tol(tmp_path):
    """run/cifar10_fast.sh NAME: the seed command of run/<NAME script> plus the fast flags
    (a stand-in ``python`` on PATH prints the command instead of training)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "python $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    script = ROOT / "run" / "cifar10_fast.sh"
    result = subprocess.run(
        ["bash", str(script), "rcnn", "--device", "1"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)[2:]
    assert argv[: len(seed_argv("rcnn"))] == seed_argv("rcnn")
    assert argv[len(seed_argv("rcnn")) :] == [
        "--dynamics",
        "async",
        "--tol",
        "1e-4",
        "--device",
        "1",
    ]
    args, _ = main_fast.parse_args(argv)
    assert (args.dynamics, args.tol, args.T1, args.T2) == ("async", 1e-4, 250, 50)
    bad = subprocess.run(["bash", str(script), "mlp"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: run/cifar10_fast.sh" in bad.stderr
