"""--dynamics and --tol on the command line: defaults unchanged, saved with the run, reported."""

import os
import shlex
import subprocess

import pytest
import torch
from helpers import DIGITS_CNN_BATCHED as DIGITS_CNN
from helpers import ROOT, load, only_run_dir, read_csv

import main_fast
from dynamics import EAGER, TOL_EVERY, half_step
from experiment import records

HARD = DIGITS_CNN + ["--act", "my_hard_sig", "--epochs", "1", "--save"]


def trained_weights(tmp_path, name: str, extra: list[str]) -> dict:
    results = tmp_path / name
    assert main_fast.main(HARD + ["--results-dir", str(results), *extra]) == 0
    return load(only_run_dir(results) / "final_model.pt")


@pytest.mark.slow
def test_default_flags_are_the_sync_dynamics_bit_for_bit(tmp_path, capsys):
    default = trained_weights(tmp_path, "default", [])
    sync = trained_weights(tmp_path, "sync", ["--dynamics", "sync"])
    asyn = trained_weights(tmp_path, "async", ["--dynamics", "async"])
    capsys.readouterr()
    default_dynamics = records.run_config(default)["dynamics"]
    assert default_dynamics["dynamics"] == "sync" and default_dynamics["tol"] is None
    assert records.run_config(asyn)["dynamics"]["dynamics"] == "async"
    for key, value in default["model_state"].items():
        assert torch.equal(value, sync["model_state"][key]), key
    changed = [
        not torch.equal(value, asyn["model_state"][key])
        for key, value in default["model_state"].items()
    ]
    assert any(changed)


@torch.no_grad()
def first_settled_async_step(model, x, y, T: int, tol: float, every: int) -> int | None:
    """Asynchronous steps one at a time (the odd half-step, then the even one), no tolerance:
    the first t, a multiple of ``every`` or ``T``, where max|s_t - s_(t-1)| < tol."""
    neurons = model.init_neurons(x)
    for t in range(1, T + 1):
        previous, neurons = neurons, half_step(model, x, y, half_step(model, x, y, neurons, 1), 0)
        change = max(
            (new - old).abs().max().item() for old, new in zip(previous, neurons, strict=True)
        )
        if (t % every == 0 or t == T) and change < tol:
            return t
    return None


def test_tol_run_stops_each_phase_at_its_first_settled_check(tmp_path, capsys):
    """The saved run's model, with the run's dynamics and tolerance, stops its free phase at
    the first check (every TOL_EVERY steps) where an independent step-by-step loop has
    settled; the run reports steps per phase in its CSV, epoch line and figures."""
    results = tmp_path / "tol"
    argv = HARD + ["--results-dir", str(results), "--dynamics", "async", "--tol", "1e-3"]
    argv += ["--T1", "40", "--T2", "6", "--betas", "0.0", "0.5", "--thirdphase"]
    assert main_fast.main(argv) == 0
    out = capsys.readouterr().out
    run_dir = only_run_dir(results)
    assert {"free_steps", "nudged_steps", "free_at_cap", "nudged_at_cap"} <= set(
        read_csv(run_dir)[0]
    )
    assert "% at cap)" in out.splitlines()[-2]  # the epoch line: free ... steps (N% at cap)
    for figure in ("phase_steps.png", "phases_at_cap.png", "settling.png"):
        assert (run_dir / figure).is_file(), figure
    record = load(run_dir / "final_model.pt")
    model = records.build_model(records.network_config(record))
    model.load_state_dict(record["model_state"])
    saved = records.run_config(record)["dynamics"]
    model.set_dynamics(saved["dynamics"], saved["tol"])
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=generator), torch.arange(16) % 10
    want = first_settled_async_step(model, x, y, 40, 1e-3, TOL_EVERY)
    assert want is not None and want < 40  # settled before the cap
    with torch.no_grad():
        record = EAGER.run_recorded(model, x, y, model.init_neurons(x), 40)[1]
    assert record == (want, True)


@pytest.mark.slow
def test_runs_saved_before_the_flags_resume_and_evaluate_with_the_defaults(tmp_path, capsys):
    """A run folder whose saved arguments lack dynamics and tol (as written before they
    existed) resumes and evaluates with sync steps and fixed T1/T2."""
    assert main_fast.main(HARD + ["--results-dir", str(tmp_path)]) == 0
    run_dir = only_run_dir(tmp_path)
    for name in ("checkpoint.pt", "model.pt", "final_model.pt"):
        record = load(run_dir / name)
        flags = records.run_flags(record)  # the record as saved then: flags and model_config
        del flags["dynamics"], flags["tol"]
        record["args"], record["model_config"] = flags, records.network_config(record)
        del record["config"]
        torch.save(record, run_dir / name)
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    assert records.run_flags(load(run_dir / "checkpoint.pt"))["dynamics"] == "sync"
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
    """run/cifar10_fast.sh NAME: the command of run/<NAME script> plus the fast flags (a
    stand-in ``python`` on PATH prints each command instead of training)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "python $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def printed(*argv: str) -> list[str]:
        result = subprocess.run(
            ["bash", *argv], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return shlex.split(result.stdout)[2:]

    seed = printed(str(ROOT / "run" / "rcnn_cifar10.sh"))
    argv = printed(str(ROOT / "run" / "cifar10_fast.sh"), "rcnn", "--device", "1")
    assert argv == seed + ["--dynamics", "async", "--tol", "1e-4", "--device", "1"]
    args, _ = main_fast.parse_args(argv)
    assert (args.dynamics, args.tol, args.T1, args.T2) == ("async", 1e-4, 250, 50)
    bad = subprocess.run(
        ["bash", str(ROOT / "run" / "cifar10_fast.sh"), "mlp"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "usage: run/cifar10_fast.sh" in bad.stderr
