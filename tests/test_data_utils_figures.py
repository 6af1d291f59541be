"""The figures runs save show what the runs saved, read back from the figures themselves.

Tiny runs on the bundled DIGITS (a CNN, a VFCNN, an LCACNN finetuning a dictionary that
``cifar_dictlearning.py`` learns first) train once each; every figure they save is captured
as it is handed to ``storage.save_figure``, and its plotted data is read back from its axes
(lines, bars, images) and compared with the run's files:

- curve figures (accuracy, sparsity, reconstruction error, dictionary drift, angles): each
  line's x and y, exactly, against ``results.csv`` (every saved version against the rows
  written by then), one line per expected column and no other; ``dictlearning_curves.png``
  against ``dictlearning.csv``, its dotted lines against the epochs where lambda rose;
- dictionary images against the dictionaries in ``dictionary.pt``, ``model.pt`` and
  ``final_model.pt``, tiled and rescaled here with numpy as ``data_utils.dictionary_grid``
  documents;
- neural-activity histograms: bar heights against ``np.histogram`` (50 bins) of the free states
  of the probe batch, settled here by the model rebuilt from ``final_model.pt``;
- reconstructions against the LCA of the probe images with the saved initial and final
  dictionaries (``lca.LCAConv2D`` with the saved weights, ``D a`` by a transposed convolution);
- settling: the energy gap is drawn down to the float resolution ``eps * |E_ref|`` of E and
  no lower, with that floor drawn as a labelled dashed line (a synthetic trace, and the CNN
  run's figure against the trace recomputed from its saved model).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cifar_dictlearning
import data_utils
import main_fast
from experiment import data_loading, records, runs, storage
from lca import LCAConv2D
from utils_ep_fast import settling_trace

# Two epochs that learn (the curves move), in about 3 s a run.
TINY = ["--task", "DIGITS", "--device", "cpu", "--save", "--epochs", "2", "--T1", "10",
        "--T2", "3", "--mbs", "32", "--mmt", "0.9", "--seed", "0", "--act", "my_hard_sig",
        "--betas", "0.0", "0.5", "--thirdphase", "--loss", "cel", "--softmax"]  # fmt: skip
CONVS = ["--channels", "4", "8", "--kernels", "3", "3", "--strides", "1", "1", "--paddings", "1",
         "1", "--pools", "mm", "--fc", "10", "--lrs", "0.5", "0.2", "0.1"]  # fmt: skip
RECON_IMAGES = 8  # the probe images reconstructions.png shows
LCA = ["--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1", "--lca_iters", "10"]
DICTLEARNING = ["--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
                "--epochs", "3", "--lambda", "0.1", "--lambda-every", "1", "--lambda-increment",
                "0.05", "--lca-iters", "10", "--tau", "5", "--batch-size", "64", "--max-batches",
                "2", "--subset-fraction", "0.3", "--seed", "0", "--device", "cpu"]  # fmt: skip

# The curve figures and the results.csv columns each shows (``plot_metrics``'s docstring).
CURVE_COLUMNS = {
    "accuracy.png": lambda c: c.endswith("_acc"),
    "sparsity.png": lambda c: "frac_active" in c,
    "recon_error.png": lambda c: "recon_error" in c,
    "dict_cosine.png": lambda c: "dict_cosine" in c,
    "angles.png": lambda c: c.startswith("angle_"),
    "phase_steps.png": lambda c: c.endswith("_steps"),
    "phases_at_cap.png": lambda c: c.endswith("_at_cap"),
}
# The curve figures each run draws.
RUN_CURVES = {
    "cnn": {"accuracy.png"},
    "vf": {"accuracy.png", "angles.png"},
    "lca": {"accuracy.png", "sparsity.png", "recon_error.png", "dict_cosine.png"},
}


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record every figure saved, by file name, in the order saved (and still save it)."""
    real = storage.save_figure
    saved: dict[str, list] = {}

    def save_figure(fig, path):
        saved.setdefault(Path(path).name, []).append(fig)
        real(fig, path)

    monkeypatch.setattr(storage, "save_figure", save_figure)
    for module in (runs, cifar_dictlearning):  # those that imported the name itself
        if getattr(module, "save_figure", None) is real:
            monkeypatch.setattr(module, "save_figure", save_figure)
    return saved


def train(tmp_path_factory, name: str, argv: list[str]) -> tuple[Path, dict[str, list]]:
    """Run ``main_fast.py argv`` into a new results folder: its run folder and its figures."""
    results = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as monkeypatch:
        saved = capture_figures(monkeypatch)
        assert main_fast.main([*argv, *TINY, "--results-dir", str(results)]) == 0
    (run_dir,) = results.glob("*/*/*/*/*/run_*")
    return run_dir, saved


@pytest.fixture(scope="module")
def dictlearning(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dictlearning")
    with pytest.MonkeyPatch.context() as monkeypatch:
        saved = capture_figures(monkeypatch)
        assert cifar_dictlearning.main([*DICTLEARNING, "--out-dir", str(out_dir)]) == 0
    return out_dir, saved


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return train(tmp_path_factory, "cnn", ["--model", "CNN", *CONVS])


@pytest.fixture(scope="module")
def vf(tmp_path_factory):
    return train(tmp_path_factory, "vf", ["--model", "VFCNN", *CONVS])


@pytest.fixture(scope="module")
def lca(tmp_path_factory, dictlearning):
    dictionary = dictlearning[0] / "dictionary.pt"
    argv = ["--model", "LCACNN", "--channels", "4", "8", "--kernels", "3", "--strides", "1",
            "--paddings", "1", "--pools", "im", "--fc", "10", "--lrs", "0.2", "0.1", *LCA,
            "--lca_lambda", "0.1", "--lca_tau", "5", "--lca_eta", "0.05", "--dict_training",
            "finetune", "--dict-path", str(dictionary)]  # fmt: skip
    return train(tmp_path_factory, "lca", argv)


# ---- helpers: the expected values, computed here --------------------------------------------


def line_data(line) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


def rescaled(images: np.ndarray) -> np.ndarray:
    """Each image of (N, ...) min-max rescaled to [0, 1] on its own, a constant one to 0.5."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(hi > lo, (flat - lo) / (hi - lo), np.float32(0.5))
    return scaled.astype(np.float32).reshape(images.shape)


def tiled(weights: torch.Tensor) -> np.ndarray:
    """A (F, 1, k, k) dictionary as ``plot_dictionary`` documents it: ceil(sqrt(F)) features a
    row, each rescaled to [0, 1], one-pixel white borders, gray as RGB: (H, W, 3)."""
    features = rescaled(weights.numpy())[:, 0]
    count, k = len(features), features.shape[-1]
    per_row = math.ceil(math.sqrt(count))
    rows = math.ceil(count / per_row)
    grid = np.ones((rows * (k + 1) + 1, per_row * (k + 1) + 1), dtype=np.float32)
    for f, feature in enumerate(features):
        r, c = divmod(f, per_row)
        grid[1 + r * (k + 1) : 1 + r * (k + 1) + k, 1 + c * (k + 1) : 1 + c * (k + 1) + k] = feature
    return np.repeat(grid[:, :, None], 3, axis=2)


def shown_image(fig) -> np.ndarray:
    (ax,) = fig.axes
    (image,) = ax.get_images()
    return np.asarray(image.get_array())


def probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``main_fast.PROBE_IMAGES`` DIGITS test images and labels (the runs' probe)."""
    _, test_set = data_loading.build_datasets("DIGITS", download=False)
    items = [test_set[i] for i in range(main_fast.PROBE_IMAGES)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def lca_layer(record: dict, weights: torch.Tensor) -> LCAConv2D:
    """An LCA layer with the saved run's settings (``--lca_*``) holding ``weights``."""
    model = record["config"]["model"]
    layer = LCAConv2D(
        weights.shape[0], weights.shape[1], kernel_size=model["lca_ksize"],
        stride=model["lca_stride"], lambda_=model["lca_lambda"], tau=model["lca_tau"],
        eta=model["lca_eta"], lca_iters=model["lca_iters"], pad="same",
        return_vars=["inputs", "acts"],
    )  # fmt: skip
    layer.assign_weight_values(weights, normalize=False)
    return layer


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- 1. curve figures against the CSV files --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run", ["cnn", "vf", "lca"])
def test_curve_figures_plot_the_columns_of_results_csv(run, request):
    run_dir, saved = request.getfixturevalue(run)
    rows = runs.read_results(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2]
    columns = [c for c in rows[0] if c != "epoch"]
    assert {"train_acc", "test_acc"} <= set(columns)
    for filename, shows in CURVE_COLUMNS.items():
        shown = [c for c in columns if shows(c)]
        if filename not in RUN_CURVES[run]:
            assert filename not in saved and not shown, filename
            continue
        assert shown, filename
        versions = saved[filename]
        assert len(versions) == len(rows)  # redrawn after every epoch
        assert (run_dir / filename).is_file()
        for epochs, fig in enumerate(versions, start=1):
            (ax,) = fig.axes
            lines = ax.get_lines()
            assert [line.get_label() for line in lines] == [c.removesuffix("_acc") for c in shown]
            for line, column in zip(lines, shown, strict=True):
                x, y = line_data(line)
                assert x.tolist() == [row["epoch"] for row in rows[:epochs]], (filename, column)
                assert y.tolist() == [row[column] for row in rows[:epochs]], (filename, column)
    for column in ("train_acc", "test_acc"):
        assert rows[0][column] != rows[1][column]  # curves that move: a wrong row would show
    assert rows[-1]["train_acc"] != rows[-1]["test_acc"]  # and differ: so would a swap


@pytest.mark.slow
def test_dictlearning_curves_plot_dictlearning_csv(dictlearning):
    out_dir, saved = dictlearning
    rows = storage.read_csv_rows(out_dir / cifar_dictlearning.CSV_FILE)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    raised = [
        row["epoch"]
        for prev, row in zip(rows, rows[1:], strict=False)
        if row["lambda"] != prev["lambda"]
    ]
    assert raised == [2, 3]
    fig = saved["dictlearning_curves.png"][-1]
    metrics = ("recon_error", "l1_sparsity", "frac_active", "total_energy")
    assert [ax.get_ylabel() for ax in fig.axes] == [m.replace("_", " ") for m in metrics]
    for ax, metric in zip(fig.axes, metrics, strict=True):
        curves = [line for line in ax.get_lines() if line.get_linestyle() != ":"]
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        (curve,) = curves
        x, y = line_data(curve)
        assert x.tolist() == [row["epoch"] for row in rows]
        assert y.tolist() == [row[metric] for row in rows], metric
        assert [line_data(line)[0].tolist() for line in dotted] == [[e - 0.5] * 2 for e in raised]


# ---- 2. the other figures against what the run saved ----------------------------------------


@pytest.mark.slow
def test_dictionary_images_show_the_saved_dictionaries(dictlearning, lca):
    out_dir, learnt = dictlearning
    weights, _ = records.load_dictionary(str(out_dir / "dictionary.pt"))
    assert np.array_equal(shown_image(learnt["dictionary.png"][-1]), tiled(weights))
    run_dir, saved = lca
    state = load(run_dir / "final_model.pt")["model_state"]
    assert torch.equal(state["initial_dictionary"], weights)  # finetune starts from it
    assert not torch.equal(state["lca.weights"], weights)
    assert np.array_equal(shown_image(saved["dictionary_epoch0.png"][-1]), tiled(weights))
    for name in ("model.pt", "final_model.pt"):
        record = load(run_dir / name)
        fig = saved[f"dictionary_epoch{record['epoch']}.png"][-1]
        assert np.array_equal(shown_image(fig), tiled(record["model_state"]["lca.weights"]))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["cnn", "vf", "lca"])
def test_activity_histograms_count_the_free_states_of_the_saved_model(run, request):
    run_dir, saved = request.getfixturevalue(run)
    record = load(run_dir / "final_model.pt")
    model = records.restore_model(record)
    encoding, neurons = runs.settle_probe(model, probe_batch(), record["config"]["dynamics"]["T1"])
    layers = [encoding.code, *neurons] if run == "lca" else list(neurons)
    fig = saved["neural_activity.png"][-1]
    axes = [ax for ax in fig.axes if ax.patches]
    assert len(axes) == len(layers) == len(fig.axes)
    for ax, layer in zip(axes, layers, strict=True):
        values = layer.detach().float().numpy().reshape(-1)
        counts, edges = np.histogram(values, bins=50)
        assert [p.get_height() for p in ax.patches] == counts.tolist(), ax.get_title()
        np.testing.assert_allclose([p.get_x() for p in ax.patches], edges[:-1], rtol=1e-6)
        assert f"(mean {values.mean():.3f})" in ax.get_title()


@pytest.mark.slow
def test_reconstructions_are_the_lca_of_the_saved_dictionaries(lca):
    run_dir, saved = lca
    record = load(run_dir / "final_model.pt")
    images = probe_batch()[0][:RECON_IMAGES]
    state = record["model_state"]
    expected = {}
    for row, weights in (("initial dictionary", state["initial_dictionary"]),
                         ("final dictionary", state["lca.weights"])):  # fmt: skip
        layer = lca_layer(record, weights)
        with torch.no_grad():
            inputs, acts = layer(images)
            recon = F.conv_transpose2d(acts, weights, padding=layer.kh // 2)
        assert acts.count_nonzero() > 0
        expected["input"] = rescaled(inputs.numpy())
        expected[row] = rescaled(recon.numpy())
    fig = saved["reconstructions.png"][-1]
    n = len(images)
    assert len(fig.axes) == len(expected) * n
    for r, (row, shown) in enumerate(expected.items()):
        assert fig.axes[r * n].get_ylabel() == row
        for j in range(n):
            image = np.asarray(fig.axes[r * n + j].get_images()[0].get_array())
            np.testing.assert_array_equal(image, shown[j, 0], err_msg=f"{row}, image {j}")


# ---- 3. the settling figure's energy gap stops at the float resolution of E -----------------


def gap_panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_ylabel() == "energy gap"]


def floor_lines(ax) -> list:
    return [line for line in ax.get_lines() if "resolution of E" in line.get_label()]


def synthetic_traces(dtype: torch.dtype, reference: float) -> dict:
    """A settling trace whose free phase goes from 1 above ``reference`` to it exactly and
    below, and whose nudged phase sits 1e-9 above its own reference (both under a float32
    floor, 1e-9 above a float64 one)."""
    free = torch.tensor([reference + d for d in (1.0, 1e-2, 1e-4, 0.0, -1e-3)], dtype=dtype)
    nudged_reference = torch.tensor(reference + 0.5, dtype=dtype)
    nudged = nudged_reference + torch.tensor([1.0, 1e-9, 1e-9], dtype=dtype)
    trace = {
        "free_energy": free, "nudged_energy": nudged,
        "free_reference": torch.tensor(reference, dtype=dtype),
        "nudged_reference": nudged_reference,
        "free_change": torch.full((4,), 0.1), "nudged_change": torch.full((2,), 0.1),
    }  # fmt: skip
    return {"sync": trace, "async": dict(trace)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_gap_is_drawn_down_to_the_float_resolution_of_E(dtype):
    reference = 100.0
    traces = synthetic_traces(dtype, reference)
    fig = data_utils.plot_settling(traces, "synthetic")
    eps = torch.finfo(dtype).eps
    name = str(dtype).removeprefix("torch.")
    trace = traces["sync"]
    for ax in gap_panels(fig):
        lines = {line.get_label(): line for line in ax.get_lines()}
        floors = floor_lines(ax)
        assert [line.get_label() for line in floors] == [
            f"{name} resolution of E (eps |E_ref|)",
            f"_{name} resolution of E (eps |E_ref|)",
        ]
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert f"{name} resolution of E (eps |E_ref|)" in legend
        steps = {"free": (0, 4), "nudged": (4, 6)}
        for phase, floor_line in zip(("free", "nudged"), floors, strict=True):
            ref = float(trace[f"{phase}_reference"])
            floor = eps * abs(ref)
            x, y = line_data(floor_line)
            assert x.tolist() == list(steps[phase]) and y.tolist() == [floor, floor]
            assert floor_line.get_linestyle() == "--"
            gap = (trace[f"{phase}_energy"] - trace[f"{phase}_reference"]).double().numpy()
            _, drawn = line_data(lines[f"{phase} phase"])
            assert drawn.tolist() == np.maximum(gap, floor).tolist()
        _, free_drawn = line_data(lines["free phase"])  # the free gap reaches 0, then below
        assert free_drawn[3] == free_drawn[4] == eps * reference
        assert free_drawn[2] > free_drawn[3]  # 1e-4 above 100 is above the float32 floor, 1.2e-5
        _, nudged_drawn = line_data(lines["nudged phase"])
        if dtype == torch.float64:  # 1e-9 is resolved in float64, not in float32
            assert nudged_drawn[1] > eps * (reference + 0.5)
        else:
            assert nudged_drawn[1] == eps * (reference + 0.5)


@pytest.mark.slow
def test_the_runs_settling_figure_is_its_saved_models_trace_floored(cnn):
    run_dir, saved = cnn
    record = load(run_dir / "final_model.pt")
    model = records.restore_model(record)
    x, y = (t[: runs.SETTLING_IMAGES] for t in probe_batch())
    dynamics = record["config"]["dynamics"]
    T1, T2, betas = dynamics["T1"], dynamics["T2"], tuple(dynamics["betas"])
    traces = settling_trace(model, x, y, T1, T2, betas)
    fig = saved["settling.png"][-1]
    panels = gap_panels(fig)
    assert len(panels) == len(traces) == 2 and len(fig.axes) == 4
    changes = [ax for ax in fig.axes if ax.get_ylabel() == "max change"]
    for ax, trace in zip(changes, traces.values(), strict=True):  # max |ds| per step
        free, nudged = ax.get_lines()
        assert line_data(free)[1].tolist() == trace["free_change"].double().tolist()
        assert line_data(nudged)[1].tolist() == trace["nudged_change"].double().tolist()
        assert line_data(nudged)[0].tolist() == list(range(T1 + 1, T1 + T2 + 1))
    for ax, (name, trace) in zip(panels, traces.items(), strict=True):
        assert ax.get_title().startswith(f"{name}:")
        assert trace["free_energy"].dtype == torch.float32
        lines = {line.get_label(): line for line in ax.get_lines()}
        for phase, floor_line in zip(("free", "nudged"), floor_lines(ax), strict=True):
            floor = torch.finfo(torch.float32).eps * abs(trace[f"{phase}_reference"].item())
            assert line_data(floor_line)[1].tolist() == [floor, floor]
            gap = trace[f"{phase}_energy"] - trace[f"{phase}_reference"]
            expected = gap.clamp_min(floor).double().numpy()
            assert line_data(lines[f"{phase} phase"])[1].tolist() == expected.tolist()
