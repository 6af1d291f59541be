"""summarize_runs.py and experiment/summary.py: run folders written here (three seeds of two
settings, one run stopped early, one folder in the typed-configuration format, the others in
the format before it) are grouped by configuration, and every mean and std is checked against
numpy's on the numbers the test wrote; the figure's lines and bands against the per-epoch
statistics; damaged and empty folders give one line each; the committed legacy runs of four
models read back."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LEGACY_RECORDS, LEGACY_SOURCE, decode_record, write_legacy_runs

import summarize_runs
from experiment import records, summary
from experiment.summary import SummaryConfig

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
SETTINGS = {"A": [0.05, 0.05], "B": [0.1, 0.1]}  # two settings differ in --lrs


def legacy_checkpoint() -> dict:
    """The legacy CNN run's checkpoint, as the older code saved it."""
    saved = json.loads((LEGACY_SOURCE / "cnn_ep" / LEGACY_RECORDS).read_text())
    return decode_record(saved["checkpoint.pt"])


def write_run(
    folder: Path,
    lrs,
    seed: int,
    test_acc,
    seconds,
    epochs: int = EPOCHS,
    typed: bool = False,
    threads: int | None = None,
    **launch,
) -> None:
    """A run folder: a checkpoint of the committed legacy CNN with these flags (in the typed
    format with ``typed``) and a results.csv of these per-epoch values."""  # fmt: skip
    record = legacy_checkpoint()
    record["args"] = {**record["args"], "lrs": list(lrs), "seed": seed, "epochs": epochs,
                      **launch}  # fmt: skip
    rows = [
        {"epoch": e + 1, "train_acc": 0.5, "test_acc": float(a), "lr": 0.05, "seconds": float(s)}
        for e, (a, s) in enumerate(zip(test_acc, seconds, strict=True))
    ]
    record["history"], record["epoch"] = rows, len(rows)
    if typed:
        record["config"] = records.run_config(record)
        del record["args"], record["model_config"]
    if threads is not None:
        record["threads"] = threads
    folder.mkdir(parents=True)
    torch.save(record, folder / "checkpoint.pt")
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def seed_runs(tmp_path) -> dict:
    """Three seeds of settings A and B (B's seed 2 in the typed format, its runs launched with
    other devices and results folders) plus a run of A stopped after 2 of its 4 epochs; the
    values written, by setting."""
    rng = np.random.default_rng(7)
    written = {}
    for name, lrs in SETTINGS.items():
        accs = rng.uniform(0.1, 0.99, size=(3, EPOCHS))
        secs = rng.uniform(1.0, 3.0, size=(3, EPOCHS))
        for seed in range(3):
            launch = {"device": f"cuda:{seed}", "results_dir": f"/elsewhere/{seed}"}
            write_run(tmp_path / "results" / name / f"run_{seed}", lrs, seed, accs[seed],
                      secs[seed], typed=(name == "B" and seed == 2), **launch)  # fmt: skip
        written[name] = (accs, secs)
    stopped = (rng.uniform(0.1, 0.99, size=2), rng.uniform(1.0, 3.0, size=2))
    write_run(tmp_path / "results" / "A" / "run_9", SETTINGS["A"], 9, *stopped)
    written["stopped"] = stopped
    return {"root": tmp_path / "results", "values": written}


def per_run(accs: np.ndarray, secs: np.ndarray) -> dict[str, np.ndarray]:
    """The four per-run values, computed here from the arrays written (rows: runs)."""
    return {
        "best_test_acc": accs.max(axis=1),
        "final_test_acc": accs[:, -1],
        "best_epoch": accs.argmax(axis=1) + 1.0,
        "seconds_per_epoch": secs.mean(axis=1),
    }


def group_by_lrs(result: summary.Summary, finished: bool = True) -> dict[str, summary.Group]:
    names = {tuple(lrs): name for name, lrs in SETTINGS.items()}
    return {names[tuple(g.settings["lrs"])]: g for g in result.groups if g.finished == finished}


@pytest.mark.parametrize("ddof", [1, 0])
def test_groups_and_their_statistics_match_numpy(seed_runs, ddof):
    result = summary.summarize(SummaryConfig((seed_runs["root"],), ddof=ddof))
    assert result.problems == []
    groups = group_by_lrs(result)
    assert sorted(groups) == ["A", "B"]
    for name, group in groups.items():
        assert sorted(run.seed for run in group.runs) == [0, 1, 2]
        expected = per_run(*seed_runs["values"][name])
        stats = group.statistics(ddof)
        for metric, values in expected.items():
            mean, std = stats[metric]
            assert mean == pytest.approx(np.mean(values), abs=1e-12)
            assert std == pytest.approx(np.std(values, ddof=ddof), abs=1e-12)
    (stopped,) = [g for g in result.groups if not g.finished]
    assert [run.seed for run in stopped.runs] == [9]
    accs, secs = seed_runs["values"]["stopped"]
    assert stopped.statistics(ddof)["best_test_acc"][0] == pytest.approx(accs.max(), abs=1e-12)
    assert stopped.statistics(ddof)["seconds_per_epoch"][0] == pytest.approx(secs.mean(), abs=1e-12)
    std = stopped.statistics(ddof)["final_test_acc"][1]
    assert np.isnan(std) if ddof == 1 else std == 0.0


def test_table_csv_and_markdown_state_the_ddof_and_the_stopped_runs(seed_runs, tmp_path):
    out = tmp_path / "out"
    config = SummaryConfig((seed_runs["root"],), out_dir=out, ddof=1)
    text = summary.report(config, summary.summarize(config))
    assert "ddof=1" in text and "counted separately" in text
    with open(out / "runs_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {row["ddof"] for row in rows} == {"1"}
    # only the setting that differs is shown beside model and alg; the launch flags are not
    assert {"model", "alg", "lrs", "runs", "n", "seeds"} <= set(rows[0])
    assert not {"device", "results_dir", "seed", "channels", "threads"} & set(rows[0])
    row_b = next(r for r in rows if r["lrs"] == "0.1 0.1")
    accs, _ = seed_runs["values"]["B"]
    assert float(row_b["final_test_acc_mean"]) == pytest.approx(accs[:, -1].mean(), abs=1e-12)
    assert float(row_b["final_test_acc_std"]) == pytest.approx(
        np.std(accs[:, -1], ddof=1), abs=1e-12
    )
    assert (row_b["n"], row_b["runs"]) == ("3", "finished")
    assert {r["runs"] for r in rows} == {"finished", "stopped"}
    markdown = (out / "runs_summary.md").read_text()
    assert "ddof=1" in markdown and "| 0.1 0.1 |" in markdown
    assert (out / "runs_summary_test_acc.png").read_bytes()[:4] == b"\x89PNG"


def test_stopped_runs_can_be_left_out_and_the_table_says_so(seed_runs):
    config = SummaryConfig((seed_runs["root"],), stopped="leave-out")
    result = summary.summarize(config)
    text = summary.report(config, result)
    assert all(group.finished for group in result.groups) and len(result.groups) == 2
    assert [run.seed for run in result.left_out] == [9]
    assert "1 run(s) stopped before their last epoch are left out" in text


def test_the_figure_plots_the_per_epoch_mean_and_a_band_of_one_std(seed_runs):
    result = summary.summarize(SummaryConfig((seed_runs["root"],)))
    curves = summary.accuracy_curves(result, ddof=1)
    fig = summary.curves_figure(curves, ddof=1)
    ax = fig.axes[0]
    by_group = dict(zip([id(g) for g in result.groups], curves, strict=True))
    for name, group in group_by_lrs(result).items():
        accs, _ = seed_runs["values"][name]
        curve = by_group[id(group)]
        index = curves.index(curve)
        line, band = ax.lines[index], ax.collections[index]
        np.testing.assert_allclose(line.get_xdata(), np.arange(1, EPOCHS + 1))
        np.testing.assert_allclose(line.get_ydata(), accs.mean(axis=0), rtol=0, atol=1e-12)
        std = np.std(accs, axis=0, ddof=1)
        vertices = band.get_paths()[0].vertices
        for epoch in range(EPOCHS):
            at = vertices[np.isclose(vertices[:, 0], epoch + 1), 1]
            assert at.min() == pytest.approx(accs[:, epoch].mean() - std[epoch], abs=1e-12)
            assert at.max() == pytest.approx(accs[:, epoch].mean() + std[epoch], abs=1e-12)


def test_thread_counts_split_groups_and_are_shown(tmp_path):
    accs, secs = np.array([0.5, 0.6]), np.array([1.0, 1.0])
    for seed, threads in enumerate([1, 1, 2, None]):
        write_run(tmp_path / f"run_{seed}", SETTINGS["A"], seed, accs, secs, typed=True,
                  threads=threads)  # fmt: skip
    result = summary.summarize(SummaryConfig((tmp_path,)))
    counts = sorted((repr(g.settings["threads"]), len(g.runs)) for g in result.groups)
    assert counts == [("1", 2), ("2", 1), ("None", 1)]
    rows = summary.table_rows(result, ddof=1)
    assert sorted(row["threads"] for row in rows) == ["1", "2", "?"]


def test_an_empty_folder_and_a_damaged_results_csv_give_one_line_each(seed_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    damaged = seed_runs["root"] / "B" / "run_1" / "results.csv"
    damaged.write_text("epoch,train_acc,test_acc\n1,0.5,not a number\n")
    status = summarize_runs.main([str(seed_runs["root"]), str(empty), "--no-write"])
    out, err = capsys.readouterr()
    assert status == 0
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert str(empty) in lines[0] or str(empty) in lines[1]
    assert any(str(damaged) in line for line in lines)
    result = summary.summarize(SummaryConfig((seed_runs["root"], empty)))
    groups = group_by_lrs(result)
    assert [run.seed for run in groups["B"].runs] == [0, 2] and len(groups["A"].runs) == 3
    assert "0.1 0.1" in out and "0.05 0.05" in out


def test_nothing_to_summarise_exits_2_with_one_line(tmp_path, capsys):
    assert summarize_runs.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(tmp_path / "missing") in err
    assert not (tmp_path / "missing").exists()


def test_the_committed_legacy_runs_of_four_models_read_back(tmp_path):
    legacy = write_legacy_runs(tmp_path / "legacy_runs")
    result = summary.summarize(SummaryConfig((legacy,)))
    assert result.problems == []
    models = sorted((g.settings["model"], g.settings["alg"]) for g in result.groups)
    assert models == [("CNN", "EP"), ("LCACNN", "EP"), ("MLP", "BPTT"), ("VFCNN", "EP")]
    for group in result.groups:
        (run,) = group.runs
        with open(run.folder / "results.csv", newline="") as f:
            acc = np.array([float(row["test_acc"]) for row in csv.DictReader(f)])
        assert group.statistics(1)["best_test_acc"][0] == pytest.approx(acc.max(), abs=1e-12)


def test_robustness_rows_are_summarised_per_attack_and_epsilon(seed_runs):
    accuracy = {}
    for seed in range(3):
        folder = seed_runs["root"] / "A" / f"run_{seed}"
        rows = []
        for eps in (0.0, 0.1):
            accuracy[seed, eps] = 0.9 - eps * (seed + 1)
            rows.append({"attack": "pgd-linf", "norm": "linf", "epsilon": eps, "severity": 0,
                         "gradient": "bptt", "accuracy": accuracy[seed, eps], "samples": 20,
                         "seconds": 1.0, "T1": 5, "model": f"sha256:{seed}"})  # fmt: skip
        with open(folder / "robustness.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    result = summary.summarize(SummaryConfig((seed_runs["root"],)))
    rows = summary.robustness_rows(result, ddof=1)
    assert len(rows) == 2  # one per epsilon, the three runs' models pooled
    for row in rows:
        eps = float(row["epsilon"])
        values = [accuracy[seed, eps] for seed in range(3)]
        assert row["n"] == 3 and row["attack"] == "pgd-linf"
        assert row["accuracy_mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["accuracy_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)


def test_a_record_saved_now_holds_the_thread_count():
    model = records.build_model(copy.deepcopy(legacy_checkpoint()["model_config"]))
    record = records.model_record(model, 1, 0.5, {})
    assert record["threads"] == torch.get_num_threads()
