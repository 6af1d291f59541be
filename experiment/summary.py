"""Summaries of runs over their seeds: run folders grouped by their saved configuration, and the
mean +- standard deviation of each group's results.

A run folder is any folder below the results folders given with a ``results.csv`` beside a
``checkpoint.pt`` (``main_fast.py --save``'s, those saved before the typed configuration too:
``records.run_config`` translates them). Runs go into one group when their configurations
(``records.run_flags``) agree on every flag but the seed and those that say how a run was
launched rather than what it trains (``LAUNCH_FLAGS``: device, ``--compile``, loader workers,
the data, results, dictionary and load paths, ``--tensorboard``, ``--log-every``, ...), and
when their records hold the same thread count (``threads``, the order of CPU sums; unknown
for records saved before it). ``epochs`` is the number a run was trained to (its last
``--epochs``, after a resume). A run whose ``results.csv`` holds fewer rows than that stopped
early: such runs form groups of their own (``stopped="separate"``) or are left out
(``"leave-out"``), and the table says which.

For a group of n runs with test accuracies ``a_r(e)`` (run r, epoch e = 1..E_r) and seconds
``t_r(e)`` per epoch, the per-run values are

    best_test_acc    max_e a_r(e)    best_epoch         the first e reaching it
    final_test_acc   a_r(E_r)        seconds_per_epoch  mean_e t_r(e)

and the group's row gives, for each, ``mean = sum_r x_r / n`` and ``std = sqrt(sum_r (x_r -
mean)^2 / (n - ddof))`` (numpy's ``std`` with ``ddof``; ``ddof=1``, the sample standard
deviation, by default; NaN when n <= ddof). The test-accuracy curve of a group is the same
mean and std over its runs at each epoch (over the runs that reached it).

``robustness.csv`` of the runs (``robust_eval/results.py``) is summarised per group the same
way: the mean +- std of the accuracy over the group's runs, per measurement (attack, norm,
epsilon, severity, gradient, T1) and attack budget.

A results folder without runs, or a run folder that cannot be read (a damaged
``results.csv`` or checkpoint), gives one line naming it (``Summary.problems``); the rest are
summarised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from experiment import records
from experiment.entry import UsageError, first_line, one_line
from experiment.storage import atomic_write, read_csv_rows, save_figure, write_csv_rows

RESULTS_CSV = "results.csv"
ROBUSTNESS_CSV = "robustness.csv"
# flags that say how a run was launched, not what it trains (the seed is the axis summarised)
LAUNCH_FLAGS = frozenset({
    "seed", "todo", "device", "compile", "num_workers", "data_dir", "no_download",
    "results_dir", "save", "load_path", "tensorboard", "log_every", "dist_timeout",
    "dict_path",
})  # fmt: skip
ALWAYS_SHOWN = ("model", "alg")  # the columns every table starts with
METRICS = ("best_test_acc", "final_test_acc", "best_epoch", "seconds_per_epoch")
STOPPED_MODES = ("separate", "leave-out")
# robustness.csv: what a row measures, then the attack's budget (the run's own model, seed and
# sample set vary between runs and are not grouped by)
ROBUSTNESS_KEY = ("attack", "norm", "epsilon", "severity", "gradient", "T1", "T2", "beta",
                  "steps", "queries", "restarts", "targets")  # fmt: skip
UNKNOWN = "?"


@dataclass(frozen=True)
class SummaryConfig:
    """What to summarise: the run folders below ``results_dirs``; ``ddof`` of the standard
    deviation; ``stopped`` runs (stopped before their last epoch) in groups of their own
    (``separate``) or left out (``leave-out``); the tables and figure written to ``out_dir``
    (None: printed only)."""

    results_dirs: tuple[Path, ...]
    out_dir: Path | None = None
    ddof: int = 1
    stopped: str = "separate"

    def __post_init__(self) -> None:
        if self.stopped not in STOPPED_MODES or self.ddof < 0:
            raise ValueError(f"stopped must be one of {STOPPED_MODES} and ddof >= 0")


@dataclass(frozen=True)
class Run:
    """One run folder as read back: ``settings`` the flag values it is grouped by (with
    ``threads``), its ``seed``, the ``epochs`` it was trained to, per-epoch ``test_acc`` and
    ``seconds`` (E,), and the rows of its ``robustness.csv`` (empty without one)."""

    folder: Path
    settings: dict[str, Any]
    seed: int | None
    epochs: int
    test_acc: np.ndarray
    seconds: np.ndarray
    robustness: tuple[dict, ...] = ()

    @property
    def finished(self) -> bool:
        return len(self.test_acc) >= self.epochs

    def metrics(self) -> dict[str, float]:
        """best_test_acc, final_test_acc, best_epoch (1-based, first reached), mean seconds
        per epoch."""
        best = int(np.argmax(self.test_acc))
        return {
            "best_test_acc": float(self.test_acc[best]),
            "final_test_acc": float(self.test_acc[-1]),
            "best_epoch": float(best + 1),
            "seconds_per_epoch": float(np.mean(self.seconds)),
        }


@dataclass(frozen=True)
class Group:
    """Runs of one configuration: ``settings`` (shared), ``finished`` (all ran every epoch,
    or all stopped early) and the ``runs``, in the order found."""

    settings: dict[str, Any]
    finished: bool
    runs: tuple[Run, ...]

    def statistics(self, ddof: int) -> dict[str, tuple[float, float]]:
        """(mean, std with ``ddof``) over the runs of each of ``METRICS``."""
        per_run = [run.metrics() for run in self.runs]
        return {name: mean_std([m[name] for m in per_run], ddof) for name in METRICS}


@dataclass(frozen=True)
class Curve:
    """A group's test accuracy against epoch: at ``epochs`` (E,), the ``mean`` and ``std``
    over the ``count`` runs that reached each epoch."""

    label: str
    epochs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray


@dataclass
class Summary:
    """The groups found, the runs left out (stopped early, with ``stopped="leave-out"``), and
    one line per folder that could not be read."""

    groups: list[Group]
    left_out: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def mean_std(values: Sequence[float], ddof: int) -> tuple[float, float]:
    """``(mean, std)`` of ``values``; std is NaN when there are no more values than ``ddof``."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) <= ddof:
        return float(np.mean(array)), math.nan
    return float(np.mean(array)), float(np.std(array, ddof=ddof))


# --------------------------------------------------------------------------------------------
# Reading run folders
# --------------------------------------------------------------------------------------------


def find_run_folders(results_dir: Path) -> list[Path]:
    """Every folder at or below ``results_dir`` holding a ``results.csv``, sorted."""
    return sorted(path.parent for path in Path(results_dir).rglob(RESULTS_CSV))


def read_run(folder: Path) -> Run:
    """The run in ``folder``; a UsageError names what cannot be read."""
    if not (folder / records.CHECKPOINT).is_file():
        raise UsageError(f"{folder}: results.csv without {records.CHECKPOINT}")
    checkpoint = records.load_checkpoint(folder)
    flags = records.run_flags(checkpoint)
    test_acc, seconds = read_curves(folder / RESULTS_CSV, checkpoint["epoch"])
    settings = {name: value for name, value in flags.items() if name not in LAUNCH_FLAGS}
    settings["threads"] = checkpoint.get("threads")
    return Run(
        folder=folder,
        settings=settings,
        seed=flags.get("seed"),
        epochs=int(flags["epochs"]),
        test_acc=test_acc,
        seconds=seconds,
    )


def read_curves(path: Path, epochs_done: int) -> tuple[np.ndarray, np.ndarray]:
    """Test accuracy and seconds per epoch (E,) of ``results.csv``, checked: rows for epochs
    1..E with numeric accuracies in [0, 1] and seconds. A row past the checkpoint's
    ``epochs_done`` (written before a crash ended the epoch) is not counted."""
    try:
        rows = read_csv_rows(path)
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} cannot be read: {first_line(error)}") from error
    rows = rows[:epochs_done]
    if not rows:
        raise UsageError(f"{path} holds no epoch")
    try:
        epochs = [row["epoch"] for row in rows]
        test_acc = np.array([row["test_acc"] for row in rows], dtype=np.float64)
        seconds = np.array([row["seconds"] for row in rows], dtype=np.float64)
    except (KeyError, ValueError, TypeError) as error:
        problem = first_line(error)
        raise UsageError(
            f"{path} is damaged: epoch, test_acc or seconds missing or not a number ({problem})"
        ) from error
    if epochs != list(range(1, len(rows) + 1)):
        raise UsageError(f"{path} is damaged: its epochs are not 1..{len(rows)}")
    if not (np.all((test_acc >= 0) & (test_acc <= 1)) and np.all(np.isfinite(seconds))):
        raise UsageError(f"{path} is damaged: test_acc outside [0, 1] or seconds not finite")
    return test_acc, seconds


def read_robustness(folder: Path) -> tuple[dict, ...]:
    """The rows of the run's ``robustness.csv`` (none without one); a UsageError names a
    damaged file (its run's training results are still summarised)."""
    path = folder / ROBUSTNESS_CSV
    if not path.is_file():
        return ()
    try:
        rows = read_csv_rows(path)
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} cannot be read: {first_line(error)}") from error
    if any(not isinstance(row.get("accuracy"), float) for row in rows):
        raise UsageError(f"{path} is damaged: a row without a numeric accuracy")
    return tuple(rows)


def _key(settings: dict[str, Any]) -> tuple:
    return tuple(sorted((name, repr(value)) for name, value in settings.items()))


def summarize(config: SummaryConfig) -> Summary:
    """Read every run below ``config.results_dirs`` and group them (module docstring)."""
    found: list[Run] = []
    problems: list[str] = []
    for results_dir in config.results_dirs:
        folders = find_run_folders(results_dir) if Path(results_dir).is_dir() else []
        if not folders:
            problems.append(f"{results_dir}: no run folders (no results.csv) found")
        for folder in folders:
            try:
                run = read_run(folder)
            except UsageError as error:
                problems.append(one_problem(folder, error))
                continue
            try:
                run = dataclasses.replace(run, robustness=read_robustness(folder))
            except UsageError as error:
                problems.append(one_problem(folder, error))
            found.append(run)
    leave_out = config.stopped == "leave-out"
    left_out = [run for run in found if leave_out and not run.finished]
    grouped: dict[tuple, list[Run]] = {}
    for run in found:
        if run.finished or not leave_out:
            grouped.setdefault((run.finished, _key(run.settings)), []).append(run)
    groups = [
        Group(settings=runs[0].settings, finished=finished, runs=tuple(runs))
        for (finished, _), runs in grouped.items()
    ]
    return Summary(groups=groups, left_out=left_out, problems=problems)


def one_problem(folder: Path, error: Exception) -> str:
    """One line naming the run folder and what is wrong with it."""
    message = one_line(str(error))
    return message if str(folder) in message else f"{folder}: {message}"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def shown_settings(groups: Sequence[Group]) -> list[str]:
    """The settings that tell groups apart (``model`` and ``alg`` always; ``threads`` when
    runs differ in it), in the order of the first group's flags."""
    names: list[str] = []
    for group in groups:
        names += [name for name in group.settings if name not in names]
    differing = [
        name for name in names if len({repr(group.settings.get(name)) for group in groups}) > 1
    ]
    return [*ALWAYS_SHOWN, *(name for name in differing if name not in ALWAYS_SHOWN)]


def setting_text(value: Any) -> str:
    """A setting as a table cell: lists space-separated, None (or missing) ``-``."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return " ".join(setting_text(v) for v in value)
    return str(value)


def stopped_note(summary: Summary) -> str:
    """What the table does with runs stopped before their last epoch."""
    if summary.left_out:
        return f"{len(summary.left_out)} run(s) stopped before their last epoch are left out"
    if any(not group.finished for group in summary.groups):
        return "runs stopped before their last epoch are counted separately (runs: stopped)"
    return "every run reached its last epoch"


def ddof_note(ddof: int) -> str:
    return (
        f"mean +- std over the runs of each group; std with ddof={ddof} "
        f"(divisor n - {ddof}); '-' where n <= {ddof}"
    )


def table_rows(summary: Summary, ddof: int) -> list[dict[str, Any]]:
    """One row per group: its number (``[k]`` in the figure), its shown settings, ``runs``
    (finished / stopped), n, the seeds, and each metric's mean and std (accuracies as
    fractions)."""
    names = shown_settings(summary.groups)
    rows = []
    for number, group in enumerate(summary.groups, start=1):
        row: dict[str, Any] = {"group": number}
        row.update({name: setting_text(group.settings.get(name)) for name in names})
        if "threads" in row and group.settings.get("threads") is None:
            row["threads"] = UNKNOWN
        row["runs"] = "finished" if group.finished else "stopped"
        row["n"] = len(group.runs)
        row["seeds"] = " ".join(setting_text(run.seed) for run in group.runs)
        for metric, (mean, std) in group.statistics(ddof).items():
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        row["ddof"] = ddof
        rows.append(row)
    return rows


def metric_text(metric: str, mean: float, std: float) -> str:
    """``95.6 +- 0.3`` (accuracies in percent), ``7.3 +- 1.2`` (epochs), ``11.25 +- 0.40``
    (seconds); ``-`` for a std that is not defined."""
    scale = 100.0 if metric.endswith("acc") else 1.0
    digits = 2 if metric.startswith("seconds") else 1
    spread = "-" if math.isnan(std) else f"{scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f} +- {spread}"


METRIC_HEADERS = {
    "best_test_acc": "best test acc. (%)",
    "final_test_acc": "final test acc. (%)",
    "best_epoch": "epoch of best",
    "seconds_per_epoch": "s / epoch",
}


def text_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the printed and Markdown tables."""
    if not rows:
        return [], []
    settings = [k for k in rows[0] if not k.endswith(("_mean", "_std")) and k != "ddof"]
    header = [*settings, *METRIC_HEADERS.values()]
    cells = [
        [str(row[name]) for name in settings]
        + [metric_text(m, row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        for row in rows
    ]
    return header, cells


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def plain_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *cells]
    )


# --------------------------------------------------------------------------------------------
# The accuracy curves
# --------------------------------------------------------------------------------------------


def group_label(number: int, group: Group) -> str:
    """``[number] model alg`` (and ``stopped``): the group's row of the table is ``number``."""
    settings = group.settings
    label = f"[{number}] {settings.get('model')} {settings.get('alg')}"
    return label + ("" if group.finished else " (stopped)")


def accuracy_curves(summary: Summary, ddof: int) -> list[Curve]:
    """Each group's per-epoch mean and std of the test accuracy over the runs that reached
    the epoch."""
    curves = []
    for number, group in enumerate(summary.groups, start=1):
        last = max(len(run.test_acc) for run in group.runs)
        stats = [
            mean_std([run.test_acc[e] for run in group.runs if len(run.test_acc) > e], ddof)
            for e in range(last)
        ]
        count = [sum(len(run.test_acc) > e for run in group.runs) for e in range(last)]
        curves.append(
            Curve(
                label=group_label(number, group),
                epochs=np.arange(1, last + 1),
                mean=np.array([mean for mean, _ in stats]),
                std=np.array([std for _, std in stats]),
                count=np.array(count),
            )
        )
    return curves


def curves_figure(curves: Sequence[Curve], ddof: int) -> Figure:
    """Test accuracy against epoch: per curve its mean (a line, in order) and a band of +- one
    std (a filled polygon, in order; none where the std is not defined), labelled ``[k]`` with
    its group's row of the table."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for color, curve in enumerate(curves):
        ax.plot(curve.epochs, curve.mean, color=f"C{color}", label=curve.label)
        ax.fill_between(
            curve.epochs,
            curve.mean - curve.std,
            curve.mean + curve.std,
            color=f"C{color}",
            alpha=0.2,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy, mean +- std over seeds (ddof={ddof})")
    if curves:  # beside the axes: the labels name the table's rows
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------


def robustness_rows(summary: Summary, ddof: int) -> list[dict[str, Any]]:
    """Per group and measurement (``ROBUSTNESS_KEY``), the mean and std of the accuracy over
    the group's runs that measured it (a run measuring it twice: its last row)."""
    names = shown_settings(summary.groups)
    rows = []
    for number, group in enumerate(summary.groups, start=1):
        measured: dict[tuple, dict[Path, float]] = {}
        for run in group.runs:
            for row in run.robustness:
                key = tuple(setting_text(row.get(name)) for name in ROBUSTNESS_KEY)
                measured.setdefault(key, {})[run.folder] = row["accuracy"]
        for key, accuracies in measured.items():
            mean, std = mean_std(list(accuracies.values()), ddof)
            row = {"group": number}
            row.update({name: setting_text(group.settings.get(name)) for name in names})
            row["runs"] = "finished" if group.finished else "stopped"
            row.update(zip(ROBUSTNESS_KEY, key, strict=True))
            row.update({"n": len(accuracies), "accuracy_mean": mean, "accuracy_std": std})
            row["ddof"] = ddof
            rows.append(row)
    return rows


def robustness_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    if not rows:
        return [], []
    shown = [k for k in rows[0] if k not in ("accuracy_mean", "accuracy_std", "ddof")]
    cells = [
        [str(row[k]) for k in shown]
        + [metric_text("acc", row["accuracy_mean"], row["accuracy_std"])]
        for row in rows
    ]
    return [*shown, "accuracy (%)"], cells


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def report(config: SummaryConfig, summary: Summary) -> str:
    """The text of ``summary`` (its notes, the table, the runs left out, the robustness
    table), with the tables and figure written to ``config.out_dir`` when given."""
    lines: list[str] = []
    rows = table_rows(summary, config.ddof)
    header, cells = text_cells(rows)
    notes = [ddof_note(config.ddof), stopped_note(summary)]
    lines += [*notes, plain_table(header, cells)]
    lines += [f"left out (stopped early): {run.folder}" for run in summary.left_out]
    robust = robustness_rows(summary, config.ddof)
    robust_header, robust_cells = robustness_cells(robust)
    if robust:
        lines += ["", "robustness.csv, " + notes[0], plain_table(robust_header, robust_cells)]
    if config.out_dir is not None:
        lines += write_outputs(config, summary, rows, notes, robust)
    return "\n".join(lines)


def write_outputs(
    config: SummaryConfig,
    summary: Summary,
    rows: list[dict],
    notes: list[str],
    robust: list[dict],
) -> list[str]:
    """runs_summary.csv / .md, runs_summary_test_acc.png (and robustness_summary.csv / .md)
    in ``config.out_dir``; returns the lines naming them."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write_text(name: str, text: str) -> None:
        atomic_write(out / name, lambda f: f.write(text.encode()))
        written.append(out / name)

    write_csv_rows(out / "runs_summary.csv", rows, list(rows[0]))
    written.append(out / "runs_summary.csv")
    header, cells = text_cells(rows)
    write_text("runs_summary.md", "\n\n".join([*notes, markdown_table(header, cells)]) + "\n")
    fig = curves_figure(accuracy_curves(summary, config.ddof), config.ddof)
    save_figure(fig, out / "runs_summary_test_acc.png")
    written.append(out / "runs_summary_test_acc.png")
    if robust:
        write_csv_rows(out / "robustness_summary.csv", robust, list(robust[0]))
        written.append(out / "robustness_summary.csv")
        robust_header, robust_cells = robustness_cells(robust)
        text = notes[0] + "\n\n" + markdown_table(robust_header, robust_cells) + "\n"
        write_text("robustness_summary.md", text)
    return ["", "written: " + ", ".join(str(path) for path in written)]
