"""The run records: what a saved model, a checkpoint and a dictionary file hold, and reading
them back into a model.

A model record (``model.pt``: the best test accuracy, ``final_model.pt``: the last epoch,
``interrupted.pt``: the weights at a Ctrl-C or SIGTERM) holds ``config`` (the run's typed
configuration, ``config.Settings.plain``: the one description of the run, from which its
network is rebuilt), ``model_state``, ``epoch``, ``test_acc`` and ``train_indices`` (the
training images EP uses, int64, or None for all). Records saved before the typed configuration
held ``args`` (every flag) and ``model_config`` ({"model": a network name, "kwargs": its
constructor arguments}) instead; ``run_config`` translates them, and their network is rebuilt
from their ``model_config`` as before (``network_config``). A checkpoint
(``checkpoint.pt``) holds the same but ``test_acc``, plus ``optimizer_state``,
``scheduler_state`` (or None), ``rng_state`` ({"global": ``get_rng_state()``,
"train_loader": the loader generator's state or None}), ``history`` (the results.csv rows)
and ``best_test_acc``. All are plain tensors and containers, read back with
``torch.load(..., weights_only=True)``, and checked (``record_problem``) before use.
Model records and checkpoints saved now also hold ``threads``, the ``torch.get_num_threads()``
of the process that wrote them (it orders CPU sums; older records lack it).

A dictionary of ``cifar_dictlearning.py`` is ``{"weights": (F, C, k, k), "config": LCA
settings}`` in ``dictionary.pt``, with ``subset_indices.pt`` (the training images it was learnt
on) beside it; EP trains on the other images (``training_indices``). The state it continues an
interrupted run from, ``dictlearning_state.pt``, rewritten after every epoch, holds ``epoch``
(the epochs finished), ``settings`` (the flags that change the dictionary), ``weights`` (F, C,
k, k), ``rows`` (the dictlearning.csv rows so far) and ``rng_state`` (as a checkpoint's).

Also here: the RNG state a checkpoint carries (``get_rng_state`` / ``set_rng_state``,
``restore_rng``) and ``seed_everything``, which starts a run's generators.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiment import config, models
from experiment.entry import UsageError, first_line
from experiment.models import NETWORK_CLASSES, ModelConfig
from experiment.storage import atomic_save, safe_load
from lca import LCAConv2D
from lca_utils_ep_fast import LCA_CNN
from utils_ep_fast import EnergyNet

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.pt"
FINAL_MODEL = "final_model.pt"
INTERRUPTED = "interrupted.pt"
SUBSET_FILENAME = "subset_indices.pt"
MODEL_KEYS = ("model_state", "epoch")  # and config, or args and model_config; no test_acc
CHECKPOINT_KEYS = (*MODEL_KEYS, "optimizer_state", "rng_state", "history", "best_test_acc")
LEGACY_KEYS = ("model_config", "args")
# flags that runs saved before them lack, and the value those runs ran with
LEGACY_DEFAULTS = {"dynamics": "sync", "tol": None, "precision": None, "compile": False,
                   "num_workers": None, "no_download": False, "dist_timeout": 600.0,
                   "tensorboard": False, "log_every": 50, "lr_decay_epochs": 100,
                   "lr_min": 1e-5, "nesterov": False, "randaugment": 0, "cpl_eta": 1.0,
                   "adjoint_iters": None}  # fmt: skip
DICTLEARNING_STATE = "dictlearning_state.pt"
DICTLEARNING_STATE_KEYS = ("epoch", "settings", "weights", "rows", "rng_state")


class DictionaryError(UsageError):
    """A dictionary (or subset-indices) file is missing, unreadable or of the wrong shape."""


# --------------------------------------------------------------------------------------------
# Random number generator state
# --------------------------------------------------------------------------------------------


def get_rng_state() -> dict:
    """State of Python's ``random``, numpy's global RNG, torch's CPU RNG and, when available,
    every CUDA device's RNG, made only of tensors, ints and strings so that it round-trips
    through ``torch.save`` + ``torch.load(weights_only=True)``.

    Layout: ``python``: {version: int, state: int64 (625,), gauss_next: float64 (0,) or (1,)};
    ``numpy``: {kind: str, keys: int64 (624,), pos: int, has_gauss: int, cached_gaussian:
    float64 ()}; ``torch``: uint8 tensor; ``cuda`` (only with CUDA): list of uint8 tensors.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": torch.tensor(
                [] if gauss_next is None else [gauss_next], dtype=torch.float64
            ),
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": torch.tensor(float(cached), dtype=torch.float64),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators from :func:`get_rng_state`'s dict; CUDA states are restored for the
    devices present (ignored without CUDA)."""
    py = state["python"]
    gauss = py["gauss_next"].tolist()
    random.setstate((py["version"], tuple(py["state"].tolist()), gauss[0] if gauss else None))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (npst["kind"], keys, npst["pos"], npst["has_gauss"], float(npst["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def seed_everything(seed: int | None) -> None:
    """Seed Python's, numpy's and torch's RNGs (all devices); nothing when ``seed`` is None."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def restore_rng(checkpoint: dict, train_loader) -> None:
    """Put every RNG (and the data order) where the checkpointed run left them."""
    state = checkpoint["rng_state"]
    try:
        set_rng_state(state["global"])
        if state["train_loader"] is not None and train_loader.generator is not None:
            train_loader.generator.set_state(state["train_loader"])
    except (ValueError, RuntimeError, TypeError, KeyError) as error:
        raise UsageError(f"the checkpoint's RNG state is damaged: {first_line(error)}") from error


# --------------------------------------------------------------------------------------------
# Dictionary files
# --------------------------------------------------------------------------------------------


def subset_indices_path(dict_path: str | Path) -> str:
    """The ``subset_indices.pt`` file that sits next to a dictionary file."""
    return os.path.join(os.path.dirname(os.path.abspath(dict_path)), SUBSET_FILENAME)


def save_dictionary(path: str | Path, lca: LCAConv2D, subset_indices: Tensor | None = None) -> None:
    """Write ``{"weights": (F, C, kh, kw) tensor, "config": lca.settings()}`` to ``path``.

    When given, ``subset_indices`` (1-D integer tensor: the training examples the dictionary
    was learned on) goes to ``subset_indices.pt`` in the same folder. Both writes are atomic.
    """
    if subset_indices is not None:
        if subset_indices.dim() != 1 or subset_indices.is_floating_point():
            raise ValueError(
                f"subset_indices must be a 1-D integer tensor, got {subset_indices.dtype} of "
                f"shape {tuple(subset_indices.shape)}."
            )
        indices = subset_indices.detach().to(device="cpu", dtype=torch.int64).clone()
        atomic_save(indices, subset_indices_path(path))
    record = {"weights": lca.get_weights().cpu(), "config": lca.settings()}
    atomic_save(record, path)


def _load_dictionary_file(path: str | Path, what: str) -> Any:
    if not os.path.isfile(path):
        raise DictionaryError(
            f"{what} file '{path}' not found: run cifar_dictlearning.py first, or pass "
            f"--dict-path with the folder it wrote dictionary.pt and subset_indices.pt in."
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise DictionaryError(
            f"{what} file '{path}' could not be read ({first_line(error)}); re-create it with "
            f"cifar_dictlearning.py."
        ) from error


def load_dictionary(
    path: str | Path, expected_shape: Sequence[int] | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Load ``(weights, config)`` written by ``save_dictionary`` (safely: weights_only).

    Raises ``DictionaryError`` if the file is missing, unreadable, not such a record, or (with
    ``expected_shape``) holds weights of another shape.
    """
    record = _load_dictionary_file(path, "dictionary")
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("weights"), Tensor)
        or not isinstance(record.get("config"), dict)
    ):
        raise DictionaryError(
            f"dictionary file '{path}' does not hold a dictionary record "
            f"({{'weights': tensor, 'config': dict}}, found {type(record).__name__}); "
            f"re-create it with cifar_dictlearning.py."
        )
    weights = record["weights"]
    if weights.dim() != 4 or not weights.is_floating_point():
        raise DictionaryError(
            f"dictionary file '{path}' holds a {weights.dtype} tensor of shape "
            f"{tuple(weights.shape)}, expected a float tensor (features, channels, k, k)."
        )
    if expected_shape is not None and tuple(weights.shape) != tuple(expected_shape):
        raise DictionaryError(
            f"dictionary file '{path}': expected shape {tuple(expected_shape)}, found "
            f"{tuple(weights.shape)}; use matching LCA settings or re-run cifar_dictlearning.py "
            f"with them."
        )
    return weights, record["config"]


def dictlearning_state_problem(state: Any) -> str | None:
    """What is wrong with a loaded ``dictlearning_state.pt`` (None: it has the layout the
    module docstring gives): a dict whose ``epoch`` counts the finished epochs, with one
    ``rows`` entry each (epochs 1, 2, ...), a float (F, C, k, k) ``weights``, a ``settings``
    dict and an ``rng_state`` laid out as a checkpoint's."""
    if not isinstance(state, dict) or not set(DICTLEARNING_STATE_KEYS) <= set(state):
        return f"it is not a dict with the keys {', '.join(DICTLEARNING_STATE_KEYS)}"
    epoch, rows, weights = state["epoch"], state["rows"], state["weights"]
    if not _is_count(epoch) or epoch == 0:
        return f"epoch is {epoch!r}, not a number of finished epochs"
    if not isinstance(rows, list) or [
        row.get("epoch") if isinstance(row, dict) else None for row in rows
    ] != list(range(1, epoch + 1)):
        return f"rows are not the CSV rows of epochs 1 to {epoch}"
    if not isinstance(weights, Tensor) or weights.dim() != 4 or not weights.is_floating_point():
        return "weights is not a float tensor (features, channels, k, k)"
    if not torch.isfinite(weights).all():
        return "weights holds NaN or inf"
    if not isinstance(state["settings"], dict):
        return "settings is not a dict of flags"
    return rng_state_problem(state["rng_state"])


def load_dictlearning_state(path: str | Path) -> dict:
    """The ``dictlearning_state.pt`` at ``path``, checked (:func:`dictlearning_state_problem`);
    a UsageError names the file and ``--fresh`` when it cannot be used."""
    fix = "pass --fresh to learn the dictionary again from epoch 1"
    try:
        state = safe_load(path, "dictionary-learning state")
    except UsageError as error:
        raise UsageError(f"{error}; {fix}") from error
    problem = dictlearning_state_problem(state)
    if problem:
        raise UsageError(f"{path} is damaged or from another program: {problem}; {fix}")
    return state


def load_subset_indices(dict_path: str | Path) -> Tensor:
    """The training indices saved next to the dictionary at ``dict_path`` (1-D int64)."""
    path = subset_indices_path(dict_path)
    indices = _load_dictionary_file(path, "subset indices")
    if (
        not isinstance(indices, Tensor)
        or indices.dim() != 1
        or indices.is_floating_point()
        or indices.dtype == torch.bool
    ):
        raise DictionaryError(
            f"subset indices file '{path}' does not hold a 1-D integer tensor; re-create it "
            f"with cifar_dictlearning.py."
        )
    return indices.to(torch.int64)


def training_indices(
    n_train: int, model: ModelConfig, task: str, dataset: str, record: dict | None = None
) -> Tensor | None:
    """Which training images EP uses: those a saved ``record`` names; else, with a pretrained or
    finetuned dictionary, those it was not learnt on; otherwise all of them (None). ``dataset``
    names the training set in messages (the task and its folder)."""
    if record is not None and "train_indices" in record:
        indices = record["train_indices"]
        if indices is not None and len(indices) and int(indices.max()) >= n_train:
            raise UsageError(
                f"the saved run trained on images up to {int(indices.max())}, but "
                f"{dataset} has {n_train}: is it the same dataset?"
            )
        return indices
    source = model.dictionary_source()
    if source is None:
        return None
    dict_training, dict_path = source
    if dict_training == "learn":
        if Path(subset_indices_path(dict_path)).is_file():
            print(f"learn: training on all {n_train} images (the dictionary subset is not used)")
        return None
    try:
        indices = ep_training_indices(n_train, dict_path)
    except IndexError as error:
        raise UsageError(
            f"the subset indices next to {dict_path} do not fit the {n_train} training "
            f"images of {task}: was the dictionary learnt on another task?"
        ) from error
    if len(indices) == 0:
        raise UsageError(f"the dictionary {dict_path} was learnt on every training image")
    print(
        f"EP trains on {len(indices)} of {n_train} training images (the other "
        f"{n_train - len(indices)} were used to learn the dictionary)"
    )
    return indices


def load_model_dictionary(model: LCA_CNN, dict_path: str | Path) -> None:
    """Start ``model``'s LCA layer from the dictionary file at ``dict_path``."""
    weights, _ = load_dictionary(dict_path, expected_shape=tuple(model.lca.weights.shape))
    model.load_dictionary(weights)


def ep_training_indices(num_train: int, dict_path: str | Path) -> Tensor:
    """Indices of the training images NOT used to pretrain the dictionary at ``dict_path``.

    The dictionary was learnt on the subset saved next to it (``subset_indices.pt``); EP trains
    on the rest so that the two never see the same images.
    """
    used = load_subset_indices(dict_path)
    mask = torch.ones(num_train, dtype=torch.bool)
    mask[used] = False
    return mask.nonzero().flatten()


# --------------------------------------------------------------------------------------------
# Model records and checkpoints
# --------------------------------------------------------------------------------------------


def build_model(network_config: dict) -> EnergyNet:
    """The network described by ``network_config`` ({"model": network name, "kwargs":
    constructor arguments})."""
    try:
        return NETWORK_CLASSES[network_config["model"]](**network_config["kwargs"])
    except TypeError as error:  # arguments the class does not take: a damaged record
        raise UsageError(f"the saved model does not rebuild: {first_line(error)}") from error


def model_record(model: EnergyNet, epoch: int, test_acc, run_config: dict) -> dict:
    """What ``model.pt``, ``final_model.pt`` and ``interrupted.pt`` hold (``train_indices``
    is added by the recorder): ``run_config`` is the run's ``config.Settings.plain``."""
    return {
        "config": run_config,
        "model_state": model.state_dict(),
        "epoch": epoch,
        "test_acc": test_acc,
        "threads": torch.get_num_threads(),
    }


def is_legacy(record: dict) -> bool:
    """Whether ``record`` was saved before the typed configuration (``args``, ``model_config``)."""
    plain = record.get("config")
    return not (isinstance(plain, dict) and plain.get("version") == config.CONFIG_VERSION)


def run_config(record: dict) -> dict:
    """The saved run's typed configuration as plain dicts (``config.Settings.plain``). A record
    saved before it is translated from its ``args``: the flags runs then lacked take the values
    those runs ran with (``LEGACY_DEFAULTS``), and the model's fields its class's defaults."""
    if not is_legacy(record):
        return record["config"]
    flags = {**LEGACY_DEFAULTS, **record["args"]}
    model_fields = dataclasses.fields(models.model_class(flags["model"]))
    flags.update({f.name: f.default for f in model_fields if f.name not in flags})
    return config.settings(flags).plain()


def run_flags(record: dict) -> dict:
    """The saved run's flag values (``config.flags_of`` of ``run_config``)."""
    return config.flags_of(run_config(record))


def run_model(record: dict) -> ModelConfig:
    """The saved run's model configuration."""
    return models.from_plain(run_config(record)["model"])


def network_config(record: dict) -> dict:
    """The network of a saved record: from its configuration, or from the ``model_config`` a
    record saved before the typed configuration holds."""
    if is_legacy(record):
        return record["model_config"]
    plain = record["config"]
    return models.from_plain(plain["model"]).network_config(plain["data"]["task"])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def rng_state_problem(state: Any) -> str | None:
    """What is wrong with a checkpoint's ``rng_state`` (None: it has get_rng_state's layout)."""
    if not isinstance(state, dict) or not isinstance(state.get("global"), dict):
        return "rng_state is not {'global': ..., 'train_loader': ...}"
    common = state["global"]
    python, numpy = common.get("python"), common.get("numpy")
    if not (
        isinstance(python, dict)
        and isinstance(python.get("state"), Tensor)
        and python["state"].numel() == 625
        and isinstance(numpy, dict)
        and isinstance(numpy.get("keys"), Tensor)
        and numpy["keys"].numel() == 624
        and isinstance(common.get("torch"), Tensor)
        and common["torch"].dtype == torch.uint8
        and common["torch"].numel() > 0
    ):
        return "rng_state lacks the Python, numpy or torch generator states"
    loader = state.get("train_loader")
    if loader is not None and not (isinstance(loader, Tensor) and loader.dtype == torch.uint8):
        return "rng_state's train_loader state is not a byte tensor"
    return None


def config_problem(record: dict) -> str | None:
    """What is wrong with a record's description of its run: its typed ``config``, or (saved
    before it) its ``model_config`` and ``args``; None when it reads back."""
    if is_legacy(record):
        network, args = record.get("model_config"), record.get("args")
        if not (
            isinstance(network, dict)
            and network.get("model") in NETWORK_CLASSES
            and isinstance(network.get("kwargs"), dict)
        ):
            return f"model_config does not name one of the models {', '.join(NETWORK_CLASSES)}"
        if not isinstance(args, dict) or not {"task", "model"} <= set(args):
            return "args is not the dict of the run's arguments"
    plain = record.get("config") if not is_legacy(record) else None
    if plain is not None:
        sections = ("model", "dynamics", "optim", "data", "run")
        if not all(isinstance(plain.get(name), dict) for name in sections):
            return f"config lacks one of its sections {', '.join(sections)}"
        if plain["model"].get("name") not in models.MODELS:
            return f"config does not name one of the models {', '.join(models.MODELS)}"
    try:
        run_model(record)
    except (KeyError, TypeError, UsageError) as error:
        return f"config does not describe a model: {first_line(error)}"
    return None


def record_problem(record: dict, checkpoint: bool) -> str | None:
    """What is wrong with the contents of a loaded model record or (``checkpoint``) checkpoint,
    or None: every entry of the module docstring has its type."""
    problem = config_problem(record)
    if problem:
        return problem
    state = record["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        return "model_state is not a dict of tensors"
    if not _is_count(record["epoch"]):
        return f"epoch is {record['epoch']!r}, not a number of epochs"
    indices = record.get("train_indices")
    if indices is not None and not (
        isinstance(indices, Tensor) and indices.dim() == 1 and indices.dtype == torch.int64
    ):
        return "train_indices is not a 1-D int64 tensor"
    if not checkpoint:
        return None
    optimizer_state = record["optimizer_state"]
    if not isinstance(optimizer_state, dict) or "param_groups" not in optimizer_state:
        return "optimizer_state is not an optimizer's state_dict"
    history = record["history"]
    if not isinstance(history, list) or len(history) != record["epoch"]:
        return f"history does not hold one row per epoch ({record['epoch']})"
    if not all(isinstance(row, dict) for row in history):
        return "history rows are not dicts"
    if not isinstance(record["best_test_acc"], (int, float)):
        return "best_test_acc is not a number"
    return rng_state_problem(record["rng_state"])


def load_record(path: str | Path, what: str, keys: Sequence[str]) -> dict:
    """A dict saved by ``main_fast.py`` at ``path``, checked to hold ``keys`` of the right
    types (a UsageError names the first problem)."""
    record = safe_load(path, what)
    described = isinstance(record, dict) and (
        "config" in record or all(key in record for key in LEGACY_KEYS)
    )
    if not described or any(key not in record for key in keys):
        raise UsageError(f"{path} is not a {what} written by main_fast.py (keys missing)")
    problem = record_problem(record, checkpoint="optimizer_state" in keys)
    if problem:
        raise UsageError(f"{path} is damaged or from another program: {problem}")
    return record


def load_model_file(load_path: str | Path) -> tuple[dict, Path]:
    """``model.pt`` of a run folder (else ``final_model.pt``), or the model file given (a
    checkpoint too: it holds the model)."""
    path = Path(load_path)
    if path.is_dir():
        path = path / BEST_MODEL if (path / BEST_MODEL).is_file() else path / FINAL_MODEL
    return load_record(path, "model file", MODEL_KEYS), path


def load_checkpoint(run_dir: str | Path) -> dict:
    """``checkpoint.pt`` of the run folder ``run_dir``."""
    return load_record(Path(run_dir) / CHECKPOINT, "checkpoint", CHECKPOINT_KEYS)


def restore_model(record: dict, device: torch.device | str = "cpu") -> EnergyNet:
    """The model of a saved record, rebuilt from its configuration, on ``device``."""
    try:
        model = build_model(network_config(record))
        model.load_state_dict(record["model_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UsageError(f"the saved model does not rebuild: {first_line(error)}") from error
    dynamics = run_config(record)["dynamics"]
    model.set_dynamics(dynamics["dynamics"], dynamics["tol"])
    return model.to(device)


def restore_training_state(checkpoint: dict, model, optimizer, scheduler) -> None:
    """Weights, optimizer (momentum buffers, rates) and scheduler as the checkpoint left them."""
    try:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        if scheduler is not None and checkpoint.get("scheduler_state") is not None:
            scheduler.load_state_dict(checkpoint["scheduler_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UsageError(
            f"the checkpoint does not fit its own model: {first_line(error)}"
        ) from error


def synapse_count(record: dict) -> int:
    """How many ``--lrs`` and ``--wds`` entries the saved model takes: one per synapse
    (``synapses.<i>``) and one per layer bias (``layer_biases.<k>``) of its graph, as
    ``EnergyNet.optimizer_groups`` gives them; a vector-field model's backward weights are not
    synapses of their own, and a model whose biases share their synapse's rate
    (``BIASES_OWN_RATES`` False) counts its synapses only."""
    pattern = r"(synapses\.\d+\.|layer_biases\.\d+$)"
    if not is_legacy(record) and not run_model(record).BIASES_OWN_RATES:
        pattern = r"synapses\.\d+\."  # a ResCNN's layer biases share their conv's rate
    found = {match.group(0) for key in record["model_state"]
             if (match := re.match(pattern, key))}  # fmt: skip
    return len(found)


def override_rates(
    optimizer: torch.optim.Optimizer,
    scheduler,
    lrs: Sequence[float],
    wds: Sequence[float] | None,
    group_synapses: Sequence[int],
) -> None:
    """Replace a resumed run's learning rates and weight decays (None: 0), one per synapse;
    ``group_synapses`` names the synapse of each param group (``model.optimizer_groups``), so
    a vector-field model's backward weights take their forward synapse's rates.

    ``lrs`` become the initial rates; with cosine decay (``CosineAnnealingLR``, T_max, eta_min)
    the rate at the epoch e reached is ``eta_min + (lr - eta_min) (1 + cos(pi e / T_max)) / 2``,
    as if the run had started with ``lrs``.
    """
    decay = isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    wds = wds or [0.0] * len(lrs)
    group_lrs = [lrs[i] for i in group_synapses]
    for group, i in zip(optimizer.param_groups, group_synapses, strict=True):
        lr = lrs[i]
        group["initial_lr"], group["weight_decay"] = lr, wds[i]
        group["lr"] = lr
        if decay:
            progress = (1 + math.cos(math.pi * scheduler.last_epoch / scheduler.T_max)) / 2
            group["lr"] = scheduler.eta_min + (lr - scheduler.eta_min) * progress
    if scheduler is not None:
        scheduler.base_lrs = group_lrs
