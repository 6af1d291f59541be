"""Command line for training energy-based RCNNs with Equilibrium Propagation (EP).

    python main_fast.py --model CNN --task CIFAR10 ... --todo train --save
    python main_fast.py --load-path RUN_DIR --epochs 40               # resume training
    python main_fast.py --todo evaluate --load-path RUN_DIR           # train/test accuracy
    python main_fast.py --todo gducheck ...                           # EP updates vs BPTT

This file parses the flags, has them checked once into typed configurations (``config``),
then dispatches: it builds the datasets (``data_loading``), the model (``records``), the
optimizer and the scheduler, and hands them to the engine (``utils_ep_fast``) and to ``runs``
(the run folder: one writer at a time, per-epoch records, resume). Every flag accepts its dash
and underscore spellings. ``VFCNN``, ``VFMLP`` and ``LCACNN --vf`` are the vector-field models.

Under ``torchrun`` the same command runs data-parallel (``experiment/distributed.py``). Exit
statuses and the one-line errors are those of ``experiment/entry.py``; Ctrl-C and SIGTERM save the
weights and print the command that resumes. On a cluster, one command line both starts and, requeued
after a preemption, resumes a run: ``--save --load-path DIR`` starts a new run in DIR while it holds
no checkpoint, and resumes it once it does.
"""

from __future__ import annotations

from experiment import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import compiled
import data_utils
import precision
from experiment import config, data_loading, distributed, models, records, runs, storage
from experiment.config import DynamicsConfig, Settings
from experiment.entry import UsageError
from learning.losses import LOSSES
from learning.metrics import Metrics
from learning.registry import ESTIMATORS
from utils_ep_fast import (
    ACTIVATIONS,
    DYNAMICS,
    DivergenceError,
    EnergyNet,
    Phases,
    Schedule,
    evaluate,
    gdu_check,
    make_optimizer,
    make_scheduler,
)

TODOS = ("train", "evaluate", "gducheck")
PROBE_IMAGES = 32

# What each kind of failure exits with (the first match counts), and the advice for I/O errors
ERROR_STATUSES = ((DivergenceError, entry.EXIT_DIVERGED), *storage.ERROR_STATUSES)
STORAGE_FIX = "check the free space and permissions there (--results-dir, --data-dir)"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the seed README, plus run-management flags."""
    parser = entry.command_parser(
        "main_fast.py", "Train energy-based RCNNs (optionally behind an LCA front end) with EP."
    )

    def add(name: str, **kwargs) -> None:
        dest = name[2:].replace("-", "_")
        parser.add_argument(*entry.flag_spellings(name), dest=dest, **kwargs)

    add("--model", choices=tuple(models.MODELS), default="MLP", help="network")
    add("--task", default="DIGITS", help=f"dataset, one of {', '.join(data_loading.TASKS)}")
    add("--data-aug", action="store_true", help="augment the training images")
    add("--lr-decay", action="store_true", help="cosine learning-rate decay")
    add("--lr-decay-epochs", type=int, default=100, help="--lr-decay: epochs of the cosine")
    add("--lr-min", type=float, default=1e-5, help="--lr-decay: the rate it ends at")
    add("--nesterov", action="store_true", help="SGD with Nesterov momentum (--mmt)")
    add(
        "--randaugment",
        type=int,
        default=0,
        help="CIFAR with --data-aug: RandAugment with N operations of magnitude 9",
    )
    add(
        "--scale",
        type=float,
        nargs="+",
        default=None,
        help="gain of the default weight init: one, or one per weight tensor",
    )
    add("--act", choices=list(ACTIVATIONS), default="mysig", help="neuron activation")
    add("--todo", choices=TODOS, default="train", help="what to do")
    add("--alg", choices=list(ESTIMATORS), default="EP", help="learning rule")
    add("--T1", type=int, default=20, help="free-phase steps")
    add("--T2", type=int, default=4, help="nudged-phase steps")
    add("--betas", type=float, nargs="+", default=[0.0, 0.01], help="beta1 beta2")
    add("--dynamics", choices=DYNAMICS, default="sync", help="sync or async (odd/even) steps")
    add("--tol", type=float, default=None, help="stop a phase once max|ds| < TOL (T1/T2 caps)")
    add("--random-sign", action="store_true", help="random sign of beta2 per batch")
    add("--thirdphase", action="store_true", help="nudge with +beta2 and -beta2")
    add("--cpl-eta", type=float, default=1.0, help="CpL: clamp at s_out + eta (onehot - s_out)")
    add("--adjoint-iters", type=int, default=None, help="RBP: adjoint iterations (None: T2)")
    add("--loss", choices=list(LOSSES), default="mse", help="loss")
    add("--softmax", action="store_true", help="softmax readout outside the system")
    add("--optim", choices=("sgd", "adam"), default="sgd", help="optimizer")
    add("--lrs", type=float, nargs="+", default=None, help="learning rate per synapse (or one)")
    add("--wds", type=float, nargs="+", default=None, help="weight decay per synapse (or one)")
    add("--mmt", type=float, default=0.0, help="SGD momentum")
    add("--epochs", type=int, default=1, help="epochs to train (in total, when resuming)")
    add("--mbs", type=int, default=20, help="minibatch size")
    add("--device", default="0", help="GPU index (the CPU when CUDA is absent) or 'cpu'")
    add("--save", action="store_true", help="write the results folder")
    add("--seed", type=int, default=None, help="seed of every RNG and of the data order")
    add("--load-path", default=None, help="run folder to resume, evaluate or check")
    add("--data-dir", default="./data", help="where the datasets are")
    add("--results-dir", default="./results", help="where run folders go")
    add("--num-workers", type=int, default=None, help="loader workers (None: 4 on CUDA, else 0)")
    add("--compile", action="store_true", help="compiled phases (CUDA: replayed CUDA graphs)")
    add("--precision", choices=precision.PRECISIONS, default=None, help="None: torch's own")
    add("--no-download", action="store_true", help="never download a missing dataset")
    add("--dist-timeout", type=float, default=600.0, help="torchrun: collective timeout (s)")
    add("--tensorboard", action="store_true", help="with --save, a TensorBoard log in RUN/tb/")
    add("--log-every", type=int, default=50, help="--tensorboard: batches between running means")
    model_flags = {}  # each model's own flags (experiment/models.py), once each
    for model in models.MODELS.values():
        model_flags.update({name: keywords for name, keywords in model.FLAGS})
    for name, keywords in model_flags.items():
        add(name, **keywords)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, set[str]]:
    """The parsed arguments and the names of those typed on the command line."""
    return entry.parse_explicit(build_parser(), argv)


def check_args(flags: Mapping[str, Any]) -> Settings:
    """A new run's flag values (``vars`` of the parsed Namespace, left unchanged), checked
    once, as typed configurations (``config.check_new_run``)."""
    return config.settings(config.check_new_run(flags))


def note_unsaved(settings: Settings) -> None:
    """Say, once at the start, that a run without --save leaves no files."""
    if not settings.run.save:
        print("note: no --save, so nothing is written to disk (results are only printed)")
        if settings.run.tensorboard:
            print("note: --tensorboard logs into the run folder, so it needs --save too")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_training(settings: Settings, network: dict, device: torch.device) -> runs.Training:
    """The ``network`` (``{"model": name, "kwargs": ...}``) on ``device``, its optimizer and
    scheduler; architecture errors become UsageErrors."""
    optim = settings.optim
    try:
        model = records.build_model(network).to(device)
        refusal = ESTIMATORS[settings.dynamics.alg].model_refusal(model)
        if refusal is not None:
            raise UsageError(refusal)
        optimizer = make_optimizer(
            model, optim.optim, optim.lrs, optim.wds, optim.mmt, optim.nesterov
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    scheduler = make_scheduler(optimizer, optim.lr_decay, optim.lr_decay_epochs, optim.lr_min)
    return runs.Training(model, optimizer, scheduler)


def load_pretrained_dictionary(model: EnergyNet, settings: Settings) -> None:
    """A front end starts from its dictionary file, when its model has one to load (an
    LCACNN's ``pretrained`` and ``finetune``; ``learn`` starts from random)."""
    dict_path = settings.model.dictionary_to_load()
    if dict_path is not None:
        records.load_model_dictionary(model, dict_path)


def set_dynamics(model: EnergyNet, dynamics: DynamicsConfig) -> None:
    """``--dynamics`` and ``--tol`` into the engine (runs saved without them get the defaults,
    sync steps and fixed T1/T2, through ``config.saved_flags``)."""
    config.check_tol(dynamics.tol)
    model.set_dynamics(dynamics.dynamics, dynamics.tol)


def install_phases(model: EnergyNet, settings: Settings, device: torch.device) -> Phases:
    """The dynamics set on the model, and how its phases run: compiled and in a precision
    (``--compile``, ...), with the stop requests of Ctrl-C and SIGTERM honoured between the
    steps of every phase (and before every training batch)."""
    set_dynamics(model, settings.dynamics)
    safe_point = None
    if not distributed.launched():  # under torchrun the ranks agree on a batch boundary instead
        safe_point = entry.raise_if_stopped
    precision_mode = precision.apply(settings.dynamics.precision, device)
    runner = compiled.install(model, settings.run.compile, precision_mode)
    return Phases(runner=runner, safe_point=safe_point)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def build_data(
    settings: Settings,
    device: torch.device,
    train_aug: bool,
    shuffle: bool,
    record: dict | None = None,
) -> data_loading.RunData:
    """Loaders of the EP training images (those the saved ``record`` names, if given) and of
    the test set, plus a fixed probe batch."""
    data = settings.data
    with distributed.local_main_first():  # one download per node
        train_set, test_set = data_loading.build_datasets(
            data.task, data.data_dir, data_aug=train_aug, download=not data.no_download,
            randaugment=data.randaugment,
        )  # fmt: skip
    where = f"{data.task} in {data.data_dir}"
    indices = records.training_indices(len(train_set), settings.model, data.task, where, record)
    workers = data_loading.loader_workers(data.num_workers, device)
    return data_loading.run_loaders(
        train_set, test_set, data.mbs, shuffle, settings.run.seed, workers, indices, PROBE_IMAGES
    )


# --------------------------------------------------------------------------------------------
# --todo train
# --------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """Train a new run, or resume the one at ``--load-path``; with ``--save``, a ``--load-path``
    folder without a checkpoint gets a new run (so one command line starts and resumes).

    Everything that can be refused is checked before the run folder is written to; the folder
    is locked (one writer) from before its checkpoint is read until the process ends.
    """
    main_process = distributed.is_main_process()
    with contextlib.ExitStack() as held:
        try:
            settings, checkpoint, changed, run_dir = train_settings(args, explicit, held)
        except RunComplete as complete:  # a requeue of a job that had finished
            print(complete)
            return entry.EXIT_OK
        note_unsaved(settings)
        device = distributed.device_for(settings.run.device)
        records.seed_everything(settings.run.seed)
        network = records.network_config(checkpoint) if checkpoint else settings.network_config()
        training = build_training(settings, network, device)
        model, optim = training.model, settings.optim
        if checkpoint:
            records.restore_training_state(
                checkpoint, model, training.optimizer, training.scheduler
            )
            if changed:
                groups = [synapse for synapse, _ in model.optimizer_groups()]
                records.override_rates(
                    training.optimizer, training.scheduler, optim.lrs, optim.wds, groups
                )
        else:
            load_pretrained_dictionary(model, settings)
        phases = install_phases(model, settings, device)
        data = build_data(settings, device, settings.data.data_aug, shuffle=True, record=checkpoint)
        probe = [tensor.to(device) for tensor in data.probe]
        estimator = settings.dynamics.estimator()
        precision.check_ep_update(model, *probe, estimator, settings.dynamics.precision)
        start_epoch = checkpoint["epoch"] if checkpoint else 0
        if checkpoint:
            records.restore_rng(checkpoint, data.train_loader)
        recorder = None
        if settings.run.save and main_process:  # nothing was written before this
            command = ["python", "main_fast.py", *argv]
            recorder = runs.start_recording(
                held, run_dir, training, data.train_loader, data.probe, settings, command,
                checkpoint, changed,
            )  # fmt: skip
        train_batches = distributed.split_batches(data.train_loader, training.optimizer)
        loaders = train_batches, distributed.shard_evaluation(data.test_loader)
        schedule = Schedule(
            settings.run.epochs, start_epoch, device, training.scheduler, recorder, phases
        )
        metrics = Metrics(distributed.sum_totals, recorder)
        return runs.train_run(training, loaders, estimator, schedule, recorder, metrics)


def train_settings(
    args: argparse.Namespace, explicit: set[str], held: contextlib.ExitStack
) -> tuple[Settings, dict | None, list[str], Path | None]:
    """The settings of the run to train, the checkpoint it resumes (None: a new run), the flags
    the resume changes, and the run folder given (None: a new one under --results-dir), which
    is locked in ``held``; unwritable folders fail here, before any work, and a --load-path
    that is not a run before it is locked. A complete run needs no lock: in a read-only folder
    it still ends as RunComplete."""
    main_process = distributed.is_main_process()
    if not args.load_path:
        settings = check_args(vars(args))
        if args.save and main_process:
            storage.check_writable(args.results_dir, "results-dir")
        return settings, None, [], None
    run_dir = Path(args.load_path)
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    given = {**vars(args), "load_path": str(run_dir)}
    fresh = args.save and run_dir.suffix != ".pt" and runs.is_unstarted(run_dir)
    if not fresh:  # before the folder is touched: exit 2 leaves it as it was
        runs.check_is_run(run_dir, args.save)
    if fresh:
        print(f"notice: {run_dir} holds no checkpoint yet, so a new run starts there")
        settings = check_args(given)
        if main_process:
            storage.check_writable(run_dir, "load-path")
    if run_dir.is_dir() and main_process:
        try:
            held.enter_context(storage.FolderLock(run_dir))
        except OSError:
            if not fresh:  # a complete run needs no write: its read-only folder is no matter
                load_checkpoint(given, explicit)  # RunComplete then
            raise
    if fresh:
        return settings, None, [], run_dir
    return (*load_checkpoint(given, explicit), run_dir)


class RunComplete(Exception):  # noqa: N818 (the normal end of a requeued job, not an error)
    """``--save --load-path`` of a run that has all its epochs and final files: a requeued job
    that had finished, with nothing left to do (its message says so)."""


def load_checkpoint(
    typed: Mapping[str, Any], explicit: set[str]
) -> tuple[Settings, dict, list[str]]:
    """The checkpoint of the run folder ``--load-path``, the settings to resume it with, and
    which of ``--lrs`` / ``--wds`` the command line changes (``config.resume_flags``).
    RunComplete when ``--save`` (the requeue pattern) finds the run complete."""
    try:
        checkpoint = records.load_checkpoint(typed["load_path"])
    except UsageError as error:
        raise UsageError(runs.damaged_checkpoint_message(typed["load_path"], error)) from error
    n_synapses = records.synapse_count(checkpoint)
    done = checkpoint["epoch"]
    final_files = records.run_model(checkpoint).FINAL_FILES
    finished = runs.is_finished(typed["load_path"], done, final_files)
    requeue = bool(typed["save"])
    saved = records.run_flags(checkpoint)
    flags, changed = config.resume_flags(
        saved, done, typed, explicit, n_synapses, finished and not requeue
    )
    if finished and flags["epochs"] == done:
        raise RunComplete(
            f"{typed['load_path']}: the run is complete ({done} epochs); nothing to do (pass "
            f"--epochs N with N > {done} to train further)"
        )
    return config.settings(flags), checkpoint, changed


# --------------------------------------------------------------------------------------------
# --todo evaluate and --todo gducheck
# --------------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """Train and test accuracy of a saved run's model, printed and added to its
    hyperparameters.txt (a warning, and still exit 0, when that file cannot be written: a
    read-only run folder)."""
    if not args.load_path:
        raise UsageError("--todo evaluate needs --load-path RUN_DIR (a folder of a saved run)")
    record, path = records.load_model_file(args.load_path)
    saved = records.run_flags(record)
    flags = config.saved_flags(saved, vars(args), explicit, config.EVALUATE_OVERRIDES)
    config.check_positive(flags, ("T1", "mbs"))
    settings = config.settings(flags)
    dynamics = settings.dynamics
    device = distributed.device_for(settings.run.device)
    model = records.restore_model(record, device)
    phases = install_phases(model, settings, device)
    data = build_data(settings, device, train_aug=False, shuffle=False, record=record)
    shard, total = distributed.shard_evaluation, Metrics(distributed.sum_totals)
    train_acc = evaluate(
        model, shard(data.train_loader), dynamics.T1, device, "train set", total, phases
    )
    test_acc = evaluate(
        model, shard(data.test_loader), dynamics.T1, device, "test set", total, phases
    )
    line = (
        f"evaluate {path.name} (epoch {record['epoch']}, T1 {dynamics.T1}, {dynamics.dynamics}"
        f"{'' if dynamics.tol is None else f', tol {dynamics.tol}'}): "
        f"train_acc {train_acc:.4f} test_acc {test_acc:.4f}"
    )
    print(line)
    if distributed.is_main_process():
        try:
            storage.append_text(path.parent, runs.HYPERPARAMETERS_TXT, line)
        except OSError as error:  # the result stands; only its record is missing
            entry.warn(
                entry.storage_message(
                    error, f"the result above is not recorded in {runs.HYPERPARAMETERS_TXT}; "
                    "keep it from this output",
                )
            )  # fmt: skip
    return 0


def run_gducheck(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """EP's nudged-phase updates against BPTT's gradients on one training batch, for a new
    model or the saved one at ``--load-path``."""
    record = None
    if args.load_path:
        record, _ = records.load_model_file(args.load_path)
        saved = records.run_flags(record)
        flags = config.saved_flags(saved, vars(args), explicit, config.GDUCHECK_OVERRIDES)
        config.check_betas(flags)
        settings = config.settings(flags)
        device = distributed.device_for(settings.run.device)
        model = records.restore_model(record, device)
    else:
        settings = check_args(vars(args))
        note_unsaved(settings)
        device = distributed.device_for(settings.run.device)
        records.seed_everything(settings.run.seed)
        model = build_training(settings, settings.network_config(), device).model
        load_pretrained_dictionary(model, settings)
    if settings.run.save:
        storage.check_writable(settings.run.results_dir, "results-dir")
    phases = install_phases(model, settings, device)
    data = build_data(settings, device, train_aug=False, shuffle=False, record=record)
    x, y = next(iter(data.train_loader))
    x, y = x.to(device), y.to(device)
    report = gdu_check(model, x, y, settings.dynamics.ep_config(), phases)
    print(f"{'parameter':<28} {'relative RMSE':>14} {'sign errors':>12}")
    for name, entry_ in report.items():
        print(f"{name:<28} {entry_['rel_rmse']:>14.4f} {entry_['sign_error']:>12.3f}")
    estimator = settings.dynamics.estimator()
    precision.check_ep_update(model, x, y, estimator, settings.dynamics.precision, refuse=False)
    if settings.run.save and distributed.is_main_process():
        run_dir = runs.new_run_dir(settings)
        command = ["python", "main_fast.py", *argv]
        runs.write_hyperparameters(run_dir, command, settings.args())
        storage.save_figure(data_utils.plot_gdu(report), run_dir / "gdu.png")
        print(f"GDU plot: {run_dir / 'gdu.png'}")
    return 0


TODO_RUNNERS: dict[str, Callable[[argparse.Namespace, set[str], list[str]], int]] = {
    "train": run_train,
    "evaluate": run_evaluate,
    "gducheck": run_gducheck,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (``entry``). Under torchrun every rank runs it, and a failure on any rank stops them all
    (``distributed``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed.quiet_unless_rank_zero()
    try:
        args, explicit = parse_args(argv)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except UsageError as error:
        return entry.fail(str(error), entry.EXIT_USAGE)
    todo = functools.partial(TODO_RUNNERS[args.todo], args, explicit, argv)
    if not distributed.launched():
        return entry.run_script(todo, ERROR_STATUSES, STORAGE_FIX)
    typed = "device" in explicit
    with_signals = functools.partial(entry.with_signals, todo)
    return distributed.run(with_signals, args.device, typed, args.dist_timeout, ERROR_STATUSES)


if __name__ == "__main__":
    entry.exit_after_work(main())
