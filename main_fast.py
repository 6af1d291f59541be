"""Command line for training energy-based RCNNs with Equilibrium Propagation (EP).

    python main_fast.py --model CNN --task CIFAR10 ... --todo train --save
    python main_fast.py --load-path RUN_DIR --epochs 40               # resume training
    python main_fast.py --todo evaluate --load-path RUN_DIR           # train/test accuracy
    python main_fast.py --todo gducheck ...                           # EP updates vs BPTT

This file parses and checks the flags, then dispatches: it builds the datasets, the model
(``P_CNN``, ``LCA_CNN`` or ``P_MLP``), the optimizer and the scheduler, and hands them to the
engine (``utils_ep_fast``) and to ``runs`` (the run folder). Every flag accepts its dash and
underscore spellings. ``VFCNN``, ``VFMLP`` and ``LCACNN --vf`` are the vector-field versions
(``vf_utils_ep_fast``).

With ``--save`` a run writes a run folder (``runs.py`` describes its files and owns its
lifecycle: records, checkpoints, per-epoch files, resume), one process at a time.

Under ``torchrun`` the same command runs data-parallel (``distributed.py``). Exit status: 0
done; 1 training diverged; 2 bad input; 74 a file could not be written or read (disk full,
read-only folder); 75 another process is writing the run folder; 130 Ctrl-C; 143 SIGTERM.
Errors are one line on stderr. Ctrl-C and SIGTERM save the weights and print the command that
resumes. On a cluster, one command line both starts and, requeued after a preemption, resumes a
run: ``--save --load-path DIR`` starts a new run in DIR while it holds no checkpoint, and
resumes it once it does.
"""

from __future__ import annotations

import signal
import sys


def _quit(signum, frame):  # until main() takes over
    sys.exit(128 + signum)


if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    signal.signal(signal.SIGINT, _quit)
    signal.signal(signal.SIGTERM, _quit)

import argparse
import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import compiled
import data_utils
import distributed
import precision
import runs
from data_utils import UsageError, warn
from lca_utils_ep_fast import DICT_MODES
from utils_ep_fast import (
    ACTIVATIONS,
    DYNAMICS,
    POOLS,
    EnergyNet,
    EPConfig,
    evaluate,
    gdu_check,
    make_optimizer,
    make_scheduler,
)

# --model choices; --model LCACNN --vf builds the model_config name VFLCACNN
MODELS = tuple(name for name in runs.MODEL_CLASSES if name != "VFLCACNN")
VF_MODELS = ("VFCNN", "VFMLP")
TODOS = ("train", "evaluate", "gducheck")
PROBE_IMAGES = 32

# Flags a resumed or evaluated run takes from the command line; the rest come from the saved run.
# --compile runs the same numbers, only faster.
READ_OVERRIDES = {"epochs", "device", "data_dir", "num_workers", "no_download", "dict_path"}
READ_OVERRIDES |= {"compile", "dist_timeout"}
RESUME_OVERRIDES = READ_OVERRIDES | {"lrs", "wds"}
EVALUATE_OVERRIDES = READ_OVERRIDES | {"T1", "mbs", "dynamics", "tol", "precision"}
GDUCHECK_OVERRIDES = EVALUATE_OVERRIDES | {"T2", "betas", "thirdphase", "save", "results_dir"}
# Range of every float flag but --betas: (lowest, excluded?, highest, excluded?); None: no bound.
FLOAT_RANGES = {
    "scale": (0, True, None, False),
    "lrs": (0, False, torch.finfo(torch.float32).max, False),
    "wds": (0, False, torch.finfo(torch.float32).max, False),
    "mmt": (0, False, 1, True),
    "lca_lambda": (0, False, None, False),
    "lca_tau": (0, True, None, False),
    "lca_eta": (0, False, None, False),
    "scale_feedback": (None, False, None, False),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the seed README, plus run-management flags."""
    parser = data_utils.command_parser(
        "main_fast.py", "Train energy-based RCNNs (optionally behind an LCA front end) with EP."
    )

    def add(name: str, **kwargs) -> None:
        dest = name[2:].replace("-", "_")
        parser.add_argument(*data_utils.flag_spellings(name), dest=dest, **kwargs)

    add("--model", choices=MODELS, default="MLP", help="network")
    add("--task", default="DIGITS", help=f"dataset, one of {', '.join(data_utils.TASKS)}")
    add("--data-aug", action="store_true", help="augment the training images")
    add("--lr-decay", action="store_true", help="cosine learning-rate decay")
    add("--scale", type=float, default=None, help="multiplier of the default weight init")
    add("--archi", type=int, nargs="+", default=None, help="MLP sizes; pixels 512 classes")
    add("--channels", type=int, nargs="+", default=[32, 64], help="feature maps per layer")
    add("--pools", default="mm", help="pool per layer: m max, a average, i none")
    add("--kernels", type=int, nargs="+", default=[5, 5], help="kernel size per conv")
    add("--strides", type=int, nargs="+", default=[1, 1], help="stride per conv")
    add("--paddings", type=int, nargs="+", default=[0, 0], help="padding per conv")
    add("--fc", type=int, nargs="+", default=[10], help="fully connected layer sizes")
    add("--act", choices=list(ACTIVATIONS), default="mysig", help="neuron activation")
    add("--todo", choices=TODOS, default="train", help="what to do")
    add("--alg", choices=("EP", "BPTT"), default="EP", help="training algorithm")
    add("--T1", type=int, default=20, help="free-phase steps")
    add("--T2", type=int, default=4, help="nudged-phase steps")
    add("--betas", type=float, nargs="+", default=[0.0, 0.01], help="beta1 beta2")
    add("--dynamics", choices=DYNAMICS, default="sync", help="sync or async (odd/even) steps")
    add("--tol", type=float, default=None, help="stop a phase once max|ds| < TOL (T1/T2 caps)")
    add("--random-sign", action="store_true", help="random sign of beta2 per batch")
    add("--thirdphase", action="store_true", help="nudge with +beta2 and -beta2")
    add("--loss", choices=("mse", "cel"), default="mse", help="loss")
    add("--softmax", action="store_true", help="softmax readout outside the system")
    add("--optim", choices=("sgd", "adam"), default="sgd", help="optimizer")
    add("--lrs", type=float, nargs="+", default=None, help="learning rate per synapse")
    add("--wds", type=float, nargs="+", default=None, help="weight decay per synapse")
    add("--mmt", type=float, default=0.0, help="SGD momentum")
    add("--lca_feats", type=int, default=64, help="LCA dictionary features")
    add("--lca_lambda", type=float, default=0.25, help="LCA threshold")
    add("--lca_tau", type=float, default=100.0, help="LCA time constant")
    add("--lca_eta", type=float, default=0.05, help="LCA dictionary learning rate")
    add("--lca_stride", type=int, default=2, help="LCA stride")
    add("--lca_iters", type=int, default=600, help="LCA iterations")
    add("--lca_ksize", type=int, default=9, help="LCA feature size (odd)")
    add("--scale_feedback", type=float, default=0.01, help="feedback scale into the LCA copy")
    add("--dict_training", choices=("", *DICT_MODES), default="", help="LCA dictionary mode")
    add("--vf", action="store_true", help="LCACNN with separate backward weights")
    add("--same-update", action="store_true", help="VF models: average forward/backward updates")
    add("--epochs", type=int, default=1, help="epochs to train (in total, when resuming)")
    add("--mbs", type=int, default=20, help="minibatch size")
    add("--device", default="0", help="GPU index (the CPU when CUDA is absent) or 'cpu'")
    add("--save", action="store_true", help="write the results folder")
    add("--seed", type=int, default=None, help="seed of every RNG and of the data order")
    add("--load-path", default=None, help="run folder to resume, evaluate or check")
    add("--data-dir", default="./data", help="where the datasets are")
    add("--results-dir", default="./results", help="where run folders go")
    add("--dict-path", default=None, help="dictionary file; ./dictionaries/<task>/dictionary.pt")
    add("--num-workers", type=int, default=None, help="loader workers (None: 4 on CUDA, else 0)")
    add("--compile", action="store_true", help="compiled phases (CUDA: replayed CUDA graphs)")
    add("--precision", choices=precision.PRECISIONS, default=None, help="None: torch's own")
    add("--no-download", action="store_true", help="never download a missing dataset")
    add("--dist-timeout", type=float, default=600.0, help="torchrun: collective timeout (s)")
    return parser


_UNSET = object()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, set[str]]:
    """The parsed arguments and the names of those typed on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # argparse only fills in defaults for names missing from the namespace it is given
    marked = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), _UNSET)))
    explicit = {name for name, value in vars(marked).items() if value is not _UNSET}
    return args, explicit


def note_unsaved(args: argparse.Namespace) -> None:
    """Say, once at the start, that a run without --save leaves no files."""
    if not args.save:
        print("note: no --save, so nothing is written to disk (results are only printed)")


# --------------------------------------------------------------------------------------------
# Checking the arguments
# --------------------------------------------------------------------------------------------


def fit_list(flag: str, values, needed: int, why: str):
    """The first ``needed`` of ``values`` (a list or a string of letters).

    Fewer is a UsageError; extra trailing values (as in the seed's commands) are dropped with
    a one-line warning.
    """
    if len(values) < needed:
        raise UsageError(f"--{flag} needs {needed} values ({why}), got {len(values)}: {values}")
    if len(values) > needed:
        extra = values[needed:]
        shown = extra if isinstance(extra, str) else " ".join(str(v) for v in extra)
        warn(f"--{flag}: {why}, so the first {needed} values are used; ignoring {shown}")
    return values[:needed]


def check_positive(args: argparse.Namespace, names: Sequence[str], minimum: int = 1) -> None:
    """UsageError unless every value of the flags ``names`` (numbers or lists) is >= minimum."""
    for name in names:
        values = getattr(args, name)
        values = values if isinstance(values, list) else [values]
        if any(v < minimum for v in values):
            raise UsageError(f"--{name} must be at least {minimum}, got {getattr(args, name)}")


def check_args(args: argparse.Namespace) -> None:
    """Validate a new run's arguments; trims list flags to what the architecture uses."""
    args.task = data_utils.canonical_task(args.task)
    in_channels, height, width, classes = data_utils.task_info(args.task)
    check_positive(args, ("T1", "T2", "epochs", "mbs"))
    if args.num_workers is not None:
        check_positive(args, ("num_workers",), minimum=0)
    data_utils.check_numbers(args, FLOAT_RANGES)
    check_betas(args)
    check_tol(args)
    if args.model == "LCACNN" and not args.dict_training:
        raise UsageError("LCACNN needs --dict_training pretrained, finetune or learn")
    if args.model != "LCACNN" and args.dict_training:
        warn(f"--dict_training {args.dict_training} ignored: only LCACNN has a dictionary")
        args.dict_training = ""
    check_vector_field(args)
    if args.model in ("MLP", "VFMLP"):
        if args.archi is None:
            args.archi = [in_channels * height * width, 512, classes]
        check_positive(args, ("archi",))
        if args.archi[0] != in_channels * height * width or args.archi[-1] != classes:
            raise UsageError(
                f"--archi must start with the {in_channels * height * width} input pixels of "
                f"{args.task} and end with its {classes} classes, got {args.archi}"
            )
        n_synapses = len(args.archi) - 1
    else:
        n_synapses = check_conv_args(args, classes)
    if args.lrs is None:
        raise UsageError(f"--lrs is required: one learning rate per synapse ({n_synapses} here)")
    why = f"one per synapse, {n_synapses} here"
    args.lrs = fit_list("lrs", args.lrs, n_synapses, why)
    if args.wds is not None:
        args.wds = fit_list("wds", args.wds, n_synapses, why)
    if args.dict_path is None:
        args.dict_path = str(Path("dictionaries") / args.task / "dictionary.pt")
    args.dict_path = runs.dictionary_file(args.dict_path)


def check_vector_field(args: argparse.Namespace) -> None:
    """``--vf`` only with LCACNN; ``--same-update`` only with a vector-field model."""
    if args.vf and args.model != "LCACNN":
        raise UsageError(
            f"--vf makes LCACNN a vector-field model; for {args.model} use --model VFCNN or VFMLP"
        )
    if args.same_update and not (args.vf or args.model in VF_MODELS):
        warn("--same-update ignored: only vector-field models (VFCNN, VFMLP, --vf) have it")
        args.same_update = False


def check_betas(args: argparse.Namespace) -> None:
    """``--betas`` is two finite numbers with a usable nudge; BPTT's T2 fits in T1."""
    if len(args.betas) != 2 or not all(math.isfinite(beta) for beta in args.betas):
        raise UsageError(f"--betas takes exactly two numbers (beta1 beta2), got {args.betas}")
    beta_1, beta_2 = args.betas
    if args.alg == "EP" and (beta_2 == 0 or beta_1 == beta_2):
        raise UsageError(
            f"EP needs a nudging beta2 that is non-zero and differs from beta1, got --betas "
            f"{beta_1} {beta_2} (e.g. --betas 0.0 0.5)"
        )
    if args.alg == "BPTT" and args.T2 > args.T1:
        raise UsageError(f"BPTT backpropagates the last T2 of T1 steps: T2 ({args.T2}) > T1")


def check_tol(args: argparse.Namespace) -> None:
    """``--tol`` is a positive finite number when given."""
    if args.tol is not None and not 0 < args.tol < math.inf:
        raise UsageError(f"--tol must be a positive number (e.g. --tol 1e-4), got {args.tol}")


def set_dynamics(model: EnergyNet, args: argparse.Namespace) -> None:
    """``--dynamics`` and ``--tol`` into the engine (runs saved without them get the defaults,
    sync steps and fixed T1/T2, through ``saved_args``)."""
    check_tol(args)
    model.set_dynamics(args.dynamics, args.tol)


def check_conv_args(args: argparse.Namespace, classes: int) -> int:
    """Validate the CNN / LCACNN layer lists; returns the number of synapses."""
    lca = args.model == "LCACNN"
    check_positive(args, ("channels", "kernels", "strides", "fc"))
    check_positive(args, ("paddings",), minimum=0)
    bad = sorted(set(args.pools) - set(POOLS))
    if bad:
        raise UsageError(f"--pools letters must be m, a or i; got {''.join(bad)} in {args.pools}")
    n_conv = len(args.channels) - 1 if lca else len(args.channels)
    copy_note = ", after the LCA copy layer" if lca else ""
    why = f"one per conv layer: {n_conv} for --channels {' '.join(map(str, args.channels))}"
    for flag in ("kernels", "strides", "paddings"):
        setattr(args, flag, fit_list(flag, getattr(args, flag), n_conv, why + copy_note))
    args.pools = fit_list("pools", args.pools, len(args.channels), "one per entry of --channels")
    if args.fc[-1] != classes:
        raise UsageError(f"the last --fc size must be the {classes} classes of {args.task}")
    if lca:
        check_positive(args, ("lca_feats", "lca_ksize", "lca_stride", "lca_iters"))
        if args.channels[0] != args.lca_feats:
            raise UsageError(
                f"with LCACNN the first --channels entry is the LCA copy layer and must equal "
                f"--lca_feats ({args.lca_feats}), got {args.channels[0]}"
            )
        if args.pools[0] != "i":
            raise UsageError(
                f"with LCACNN --pools must start with i (the copy layer): {args.pools}"
            )
        if args.lca_ksize % 2 == 0:
            raise UsageError(f"--lca_ksize must be odd (LCA pads 'same'), got {args.lca_ksize}")
    return n_conv + len(args.fc)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_training(
    args: argparse.Namespace, model_config: dict, device: torch.device
) -> tuple[EnergyNet, torch.optim.Optimizer, object]:
    """Model (on ``device``), optimizer and scheduler; architecture errors become UsageErrors."""
    try:
        model = runs.build_model(model_config).to(device)
        optimizer = make_optimizer(model, args.optim, args.lrs, args.wds, args.mmt)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return model, optimizer, make_scheduler(optimizer, args.lr_decay)


def load_pretrained_dictionary(model: EnergyNet, args: argparse.Namespace) -> None:
    """``pretrained`` and ``finetune`` start from the dictionary file; ``learn`` from random."""
    if args.model == "LCACNN" and args.dict_training != "learn":
        runs.load_model_dictionary(model, args.dict_path)


def ep_config(args: argparse.Namespace) -> EPConfig:
    """How the engine trains a batch, from the flags."""
    return EPConfig(
        alg=args.alg,
        T1=args.T1,
        T2=args.T2,
        betas=tuple(args.betas),
        random_sign=args.random_sign,
        thirdphase=args.thirdphase,
    )


# --------------------------------------------------------------------------------------------
# Device, seeds, data
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    """What a run reads: the training and test loaders and a fixed batch for the plots."""

    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    probe: tuple[Tensor, Tensor]  # first test images and labels, for the plots


def build_data(
    args: argparse.Namespace,
    device: torch.device,
    train_aug: bool,
    shuffle: bool,
    record: dict | None = None,
) -> Data:
    """Loaders of the EP training images (those the saved ``record`` names, if given) and of
    the test set, plus a fixed probe batch."""
    with distributed.local_main_first():  # one download per node
        train_set, test_set = data_utils.build_datasets(
            args.task, args.data_dir, data_aug=train_aug, download=not args.no_download
        )
    indices = runs.training_indices(args, len(train_set), record)
    workers = data_utils.loader_workers(args.num_workers, device)
    train_loader = data_utils.make_loader(
        train_set, args.mbs, shuffle, seed=args.seed, num_workers=workers, indices=indices
    )
    test_loader = data_utils.make_loader(test_set, args.mbs, False, num_workers=workers)
    # indexing the set (not iterating a loader) draws nothing from the RNGs
    items = [test_set[i] for i in range(min(PROBE_IMAGES, len(test_set)))]
    probe = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    return Data(train_loader, test_loader, probe)


# --------------------------------------------------------------------------------------------
# --todo train
# --------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """Train a new run, or resume the one at ``--load-path``; with ``--save``, a ``--load-path``
    folder without a checkpoint gets a new run (so one command line starts and resumes).

    Everything that can be refused is checked before the run folder is written to; the folder
    is locked (one writer) from before its checkpoint is read until the process ends.
    """
    with contextlib.ExitStack() as held:
        checkpoint, changed, run_dir = None, [], None
        if args.load_path:
            run_dir = Path(args.load_path)
            run_dir = run_dir.parent if run_dir.is_file() else run_dir
            args.load_path = str(run_dir)
            fresh = args.save and run_dir.suffix != ".pt" and runs.is_unstarted(run_dir)
            if fresh:
                print(f"notice: {run_dir} holds no checkpoint yet, so a new run starts there")
                check_args(args)
                if distributed.is_main_process():
                    runs.check_writable(run_dir, "load-path")
            if run_dir.is_dir() and distributed.is_main_process():
                held.enter_context(runs.FolderLock(run_dir))
            if not fresh:
                args, checkpoint, changed = load_checkpoint(args, explicit)
        else:
            check_args(args)
            if args.save and distributed.is_main_process():
                runs.check_writable(args.results_dir, "results-dir")
        note_unsaved(args)
        device = distributed.device_for(args.device)
        runs.seed_everything(args.seed)
        model_config = (
            checkpoint["model_config"] if checkpoint else runs.model_config_from_args(args)
        )
        model, optimizer, scheduler = build_training(args, model_config, device)
        set_dynamics(model, args)
        if checkpoint:
            runs.restore_training_state(checkpoint, model, optimizer, scheduler)
            if changed:
                runs.override_rates(optimizer, scheduler, args.lrs, args.wds)
        else:
            load_pretrained_dictionary(model, args)
        compiled.install(model, args.compile, precision.apply(args.precision, device))
        data = build_data(args, device, args.data_aug, shuffle=True, record=checkpoint)
        probe = [tensor.to(device) for tensor in data.probe]
        precision.check_ep_update(model, *probe, ep_config(args), args.precision)
        start_epoch = checkpoint["epoch"] if checkpoint else 0
        if checkpoint:
            runs.restore_rng(checkpoint, data.train_loader)
        recorder = None
        if args.save and distributed.is_main_process():  # nothing was written before this
            parts = model, model_config, optimizer, scheduler, data.train_loader, data.probe
            command = ["python", "main_fast.py", *argv]
            recorder = runs.start_recording(
                held, run_dir, parts, args, command, checkpoint, changed
            )
        train_batches = distributed.split_batches(data.train_loader, optimizer)
        loaders = train_batches, distributed.shard_evaluation(data.test_loader)
        return runs.train_run(
            model,
            optimizer,
            scheduler,
            loaders,
            ep_config(args),
            device,
            start_epoch,
            recorder,
            args,
            distributed.sum_totals,
        )


def load_checkpoint(
    typed: argparse.Namespace, explicit: set[str]
) -> tuple[argparse.Namespace, dict, list[str]]:
    """The checkpoint of the run folder ``--load-path``, the arguments to resume it with, and
    which of ``--lrs`` / ``--wds`` the command line changes."""
    checkpoint = runs.load_checkpoint(typed.load_path)
    args = runs.saved_args(checkpoint["args"], typed, explicit, RESUME_OVERRIDES)
    check_positive(args, ("epochs",))
    if checkpoint["epoch"] >= args.epochs:
        raise UsageError(
            f"{typed.load_path} already has {checkpoint['epoch']} epochs; pass --epochs N "
            f"with N > {checkpoint['epoch']} to train further"
        )
    changed = []
    n_synapses = len(checkpoint["optimizer_state"]["param_groups"])
    for name in sorted({"lrs", "wds"} & explicit):
        values = fit_list(name, getattr(args, name), n_synapses, f"one per synapse, {n_synapses}")
        setattr(args, name, values)
        if values != checkpoint["args"].get(name):  # a requeued command line changes nothing
            changed.append(name)
            print(f"notice: --{name} {' '.join(map(str, values))} replaces the saved values "
                  f"from epoch {checkpoint['epoch']} on")  # fmt: skip
    data_utils.check_numbers(args, {name: FLOAT_RANGES[name] for name in changed})
    return args, checkpoint, changed


# --------------------------------------------------------------------------------------------
# --todo evaluate and --todo gducheck
# --------------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """Train and test accuracy of a saved run's model, printed and added to its
    hyperparameters.txt."""
    if not args.load_path:
        raise UsageError("--todo evaluate needs --load-path RUN_DIR (a folder of a saved run)")
    record, path = runs.load_model_file(args.load_path)
    args = runs.saved_args(record["args"], args, explicit, EVALUATE_OVERRIDES)
    check_positive(args, ("T1", "mbs"))
    device = distributed.device_for(args.device)
    model = runs.restore_model(record, device)
    set_dynamics(model, args)
    compiled.install(model, args.compile, precision.apply(args.precision, device))
    data = build_data(args, device, train_aug=False, shuffle=False, record=record)
    shard, total = distributed.shard_evaluation, distributed.sum_totals
    train_acc = evaluate(model, shard(data.train_loader), args.T1, device, "train set", total)
    test_acc = evaluate(model, shard(data.test_loader), args.T1, device, "test set", total)
    line = (
        f"evaluate {path.name} (epoch {record['epoch']}, T1 {args.T1}, {args.dynamics}"
        f"{'' if args.tol is None else f', tol {args.tol}'}): "
        f"train_acc {train_acc:.4f} test_acc {test_acc:.4f}"
    )
    print(line)
    if distributed.is_main_process():
        runs.append_text(path.parent, runs.HYPERPARAMETERS_TXT, line)
    return 0


def run_gducheck(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """EP's nudged-phase updates against BPTT's gradients on one training batch, for a new
    model or the saved one at ``--load-path``."""
    record = None
    if args.load_path:
        record, _ = runs.load_model_file(args.load_path)
        args = runs.saved_args(record["args"], args, explicit, GDUCHECK_OVERRIDES)
        check_betas(args)
        device = distributed.device_for(args.device)
        model = runs.restore_model(record, device)
    else:
        check_args(args)
        note_unsaved(args)
        device = distributed.device_for(args.device)
        runs.seed_everything(args.seed)
        model, _, _ = build_training(args, runs.model_config_from_args(args), device)
        load_pretrained_dictionary(model, args)
    if args.save:
        runs.check_writable(args.results_dir, "results-dir")
    set_dynamics(model, args)
    compiled.install(model, args.compile, precision.apply(args.precision, device))
    data = build_data(args, device, train_aug=False, shuffle=False, record=record)
    x, y = next(iter(data.train_loader))
    x, y = x.to(device), y.to(device)
    report = gdu_check(model, x, y, ep_config(args))
    print(f"{'parameter':<28} {'relative RMSE':>14} {'sign errors':>12}")
    for name, entry in report.items():
        print(f"{name:<28} {entry['rel_rmse']:>14.4f} {entry['sign_error']:>12.3f}")
    precision.check_ep_update(model, x, y, ep_config(args), args.precision, refuse=False)
    if args.save and distributed.is_main_process():
        run_dir = runs.new_run_dir(args)
        runs.write_hyperparameters(run_dir, ["python", "main_fast.py", *argv], vars(args))
        runs.save_figure(data_utils.plot_gdu(report), run_dir / "gdu.png")
        print(f"GDU plot: {run_dir / 'gdu.png'}")
    return 0


TODO_RUNNERS: dict[str, Callable[[argparse.Namespace, set[str], list[str]], int]] = {
    "train": run_train,
    "evaluate": run_evaluate,
    "gducheck": run_gducheck,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status. Under
    torchrun every rank runs it, and a failure on any rank stops them all (``distributed``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed.quiet_unless_rank_zero()
    try:
        args, explicit = parse_args(argv)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except UsageError as error:
        print(f"error: {data_utils.one_line(str(error))}", file=sys.stderr)
        return data_utils.EXIT_USAGE
    todo = functools.partial(run_todo, args, explicit, argv)
    if distributed.launched():
        typed = "device" in explicit
        return distributed.run(todo, args.device, typed, args.dist_timeout, runs.ERROR_STATUSES)
    try:
        return todo()
    except tuple(kind for kind, _ in runs.ERROR_STATUSES) as error:
        status = next(status for kind, status in runs.ERROR_STATUSES if isinstance(error, kind))
        print(f"error: {data_utils.one_line(str(error))}", file=sys.stderr)
        return status
    except OSError as error:
        fix = "check the free space and permissions there (--results-dir, --data-dir)"
        print(f"error: {data_utils.storage_message(error, fix)}", file=sys.stderr)
        return data_utils.EXIT_STORAGE
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, data_utils.Terminated)
        print(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return data_utils.exit_status_of(interrupt)


def run_todo(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """``--todo``'s runner, with SIGINT and SIGTERM raised as interrupts."""
    with data_utils.signals_as_interrupts():
        return TODO_RUNNERS[args.todo](args, explicit, argv)


if __name__ == "__main__":
    sys.exit(main())
