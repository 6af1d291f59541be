"""What each script writes to its TensorBoard log (``tensorboard_log``, ``--tensorboard``).

* Training (``TrainingBoard``, in ``RUN/tb/``): at the last batch of every epoch, step
  ``e B``, the epoch's results.csv values (``tensorboard_log.epoch_scalars``: accuracies, the
  model's metrics, ``lr``, ``seconds``) with the losses and the rate of every optimizer
  group, the histograms of each layer's free fixed point on the probe batch, the settling
  curves and the dictionary when it is trained, and the hyperparameters with the best test
  accuracy; every ``log_every`` batches the running accuracy and loss at that batch's step.
* Dictionary learning (``dictionary_board`` / ``log_dictionary_epoch``, in ``OUT_DIR/tb/``):
  per epoch ``e`` (the step) its metrics and the dictionary image.
* Robustness (``robustness_board`` / ``log_robustness_row``, in ``RUN/tb/robustness``): one
  tag per setting, with T1 as the step.

Every function does nothing when its log is inactive (no flag, not rank 0, a failed write).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from experiment.tensorboard_log import (
    TensorBoardLog,
    batch_step,
    epoch_end_step,
    epoch_scalars,
    feature_grid,
    resume_purge_step,
    robustness_tag,
)

ROBUSTNESS_RUN = "robustness"
DICTIONARY_TAG = "lca/dictionary"
FREE_STATES_TAG = "free_fixed_point"


class TrainingBoard:
    """The log of a training run in ``run_dir``: ``batches_per_epoch`` B fixes the steps,
    ``epochs_done`` where it carries on (a resume purges the events past ``epochs_done B``),
    ``optimizer`` gives the rate of each group (read before each epoch: the rates it trains
    with, as results.csv's ``lr``). Inactive unless ``enabled``."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        batches_per_epoch: int,
        epochs_done: int,
        log_every: int,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.batches = batches_per_epoch
        self.epochs_done = epochs_done
        self.log_every = log_every
        self.optimizer = optimizer
        purge = resume_purge_step(epochs_done, batches_per_epoch) if epochs_done else 0
        self.log = TensorBoardLog(run_dir, enabled, purge_step=purge)
        self.rates = self.group_rates()

    @property
    def active(self) -> bool:
        return self.log.active

    def group_rates(self) -> list[float]:
        """The learning rate of each optimizer group now."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def epoch_step(self, epoch: int) -> int:
        """The step of epoch ``epoch``'s values: its last batch."""
        return epoch_end_step(epoch, self.batches)

    def on_batch(self, batch: int, accuracy: float, loss: float) -> None:
        """``utils_ep_fast.train_epoch``'s running means after batch ``batch`` of the epoch
        after ``epochs_done``, written every ``log_every`` batches."""
        if not self.active or batch % self.log_every or batch > self.batches:
            return
        step = batch_step(self.epochs_done + 1, batch, self.batches)
        self.log.scalars({"running_acc": accuracy, "running_loss": loss}, step, prefix="train/")

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """The scalars of ``epoch``: ``metrics`` (results.csv's values and the losses) and the
        rate of each group beyond the first (``lr`` is the first's)."""
        step = self.epoch_step(epoch)
        scalars = epoch_scalars(metrics)
        scalars.update({f"lr/group{k}": rate for k, rate in enumerate(self.rates) if k})
        self.log.scalars(scalars, step)
        self.epochs_done = epoch
        self.rates = self.group_rates()  # after the scheduler's step: the next epoch's

    def hparams(self, flags: Mapping[str, Any], best_test_acc: float, epoch: int) -> None:
        """The run's flags and its best test accuracy after ``epoch``."""
        self.log.hparams(flags, best_test_acc, self.epoch_step(epoch))

    def free_states(self, neurons: Sequence[Tensor], code: Tensor | None, epoch: int) -> None:
        """Histograms of each layer's free fixed point (``(B, *layer_shape)`` each) and, with
        LCA, of the code ``(B, F, H, W)``."""
        step = self.epoch_step(epoch)
        self.log.layer_histograms(FREE_STATES_TAG, neurons, step)
        if code is not None:
            self.log.histogram(f"{FREE_STATES_TAG}/lca_code", code, step)

    def dictionary(self, weights: Tensor, epoch: int) -> None:
        """The dictionary ``(F, C, k, k)`` as one image (epoch 0: the starting one)."""
        if self.active:
            self.log.image(DICTIONARY_TAG, feature_grid(weights), self.epoch_step(epoch))

    def figure(self, tag: str, figure: Figure, epoch: int) -> None:
        """A figure (settling curves, reconstructions) at ``epoch``'s step."""
        if self.active:
            self.log.figure(tag, figure, self.epoch_step(epoch))

    def flush(self) -> None:
        self.log.flush()

    def close(self) -> None:
        self.log.close()


def dictionary_board(out_dir: str | Path, enabled: bool, epochs_done: int = 0) -> TensorBoardLog:
    """The log of ``cifar_dictlearning.py`` in ``out_dir/tb`` (epochs are its steps, so a
    run carrying on after ``epochs_done`` purges from ``epochs_done + 1``)."""
    return TensorBoardLog(out_dir, enabled, purge_step=epochs_done + 1 if epochs_done else 0)


def log_dictionary_epoch(log: TensorBoardLog, row: Mapping[str, float], weights: Tensor) -> None:
    """Epoch ``row["epoch"]`` of dictionary learning: every other value of ``row`` as
    ``dictlearning/<name>`` and the dictionary ``(F, C, k, k)`` as ``lca/dictionary``."""
    if not log.active:
        return
    epoch = int(row["epoch"])
    values = {name: value for name, value in row.items() if name != "epoch"}
    log.scalars(values, epoch, prefix="dictlearning/")
    log.image(DICTIONARY_TAG, feature_grid(weights), epoch)
    log.flush()


def robustness_board(run_dir: str | Path, enabled: bool, T1: int) -> TensorBoardLog:
    """The log of ``robustness.py`` at ``T1`` free steps: the sub-run ``run_dir/tb/robustness``.
    It purges from step T1 on, so a rerun replaces its own points and a sweep of rising T1
    keeps the earlier ones (accuracy against T1)."""
    return TensorBoardLog(run_dir, enabled, purge_step=T1, sub_run=ROBUSTNESS_RUN)


def robustness_row_tag(row: Mapping[str, Any]) -> str:
    """The tag of a robustness.csv row: ``tensorboard_log.robustness_tag`` of its attack,
    gradient and epsilon, with ``/severity_<s>`` for a corruption."""
    tag = robustness_tag(row["attack"], row["gradient"], float(row["epsilon"]))
    return f"{tag}/severity_{int(row['severity'])}" if int(row["severity"]) else tag


def log_robustness_row(log: TensorBoardLog, row: Mapping[str, Any], T1: int) -> None:
    """A robustness.csv row's accuracy at step ``T1``, written to disk at once (a stop loses
    nothing measured)."""
    if log.active:
        log.scalar(robustness_row_tag(row), float(row["accuracy"]), T1)
        log.flush()
