"""RBP, CL and CpL through the scripts on the bundled digits: a run stopped after its first
epoch resumes bit for bit, under its rule's name in the results folder, results.csv,
TensorBoard and the evaluation notebook; every model the engine builds, with every dynamics;
two processes under torchrun equal one; the refusals, each one line with nothing written."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from helpers import DIGITS_CNN, LCACNN, ROOT, torchrun
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from tensorboard.backend.event_processing import event_accumulator as ea

import main_fast
from experiment import runs

RULES = {"RBP": ["--alg", "RBP"], "CL": ["--alg", "CL"],
         "CpL": ["--alg", "CpL", "--cpl-eta", "0.5"]}  # fmt: skip
TINY = [*DIGITS_CNN, "--mbs", "360", "--device", "cpu"]  # four batches, MSE on the output units
RES = ["--model", "ResCNN", "--task", "DIGITS", "--channels", "4", "--fc", "10", "--act",
       "relu6", "--scale", "0.5", "--lrs", "0.02", "--T1", "6", "--T2", "3", "--mbs", "720",
       "--seed", "0", "--device", "cpu"]  # fmt: skip
LCA_FLAGS = ["--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1", "--lca_iters", "5",
             "--dict_training", "learn", "--device", "cpu", "--seed", "0"]  # fmt: skip
LCARES = ["--model", "LCAResCNN", "--channels", "4", "6", "--fc", "10", "--act", "relu6",
          "--lrs", "0.02", "--task", "DIGITS", "--T1", "6", "--T2", "3", "--mbs", "720",
          *LCA_FLAGS]  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train(results: Path, argv: list[str], *extra: str) -> Path:
    assert main_fast.main([*argv, *extra, "--save", "--results-dir", str(results)]) == 0
    (run_dir,) = runs.find_runs(results)
    return run_dir


def without_seconds(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"}
            for row in read_csv(run_dir / "results.csv")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES))
def test_a_stopped_run_resumes_bit_for_bit_under_its_name(rule, tmp_path):
    argv = [*TINY, *RULES[rule], "--tensorboard", "--log-every", "1"]
    whole = train(tmp_path / "whole", argv, "--epochs", "2")
    split = train(tmp_path / "split", argv, "--epochs", "1")
    assert main_fast.main(["--load-path", str(split), "--epochs", "2"]) == 0
    assert whole.relative_to(tmp_path / "whole").parts[:3] == ("DIGITS", rule, "CNN")
    state, expected = (load(run / "final_model.pt")["model_state"] for run in (split, whole))
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], value) for name, value in expected.items())
    assert without_seconds(split) == without_seconds(whole)
    rows = read_csv(whole / "results.csv")
    assert len(rows) == 2
    log = ea.EventAccumulator(str(whole / "tb"), size_guidance={ea.SCALARS: 0})
    log.Reload()
    accuracy = [event.value for event in log.Scalars("test/acc")]
    assert accuracy == pytest.approx([float(row["test_acc"]) for row in rows], rel=1e-6)
    if rule == "RBP":
        residuals = [event.value for event in log.Scalars("rbp/adjoint_residual")]
        assert residuals == pytest.approx([float(r["adjoint_residual"]) for r in rows], rel=1e-6)
        assert all(value > 0 for value in residuals)  # T2 = 2 iterations: not converged
    else:
        assert "adjoint_residual" not in rows[0]


CASES = {
    "RBP, ResCNN": [*RES, "--alg", "RBP", "--adjoint-iters", "10"],
    "CL, ResCNN, async": [*RES, "--alg", "CL", "--dynamics", "async"],
    "CpL, LCAResCNN, tol": [*LCARES, "--alg", "CpL", "--cpl-eta", "0.3", "--tol", "1e-3"],
    "RBP, LCACNN with g, async, tol": [*LCACNN, *LCA_FLAGS, "--alg", "RBP", "--scale_feedback",
                                       "0.5", "--dynamics", "async", "--tol", "1e-3"],
    "CL, LCACNN": [*LCACNN, *LCA_FLAGS, "--alg", "CL", "--loss", "cel"],
    "CpL, MLP": ["--model", "MLP", "--task", "DIGITS", "--archi", "64", "32", "10", "--lrs",
                 "0.1", "0.05", "--alg", "CpL", "--cpl-eta", "0.5", "--device", "cpu"],
    "RBP, softmax readout": [*TINY, "--alg", "RBP", "--softmax", "--loss", "cel"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_model_and_dynamics_trains(case, tmp_path):
    run_dir = train(tmp_path, CASES[case], "--epochs", "1")
    (row,) = read_csv(run_dir / "results.csv")
    assert 0.0 <= float(row["train_acc"]) <= 1.0 and 0.0 <= float(row["test_acc"]) <= 1.0
    if "--tol" in CASES[case]:
        phase = "free_steps" if "RBP" in case else "clamped_steps"
        assert 0 < float(row[phase]) <= 6
    state = load(run_dir / "final_model.pt")["model_state"]
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["RBP", "CL"])
def test_torchrun_two_processes_equal_one(rule, tmp_path):
    argv = [*TINY, *RULES[rule], "--epochs", "1"]
    one = train(tmp_path / "one", argv)
    done = torchrun(2, [*argv, "--save", "--results-dir", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (two,) = runs.find_runs(tmp_path / "two")
    state_one, state_two = (load(run / "model.pt")["model_state"] for run in (one, two))
    for name, value in state_one.items():
        torch.testing.assert_close(state_two[name], value, atol=1e-6, rtol=1e-5, msg=name)
    rows_one, rows_two = (read_csv(run / "results.csv") for run in (one, two))
    assert rows_one[0]["train_acc"] == rows_two[0]["train_acc"]


def execute_notebook(tmp_path: Path, env: dict[str, str]) -> None:
    """Run eval_lcanet.ipynb top to bottom from the repository root, in a fresh kernel of
    this interpreter whose environment also holds ``env``; a failing cell raises."""
    spec_dir = tmp_path / "kernels" / "rules-notebook-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "rules test kernel", "language": "python", "env": env}  # fmt: skip
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    kernel = KernelManager(kernel_name="rules-notebook-test", kernel_spec_manager=specs)
    notebook = nbformat.read(ROOT / "eval_lcanet.ipynb", as_version=4)
    NotebookClient(
        notebook, km=kernel, timeout=300, resources={"metadata": {"path": str(ROOT)}}
    ).execute()


@pytest.mark.slow
def test_the_notebook_lists_each_rule_by_name(tmp_path):
    results = tmp_path / "results"
    for rule, flags in RULES.items():
        train(results / rule, [*TINY, *flags, "--epochs", "1"])
    figures = tmp_path / "figures"
    env = {"EVAL_FIGURES_DIR": str(figures), "EVAL_DEVICE": "cpu", "EVAL_N_IMAGES": "4",
           "EVAL_ACTIVITY_IMAGES": "16", "EVAL_RESULTS_DIR": str(results)}  # fmt: skip
    execute_notebook(tmp_path, env)
    table = read_csv(figures / "runs.csv")
    assert sorted(row["alg"] for row in table) == sorted(RULES)
    for row in table:
        (run_dir,) = runs.find_runs(results / row["alg"])
        assert Path(row["folder"]) == run_dir
        assert float(row["final_test_acc"]) == float(
            read_csv(run_dir / "results.csv")[-1]["test_acc"]
        )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([*TINY, "--alg", "CL", "--softmax", "--loss", "cel"], "drop --softmax"),
     ([*TINY, "--alg", "CpL", "--softmax", "--loss", "cel"], "drop --softmax"),
     ([*TINY, "--alg", "CpL", "--cpl-eta", "0"], "--cpl-eta must lie in (0, 1]"),
     ([*TINY, "--alg", "RBP", "--adjoint-iters", "0"], "--adjoint-iters must be at least 1"),
     ([*TINY, "--alg", "RBP", "--model", "VFCNN"], "vector-field model"),
     ([*TINY, "--alg", "CL", "--model", "VFCNN"], "vector-field model")],
    ids=["CL softmax", "CpL softmax", "CpL eta", "RBP iterations", "RBP VF", "CL VF"],
)  # fmt: skip
def test_a_refused_setting_is_one_line_and_writes_nothing(argv, expected, tmp_path, capsys):
    assert main_fast.main([*argv, "--save", "--results-dir", str(tmp_path / "r")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.csv"))


def test_flags_a_rule_does_not_read_are_warned_about(capsys):
    argv = [*TINY, "--alg", "CL", "--thirdphase", "--betas", "0", "0.5", "--adjoint-iters", "3",
            "--epochs", "1"]  # fmt: skip
    assert main_fast.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "warning: --betas ignored: --alg CL does not read it "
        "(CL clamps the output units instead of nudging them)",
        "warning: --thirdphase ignored: --alg CL does not read it (CL has no nudged phase)",
        "warning: --adjoint-iters ignored: --alg CL does not read it (only RBP runs an adjoint)",
    ]
