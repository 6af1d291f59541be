"""experiment/models.py and the typed record: the model registry, a new model added as one class
(the example of docs/extending.md, run as written), the one configuration a run saves, and run
folders saved before it (tests/legacy_runs, written by tests/legacy_runs/make_legacy_runs.py
with the older code) read back through the one translation."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LEGACY_SOURCE, docs_example, write_legacy_runs

import main_fast
import robustness
from experiment import config, models, records, runs

ROOT = Path(__file__).resolve().parents[1]
LEGACY_RUNS = sorted(p.name for p in LEGACY_SOURCE.iterdir() if p.is_dir())
RUN = ["--task", "DIGITS", "--T1", "3", "--T2", "2", "--betas", "0", "0.5", "--mbs", "512",
       "--seed", "0", "--device", "cpu"]  # fmt: skip
TINY_CNN = [*RUN, "--channels", "2", "3", "--kernels", "3", "3", "--strides", "1", "1",
            "--paddings", "1", "1", "--pools", "mm", "--fc", "10", "--lrs", "0.1", "0.1",
            "0.1"]  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_folder(results: Path) -> Path:
    (found,) = runs.find_runs(results)
    return found


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_every_field_of_every_model_is_a_flag_of_main_fast():
    parser_flags = {action.dest for action in main_fast.build_parser()._actions}
    for name, cls in models.MODELS.items():
        fields = {field.name for field in dataclasses.fields(cls)}
        assert fields <= parser_flags, (name, fields - parser_flags)
        assert cls.NAME == name


def test_a_model_config_round_trips_through_its_plain_dict():
    argv = ["--model", "LCACNN", "--dict_training", "learn", "--lca_feats", "4", "--channels",
            "4", "8"]  # fmt: skip
    flags = vars(main_fast.parse_args(argv)[0])
    model = models.LCACNN.from_flags(flags)
    plain = model.plain()
    assert plain["name"] == "LCACNN" and plain["channels"] == [4, 8]
    assert models.from_plain(plain) == model


COMMON_COLUMNS = ["epoch", "train_acc", "test_acc", "lr", "seconds"]
SMALL = {
    "CNN": ["--model", "CNN", *TINY_CNN],
    "VFCNN": ["--model", "VFCNN", *TINY_CNN],
    "MLP": ["--model", "MLP", *RUN, "--archi", "64", "6", "10", "--lrs", "0.1", "0.1"],
    "LCACNN --vf": ["--model", "LCACNN", "--vf", *RUN, "--dict_training", "learn",
                    "--lca_feats", "2", "--lca_ksize", "3", "--lca_iters", "3", "--channels", "2",
                    "3", "--kernels", "3", "--strides", "1", "--paddings", "1", "--pools", "im",
                    "--fc", "10", "--lrs", "0.1", "0.1"],
    "LCACNN": ["--model", "LCACNN", *RUN, "--dict_training", "learn", "--lca_feats", "2",
               "--lca_ksize", "3", "--lca_iters", "3", "--channels", "2", "3", "--kernels", "3",
               "--strides", "1", "--paddings", "1", "--pools", "im", "--fc", "10", "--lrs",
               "0.1", "0.1"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_run_writes_the_results_columns_and_final_files_its_model_declares(name, tmp_path):
    argv = [*SMALL[name], "--epochs", "1", "--save", "--results-dir", str(tmp_path)]
    assert main_fast.main(argv) == 0
    run_dir = run_folder(tmp_path)
    columns = list(runs.read_results(run_dir)[0])
    model = records.run_model(load(run_dir / "final_model.pt"))
    cls = type(model)
    extra = [c for c in columns if c not in COMMON_COLUMNS]
    patterns = [re.escape(c).replace("<k>", r"\d+") for c in model.results_columns()]
    assert all(any(re.fullmatch(p, c) for p in patterns) for c in extra), extra
    assert all(any(re.fullmatch(p, c) for c in extra) for p in patterns), extra
    assert all((run_dir / f).is_file() for f in cls.FINAL_FILES)
    assert runs.is_finished(run_dir, 1, cls.FINAL_FILES)


# --------------------------------------------------------------------------------------------
# A new model is one class: the example of docs/extending.md, as written there
# --------------------------------------------------------------------------------------------


@pytest.fixture
def wide_cnn():
    """The docs' example class, registered for the test and removed after it."""
    try:
        with docs_example("class WideCNN", "extending_example") as module:
            yield module.WideCNN
    finally:
        models.MODELS.pop("WideCNN", None)


def test_the_documented_model_trains_resumes_and_evaluates(wide_cnn, tmp_path, capsys):
    argv = ["--model", "WideCNN", "--width", "3", *TINY_CNN, "--epochs", "1", "--save"]
    assert main_fast.main([*argv, "--results-dir", str(tmp_path)]) == 0
    run_dir = run_folder(tmp_path)
    assert run_dir.relative_to(tmp_path).parts[:4] == ("DIGITS", "EP", "WideCNN", "none")
    record = load(run_dir / "final_model.pt")
    assert record["config"]["model"]["name"] == "WideCNN"
    assert record["config"]["model"]["width"] == 3
    conv_weights = [v for k, v in record["model_state"].items() if v.dim() == 4]
    assert [w.shape[0] for w in conv_weights] == [6, 9]  # 3 x (2, 3) output channels

    assert main_fast.main(["--save", "--load-path", str(run_dir), "--epochs", "2"]) == 0
    assert load(run_dir / "checkpoint.pt")["epoch"] == 2
    capsys.readouterr()
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0
    assert "test_acc" in capsys.readouterr().out


def test_the_documented_model_checks_its_own_flag(wide_cnn, capsys):
    assert main_fast.main(["--model", "WideCNN", "--width", "0", *TINY_CNN]) == 2
    assert "--width must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# One typed record
# --------------------------------------------------------------------------------------------


def test_a_new_run_saves_one_typed_configuration(tmp_path):
    argv = ["--model", "CNN", *TINY_CNN, "--epochs", "1", "--save", "--results-dir", str(tmp_path)]
    assert main_fast.main(argv) == 0
    run_dir = run_folder(tmp_path)
    typed = main_fast.check_args(vars(main_fast.parse_args(argv)[0]))
    for name in ("model.pt", "final_model.pt", "checkpoint.pt"):
        record = load(run_dir / name)
        assert "args" not in record and "model_config" not in record
        assert record["config"] == typed.plain()
        assert record["config"]["version"] == config.CONFIG_VERSION
    # task and seed live in one section each
    plain = load(run_dir / "model.pt")["config"]
    holders = {name: [s for s in ("dynamics", "optim", "data", "run", "model") if name in plain[s]]
               for name in ("task", "seed")}  # fmt: skip
    assert holders == {"task": ["data"], "seed": ["run"]}


# --------------------------------------------------------------------------------------------
# Runs saved before the typed record
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """The legacy run folders, their records written back as the older code saved them."""
    return write_legacy_runs(tmp_path_factory.mktemp("legacy_runs"))


@pytest.mark.parametrize("name", LEGACY_RUNS)
def test_a_legacy_record_translates_to_the_flags_it_was_saved_with(name, legacy):
    record = load(legacy / name / "final_model.pt")
    assert records.is_legacy(record) and "args" in record and "model_config" in record
    args = record["args"]
    plain = records.run_config(record)
    assert plain["model"]["name"] == args["model"]
    for section in ("dynamics", "optim", "data", "run"):
        for field, value in plain[section].items():
            assert value == args.get(field, records.LEGACY_DEFAULTS.get(field)), (section, field)
    for field, value in plain["model"].items():
        if field != "name":
            assert value == args[field], field
    # the typed configuration describes the very network the record was saved with
    model = models.from_plain(plain["model"])
    assert model.network_config(plain["data"]["task"]) == record["model_config"]


@pytest.mark.parametrize("name", LEGACY_RUNS)
def test_a_legacy_run_resumes_and_evaluates(name, legacy, tmp_path, capsys):
    run_dir = tmp_path / name
    shutil.copytree(legacy / name, run_dir)
    before = load(run_dir / "checkpoint.pt")
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    test_acc = float(line.rsplit("test_acc ", 1)[1])
    assert test_acc == pytest.approx(load(run_dir / "model.pt")["test_acc"], abs=5e-5)  # 4 digits

    assert main_fast.main(["--save", "--load-path", str(run_dir), "--epochs", "2"]) == 0
    after = load(run_dir / "checkpoint.pt")
    assert after["epoch"] == 2 and not records.is_legacy(after)
    assert records.network_config(after) == before["model_config"]
    assert records.run_flags(after)["lrs"] == before["args"]["lrs"]
    assert len(runs.read_results(run_dir)) == 2


def test_robustness_reads_a_legacy_run(legacy, tmp_path, capsys):
    run_dir = tmp_path / "cnn"
    shutil.copytree(legacy / "cnn_ep", run_dir)
    argv = ["--load-path", str(run_dir), "--device", "cpu", "--n-samples", "8", "--attacks",
            "pgd-linf", "--eps", "0", "--steps", "1", "--gradients", "bptt"]  # fmt: skip
    assert robustness.main(argv) == 0
    assert "T1 4" in capsys.readouterr().out  # the run's own T1, read from its args
