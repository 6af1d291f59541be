"""Tests of the dictionary-learning script on the bundled DIGITS data."""

import csv

import pytest
import torch

import cifar_dictlearning
from records import load_dictionary, load_subset_indices

SMALL_RUN = [
    "--task", "DIGITS", "--features", "16", "--kernel-size", "3", "--stride", "1",
    "--lca-iters", "30", "--tau", "5", "--lambda", "0.2", "--lambda-every", "0",
    "--eta", "0.5", "--batch-size", "64", "--max-batches", "3", "--epochs", "3",
    "--device", "cpu", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("digits_dict")
    args = cifar_dictlearning.build_parser().parse_args(SMALL_RUN + ["--out-dir", str(out_dir)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only pay for thread synchronisation
    try:
        lca = cifar_dictlearning.run(args)
    finally:
        torch.set_num_threads(threads)
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
