"""Command line for training energy-based RCNNs with Equilibrium Propagation (EP).

    python main_fast.py --model CNN --task CIFAR10 ... --todo train --save
    python main_fast.py --load-path RUN_DIR --epochs 40               # resume training
    python main_fast.py --todo evaluate --load-path RUN_DIR           # train/test accuracy
    python main_fast.py --todo gducheck ...                           # EP updates vs BPTT

This file parses and checks the flags, then dispatches: it builds the datasets, the model
(``P_CNN``, ``LCA_CNN`` or ``P_MLP``), the optimizer and the scheduler, and hands them to the
engine (``utils_ep_fast``) and to ``runs`` (the run folder). Every flag accepts its dash and
underscore spellings.

With ``--save`` a run writes a run folder (``runs.py`` describes its files and owns its
lifecycle: records, checkpoints, per-epoch files, resume).

Under ``torchrun`` the same command runs data-parallel (``distributed.py``). Exit status: 0
done, 1 training diverged, 2 bad input (message on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import data_utils
import distributed
import runs
from data_utils import UsageError, warn
from lca_utils_ep_fast import DICT_MODES
from utils_ep_fast import (
    ACTIVATIONS,
    POOLS,
    DivergenceError,
    EnergyNet,
    EPConfig,
    evaluate,
    gdu_check,
    make_optimizer,
    make_scheduler,
    train,
)

MODELS = tuple(runs.MODEL_CLASSES)
TODOS = ("train", "evaluate", "gducheck")
PROBE_IMAGES = 32

# Flags a resumed or evaluated run takes from the command line; the rest come from the saved run.
RESUME_OVERRIDES = {"epochs", "device", "data_dir", "num_workers", "no_download", "dict_path",
                    "dist_timeout"}  # fmt: skip
EVALUATE_OVERRIDES = RESUME_OVERRIDES | {"T1", "mbs"}
GDUCHECK_OVERRIDES = EVALUATE_OVERRIDES | {"T2", "betas", "thirdphase", "save", "results_dir"}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors, so ``main`` reports them like the rest."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the seed README, plus run-management flags."""
    parser = _Parser(
        prog="main_fast.py",
        description="Train energy-based RCNNs (optionally behind an LCA front end) with EP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
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
    add("--epochs", type=int, default=1, help="epochs to train (in total, when resuming)")
    add("--mbs", type=int, default=20, help="minibatch size")
    add("--device", default="0", help="GPU index (the CPU when CUDA is absent) or 'cpu'")
    add("--save", action="store_true", help="write the results folder")
    add("--seed", type=int, default=None, help="seed of every RNG and of the data order")
    add("--load-path", default=None, help="run folder to resume, evaluate or check")
    add("--data-dir", default="./data", help="where the datasets are")
    add("--results-dir", default="./results", help="where run folders go")
    add("--dict-path", default=None, help="dictionary file; ./dictionaries/<task>/dictionary.pt")
    add("--num-workers", type=int, default=0, help="data loader worker processes")
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
    check_positive(args, ("num_workers",), minimum=0)
    check_betas(args)
    if args.model == "LCACNN" and not args.dict_training:
        raise UsageError("LCACNN needs --dict_training pretrained, finetune or learn")
    if args.model != "LCACNN" and args.dict_training:
        warn(f"--dict_training {args.dict_training} ignored: only LCACNN has a dictionary")
        args.dict_training = ""
    if args.model == "MLP":
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
    rates = [*args.lrs, *(args.wds or []), args.mmt]
    if not all(0 <= rate <= torch.finfo(torch.float32).max for rate in rates):
        raise UsageError("--lrs, --wds and --mmt must be finite and not negative")
    if args.dict_path is None:
        args.dict_path = str(Path("dictionaries") / args.task / "dictionary.pt")


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
        if args.lca_ksize % 2 == 0 or args.lca_tau <= 0 or args.lca_lambda < 0:
            raise UsageError("--lca_ksize must be odd, --lca_tau > 0 and --lca_lambda >= 0")
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


def build_data(args: argparse.Namespace, train_aug: bool, shuffle: bool) -> Data:
    """Loaders of the EP training images and of the test set, plus a fixed probe batch."""
    with distributed.local_main_first():  # one download per node
        train_set, test_set = data_utils.build_datasets(
            args.task, args.data_dir, data_aug=train_aug, download=not args.no_download
        )
    indices = runs.training_indices(args, len(train_set))
    workers = args.num_workers
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
    """Train a new run, or resume the one at ``--load-path``."""
    checkpoint = None
    if args.load_path:
        args, checkpoint = load_checkpoint(args, explicit)
    else:
        check_args(args)
    note_unsaved(args)
    device = distributed.device_for(args.device)
    runs.seed_everything(args.seed)
    model_config = checkpoint["model_config"] if checkpoint else runs.model_config_from_args(args)
    model, optimizer, scheduler = build_training(args, model_config, device)
    if checkpoint:
        runs.restore_training_state(checkpoint, model, optimizer, scheduler)
    else:
        load_pretrained_dictionary(model, args)
    data = build_data(args, train_aug=args.data_aug, shuffle=True)
    recorder = None
    if args.save and distributed.is_main_process():
        run_dir = Path(args.load_path) if checkpoint else runs.new_run_dir(args)
        recorder = runs.RunRecorder(
            run_dir, model, model_config, optimizer, scheduler, data.train_loader, data.probe, args
        )
        command = ["python", "main_fast.py", *argv]
        if checkpoint:
            recorder.resume_from(checkpoint, command)
        else:
            recorder.start(command)
        print(f"run folder: {run_dir}")
    start_epoch = 0
    if checkpoint:
        runs.restore_rng(checkpoint, data.train_loader)
        start_epoch = checkpoint["epoch"]
    try:
        train(
            model,
            optimizer,
            distributed.split_batches(data.train_loader, optimizer),
            distributed.shard_evaluation(data.test_loader),
            ep_config(args),
            args.epochs,
            device,
            scheduler,
            start_epoch,
            recorder,
            distributed.sum_totals,
        )
    except DivergenceError as error:
        raise DivergenceError(runs.divergence_message(error, recorder)) from error
    except KeyboardInterrupt:
        runs.report_interrupt(recorder, args)
        return 130
    if recorder is not None:
        recorder.finish()
        print(f"best test accuracy {recorder.best_test_acc:.4f}; results in {recorder.run_dir}")
    return 0


def load_checkpoint(
    typed: argparse.Namespace, explicit: set[str]
) -> tuple[argparse.Namespace, dict]:
    """The checkpoint of the run at ``--load-path`` (a run folder or a file in it) and the
    arguments to resume it with."""
    folder = Path(typed.load_path)
    typed.load_path = str(folder.parent if folder.is_file() else folder)
    checkpoint = runs.load_checkpoint(typed.load_path)
    args = runs.saved_args(checkpoint["args"], typed, explicit, RESUME_OVERRIDES)
    check_positive(args, ("epochs",))
    if checkpoint["epoch"] >= args.epochs:
        raise UsageError(
            f"{typed.load_path} already has {checkpoint['epoch']} epochs; pass --epochs N "
            f"with N > {checkpoint['epoch']} to train further"
        )
    return args, checkpoint


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
    data = build_data(args, train_aug=False, shuffle=False)
    shard, total = distributed.shard_evaluation, distributed.sum_totals
    train_acc = evaluate(model, shard(data.train_loader), args.T1, device, "train set", total)
    test_acc = evaluate(model, shard(data.test_loader), args.T1, device, "test set", total)
    line = (
        f"evaluate {path.name} (epoch {record['epoch']}, T1 {args.T1}): "
        f"train_acc {train_acc:.4f} test_acc {test_acc:.4f}"
    )
    print(line)
    if distributed.is_main_process():
        runs.append_text(path.parent, runs.HYPERPARAMETERS_TXT, line)
    return 0


def run_gducheck(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """EP's nudged-phase updates against BPTT's gradients on one training batch, for a new
    model or the saved one at ``--load-path``."""
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
    x, y = next(iter(build_data(args, train_aug=False, shuffle=False).train_loader))
    report = gdu_check(model, x.to(device), y.to(device), ep_config(args))
    print(f"{'parameter':<28} {'relative RMSE':>14} {'sign errors':>12}")
    for name, entry in report.items():
        print(f"{name:<28} {entry['rel_rmse']:>14.4f} {entry['sign_error']:>12.3f}")
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
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed.quiet_unless_rank_zero()
    try:
        args, explicit = parse_args(argv)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    todo = functools.partial(TODO_RUNNERS[args.todo], args, explicit, argv)
    if distributed.launched():
        return distributed.run(todo, args.device, "device" in explicit, args.dist_timeout)
    try:
        return todo()
    except DivergenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
