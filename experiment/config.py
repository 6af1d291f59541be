"""The typed configurations of a run, and the checks that turn flag values into them.

``main_fast.py`` parses its flags into a plain dict (``vars`` of the Namespace, which stays as
argparse left it); :func:`check_new_run` validates a new run's values once and returns a
checked copy (list flags trimmed to what the architecture uses, the task's spelling, the
dictionary file), and :func:`settings` builds the immutable configurations from it:

    ModelConfig      the network: architecture, activation, loss, LCA front end
    DynamicsConfig   how the phases run and how EP estimates: T1, T2, betas, sync or async
    OptimConfig      the optimizer: rates, weight decays, momentum, cosine decay
    DataConfig       the images: task, folder, batch size, augmentation, loader workers
    RunConfig        the session: what to do, epochs, device, seed, run folder

Everything below the scripts takes these (or plain values), never argparse. A run is saved
with them as plain dicts (``Settings.plain``, since ``weights_only=True`` refuses
dataclasses) beside ``args``, the checked flags themselves, which older readers still use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from experiment.data_loading import canonical_task, task_info
from experiment.entry import UsageError, check_numbers, warn
from utils_ep_fast import POOLS, EPConfig

VF_MODELS = ("VFCNN", "VFMLP")
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
# The flags that LCA_CNN takes under their own names, on top of the CNN's.
LCA_ARGUMENTS = (
    *("lca_feats", "lca_ksize", "lca_stride", "lca_lambda", "lca_tau", "lca_eta", "lca_iters"),
    *("scale_feedback", "dict_training"),
)
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
class ModelConfig:
    """The network. ``model`` is the --model name; ``vf`` makes an LCACNN a vector-field
    model. ``archi`` (MLPs) or the conv lists (CNNs, one entry per conv layer) describe the
    layers; the ``lca_*`` fields, ``scale_feedback``, ``dict_training`` and ``dict_path`` (the
    dictionary file to start from) the LCA front end of an LCACNN."""

    model: str
    task: str
    act: str
    softmax: bool
    loss: str
    scale: float | None
    archi: tuple[int, ...] | None
    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    paddings: tuple[int, ...]
    pools: str
    fc: tuple[int, ...]
    vf: bool
    same_update: bool
    lca_feats: int
    lca_ksize: int
    lca_stride: int
    lca_lambda: float
    lca_tau: float
    lca_eta: float
    lca_iters: int
    scale_feedback: float
    dict_training: str
    dict_path: str | None

    @property
    def class_name(self) -> str:
        """The name in ``records.MODEL_CLASSES``: --model, or VFLCACNN for LCACNN --vf."""
        return "VFLCACNN" if self.model == "LCACNN" and self.vf else self.model

    def model_config(self) -> dict:
        """``{"model": class name, "kwargs": constructor arguments}`` in plain Python types,
        as checkpoints store it (``records.build_model`` reads it)."""
        in_channels, height, _, _ = task_info(self.task)
        common = {
            "activation": self.act,
            "softmax": self.softmax,
            "loss": self.loss,
            "scale": self.scale,
        }
        name = self.class_name
        if name.startswith("VF"):
            common["same_update"] = self.same_update
        if self.model in ("MLP", "VFMLP"):
            return {"model": name, "kwargs": {"archi": list(self.archi), **common}}
        kwargs = {
            "in_size": height,
            "in_channels": in_channels,
            "channels": list(self.channels),
            "kernels": list(self.kernels),
            "strides": list(self.strides),
            "paddings": list(self.paddings),
            "pools": self.pools,
            "fc": list(self.fc),
            **common,
        }
        if self.model == "LCACNN":
            kwargs.update({name: getattr(self, name) for name in LCA_ARGUMENTS})
        return {"model": name, "kwargs": kwargs}


@dataclass(frozen=True)
class DynamicsConfig:
    """How a batch is trained: ``alg`` (EP or BPTT), ``T1`` free and ``T2`` nudged steps,
    ``betas`` (beta1, beta2), ``random_sign`` / ``thirdphase`` nudging; ``dynamics`` (sync or
    async steps), ``tol`` (stop a phase once settled) and the ``precision`` of the phases."""

    alg: str
    T1: int
    T2: int
    betas: tuple[float, float]
    random_sign: bool
    thirdphase: bool
    dynamics: str
    tol: float | None
    precision: str | None

    def ep_config(self) -> EPConfig:
        """The engine's view of how a batch is trained."""
        return EPConfig(
            alg=self.alg,
            T1=self.T1,
            T2=self.T2,
            betas=tuple(self.betas),
            random_sign=self.random_sign,
            thirdphase=self.thirdphase,
        )


@dataclass(frozen=True)
class OptimConfig:
    """``optim`` (sgd or adam), one learning rate and weight decay (None: 0) per synapse,
    SGD momentum ``mmt``, and cosine decay of the rates (``lr_decay``)."""

    optim: str
    lrs: tuple[float, ...]
    wds: tuple[float, ...] | None
    mmt: float
    lr_decay: bool


@dataclass(frozen=True)
class DataConfig:
    """The images: ``task`` in ``data_dir`` (downloaded when missing unless ``no_download``),
    batches of ``mbs``, ``data_aug`` augmentation, ``num_workers`` loader processes (None:
    the device's default) and the ``seed`` of the data order."""

    task: str
    data_dir: str
    no_download: bool
    mbs: int
    data_aug: bool
    num_workers: int | None
    seed: int | None


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
    (read only), saved as a run's ``args``."""

    model: ModelConfig
    dynamics: DynamicsConfig
    optim: OptimConfig
    data: DataConfig
    run: RunConfig
    flags: Mapping[str, Any]

    def args(self) -> dict:
        """The flags as a plain dict, as records store them under ``args``."""
        return dict(self.flags)

    def plain(self) -> dict:
        """The configurations as plain dicts (lists for tuples), as records store them."""
        return {
            name: {key: _plain(value) for key, value in dataclasses.asdict(part).items()}
            for name, part in (
                ("model", self.model),
                ("dynamics", self.dynamics),
                ("optim", self.optim),
                ("data", self.data),
                ("run", self.run),
            )
        }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _pick(cls: type, flags: Mapping[str, Any], **given: Any) -> Any:
    """``cls`` built from the flags of its field names (tuples for lists), ``given`` on top."""
    values = {}
    for field in dataclasses.fields(cls):
        value = given[field.name] if field.name in given else flags[field.name]
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def settings(flags: Mapping[str, Any]) -> Settings:
    """The configurations of checked flag values (:func:`check_new_run`, or a saved run's
    flags with the session's on top: :func:`saved_flags`)."""
    frozen = MappingProxyType(dict(flags))
    return Settings(
        model=_pick(ModelConfig, frozen),
        dynamics=_pick(DynamicsConfig, frozen),
        optim=_pick(OptimConfig, frozen),
        data=_pick(DataConfig, frozen),
        run=_pick(RunConfig, frozen),
        flags=frozen,
    )


# --------------------------------------------------------------------------------------------
# Checking the flags of a new run
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


def check_positive(flags: Mapping[str, Any], names: Sequence[str], minimum: int = 1) -> None:
    """UsageError unless every value of the flags ``names`` (numbers or lists) is >= minimum."""
    for name in names:
        values = flags[name] if isinstance(flags[name], list) else [flags[name]]
        if any(v < minimum for v in values):
            raise UsageError(f"--{name} must be at least {minimum}, got {flags[name]}")


def check_new_run(given: Mapping[str, Any]) -> dict:
    """A new run's flag values, checked: a copy with the list flags trimmed to what the
    architecture uses, the task's own spelling and the dictionary file; UsageError naming the
    first problem."""
    flags = dict(given)
    flags["task"] = canonical_task(flags["task"])
    in_channels, height, width, classes = task_info(flags["task"])
    check_positive(flags, ("T1", "T2", "epochs", "mbs", "log_every"))
    if flags["num_workers"] is not None:
        check_positive(flags, ("num_workers",), minimum=0)
    check_numbers(flags, FLOAT_RANGES)
    check_betas(flags)
    check_tol(flags["tol"])
    if flags["model"] == "LCACNN" and not flags["dict_training"]:
        raise UsageError("LCACNN needs --dict_training pretrained, finetune or learn")
    if flags["model"] != "LCACNN" and flags["dict_training"]:
        warn(f"--dict_training {flags['dict_training']} ignored: only LCACNN has a dictionary")
        flags["dict_training"] = ""
    check_vector_field(flags)
    if flags["model"] in ("MLP", "VFMLP"):
        pixels = in_channels * height * width
        if flags["archi"] is None:
            flags["archi"] = [pixels, 512, classes]
        check_positive(flags, ("archi",))
        if flags["archi"][0] != pixels or flags["archi"][-1] != classes:
            raise UsageError(
                f"--archi must start with the {pixels} input pixels of {flags['task']} and end "
                f"with its {classes} classes, got {flags['archi']}"
            )
        n_synapses = len(flags["archi"]) - 1
    else:
        n_synapses = check_conv_flags(flags, classes)
    if flags["lrs"] is None:
        raise UsageError(f"--lrs is required: one learning rate per synapse ({n_synapses} here)")
    why = f"one per synapse, {n_synapses} here"
    flags["lrs"] = fit_list("lrs", flags["lrs"], n_synapses, why)
    if flags["wds"] is not None:
        flags["wds"] = fit_list("wds", flags["wds"], n_synapses, why)
    if flags["dict_path"] is None:
        flags["dict_path"] = str(Path("dictionaries") / flags["task"] / "dictionary.pt")
    flags["dict_path"] = dictionary_file(flags["dict_path"])
    return flags


def dictionary_file(path: str | Path) -> str:
    """``--dict-path``: a dictionary file, or the folder cifar_dictlearning.py wrote it in."""
    return str(Path(path) / "dictionary.pt") if Path(path).is_dir() else str(path)


def check_vector_field(flags: dict) -> None:
    """``--vf`` only with LCACNN; ``--same-update`` only with a vector-field model (else off)."""
    if flags["vf"] and flags["model"] != "LCACNN":
        raise UsageError(
            f"--vf makes LCACNN a vector-field model; for {flags['model']} use --model VFCNN "
            f"or VFMLP"
        )
    if flags["same_update"] and not (flags["vf"] or flags["model"] in VF_MODELS):
        warn("--same-update ignored: only vector-field models (VFCNN, VFMLP, --vf) have it")
        flags["same_update"] = False


def check_betas(flags: Mapping[str, Any]) -> None:
    """``--betas`` is two finite numbers with a usable nudge; BPTT's T2 fits in T1."""
    betas = flags["betas"]
    if len(betas) != 2 or not all(math.isfinite(beta) for beta in betas):
        raise UsageError(f"--betas takes exactly two numbers (beta1 beta2), got {betas}")
    beta_1, beta_2 = betas
    if flags["alg"] == "EP" and (beta_2 == 0 or beta_1 == beta_2):
        raise UsageError(
            f"EP needs a nudging beta2 that is non-zero and differs from beta1, got --betas "
            f"{beta_1} {beta_2} (e.g. --betas 0.0 0.5)"
        )
    if flags["alg"] == "BPTT" and flags["T2"] > flags["T1"]:
        raise UsageError(f"BPTT backpropagates the last T2 of T1 steps: T2 ({flags['T2']}) > T1")


def check_tol(tol: float | None) -> None:
    """``--tol`` is a positive finite number when given."""
    if tol is not None and not 0 < tol < math.inf:
        raise UsageError(f"--tol must be a positive number (e.g. --tol 1e-4), got {tol}")


def check_conv_flags(flags: dict, classes: int) -> int:
    """Validate (and trim) the CNN / LCACNN layer lists; returns the number of synapses."""
    lca = flags["model"] == "LCACNN"
    check_positive(flags, ("channels", "kernels", "strides", "fc"))
    check_positive(flags, ("paddings",), minimum=0)
    pools, channels = flags["pools"], flags["channels"]
    bad = sorted(set(pools) - set(POOLS))
    if bad:
        raise UsageError(f"--pools letters must be m, a or i; got {''.join(bad)} in {pools}")
    n_conv = len(channels) - 1 if lca else len(channels)
    copy_note = ", after the LCA copy layer" if lca else ""
    why = f"one per conv layer: {n_conv} for --channels {' '.join(map(str, channels))}"
    for flag in ("kernels", "strides", "paddings"):
        flags[flag] = fit_list(flag, flags[flag], n_conv, why + copy_note)
    flags["pools"] = pools = fit_list("pools", pools, len(channels), "one per entry of --channels")
    if flags["fc"][-1] != classes:
        raise UsageError(f"the last --fc size must be the {classes} classes of {flags['task']}")
    if lca:
        check_positive(flags, ("lca_feats", "lca_ksize", "lca_stride", "lca_iters"))
        if channels[0] != flags["lca_feats"]:
            raise UsageError(
                f"with LCACNN the first --channels entry is the LCA copy layer and must equal "
                f"--lca_feats ({flags['lca_feats']}), got {channels[0]}"
            )
        if pools[0] != "i":
            raise UsageError(f"with LCACNN --pools must start with i (the copy layer): {pools}")
        if flags["lca_ksize"] % 2 == 0:
            raise UsageError(f"--lca_ksize must be odd (LCA pads 'same'), got {flags['lca_ksize']}")
    return n_conv + len(flags["fc"])


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
    checkpoint: dict,
    typed: Mapping[str, Any],
    explicit: set[str],
    n_synapses: int,
    finished: bool = True,
) -> tuple[dict, list[str]]:
    """The flags to resume ``checkpoint`` with (``saved_flags`` with ``RESUME_OVERRIDES``), and
    which of ``--lrs`` / ``--wds`` the command line changes: one value per synapse of the saved
    model (``n_synapses``; a vector-field model's backward weights take their forward
    synapse's). UsageError when the run has its epochs already and, ``finished``, its final
    files (a run without them resumes to write them)."""
    flags = saved_flags(checkpoint["args"], typed, explicit, RESUME_OVERRIDES)
    check_positive(flags, ("epochs", "log_every"))
    done = checkpoint["epoch"]
    if done > flags["epochs"] or (done == flags["epochs"] and finished):
        raise UsageError(
            f"{typed['load_path']} already has {done} epochs; pass --epochs N with N > {done} "
            f"to train further"
        )
    changed = []
    for name in sorted({"lrs", "wds"} & explicit):
        why = f"one per synapse, {n_synapses}"
        flags[name] = values = fit_list(name, flags[name], n_synapses, why)
        if values != checkpoint["args"].get(name):  # a requeued command line changes nothing
            changed.append(name)
            print(f"notice: --{name} {' '.join(map(str, values))} replaces the saved values "
                  f"from epoch {done} on")  # fmt: skip
    check_numbers(flags, {name: FLOAT_RANGES[name] for name in changed})
    return flags, changed
