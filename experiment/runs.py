"""Run folders: their layout on disk and their life, from creation to the last epoch.

One run of ``main_fast.py --save`` lives in
``<results_dir>/<task>/<alg>/<model>/<dict_training|none>/<YYYY-MM-DD>/run_<N>/``:

    hyperparameters.txt   the command line, then ``name: value`` per flag; resumes and
                          evaluations are appended
    results.csv           one row per epoch (``epoch, train_acc, test_acc, <model metrics>,
                          lr, seconds``)
    *.png                 the figures of ``data_utils``, redrawn after every epoch
    checkpoint.pt         rewritten atomically after every epoch, to resume from
    model.pt              the epoch with the best test accuracy; final_model.pt the last one;
                          interrupted.pt the weights at a Ctrl-C or SIGTERM
    tb/                   with --tensorboard, the TensorBoard log (``run_board``)
    .lock                 the advisory lock of the process writing the folder (pid and host)

``experiment/records.py`` describes what the ``.pt`` files hold; ``experiment/storage.py`` writes
every file atomically and holds the lock (one writer per folder). Here: making and finding run
folders, the per-epoch ``RunRecorder``, and ``train_run``, which trains, records and says how to
carry on after a divergence, a failed write, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

import data_utils
from experiment import entry
from experiment.config import DynamicsConfig, Settings
from experiment.entry import UsageError, warn
from experiment.models import ModelConfig
from experiment.records import (
    BEST_MODEL,
    CHECKPOINT,
    FINAL_MODEL,
    INTERRUPTED,
    get_rng_state,
    model_record,
)
from experiment.run_board import TrainingBoard
from experiment.storage import (
    FolderLock,
    StorageError,
    append_csv_row,
    append_text,
    atomic_save,
    read_csv_rows,
    save_figure,
)
from learning.metrics import Metrics
from utils_ep_fast import (
    DivergenceError,
    EnergyNet,
    Estimator,
    Schedule,
    check_finite,
    settle,
    settling_trace,
    train,
)

RESULTS_CSV = "results.csv"
HYPERPARAMETERS_TXT = "hyperparameters.txt"
SETTLING_IMAGES = 8
TB_ONLY_METRICS = ("train_loss", "test_loss")  # logged, not in results.csv (old runs resume)


# --------------------------------------------------------------------------------------------
# Results folders and their logs
# --------------------------------------------------------------------------------------------


def make_run_dir(
    results_dir: str | Path,
    task: str,
    alg: str,
    model: str,
    dict_training: str | None,
    date: datetime.date | None = None,
) -> Path:
    """Create and return ``<results_dir>/<task>/<alg>/<model>/<dict_training>/<date>/run_<N>/``.

    ``dict_training`` None or empty becomes ``none``; ``date`` defaults to today (YYYY-MM-DD).
    N is one more than the highest existing ``run_<N>`` there (1 for the first run), so runs
    sort in the order they started; two processes starting at once still get different folders.
    """
    day = (date or datetime.date.today()).isoformat()
    parent = Path(results_dir) / task / alg / model / (dict_training or "none") / day
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"run_(\d+)", p.name))]
    n = max(taken, default=0) + 1
    while True:
        run_dir = parent / f"run_{n}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1


def find_runs(results_dir: str | Path) -> list[Path]:
    """Every ``run_<N>`` folder under ``results_dir`` (at any depth) that has a ``results.csv``,
    i.e. that finished at least one epoch; folders without one (a GDU check, a run stopped in
    its first epoch) are left out. Sorted by parent folder, then by N as a number. A missing
    ``results_dir`` gives an empty list."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    runs = [
        path.parent
        for path in root.rglob(RESULTS_CSV)
        if re.fullmatch(r"run_\d+", path.parent.name)
    ]
    return sorted(runs, key=lambda run: (str(run.parent), int(run.name.removeprefix("run_"))))


def write_hyperparameters(run_dir: str | Path, argv: list[str], args: dict) -> None:
    """Write ``run_dir/hyperparameters.txt``: ``shlex.join(argv)`` on the first line, then one
    ``name: value`` line per entry of ``args`` in its order."""
    lines = [shlex.join([str(a) for a in argv])]
    lines += [f"{key}: {value}" for key, value in args.items()]
    (Path(run_dir) / HYPERPARAMETERS_TXT).write_text("\n".join(lines) + "\n")


def new_run_dir(settings: Settings) -> Path:
    """A fresh ``<results-dir>/<task>/<alg>/<model>/<dict_training|none>/<date>/run_<N>``."""
    model = settings.model
    return make_run_dir(
        settings.run.results_dir, settings.data.task, settings.dynamics.alg, model.NAME,
        model.folder_mode,
    )  # fmt: skip


def is_finished(folder: str | Path, epoch: int, final_files: Sequence[str] = ()) -> bool:
    """Whether the run in ``folder`` wrote its final files after ``epoch``, its last one:
    ``final_model.pt`` of that epoch and its model's ``final_files`` (an LCA front end's
    ``reconstructions.png``). A run stopped during its last epoch's saves or its final ones has
    all its epochs but not these; resuming it writes them."""
    final = Path(folder) / FINAL_MODEL
    try:
        record = torch.load(final, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError):
        return False
    if not isinstance(record, dict) or record.get("epoch") != epoch:
        return False
    return all((Path(folder) / name).is_file() for name in final_files)


def is_unstarted(folder: str | Path) -> bool:
    """Whether ``folder`` holds no run that finished an epoch (no checkpoint, no results.csv):
    ``--save --load-path`` starts a new run there."""
    return not (Path(folder) / CHECKPOINT).exists() and not (Path(folder) / RESULTS_CSV).exists()


def check_is_run(folder: str | Path, save: bool) -> None:
    """UsageError unless ``folder`` holds a run to resume (its ``checkpoint.pt``), checked
    before anything in it is touched (no lock, no file removed)."""
    if (Path(folder) / CHECKPOINT).is_file():
        return
    if not Path(folder).exists():
        raise UsageError(f"--load-path {folder} does not exist (check the path)")
    if save:  # a folder with a results.csv: a run whose checkpoint is gone
        why, fix = f"it has a {RESULTS_CSV} but no {CHECKPOINT}", "restore it from a copy"
    else:
        why = f"it has no {CHECKPOINT}"
        fix = "check --load-path; with --save, a folder without a run starts a new one there"
    raise UsageError(f"--load-path {folder} is not a run folder to resume: {why}; {fix}")


def damaged_checkpoint_message(folder: str | Path, error: Exception) -> str:
    """Why the checkpoint of the run in ``folder`` cannot be read, what to do, and which of
    the run's weights files are intact (they rebuild the model but cannot resume it)."""
    intact = []
    for name, what in ((BEST_MODEL, "best"), (INTERRUPTED, "at a stop"), (FINAL_MODEL, "last")):
        path = Path(folder) / name
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            intact.append(f"{name} ({what}, epoch {record['epoch']})")
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
            continue  # missing or damaged too
    kept = (
        f"; its weights are intact in {', '.join(intact)}: --todo evaluate and robustness.py "
        "read them, but they lack the optimizer and data-order state a resume needs"
        if intact
        else ""
    )
    return (
        f"{error}. To carry the run on, put back a good {CHECKPOINT} (a copy or backup); "
        f"to start it over, move {folder} aside and run the same command again{kept}"
    )


def append_results_row(run_dir: str | Path, row: dict) -> None:
    """Append one epoch's ``row`` to ``run_dir/results.csv`` (see ``storage.append_csv_row``)."""
    append_csv_row(Path(run_dir) / RESULTS_CSV, row)


def read_results(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/results.csv`` (see ``storage.read_csv_rows``)."""
    fix = "move it aside: resuming the run writes it again from checkpoint.pt"
    return read_csv_rows(Path(run_dir) / RESULTS_CSV, fix)


# --------------------------------------------------------------------------------------------
# Per-epoch records of a training run
# --------------------------------------------------------------------------------------------


def csv_row(metrics: dict) -> dict:
    """results.csv columns: epoch, accuracies, the model's extra metrics, lr, seconds."""
    first, last = ("epoch", "train_acc", "test_acc"), ("lr", "seconds")
    extra = [name for name in metrics if name not in first + last + TB_ONLY_METRICS]
    return {name: metrics[name] for name in (*first, *extra, *last)}


def sync_results_csv(run_dir: Path, history: list[dict]) -> None:
    """Make results.csv hold exactly the checkpoint's rows (a crash may leave one extra)."""
    path = run_dir / RESULTS_CSV
    rows = read_results(run_dir) if path.is_file() else []
    if len(rows) == len(history):
        return
    warn(f"{path} did not match the checkpoint's {len(history)} epochs; rewriting it")
    path.unlink(missing_ok=True)
    for row in history:
        append_results_row(run_dir, row)


def settle_probe(model: EnergyNet, probe: tuple[Tensor, Tensor], T: int) -> tuple:
    """The encoding and the free-phase states after ``T`` steps of the probe batch."""
    device = next(model.parameters()).device
    return settle(model, probe[0].to(device), probe[1].to(device), T)


def neural_activity_figure(
    model_config: ModelConfig, model: EnergyNet, encoding, neurons: list[Tensor]
) -> Figure:
    """Histograms of the free-phase states ``neurons`` and whatever else the model shows (an
    LCA front end's code of ``encoding``)."""
    states, names = model_config.activity_layers(model, encoding, neurons)
    return data_utils.plot_neural_activity(states, names)


def settling_figure(
    model: EnergyNet, probe: tuple[Tensor, Tensor], dynamics: DynamicsConfig
) -> Figure:
    """Energy and max|ds| per step of the free and nudged phases, sync and async, on a few
    probe images (``SETTLING_IMAGES``), with the run's T1, T2 and betas."""
    device = next(model.parameters()).device
    x, y = probe[0][:SETTLING_IMAGES].to(device), probe[1][:SETTLING_IMAGES].to(device)
    T1, T2, betas = dynamics.T1, dynamics.T2, tuple(dynamics.betas)
    traces = settling_trace(model, x, y, T1, T2, betas)
    title = f"{len(y)} test images, T1 {T1}, T2 {T2}, betas {list(betas)}"
    return data_utils.plot_settling(traces, title)


@dataclass
class Training:
    """What a run trains: the model, the optimizer and the scheduler (None without
    ``--lr-decay``)."""

    model: EnergyNet
    optimizer: torch.optim.Optimizer
    scheduler: Any


@dataclass
class RunRecorder:
    """Writes a run folder's per-epoch files; ``train`` calls it after every epoch.

    run_dir is the run folder; training what is trained; the train_loader's generator state
    goes into the checkpoint; probe is (images, labels) of a fixed test batch for the
    figures; settings the run's configurations and flags. history, the best test accuracy and
    the epochs done carry over a resume. board: the TensorBoard log (``open_board``).
    """

    run_dir: Path
    training: Training
    train_loader: torch.utils.data.DataLoader
    probe: tuple[Tensor, Tensor]
    settings: Settings
    history: list[dict] = field(default_factory=list)
    best_test_acc: float = -1.0
    epoch: int = 0
    board: TrainingBoard | None = None

    @property
    def model(self) -> EnergyNet:
        return self.training.model

    def resume_from(self, checkpoint: dict, command: list[str], changed: Sequence[str]) -> None:
        """Carry on the checkpointed run's records; note the resume in hyperparameters.txt,
        with the new values of the flags ``changed`` on the resume (``--lrs``, ...)."""
        self.history = list(checkpoint["history"])
        self.best_test_acc = checkpoint["best_test_acc"]
        self.epoch = checkpoint["epoch"]
        sync_results_csv(self.run_dir, self.history)
        lines = [f"resumed: {shlex.join(command)}"]
        lines += [
            f"{name}: {self.settings.flags[name]} (from epoch {self.epoch})" for name in changed
        ]
        append_text(self.run_dir, HYPERPARAMETERS_TXT, "\n".join(lines))

    def start(self, command: list[str]) -> None:
        """The files of a new run: its command line and flags, the starting dictionary."""
        write_hyperparameters(self.run_dir, command, self.settings.args())
        for filename, fig in self.settings.model.start_figures(self.model).items():
            save_figure(fig, self.run_dir / filename)

    def __call__(self, epoch: int, metrics: dict) -> None:
        """Record ``epoch``: its row, checkpoint and figures; a stop requested meanwhile is
        honoured before and after them, never in the middle."""
        entry.raise_if_stopped()
        check_finite(self.model)
        with entry.holding_stops():
            row = csv_row(metrics)
            self.history.append(row)
            if row["test_acc"] > self.best_test_acc:
                self.best_test_acc = row["test_acc"]
                self.save_model(BEST_MODEL, epoch, row["test_acc"])
            atomic_save(self.checkpoint(epoch), self.run_dir / CHECKPOINT)
            self.epoch = epoch
            append_results_row(self.run_dir, row)
            settled = self.draw_figures(epoch)
            self.log_epoch(epoch, metrics, *settled)
        entry.raise_if_stopped()

    def draw_figures(self, epoch: int) -> tuple:
        """The figures of the run after ``epoch``: its curves, the neural activity and the
        settling of the probe batch, and the LCA dictionary when it is trained. Returns the
        probe's encoding and free states and the settling figure (for the board)."""
        for filename, fig in data_utils.plot_metrics(self.history).items():
            save_figure(fig, self.run_dir / filename)
        dynamics = self.settings.dynamics
        encoding, neurons = settle_probe(self.model, self.probe, dynamics.T1)
        activity = neural_activity_figure(self.settings.model, self.model, encoding, neurons)
        save_figure(activity, self.run_dir / "neural_activity.png")
        settling = settling_figure(self.model, self.probe, dynamics)
        save_figure(settling, self.run_dir / "settling.png")
        for filename, fig in self.settings.model.epoch_figures(self.model, epoch).items():
            save_figure(fig, self.run_dir / filename)
        return encoding, neurons, settling

    def open_board(self) -> None:
        """The TensorBoard log (inactive without ``--tensorboard``), carrying on after the
        epochs done; a new LCA run logs its starting dictionary at step 0."""
        run = self.settings.run
        self.board = TrainingBoard(
            self.run_dir, run.tensorboard, len(self.train_loader), self.epoch, run.log_every,
            self.training.optimizer,
        )  # fmt: skip
        dictionary = self.settings.model.dictionary(self.model)
        if dictionary is not None and self.epoch == 0:
            self.board.dictionary(dictionary, 0)

    def log_epoch(
        self, epoch: int, metrics: dict, encoding, neurons: list[Tensor], settling: Figure
    ) -> None:
        """``epoch`` on the board: its metrics, the free states, the settling curves, the
        dictionary when trained and the hyperparameters with the best test accuracy."""
        board = self.board
        if board is None or not board.active:
            return
        board.epoch(epoch, metrics)
        model_config = self.settings.model
        board.free_states(neurons, model_config.code(encoding), epoch)
        board.figure("settling", settling, epoch)
        if model_config.trains_dictionary:
            board.dictionary(model_config.dictionary(self.model), epoch)
        board.hparams(self.settings.args(), self.best_test_acc, epoch)
        board.flush()

    def checkpoint(self, epoch: int) -> dict:
        """Everything needed to carry on after ``epoch`` exactly (``records`` describes it)."""
        generator = self.train_loader.generator
        training = self.training
        return {
            "config": self.settings.plain(),
            "model_state": training.model.state_dict(),
            "optimizer_state": training.optimizer.state_dict(),
            "scheduler_state": training.scheduler.state_dict() if training.scheduler else None,
            "epoch": epoch,
            "rng_state": {
                "global": get_rng_state(),
                "train_loader": generator.get_state() if generator is not None else None,
            },
            "history": self.history,
            "best_test_acc": self.best_test_acc,
            "train_indices": self.train_indices(),
            "threads": torch.get_num_threads(),
        }

    def train_indices(self) -> Tensor | None:
        """The training images EP uses (int64), or None when it uses them all."""
        dataset = self.train_loader.dataset
        if not isinstance(dataset, torch.utils.data.Subset):
            return None
        return torch.as_tensor(list(dataset.indices), dtype=torch.int64)

    def save_model(self, filename: str, epoch: int, test_acc) -> None:
        """The current weights and configuration, written atomically to ``filename``."""
        record = model_record(self.model, epoch, test_acc, self.settings.plain())
        record["train_indices"] = self.train_indices()
        atomic_save(record, self.run_dir / filename)

    def finish(self) -> None:
        """After the last epoch: ``final_model.pt`` and, with LCA, the reconstructions. The
        work is done: a stop requested meanwhile lets them be written and the run ends."""
        test_acc = self.history[-1]["test_acc"] if self.history else None
        with entry.holding_stops():
            self.save_model(FINAL_MODEL, self.epoch, test_acc)
            model_config = self.settings.model
            for filename, fig in model_config.final_figures(self.model, self.probe[0]).items():
                save_figure(fig, self.run_dir / filename)
                if self.board is not None:
                    tag = f"{model_config.BOARD_PREFIX}{Path(filename).stem}"
                    self.board.figure(tag, fig, self.epoch)

    def on_batch(self, batch: int, accuracy: float, loss: float) -> None:
        """The running means after a batch, for the board (``TrainingBoard.on_batch``)."""
        if self.board is not None:
            self.board.on_batch(batch, accuracy, loss)

    def close_board(self) -> None:
        """Flush and close the TensorBoard log (at the end, or on the way out of a stop)."""
        if self.board is not None:
            self.board.close()


def start_recording(
    held: contextlib.ExitStack,
    run_dir: Path | None,
    training: Training,
    train_loader: torch.utils.data.DataLoader,
    probe: tuple[Tensor, Tensor],
    settings: Settings,
    command: list[str],
    checkpoint: dict | None,
    changed: Sequence[str],
) -> RunRecorder:
    """The recorder of a run with ``--save`` (see RunRecorder), in ``run_dir`` or, when None,
    in a new run folder locked in ``held``; it carries on ``checkpoint`` (with the flags
    ``changed`` on the resume) or starts."""
    if run_dir is None:
        run_dir = new_run_dir(settings)
        held.enter_context(FolderLock(run_dir))
    recorder = RunRecorder(run_dir, training, train_loader, probe, settings)
    if checkpoint:
        recorder.resume_from(checkpoint, command, changed)
    else:
        recorder.start(command)
    recorder.open_board()
    print(f"run folder: {run_dir}")
    return recorder


# --------------------------------------------------------------------------------------------
# The training run
# --------------------------------------------------------------------------------------------


def train_run(
    training: Training,
    loaders: tuple,
    estimator: Estimator,
    schedule: Schedule,
    recorder: RunRecorder | None,
    metrics: Metrics,
) -> int:
    """Train ``training`` with ``estimator`` on ``loaders`` (train, test) as ``schedule`` says
    (its ``on_epoch_end`` is ``recorder``, which records each epoch; ``metrics``: see
    ``utils_ep_fast.train``); returns the exit status. A divergence (DivergenceError), a
    failed write (StorageError), Ctrl-C or SIGTERM (status 130 or 143) keeps what was saved and
    says how to carry on."""
    last_epoch = schedule.epochs
    try:
        if recorder is not None and schedule.start_epoch == last_epoch:  # stopped in final saves
            print(f"notice: all {last_epoch} epochs are done; writing the final files")
            with entry.holding_stops():
                recorder.draw_figures(last_epoch)
        train(training.model, training.optimizer, loaders, estimator, schedule, metrics)
        if recorder is not None:
            recorder.finish()
    except DivergenceError as error:
        raise DivergenceError(divergence_message(error, recorder)) from error
    except KeyboardInterrupt as interrupt:
        report_interrupt(recorder, last_epoch, interrupt)
        return entry.exit_status_of(interrupt)
    except OSError as error:
        raise StorageError(storage_failure_message(error, recorder)) from error
    finally:
        if recorder is not None:
            recorder.close_board()
    if recorder is not None:
        print(f"best test accuracy {recorder.best_test_acc:.4f}; results in {recorder.run_dir}")
    return 0


def _resume_command(run_dir: Path, epochs: int, *extra: str) -> str:
    args = ["--load-path", str(run_dir), "--epochs", str(epochs), *extra]
    return entry.shell_command("main_fast.py", args)


def _kept(recorder: RunRecorder | None) -> str:
    if recorder is None or recorder.epoch == 0:
        return "no epoch finished, so there is no checkpoint"
    return f"the last good checkpoint (epoch {recorder.epoch}) is in {recorder.run_dir}"


def divergence_message(error: DivergenceError, recorder: RunRecorder | None) -> str:
    """The engine's diagnosis, where the last good checkpoint is, and what to change: with a
    checkpoint, the command that resumes it with half the learning rates."""
    advice = "Try lower --lrs or smaller --betas."
    if recorder is not None and recorder.epoch > 0:
        halved = [f"{lr / 2:g}" for lr in recorder.settings.optim.lrs]
        epochs = recorder.settings.run.epochs
        command = _resume_command(recorder.run_dir, epochs, "--lrs", *halved)
        advice = f"Resume with lower rates, e.g.: {command}"
    return f"training diverged: {error}; {_kept(recorder)}. {advice}"


def storage_failure_message(error: OSError, recorder: RunRecorder | None) -> str:
    """A failed write during training: which file and why, and what is kept."""
    where = (
        "--results-dir" if recorder is None else f"--results-dir (run folder {recorder.run_dir})"
    )
    return entry.storage_message(
        error, f"{_kept(recorder)}; free space or make {where} writable, then resume"
    )


def report_interrupt(
    recorder: RunRecorder | None, epochs: int, interrupt: KeyboardInterrupt
) -> None:
    """Ctrl-C or SIGTERM: save the current weights and say how to resume (to ``epochs``)."""
    what = entry.interruption(interrupt)
    if recorder is None:
        print(f"\n{what}; nothing was saved (no --save)", file=sys.stderr)
        return
    recorder.save_model(INTERRUPTED, recorder.epoch, None)
    saved = recorder.run_dir / INTERRUPTED
    if recorder.epoch == 0:
        resume = "no epoch finished, so there is no checkpoint: run the command again"
    else:
        command = _resume_command(recorder.run_dir, epochs)
        resume = f"resume from epoch {recorder.epoch} with:\n  {command}"
    print(f"\n{what}; current weights saved to {saved}; {resume}", file=sys.stderr)
