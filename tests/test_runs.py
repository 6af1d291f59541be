"""Tests of run folders (runs), text and CSV logs, atomic saves and safe loading (storage), RNG
state and dictionary files (records); and of the figures of data_utils, written the way a run
writes them."""

from __future__ import annotations

import datetime
import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import CodeRunningPickle

import data_utils as du
from experiment import records, runs, storage
from experiment.entry import UsageError
from experiment.records import (
    DictionaryError,
    load_dictionary,
    load_subset_indices,
    save_dictionary,
)
from lca import LCAConv2D

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- runs, logs


def test_make_run_dir_layout_and_numbering(tmp_path):
    day = datetime.date(2024, 5, 6)
    first = runs.make_run_dir(tmp_path, "CIFAR10", "EP", "LCACNN", "learn", date=day)
    assert first == tmp_path / "CIFAR10" / "EP" / "LCACNN" / "learn" / "2024-05-06" / "run_1"
    assert first.is_dir()
    assert runs.make_run_dir(tmp_path, "CIFAR10", "EP", "LCACNN", "learn", date=day).name == "run_2"
    (first.parent / "run_7").mkdir()
    (first.parent / "notes_9").mkdir()
    assert runs.make_run_dir(tmp_path, "CIFAR10", "EP", "LCACNN", "learn", date=day).name == "run_8"
    none = runs.make_run_dir(tmp_path, "MNIST", "EP", "CNN", None)
    assert none.parent.parent.name == "none"
    assert none.parent.name == datetime.date.today().isoformat() and none.name == "run_1"


def test_write_hyperparameters_and_append_text(tmp_path):
    argv = ["main_fast.py", "--model", "CNN", "--note", "two words", "--lrs", "0.1", "0.05"]
    runs.write_hyperparameters(
        tmp_path, argv, {"model": "CNN", "note": "two words", "lrs": [0.1, 0.05]}
    )
    lines = (tmp_path / "hyperparameters.txt").read_text().splitlines()
    assert lines[0] == "main_fast.py --model CNN --note 'two words' --lrs 0.1 0.05"
    assert shlex.split(lines[0]) == argv
    assert lines[1:] == ["model: CNN", "note: two words", "lrs: [0.1, 0.05]"]

    storage.append_text(tmp_path, "log.txt", "epoch 1")
    storage.append_text(tmp_path, "log.txt", "epoch 2\n")
    assert (tmp_path / "log.txt").read_text() == "epoch 1\nepoch 2\n"


def test_results_csv_round_trip(tmp_path):
    runs.append_results_row(
        tmp_path,
        {"epoch": 1, "train_acc": 0.1234567890123, "test_acc": torch.tensor(0.5), "lr": 0.1},
    )
    runs.append_results_row(
        tmp_path, {"lr": 0.05, "epoch": 2, "test_acc": 0.75, "train_acc": np.float32(0.25)}
    )
    text = (tmp_path / "results.csv").read_text().splitlines()
    assert text[0] == "epoch,train_acc,test_acc,lr" and len(text) == 3
    rows = runs.read_results(tmp_path)
    assert rows == [
        {"epoch": 1.0, "train_acc": 0.1234567890123, "test_acc": 0.5, "lr": 0.1},
        {"epoch": 2.0, "train_acc": 0.25, "test_acc": 0.75, "lr": 0.05},
    ]
    with pytest.raises(ValueError, match="columns"):
        runs.append_results_row(tmp_path, {"epoch": 3, "train_acc": 0.3})
    # A row cut short by a crash is dropped, the complete ones are kept.
    with open(tmp_path / "results.csv", "a") as f:
        f.write("3,0.5")
    assert len(runs.read_results(tmp_path)) == 2
    with pytest.raises(UsageError, match="not found"):
        runs.read_results(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------- file I/O


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_round_trip_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    storage.atomic_save({"w": torch.arange(4.0), "epoch": 3}, path)
    assert os.listdir(path.parent) == ["model.pt"]
    loaded = storage.safe_load(path, "checkpoint")
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))

    with pytest.raises(RuntimeError, match="cannot pickle"):
        storage.atomic_save({"w": torch.ones(2), "bad": _FailsToPickle()}, path)
    assert os.listdir(path.parent) == ["model.pt"]
    assert torch.equal(storage.safe_load(path, "checkpoint")["w"], torch.arange(4.0))


def test_safe_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(UsageError, match="checkpoint not found") as err:
        storage.safe_load(missing, "checkpoint")
    assert str(missing) in str(err.value)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UsageError, match="corrupt or not a dictionary") as err:
        storage.safe_load(corrupt, "dictionary")
    assert str(corrupt) in str(err.value)

    # A pickled object of an arbitrary class is refused rather than executed.
    with_object = tmp_path / "object.pt"
    torch.save({"obj": CodeRunningPickle(str(tmp_path / "code_ran"))}, with_object)
    with pytest.raises(UsageError, match="not a checkpoint"):
        storage.safe_load(with_object, "checkpoint")
    assert not (tmp_path / "code_ran").exists()

    with pytest.raises(UsageError, match="folder"):
        storage.safe_load(tmp_path, "checkpoint")


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second normal in Python's generator
    np.random.standard_normal(1)  # and in numpy's
    storage.atomic_save(records.get_rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    state = torch.load(tmp_path / "rng.pt", map_location="cpu", weights_only=True)
    records.set_rng_state(state)
    assert _draws() == expected
    assert _draws() != expected


# ------------------------------------------------------------------------------------- dictionaries


def test_save_and_load_round_trip(tmp_path):
    lca = LCAConv2D(6, 3, kernel_size=5, stride=2, lambda_=0.3, tau=50, eta=0.02, lca_iters=7)
    path = tmp_path / "dicts" / "dictionary.pt"
    indices = torch.tensor([5, 1, 9], dtype=torch.int64)
    save_dictionary(str(path), lca, subset_indices=indices)

    weights, config = load_dictionary(str(path), expected_shape=(6, 3, 5, 5))
    assert torch.equal(weights, lca.weights.detach())
    assert config == {
        "out_neurons": 6, "in_neurons": 3, "kernel_size": 5, "stride": 2, "lambda_": 0.3,
        "tau": 50.0, "eta": 0.02, "lca_iters": 7, "pad": "same", "nonneg": True,
        "transfer_func": "soft_threshold", "input_zero_mean": True, "input_unit_var": True,
    }  # fmt: skip
    assert torch.equal(load_subset_indices(str(path)), indices)
    assert sorted(os.listdir(path.parent)) == ["dictionary.pt", "subset_indices.pt"]


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(DictionaryError, match="run cifar_dictlearning.py first"):
        load_dictionary(str(missing))
    with pytest.raises(DictionaryError, match="subset_indices.pt"):
        load_subset_indices(str(missing))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(DictionaryError, match="garbage.pt"):
        load_dictionary(str(garbage))

    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(2, 1, 3, 3), bare)
    with pytest.raises(DictionaryError, match="does not hold a dictionary record"):
        load_dictionary(str(bare))

    lca = LCAConv2D(4, 1, kernel_size=3)
    good = tmp_path / "good.pt"
    save_dictionary(str(good), lca)
    with pytest.raises(
        DictionaryError, match=r"expected shape \(64, 3, 9, 9\), found \(4, 1, 3, 3\)"
    ):
        load_dictionary(str(good), expected_shape=(64, 3, 9, 9))


class _NotAllowed:
    pass


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"weights": _NotAllowed(), "config": {}}, path)
    with pytest.raises(DictionaryError, match="could not be read"):
        load_dictionary(str(path))


# ------------------------------------------------------------------------------------- figures


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_plot_metrics_writes_the_plots_for_present_columns(tmp_path):
    lca_run, plain_run = tmp_path / "lca", tmp_path / "plain"
    lca_run.mkdir()
    plain_run.mkdir()
    for epoch in range(1, 4):
        acc = {"epoch": epoch, "train_acc": 0.2 * epoch, "test_acc": 0.15 * epoch, "lr": 0.1}
        lca = {"lca_frac_active": 0.1 / epoch, "lca_recon_error": 1.0 / epoch}
        runs.append_results_row(lca_run, {**acc, **lca})
        runs.append_results_row(plain_run, acc)
    figures = du.plot_metrics(runs.read_results(lca_run))
    assert list(figures) == ["accuracy.png", "sparsity.png", "recon_error.png"]
    for name, fig in figures.items():
        storage.save_figure(fig, lca_run / name)
        _assert_png(lca_run / name)
    assert list(du.plot_metrics(runs.read_results(plain_run))) == ["accuracy.png"]
    assert du.plot_metrics([]) == {}
    assert sorted(f for f in os.listdir(lca_run) if f.startswith(".")) == []


def test_rescale_each_image_independently():
    images = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 5.0]]], [[[-2.0, 2.0]]]])
    assert du._rescale_each(images).flatten().tolist() == [0.0, 1.0, 0.5, 0.5, 0.0, 1.0]


def test_dictionary_grid_layout():
    weights = torch.randn(16, 3, 5, 5)
    grid = du.dictionary_grid(weights)
    # 4 x 4 tiles of 5 px with 1 px borders: 4 * (5 + 1) + 1 = 25
    assert grid.shape == (25, 25, 3)
    assert grid.min() >= 0 and grid.max() <= 1
    # each feature is scaled on its own: every tile spans [0, 1]
    tile = grid[1:6, 1:6]
    assert tile.min() == 0 and tile.max() == 1
    # 10 features: ceil(sqrt(10)) = 4 per row, 3 rows; gray features become RGB
    assert du.dictionary_grid(torch.randn(10, 1, 3, 3)).shape == (3 * 4 + 1, 4 * 4 + 1, 3)


def test_activity_dictionary_and_reconstruction_plots(tmp_path):
    torch.manual_seed(0)
    neurons = [torch.rand(4, 8, 6, 6), torch.rand(4, 10)]
    storage.save_figure(du.plot_neural_activity(neurons, names=["conv", "fc"]), tmp_path / "a.png")
    _assert_png(tmp_path / "a.png")
    storage.save_figure(du.plot_neural_activity(neurons), tmp_path / "activity_default.png")
    _assert_png(tmp_path / "activity_default.png")

    storage.save_figure(du.plot_dictionary(torch.randn(16, 3, 9, 9), "D"), tmp_path / "rgb.png")
    storage.save_figure(du.plot_dictionary(torch.randn(10, 1, 5, 5)), tmp_path / "gray.png")
    _assert_png(tmp_path / "rgb.png")
    _assert_png(tmp_path / "gray.png")
    with pytest.raises(ValueError):
        du.plot_dictionary(torch.randn(4, 64, 3, 3))

    x = torch.rand(5, 3, 32, 32)
    recon = du.plot_reconstructions(x, {"before": x * 0.5, "after": x + 0.1})
    storage.save_figure(recon, tmp_path / "recon.png")
    _assert_png(tmp_path / "recon.png")
    with pytest.raises(ValueError, match="before"):
        du.plot_reconstructions(x, {"before": torch.rand(5, 1, 32, 32)})
