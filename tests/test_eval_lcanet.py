"""The evaluation notebook eval_lcanet.ipynb: committed without outputs, and executed headless
in a fresh kernel of this interpreter on tiny runs of the bundled digits (a CNN and an LCACNN
fine-tuning its dictionary; a ResCNN and an LCAResCNN learning its own), on the CNN run alone
and on an empty results folder."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from test_rescnn import LCARES, RES

import cifar_dictlearning
import main_fast
import robustness
from experiment import runs, storage
from robust_eval.evaluation import ROBUSTNESS_CSV

# the notebook, executed in a fresh kernel, on runs one worker trains once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("eval_lcanet")]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "eval_lcanet.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS_TEST_IMAGES = 360

RUN_FIGURES = {"accuracy.png", "confusion_matrix.png", "neural_activity.png"}
LCA_FIGURES = {
    "lca_metrics.png",
    "dictionary_pretraining.png",
    "dictionaries.png",
    "reconstructions.png",
}
RUN_TABLES = {"runs.csv", "per_class_accuracy.csv"}
ROBUSTNESS_FILES = {"robustness_comparison.png", "robustness_comparison.csv"}
LCA_TABLES = {"dictionary_drift.csv"}
SEED_FIGURES = {"runs_summary_test_acc.png"}
SEED_TABLES = {"runs_summary.csv", "runs_summary.md", "robustness_summary.csv",
               "robustness_summary.md"}  # fmt: skip

EP_FLAGS = ["--task", "DIGITS", "--kernels", "3", "--strides", "1", "--paddings", "1",
            "--fc", "10", "--lrs", "0.1", "0.05", "--T1", "5", "--T2", "2", "--betas", "0.0",
            "0.5", "--thirdphase", "--loss", "cel", "--softmax", "--mbs", "128", "--seed", "0",
            "--device", "cpu", "--save"]  # fmt: skip
CNN_FLAGS = ["--model", "CNN", "--channels", "8", "--pools", "m", "--epochs", "2"]
LCACNN_FLAGS = ["--model", "LCACNN", "--channels", "8", "16", "--pools", "im", "--epochs", "1",
                "--lca_feats", "8", "--lca_ksize", "3", "--lca_stride", "1", "--lca_iters", "10",
                "--lca_tau", "5", "--lca_lambda", "0.1", "--lca_eta", "0.05",
                "--dict_training", "finetune"]  # fmt: skip
ROBUSTNESS_FLAGS = ["--device", "cpu", "--n-samples", "20", "--attacks", "corruptions", "pgd-linf",
                    "square-linf", "--eps", "0", "0.1", "--steps", "2", "--queries", "3",
                    "--corruptions", "fog", "--severities", "2"]  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict:
    """A dictionary learnt by cifar_dictlearning.py on 80% of the digits, then two saved runs
    under one results folder: a CNN (2 epochs) and an LCACNN fine-tuning that dictionary on
    the other 20% (1 epoch), each evaluated by robustness.py."""
    root = tmp_path_factory.mktemp("tiny_runs")
    dict_dir = root / "dictionary"
    dictlearning = ["--task", "DIGITS", "--out-dir", str(dict_dir), "--features", "8",
                    "--kernel-size", "3", "--stride", "1", "--lca-iters", "10", "--tau", "5",
                    "--lambda", "0.1", "--lambda-every", "0", "--epochs", "2",
                    "--batch-size", "64", "--max-batches", "1", "--subset-fraction", "0.8",
                    "--device", "cpu"]  # fmt: skip
    assert cifar_dictlearning.main(dictlearning) == 0
    results = root / "results"
    where = ["--results-dir", str(results)]
    assert main_fast.main(CNN_FLAGS + EP_FLAGS + where) == 0
    dict_path = ["--dict-path", str(dict_dir / "dictionary.pt")]
    assert main_fast.main(LCACNN_FLAGS + EP_FLAGS + where + dict_path) == 0
    cnn, lcacnn = sorted(runs.find_runs(results), key=lambda run: "LCACNN" in str(run))
    for run_dir in (cnn, lcacnn):
        assert robustness.main(["--load-path", str(run_dir), *ROBUSTNESS_FLAGS]) == 0
    return {"results": results, "cnn": cnn, "lcacnn": lcacnn}


def execute_notebook(tmp_path: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run the notebook top to bottom from the repository root, in a fresh kernel of this very
    interpreter whose environment also holds ``env``; a failing cell raises."""
    kernels = tmp_path / "kernels"
    spec_dir = kernels / "eval-notebook-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eval_lcanet test kernel",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    kernel = KernelManager(kernel_name="eval-notebook-test", kernel_spec_manager=specs)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, km=kernel, timeout=300, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the cells printed to stdout."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def inline_images(notebook: nbformat.NotebookNode) -> int:
    """How many PNG figures the cells displayed."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def eval_env(figures: Path, **extra: str) -> dict[str, str]:
    return {
        "EVAL_FIGURES_DIR": str(figures),
        "EVAL_DEVICE": "cpu",
        "EVAL_N_IMAGES": "4",
        "EVAL_ACTIVITY_IMAGES": "64",
        **extra,
    }


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 8
    for cell in code:
        assert cell.outputs == [], cell.source[:80]
        assert cell.execution_count is None, cell.source[:80]


def test_find_runs_lists_trained_run_folders_in_order(tmp_path):
    parent = tmp_path / "DIGITS" / "EP" / "CNN" / "none" / "2026-01-01"
    for name in ("run_10", "run_2", "run_1", "not_a_run"):
        (parent / name).mkdir(parents=True)
        runs.append_results_row(parent / name, {"epoch": 1, "test_acc": 0.5})
    (parent / "run_3").mkdir()  # a GDU check or a run stopped in its first epoch
    found = runs.find_runs(tmp_path)
    assert found == [parent / "run_1", parent / "run_2", parent / "run_10"]
    assert runs.find_runs(tmp_path / "missing") == []


def test_notebook_on_cnn_and_finetune_runs(tiny_runs, tmp_path):
    figures = tmp_path / "figures"
    notebook = execute_notebook(
        tmp_path, eval_env(figures, EVAL_RESULTS_DIR=str(tiny_runs["results"]))
    )

    expected = RUN_FIGURES | LCA_FIGURES | SEED_FIGURES | {"robustness_comparison.png"}
    assert {p.name for p in figures.iterdir()} == expected | RUN_TABLES | LCA_TABLES | {
        "robustness_comparison.csv"
    } | SEED_TABLES
    for name in expected:
        assert (figures / name).read_bytes().startswith(PNG_MAGIC), name
    assert inline_images(notebook) == len(expected)

    # Section 8: one row per run, read from its robustness.csv.
    robust = read_csv(figures / "robustness_comparison.csv")
    assert len(robust) == 2
    for row, run_dir in zip(robust, (tiny_runs["cnn"], tiny_runs["lcacnn"]), strict=True):
        saved = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
        by_attack = {(r["attack"], r["epsilon"], r["gradient"]): r["accuracy"] for r in saved}
        assert float(row["clean"]) == pytest.approx(by_attack[("clean", 0.0, "none")])
        assert float(row["pgd-linf eps 0.1 ep"]) == pytest.approx(
            by_attack[("pgd-linf", 0.1, "ep")]
        )
        assert float(row["square-linf eps 0.1 none"]) == pytest.approx(
            by_attack[("square-linf", 0.1, "none")]
        )
        assert float(row["corruption_mean"]) == pytest.approx(
            by_attack[("corruption_mean", 0.0, "none")]
        )

    table = {row["model"]: row for row in read_csv(figures / "runs.csv")}
    assert set(table) == {"CNN", "LCACNN"}
    for model, run_dir in (("CNN", tiny_runs["cnn"]), ("LCACNN", tiny_runs["lcacnn"])):
        row, results = table[model], runs.read_results(run_dir)
        assert Path(row["folder"]) == run_dir
        assert int(row["epochs"]) == len(results)
        assert float(row["best_test_acc"]) == max(r["test_acc"] for r in results)
        assert float(row["final_test_acc"]) == results[-1]["test_acc"]
    assert table["CNN"]["dict_training"] == "none" and table["CNN"]["epochs"] == "2"
    assert table["LCACNN"]["dict_training"] == "finetune"

    # The summary over seeds: one group per run here (n = 1), from its results.csv.
    groups = {row["model"]: row for row in read_csv(figures / "runs_summary.csv")}
    for model, run_dir in (("CNN", tiny_runs["cnn"]), ("LCACNN", tiny_runs["lcacnn"])):
        results = runs.read_results(run_dir)
        assert groups[model]["n"] == "1" and groups[model]["runs"] == "finished"
        best = float(groups[model]["best_test_acc_mean"])
        assert best == max(r["test_acc"] for r in results)

    # Section 6 re-evaluates the best run's model.pt: it must reproduce the training's number.
    records = [load(tiny_runs[name] / "model.pt") for name in ("cnn", "lcacnn")]
    best = max(records, key=lambda record: record["test_acc"])
    per_class = read_csv(figures / "per_class_accuracy.csv")
    assert [row["class"] for row in per_class] == [str(digit) for digit in range(10)]
    seen = sum(int(row["test_images"]) for row in per_class)
    correct = sum(int(row["correct"]) for row in per_class)
    assert seen == DIGITS_TEST_IMAGES
    assert correct / seen == pytest.approx(best["test_acc"], abs=1e-12)
    T1 = best["config"]["dynamics"]["T1"]
    assert f"T1 = {T1}: test accuracy {best['test_acc']:.4f}" in printed(notebook)

    # Section 4: how far the fine-tuned dictionary moved, measured from final_model.pt.
    (drift,) = read_csv(figures / "dictionary_drift.csv")
    state = load(tiny_runs["lcacnn"] / "final_model.pt")["model_state"]
    start, end = state["initial_dictionary"], state["lca.weights"]
    moved = ((end - start).norm() / start.norm()).item()
    assert moved > 0
    assert float(drift["relative_change"]) == pytest.approx(moved, rel=1e-5)
    assert float(drift["mean_cosine"]) < 1


def test_notebook_with_only_cnn_runs(tiny_runs, tmp_path):
    figures = tmp_path / "figures"
    notebook = execute_notebook(tmp_path, eval_env(figures, EVAL_RUNS=str(tiny_runs["cnn"])))

    written = RUN_FIGURES | RUN_TABLES | ROBUSTNESS_FILES | SEED_FIGURES | SEED_TABLES
    assert {p.name for p in figures.iterdir()} == written
    assert inline_images(notebook) == len(RUN_FIGURES) + 2
    (row,) = read_csv(figures / "runs.csv")
    assert row["model"] == "CNN" and Path(row["folder"]) == tiny_runs["cnn"]
    assert printed(notebook).count("No LCA runs") == 3  # sections 3, 4 and 5


def test_notebook_without_runs(tmp_path):
    figures = tmp_path / "figures"
    empty = tmp_path / "results"
    empty.mkdir()
    notebook = execute_notebook(tmp_path, eval_env(figures, EVAL_RESULTS_DIR=str(empty)))

    assert list(figures.iterdir()) == []
    assert inline_images(notebook) == 0
    assert f"No runs found under {empty.resolve()}" in printed(notebook)
    assert "No robustness.csv in these runs" in printed(notebook)


def test_notebook_on_resnet_runs(tmp_path):
    """A ResCNN and an LCAResCNN learning its dictionary: both in the table, the LCAResCNN in
    the LCA sections, the better one re-evaluated to its recorded accuracy."""
    results = tmp_path / "results"
    where = ["--epochs", "1", "--save", "--results-dir", str(results)]
    assert main_fast.main([*RES, *where]) == 0
    assert main_fast.main([*LCARES, "--dict_training", "learn", *where]) == 0
    resnet, lcaresnet = sorted(runs.find_runs(results), key=lambda run: "LCA" in str(run))
    figures = tmp_path / "figures"
    notebook = execute_notebook(tmp_path, eval_env(figures, EVAL_RESULTS_DIR=str(results)))

    # the dictionary is learnt from random: no pretraining record; no robustness.csv either
    expected = RUN_FIGURES | (LCA_FIGURES - {"dictionary_pretraining.png"}) | SEED_FIGURES
    summary_tables = {"runs_summary.csv", "runs_summary.md"}
    assert {
        p.name for p in figures.iterdir()
    } == expected | RUN_TABLES | LCA_TABLES | summary_tables
    assert inline_images(notebook) == len(expected)
    assert "No robustness.csv in these runs" in printed(notebook)

    table = {row["model"]: row for row in read_csv(figures / "runs.csv")}
    assert set(table) == {"ResCNN", "LCAResCNN"}
    for model, run_dir in (("ResCNN", resnet), ("LCAResCNN", lcaresnet)):
        row, results_rows = table[model], runs.read_results(run_dir)
        assert Path(row["folder"]) == run_dir
        assert float(row["best_test_acc"]) == max(r["test_acc"] for r in results_rows)
    assert table["ResCNN"]["lca"] == "" and table["ResCNN"]["channels"] == "4 6"
    assert table["LCAResCNN"]["lca"] == "4 x 3x3, stride 1, lambda 0.05, 5 iters"
    assert table["LCAResCNN"]["dict_training"] == "learn"
    groups = {row["model"]: row for row in read_csv(figures / "runs_summary.csv")}
    for model, run_dir in (("ResCNN", resnet), ("LCAResCNN", lcaresnet)):
        best = max(r["test_acc"] for r in runs.read_results(run_dir))
        assert groups[model]["n"] == "1" and float(groups[model]["best_test_acc_mean"]) == best

    records = [load(run_dir / "model.pt") for run_dir in (resnet, lcaresnet)]
    best = max(records, key=lambda record: record["test_acc"])
    per_class = read_csv(figures / "per_class_accuracy.csv")
    seen = sum(int(row["test_images"]) for row in per_class)
    correct = sum(int(row["correct"]) for row in per_class)
    assert seen == DIGITS_TEST_IMAGES
    assert correct / seen == pytest.approx(best["test_acc"], abs=1e-12)

    (drift,) = read_csv(figures / "dictionary_drift.csv")
    state = load(lcaresnet / "final_model.pt")["model_state"]
    start, end = state["initial_dictionary"], state["lca.weights"]
    moved = ((end - start).norm() / start.norm()).item()
    assert moved > 0
    assert float(drift["relative_change"]) == pytest.approx(moved, rel=1e-5)
