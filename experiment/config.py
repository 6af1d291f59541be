"""The typed configurations of a run, and the checks that turn flag values into them.

``main_fast.py`` parses its flags into a plain dict (``vars`` of the Namespace, which stays as
argparse left it); :func:`check_new_run` validates a new run's values once and returns a
checked copy (list flags trimmed to what the architecture uses, the task's spelling, the
dictionary file), and :func:`settings` builds the immutable configurations from it:

    the model's      the network: one class per --model (``experiment/models.py``)
    DynamicsConfig   how the phases run and the learning rule: alg, T1, T2, betas, sync or async
    OptimConfig      the optimizer: rates, weight decays, momentum, cosine decay
    DataConfig       the images: task, folder, batch size, augmentation, loader workers
    RunConfig        the session: what to do, epochs, device, seed, run folder

Everything below the scripts takes these (or plain values), never argparse. A run is saved
with them as plain dicts (``Settings.plain``, since ``weights_only=True`` refuses dataclasses):
the one description of the run, which resume, evaluate, the notebook and ``robustness.py`` read
back (``records.run_config``). Each field is named after its flag, so ``flags_of`` gives the
flag values of a saved configuration for the command line to override.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from experiment import models
from experiment.data_loading import canonical_task
from experiment.entry import UsageError, check_numbers, check_positive, fit_list, warn
from experiment.models import ModelConfig
from learning.estimators import EPConfig, Estimator
from learning.registry import ESTIMATORS, make_estimator

CONFIG_VERSION = 2  # records before it hold ``args`` and ``model_config`` (records.run_config)
# Range of every float flag but --betas: (lowest, excluded?, highest, excluded?); None: no bound.
FLOAT_RANGES = {
    "scale": (0, True, None, False),
    "lrs": (0, False, torch.finfo(torch.float32).max, False),
    "wds": (0, False, torch.finfo(torch.float32).max, False),
    "mmt": (0, False, 1, True),
    "lr_min": (0, False, None, False),
    "lca_lambda": (0, False, None, False),
    "lca_tau": (0, True, None, False),
    "lca_eta": (0, False, None, False),
    "scale_feedback": (None, False, None, False),
}
SESSION_FLAGS = {"todo", "load_path"}
# Flags a resumed or evaluated run takes from the command line; the rest come from the saved run.
# --compile runs the same numbers, only faster.
READ_OVERRIDES = {"epochs", "device", "data_dir", "num_workers", "no_download", "dict_path"}
READ_OVERRIDES |= {"compile", "dist_timeout"}
RESUME_OVERRIDES = READ_OVERRIDES | {"lrs", "wds", "tensorboard", "log_every"}
EVALUATE_OVERRIDES = READ_OVERRIDES | {"T1", "mbs", "dynamics", "tol", "precision"}
GDUCHECK_OVERRIDES = EVALUATE_OVERRIDES | {"T2", "betas", "thirdphase", "save", "results_dir"}


# --------------------------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicsConfig:
    """How a batch is trained: ``alg`` (a rule of ``learning.registry.ESTIMATORS``), ``T1`` free
    and ``T2`` nudged steps, ``betas`` (beta1, beta2), ``random_sign`` / ``thirdphase``
    nudging; ``dynamics`` (sync or async steps), ``tol`` (stop a phase once settled) and the
    ``precision`` of the phases; ``cpl_eta`` (CpL's clamp) and ``adjoint_iters`` (RBP's
    adjoint iterations, None: T2), whose defaults let runs saved before them load."""

    alg: str
    T1: int
    T2: int
    betas: tuple[float, float]
    random_sign: bool
    thirdphase: bool
    dynamics: str
    tol: float | None
    precision: str | None
    cpl_eta: float = 1.0
    adjoint_iters: int | None = None

    def ep_config(self) -> EPConfig:
        """The engine's view of how a batch is trained."""
        return _ep_config(dataclasses.asdict(self))

    def estimator(self) -> Estimator:
        """The learning rule ``alg`` names, for these settings."""
        return make_estimator(self.ep_config())


@dataclass(frozen=True)
class OptimConfig:
    """``optim`` (sgd or adam), one learning rate and weight decay (None: 0) per synapse,
    SGD momentum ``mmt`` (Nesterov's with ``nesterov``), and cosine decay of the rates
    (``lr_decay``) over ``lr_decay_epochs`` epochs down to ``lr_min``."""

    optim: str
    lrs: tuple[float, ...]
    wds: tuple[float, ...] | None
    mmt: float
    lr_decay: bool
    lr_decay_epochs: int = 100
    lr_min: float = 1e-5
    nesterov: bool = False


@dataclass(frozen=True)
class DataConfig:
    """The images: ``task`` in ``data_dir`` (downloaded when missing unless ``no_download``),
    batches of ``mbs``, ``data_aug`` augmentation, ``num_workers`` loader processes (None:
    the device's default). The data order follows the run's seed (``RunConfig.seed``)."""

    task: str
    data_dir: str
    no_download: bool
    mbs: int
    data_aug: bool
    num_workers: int | None
    randaugment: int = 0


@dataclass(frozen=True)
class RunConfig:
    """The session: ``todo``, train up to ``epochs`` on ``device`` (seeded with ``seed``),
    with ``save`` write a run folder under ``results_dir`` (or in ``load_path``), ``compile``
    the phases, ``dist_timeout`` for torchrun's collectives; with ``tensorboard`` (and
    ``save``) also a TensorBoard log in the run folder, running means every ``log_every``
    batches."""

    todo: str
    epochs: int
    device: str
    seed: int | None
    save: bool
    load_path: str | None
    results_dir: str
    compile: bool
    dist_timeout: float
    tensorboard: bool = False
    log_every: int = 50


@dataclass(frozen=True)
class Settings:
    """Every configuration of a run, and ``flags``: the checked flag values they come from
    (read only; hyperparameters.txt and the TensorBoard log show them)."""

    model: ModelConfig
    dynamics: DynamicsConfig
    optim: OptimConfig
    data: DataConfig
    run: RunConfig
    flags: Mapping[str, Any]

    def args(self) -> dict:
        """The flags as a plain dict."""
        return dict(self.flags)

    def plain(self) -> dict:
        """The configurations as plain dicts (lists for tuples), as records store them under
        ``config``: ``{"version": 2, "model": {"name": ..., ...}, "dynamics": ..., "optim":
        ..., "data": ..., "run": ...}``."""
        sections = {"version": CONFIG_VERSION, "model": self.model.plain()}
        for name in ("dynamics", "optim", "data", "run"):
            part = getattr(self, name)
            sections[name] = {k: _plain(v) for k, v in dataclasses.asdict(part).items()}
        return sections

    def network_config(self) -> dict:
        """The network this run trains (``models.ModelConfig.network_config``)."""
        return self.model.network_config(self.data.task)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _pick(cls: type, flags: Mapping[str, Any], **given: Any) -> Any:
    """``cls`` built from the flags of its field names (tuples for lists), ``given`` on top."""
    values = {}
    for field in dataclasses.fields(cls):
        value = given[field.name] if field.name in given else flags[field.name]
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def flags_of(plain: Mapping[str, Any]) -> dict:
    """The flag values of a saved configuration (``Settings.plain``): every section's fields,
    and ``model`` the model's name."""
    model = {key: value for key, value in plain["model"].items() if key != "name"}
    flags = {**model, "model": plain["model"]["name"]}
    for name in ("dynamics", "optim", "data", "run"):
        flags.update(plain[name])
    return flags


def settings(flags: Mapping[str, Any]) -> Settings:
    """The configurations of checked flag values (:func:`check_new_run`, or a saved run's
    flags with the session's on top: :func:`saved_flags`)."""
    frozen = MappingProxyType(dict(flags))
    return Settings(
        model=models.model_class(frozen["model"]).from_flags(frozen),
        dynamics=_pick(DynamicsConfig, frozen),
        optim=_pick(OptimConfig, frozen),
        data=_pick(DataConfig, frozen),
        run=_pick(RunConfig, frozen),
        flags=frozen,
    )


# --------------------------------------------------------------------------------------------
# Checking the flags of a new run
# --------------------------------------------------------------------------------------------


def check_new_run(given: Mapping[str, Any]) -> dict:
    """A new run's flag values, checked: a copy with the list flags trimmed to what the
    architecture uses, the task's own spelling and the dictionary file; UsageError naming the
    first problem."""
    flags = dict(given)
    flags["task"] = canonical_task(flags["task"])
    check_positive(flags, ("T1", "T2", "epochs", "mbs", "log_every", "lr_decay_epochs"))
    check_positive(flags, ("randaugment",), minimum=0)
    if flags["nesterov"] and (flags["optim"] != "sgd" or flags["mmt"] == 0):
        raise UsageError("--nesterov needs --optim sgd and a momentum --mmt > 0")
    cifar_aug = flags["data_aug"] and flags["task"] in ("CIFAR10", "CIFAR100")
    if flags["randaugment"] and not cifar_aug:
        warn("--randaugment ignored: it adds to --data-aug on CIFAR10 and CIFAR100 only")
        flags["randaugment"] = 0
    if flags["num_workers"] is not None:
        check_positive(flags, ("num_workers",), minimum=0)
    check_numbers(flags, FLOAT_RANGES)
    check_betas(flags)
    check_ignored_by_rule(flags)
    check_tol(flags["tol"])
    model = models.model_class(flags["model"])
    check_front_end(flags, model)
    n_synapses = model.check(flags, flags["task"])
    if flags["lrs"] is None:
        raise UsageError(f"--lrs is required: one learning rate per synapse ({n_synapses} here)")
    why = f"one per synapse, {n_synapses} here"
    flags["lrs"] = fit_rates("lrs", flags["lrs"], n_synapses, why)
    if flags["wds"] is not None:
        flags["wds"] = fit_rates("wds", flags["wds"], n_synapses, why)
    flags["scale"] = fit_scale(flags["scale"], n_synapses)
    if flags["dict_path"] is None:
        flags["dict_path"] = str(Path("dictionaries") / flags["task"] / "dictionary.pt")
    flags["dict_path"] = dictionary_file(flags["dict_path"])
    return flags


def fit_rates(flag: str, values: list[float], needed: int, why: str) -> list[float]:
    """``--lrs`` / ``--wds``: one value per synapse (``fit_list``), or one value for all."""
    if len(values) == 1:
        return list(values) * needed
    return fit_list(flag, values, needed, why)


def fit_scale(scale: list[float] | float | None, needed: int) -> float | list[float] | None:
    """``--scale``: one gain, kept a number (every synapse's, as before per-tensor gains), or
    one per weight tensor (``fit_list``)."""
    if scale is None or isinstance(scale, (int, float)):
        return scale
    if len(scale) == 1:
        return scale[0]
    return fit_list("scale", scale, needed, f"one gain per weight tensor, {needed} here")


def dictionary_file(path: str | Path) -> str:
    """``--dict-path``: a dictionary file, or the folder cifar_dictlearning.py wrote it in."""
    return str(Path(path) / "dictionary.pt") if Path(path).is_dir() else str(path)


def check_front_end(flags: dict, model: type[ModelConfig]) -> None:
    """The flags of a front end or a vector field that ``model`` does not have: ``--vf`` is
    refused; ``--dict_training`` and ``--same-update`` are ignored (and switched off)."""
    has = {field.name for field in dataclasses.fields(model)}
    if flags["vf"] and model.NO_VECTOR_FIELD:
        raise UsageError(f"--vf refused: {model.NO_VECTOR_FIELD} ({flags['model']})")
    if flags["vf"] and "vf" not in has:
        raise UsageError(
            f"--vf makes LCACNN a vector-field model; for {flags['model']} use --model VFCNN "
            f"or VFMLP"
        )
    if flags["dict_training"] and "dict_training" not in has:
        warn(
            f"--dict_training {flags['dict_training']} ignored: only LCACNN and LCAResCNN "
            f"have a dictionary"
        )
        flags["dict_training"] = ""
    vector_field = flags["vf"] if "vf" in has else "same_update" in has
    if flags["same_update"] and not vector_field:
        warn("--same-update ignored: only vector-field models (VFCNN, VFMLP, --vf) have it")
        flags["same_update"] = False


def check_betas(flags: Mapping[str, Any]) -> None:
    """``--betas`` is two finite numbers, and the learning rule does not refuse the settings
    (``Estimator.refusal``: EP's usable nudge, BPTT's T2 within T1)."""
    betas = flags["betas"]
    if len(betas) != 2:
        raise UsageError(f"--betas takes exactly two numbers (beta1 beta2), got {betas}")
    for name, beta in zip(("beta1", "beta2"), betas, strict=True):
        if not math.isfinite(beta):
            raise UsageError(
                f"--betas: {name} is {beta}; give two finite numbers (e.g. --betas 0.0 0.5)"
            )
    refusal = ESTIMATORS[flags["alg"]].refusal(_ep_config(flags))
    if refusal is not None:
        raise UsageError(refusal)


def check_ignored_by_rule(flags: Mapping[str, Any]) -> None:
    """One warning line per flag the learning rule does not read (``Estimator.IGNORES``) that
    is set to another value than its default; the value is kept (and saved) as given."""
    rule = ESTIMATORS[flags["alg"]]
    config, defaults = _ep_config(flags), EPConfig()
    for name, why in rule.IGNORES.items():
        if getattr(config, name) != getattr(defaults, name):
            flag = "--" + name.replace("_", "-")
            warn(f"{flag} ignored: --alg {flags['alg']} does not read it ({why})")


def _ep_config(flags: Mapping[str, Any]) -> EPConfig:
    """The engine's view of the flags (as ``DynamicsConfig.ep_config``)."""
    return EPConfig(
        alg=flags["alg"],
        T1=flags["T1"],
        T2=flags["T2"],
        betas=tuple(flags["betas"]),
        random_sign=flags["random_sign"],
        thirdphase=flags["thirdphase"],
        cpl_eta=flags.get("cpl_eta", 1.0),
        adjoint_iters=flags.get("adjoint_iters"),
    )


def check_tol(tol: float | None) -> None:
    """``--tol`` is a positive finite number when given."""
    if tol is not None and not 0 < tol < math.inf:
        raise UsageError(f"--tol must be a positive number (e.g. --tol 1e-4), got {tol}")


# --------------------------------------------------------------------------------------------
# The flags of a saved run
# --------------------------------------------------------------------------------------------


def saved_flags(
    saved: Mapping[str, Any], typed: Mapping[str, Any], explicit: set[str], overrides: set[str]
) -> dict:
    """A saved run's flags, with those typed on the command line (``explicit``) among
    ``overrides`` on top (the others are ignored, with a warning); the defaults of ``typed``
    fill in flags newer than the saved run. The session's ``todo`` and ``load_path`` count."""
    flags = {**typed, **saved}
    ignored = []
    for name in sorted(explicit - SESSION_FLAGS):
        if name in overrides:
            flags[name] = typed[name]
        elif typed[name] != saved.get(name):
            ignored.append(f"--{name}")
    if ignored:
        allowed = ", ".join(f"--{name}" for name in sorted(overrides))
        warn(
            f"{', '.join(ignored)} ignored: the settings of {typed['load_path']} are used "
            f"(here only {allowed} can change)"
        )
    flags["todo"], flags["load_path"] = typed["todo"], typed["load_path"]
    if flags["dict_path"]:
        flags["dict_path"] = dictionary_file(flags["dict_path"])
    return flags


def resume_flags(
    saved: Mapping[str, Any],
    done: int,
    typed: Mapping[str, Any],
    explicit: set[str],
    n_synapses: int,
    finished: bool = True,
) -> tuple[dict, list[str]]:
    """The flags to resume a checkpoint of ``done`` epochs whose run had the flag values
    ``saved`` (``saved_flags`` with ``RESUME_OVERRIDES``), and which of ``--lrs`` / ``--wds``
    the command line changes: one value per synapse of the saved model (``n_synapses``; a
    vector-field model's backward weights take their forward synapse's). UsageError when the
    run has its epochs already and, ``finished``, its final files (a run without them resumes
    to write them)."""
    flags = saved_flags(saved, typed, explicit, RESUME_OVERRIDES)
    check_positive(flags, ("epochs", "log_every"))
    if done > flags["epochs"] or (done == flags["epochs"] and finished):
        raise UsageError(
            f"{typed['load_path']} already has {done} epochs; pass --epochs N with N > {done} "
            f"to train further"
        )
    changed = []
    for name in sorted({"lrs", "wds"} & explicit):
        why = f"one per synapse, {n_synapses}"
        flags[name] = values = fit_rates(name, flags[name], n_synapses, why)
        if values != saved.get(name):  # a requeued command line changes nothing
            changed.append(name)
            print(f"notice: --{name} {' '.join(map(str, values))} replaces the saved values "
                  f"from epoch {done} on")  # fmt: skip
    check_numbers(flags, {name: FLOAT_RANGES[name] for name in changed})
    return flags, changed
