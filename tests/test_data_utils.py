"""data_utils.py, which draws every figure: the plots of a run's results.csv columns, the
per-image rescaling, the dictionary grid, and the activity, dictionary and reconstruction plots,
saved as PNG files the way a run saves them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import data_utils as du
from experiment import runs, storage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
