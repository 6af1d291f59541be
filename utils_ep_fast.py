"""The EP engine: energy-based recurrent networks and how Equilibrium Propagation trains them.

A network is a graph (``graph``) of neuron layers ``s_0 .. s_{L-1}`` driven by a fixed input
``x``: edges ``e = (source, target)`` from ``x`` or a layer to a layer, each with its link
(``links``: conv with its pool, linear, copy), and optionally a bias ``b_k`` per layer (per
channel for a map). The primitive function, one value per sample (``<.,.>`` sums over all
non-batch elements)::

    Phi(x, s, beta) = sum_e < F_e(s_source(e)), s_target(e) >  +  sum_k < b_k, s_k >
                      -  beta * L(s, y)

The output layer ``s_out`` is named (``output_index``). The loss ``L`` is an object
(``losses``, the model's ``criterion``): with ``softmax=True`` the readout, a linear layer
outside the system (``readout``), gives ``L = CE(softmax(W_out s_out + b_out), y)``; otherwise
``L`` acts on the output units ``s_out`` (``mse``: ``0.5 ||s_out - onehot(y)||^2``, ``cel``:
``CE(s_out, y)``).

A step updates every layer ``s_k <- sigma(dPhi/ds_k)``, with the derivative written out::

    dPhi/ds_k = sum_{e into k} F_e(s_source) + b_k + g_k sum_{e out of k} F_e^T(s_target)

(``+`` the nudge on the output layer), where ``F^T`` is the link's adjoint and ``g_k`` the
layer's feedback scale (1 but for the LCA copy layer's ``scale_feedback``). A chain (the models
built here) has the edges ``(x, s_0), (s_0, s_1), ...``, one term each way.
``dynamics`` runs the steps (sync, or async over a colouring of the graph, for ``T`` steps or
to a tolerance). The EP parameter estimate is::

    grad(theta) = d/dtheta [ mean_batch(Phi(s^2, beta_2) - Phi(s^1, beta_1)) / (beta_1 - beta_2) ]

written out explicitly as weight-gradient correlations, each link writing its own share.
A learning rule is an object (``estimators.Estimator``): it runs a batch's phases and writes
the parameter gradient, for training, the precision check and the GDU check alike. Phases run
through a ``dynamics.Phases`` handed to them (the compiled runner, the safe point, the phase
records); nothing of the kind is set on the model. Vector-field models
(``vf_utils_ep_fast``) are the same network with links that carry their feedback through
separate backward weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import dynamics
from dynamics import (
    CLAMP_SLOPES,
    DYNAMICS,
    EAGER,
    TOL_EVERY,
    OutputUpdate,
    PhaseRecord,
    Phases,
    max_change,
    settling_trace,
    sync_step,
)
from graph import INPUT, Graph, Layer
from learning.estimators import BPTT, EP, EPConfig, Estimator, gdu_check
from learning.losses import LOSSES, Loss, make_loss
from learning.metrics import Metrics
from links import (
    POOLS,
    ConvLink,
    CopyLink,
    LinearLink,
    Link,
    conv_output_size,
    in_memory_format,
    memory_format_for,
)

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def mysig(x: Tensor) -> Tensor:
    """``1 / (1 + exp(-4 (x - 0.5)))``."""
    return torch.sigmoid(4.0 * (x - 0.5))


def hard_sigmoid(x: Tensor) -> Tensor:
    """``(1 + hardtanh(2x - 1)) / 2``, i.e. ``clamp(x, 0, 1)``."""
    return x.clamp(0.0, 1.0)


def my_hard_sig(x: Tensor) -> Tensor:
    """``(1 + hardtanh(x - 1)) / 2``, i.e. ``clamp(x, 0, 2) / 2``."""
    return x.clamp(0.0, 2.0) * 0.5


def ctrd_hard_sig(x: Tensor) -> Tensor:
    """``hardtanh(2x) / 2``, i.e. ``clamp(x, -0.5, 0.5)``."""
    return x.clamp(-0.5, 0.5)


def relu6(x: Tensor) -> Tensor:
    """``clamp(x, 0, 6)`` (the Hopfield-ResNet's activation; slope 1 on its linear range)."""
    return x.clamp(0.0, 6.0)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mysig": mysig,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hard_sigmoid": hard_sigmoid,
    "my_hard_sig": my_hard_sig,
    "ctrd_hard_sig": ctrd_hard_sig,
    "relu6": relu6,
}


class DivergenceError(RuntimeError):
    """Neurons or weights stopped being finite: training cannot go on from here."""


class Encoding(NamedTuple):
    """A batch as the system takes it, from ``EnergyNet.prepare_input``.

    images: the batch (B, C, H, W) or (B, N) as the model reads it (the LCA front end
        standardises each image first);
    code: the system's fixed input ``x`` of ``Phi``: the images themselves, or the LCA front
        end's sparse code (B, F, H', W');
    recon_errors: ``images - D * code`` for the LCA front end, else None.
    """

    images: Tensor
    code: Tensor
    recon_errors: Tensor | None = None


# --------------------------------------------------------------------------------------------
# The energy-based network
# --------------------------------------------------------------------------------------------


class EnergyNet(nn.Module):
    """A graph of layers and links (module docstring). A subclass builds it: it fills
    ``synapses`` (they own the weights; ``optimizer_groups`` gives synapse ``i`` the rate entry
    ``i``), adds layers (``add_layer``) and edges with their links (``couple``: ``links[e]`` is
    edge ``e``'s), names the readout (``set_readout``) and the output layer (``set_output``;
    default the last layer added). The loss is ``criterion`` (``losses``), built from
    ``loss`` and ``softmax``; the output layer's activation is the model's
    (``activate_output``)."""

    # output units without the activation, whatever the loss (without a softmax readout)
    OUTPUT_LINEAR = False

    def __init__(
        self,
        activation: str = "my_hard_sig",
        softmax: bool = False,
        loss: str = "mse",
        scale_feedback: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {list(LOSSES)}")
        self.activation = activation
        self.sigma = ACTIVATIONS[activation]
        self.softmax = softmax
        self.loss_name = loss
        self.scale_feedback = scale_feedback
        self.synapses = nn.ModuleList()
        self.links = nn.ModuleList()
        self.graph = Graph()
        # one bias per layer that has one (``Layer.bias``), under the layer's index
        self.layer_biases = nn.ParameterDict()
        self.num_classes = 0
        object.__setattr__(self, "_readout", None)  # a synapse, not registered twice
        self._output: int | None = None
        self._groups: list[list[int]] | None = None
        self.set_dynamics()
        object.__setattr__(self, "_criterion", (None, None))  # (its key, the loss object)

    def set_dynamics(
        self, dynamics: str = "sync", tol: float | None = None, tol_every: int = TOL_EVERY
    ) -> None:
        """How phases run (``dynamics``): ``sync`` or ``async`` steps; with ``tol`` a phase stops
        once ``max |s_t - s_(t-1)| < tol`` (checked every ``tol_every`` steps and at its cap)."""
        if dynamics not in DYNAMICS:
            raise ValueError(f"unknown dynamics {dynamics!r}; choose from {DYNAMICS}")
        if tol is not None and not 0.0 < tol < float("inf"):
            raise ValueError(f"the tolerance must be a positive number, got {tol}")
        if tol_every < 1:
            raise ValueError(f"tol_every must be at least 1, got {tol_every}")
        self.dynamics, self.tol, self.tol_every = dynamics, tol, tol_every

    @contextmanager
    def dynamics_set_to(self, dynamics: str, tol: float | None = None):
        """Run the block with other dynamics and tolerance, then restore the model's own."""
        saved = self.dynamics, self.tol, self.tol_every
        self.set_dynamics(dynamics, tol, self.tol_every)
        try:
            yield self
        finally:
            self.set_dynamics(*saved)

    # ---- the graph ------------------------------------------------------------------------

    def add_layer(
        self, shape: tuple[int, ...], feedback_scale: float = 1.0, bias: bool = False
    ) -> int:
        """Add a layer of per-sample ``shape``; ``feedback_scale`` ``g`` multiplies the sum of
        the adjoints it receives; ``bias``: a bias of its own (zeros; one per channel of a map).
        Returns its index."""
        k = self.graph.add_layer(Layer(tuple(shape), feedback_scale, bias))
        if bias:
            self.layer_biases[str(k)] = nn.Parameter(torch.zeros(shape[0]))
        self._groups = None
        return k

    def couple(self, source: int, target: int, link: Link) -> int:
        """Add the edge ``source -> target`` (``source``: ``graph.INPUT`` or a layer) with its
        ``link``, whose ``shape`` must be the target's. Returns the edge's index."""
        if tuple(link.shape) != self.graph.layers[target].shape:
            raise ValueError(
                f"a link of shape {tuple(link.shape)} cannot feed layer {target} of shape "
                f"{self.graph.layers[target].shape}"
            )
        index = self.graph.add_edge(source, target)
        self.links.append(link)
        self._groups = None
        return index

    def set_readout(self, readout: nn.Linear) -> None:
        """Name ``readout`` (one of ``synapses``) as the readout outside the system."""
        object.__setattr__(self, "_readout", readout)

    def set_output(self, k: int) -> None:
        """Name layer ``k`` as the output layer (the nudged one, read by the readout)."""
        self._output = k

    @property
    def readout(self) -> nn.Linear | None:
        """The readout ``W_out s_out + b_out`` outside the system, when ``softmax``."""
        return self._readout if self.softmax else None

    @property
    def output_index(self) -> int:
        """The output layer's index (the last layer unless ``set_output`` named another)."""
        return self.num_layers - 1 if self._output is None else self._output

    @property
    def num_layers(self) -> int:
        return len(self.graph)

    @property
    def groups(self) -> list[list[int]]:
        """The asynchronous dynamics' groups: ``graph.colouring()``, computed once."""
        if self._groups is None:
            self._groups = self.graph.colouring()
        return self._groups

    def layer_bias(self, k: int) -> Tensor | None:
        """Layer ``k``'s bias shaped to broadcast over its states, (C, 1, 1) or (N,); or None."""
        bias = self.layer_biases[str(k)] if self.graph.layers[k].bias else None
        if bias is None:
            return None
        shape = self.graph.layers[k].shape
        return bias.view(-1, *([1] * (len(shape) - 1)))

    def input_drives(self, x: Tensor) -> list[Tensor]:
        """``F_e(x)`` for every edge leaving the input, in edge order (once per phase)."""
        return [self.links[e].drive(x)[0] for e in self.graph.input_edges]

    # ---- hooks for the front ends and the vector-field models ------------------------------

    def prepare_input(self, x: Tensor) -> Encoding:
        """The batch ``x`` as the system takes it: its own fixed input (the LCA model encodes)."""
        return Encoding(images=x, code=x)

    def code_with_graph(self, x: Tensor) -> Tensor:
        """The system's fixed input for ``x`` (B, C, H, W) with an autograd graph back to ``x``
        (for input gradients): ``x`` itself here."""
        return x

    def after_update(self, encoding: Encoding, nudged: list[Tensor]) -> None:
        """Run after every optimizer step with the batch's encoding and the states that carried
        the learning signal (the LCA front end updates its dictionary)."""

    def batch_stats(self, encoding: Encoding) -> dict[str, float]:
        """Extra per-batch metrics of ``encoding`` (e.g. LCA sparsity); none here."""
        return {}

    def epoch_stats(self) -> dict[str, float]:
        """Extra metrics of the weights after an epoch (e.g. forward/backward angles); none."""
        return {}

    def optimizer_groups(self) -> list[tuple[int, list[nn.Parameter]]]:
        """The optimizer's parameter sets, each with its ``lrs`` / ``wds`` entry (synapse i: i;
        then the layer biases, each its own entry after the synapses')."""
        groups = [(i, list(synapse.parameters())) for i, synapse in enumerate(self.synapses)]
        first = len(self.synapses)
        return groups + [(first + j, [bias]) for j, bias in enumerate(self.layer_biases.values())]

    def init_neurons(self, x: Tensor) -> list[Tensor]:
        """Zero states, one ``(B, *shape_k)`` per layer, on ``x``'s device and dtype."""
        return [x.new_zeros((x.shape[0], *layer.shape)) for layer in self.graph.layers]

    # ---- energy, loss, prediction ---------------------------------------------------------

    @property
    def criterion(self) -> Loss:
        """The loss object (``losses.make_loss``): ``loss`` on the output units, or the softmax
        readout with ``softmax``; made once per (loss, classes, readout)."""
        key = (self.loss_name, self.num_classes, self.readout)
        made_for, criterion = self._criterion
        if made_for != key:
            criterion = make_loss(self.loss_name, self.num_classes, self.readout)
            object.__setattr__(self, "_criterion", (key, criterion))
        return criterion

    def output_logits(self, neurons: list[Tensor]) -> Tensor:
        """(B, classes): the readout of ``s_out`` with ``softmax``, else the output units."""
        return self.criterion.logits(neurons[self.output_index])

    def loss(self, neurons: list[Tensor], y: Tensor) -> Tensor:
        """Per-sample loss (B,) of the states ``neurons``: ``criterion.value`` of ``s_out``."""
        return self.criterion.value(neurons[self.output_index], y)

    def predict(self, neurons: list[Tensor]) -> Tensor:
        """Predicted class per sample (B,)."""
        return self.criterion.predict(neurons[self.output_index])

    def Phi(self, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float) -> Tensor:
        """The primitive function ``sum_e <F_e(s_source), s_target> + sum_k <b_k, s_k> - beta
        L``, per sample (B,), its terms added in edge order, then layer order."""
        phi = x.new_zeros(x.shape[0])
        for edge, link in zip(self.graph.edges, self.links, strict=True):
            source = x if edge.source == INPUT else neurons[edge.source]
            phi = phi + link.phi(source, neurons[edge.target])
        for k, state in enumerate(neurons):
            bias = self.layer_bias(k)
            if bias is not None:
                phi = phi + (bias * state).flatten(1).sum(1)
        if beta != 0.0:
            phi = phi - beta * self.loss(neurons, y)
        return phi

    @property
    def has_energy(self) -> bool:
        """Whether ``energy`` is defined: for a clamp activation (``CLAMP_SLOPES``)."""
        return self.activation in CLAMP_SLOPES

    def energy(self, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float = 0.0) -> Tensor:
        """The energy the asynchronous dynamics descend, per sample (B,): ``dynamics.energy``."""
        return dynamics.energy(self, x, y, neurons, beta)

    # ---- dynamics -------------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float = 0.0) -> list[Tensor]:
        """One synchronous step ``s_k <- sigma(dPhi/ds_k)`` for every layer, from the old states;
        the new states come back in the layout of ``memory_format_for``."""
        return sync_step(self, y, neurons, beta, self.input_drives(x))

    def layer_update(
        self,
        k: int,
        drives: dict,
        neurons: list[Tensor],
        y: Tensor,
        beta: float,
        output_update: OutputUpdate | None = None,
    ) -> Tensor:
        """Layer ``k``'s new state ``sigma(drive_k + b_k + g_k feedback_k)`` with::

            drive_k    = sum_{e into k} F_e(s_source)        (``drives[e][0]``, in edge order)
            feedback_k = sum_{e out of k} F_e^T(s_target)    (through ``drives[e][1]``, the cache
                                                              of F_e's forward pass on s_k)

        each (B, *shape_k), the targets read from ``neurons``. The output layer's update is the
        loss's (``Loss.output_update``: the nudge, then ``activate_output``), or
        ``output_update(drive, s_out, y, beta)`` when given."""
        graph = self.graph
        drive = None
        for e in graph.incoming[k]:
            drive = drives[e][0] if drive is None else drive + drives[e][0]
        if drive is None:
            drive = neurons[k].new_zeros(neurons[k].shape)
        bias = self.layer_bias(k)
        if bias is not None:
            drive = drive + bias
        feedback = None
        for e in graph.outgoing[k]:
            above = neurons[graph.edges[e].target]
            term = self.links[e].adjoint(above, drives[e][1], drive.shape)
            feedback = term if feedback is None else feedback + term
        if feedback is not None:
            scale = graph.layers[k].feedback_scale
            if scale != 1.0:
                feedback = feedback * scale
            drive = drive + feedback
        if k == self.output_index:
            if output_update is not None:
                return in_memory_format(output_update(drive, neurons[k], y, beta))
            criterion = self.criterion
            new = criterion.output_update(drive, neurons[k], y, beta, self.activate_output)
            return in_memory_format(new)
        return in_memory_format(self.sigma(drive))

    @property
    def linear_output(self) -> bool:
        """Whether the output units take ``dPhi/ds_out`` (plus the nudge) without the
        activation: when the loss asks for it (``cel`` without a readout, Laborieux's
        convention), and always without a readout when the model's output units are linear
        (``OUTPUT_LINEAR``, the ResCNN)."""
        return not self.softmax and (self.OUTPUT_LINEAR or self.criterion.LINEAR_OUTPUT)

    def activate_output(self, drive: Tensor) -> Tensor:
        """The output units' activation: ``sigma``, or the identity for linear output units
        (``linear_output``)."""
        return drive if self.linear_output else self.sigma(drive)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        neurons: list[Tensor],
        T: int,
        beta: float = 0.0,
        track_grad: bool = False,
    ) -> list[Tensor]:
        """``T`` steps of the engine's own loop from ``neurons`` (``dynamics.Phases.run`` with
        no runner, safe point or log); a caller that has its own ``Phases`` runs them there."""
        return EAGER.run(self, x, y, neurons, T, beta, track_grad=track_grad)

    # ---- EP estimate ----------------------------------------------------------------------

    @torch.no_grad()
    def compute_syn_grads(
        self,
        x: Tensor,
        y: Tensor,
        neurons_1: list[Tensor],
        neurons_2: list[Tensor],
        betas: tuple[float, float],
        free: list[Tensor] | None = None,
    ) -> None:
        """Write ``d/dtheta [mean(Phi(s^2, b2) - Phi(s^1, b1)) / (b1 - b2)]`` into every ``.grad``.

        One-sided EP: ``s^1`` the free fixed point, ``betas = (0, beta)``; symmetric EP:
        ``s^1 = s^{-beta}``, ``betas = (-beta, beta)``. Each edge's link writes its own share
        from ``(s_source, s_target)`` of each state; a layer's bias gets
        ``scale (sum s^2_k - sum s^1_k)`` (over the batch, and the positions of a map). The
        readout (``softmax``) only appears in ``-beta L``: ``(b2 dL(s^2) - b1 dL(s^1)) /
        (b2 - b1)`` with the loss's ``parameter_grads`` (``losses.SoftmaxReadout``). ``free``
        (default ``s^1``) is read by the vector-field links, which cross the nudged states with
        it.
        """
        beta_1, beta_2 = betas
        scale = 1.0 / ((beta_1 - beta_2) * max(x.shape[0], 1))  # an empty batch gives zeros
        anchor = neurons_1 if free is None else free

        def ends(edge, states: list[Tensor]) -> tuple[Tensor, Tensor]:
            return (x if edge.source == INPUT else states[edge.source]), states[edge.target]

        for edge, link in zip(self.graph.edges, self.links, strict=True):
            link.write_estimate(
                ends(edge, neurons_1), ends(edge, neurons_2), ends(edge, anchor), scale
            )
        for name, bias in self.layer_biases.items():
            k = int(name)
            sum_2, sum_1 = (states[k].transpose(0, 1).flatten(1).sum(1)
                            for states in (neurons_2, neurons_1))  # fmt: skip
            bias.grad = (sum_2 - sum_1) * scale
        if self.softmax:
            out = self.output_index
            grads_2 = self.criterion.parameter_grads(neurons_2[out], y)
            grads_1 = self.criterion.parameter_grads(neurons_1[out], y)
            for name, param in self.readout.named_parameters():
                param.grad = (beta_1 * grads_1[name] - beta_2 * grads_2[name]) * scale


def _as_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def synapse_gains(scale: float | Sequence[float], count: int) -> list[float]:
    """One gain per synapse from ``--scale``: one number is every synapse's; a list has one
    per synapse (ValueError otherwise)."""
    if isinstance(scale, (int, float)):
        return [scale] * count
    if len(scale) == 1:
        return [scale[0]] * count
    if len(scale) != count:
        raise ValueError(f"{count} weight tensors need {count} gains (--scale), got {len(scale)}")
    return list(scale)


class P_CNN(EnergyNet):
    """Energy-based RCNN: conv layers (each followed by its pool) then fully connected layers.

    Args:
        in_size: input height/width (int or pair), e.g. 32 for CIFAR-10.
        in_channels: channels of the fixed input (3 for CIFAR-10, 1 for MNIST).
        channels: output channels of each conv layer, e.g. ``[64, 128, 256, 512]``.
        kernels, strides, paddings: one per conv layer.
        pools: one letter per conv layer (``m``, ``a`` or ``i``), e.g. ``"mmmm"``.
        fc: sizes of the fully connected layers after the convs; the last is the class count.
            With ``softmax`` that last one is the readout, outside the system.
        input_copy: when True the first layer of the system is a copy of the input, coupled by
            identity, and the convs start from it (used by the LCA front end); the feedback it
            receives is scaled by ``scale_feedback``.
        scale: ``--scale g``: PyTorch's default init (kaiming-uniform a=sqrt 5, bias
            U(+-1/sqrt fan_in)) multiplied by ``g``; a list: one ``g`` per synapse. Without it
            the default init stands.
    """

    def __init__(
        self,
        in_size: int | tuple[int, int],
        in_channels: int,
        channels: list[int],
        kernels: list[int],
        strides: list[int],
        paddings: list[int],
        pools: str,
        fc: list[int],
        activation: str = "my_hard_sig",
        softmax: bool = False,
        loss: str = "mse",
        scale: float | None = None,
        input_copy: bool = False,
        scale_feedback: float = 1.0,
    ) -> None:
        super().__init__(activation, softmax, loss, scale_feedback)
        n_conv = len(channels)
        for name, values in (("kernels", kernels), ("strides", strides), ("paddings", paddings)):
            if len(values) != n_conv:
                raise ValueError(f"{n_conv} conv layers need {n_conv} {name}, got {len(values)}")
        if len(pools) != n_conv or any(p not in POOLS for p in pools):
            raise ValueError(f"pools must be {n_conv} letters among m/a/i, got {pools!r}")
        if not fc:
            raise ValueError("fc must list at least the number of classes")
        shape = (in_channels, *_as_pair(in_size))
        if input_copy:
            self._chain(CopyLink(shape, scale_feedback), scale_feedback)
        sizes = [in_channels, *channels]
        for i in range(n_conv):
            conv = nn.Conv2d(sizes[i], sizes[i + 1], kernels[i], strides[i], paddings[i])
            try:
                link = ConvLink(shape, conv, POOLS[pools[i]])
            except ValueError as error:
                raise ValueError(f"conv layer {i + 1} {error}") from None
            self.synapses.append(conv)
            self._chain(link)
            shape = link.shape
        self._add_linear_layers(math.prod(shape), fc)
        self._apply_scale(scale)

    def _chain(self, link: Link, feedback_scale: float = 1.0) -> None:
        """A new layer of ``link.shape`` on top of the chain, fed by ``link`` from the last
        layer (from ``x`` for the first), and named the output layer."""
        target = self.add_layer(link.shape, feedback_scale)
        self.couple(target - 1 if target > 0 else INPUT, target, link)
        self.set_output(target)

    def _add_linear_layers(self, in_features: int, fc: list[int]) -> None:
        """Linear layers ``in_features -> fc[0] -> ... -> fc[-1]``; the last is the readout with
        ``softmax`` (not a layer of the system)."""
        self.num_classes = fc[-1]
        sizes = [in_features, *fc]
        for i in range(len(fc)):
            linear = nn.Linear(sizes[i], sizes[i + 1])
            self.synapses.append(linear)
            if self.softmax and i == len(fc) - 1:
                self.set_readout(linear)
            else:
                self._chain(LinearLink((sizes[i + 1],), linear))
        if not self.links:
            raise ValueError("with softmax the network needs at least one layer before the readout")

    def _apply_scale(self, scale: float | list[float] | None) -> None:
        """``--scale g``: every synapse re-drawn from its default init, then multiplied by g
        (weight and bias); ``--scale g_1 .. g_n``: synapse ``i`` by its own ``g_i``."""
        if scale is None:
            return
        gains = synapse_gains(scale, len(self.synapses))
        with torch.no_grad():
            for synapse, gain in zip(self.synapses, gains, strict=True):
                synapse.reset_parameters()
                synapse.weight.mul_(gain)
                if synapse.bias is not None:
                    synapse.bias.mul_(gain)


class P_MLP(P_CNN):
    """Energy-based multilayer perceptron ``archi[0] -> archi[1] -> ... -> archi[-1]``.

    The input (B, ...) is flattened to (B, archi[0]). With ``softmax`` the last linear layer is
    the readout.
    """

    def __init__(
        self,
        archi: list[int],
        activation: str = "my_hard_sig",
        softmax: bool = False,
        loss: str = "mse",
        scale: float | None = None,
    ) -> None:
        EnergyNet.__init__(self, activation, softmax, loss)
        if len(archi) < 2:
            raise ValueError("archi needs the input size and at least one layer")
        self._add_linear_layers(archi[0], list(archi[1:]))
        self._apply_scale(scale)


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def make_optimizer(
    model: EnergyNet,
    optim: str,
    lrs: list[float],
    wds: list[float] | None = None,
    mmt: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (momentum ``mmt``, Nesterov's with ``nesterov``) or Adam with one learning rate /
    weight decay per synapse (the groups of ``model.optimizer_groups``: a vector-field model's
    backward weights take the rates of their forward synapse)."""
    synapses = list(model.synapses)
    if len(lrs) < len(synapses):
        raise ValueError(f"{len(synapses)} synapses need {len(synapses)} learning rates")
    wds = wds or [0.0] * len(lrs)
    if len(wds) < len(synapses):
        raise ValueError(f"{len(synapses)} synapses need {len(synapses)} weight decays")
    entries = model.optimizer_groups()
    needed = max((i for i, _ in entries), default=-1) + 1
    if len(lrs) < needed or len(wds) < needed:
        raise ValueError(f"{needed} parameter groups need {needed} rates and weight decays")
    groups = [{"params": params, "lr": lrs[i], "weight_decay": wds[i]} for i, params in entries]
    if optim == "sgd":
        return torch.optim.SGD(groups, momentum=mmt, nesterov=nesterov)
    if optim == "adam":
        return torch.optim.Adam(groups)
    raise ValueError(f"unknown optimizer {optim!r}; choose sgd or adam")


def make_scheduler(
    optimizer: torch.optim.Optimizer, lr_decay: bool, epochs: int = 100, floor: float = 1e-5
):
    """``--lr-decay``: cosine annealing over ``epochs`` epochs down to ``floor``; else None."""
    if not lr_decay:
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=floor)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def check_finite(model: EnergyNet, neurons: list[Tensor] | None = None) -> None:
    """Raise ``DivergenceError`` naming the first neuron layer or parameter that is NaN/inf."""
    if neurons is not None:
        for k, state in enumerate(neurons):
            if not torch.isfinite(state).all():
                incoming = model.graph.incoming[k]
                name = model.links[incoming[0]].name if incoming else "no incoming link"
                raise DivergenceError(f"neurons of layer {k + 1} ({name}) are NaN/inf")
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise DivergenceError(f"parameter {name} is NaN/inf")


def train_batch(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    estimator: Estimator,
    phases: Phases = EAGER,
) -> tuple[list[Tensor], Encoding]:
    """Train on one batch; return the states it is scored on (``Estimate.free``) and the
    batch's encoding: the ``estimator``'s phases (through ``phases``) and gradient, the
    optimizer step, then ``after_update`` with the encoding and ``Estimate.learned``."""
    encoding = model.prepare_input(x)
    optimizer.zero_grad(set_to_none=True)
    estimate = estimator.estimate(model, encoding.code, y, phases)
    optimizer.step()
    model.after_update(encoding, estimate.learned)
    return estimate.free, encoding


def train_epoch(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    estimator: Estimator,
    metrics: Metrics | None = None,
    *,
    device: torch.device | str = "cpu",
    description: str = "train",
    phases: Phases = EAGER,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``train_acc``, ``train_loss`` (the model's ``loss`` at
    the free state) and the model's batch stats, all averaged over every sample of the epoch
    (``Metrics.epoch_means``, summed over ranks by ``metrics``). ``phases.safe_point`` runs
    before every batch; every phase's record goes to ``metrics``. With a tolerance
    (``model.tol``) also, per phase name, ``<phase>_steps`` (mean steps per phase) and
    ``<phase>_at_cap`` (fraction of phases that hit their cap without settling), shown in the
    progress bar as well (this process's phases only). Raises ``DivergenceError`` when states
    or weights blow up."""
    model.train()
    metrics = Metrics() if metrics is None else metrics
    metrics.start_epoch()
    logged = dataclasses.replace(phases, log=metrics)
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    for x, y in progress:
        if phases.safe_point is not None:
            phases.safe_point()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        free, encoding = train_batch(model, optimizer, x, y, estimator, logged)
        check_finite(model, free)
        correct = (model.predict(free) == y).sum().item()
        batch = y.shape[0]
        stats = model.batch_stats(encoding) if batch else {}
        metrics.add_batch(correct, summed_loss(model, free, y), batch, stats)
        postfix = {"acc": f"{metrics.running_accuracy:.3f}"}
        if model.tol is not None:
            postfix["steps"] = "/".join(
                f"{value:.0f}" for name, value in metrics.phase_stats().items() if "steps" in name
            )
        progress.set_postfix(postfix)
    return metrics.epoch_means(with_phases=model.tol is not None)


@torch.no_grad()
def settle(
    model: EnergyNet, x: Tensor, y: Tensor, T: int, phases: Phases = EAGER
) -> tuple[Encoding, list[Tensor]]:
    """The encoding of the batch ``x`` and the free-phase states after ``T`` steps from zero
    (run through ``phases``)."""
    encoding = model.prepare_input(x)
    code = encoding.code
    return encoding, phases.run(model, code, y, model.init_neurons(code), T)


@torch.no_grad()
def summed_loss(model: EnergyNet, neurons: list[Tensor], y: Tensor) -> float:
    """``sum_i loss(s_i, y_i)`` over the batch of the states ``neurons``, as a number."""
    return model.loss(neurons, y).sum().item()


def evaluate(
    model: EnergyNet,
    loader: Iterable,
    T: int,
    device: torch.device | str = "cpu",
    description: str = "eval",
    metrics: Metrics | None = None,
    phases: Phases = EAGER,
) -> float:
    """Accuracy of the free fixed point after ``T`` steps over ``loader``
    (``evaluate_with_loss``)."""
    return evaluate_with_loss(model, loader, T, device, description, metrics, phases)[0]


@torch.no_grad()
def evaluate_with_loss(
    model: EnergyNet,
    loader: Iterable,
    T: int,
    device: torch.device | str = "cpu",
    description: str = "eval",
    metrics: Metrics | None = None,
    phases: Phases = EAGER,
) -> tuple[float, float]:
    """Accuracy and mean loss of the free fixed point after ``T`` steps (run through
    ``phases``) over ``loader``, their sums over ranks by ``metrics``
    (``Metrics.evaluation_means``)."""
    model.eval()
    metrics = Metrics() if metrics is None else metrics
    correct, seen, loss_sum = 0, 0, 0.0
    for x, y in tqdm(loader, desc=description, leave=False, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        free = settle(model, x, y, T, phases)[1]
        correct += (model.predict(free) == y).sum().item()
        loss_sum += summed_loss(model, free, y)
        seen += y.shape[0]
    return metrics.evaluation_means(correct, loss_sum, seen)


@dataclass(frozen=True)
class Schedule:
    """When and how ``train`` trains: from ``start_epoch`` (epochs done) to ``epochs`` on
    ``device``, the rate ``scheduler`` (or None) stepped after each epoch,
    ``on_epoch_end(epoch, metrics)`` (which saves checkpoints and logs) after it, and every
    phase run through ``phases``."""

    epochs: int
    start_epoch: int = 0
    device: torch.device | str = "cpu"
    scheduler: Any = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    phases: Phases = EAGER


def train(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    loaders: tuple[Iterable, Iterable],
    estimator: Estimator,
    schedule: Schedule,
    metrics: Metrics | None = None,
) -> list[dict[str, float]]:
    """Train on ``loaders[0]`` with ``estimator`` as ``schedule`` says; after each epoch
    evaluate on ``loaders[1]`` with ``estimator.cfg.T1`` steps, add the model's
    ``epoch_stats``, step the scheduler and hand the metrics (``epoch`` counted from 1) to
    ``schedule.on_epoch_end``. ``metrics`` (``metrics.Metrics``) gathers the sums, over ranks
    under torchrun; ``test_loss`` joins ``test_acc``."""
    train_loader, test_loader = loaders
    metrics = Metrics() if metrics is None else metrics
    device, phases, epochs = schedule.device, schedule.phases, schedule.epochs
    history = []
    for epoch in range(schedule.start_epoch, epochs):
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        description = f"epoch {epoch + 1}/{epochs}"
        row = train_epoch(
            model, optimizer, train_loader, estimator, metrics, device=device,
            description=description, phases=phases,
        )  # fmt: skip
        row["test_acc"], row["test_loss"] = evaluate_with_loss(
            model, test_loader, estimator.cfg.T1, device, "test", metrics, phases
        )
        row.update(model.epoch_stats())
        if schedule.scheduler is not None:
            schedule.scheduler.step()
        row = {"epoch": epoch + 1, **row, "lr": lr, "seconds": time.time() - started}
        settling = "".join(
            f", {phase} {row[phase + '_steps']:.1f} steps "
            f"({100 * row[phase + '_at_cap']:.0f}% at cap)"
            for phase in ("free", "nudged")
            if phase + "_steps" in row
        )
        tqdm.write(
            f"epoch {epoch + 1}/{epochs}: train {row['train_acc']:.4f} "
            f"test {row['test_acc']:.4f} ({row['seconds']:.1f}s){settling}"
        )
        history.append(row)
        if schedule.on_epoch_end is not None:
            schedule.on_epoch_end(epoch + 1, row)
    return history


__all__ = [
    "ACTIVATIONS",
    "POOLS",
    "conv_output_size",
    "in_memory_format",
    "max_change",
    "memory_format_for",
    "DivergenceError",
    "CLAMP_SLOPES",
    "DYNAMICS",
    "EAGER",
    "BPTT",
    "EP",
    "EPConfig",
    "Encoding",
    "Estimator",
    "EnergyNet",
    "P_CNN",
    "P_MLP",
    "PhaseRecord",
    "Phases",
    "Schedule",
    "TOL_EVERY",
    "check_finite",
    "evaluate",
    "evaluate_with_loss",
    "gdu_check",
    "make_optimizer",
    "make_scheduler",
    "settle",
    "settling_trace",
    "train",
    "train_batch",
    "train_epoch",
]
