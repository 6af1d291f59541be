"""The run's TensorBoard event stream: scalars, images, histograms and hyperparameters written
into ``RUN/tb/`` for ``tensorboard --logdir results/``.

One ``TensorBoardLog`` per run, on rank 0 only; any other instance (another rank, or the flag
off) does nothing and never imports ``torch.utils.tensorboard``, so the import is paid only
with the flag.

Steps. Every training tag uses the global batch index as its step, counted from 1: batch
``b`` (from 1) of epoch ``e`` (from 1) with ``B`` batches per epoch is step ``(e - 1) B + b``,
and a per-epoch value is written at the epoch's last batch, ``e B`` (``epoch_end_step``). The
tags then share one step axis, so a resume after epoch ``e`` opens the log with
``purge_step = e B + 1`` (``resume_purge_step``): TensorBoard drops every event of the earlier
writers at or past that step, in every tag and in the hyperparameters' sub-run alike, and the
stream carries on without a duplicate point. Every writer marks its start (a session START at
its ``purge_step``, 0 for a new stream): TensorBoard's Python loader takes the first START of
a folder for the start of the run and purges only at the later ones. Robustness settings have
no step axis: each (attack, gradient, epsilon) gets its own tag (``robustness_tag``) with T1
(or 0) as the step, in a sub-run of its own.

Failures. A log must never cost a checkpoint: an ``OSError`` while writing (full disk,
folder removed, no permission) becomes one ``warning:`` line on stderr and the log stops;
every later call does nothing. ``flush`` and ``close`` are safe at any time, twice, after a
failure, or on the SIGTERM path once the handler's exception has unwound (not inside a signal
handler itself: the interrupted write may hold the writer's lock).
"""

from __future__ import annotations

import math
import operator
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

TB_FOLDER = "tb"
HPARAMS_RUN = "hparams"  # the sub-run TensorBoard's HParams tab reads
BEST_TEST_ACC_TAG = "hparams/best_test_acc"
HPARAM_TYPES = (bool, int, float, str)  # what TensorBoard's HParams tab can show
# a results.csv column's tag: by whole name, else by the first matching prefix
EPOCH_TAG_NAMES = {"lr": "lr/group0", "seconds": "time/epoch_seconds"}
EPOCH_TAG_PREFIXES = {
    "train_": "train/",
    "test_": "test/",
    "lr_": "lr/",
    "free_": "phases/free_",
    "nudged_": "phases/nudged_",
    "lca_": "lca/",
    "dict_": "lca/dict_",
    "angle_": "vf/angle_",
    "clamped_": "phases/clamped_",
    "adjoint_": "rbp/adjoint_",
}


def epoch_end_step(epoch: int, batches_per_epoch: int) -> int:
    """The global step ``e B`` of the last batch of epoch ``e`` (counted from 1), at which
    that epoch's values are written; 0 before the first epoch."""
    epoch, batches_per_epoch = operator.index(epoch), operator.index(batches_per_epoch)
    if epoch < 0 or batches_per_epoch < 1:
        raise ValueError(
            f"epoch {epoch} and batches per epoch {batches_per_epoch}: need epoch >= 0 and "
            "at least one batch"
        )
    return epoch * batches_per_epoch


def batch_step(epoch: int, batch: int, batches_per_epoch: int) -> int:
    """The global step ``(e - 1) B + b`` of batch ``b`` of epoch ``e`` (both from 1)."""
    if not 1 <= operator.index(batch) <= batches_per_epoch:
        raise ValueError(f"batch {batch} is outside 1..{batches_per_epoch}")
    return epoch_end_step(epoch - 1, batches_per_epoch) + batch


def resume_purge_step(epoch: int, batches_per_epoch: int) -> int:
    """The ``purge_step`` of a log resumed after epoch ``e``: the first step not in the
    checkpoint, ``e B + 1``; TensorBoard discards the earlier events from there on."""
    return epoch_end_step(epoch, batches_per_epoch) + 1


def epoch_tag(name: str) -> str:
    """The tag of the per-epoch metric ``name`` (a results.csv column), grouped for
    TensorBoard's dashboard: ``train_acc`` -> ``train/acc``, ``lr_group1`` -> ``lr/group1``,
    ``free_at_cap`` -> ``phases/free_at_cap``, ``lca_recon_error`` -> ``lca/recon_error``,
    ``dict_cosine`` -> ``lca/dict_cosine``, ``angle_syn2`` -> ``vf/angle_syn2``, ``lr`` (the
    first group's) -> ``lr/group0``, ``seconds`` -> ``time/epoch_seconds``; any other name
    ``x`` -> ``epoch/x``."""
    if name in EPOCH_TAG_NAMES:
        return EPOCH_TAG_NAMES[name]
    for prefix, group in EPOCH_TAG_PREFIXES.items():
        if name.startswith(prefix):
            return group + name[len(prefix) :]
    return f"epoch/{name}"


def epoch_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """``{epoch_tag(name): value}`` of an epoch's metrics, without the ``epoch`` count itself
    (it is the step)."""
    return {epoch_tag(name): float(value) for name, value in metrics.items() if name != "epoch"}


def robustness_tag(attack: str, gradient: str = "none", epsilon: float = 0.0) -> str:
    """``robustness/<attack>/<gradient>/eps_<epsilon>``, one tag per setting (epsilon with 6
    significant digits; the gradient part is left out for ``none``, the epsilon part for 0),
    e.g. ``robustness/pgd-linf/bptt/eps_0.0313725`` or ``robustness/corruption_mean``."""
    parts = ["robustness", attack]
    if gradient != "none":
        parts.append(gradient)
    if epsilon != 0:
        parts.append(f"eps_{epsilon:.6g}")
    return "/".join(parts)


def hparam_value(value: Any) -> bool | int | float | str:
    """``value`` as the HParams tab can show it: bools (shown as 1 or 0), ints, floats and
    strings as they are, anything else (lists, None, paths) as its text."""
    return value if isinstance(value, HPARAM_TYPES) else str(value)


def feature_grid(weights: Tensor, padding: int = 1) -> Tensor:
    """A dictionary ``(F, C, k, k)`` as one ``(3, H, W)`` image in [0, 1]: the features tiled
    in rows of ``ceil(sqrt F)``, each rescaled to its own [min, max]."""
    from torchvision.utils import make_grid

    per_row = math.ceil(math.sqrt(weights.shape[0]))
    features = weights.detach().float().cpu()
    return make_grid(features, nrow=per_row, padding=padding, normalize=True, scale_each=True)


def _install_writer_thread_hook() -> None:
    """The event writer's thread dies on a write error and would print a traceback; the next
    call in the foreground raises the same error and the log warns once instead. So while a
    live log is opened, the thread hook is made quiet about exactly that case (once: a hook
    already quiet is kept)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writer", False):
        return
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    def quiet_writer_thread(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        previous(args)

    quiet_writer_thread.quiets_event_writer = True
    threading.excepthook = quiet_writer_thread


class TensorBoardLog:
    """The event stream of the run folder ``run_dir``, in ``run_dir/tb``, or in the sub-run
    ``run_dir/tb/<sub_run>`` (a run of its own in TensorBoard, with its own steps: e.g.
    ``robustness``, whose purge must not touch training's events).

    ``enabled`` (the flag) and ``rank`` (this process's rank) decide whether it writes: only
    an enabled rank 0 does. ``purge_step``: the first step this writer may write; TensorBoard
    discards the events of earlier writers of the same folder at or past it (0: a new stream,
    ``resume_purge_step`` on a resume). Steps are integers >= 0 (module docstring).
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        rank: int = 0,
        purge_step: int = 0,
        sub_run: str = "",
    ) -> None:
        if sub_run in (HPARAMS_RUN, ".", "..") or "/" in sub_run:
            raise ValueError(f"sub-run {sub_run!r}: give a plain folder name other than hparams")
        self.folder = Path(run_dir) / TB_FOLDER / sub_run
        self.purge_step = self._step(purge_step)
        self._writer = None
        self._hparams_writer = None
        self._live = False
        if not enabled or rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        _install_writer_thread_hook()
        self._summary_writer = SummaryWriter
        try:
            self._writer = self._open(self.folder)
            self._live = True
        except OSError as error:
            self._stop(error)

    @property
    def active(self) -> bool:
        """Whether calls still write (enabled, rank 0, and no write has failed)."""
        return self._live

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One point ``(step, value)`` of the curve ``tag`` (stored as float32)."""
        step = self._step(step)
        self._write(lambda: self._writer.add_scalar(tag, float(value), step))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """One point of each curve ``prefix + name`` at ``step``, for each ``name: value``."""
        step = self._step(step)
        for name, value in values.items():
            self._write(lambda n=name, v=value: self._writer.add_scalar(prefix + n, float(v), step))

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """An image, ``(C, H, W)`` with C in {1, 3} or ``(H, W)``; floats in [0, 1] (clipped
        outside) or uint8."""
        formats = {2: "HW", 3: "CHW"}.get(image.dim())
        if formats is None:
            raise ValueError(f"image of shape {tuple(image.shape)}: expected (C, H, W) or (H, W)")
        step = self._step(step)
        pixels = image.detach().cpu()
        self._write(lambda: self._writer.add_image(tag, pixels, step, dataformats=formats))

    def figure(self, tag: str, figure: Figure, step: int) -> None:
        """A matplotlib figure as an image (the figure is closed)."""
        step = self._step(step)
        self._write(lambda: self._writer.add_figure(tag, figure, step, close=True))

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        """The histogram of every entry of ``values``."""
        step = self._step(step)
        flat = values.detach().cpu().flatten()
        self._write(lambda: self._writer.add_histogram(tag, flat, step))

    def layer_histograms(self, prefix: str, layers: Sequence[Tensor], step: int) -> None:
        """One histogram per layer, ``<prefix>/layer<k>`` for layer k (from 1) of ``layers``
        (e.g. the free fixed point, each ``(B, *layer_shape)``)."""
        for k, values in enumerate(layers, start=1):
            self.histogram(f"{prefix}/layer{k}", values, step)

    def hparams(self, config: Mapping[str, Any], best_test_acc: float, step: int) -> None:
        """The run's configuration and its best test accuracy so far, for the HParams tab,
        in the sub-run ``tb/hparams``: the configuration (values through ``hparam_value``) on
        the first call, the metric ``hparams/best_test_acc`` at ``step`` on every call (the
        tab shows its last value)."""
        step = self._step(step)
        if not self._live:
            return
        if self._hparams_writer is None:
            from torch.utils.tensorboard.summary import hparams

            plain = {str(name): hparam_value(value) for name, value in config.items()}
            summaries = hparams(plain, {BEST_TEST_ACC_TAG: float(best_test_acc)})
            self._write(lambda: self._open_hparams_run(summaries, step))
        metric = float(best_test_acc)
        self._write(lambda: self._hparams_writer.add_scalar(BEST_TEST_ACC_TAG, metric, step))

    def flush(self) -> None:
        """Write what is pending to disk (a no-op when inactive)."""
        for writer in self._writers():
            self._write(writer.flush)

    def close(self) -> None:
        """Flush and close; the log is inactive afterwards."""
        for writer in self._writers():
            self._write(writer.close)
        self._live = False
        self._writer = self._hparams_writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, folder: Path):
        """A SummaryWriter on ``folder`` whose event file exists now (it opens it lazily)."""
        writer = self._summary_writer(log_dir=str(folder), purge_step=self.purge_step)
        writer.file_writer.flush()
        return writer

    def _open_hparams_run(self, summaries: tuple, step: int) -> None:
        self._hparams_writer = self._open(self.folder / HPARAMS_RUN)
        for summary in summaries:
            self._hparams_writer.file_writer.add_summary(summary, step)

    def _writers(self) -> list:
        return [writer for writer in (self._writer, self._hparams_writer) if writer is not None]

    def _write(self, call) -> None:
        """Run ``call`` while the log is live; an OSError stops it with one warning."""
        if not self._live:
            return
        try:
            call()
        except OSError as error:
            self._stop(error)

    def _stop(self, error: OSError) -> None:
        """Warn once and go inactive, closing what can still be closed."""
        writers = self._writers()
        self._live = False
        self._writer = self._hparams_writer = None
        for writer in writers:
            try:
                writer.close()
            except OSError:
                pass  # the error already reported
        reason = error.strerror or str(error)
        where = f"{error.filename}: " if error.filename else ""
        print(
            f"warning: TensorBoard log {self.folder} stopped ({where}{reason}); "
            "the run and its checkpoints go on without it",
            file=sys.stderr,
        )

    @staticmethod
    def _step(step: int) -> int:
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"TensorBoard step {step} is negative")
        return step
