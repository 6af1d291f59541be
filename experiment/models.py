"""The ``--model`` registry: one configuration class per model.

Each class declares, for its model:

- its fields (frozen, with the defaults of the flags that set them) and its own flags
  (``FLAGS``, added to ``main_fast.py``'s parser beside the common ones);
- the checks of a new run's flag values (``check``), which trim the per-layer lists to what
  the architecture uses and return the number of synapses;
- the network it builds (``network_class``, ``network_kwargs``);
- what a run of it writes beyond the common files: its figures (``start_figures``,
  ``epoch_figures``, ``final_figures``, the layers of the activity histograms), its extra
  ``results.csv`` columns (``results_columns``, ``<k>`` standing for a synapse's number; the
  network's ``batch_stats`` and ``epoch_stats`` compute them) and the files a finished run has
  (``FINAL_FILES``).

``register`` adds a class to ``MODELS`` under its ``NAME``; ``docs/extending.md`` walks through
adding one. A run's configuration is saved as a plain dict, ``{"name": NAME, field: value}``
(``plain``), and read back with ``from_plain``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from matplotlib.figure import Figure
from torch import Tensor

import data_utils
from experiment.data_loading import task_info
from experiment.entry import UsageError, check_positive, fit_list, warn
from lca_utils_ep_fast import DICT_MODES, LCA_CNN
from rescnn import LCA_ResCNN
from rescnn import ResCNN as ResCNNNet
from utils_ep_fast import P_CNN, P_MLP, POOLS, EnergyNet
from vf_utils_ep_fast import VF_CNN, VF_LCA_CNN, VF_MLP

RECON_IMAGES = 8  # test images shown with their LCA reconstructions

MODELS: dict[str, type[ModelConfig]] = {}


def register(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Add the model class ``cls`` to ``MODELS`` under ``cls.NAME`` (a class decorator)."""
    MODELS[cls.NAME] = cls
    return cls


def model_class(name: str) -> type[ModelConfig]:
    """The registered class of ``--model name``; UsageError for an unknown one."""
    if name not in MODELS:
        raise UsageError(f"unknown --model {name!r}; choose among {', '.join(MODELS)}")
    return MODELS[name]


def from_plain(plain: Mapping[str, Any]) -> ModelConfig:
    """The configuration saved as ``plain`` (``ModelConfig.plain``), lists back to tuples."""
    cls = model_class(plain["name"])
    values = {field.name: plain[field.name] for field in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class ModelConfig:
    """What every model has: ``act`` the activation, ``softmax`` a readout outside the system,
    ``loss`` (mse or cel), ``scale`` the multiplier of the default weight init (None: 1)."""

    NAME: ClassVar[str] = ""
    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = ()
    RESULTS_COLUMNS: ClassVar[tuple[str, ...]] = ()
    FINAL_FILES: ClassVar[tuple[str, ...]] = ()
    BOARD_PREFIX: ClassVar[str] = ""  # of its figures' TensorBoard tags
    NO_VECTOR_FIELD: ClassVar[str] = ""  # why --vf is refused, when the model says why
    BIASES_OWN_RATES: ClassVar[bool] = True  # layer biases take --lrs entries of their own

    act: str = "mysig"
    softmax: bool = False
    loss: str = "mse"
    scale: float | None = None

    # ---- from flags and back ---------------------------------------------------------------

    @classmethod
    def check(cls, flags: dict, task: str) -> int:
        """Check (and trim, in place) a new run's flag values for this model on ``task``;
        returns the number of synapses (one learning rate each). UsageError names the first
        problem."""
        raise NotImplementedError

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> ModelConfig:
        """The configuration of this class's fields in ``flags`` (tuples for lists)."""
        values = {}
        for field in dataclasses.fields(cls):
            value = flags[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def plain(self) -> dict:
        """``{"name": NAME, field: value}`` in plain Python types, as records store it."""
        fields = dataclasses.asdict(self)
        return {"name": self.NAME, **{k: _plain(v) for k, v in fields.items()}}

    # ---- the network ------------------------------------------------------------------------

    @property
    def network_name(self) -> str:
        """The key of the network class (``network_classes``): the model's name."""
        return self.NAME

    def network_kwargs(self, task: str) -> dict:
        """The network's constructor arguments on ``task``, in plain Python types."""
        raise NotImplementedError

    def network_config(self, task: str) -> dict:
        """``{"model": network name, "kwargs": constructor arguments}`` (``build_network``)."""
        return {"model": self.network_name, "kwargs": self.network_kwargs(task)}

    def _common_kwargs(self) -> dict:
        return {"activation": self.act, "softmax": self.softmax, "loss": self.loss,
                "scale": self.scale}  # fmt: skip

    # ---- what a run of it uses and writes ---------------------------------------------------

    @property
    def folder_mode(self) -> str:
        """The part of the run folder's path after the model (empty: ``none``)."""
        return ""

    def results_columns(self) -> tuple[str, ...]:
        """The ``results.csv`` columns this model's network adds (``RESULTS_COLUMNS``)."""
        return self.RESULTS_COLUMNS

    def dictionary_to_load(self) -> str | None:
        """The dictionary file a new run starts from (None: none)."""
        return None

    def dictionary_source(self) -> tuple[str, str] | None:
        """``(dict_training, dict_path)`` of a front end whose dictionary was learnt on part of
        the training images (None: EP trains on all of them)."""
        return None

    @property
    def trains_dictionary(self) -> bool:
        """Whether a run changes a dictionary (drawn after every epoch)."""
        return False

    def dictionary(self, network: EnergyNet) -> Tensor | None:
        """The network's dictionary (F, C, k, k), or None without one."""
        return None

    def code(self, encoding) -> Tensor | None:
        """The sparse code of a batch's ``encoding`` (None without a front end)."""
        return None

    def start_figures(self, network: EnergyNet) -> dict[str, Figure]:
        """The figures of a new run, by file name, before its first epoch."""
        return {}

    def epoch_figures(self, network: EnergyNet, epoch: int) -> dict[str, Figure]:
        """The model's own figures after ``epoch``, by file name."""
        return {}

    def final_figures(self, network: EnergyNet, images: Tensor) -> dict[str, Figure]:
        """The figures of a finished run (``FINAL_FILES``), by file name, of test ``images``."""
        return {}

    def activity_layers(
        self, network: EnergyNet, encoding, neurons: list[Tensor]
    ) -> tuple[list[Tensor], list[str]]:
        """The states of the activity histograms and their names: every layer of the network's
        graph, named by the kinds of the links that feed it and its shape."""
        graph = network.graph
        names = []
        for k, layer in enumerate(graph.layers):
            kinds = "+".join(network.links[e].name for e in graph.incoming[k]) or "no link"
            names.append(f"layer {k + 1} ({kinds}, {'x'.join(map(str, layer.shape))})")
        return list(neurons), names


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------
# Multilayer perceptrons
# --------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class MLP(ModelConfig):
    """A fully connected network of ``archi`` sizes: the input pixels, hidden layers, classes."""

    NAME: ClassVar[str] = "MLP"
    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = (
        ("--archi", {"type": int, "nargs": "+", "default": None,
                     "help": "MLP sizes; pixels 512 classes"}),
    )  # fmt: skip

    archi: tuple[int, ...] = ()

    @classmethod
    def check(cls, flags: dict, task: str) -> int:
        in_channels, height, width, classes = task_info(task)
        pixels = in_channels * height * width
        if flags["archi"] is None:
            flags["archi"] = [pixels, 512, classes]
        check_positive(flags, ("archi",))
        if flags["archi"][0] != pixels or flags["archi"][-1] != classes:
            raise UsageError(
                f"--archi must start with the {pixels} input pixels of {task} and end with its "
                f"{classes} classes, got {flags['archi']}"
            )
        return len(flags["archi"]) - 1

    def network_kwargs(self, task: str) -> dict:
        return {"archi": list(self.archi), **self._common_kwargs()}


@dataclass(frozen=True)
class VectorField:
    """Backward weights of their own (a vector field, not an energy); ``same_update``
    averages the forward and backward updates. The results add the forward/backward angles.
    Mixed in before the model it gives backward weights to."""

    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = (
        ("--same-update", {"action": "store_true",
                           "help": "VF models: average forward/backward updates"}),
    )  # fmt: skip
    RESULTS_COLUMNS: ClassVar[tuple[str, ...]] = ("angle_syn<k>",)

    same_update: bool = False

    def network_kwargs(self, task: str) -> dict:
        return {**super().network_kwargs(task), "same_update": self.same_update}


@register
@dataclass(frozen=True)
class VFMLP(VectorField, MLP):
    """The MLP with backward weights (``VectorField``)."""

    NAME: ClassVar[str] = "VFMLP"


# --------------------------------------------------------------------------------------------
# Convolutional networks
# --------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class CNN(ModelConfig):
    """Conv layers (one entry of ``channels``, ``kernels``, ``strides``, ``paddings`` and a
    pool letter of ``pools`` each: m max, a average, i none), then dense layers of ``fc``."""

    NAME: ClassVar[str] = "CNN"
    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = (
        ("--channels", {"type": int, "nargs": "+", "default": [32, 64],
                        "help": "feature maps per layer"}),
        ("--pools", {"default": "mm", "help": "pool per layer: m max, a average, i none"}),
        ("--kernels", {"type": int, "nargs": "+", "default": [5, 5],
                       "help": "kernel size per conv"}),
        ("--strides", {"type": int, "nargs": "+", "default": [1, 1], "help": "stride per conv"}),
        ("--paddings", {"type": int, "nargs": "+", "default": [0, 0],
                        "help": "padding per conv"}),
        ("--fc", {"type": int, "nargs": "+", "default": [10],
                  "help": "fully connected layer sizes"}),
    )  # fmt: skip

    channels: tuple[int, ...] = (32, 64)
    kernels: tuple[int, ...] = (5, 5)
    strides: tuple[int, ...] = (1, 1)
    paddings: tuple[int, ...] = (0, 0)
    pools: str = "mm"
    fc: tuple[int, ...] = (10,)

    COPY_LAYERS: ClassVar[int] = 0  # leading entries of --channels that are not conv layers

    @classmethod
    def check(cls, flags: dict, task: str) -> int:
        classes = task_info(task)[3]
        check_positive(flags, ("channels", "kernels", "strides", "fc"))
        check_positive(flags, ("paddings",), minimum=0)
        pools, channels = flags["pools"], flags["channels"]
        bad = sorted(set(pools) - set(POOLS))
        if bad:
            raise UsageError(f"--pools letters must be m, a or i; got {''.join(bad)} in {pools}")
        n_conv = len(channels) - cls.COPY_LAYERS
        copy_note = ", after the LCA copy layer" if cls.COPY_LAYERS else ""
        why = f"one per conv layer: {n_conv} for --channels {' '.join(map(str, channels))}"
        for flag in ("kernels", "strides", "paddings"):
            flags[flag] = fit_list(flag, flags[flag], n_conv, why + copy_note)
        flags["pools"] = fit_list("pools", pools, len(channels), "one per entry of --channels")
        if flags["fc"][-1] != classes:
            raise UsageError(f"the last --fc size must be the {classes} classes of {task}")
        return n_conv + len(flags["fc"])

    def network_kwargs(self, task: str) -> dict:
        in_channels, height, _, _ = task_info(task)
        return {
            "in_size": height,
            "in_channels": in_channels,
            "channels": list(self.channels),
            "kernels": list(self.kernels),
            "strides": list(self.strides),
            "paddings": list(self.paddings),
            "pools": self.pools,
            "fc": list(self.fc),
            **self._common_kwargs(),
        }


@register
@dataclass(frozen=True)
class VFCNN(VectorField, CNN):
    """The CNN with backward weights (``VectorField``)."""

    NAME: ClassVar[str] = "VFCNN"


@dataclass(frozen=True)
class LCAFrontEnd:
    """An LCA sparse-coding front end (``lca_*``) whose code drives a copy layer (the first
    entry of ``channels``), then the model's body; ``scale_feedback`` scales the feedback into
    the copy layer. The dictionary is ``pretrained`` (loaded from ``dict_path``, fixed),
    ``finetune`` (loaded, then updated after every batch) or ``learn`` (updated from random).
    Mixed in before the model whose body it feeds."""

    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = (
        ("--lca_feats", {"type": int, "default": 64, "help": "LCA dictionary features"}),
        ("--lca_lambda", {"type": float, "default": 0.25, "help": "LCA threshold"}),
        ("--lca_tau", {"type": float, "default": 100.0, "help": "LCA time constant"}),
        ("--lca_eta", {"type": float, "default": 0.05, "help": "LCA dictionary learning rate"}),
        ("--lca_stride", {"type": int, "default": 2, "help": "LCA stride"}),
        ("--lca_iters", {"type": int, "default": 600, "help": "LCA iterations"}),
        ("--lca_ksize", {"type": int, "default": 9, "help": "LCA feature size (odd)"}),
        ("--scale_feedback", {"type": float, "default": 0.01,
                              "help": "feedback scale into the LCA copy"}),
        ("--dict_training", {"choices": ("", *DICT_MODES), "default": "",
                             "help": "LCA dictionary mode"}),
        ("--dict-path", {"default": None,
                         "help": "dictionary file; ./dictionaries/<task>/dictionary.pt"}),
    )  # fmt: skip
    RESULTS_COLUMNS: ClassVar[tuple[str, ...]] = (
        "lca_frac_active", "lca_recon_error", "dict_cosine",
    )  # fmt: skip
    FINAL_FILES: ClassVar[tuple[str, ...]] = ("reconstructions.png",)
    BOARD_PREFIX: ClassVar[str] = "lca/"
    COPY_LAYERS: ClassVar[int] = 1

    lca_feats: int = 64
    lca_ksize: int = 9
    lca_stride: int = 2
    lca_lambda: float = 0.25
    lca_tau: float = 100.0
    lca_eta: float = 0.05
    lca_iters: int = 600
    scale_feedback: float = 0.01
    dict_training: str = ""
    dict_path: str | None = None

    LCA_ARGUMENTS: ClassVar[tuple[str, ...]] = (
        "lca_feats", "lca_ksize", "lca_stride", "lca_lambda", "lca_tau", "lca_eta", "lca_iters",
        "scale_feedback", "dict_training",
    )  # fmt: skip

    @classmethod
    def check(cls, flags: dict, task: str) -> int:
        if not flags["dict_training"]:
            raise UsageError(f"{cls.NAME} needs --dict_training pretrained, finetune or learn")
        n_synapses = super().check(flags, task)
        check_positive(flags, ("lca_feats", "lca_ksize", "lca_stride", "lca_iters"))
        if flags["channels"][0] != flags["lca_feats"]:
            raise UsageError(
                f"with {cls.NAME} the first --channels entry is the LCA copy layer and must "
                f"equal --lca_feats ({flags['lca_feats']}), got {flags['channels'][0]}"
            )
        if flags["lca_ksize"] % 2 == 0:
            raise UsageError(f"--lca_ksize must be odd (LCA pads 'same'), got {flags['lca_ksize']}")
        return n_synapses

    def network_kwargs(self, task: str) -> dict:
        kwargs = super().network_kwargs(task)
        return {**kwargs, **{name: getattr(self, name) for name in self.LCA_ARGUMENTS}}

    @property
    def folder_mode(self) -> str:
        return self.dict_training

    def dictionary_to_load(self) -> str | None:
        return None if self.dict_training == "learn" else self.dict_path

    def dictionary_source(self) -> tuple[str, str] | None:
        return self.dict_training, self.dict_path

    @property
    def trains_dictionary(self) -> bool:
        return self.dict_training != "pretrained"

    def dictionary(self, network: LCA_CNN) -> Tensor:
        return network.lca.get_weights()

    def code(self, encoding) -> Tensor:
        return encoding.code

    def start_figures(self, network: LCA_CNN) -> dict[str, Figure]:
        pretrained = self.dict_training == "pretrained"
        filename = "dictionary.png" if pretrained else "dictionary_epoch0.png"
        figure = data_utils.plot_dictionary(self.dictionary(network), "initial dictionary")
        return {filename: figure}

    def epoch_figures(self, network: LCA_CNN, epoch: int) -> dict[str, Figure]:
        if not self.trains_dictionary:
            return {}
        title = f"dictionary after epoch {epoch}"
        return {f"dictionary_epoch{epoch}.png": data_utils.plot_dictionary(
            self.dictionary(network), title)}  # fmt: skip

    @torch.no_grad()
    def final_figures(self, network: LCA_CNN, images: Tensor) -> dict[str, Figure]:
        """Test images and their LCA reconstructions with the initial and final dictionary."""
        images = images[:RECON_IMAGES].to(network.initial_dictionary.device)
        final = network.lca.get_weights()
        inputs, final_recon = network.reconstruct(images)
        if self.dict_training == "pretrained":
            rows = {"LCA reconstruction": final_recon}
        else:
            network.lca.assign_weight_values(network.initial_dictionary.clone(), normalize=False)
            _, initial_recon = network.reconstruct(images)
            network.lca.assign_weight_values(final, normalize=False)
            rows = {"initial dictionary": initial_recon, "final dictionary": final_recon}
        figure = data_utils.plot_reconstructions(inputs, rows, n_images=RECON_IMAGES)
        return {"reconstructions.png": figure}

    def activity_layers(
        self, network: EnergyNet, encoding, neurons: list[Tensor]
    ) -> tuple[list[Tensor], list[str]]:
        states, names = super().activity_layers(network, encoding, neurons)
        return [encoding.code, *states], ["LCA code", *names]


@register
@dataclass(frozen=True)
class LCACNN(LCAFrontEnd, CNN):
    """The CNN behind an LCA front end (``LCAFrontEnd``): the copy layer takes pool ``i``.
    ``vf`` gives the convs backward weights (a vector field; ``same_update`` as VFCNN's)."""

    NAME: ClassVar[str] = "LCACNN"
    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = (
        *LCAFrontEnd.FLAGS,
        ("--vf", {"action": "store_true", "help": "LCACNN with separate backward weights"}),
        *VectorField.FLAGS,
    )  # fmt: skip

    vf: bool = False
    same_update: bool = False

    @classmethod
    def check(cls, flags: dict, task: str) -> int:
        n_synapses = super().check(flags, task)
        if flags["pools"][0] != "i":
            raise UsageError(
                f"with LCACNN --pools must start with i (the copy layer): {flags['pools']}"
            )
        return n_synapses

    @property
    def network_name(self) -> str:
        return "VFLCACNN" if self.vf else self.NAME

    def network_kwargs(self, task: str) -> dict:
        kwargs = super().network_kwargs(task)
        if self.vf:
            kwargs["same_update"] = self.same_update
        return kwargs

    def results_columns(self) -> tuple[str, ...]:
        return (*self.RESULTS_COLUMNS, *(VectorField.RESULTS_COLUMNS if self.vf else ()))


# --------------------------------------------------------------------------------------------
# Residual networks
# --------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class ResCNN(ModelConfig):
    """Hopfield-ResNet blocks (``rescnn``), one per entry of ``channels``: ``a`` (3x3 conv of
    the block's input), ``b`` (3x3 stride-2 conv of ``a`` plus a 1x1 stride-2 skip from the
    input), then dense layers of ``fc``; linear output units. ``--scale`` takes one gain per
    weight tensor or one for all; each layer's bias takes the rate of the conv feeding it from
    the layer before."""

    NAME: ClassVar[str] = "ResCNN"
    NO_VECTOR_FIELD: ClassVar[str] = "there is no vector-field residual model"
    BIASES_OWN_RATES: ClassVar[bool] = False
    COPY_LAYERS: ClassVar[int] = 0
    CNN_ONLY_FLAGS: ClassVar[tuple[str, ...]] = ("kernels", "strides", "paddings", "pools")

    channels: tuple[int, ...] = (32, 64)
    fc: tuple[int, ...] = (10,)

    @classmethod
    def check(cls, flags: dict, task: str) -> int:
        classes = task_info(task)[3]
        check_positive(flags, ("channels", "fc"))
        for name in cls.CNN_ONLY_FLAGS:
            default = getattr(CNN, name)
            if flags[name] != (default if isinstance(default, str) else list(default)):
                warn(f"--{name} ignored: {cls.NAME}'s convs are 3x3/1, 3x3/2 and the 1x1/2 skip")
        blocks = len(flags["channels"]) - cls.COPY_LAYERS
        if blocks < 1:
            raise UsageError(f"{cls.NAME} needs at least one block in --channels")
        if flags["fc"][-1] != classes:
            raise UsageError(f"the last --fc size must be the {classes} classes of {task}")
        return 3 * blocks + len(flags["fc"])

    def network_kwargs(self, task: str) -> dict:
        in_channels, height, _, _ = task_info(task)
        return {
            "in_size": height,
            "in_channels": in_channels,
            "channels": list(self.channels),
            "fc": list(self.fc),
            **self._common_kwargs(),
        }


@register
@dataclass(frozen=True)
class LCAResCNN(LCAFrontEnd, ResCNN):
    """The ResCNN behind an LCA front end (``LCAFrontEnd``): the first ``channels`` entry is
    the copy layer of the code, which feeds the first block."""

    NAME: ClassVar[str] = "LCAResCNN"
    FLAGS: ClassVar[tuple[tuple[str, dict], ...]] = LCAFrontEnd.FLAGS
    COPY_LAYERS: ClassVar[int] = 1


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------

# network name -> its class ("VFLCACNN": LCACNN --vf); records saved before the typed
# configuration name their network this way
NETWORK_CLASSES: dict[str, Callable[..., EnergyNet]] = {
    "CNN": P_CNN,
    "LCACNN": LCA_CNN,
    "MLP": P_MLP,
    "VFCNN": VF_CNN,
    "VFMLP": VF_MLP,
    "VFLCACNN": VF_LCA_CNN,
    "ResCNN": ResCNNNet,
    "LCAResCNN": LCA_ResCNN,
}
