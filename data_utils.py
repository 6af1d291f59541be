"""Plotting for the EP / LCA-RCNN experiments: every figure of the project is drawn here and
returned as a matplotlib ``Figure`` (``storage.save_figure`` writes it).

Per-epoch metrics, settled neural activity, dictionaries and reconstructions, the GDU check,
the settling of the phases, dictionary learning curves and robustness curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import make_grid

# --------------------------------------------------------------------------------------------


# (file name, title, y label, which columns), for the metric plots made when the columns exist.
_METRIC_PLOTS: tuple[tuple[str, str, str, Callable[[str], bool]], ...] = (
    ("accuracy.png", "Accuracy", "accuracy", lambda c: c.endswith("_acc")),
    ("sparsity.png", "LCA sparsity", "fraction of LCA units active", lambda c: "frac_active" in c),
    (
        "recon_error.png",
        "LCA reconstruction error",
        "reconstruction error",
        lambda c: "recon_error" in c,
    ),
    ("dict_cosine.png", "Dictionary change", "cosine similarity", lambda c: "dict_cosine" in c),
    (
        "angles.png",
        "Angle between forward and backward weights",
        "angle (degrees)",
        lambda c: c.startswith("angle_"),
    ),
    ("phase_steps.png", "Steps per phase (--tol)", "mean steps", lambda c: c.endswith("_steps")),
    (
        "phases_at_cap.png",
        "Phases that hit their cap unsettled (--tol)",
        "fraction of phases",
        lambda c: c.endswith("_at_cap"),
    ),
)


def _series_label(column: str) -> str:
    """``train_acc`` -> ``train``, ``lca_frac_active`` -> ``lca_frac_active``."""
    return column.removesuffix("_acc") or column


def plot_metrics(rows: list[dict]) -> dict[str, Figure]:
    """Figures of a run's per-epoch ``rows`` (results.csv) against ``epoch`` (the row number
    without that column), by file name: ``accuracy.png`` (every ``*_acc`` column), and when such
    columns exist ``sparsity.png`` (``*frac_active*``), ``recon_error.png`` (``*recon_error*``),
    ``dict_cosine.png`` (``*dict_cosine*``), ``angles.png`` (``angle_*``, the vector-field
    models' forward/backward weight angles), and with ``--tol`` ``phase_steps.png``
    (``*_steps``) and ``phases_at_cap.png`` (``*_at_cap``). None without rows."""
    if not rows:
        return {}
    columns = list(rows[0])
    if "epoch" in columns:
        x, xlabel = [r["epoch"] for r in rows], "epoch"
    else:
        x, xlabel = list(range(1, len(rows) + 1)), "row"
    figures = {}
    for filename, title, ylabel, wanted in _METRIC_PLOTS:
        selected = [c for c in columns if c != "epoch" and wanted(c)]
        if not selected:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for c in selected:
            y = [r[c] if isinstance(r[c], float) else math.nan for r in rows]
            ax.plot(x, y, marker="o", markersize=3, label=_series_label(c))
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.4)
        ax.legend()
        figures[filename] = fig
    return figures


def plot_neural_activity(neurons: list[Tensor], names: list[str] | None = None) -> Figure:
    """One histogram per layer of the settled neuron values (any shape each)."""
    names = names or [f"layer {i + 1}" for i in range(len(neurons))]
    if len(names) != len(neurons):
        raise ValueError(f"{len(names)} names for {len(neurons)} layers")
    ncols = min(len(neurons), 4)
    nrows = math.ceil(len(neurons) / ncols)
    fig = Figure(figsize=(3.5 * ncols, 2.8 * nrows))
    for i, (layer, name) in enumerate(zip(neurons, names, strict=True)):
        values = layer.detach().float().cpu().reshape(-1).numpy()
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.hist(values, bins=50, color="tab:blue")
        ax.set(title=f"{name} (mean {values.mean():.3f})", xlabel="neuron value", ylabel="count")
        ax.grid(True, alpha=0.4)
    fig.suptitle("Settled neural activity")
    fig.tight_layout()
    return fig


def _rescale_each(images: Tensor) -> Tensor:
    """Each image of (N, ...) min-max rescaled to [0, 1] on its own (a constant image -> 0.5)."""
    flat = images.detach().float().cpu().reshape(images.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.full_like(flat, 0.5))
    return scaled.reshape(images.shape)


def dictionary_grid(weights: Tensor) -> Tensor:
    """A (F, C, k, k) dictionary (C = 1 gray or 3 RGB) tiled into one (H, W, 3) image in [0, 1]:
    ``ceil(sqrt(F))`` features per row, each rescaled to [0, 1] on its own, white borders."""
    if weights.dim() != 4 or weights.shape[1] not in (1, 3):
        raise ValueError(f"expected a (F, 1 or 3, k, k) dictionary, got {tuple(weights.shape)}")
    n = weights.shape[0]
    grid = make_grid(_rescale_each(weights), nrow=math.ceil(math.sqrt(n)), padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0)


def plot_dictionary(weights: Tensor, title: str | None = None) -> Figure:
    """The dictionary ``weights`` (F, C, k, k) as a grid of its F features (``dictionary_grid``)."""
    grid = dictionary_grid(weights)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or f"Dictionary: {weights.shape[0]} features of {tuple(weights.shape[1:])}")
    return fig


def plot_reconstructions(
    inputs: Tensor, recon_rows: dict[str, Tensor], n_images: int = 8
) -> Figure:
    """A grid: the first ``n_images`` inputs (N, C, H, W) on the first row, then one row per
    entry of ``recon_rows`` (same shape), each image rescaled to [0, 1] on its own."""
    rows = {"input": inputs, **recon_rows}
    if inputs.dim() != 4 or inputs.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) inputs, got {tuple(inputs.shape)}")
    for name, images in rows.items():
        if images.dim() != 4 or images.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"{name}: expected images shaped like the inputs {tuple(inputs.shape)}"
            )
    n = min(n_images, inputs.shape[0])
    fig = Figure(figsize=(1.4 * n + 1, 1.5 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        shown = _rescale_each(images[:n])
        for j in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + j + 1)
            if shown.shape[1] == 1:
                ax.imshow(shown[j, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(shown[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    fig.suptitle("Inputs and reconstructions")
    return fig


def plot_gdu(report: dict, n_entries: int = 5) -> Figure:
    """The GDU check of ``utils_ep_fast.gdu_check``: one panel per parameter,
    its ``n_entries`` entries of largest final BPTT gradient against the nudged-phase step, EP's
    update dashed and BPTT's gradient solid in the same colour per entry."""
    names = list(report)
    ncols = min(len(names), 2)
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.2 * nrows))
    for i, name in enumerate(names):
        entry = report[name]
        ep = entry["ep"].detach().float().cpu().flatten(1)
        bptt = entry["bptt"].detach().float().cpu().flatten(1)
        steps = range(1, ep.shape[0] + 1)
        picks = bptt[-1].abs().topk(min(n_entries, ep.shape[1])).indices
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, index in enumerate(picks.tolist()):
            color = f"C{j}"
            ax.plot(steps, ep[:, index].numpy(), linestyle="--", color=color)
            ax.plot(steps, bptt[:, index].numpy(), linestyle="-", color=color)
        ax.set(
            title=f"{name}: rel. RMSE {entry['rel_rmse']:.3f}, sign err. {entry['sign_error']:.2f}",
            xlabel="nudged-phase step t",
            ylabel="update",
        )
        ax.grid(True, alpha=0.4)
    fig.suptitle("GDU check: EP (dashed) vs BPTT (solid)")
    fig.tight_layout()
    return fig


def plot_dictlearning_curves(rows: list[dict[str, float]], metrics: Sequence[str]) -> Figure:
    """``cifar_dictlearning.py``'s per-epoch ``metrics`` against the epoch, one panel each, with
    a dotted line where lambda was raised."""
    epochs = [row["epoch"] for row in rows]
    raises = [
        row["epoch"]
        for prev, row in zip(rows, rows[1:], strict=False)
        if row["lambda"] != prev["lambda"]
    ]
    fig = Figure(figsize=(10, 7))
    for i, name in enumerate(metrics):
        ax = fig.add_subplot(2, math.ceil(len(metrics) / 2), i + 1)
        ax.plot(epochs, [row[name] for row in rows], marker="o", markersize=3)
        for epoch in raises:
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="epoch", ylabel=name.replace("_", " "))
        ax.grid(True, alpha=0.4)
    fig.suptitle("LCA dictionary learning (dotted: lambda raised)")
    fig.tight_layout()
    return fig


def plot_robustness(rows: list[dict]) -> Figure:
    """The rows of ``robustness.csv``: accuracy against epsilon for every attack, norm and input
    gradient (one panel per norm, the clean accuracy dotted; at the first T1 when there are
    several), then accuracy per corruption and severity (one line per severity, the mean over
    corruptions dashed) when there are any, then, with several T1 values, accuracy against T1
    per attack and gradient at ``sweep_epsilon`` of its curve."""
    T1_values = list(dict.fromkeys(row.get("T1") for row in rows))
    first = [row for row in rows if row.get("T1") == T1_values[0]] if T1_values else rows
    attacked = [row for row in first if row["norm"] in ("linf", "l2")]
    corrupted = [row for row in first if row["norm"] == "none" and row["attack"] != "clean"]
    corrupted = [row for row in corrupted if row["attack"] != "corruption_mean"]
    clean = [row["accuracy"] for row in first if row["attack"] == "clean"]
    norms = [norm for norm in ("linf", "l2") if any(row["norm"] == norm for row in attacked)]
    sweep = len(T1_values) > 1
    panels = len(norms) + (1 if corrupted else 0) + (1 if sweep else 0)
    fig = Figure(figsize=(6.5 * max(panels, 1), 4.5))
    at_T1 = f" at T1 {T1_values[0]:g}" if sweep else ""
    for i, norm in enumerate(norms):
        ax = fig.add_subplot(1, max(panels, 1), i + 1)
        for (attack, gradient), points in _curves(attacked, norm, "epsilon").items():
            label = attack if gradient == "none" else f"{attack} ({gradient})"
            ax.plot(*zip(*points, strict=True), marker="o", markersize=4, label=label)
        if clean:
            ax.axhline(clean[0], color="grey", linestyle=":", label="clean")
        name = "L-inf" if norm == "linf" else "L2"
        ax.set(title=f"{name} attacks{at_T1}", xlabel="epsilon", ylabel="accuracy",
               ylim=(-0.02, 1.02))  # fmt: skip
        ax.grid(True, alpha=0.4)
        ax.legend(fontsize=8)
    if corrupted:
        _plot_corruptions(fig.add_subplot(1, panels, len(norms) + 1), corrupted, first)
    if sweep:
        _plot_T1_sweep(fig.add_subplot(1, panels, panels), rows)
    fig.tight_layout()
    return fig


def _curves(rows: list[dict], norm: str, along: str) -> dict[tuple, list[tuple]]:
    """(attack, gradient) -> sorted ``(row[along], accuracy)`` points of ``norm``'s rows."""
    curves: dict[tuple, list[tuple]] = {}
    for row in rows:
        if row["norm"] == norm:
            curves.setdefault((row["attack"], row["gradient"]), []).append(
                (row[along], row["accuracy"])
            )
    return {key: sorted(points) for key, points in curves.items()}


def sweep_epsilon(rows: list[dict]) -> float:
    """The epsilon a T1 sweep is shown at, for the rows of one attack, norm and gradient: the
    largest below the smallest epsilon that leaves 0% at some T1 (the largest of all when
    none does, the smallest when the smallest already does)."""
    epsilons = sorted({row["epsilon"] for row in rows})
    zero = [row["epsilon"] for row in rows if row["accuracy"] == 0.0]
    below = [eps for eps in epsilons if not zero or eps < min(zero)]
    return below[-1] if below else epsilons[0]


def _plot_T1_sweep(ax, rows: list[dict]) -> None:
    """Accuracy against T1 per attack, norm and gradient, at ``sweep_epsilon``."""
    attacked = [row for row in rows if row["norm"] in ("linf", "l2")]
    keys = dict.fromkeys((row["attack"], row["norm"], row["gradient"]) for row in attacked)
    for attack, norm, gradient in keys:
        key = (attack, norm, gradient)
        curve = [row for row in attacked if (row["attack"], row["norm"], row["gradient"]) == key]
        eps = sweep_epsilon(curve)
        points = sorted((row["T1"], row["accuracy"]) for row in curve if row["epsilon"] == eps)
        label = f"{attack} {'' if gradient == 'none' else f'({gradient}) '}eps {eps:g}"
        ax.plot(*zip(*points, strict=True), marker="o", markersize=4, label=label)
    clean = sorted((row["T1"], row["accuracy"]) for row in rows if row["attack"] == "clean")
    if clean:
        ax.plot(*zip(*clean, strict=True), color="grey", linestyle=":", label="clean")
    ax.set(title="Accuracy against T1", xlabel="T1 (free steps)", ylabel="accuracy",
           ylim=(-0.02, 1.02))  # fmt: skip
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize=7)


def _plot_corruptions(ax, corrupted: list[dict], rows: list[dict]) -> None:
    """Accuracy per corruption, one line per severity, the mean dashed."""
    names = list(dict.fromkeys(row["attack"] for row in corrupted))
    for severity in sorted({int(row["severity"]) for row in corrupted}):
        by_name = {
            row["attack"]: row["accuracy"] for row in corrupted if int(row["severity"]) == severity
        }
        ax.plot(
            range(len(names)),
            [by_name.get(name, math.nan) for name in names],
            marker="o",
            markersize=4,
            linestyle="none",
            label=f"severity {severity}",
        )
    means = [row["accuracy"] for row in rows if row["attack"] == "corruption_mean"]
    if means:
        ax.axhline(means[0], color="black", linestyle="--", label="mean")
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=70)
    ax.set(title="Corruptions", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize=8)


def energy_gaps(trace: dict, floors: tuple[float, float] = (1e-12, 1e-12)) -> tuple[Tensor, Tensor]:
    """The free and nudged phases' ``E_t - E_ref`` of one dynamics of ``settling_trace``,
    floored at ``floors`` (default 1e-12) for a log scale (a phase can pass below a reference
    that had not settled either); ``plot_settling`` floors them at ``energy_resolution``."""
    return tuple(
        (trace[f"{phase}_energy"] - trace[f"{phase}_reference"]).clamp_min(floor)
        for phase, floor in zip(("free", "nudged"), floors, strict=True)
    )


def energy_resolution(trace: dict) -> tuple[float, float]:
    """The float resolution of the free and nudged phases' energies of one dynamics of
    ``settling_trace``: ``eps * |E_ref|``, with ``eps = torch.finfo(dtype).eps`` of the traces'
    dtype and ``E_ref`` the phase's reference (at least the dtype's smallest normal number, for
    a log scale). E is a float near ``E_ref``: a gap ``E_t - E_ref`` below this is rounding of
    E (float32 near E = 100: about 1e-5), not the energy moving."""
    finfo = torch.finfo(trace["free_energy"].dtype)
    return tuple(
        max(finfo.eps * abs(float(trace[f"{phase}_reference"])), finfo.tiny)
        for phase in ("free", "nudged")
    )


def plot_settling(traces: dict, title: str = "") -> Figure:
    """``utils_ep_fast.settling_trace`` drawn: one column per dynamics (sync and
    async side by side), the gap ``E_t - E_ref`` of the mean energy to the phase's reference
    (``free_reference`` / ``nudged_reference``: the lowest energy of a long async settle;
    top, log scale; absent without an energy) and ``max |s_t - s_(t-1)|`` (bottom, log scale)
    against the step, the free phase then the nudged phase after it (each phase with its own
    beta).

    The energy gap is drawn only down to the float resolution of E, ``eps * |E_ref|``
    (``energy_resolution``: ``eps = torch.finfo(dtype).eps`` of the traces' dtype, ``E_ref``
    the phase's reference): a smaller gap, or a negative one, is drawn at that floor, since
    below it the gap is the rounding of E, not the energy moving (float32 near E = 100: gaps
    of 1e-12 and 1e-5 are the same energy). The floor of each phase is a grey dashed line
    over its steps, labelled ``"<dtype> resolution of E (eps |E_ref|)"`` (the nudged phase's
    label starts with ``_``, out of the legend)."""
    names = list(traces)
    has_energy = traces[names[0]]["free_energy"] is not None
    nrows = 2 if has_energy else 1
    fig = Figure(figsize=(5.5 * len(names), 3.2 * nrows))
    for col, name in enumerate(names):
        trace = traces[name]
        free_steps = len(trace["free_change"])
        axes = [
            fig.add_subplot(nrows, len(names), row * len(names) + col + 1) for row in range(nrows)
        ]
        if has_energy:
            free, nudged = trace["free_energy"], trace["nudged_energy"]
            floors = energy_resolution(trace)
            gaps = energy_gaps(trace, floors)
            axes[0].semilogy(range(len(free)), gaps[0].numpy(), label="free phase")
            nudged_steps = range(free_steps, free_steps + len(nudged))
            axes[0].semilogy(nudged_steps, gaps[1].numpy(), label="nudged phase")
            floor_label = f"{str(free.dtype).removeprefix('torch.')} resolution of E (eps |E_ref|)"
            for steps, floor, label in (
                (range(len(free)), floors[0], floor_label),
                (nudged_steps, floors[1], f"_{floor_label}"),
            ):
                axes[0].plot(
                    [steps[0], steps[-1]], [floor, floor], color="grey", linestyle="--",
                    linewidth=1, label=label,
                )  # fmt: skip
            axes[0].set(
                title=f"{name}: E - E_ref (lowest E of a long async settle)", ylabel="energy gap"
            )
        change = axes[-1]
        change.semilogy(range(1, free_steps + 1), trace["free_change"].numpy(), label="free phase")
        nudged_change = trace["nudged_change"]
        change.semilogy(
            range(free_steps + 1, free_steps + 1 + len(nudged_change)),
            nudged_change.numpy(),
            label="nudged phase",
        )
        change.set(title=f"{name}: max |s_t - s_(t-1)|", xlabel="step t", ylabel="max change")
        for ax in axes:
            ax.grid(True, alpha=0.4)
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
