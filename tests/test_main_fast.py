"""End-to-end tests of main_fast.py: the seed README's commands on tiny CIFAR-10 files, the
results folder they leave, exact resume, evaluation, MNIST / DIGITS runs and the GDU check."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from fake_datasets import write_fake_cifar10, write_fake_mnist
from helpers import DIGITS_CNN_BATCHED, ROOT, SEED_COMMANDS, load, only_run_dir, read_csv, seed_argv

import cifar_dictlearning
import main_fast
from experiment import records
from experiment.records import save_dictionary
from lca import LCAConv2D

pytestmark = pytest.mark.filterwarnings("ignore:.*official checksums")

# Appended to a seed command: argparse keeps the last value of a repeated flag.
TINY = [
    "--epochs",
    "1",
    "--T1",
    "3",
    "--T2",
    "2",
    "--lca_iters",
    "5",
    "--lca_tau",
    "2",
    "--mbs",
    "5",
]
N_TRAIN, N_TEST, N_DICT = 10, 4, 3
ITEM3_FILES = {
    "hyperparameters.txt",
    "results.csv",
    "accuracy.png",
    "neural_activity.png",
    "checkpoint.pt",
    "model.pt",
    "final_model.pt",
}
LCA_FILES = {"sparsity.png", "recon_error.png", "reconstructions.png"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    """Fake CIFAR-10 files (10 train, 4 test images) and a 64x3x9x9 dictionary learnt on the
    first 3 training images, as the seed's LCACNN commands expect."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root / "data", n_train_per_batch=N_TRAIN // 5, n_test=N_TEST)
    torch.manual_seed(0)
    dict_path = root / "dictionaries" / "dictionary.pt"
    save_dictionary(str(dict_path), LCAConv2D(64, 3, kernel_size=9, stride=2), torch.arange(N_DICT))
    return {"data": root / "data", "dict": dict_path}


def paths(cifar: dict, results: Path) -> list[str]:
    return ["--data-dir", str(cifar["data"]), "--results-dir", str(results),
            "--dict-path", str(cifar["dict"])]  # fmt: skip


def rebuilt(record: dict) -> torch.nn.Module:
    """The model of a saved file, rebuilt from its configuration (strict state-dict load)."""
    model = records.build_model(records.network_config(record))
    model.load_state_dict(record["model_state"])
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_seed_command_writes_the_results_folder(name, cifar, tmp_path, capsys):
    results = tmp_path / "results"
    argv = seed_argv(name) + TINY + paths(cifar, results)
    assert main_fast.main(argv) == 0
    out, err = capsys.readouterr()
    run_dir = only_run_dir(results)
    model_name = "CNN" if name == "rcnn" else "LCACNN"
    mode = "none" if name == "rcnn" else name
    assert run_dir.relative_to(results).parts[:4] == ("CIFAR10", "EP", model_name, mode)

    written = {p.name for p in run_dir.iterdir()}
    expected = ITEM3_FILES | (LCA_FILES if name != "rcnn" else set())
    assert expected <= written
    if name == "pretrained":
        assert "dictionary.png" in written
    elif name != "rcnn":
        assert {"dictionary_epoch0.png", "dictionary_epoch1.png"} <= written
    assert not [f for f in written if f.endswith(".tmp")]

    lines = (run_dir / "hyperparameters.txt").read_text().splitlines()
    assert shlex.split(lines[0]) == ["python", "main_fast.py", *argv]
    assert "epochs: 1" in lines and "T1: 3" in lines

    (row,) = read_csv(run_dir)
    assert row["epoch"] == "1" and float(row["lr"]) == 0.25
    n_ep_train = N_TRAIN - N_DICT if name in ("pretrained", "finetune") else N_TRAIN
    train_acc, test_acc = float(row["train_acc"]), float(row["test_acc"])
    assert (train_acc * n_ep_train).is_integer() and (test_acc * N_TEST).is_integer()
    if name != "rcnn":
        assert 0 < float(row["lca_frac_active"]) < 1 and float(row["lca_recon_error"]) > 0

    checkpoint = load(run_dir / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["history"][0]["test_acc"] == test_acc
    assert checkpoint["scheduler_state"] is not None  # --lr-decay
    for filename in ("model.pt", "final_model.pt"):
        record = load(run_dir / filename)
        assert record["epoch"] == 1 and record["test_acc"] == test_acc
        rebuilt(record)

    if name == "rcnn":
        return
    # the seed's LCACNN commands carry extra list values: each is dropped with a warning
    for flag in ("--kernels", "--strides", "--paddings", "--pools", "--lrs", "--wds"):
        assert re.search(f"warning: {flag}: .*ignoring", err), flag
    assert "ignoring mm" in err and "ignoring 0.08" in err
    final = rebuilt(load(run_dir / "final_model.pt"))
    learnt = load(cifar["dict"])["weights"]
    if name == "learn":
        assert f"all {N_TRAIN} images" in out
    else:
        assert f"EP trains on {N_TRAIN - N_DICT} of {N_TRAIN} training images" in out
        moved = (final.lca.weights - learnt).abs().max().item()
        assert (moved < 1e-6) == (name == "pretrained")


@pytest.mark.slow
def test_resume_continues_exactly(cifar, tmp_path, capsys):
    """2 epochs straight == 1 epoch, then --load-path to 2 epochs: same weights, same rows."""
    small = ["--lca_feats", "8", "--channels", "8", "16", "32", "--random-sign"]
    base = seed_argv("learn") + TINY + small
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main_fast.main(base + paths(cifar, straight) + ["--epochs", "2"]) == 0
    assert main_fast.main(base + paths(cifar, split)) == 0
    run_dir = only_run_dir(split)
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    capsys.readouterr()

    a = load(only_run_dir(straight) / "final_model.pt")["model_state"]
    b = load(run_dir / "final_model.pt")["model_state"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = read_csv(only_run_dir(straight)), read_csv(run_dir)
    assert [r["epoch"] for r in rows_b] == ["1", "2"]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        row_a.pop("seconds"), row_b.pop("seconds")
        assert row_a == row_b
    assert load(run_dir / "checkpoint.pt")["epoch"] == 2
    assert (
        "resumed: python main_fast.py --load-path" in (run_dir / "hyperparameters.txt").read_text()
    )


DIGITS_LCACNN = [
    "--model", "LCACNN", "--task", "DIGITS", "--channels", "4", "8", "--kernels", "3",
    "--strides", "1", "--paddings", "1", "--pools", "im", "--fc", "10", "--lrs", "0.1", "0.05",
    "--act", "my_hard_sig", "--T1", "5", "--T2", "2", "--betas", "0.0", "0.5", "--thirdphase",
    "--loss", "cel", "--softmax", "--mbs", "64", "--mmt", "0.9", "--seed", "0",
    "--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1", "--lca_iters", "10",
    "--lca_lambda", "0.1", "--dict_training", "pretrained", "--save",
]  # fmt: skip


def test_resume_ignores_retyped_architecture(tmp_path, capsys):
    assert main_fast.main(DIGITS_CNN_BATCHED + ["--save", "--results-dir", str(tmp_path)]) == 0
    run_dir = only_run_dir(tmp_path)
    resume = ["--load-path", str(run_dir), "--epochs", "2", "--channels", "8", "--T1", "3"]
    assert main_fast.main(resume) == 0
    err = capsys.readouterr().err
    assert "--channels ignored" in err and "--T1" not in err  # T1 3 equals the saved value
    config = records.network_config(load(run_dir / "final_model.pt"))
    assert config["kwargs"]["channels"] == [4]
    assert len(read_csv(run_dir)) == 2


def test_flags_become_frozen_configurations_and_the_namespace_is_left_alone():
    argv = [*DIGITS_CNN_BATCHED, "--lrs", "0.1", "0.05", "0.02", "--task", "digits"]
    args, _ = main_fast.parse_args(argv)
    typed = dict(vars(args))
    settings = main_fast.check_args(vars(args))
    assert vars(args) == typed  # the extra rate and the spelling of the task stay as typed
    assert settings.optim.lrs == (0.1, 0.05) and settings.flags["lrs"] == [0.1, 0.05]
    assert settings.data.task == "DIGITS" and not hasattr(settings.model, "task")
    assert (settings.dynamics.T1, settings.dynamics.T2, settings.data.mbs) == (3, 2, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.optim.lrs = (1.0, 1.0)
    with pytest.raises(TypeError):
        settings.flags["lrs"] = [1.0, 1.0]
    assert settings.network_config() == {
        "model": "CNN",
        "kwargs": {"in_size": 8, "in_channels": 1, "channels": [4], "kernels": [3],
                   "strides": [1], "paddings": [1], "pools": "m", "fc": [10],
                   "activation": "mysig", "softmax": False, "loss": "mse", "scale": None},
    }  # fmt: skip


def test_records_hold_the_configurations_as_plain_dicts(tmp_path, capsys):
    assert main_fast.main(DIGITS_CNN_BATCHED + ["--save", "--results-dir", str(tmp_path)]) == 0
    run_dir = only_run_dir(tmp_path)
    args, _ = main_fast.parse_args([*DIGITS_CNN_BATCHED, "--save", "--results-dir", str(tmp_path)])
    settings = main_fast.check_args(vars(args))
    for name in ("checkpoint.pt", "model.pt", "final_model.pt"):
        record = load(run_dir / name)  # weights_only=True: plain containers only
        assert record["config"] == settings.plain() and "args" not in record
        assert record["config"]["optim"]["lrs"] == [0.1, 0.1]
        assert record["config"]["dynamics"]["betas"] == [0.0, 0.01]


def test_digits_pretrained_then_evaluate_reproduces_test_accuracy(tmp_path, capsys):
    """DIGITS end to end: cifar_dictlearning.py's dictionary, EP training, --todo evaluate."""
    dict_dir = tmp_path / "dict"
    dictlearning = ["--task", "DIGITS", "--out-dir", str(dict_dir), "--features", "4",
                    "--kernel-size", "3", "--stride", "1", "--epochs", "1", "--lca-iters", "10",
                    "--batch-size", "64", "--subset-fraction", "0.8"]  # fmt: skip
    assert cifar_dictlearning.main(dictlearning) == 0
    results = tmp_path / "results"
    train = DIGITS_LCACNN + ["--epochs", "1", "--results-dir", str(results),
                             "--dict-path", str(dict_dir / "dictionary.pt")]  # fmt: skip
    assert main_fast.main(train) == 0
    run_dir = only_run_dir(results)
    assert "EP trains on 287 of 1437 training images" in capsys.readouterr().out
    saved = load(run_dir / "model.pt")
    assert saved["test_acc"] == max(float(r["test_acc"]) for r in read_csv(run_dir))

    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0
    out = capsys.readouterr().out
    reported = re.search(r"train_acc (\S+) test_acc (\S+)", out)
    assert float(reported.group(2)) == round(saved["test_acc"], 4)
    assert 0 <= float(reported.group(1)) <= 1
    assert reported.group(0) in (run_dir / "hyperparameters.txt").read_text().splitlines()[-1]


@pytest.mark.parametrize(
    "architecture",
    [
        ["--model", "CNN", "--channels", "4", "--kernels", "5", "--strides", "1", "--paddings",
         "0", "--pools", "m", "--fc", "10", "--lrs", "0.05", "0.05"],
        ["--model", "MLP", "--archi", "784", "16", "10", "--lrs", "0.05", "0.05"],
    ],
    ids=["CNN", "MLP"],
)  # fmt: skip
def test_mnist_from_idx_files(architecture, tmp_path, capsys):
    written = write_fake_mnist(tmp_path / "data", n_train=20, n_test=10)
    argv = architecture + ["--task", "MNIST", "--data-dir", str(tmp_path / "data"), "--results-dir",
                           str(tmp_path / "results"), "--T1", "3", "--T2", "2", "--mbs", "8",
                           "--epochs", "2", "--save", "--seed", "0"]  # fmt: skip
    assert main_fast.main(argv) == 0
    rows = read_csv(only_run_dir(tmp_path / "results"))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:
        assert (float(row["train_acc"]) * len(written["train_labels"])).is_integer()
        assert (float(row["test_acc"]) * len(written["test_labels"])).is_integer()


def test_gducheck_prints_a_table_and_saves_the_plot(tmp_path, capsys):
    argv = ["--todo", "gducheck", "--model", "MLP", "--task", "DIGITS", "--archi", "64", "16",
            "10", "--lrs", "0.1", "0.1", "--T1", "60", "--T2", "6", "--betas", "0.0", "0.01",
            "--mbs", "16", "--seed", "0", "--save", "--results-dir", str(tmp_path)]  # fmt: skip
    assert main_fast.main(argv) == 0
    out = capsys.readouterr().out
    table = dict(re.findall(r"^(synapses\.\d\.\w+)\s+(\S+)\s+\S+$", out, re.M))
    assert set(table) == {f"synapses.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    # a converged free phase and a small beta: EP's updates track BPTT's gradients
    assert all(float(rmse) < 0.1 for rmse in table.values()), table
    assert (only_run_dir(tmp_path) / "gdu.png").stat().st_size > 0


SCRIPTS = {
    "rcnn": "rcnn_cifar10.sh",
    "pretrained": "lcacnn_pretrained.sh",
    "finetune": "lcacnn_finetune.sh",
    "learn": "lcacnn_learn.sh",
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_run_scripts_hold_the_seed_commands(name):
    script = (ROOT / "run" / SCRIPTS[name]).read_text()
    (command,) = [line for line in script.splitlines() if line.startswith("python main_fast.py")]
    assert command.startswith(SEED_COMMANDS[name])


@pytest.mark.parametrize("name", ["pretrained", "finetune"])
def test_run_scripts_need_a_dictionary(name, tmp_path):
    env = {**os.environ, "DICT_PATH": str(tmp_path / "dictionary.pt")}
    script = ROOT / "run" / SCRIPTS[name]
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"no dictionary at {tmp_path / 'dictionary.pt'}" in result.stderr
    assert "run/cifar_dictlearning.sh" in result.stderr


def test_every_multiword_flag_has_dash_and_underscore_spellings():
    dashed = ["--data-aug", "--lr-decay", "--random-sign", "--lca-feats", "--scale-feedback",
              "--dict-training", "--load-path", "--num-workers", "--results-dir"]  # fmt: skip
    values = {"--lca-feats": ["8"], "--scale-feedback": ["0.5"], "--dict-training": ["learn"],
              "--load-path": ["x"], "--num-workers": ["2"], "--results-dir": ["r"]}  # fmt: skip
    for spelling in (str.strip, lambda flag: "--" + flag[2:].replace("-", "_")):
        argv = [part for flag in dashed for part in (spelling(flag), *values.get(flag, []))]
        args, explicit = main_fast.parse_args(argv)
        assert len(explicit) == len(dashed)
        assert (args.data_aug, args.lca_feats, args.scale_feedback) == (True, 8, 0.5)
        assert (args.dict_training, args.load_path, args.num_workers) == ("learn", "x", 2)
