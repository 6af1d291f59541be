"""Command line for training energy-based RCNNs with Equilibrium Propagation (EP).

    python main_fast.py --model CNN --task CIFAR10 ... --todo train --save
    python main_fast.py --load-path RUN_DIR --epochs 40               # resume training
    python main_fast.py --todo evaluate --load-path RUN_DIR           # train/test accuracy
    python main_fast.py --todo gducheck ...                           # EP updates vs BPTT

This file only wires things together: it parses and checks the flags, builds the datasets, the
model (``P_CNN``, ``LCA_CNN`` or ``P_MLP``), the optimizer and the scheduler, and hands them to
the engine (``utils_ep_fast``). Every flag accepts its dash and underscore spellings.

With ``--save`` a run writes ``<results-dir>/<task>/<alg>/<model>/<dict_training|none>/<date>/
run_<N>/``:

    hyperparameters.txt   the command line, then every argument (evaluations are appended)
    results.csv           one row per epoch: train/test accuracy, LCA metrics, learning rate, time
    *.png                 accuracy, LCA sparsity / reconstruction error, neural activity,
                          dictionaries, reconstructions
    checkpoint.pt         rewritten atomically after every epoch, to resume from
    model.pt              the epoch with the best test accuracy; final_model.pt the last one

Checkpoint (``checkpoint.pt``): ``model_config`` ({"model": "CNN" | "LCACNN" | "MLP", "kwargs":
constructor arguments}), ``model_state``, ``optimizer_state``, ``scheduler_state`` (or None),
``epoch`` (epochs done), ``rng_state`` ({"global": data_utils.get_rng_state(), "train_loader":
the loader generator's state or None}), ``history`` (the results.csv rows), ``best_test_acc`` and
``args`` (every argument, plain values). ``model.pt``, ``final_model.pt`` and ``interrupted.pt``
hold ``model_config``, ``model_state``, ``epoch``, ``test_acc`` and ``args``. All are plain
tensors and containers, read back with ``torch.load(..., weights_only=True)``.

Exit status: 0 done, 1 training diverged, 2 bad input (message on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import data_utils
from data_utils import UsageError
from lca import DictionaryError, subset_indices_path
from lca_utils_ep_fast import DICT_MODES, LCA_CNN, ep_training_indices
from utils_ep_fast import (
    ACTIVATIONS,
    DYNAMICS,
    P_CNN,
    P_MLP,
    POOLS,
    DivergenceError,
    EnergyNet,
    EPConfig,
    check_finite,
    evaluate,
    gdu_check,
    make_optimizer,
    make_scheduler,
    settle,
    settling_trace,
    train,
)

MODELS = ("CNN", "LCACNN", "MLP")
TODOS = ("train", "evaluate", "gducheck")
CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
FINAL_MODEL = "final_model.pt"
INTERRUPTED = "interrupted.pt"
PROBE_IMAGES = 32
RECON_IMAGES = 8
SETTLING_IMAGES = 8

# Flags a resumed or evaluated run takes from the command line; the rest come from the saved run.
RESUME_OVERRIDES = {"epochs", "device", "data_dir", "num_workers", "no_download", "dict_path"}
EVALUATE_OVERRIDES = RESUME_OVERRIDES | {"T1", "mbs", "dynamics", "tol"}
GDUCHECK_OVERRIDES = EVALUATE_OVERRIDES | {"T2", "betas", "thirdphase", "save", "results_dir"}
SESSION_FLAGS = {"todo", "load_path"}


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
        word = name[2:]
        spellings = dict.fromkeys([word, word.replace("-", "_"), word.replace("_", "-")])
        parser.add_argument(*(f"--{s}" for s in spellings), dest=word.replace("-", "_"), **kwargs)

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


def warn(message: str) -> None:
    """One ``warning:`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


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
    check_tol(args)
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
        if args.lca_ksize % 2 == 0 or args.lca_tau <= 0 or args.lca_lambda < 0:
            raise UsageError("--lca_ksize must be odd, --lca_tau > 0 and --lca_lambda >= 0")
    return n_conv + len(args.fc)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def model_config_from_args(args: argparse.Namespace) -> dict:
    """``{"model": name, "kwargs": constructor arguments}`` in plain Python types."""
    in_channels, height, _, _ = data_utils.task_info(args.task)
    common = {
        "activation": args.act,
        "softmax": args.softmax,
        "loss": args.loss,
        "scale": args.scale,
    }
    if args.model == "MLP":
        return {"model": "MLP", "kwargs": {"archi": list(args.archi), **common}}
    kwargs = {
        "in_size": height,
        "in_channels": in_channels,
        "channels": list(args.channels),
        "kernels": list(args.kernels),
        "strides": list(args.strides),
        "paddings": list(args.paddings),
        "pools": args.pools,
        "fc": list(args.fc),
        **common,
    }
    if args.model == "LCACNN":
        kwargs.update(
            lca_feats=args.lca_feats,
            lca_ksize=args.lca_ksize,
            lca_stride=args.lca_stride,
            lca_lambda=args.lca_lambda,
            lca_tau=args.lca_tau,
            lca_eta=args.lca_eta,
            lca_iters=args.lca_iters,
            scale_feedback=args.scale_feedback,
            dict_training=args.dict_training,
        )
    return {"model": args.model, "kwargs": kwargs}


def build_model(model_config: dict) -> EnergyNet:
    """The network described by ``model_config`` (see ``model_config_from_args``)."""
    classes = {"CNN": P_CNN, "LCACNN": LCA_CNN, "MLP": P_MLP}
    return classes[model_config["model"]](**model_config["kwargs"])


def build_training(
    args: argparse.Namespace, model_config: dict, device: torch.device
) -> tuple[EnergyNet, torch.optim.Optimizer, object]:
    """Model (on ``device``), optimizer and scheduler; architecture errors become UsageErrors."""
    try:
        model = build_model(model_config).to(device)
        optimizer = make_optimizer(model, args.optim, args.lrs, args.wds, args.mmt)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return model, optimizer, make_scheduler(optimizer, args.lr_decay)


def load_pretrained_dictionary(model: EnergyNet, args: argparse.Namespace) -> None:
    """``pretrained`` and ``finetune`` start from the dictionary file; ``learn`` from random."""
    if args.model == "LCACNN" and args.dict_training != "learn":
        model.load_dictionary(args.dict_path)


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


def resolve_device(spec: str) -> torch.device:
    """``--device N``: ``cuda:N`` when CUDA is available, else the CPU (with a notice)."""
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.isdigit():
        raise UsageError(f"--device takes a GPU index or 'cpu', got {spec!r}")
    if not torch.cuda.is_available():
        print("notice: CUDA is not available, running on the CPU")
        return torch.device("cpu")
    if int(spec) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
    torch.backends.cudnn.benchmark = True
    return torch.device(f"cuda:{spec}")


def seed_everything(seed: int | None) -> None:
    """Seed Python's, numpy's and torch's RNGs (all devices); nothing when ``seed`` is None."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def training_indices(args: argparse.Namespace, n_train: int) -> Tensor | None:
    """Which training images EP uses: with a pretrained or finetuned dictionary, those it was
    not learnt on; otherwise all of them (None)."""
    if args.model != "LCACNN":
        return None
    if args.dict_training == "learn":
        if Path(subset_indices_path(args.dict_path)).is_file():
            print(f"learn: training on all {n_train} images (the dictionary subset is not used)")
        return None
    try:
        indices = ep_training_indices(n_train, args.dict_path)
    except IndexError as error:
        raise UsageError(
            f"the subset indices next to {args.dict_path} do not fit the {n_train} training "
            f"images of {args.task}: was the dictionary learnt on another task?"
        ) from error
    if len(indices) == 0:
        raise UsageError(f"the dictionary {args.dict_path} was learnt on every training image")
    print(
        f"EP trains on {len(indices)} of {n_train} training images (the other "
        f"{n_train - len(indices)} were used to learn the dictionary)"
    )
    return indices


@dataclass
class Data:
    """What a run reads: the training and test loaders and a fixed batch for the plots."""

    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    probe: tuple[Tensor, Tensor]  # first test images and labels, for the plots


def build_data(args: argparse.Namespace, train_aug: bool, shuffle: bool) -> Data:
    """Loaders of the EP training images and of the test set, plus a fixed probe batch."""
    train_set, test_set = data_utils.build_datasets(
        args.task, args.data_dir, data_aug=train_aug, download=not args.no_download
    )
    indices = training_indices(args, len(train_set))
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
# Saved files
# --------------------------------------------------------------------------------------------


def load_record(path: Path, what: str, keys: Sequence[str]) -> dict:
    """A dict saved by this program at ``path``, checked to hold ``keys``."""
    record = data_utils.safe_load(path, what)
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise UsageError(f"{path} is not a {what} written by main_fast.py (keys missing)")
    return record


def model_record(model: EnergyNet, model_config: dict, epoch: int, test_acc, args) -> dict:
    """What ``model.pt``, ``final_model.pt`` and ``interrupted.pt`` hold."""
    return {
        "model_config": model_config,
        "model_state": model.state_dict(),
        "epoch": epoch,
        "test_acc": test_acc,
        "args": vars(args),
    }


def load_model_file(load_path: str) -> tuple[dict, Path]:
    """``model.pt`` of a run folder (else ``final_model.pt``), or the model file given."""
    path = Path(load_path)
    if path.is_dir():
        path = path / BEST_MODEL if (path / BEST_MODEL).is_file() else path / FINAL_MODEL
    keys = ("model_config", "model_state", "epoch", "test_acc", "args")
    return load_record(path, "model file", keys), path


def restore_model(record: dict, device: torch.device) -> EnergyNet:
    """The model of a saved record, rebuilt from its configuration, on ``device``, with the
    run's dynamics and tolerance."""
    try:
        model = build_model(record["model_config"])
        model.load_state_dict(record["model_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UsageError(f"the saved model does not rebuild: {error}") from error
    saved = record["args"]  # runs saved before --dynamics and --tol existed: the defaults
    model.set_dynamics(saved.get("dynamics", "sync"), saved.get("tol"))
    return model.to(device)


def saved_args(
    saved: dict, typed: argparse.Namespace, explicit: set[str], overrides: set[str]
) -> argparse.Namespace:
    """The saved run's arguments, with the typed flags among ``overrides`` on top."""
    # defaults first, for any flag newer than the saved run
    args = argparse.Namespace(**{**vars(typed), **saved})
    ignored = []
    for name in sorted(explicit - SESSION_FLAGS):
        if name in overrides:
            setattr(args, name, getattr(typed, name))
        elif getattr(typed, name) != saved.get(name):
            ignored.append(f"--{name}")
    if ignored:
        warn(f"{', '.join(ignored)} ignored: the settings of {typed.load_path} are used")
    args.todo, args.load_path = typed.todo, typed.load_path
    return args


# --------------------------------------------------------------------------------------------
# Plots and per-epoch records
# --------------------------------------------------------------------------------------------


def plot_neural_activity(model: EnergyNet, probe: tuple[Tensor, Tensor], T: int, path) -> None:
    """Histograms of the free-phase states (and the LCA code) on the probe batch."""
    device = next(model.parameters()).device
    x, y = probe[0].to(device), probe[1].to(device)
    encoding, neurons = settle(model, x, y, T)
    names = [
        f"layer {k + 1} ({kind}, {'x'.join(map(str, shape))})"
        for k, (kind, shape) in enumerate(zip(model.link_kinds, model.layer_shapes, strict=True))
    ]
    if isinstance(model, LCA_CNN):
        neurons, names = [encoding.code, *neurons], ["LCA code", *names]
    data_utils.plot_neural_activity(neurons, path, names)


def plot_settling(model: EnergyNet, probe: tuple[Tensor, Tensor], args, path: Path) -> None:
    """Energy and max|ds| per step of the free and nudged phases, sync and async, on a few
    probe images (``SETTLING_IMAGES``)."""
    device = next(model.parameters()).device
    x, y = probe[0][:SETTLING_IMAGES].to(device), probe[1][:SETTLING_IMAGES].to(device)
    traces = settling_trace(model, x, y, args.T1, args.T2, tuple(args.betas))
    title = f"{len(y)} test images, T1 {args.T1}, T2 {args.T2}, betas {args.betas}"
    data_utils.plot_settling(traces, path, title)


@torch.no_grad()
def plot_reconstructions(model: LCA_CNN, images: Tensor, path: Path) -> None:
    """Test images and their LCA reconstructions with the initial and the final dictionary."""
    images = images[:RECON_IMAGES].to(model.initial_dictionary.device)
    final = model.lca.get_weights()
    inputs, final_recon = model.reconstruct(images)
    if model.dict_training == "pretrained":
        rows = {"LCA reconstruction": final_recon}
    else:
        model.lca.assign_weight_values(model.initial_dictionary.clone(), normalize=False)
        _, initial_recon = model.reconstruct(images)
        model.lca.assign_weight_values(final, normalize=False)
        rows = {"initial dictionary": initial_recon, "final dictionary": final_recon}
    data_utils.plot_reconstructions(inputs, rows, path, n_images=RECON_IMAGES)


def csv_row(metrics: dict) -> dict:
    """results.csv columns: epoch, accuracies, the model's extra metrics, lr, seconds."""
    first, last = ("epoch", "train_acc", "test_acc"), ("lr", "seconds")
    extra = [name for name in metrics if name not in first + last]
    return {name: metrics[name] for name in (*first, *extra, *last)}


def sync_results_csv(run_dir: Path, history: list[dict]) -> None:
    """Make results.csv hold exactly the checkpoint's rows (a crash may leave one extra)."""
    path = run_dir / data_utils.RESULTS_CSV
    rows = data_utils.read_results(run_dir) if path.is_file() else []
    if len(rows) == len(history):
        return
    warn(f"{path} did not match the checkpoint's {len(history)} epochs; rewriting it")
    path.unlink(missing_ok=True)
    for row in history:
        data_utils.append_results_row(run_dir, row)


class RunRecorder:
    """Writes a run folder's per-epoch files; called by ``train`` after every epoch."""

    def __init__(self, run_dir: Path, model, model_config, optimizer, scheduler, data, args):
        self.run_dir = run_dir
        self.model = model
        self.model_config = model_config
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.args = args
        self.history: list[dict] = []
        self.best_test_acc = -1.0
        self.epoch = 0

    def resume_from(self, checkpoint: dict, command: list[str]) -> None:
        """Carry on the checkpointed run's records; note the resume in hyperparameters.txt."""
        self.history = list(checkpoint["history"])
        self.best_test_acc = checkpoint["best_test_acc"]
        self.epoch = checkpoint["epoch"]
        sync_results_csv(self.run_dir, self.history)
        data_utils.append_text(
            self.run_dir, data_utils.HYPERPARAMETERS_TXT, f"resumed: {shlex.join(command)}"
        )

    def start(self, command: list[str]) -> None:
        """The files of a new run: its command line and arguments, the starting dictionary."""
        data_utils.write_hyperparameters(self.run_dir, command, vars(self.args))
        if isinstance(self.model, LCA_CNN):
            pretrained = self.args.dict_training == "pretrained"
            filename = "dictionary.png" if pretrained else "dictionary_epoch0.png"
            self.plot_dictionary(filename, "initial dictionary")

    def plot_dictionary(self, filename: str, title: str) -> None:
        """The LCA dictionary as it is now, as a grid of features."""
        data_utils.plot_dictionary(self.model.lca.get_weights(), self.run_dir / filename, title)

    def __call__(self, epoch: int, metrics: dict) -> None:
        check_finite(self.model)
        row = csv_row(metrics)
        self.history.append(row)
        if row["test_acc"] > self.best_test_acc:
            self.best_test_acc = row["test_acc"]
            self.save_model(BEST_MODEL, epoch, row["test_acc"])
        data_utils.atomic_save(self.checkpoint(epoch), self.run_dir / CHECKPOINT)
        self.epoch = epoch
        data_utils.append_results_row(self.run_dir, row)
        data_utils.plot_metrics(self.run_dir)
        path = self.run_dir / "neural_activity.png"
        plot_neural_activity(self.model, self.data.probe, self.args.T1, path)
        plot_settling(self.model, self.data.probe, self.args, self.run_dir / "settling.png")
        if isinstance(self.model, LCA_CNN) and self.args.dict_training != "pretrained":
            self.plot_dictionary(f"dictionary_epoch{epoch}.png", f"dictionary after epoch {epoch}")

    def checkpoint(self, epoch: int) -> dict:
        """Everything needed to carry on after ``epoch`` exactly (see the module docstring)."""
        generator = self.data.train_loader.generator
        return {
            "model_config": self.model_config,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": epoch,
            "rng_state": {
                "global": data_utils.get_rng_state(),
                "train_loader": generator.get_state() if generator is not None else None,
            },
            "history": self.history,
            "best_test_acc": self.best_test_acc,
            "args": vars(self.args),
        }

    def save_model(self, filename: str, epoch: int, test_acc) -> None:
        """The current weights and configuration, written atomically to ``filename``."""
        record = model_record(self.model, self.model_config, epoch, test_acc, self.args)
        data_utils.atomic_save(record, self.run_dir / filename)

    def finish(self) -> None:
        """After the last epoch: ``final_model.pt`` and, with LCA, the reconstructions."""
        test_acc = self.history[-1]["test_acc"] if self.history else None
        self.save_model(FINAL_MODEL, self.epoch, test_acc)
        if isinstance(self.model, LCA_CNN):
            plot_reconstructions(
                self.model, self.data.probe[0], self.run_dir / "reconstructions.png"
            )


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
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model_config = checkpoint["model_config"] if checkpoint else model_config_from_args(args)
    model, optimizer, scheduler = build_training(args, model_config, device)
    set_dynamics(model, args)
    if checkpoint:
        restore_training_state(checkpoint, model, optimizer, scheduler)
    else:
        load_pretrained_dictionary(model, args)
    data = build_data(args, train_aug=args.data_aug, shuffle=True)
    recorder = None
    if args.save:
        run_dir = Path(args.load_path) if checkpoint else new_run_dir(args)
        recorder = RunRecorder(run_dir, model, model_config, optimizer, scheduler, data, args)
        command = ["python", "main_fast.py", *argv]
        if checkpoint:
            recorder.resume_from(checkpoint, command)
        else:
            recorder.start(command)
        print(f"run folder: {run_dir}")
    start_epoch = 0
    if checkpoint:
        restore_rng(checkpoint, data.train_loader)
        start_epoch = checkpoint["epoch"]
    try:
        train(
            model,
            optimizer,
            data.train_loader,
            data.test_loader,
            ep_config(args),
            args.epochs,
            device,
            scheduler,
            start_epoch,
            recorder,
        )
    except DivergenceError as error:
        raise DivergenceError(divergence_message(error, recorder)) from error
    except KeyboardInterrupt:
        report_interrupt(recorder, args)
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
    checkpoint = load_record(
        Path(typed.load_path) / CHECKPOINT,
        "checkpoint",
        ("model_config", "model_state", "optimizer_state", "epoch", "rng_state", "args"),
    )
    args = saved_args(checkpoint["args"], typed, explicit, RESUME_OVERRIDES)
    check_positive(args, ("epochs",))
    if checkpoint["epoch"] >= args.epochs:
        raise UsageError(
            f"{typed.load_path} already has {checkpoint['epoch']} epochs; pass --epochs N "
            f"with N > {checkpoint['epoch']} to train further"
        )
    return args, checkpoint


def new_run_dir(args: argparse.Namespace) -> Path:
    """A fresh ``<results-dir>/<task>/<alg>/<model>/<dict_training|none>/<date>/run_<N>``."""
    return data_utils.make_run_dir(
        args.results_dir, args.task, args.alg, args.model, args.dict_training
    )


def restore_training_state(checkpoint: dict, model, optimizer, scheduler) -> None:
    """Weights, optimizer (momentum buffers, rates) and scheduler as the checkpoint left them."""
    try:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        if scheduler is not None and checkpoint.get("scheduler_state") is not None:
            scheduler.load_state_dict(checkpoint["scheduler_state"])
    except (ValueError, RuntimeError, KeyError) as error:
        raise UsageError(f"the checkpoint does not fit its own model: {error}") from error


def restore_rng(checkpoint: dict, train_loader) -> None:
    """Put every RNG (and the data order) where the checkpointed run left them."""
    state = checkpoint["rng_state"]
    data_utils.set_rng_state(state["global"])
    if state["train_loader"] is not None and train_loader.generator is not None:
        train_loader.generator.set_state(state["train_loader"])


def divergence_message(error: DivergenceError, recorder: RunRecorder | None) -> str:
    """The engine's diagnosis, where the last good checkpoint is, and what to change."""
    if recorder is None or recorder.epoch == 0:
        kept = "no epoch finished, so there is no checkpoint"
    else:
        kept = f"the last good checkpoint (epoch {recorder.epoch}) is in {recorder.run_dir}"
    return f"training diverged: {error}; {kept}. Try lower --lrs or smaller --betas."


def report_interrupt(recorder: RunRecorder | None, args: argparse.Namespace) -> None:
    """Ctrl-C: save the current weights and say how to resume."""
    if recorder is None:
        print("\ninterrupted; nothing was saved (no --save)", file=sys.stderr)
        return
    recorder.save_model(INTERRUPTED, recorder.epoch, None)
    saved = recorder.run_dir / INTERRUPTED
    if recorder.epoch == 0:
        resume = "no epoch finished, so there is no checkpoint: run the command again"
    else:
        resume_argv = ["--load-path", str(recorder.run_dir), "--epochs", str(args.epochs)]
        command = shlex.join(["python", "main_fast.py", *resume_argv])
        resume = f"resume from epoch {recorder.epoch} with:\n  {command}"
    print(f"\ninterrupted; current weights saved to {saved}; {resume}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# --todo evaluate and --todo gducheck
# --------------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """Train and test accuracy of a saved run's model, printed and added to its
    hyperparameters.txt."""
    if not args.load_path:
        raise UsageError("--todo evaluate needs --load-path RUN_DIR (a folder of a saved run)")
    record, path = load_model_file(args.load_path)
    args = saved_args(record["args"], args, explicit, EVALUATE_OVERRIDES)
    check_positive(args, ("T1", "mbs"))
    device = resolve_device(args.device)
    model = restore_model(record, device)
    set_dynamics(model, args)
    data = build_data(args, train_aug=False, shuffle=False)
    train_acc = evaluate(model, data.train_loader, args.T1, device, "train set")
    test_acc = evaluate(model, data.test_loader, args.T1, device, "test set")
    line = (
        f"evaluate {path.name} (epoch {record['epoch']}, T1 {args.T1}, {args.dynamics}"
        f"{'' if args.tol is None else f', tol {args.tol}'}): "
        f"train_acc {train_acc:.4f} test_acc {test_acc:.4f}"
    )
    print(line)
    data_utils.append_text(path.parent, data_utils.HYPERPARAMETERS_TXT, line)
    return 0


def run_gducheck(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> int:
    """EP's nudged-phase updates against BPTT's gradients on one training batch, for a new
    model or the saved one at ``--load-path``."""
    if args.load_path:
        record, _ = load_model_file(args.load_path)
        args = saved_args(record["args"], args, explicit, GDUCHECK_OVERRIDES)
        check_betas(args)
        device = resolve_device(args.device)
        model = restore_model(record, device)
    else:
        check_args(args)
        note_unsaved(args)
        device = resolve_device(args.device)
        seed_everything(args.seed)
        model, _, _ = build_training(args, model_config_from_args(args), device)
        load_pretrained_dictionary(model, args)
    set_dynamics(model, args)
    x, y = next(iter(build_data(args, train_aug=False, shuffle=False).train_loader))
    report = gdu_check(model, x.to(device), y.to(device), ep_config(args))
    print(f"{'parameter':<28} {'relative RMSE':>14} {'sign errors':>12}")
    for name, entry in report.items():
        print(f"{name:<28} {entry['rel_rmse']:>14.4f} {entry['sign_error']:>12.3f}")
    if args.save:
        run_dir = new_run_dir(args)
        data_utils.write_hyperparameters(run_dir, ["python", "main_fast.py", *argv], vars(args))
        data_utils.plot_gdu(report, run_dir / "gdu.png")
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
    try:
        args, explicit = parse_args(argv)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return TODO_RUNNERS[args.todo](args, explicit, argv)
    except DivergenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (UsageError, DictionaryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
