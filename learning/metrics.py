"""The training metrics of a run: one object that training and evaluation report to.

``Metrics`` keeps an epoch's sums (correct predictions, samples seen, summed loss, the model's
per-batch stats weighted by batch size), their running means after every batch, and every
phase's record (``dynamics.PhaseRecord``) under its name, from which it gives per phase name
the mean steps and the fraction of phases that stopped at their cap. Under torchrun its
``sum_over_ranks`` (``distributed.sum_totals``) turns this process's sums into the sums over
every rank before means are taken; the phase counts stay this process's own. A ``board``
(anything with ``on_batch(batch, accuracy, loss)``, e.g. ``runs.RunRecorder``) is told the
running means after every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dynamics import PhaseRecord


class BatchBoard(Protocol):
    """What is told the running means after each batch."""

    def on_batch(self, batch: int, accuracy: float, loss: float) -> None: ...


def own_totals(totals: dict[str, float]) -> dict[str, float]:
    """The sums of a single process: already the sums over every process."""
    return totals


class Metrics:
    """An epoch's sums and phase records (module docstring).

    Args:
        sum_over_ranks: ``{name: this process's sum} -> {name: the sum over ranks}``.
        board: told the running means after every batch (``BatchBoard``), or None.
    """

    def __init__(
        self,
        sum_over_ranks: Callable[[dict[str, float]], dict[str, float]] = own_totals,
        board: BatchBoard | None = None,
    ) -> None:
        self.sum_over_ranks = sum_over_ranks
        self.board = board
        self.start_epoch()

    def start_epoch(self) -> None:
        """Clear the sums and phase records for a new epoch."""
        self.batches = 0
        self.correct = 0
        self.seen = 0
        self.loss = 0.0
        self.stats: dict[str, float] = {}
        self.phases: list[tuple[str, PhaseRecord]] = []
        self.rule_stats: dict[str, float] = {}  # the current batch's, until add_batch

    def add_phase(self, name: str, record: PhaseRecord) -> None:
        """A phase named ``name`` (``"free"``, ``"nudged"``, ...) ran as ``record`` says."""
        self.phases.append((name, record))

    def add_stat(self, name: str, value: float) -> None:
        """A learning rule's statistic of the batch under way, counted with its ``add_batch``
        like the model's stats."""
        self.rule_stats[name] = value

    def add_batch(self, correct: int, loss: float, count: int, stats: dict[str, float]) -> None:
        """A batch of ``count`` samples: ``correct`` right, ``loss`` the sum of their losses,
        ``stats`` per-batch means (weighted by ``count``; none for an empty batch)."""
        self.batches += 1
        stats, self.rule_stats = {**stats, **self.rule_stats}, {}
        self.correct += correct
        self.loss += loss
        self.seen += count
        if self.board is not None:
            self.board.on_batch(self.batches, self.running_accuracy, self.running_loss)
        for name, value in stats.items() if count else ():
            self.stats[name] = self.stats.get(name, 0.0) + value * count

    @property
    def running_accuracy(self) -> float:
        """This process's accuracy over the epoch's batches so far."""
        return self.correct / max(self.seen, 1)

    @property
    def running_loss(self) -> float:
        """This process's mean loss over the epoch's batches so far."""
        return self.loss / max(self.seen, 1)

    def phase_stats(self) -> dict[str, float]:
        """``<phase>_steps``: mean steps of each phase name, and ``<phase>_at_cap``: the
        fraction of those phases that stopped at their cap without settling."""
        stats = {}
        for name in dict.fromkeys(name for name, _ in self.phases):
            records = [record for kind, record in self.phases if kind == name]
            stats[f"{name}_steps"] = sum(record.steps for record in records) / len(records)
            stats[f"{name}_at_cap"] = sum(not r.settled for r in records) / len(records)
        return stats

    def epoch_means(self, with_phases: bool) -> dict[str, float]:
        """``train_acc``, ``train_loss`` and the stats, means over every sample of every rank;
        with ``with_phases`` also ``phase_stats`` (this process's phases)."""
        totals = self.sum_over_ranks(
            {"correct": self.correct, "seen": self.seen, "loss": self.loss, **self.stats}
        )
        seen = totals.pop("seen")
        means = {"train_acc": totals.pop("correct") / max(seen, 1)}
        means["train_loss"] = totals.pop("loss") / max(seen, 1)
        means.update({name: total / max(seen, 1) for name, total in totals.items()})
        if with_phases:
            means.update(self.phase_stats())
        return means

    def evaluation_means(self, correct: int, loss: float, seen: int) -> tuple[float, float]:
        """Accuracy and mean loss of an evaluation from this process's sums, over ranks."""
        totals = self.sum_over_ranks({"correct": correct, "seen": seen, "loss": loss})
        seen = max(totals["seen"], 1)
        return totals["correct"] / seen, totals["loss"] / seen


__all__ = ["BatchBoard", "Metrics", "own_totals"]
