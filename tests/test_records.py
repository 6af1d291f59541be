"""experiment/records.py: RNG states and dictionary files round-trip; damaged or foreign
dictionary files are refused naming the file and the fix; damaged checkpoints are refused before
anything is written; a run whose dictionary folder moved still evaluates and resumes."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DIGITS_CNN,
    LCACNN,
    one_error_line,
    run_dir_of,
    run_failing,
)

import cifar_dictlearning
import main_fast
from experiment import records, storage
from experiment.records import (
    DictionaryError,
    load_dictionary,
    load_subset_indices,
    save_dictionary,
)
from lca import LCAConv2D

# ----------------------------------------------------------------------------------- RNG state


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


# -------------------------------------------------------------------------------- dictionaries


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


@pytest.mark.slow
def test_run_with_a_moved_dictionary_folder_evaluates_and_resumes(tmp_path, capsys):
    dictionary = tmp_path / "dictionary"
    learn = ["--task", "DIGITS", "--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1",
             "--epochs", "1", "--lca-iters", "5", "--subset-fraction", "0.3", "--max-batches", "1",
             "--out-dir", str(dictionary)]  # fmt: skip
    assert cifar_dictlearning.main(learn) == 0
    results = tmp_path / "results"
    argv = LCACNN + ["--dict_training", "pretrained", "--dict-path", str(dictionary), "--save"]
    assert main_fast.main([*argv, "--results-dir", str(results)]) == 0
    run_dir = run_dir_of(results)
    dictionary.rename(tmp_path / "moved")
    capsys.readouterr()
    for load_path in (run_dir, run_dir / "checkpoint.pt"):
        assert main_fast.main(["--todo", "evaluate", "--load-path", str(load_path)]) == 0
    out = capsys.readouterr().out
    assert "evaluate model.pt (epoch 1" in out and "evaluate checkpoint.pt (epoch 1" in out
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0


# ------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("finished")
    assert main_fast.main(DIGITS_CNN + ["--save", "--results-dir", str(results)]) == 0
    return run_dir_of(results)


def rng_without_torch(checkpoint):
    checkpoint["rng_state"]["global"]["torch"] = torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c["config"]["model"].update(name="RNN"), "config does not name one of"),
        (lambda c: c["config"]["model"].pop("channels"), "config does not describe a model"),
        (lambda c: c["config"].pop("optim"), "config lacks one of its sections"),
        (lambda c: c["config"].update(version=1), "model_config does not name one of"),
        (lambda c: c.update(epoch="1"), "epoch is '1', not a number of epochs"),
        (lambda c: c.update(epoch=0.5), "epoch is 0.5, not a number of epochs"),
        (lambda c: c.update(rng_state={}), "rng_state is not"),
        (rng_without_torch, "rng_state lacks the Python, numpy or torch generator states"),
        (lambda c: c["rng_state"]["global"]["numpy"].update(kind="MT0"), "RNG state is damaged"),
    ],
)
def test_damaged_checkpoint_is_refused_before_anything_is_written(
    finished_run, tmp_path, capsys, damage, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"}
    line = one_error_line(run_failing(["--load-path", str(run_dir), "--epochs", "2"], capsys))
    assert message in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"} == before
