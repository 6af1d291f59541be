"""The EP engine: energy-based recurrent networks, their explicit ("fast") dynamics, and training.

A network is a chain of neuron layers ``s_1 .. s_L`` driven by a fixed input ``s_0 = x``. Each
*link* ``k`` couples the state below it (``x`` for ``k = 0``, else ``s_k``) to layer ``s_{k+1}``:

* ``conv``: ``F_k(s) = P_k(conv_k(s))`` with a pool ``P_k`` (``m`` max 2x2/2, ``a`` avg 2x2/2,
  ``i`` identity);
* ``linear``: ``F_k(s) = W_k flatten(s) + b_k``;
* ``copy``: ``F_k(s) = s`` (the LCA front end couples its sparse code to a copy layer this way).

The primitive function, one value per sample (``<.,.>`` sums over all non-batch elements)::

    Phi(x, s, beta) = sum_k < F_k(s_k), s_{k+1} >  -  beta * L(s, y)

With ``softmax=True`` the last linear layer is a readout outside the system and
``L = CE(softmax(W_out s_L + b_out), y)``; otherwise ``L`` acts on the output units ``s_L``
(``mse``: ``0.5 ||s_L - onehot(y)||^2``, ``cel``: ``CE(s_L, y)``).

A step updates every layer ``s_k <- sigma(dPhi/ds_k)``, with the derivative written out::

    dPhi/ds_k = F_{k-1}(s_{k-1}) + F_k^T(s_{k+1})       (+ nudge on the last layer)

where ``F^T`` is the adjoint: transposed convolution after the pool's adjoint (unpool to the
argmax positions of the current forward pass for ``m``, spread ``value / 4`` for ``a``), or
``W^T s`` for a linear link. The EP parameter estimate is::

    grad(theta) = d/dtheta [ mean_batch(Phi(s^2, beta_2) - Phi(s^1, beta_1)) / (beta_1 - beta_2) ]

written out explicitly as weight-gradient correlations. Tensor shapes: conv layers are
``(B, C, H, W)``, linear layers ``(B, N)``.

Dynamics (``EnergyNet.dynamics``):

* ``sync`` (default): every layer from the old states of both neighbours (Jacobi-like).
* ``async``: two half-steps, first the odd layers ``s_1, s_3, ...`` from the current even ones
  (``s_0 = x`` counts as even), then the even layers from the new odd ones (Scellier et al.,
  NeurIPS 2023). ``dPhi/ds_k`` only involves ``s_{k-1}`` and ``s_{k+1}``, which have the other
  parity, so a half-step updates a whole parity at once, each layer exactly as if it were
  updated alone. For an activation that is a clamp with slope ``c`` on its linear range
  (``hard_sigmoid`` and ``ctrd_hard_sig``: ``c = 1``; ``my_hard_sig``: ``c = 1/2``) take the
  energy ``E(s) = sum_k ||s_k||^2 / (2c) - Phi(s)`` on the box of the clamp (``energy``).
  ``E`` is quadratic in ``s_k`` for linear, copy, identity- and average-pooled links, and
  ``s_k <- clamp(c dPhi/ds_k)`` is its exact minimiser over the box in ``s_k`` with the other
  layers fixed: a half-step is exact block-coordinate descent of ``E``. Through a max-pool,
  ``<P(conv(s_k)), s_{k+1}>`` is convex in ``s_k`` when ``s_{k+1} >= 0`` (as it is for
  ``hard_sigmoid`` and ``my_hard_sig``), and the update minimises the majoriser of ``E`` that
  linearises it at the current ``s_k``: ``E`` still never increases (majorise-minimise). Either
  way the fixed points of ``async`` are those of ``sync``, which updates every layer from old
  neighbours and can raise ``E`` and oscillate. The copy layer's scaled feedback
  (``scale_feedback = g > 0``) is the exact minimiser of ``E`` with that layer's own terms
  ``||s_0||^2 / (2c) - <x, s_0>`` divided by ``g``. The nudge (``beta != 0``) uses the output
  layer's current state, so the nudged phase is not exact descent. Smooth activations (sigmoid,
  tanh) follow the same scheme with their own energy, which ``energy`` does not provide.

A phase runs ``T`` steps; with ``EnergyNet.tol`` it stops as soon as ``max |s_t - s_(t-1)|``
over every layer and sample is below ``tol``, checked every ``tol_every`` steps and at the
cap ``T`` (a reduction and one host sync per check, none per step). ``last_phase`` records
the steps a phase took and whether it settled.

Vector-field models (``vf_utils_ep_fast``) replace the feedback ``F_k^T`` by separate backward
weights and the estimate by the reference's crossed layer-wise phis, through the link hooks
``_link_forward``, ``_feedback_synapse`` and ``_write_link_estimate``; their equations are in
that module's docstring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

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


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mysig": mysig,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hard_sigmoid": hard_sigmoid,
    "my_hard_sig": my_hard_sig,
    "ctrd_hard_sig": ctrd_hard_sig,
}
# The slope c of every activation that is a clamp on its linear range (see EnergyNet.energy).
CLAMP_SLOPES: dict[str, float] = {"hard_sigmoid": 1.0, "my_hard_sig": 0.5, "ctrd_hard_sig": 1.0}
POOLS = ("m", "a", "i")
LOSSES = ("mse", "cel")
DYNAMICS = ("sync", "async")
TOL_EVERY = 5  # with a tolerance, a phase checks whether it settled every this many steps


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


class PhaseRecord(NamedTuple):
    """What the last phase (one call of ``EnergyNet.forward``) did.

    steps: the steps it took (``T`` without a tolerance);
    settled: whether ``max |s_t - s_(t-1)|`` fell below the tolerance (None without one; False
        when the phase stopped at its cap ``T``).
    """

    steps: int
    settled: bool | None


# --------------------------------------------------------------------------------------------
# Pools and their adjoints
# --------------------------------------------------------------------------------------------


def pool_forward(z: Tensor, kind: str) -> tuple[Tensor, Tensor | None]:
    """Apply pool ``kind`` (2x2, stride 2) to ``z`` (B, C, H, W); return it and max-pool indices.

    Both come back in the layout of ``z``. Indices are flat ``h * W + w`` positions per plane.
    """
    if kind == "m":
        if z.is_cuda or z.is_contiguous(memory_format=torch.channels_last):
            return F.max_pool2d(z, 2, 2, return_indices=True)
        # PyTorch's NCHW max-pool on the CPU is 3-8x slower than its channels_last one, which
        # gives the same values and indices (ties included): pool there, hand back NCHW.
        pooled, indices = F.max_pool2d(
            z.contiguous(memory_format=torch.channels_last), 2, 2, return_indices=True
        )
        return pooled.contiguous(), indices.contiguous()
    if kind == "a":
        return F.avg_pool2d(z, 2, 2), None
    return z, None


def pool_adjoint(s: Tensor, kind: str, indices: Tensor | None, z_size: torch.Size) -> Tensor:
    """Adjoint ``P^T s`` of the pool, mapping (B, C, H//2, W//2) back to ``z_size`` (B, C, H, W).

    ``m``: every value goes to the argmax position of its window (``indices``), zero elsewhere;
    ``a``: every value / 4 goes to each of the 4 positions of its window; rows and columns the
    pool dropped (odd sizes) receive zero. The max unpool runs in the layout of ``indices``
    (``s`` is copied there if needed: with mixed layouts it takes a slower path).
    """
    if kind == "m":
        layout = torch.contiguous_format if indices.is_contiguous() else torch.channels_last
        s = s.contiguous(memory_format=layout)
        return F.max_unpool2d(s, indices, 2, 2, output_size=z_size[-2:])
    if kind == "a":
        spread = F.interpolate(s, scale_factor=2.0, mode="nearest") * 0.25
        missing_h = z_size[-2] - spread.shape[-2]
        missing_w = z_size[-1] - spread.shape[-1]
        return F.pad(spread, (0, missing_w, 0, missing_h)) if missing_h or missing_w else spread
    return s


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution: ``floor((size + 2 p - k) / s) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# Memory layout
# --------------------------------------------------------------------------------------------

# On the CPU, maps of at least this many pixels are kept channels_last (see memory_format_for).
CHANNELS_LAST_MIN_PIXELS = 64


def memory_format_for(state: Tensor) -> torch.memory_format:
    """The layout the dynamics keep ``state`` in; it never changes a value, only the speed.

    A map (B, C, H, W) is ``channels_last`` on CUDA (cuDNN's NHWC kernels), and on the CPU when
    ``H * W >= 64``: there oneDNN's convolutions are 1.1-1.2x faster on channels_last (batch 32,
    one core: 64 -> 128 channels on 16x16, 6.9 ms instead of 8.3 ms) and max-pooling needs no
    conversion (see ``pool_forward``), while on smaller maps NCHW convolutions are faster
    (256 -> 512 channels on 4x4: 7.4 ms instead of 11.8 ms). Vectors stay ``contiguous_format``.
    """
    if state.dim() != 4:
        return torch.contiguous_format
    if state.is_cuda or state.shape[-2] * state.shape[-1] >= CHANNELS_LAST_MIN_PIXELS:
        return torch.channels_last
    return torch.contiguous_format


def in_memory_format(state: Tensor) -> Tensor:
    """``state`` in the layout of ``memory_format_for`` (itself when already there, else a copy)."""
    return state.contiguous(memory_format=memory_format_for(state))


def max_change(before: list[Tensor], after: list[Tensor]) -> float:
    """``max |after - before|`` over every layer and sample (one host sync)."""
    changes = [(new - old).abs().max() for old, new in zip(before, after, strict=True)]
    return torch.stack(changes).max().item()


# --------------------------------------------------------------------------------------------
# The energy-based network
# --------------------------------------------------------------------------------------------


class EnergyNet(nn.Module):
    """Chain of links (see the module docstring); subclasses build ``synapses`` and the links.

    Attributes set by subclasses:
        synapses: ``nn.ModuleList`` of Conv2d then Linear (the readout last when ``softmax``).
        link_kinds: one of ``'conv' | 'linear' | 'copy'`` per neuron layer.
        link_synapse: index into ``synapses`` per link (``-1`` for ``copy``).
        pools: pool letter per link (``'i'`` for non-conv links).
        layer_shapes: per-sample shape of every neuron layer.
        output_paddings: per conv link, the transposed convolution's output padding that maps
            back exactly onto the size of the state below.
    """

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
        self.link_kinds: list[str] = []
        self.link_synapse: list[int] = []
        self.pools: list[str] = []
        self.layer_shapes: list[tuple[int, ...]] = []
        self.output_paddings: list[tuple[int, int] | None] = []
        self.num_classes = 0
        self.set_dynamics()
        self.last_phase = PhaseRecord(0, None)
        # runs forward's phases in its loop's place when set (see forward)
        self.phase_runner: Callable[..., list[Tensor] | None] | None = None

    def set_dynamics(
        self, dynamics: str = "sync", tol: float | None = None, tol_every: int = TOL_EVERY
    ) -> None:
        """How phases run (module docstring): ``sync`` or ``async`` steps; with ``tol`` a phase
        stops once ``max |s_t - s_(t-1)| < tol`` (checked every ``tol_every`` steps and at its
        cap), without it it runs its ``T`` steps."""
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

    # ---- construction helpers -------------------------------------------------------------

    def _apply_scale(self, scale: float | None) -> None:
        """``--scale g``: PyTorch's default init (kaiming-uniform a=sqrt 5, bias
        U(+-1/sqrt fan_in)) multiplied by ``g``. Without it the default init stands."""
        if scale is None:
            return
        with torch.no_grad():
            for synapse in self.synapses:
                synapse.reset_parameters()
                synapse.weight.mul_(scale)
                if synapse.bias is not None:
                    synapse.bias.mul_(scale)

    @property
    def readout(self) -> nn.Linear | None:
        """The readout ``W_out s_L + b_out`` outside the system, when ``softmax``."""
        return self.synapses[-1] if self.softmax else None

    @property
    def num_layers(self) -> int:
        return len(self.link_kinds)

    # ---- states ---------------------------------------------------------------------------

    def prepare_input(self, x: Tensor) -> Encoding:
        """The batch ``x`` as the system takes it: its own fixed input (the LCA model encodes)."""
        return Encoding(images=x, code=x)

    def after_update(self, encoding: Encoding, nudged: list[Tensor]) -> None:
        """Hook run after every optimizer step with the batch's encoding and the states that
        carried the learning signal (the LCA front end updates its dictionary)."""

    def batch_stats(self, encoding: Encoding) -> dict[str, float]:
        """Extra per-batch metrics of ``encoding`` (e.g. LCA sparsity); none here."""
        return {}

    def epoch_stats(self) -> dict[str, float]:
        """Extra metrics of the weights after an epoch (e.g. forward/backward angles); none."""
        return {}

    def optimizer_groups(self) -> list[tuple[int, list[nn.Parameter]]]:
        """The parameter sets the optimizer updates, each with the index of the ``lrs`` / ``wds``
        entry it takes: synapse ``i`` takes entry ``i``."""
        return [(i, list(synapse.parameters())) for i, synapse in enumerate(self.synapses)]

    def init_neurons(self, x: Tensor) -> list[Tensor]:
        """Zero states, one ``(B, *layer_shape)`` tensor per layer, on ``x``'s device and dtype."""
        batch = x.shape[0]
        return [x.new_zeros((batch, *shape)) for shape in self.layer_shapes]

    # ---- links ----------------------------------------------------------------------------

    def _link_forward(self, k: int, below: Tensor) -> tuple[Tensor, tuple | None]:
        """``F_k(below)`` and what its adjoint needs (pool indices, pre-pool size)."""
        kind = self.link_kinds[k]
        if kind == "copy":
            return below, None
        synapse = self.synapses[self.link_synapse[k]]
        if kind == "linear":
            return F.linear(below.flatten(1), synapse.weight, synapse.bias), None
        z = F.conv2d(below, synapse.weight, synapse.bias, synapse.stride, synapse.padding)
        pooled, indices = pool_forward(z, self.pools[k])
        return pooled, (indices, z.shape)

    def _feedback_synapse(self, k: int) -> nn.Module:
        """The synapse whose transpose carries the feedback of link ``k``: its own one here."""
        return self.synapses[self.link_synapse[k]]

    def _link_adjoint(self, k: int, above: Tensor, cache: tuple | None, below_shape) -> Tensor:
        """``F_k^T(above)``: the feedback that layer ``k+1`` sends to the state below link ``k``,
        through the weights of ``_feedback_synapse(k)`` and the pool indices of ``cache``."""
        kind = self.link_kinds[k]
        if kind == "copy":
            return above
        synapse = self._feedback_synapse(k)
        if kind == "linear":
            return (above @ synapse.weight).view(below_shape)
        indices, z_size = cache
        unpooled = pool_adjoint(above, self.pools[k], indices, z_size)
        return F.conv_transpose2d(
            unpooled,
            synapse.weight,
            None,
            synapse.stride,
            synapse.padding,
            self.output_paddings[k],
        )

    def _link_param_grads(
        self, k: int, below: Tensor, above: Tensor, synapse: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """``dPhi/dW_k`` and ``dPhi/db_k`` of ``<F_k(below), above>`` summed over the batch.

        conv: the correlation of ``below`` with ``P_k^T(above)`` (B, C_out, H, W), giving
        (C_out, C_in, k, k); linear: ``above^T flatten(below)``, giving (N_out, N_in).
        Biases: ``P_k^T(above)`` (or ``above``) summed. ``synapse`` (default: link ``k``'s own)
        is the one ``F_k`` applies, whose pool indices ``P_k^T`` follows.
        """
        if synapse is None:
            synapse = self.synapses[self.link_synapse[k]]
        if self.link_kinds[k] == "linear":
            return above.t() @ below.flatten(1), above.sum(0)
        below = in_memory_format(below)  # the input x may come in NCHW
        z = F.conv2d(below, synapse.weight, synapse.bias, synapse.stride, synapse.padding)
        _, indices = pool_forward(z, self.pools[k])
        grad_z = pool_adjoint(above, self.pools[k], indices, z.shape)
        weight_grad = torch.nn.grad.conv2d_weight(
            below, synapse.weight.shape, grad_z, synapse.stride, synapse.padding
        )
        return weight_grad, grad_z.sum((0, 2, 3))

    # ---- energy, loss, prediction ---------------------------------------------------------

    def output_logits(self, neurons: list[Tensor]) -> Tensor:
        """(B, classes): the readout of ``s_L`` with ``softmax``, else the output units ``s_L``."""
        last = neurons[-1]
        if self.softmax:
            return F.linear(last.flatten(1), self.readout.weight, self.readout.bias)
        return last

    def loss(self, neurons: list[Tensor], y: Tensor) -> Tensor:
        """Per-sample loss (B,): CE of the readout or of ``s_L``, or ``0.5 ||s_L - onehot||^2``."""
        logits = self.output_logits(neurons)
        if self.softmax or self.loss_name == "cel":
            return F.cross_entropy(logits, y, reduction="none")
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
        return 0.5 * (logits - onehot).pow(2).sum(1)

    def predict(self, neurons: list[Tensor]) -> Tensor:
        """Predicted class per sample (B,)."""
        return self.output_logits(neurons).argmax(1)

    def Phi(self, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float) -> Tensor:
        """The primitive function ``sum_k <F_k(s_k), s_{k+1}> - beta L``, per sample (B,)."""
        below = [x, *neurons[:-1]]
        phi = x.new_zeros(x.shape[0])
        for k in range(self.num_layers):
            drive, _ = self._link_forward(k, below[k])
            phi = phi + (drive * neurons[k]).flatten(1).sum(1)
        if beta != 0.0:
            phi = phi - beta * self.loss(neurons, y)
        return phi

    @property
    def has_energy(self) -> bool:
        """Whether ``energy`` is defined: for a clamp activation (``CLAMP_SLOPES``)."""
        return self.activation in CLAMP_SLOPES

    def energy(self, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float = 0.0) -> Tensor:
        """``E = sum_k ||s_k||^2 / (2c) - Phi(x, s, beta)`` per sample (B,), for an activation
        that is a clamp with slope ``c`` (``CLAMP_SLOPES``); states must lie in its box.

        Output units without an activation (``cel`` without ``softmax``) take ``c = 1``. With a
        copy layer and ``scale_feedback = g != 1`` its own terms ``||s_0||^2 / (2c) - <x, s_0>``
        are divided by ``g``: the dynamics descend that energy (module docstring). The
        asynchronous free phase never raises ``E``.
        """
        if not self.has_energy:
            raise ValueError(
                f"energy is defined for clamp activations ({', '.join(CLAMP_SLOPES)}), "
                f"not {self.activation!r}"
            )
        slopes = [CLAMP_SLOPES[self.activation]] * self.num_layers
        if not self.softmax and self.loss_name == "cel":
            slopes[-1] = 1.0
        squares = [
            state.pow(2).flatten(1).sum(1) / (2 * c)
            for state, c in zip(neurons, slopes, strict=True)
        ]
        energy = sum(squares) - self.Phi(x, y, neurons, beta)
        if self.link_kinds[0] == "copy" and self.scale_feedback != 1.0:
            copy_terms = squares[0] - (x * neurons[0]).flatten(1).sum(1)
            energy = energy + (1.0 / self.scale_feedback - 1.0) * copy_terms
        return energy

    # ---- dynamics -------------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float = 0.0) -> list[Tensor]:
        """One synchronous step ``s_k <- sigma(dPhi/ds_k)`` for every layer, from the old states.

        The feedback into a copy layer (the first layer of the LCA front end) is scaled by
        ``scale_feedback``. The nudge on the last layer is ``beta W_out^T (onehot - softmax)``
        with the softmax readout, ``beta (onehot - s_L)`` with ``mse``; with ``cel`` and no
        readout the output units take ``dPhi/ds_L`` itself, without the activation. The new
        states come back in the layout of ``memory_format_for``.
        """
        return self._step(x, y, neurons, beta, self._link_forward(0, x)[0])

    def _step(
        self,
        x: Tensor,
        y: Tensor,
        neurons: list[Tensor],
        beta: float,
        input_drive: Tensor,
    ) -> list[Tensor]:
        """``step`` given the drive ``F_0(x)`` of the first layer, which only depends on the
        fixed input and the weights, so a phase of T steps computes it once."""
        below = [x, *neurons[:-1]]
        forwards = [(input_drive, None)]
        forwards += [self._link_forward(k, below[k]) for k in range(1, self.num_layers)]
        last = self.num_layers - 1
        return [
            self._layer_update(k, drive, neurons, forwards[k + 1][1] if k < last else None, y, beta)
            for k, (drive, _) in enumerate(forwards)
        ]

    def _layer_update(
        self,
        k: int,
        drive: Tensor,
        neurons: list[Tensor],
        above_cache: tuple | None,
        y: Tensor,
        beta: float,
    ) -> Tensor:
        """Layer ``k``'s new state ``sigma(F_{k-1}(s_{k-1}) + F_k^T(s_{k+1}))`` from its drive
        from below and the current state above it, ``neurons[k + 1]``, through the adjoint of
        the link above with ``above_cache`` (that link's forward pass on ``neurons[k]``). The
        feedback into a copy layer is scaled by ``scale_feedback``; the last layer takes the
        nudge (``_output_update``). Both dynamics build their steps from this."""
        grad = drive
        if k == self.num_layers - 1:
            new_state = self._output_update(grad, neurons[k], y, beta)
        else:
            feedback = self._link_adjoint(k + 1, neurons[k + 1], above_cache, drive.shape)
            if k == 0 and self.link_kinds[0] == "copy" and self.scale_feedback != 1.0:
                feedback = feedback * self.scale_feedback
            new_state = self.sigma(grad + feedback)
        return in_memory_format(new_state)

    def half_step(
        self, x: Tensor, y: Tensor, neurons: list[Tensor], parity: int, beta: float = 0.0
    ) -> list[Tensor]:
        """One asynchronous half-step: every layer ``s_k`` (1-based, ``s_0 = x``) with
        ``k % 2 == parity`` from the current states of its neighbours; the others are kept."""
        neurons = [in_memory_format(state) for state in neurons]
        input_drive = self._link_forward(0, in_memory_format(x))[0]
        other_links = self._parity_links(neurons, 1 - parity, input_drive)
        self._half_step(y, neurons, beta, parity, input_drive, other_links)
        return neurons

    def _parity_links(
        self, neurons: list[Tensor], parity: int, input_drive: Tensor
    ) -> dict[int, tuple[Tensor, tuple | None]]:
        """``F_j`` and its adjoint's cache, on the current state below, for every link ``j``
        that feeds a layer of 1-based ``parity`` (link ``j`` feeds ``s_{j+1}``, list index j)."""
        links = {}
        for j in range(1 - parity, self.num_layers, 2):
            links[j] = (input_drive, None) if j == 0 else self._link_forward(j, neurons[j - 1])
        return links

    def _half_step(
        self,
        y: Tensor,
        neurons: list[Tensor],
        beta: float,
        parity: int,
        input_drive: Tensor,
        other_links: dict[int, tuple[Tensor, tuple | None]],
    ) -> dict[int, tuple[Tensor, tuple | None]]:
        """Update the layers of 1-based ``parity`` in the list ``neurons`` (in place).

        ``other_links`` are the links feeding the other parity, on the current states: their
        caches route the feedback into this parity. Returns the links feeding this parity, on
        the states below them, which the half-step leaves unchanged: the next half-step's
        ``other_links``. So an asynchronous step runs every link's forward pass once, as a
        synchronous one does.
        """
        links = self._parity_links(neurons, parity, input_drive)
        for k, (drive, _) in links.items():
            above_cache = other_links[k + 1][1] if k + 1 in other_links else None
            neurons[k] = self._layer_update(k, drive, neurons, above_cache, y, beta)
        return links

    def _async_step(
        self,
        y: Tensor,
        neurons: list[Tensor],
        beta: float,
        input_drive: Tensor,
        even_links: dict[int, tuple[Tensor, tuple | None]],
    ) -> tuple[list[Tensor], dict[int, tuple[Tensor, tuple | None]]]:
        """One asynchronous step: the odd layers, then the even ones from the new odd ones.

        ``even_links``: the links feeding the even layers, on the current odd states (the
        previous step returns them). Returns the new states and those links on the new ones.
        """
        neurons = list(neurons)
        odd_links = self._half_step(y, neurons, beta, 1, input_drive, even_links)
        even_links = self._half_step(y, neurons, beta, 0, input_drive, odd_links)
        return neurons, even_links

    def _stepper(
        self, x: Tensor, y: Tensor, beta: float, input_drive: Tensor | None
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        """The step of the model's dynamics as a function ``states -> next states`` for one
        phase; the asynchronous one carries its links from step to step."""
        if self.dynamics == "sync":
            return lambda neurons: self._step(x, y, neurons, beta, input_drive)
        carried: dict[int, tuple[Tensor, tuple | None]] = {}

        def async_step(neurons: list[Tensor]) -> list[Tensor]:
            nonlocal carried
            if not carried:
                carried = self._parity_links(neurons, 0, input_drive)
            neurons, carried = self._async_step(y, neurons, beta, input_drive, carried)
            return neurons

        return async_step

    def _output_update(self, grad: Tensor, state: Tensor, y: Tensor, beta: float) -> Tensor:
        """The last layer's new state from its drive ``grad`` and the nudge ``-beta dL/ds_L``."""
        if self.softmax:
            if beta != 0.0:
                readout = self.readout
                logits = F.linear(state.flatten(1), readout.weight, readout.bias)
                error = F.one_hot(y, self.num_classes).to(grad.dtype) - logits.softmax(1)
                grad = grad + beta * (error @ readout.weight).view_as(grad)
            return self.sigma(grad)
        onehot = F.one_hot(y, self.num_classes).to(grad.dtype)
        if self.loss_name == "cel":
            return grad + beta * (onehot - state.softmax(1)) if beta != 0.0 else grad
        if beta != 0.0:
            grad = grad + beta * (onehot - state)
        return self.sigma(grad)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        neurons: list[Tensor],
        T: int,
        beta: float = 0.0,
        track_grad: bool = False,
    ) -> list[Tensor]:
        """Run ``T`` steps of the model's dynamics from ``neurons``; return the settled states.

        With a tolerance (``set_dynamics``) the phase stops once settled, ``T`` being its cap,
        except with ``track_grad`` (BPTT backpropagates through exactly ``T`` steps). The
        steps taken go to ``last_phase``. No graph is built unless ``track_grad``. The input
        list is left untouched. The input and the states are put once in the layout of
        ``memory_format_for`` (a copy only where they are not in it yet), and the input's
        drive ``F_0(x)`` is computed once for the T steps. A ``phase_runner``
        (``compiled.PhaseRunner``: ``--compile``, ``--precision bf16``) runs the T steps in
        this loop's place unless it declines (None).
        """
        with torch.set_grad_enabled(track_grad):
            x = in_memory_format(x)
            neurons = [in_memory_format(state) for state in neurons]
            if self.phase_runner is not None and T > 0:
                settled = self.phase_runner(x, y, neurons, T, beta, track_grad)
                if settled is not None:
                    self.last_phase = PhaseRecord(T, None)
                    return settled
            input_drive = self._link_forward(0, x)[0] if T > 0 else None
            advance = self._stepper(x, y, beta, input_drive)
            if self.tol is None or track_grad:
                for _ in range(T):
                    neurons = advance(neurons)
                self.last_phase = PhaseRecord(T, None)
                return neurons
            return self._run_until_settled(advance, neurons, T)

    def _run_until_settled(
        self, advance: Callable[[list[Tensor]], list[Tensor]], neurons: list[Tensor], T: int
    ) -> list[Tensor]:
        """At most ``T`` steps; stop at the first check (every ``tol_every`` steps, and at
        ``T``) where ``max |s_t - s_(t-1)|`` over every layer and sample is below ``tol``."""
        steps, settled = 0, False
        for steps in range(1, T + 1):
            previous, neurons = neurons, advance(neurons)
            if steps % self.tol_every == 0 or steps == T:
                settled = max_change(previous, neurons) < self.tol
                if settled:
                    break
        self.last_phase = PhaseRecord(steps, settled)
        return neurons

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
        ``s^1 = s^{-beta}``, ``betas = (-beta, beta)``. The readout (``softmax``) only appears in
        ``-beta L``: its estimate is ``(b2 dL(s^2) - b1 dL(s^1)) / (b2 - b1)`` with
        ``dL/dW_out = (softmax - onehot)^T s_L``. ``free`` (the free fixed point, default
        ``s^1``) is not used here; the vector-field estimate crosses the nudged states with it.
        """
        beta_1, beta_2 = betas
        scale = 1.0 / ((beta_1 - beta_2) * max(x.shape[0], 1))  # an empty batch gives zeros
        layers_1 = [x, *neurons_1]
        layers_2 = [x, *neurons_2]
        anchor = layers_1 if free is None else [x, *free]
        for k in range(self.num_layers):
            if self.link_kinds[k] != "copy":
                self._write_link_estimate(k, layers_1, layers_2, anchor, scale)
        if self.softmax:
            weight_2, bias_2 = self._readout_loss_grads(neurons_2, y)
            weight_1, bias_1 = self._readout_loss_grads(neurons_1, y)
            self.readout.weight.grad = (beta_1 * weight_1 - beta_2 * weight_2) * scale
            self.readout.bias.grad = (beta_1 * bias_1 - beta_2 * bias_2) * scale

    @torch.no_grad()
    def input_gradient_ep(
        self, x: Tensor, y: Tensor, free: list[Tensor], T2: int, beta: float
    ) -> Tensor:
        """EP estimate of ``dL/dx`` per sample, (B, *x.shape[1:]), with no graph.

        The fixed input enters ``Phi`` only through ``<F_0(x), s_1>``, so ``dPhi/dx = F_0^T(s_1)``
        (the adjoint of link 0, with the max-pool positions of ``F_0(x)``). Treating ``x`` like a
        parameter, EP gives ``dL/dx = -d/dbeta dPhi/dx (s^beta)`` at ``beta = 0``, estimated
        symmetrically from two nudged phases of ``T2`` steps from the free states ``free``::

            dL/dx ~ -(F_0^T(s_1^{+beta}) - F_0^T(s_1^{-beta})) / (2 beta)

        ``L`` is the per-sample loss of ``loss``. For the LCA front end ``x`` is the LCA code.
        """
        plus = self(x, y, free, T2, beta=beta)
        minus = self(x, y, free, T2, beta=-beta)
        x = in_memory_format(x)
        _, cache = self._link_forward(0, x)
        difference = plus[0] - minus[0]
        return self._link_adjoint(0, difference, cache, x.shape) / (-2.0 * beta)

    def _write_link_estimate(
        self,
        k: int,
        layers_1: list[Tensor],
        layers_2: list[Tensor],
        anchor: list[Tensor],
        scale: float,
    ) -> None:
        """Link ``k``'s share of ``compute_syn_grads``: ``scale (dPhi/dtheta_k(s^2) -
        dPhi/dtheta_k(s^1))`` into its weight and bias ``.grad``; ``layers_i = [x, *s^i]``.
        (``anchor``, ``[x, *free]``, is for the vector-field override.)"""
        synapse = self.synapses[self.link_synapse[k]]
        weight_2, bias_2 = self._link_param_grads(k, layers_2[k], layers_2[k + 1])
        weight_1, bias_1 = self._link_param_grads(k, layers_1[k], layers_1[k + 1])
        synapse.weight.grad = (weight_2 - weight_1) * scale
        synapse.bias.grad = (bias_2 - bias_1) * scale

    def _readout_loss_grads(self, neurons: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        """Batch sums of ``dCE/dW_out = (softmax - onehot)^T s_L`` and ``dCE/db_out``."""
        last = neurons[-1].flatten(1)
        logits = F.linear(last, self.readout.weight, self.readout.bias)
        error = logits.softmax(1) - F.one_hot(y, self.num_classes).to(last.dtype)
        return error.t() @ last, error.sum(0)


def _as_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


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
            identity, and the convs start from it (used by the LCA front end).
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
        height, width = _as_pair(in_size)
        if input_copy:
            self._add_link("copy", -1, "i", (in_channels, height, width))
        sizes = [in_channels, *channels]
        for i in range(n_conv):
            conv = nn.Conv2d(sizes[i], sizes[i + 1], kernels[i], strides[i], paddings[i])
            conv_h = conv_output_size(height, kernels[i], strides[i], paddings[i])
            conv_w = conv_output_size(width, kernels[i], strides[i], paddings[i])
            if conv_h < 1 or conv_w < 1:
                raise ValueError(f"conv layer {i + 1} leaves no pixels from a {height}x{width} map")
            # the transposed conv must land exactly on the (height, width) of the state below
            pad_h = height - ((conv_h - 1) * strides[i] - 2 * paddings[i] + kernels[i])
            pad_w = width - ((conv_w - 1) * strides[i] - 2 * paddings[i] + kernels[i])
            if pools[i] in "ma":
                conv_h, conv_w = conv_h // 2, conv_w // 2
                if conv_h < 1 or conv_w < 1:
                    raise ValueError(
                        f"pool {i + 1} leaves no pixels: too many poolings for the input"
                    )
            self.synapses.append(conv)
            self._add_link("conv", len(self.synapses) - 1, pools[i], (sizes[i + 1], conv_h, conv_w))
            self.output_paddings[-1] = (pad_h, pad_w)
            height, width = conv_h, conv_w
        self._add_linear_layers(sizes[-1] * height * width, fc)
        self._apply_scale(scale)

    def _add_link(self, kind: str, synapse: int, pool: str, shape: tuple[int, ...]) -> None:
        self.link_kinds.append(kind)
        self.link_synapse.append(synapse)
        self.pools.append(pool)
        self.layer_shapes.append(shape)
        self.output_paddings.append(None)

    def _add_linear_layers(self, in_features: int, fc: list[int]) -> None:
        """Linear layers ``in_features -> fc[0] -> ... -> fc[-1]``; the last is the readout with
        ``softmax`` (not a layer of the system)."""
        self.num_classes = fc[-1]
        sizes = [in_features, *fc]
        for i in range(len(fc)):
            self.synapses.append(nn.Linear(sizes[i], sizes[i + 1]))
            is_readout = self.softmax and i == len(fc) - 1
            if not is_readout:
                self._add_link("linear", len(self.synapses) - 1, "i", (sizes[i + 1],))
        if not self.link_kinds:
            raise ValueError("with softmax the network needs at least one layer before the readout")


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
) -> torch.optim.Optimizer:
    """SGD (momentum ``mmt``) or Adam with one learning rate / weight decay per synapse (the
    groups of ``model.optimizer_groups``: a vector-field model's backward weights take the
    rates of their forward synapse)."""
    synapses = list(model.synapses)
    if len(lrs) < len(synapses):
        raise ValueError(f"{len(synapses)} synapses need {len(synapses)} learning rates")
    wds = wds or [0.0] * len(synapses)
    if len(wds) < len(synapses):
        raise ValueError(f"{len(synapses)} synapses need {len(synapses)} weight decays")
    groups = [
        {"params": params, "lr": lrs[i], "weight_decay": wds[i]}
        for i, params in model.optimizer_groups()
    ]
    if optim == "sgd":
        return torch.optim.SGD(groups, momentum=mmt)
    if optim == "adam":
        return torch.optim.Adam(groups)
    raise ValueError(f"unknown optimizer {optim!r}; choose sgd or adam")


def make_scheduler(optimizer: torch.optim.Optimizer, lr_decay: bool):
    """``--lr-decay``: cosine annealing over 100 epochs down to 1e-5; else None."""
    if not lr_decay:
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=1e-5)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class EPConfig:
    """How a batch is trained: the algorithm, phase lengths and nudging."""

    alg: str = "EP"  # "EP" or "BPTT"
    T1: int = 20
    T2: int = 4
    betas: tuple[float, float] = (0.0, 0.1)
    random_sign: bool = False
    thirdphase: bool = False


def check_finite(model: EnergyNet, neurons: list[Tensor] | None = None) -> None:
    """Raise ``DivergenceError`` naming the first neuron layer or parameter that is NaN/inf."""
    if neurons is not None:
        for k, state in enumerate(neurons):
            if not torch.isfinite(state).all():
                raise DivergenceError(
                    f"neurons of layer {k + 1} ({model.link_kinds[k]}) are NaN/inf"
                )
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise DivergenceError(f"parameter {name} is NaN/inf")


def train_batch(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    cfg: EPConfig,
    phases: list[tuple[str, PhaseRecord]] | None = None,
) -> tuple[list[Tensor], Encoding]:
    """Train on one batch; return the free-phase states (for accuracy) and the batch's encoding.

    EP: free phase (T1 steps from zero, beta_1), nudged phase (T2 steps from the free fixed
    point at beta_2, its sign drawn per batch with ``random_sign``) and with ``thirdphase`` a
    second nudged phase at -beta_2; then the EP estimate and the optimizer step.
    BPTT: T1 - T2 steps without a graph, T2 with one, backpropagate the final loss.
    Then ``after_update`` gets the encoding and the nudged states (BPTT: its final states).
    ``phases``, when given, receives ``("free" | "nudged", model.last_phase)`` per phase run
    without a graph.
    """

    def record(name: str) -> None:
        if phases is not None:
            phases.append((name, model.last_phase))

    encoding = model.prepare_input(x)
    code = encoding.code
    neurons = model.init_neurons(code)
    optimizer.zero_grad(set_to_none=True)
    if cfg.alg == "BPTT":
        free = model(code, y, neurons, cfg.T1 - cfg.T2)
        record("free")
        final = model(code, y, free, cfg.T2, track_grad=True)
        model.loss(final, y).mean().backward()
        optimizer.step()
        final = [state.detach() for state in final]
        model.after_update(encoding, final)
        return final, encoding
    beta_1, beta_2 = cfg.betas
    free = model(code, y, neurons, cfg.T1, beta=beta_1)
    record("free")
    if cfg.random_sign:
        beta_2 = beta_2 * (1.0 if torch.rand(()) < 0.5 else -1.0)
    nudged = model(code, y, free, cfg.T2, beta=beta_2)
    record("nudged")
    if cfg.thirdphase:
        nudged_negative = model(code, y, free, cfg.T2, beta=-beta_2)
        record("nudged")
        model.compute_syn_grads(code, y, nudged_negative, nudged, (-beta_2, beta_2), free)
    else:
        model.compute_syn_grads(code, y, free, nudged, (beta_1, beta_2), free)
    optimizer.step()
    model.after_update(encoding, nudged)
    return free, encoding


def _own_totals(totals: dict[str, float]) -> dict[str, float]:
    return totals


def train_epoch(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    cfg: EPConfig,
    device: torch.device | str = "cpu",
    description: str = "train",
    sum_totals: Callable[[dict[str, float]], dict[str, float]] = _own_totals,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``train_acc`` and the model's batch stats, all averaged
    over every sample of the epoch. With a tolerance (``model.tol``) also, per phase kind,
    ``<phase>_steps`` (mean steps per phase) and ``<phase>_at_cap`` (fraction of phases that
    hit their cap without settling), shown in the progress bar as well (this process's phases
    only). Raises ``DivergenceError`` when states or weights blow up.

    ``sum_totals`` turns this process's sums (correct, seen, stats) into sums over every
    process of a data-parallel run (``distributed.sum_totals``); here they are all there is."""
    model.train()
    correct, seen = 0, 0
    stat_sums: dict[str, float] = {}
    phases: list[tuple[str, PhaseRecord]] = []
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    for x, y in progress:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        free, encoding = train_batch(model, optimizer, x, y, cfg, phases)
        check_finite(model, free)
        batch = y.shape[0]
        correct += (model.predict(free) == y).sum().item()
        seen += batch
        for name, value in model.batch_stats(encoding).items() if batch else ():
            stat_sums[name] = stat_sums.get(name, 0.0) + value * batch
        postfix = {"acc": f"{correct / max(seen, 1):.3f}"}
        if model.tol is not None:
            postfix["steps"] = "/".join(
                f"{value:.0f}" for name, value in phase_stats(phases).items() if "steps" in name
            )
        progress.set_postfix(postfix)
    totals = sum_totals({"correct": correct, "seen": seen, **stat_sums})
    seen = totals.pop("seen")
    metrics = {"train_acc": totals.pop("correct") / max(seen, 1)}
    metrics.update({name: total / max(seen, 1) for name, total in totals.items()})
    if model.tol is not None:
        metrics.update(phase_stats(phases))
    return metrics


def phase_stats(phases: list[tuple[str, PhaseRecord]]) -> dict[str, float]:
    """``<phase>_steps``: mean steps of each phase kind, and ``<phase>_at_cap``: the fraction
    of those phases that stopped at their cap without settling."""
    stats = {}
    for name in dict.fromkeys(name for name, _ in phases):
        records = [record for kind, record in phases if kind == name]
        stats[f"{name}_steps"] = sum(record.steps for record in records) / len(records)
        stats[f"{name}_at_cap"] = sum(not record.settled for record in records) / len(records)
    return stats


@torch.no_grad()
def settle(model: EnergyNet, x: Tensor, y: Tensor, T: int) -> tuple[Encoding, list[Tensor]]:
    """The encoding of the batch ``x`` and the free-phase states after ``T`` steps from zero."""
    encoding = model.prepare_input(x)
    return encoding, model(encoding.code, y, model.init_neurons(encoding.code), T)


@torch.no_grad()
def evaluate(
    model: EnergyNet,
    loader: Iterable,
    T: int,
    device: torch.device | str = "cpu",
    description: str = "eval",
    sum_totals: Callable[[dict[str, float]], dict[str, float]] = _own_totals,
) -> float:
    """Accuracy of the free fixed point after ``T`` steps over ``loader`` (its counts summed
    over processes by ``sum_totals``, as in ``train_epoch``)."""
    model.eval()
    correct, seen = 0, 0
    for x, y in tqdm(loader, desc=description, leave=False, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        free = settle(model, x, y, T)[1]
        correct += (model.predict(free) == y).sum().item()
        seen += y.shape[0]
    totals = sum_totals({"correct": correct, "seen": seen})
    return totals["correct"] / max(totals["seen"], 1)


def train(
    model: EnergyNet,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    test_loader: Iterable,
    cfg: EPConfig,
    epochs: int,
    device: torch.device | str = "cpu",
    scheduler=None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    sum_totals: Callable[[dict[str, float]], dict[str, float]] = _own_totals,
) -> list[dict[str, float]]:
    """Train from ``start_epoch`` to ``epochs``; after each epoch evaluate on ``test_loader`` with
    T1 steps, add the model's ``epoch_stats``, step the scheduler and hand the metrics (``epoch``
    counted from 1) to ``on_epoch_end`` (which saves checkpoints and logs). ``sum_totals``: see
    ``train_epoch``."""
    history = []
    for epoch in range(start_epoch, epochs):
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        description = f"epoch {epoch + 1}/{epochs}"
        metrics = train_epoch(model, optimizer, train_loader, cfg, device, description, sum_totals)
        metrics["test_acc"] = evaluate(model, test_loader, cfg.T1, device, "test", sum_totals)
        metrics.update(model.epoch_stats())
        if scheduler is not None:
            scheduler.step()
        metrics = {"epoch": epoch + 1, **metrics, "lr": lr, "seconds": time.time() - started}
        settling = "".join(
            f", {phase} {metrics[phase + '_steps']:.1f} steps "
            f"({100 * metrics[phase + '_at_cap']:.0f}% at cap)"
            for phase in ("free", "nudged")
            if phase + "_steps" in metrics
        )
        tqdm.write(
            f"epoch {epoch + 1}/{epochs}: train {metrics['train_acc']:.4f} "
            f"test {metrics['test_acc']:.4f} ({metrics['seconds']:.1f}s){settling}"
        )
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    return history


@torch.no_grad()
def settling_trace(
    model: EnergyNet, x: Tensor, y: Tensor, T1: int, T2: int, betas: tuple[float, float]
) -> dict[str, dict[str, Tensor | None]]:
    """How each dynamics settles the batch ``x``: per ``sync`` and ``async``, a free phase of
    ``T1`` steps from zero at ``betas[0]`` and a nudged phase of ``T2`` steps from its end at
    ``betas[1]``, every step taken (no tolerance).

    Returns per dynamics ``free_energy`` (T1 + 1,) and ``nudged_energy`` (T2 + 1,): the mean
    energy (``EnergyNet.energy``, with each phase's beta) over the batch from the phase's start,
    None when the model has none (``has_energy``); ``free_change`` (T1,), ``nudged_change`` (T2,):
    ``max |s_t - s_(t-1)|`` over layers and samples at every step.
    """
    encoding = model.prepare_input(x)
    code = encoding.code
    has_energy = model.has_energy
    traces = {}
    for dynamics in DYNAMICS:
        trace: dict[str, Tensor | None] = {}
        neurons = model.init_neurons(code)
        with model.dynamics_set_to(dynamics):
            for phase, T, beta in (("free", T1, betas[0]), ("nudged", T2, betas[1])):
                energies, changes = [], []
                for step in range(T + 1):
                    if has_energy:
                        energies.append(model.energy(code, y, neurons, beta).mean())
                    if step < T:
                        previous, neurons = neurons, model(code, y, neurons, 1, beta)
                        changes.append(torch.tensor(max_change(previous, neurons)))
                trace[f"{phase}_energy"] = torch.stack(energies).cpu() if has_energy else None
                trace[f"{phase}_change"] = torch.stack(changes) if changes else torch.zeros(0)
        traces[dynamics] = trace
    return traces


# --------------------------------------------------------------------------------------------
# Gradient descending updates (GDU) check: EP's nudged-phase updates vs BPTT's gradients
# --------------------------------------------------------------------------------------------


def _snapshot_grads(model: EnergyNet) -> dict[str, Tensor]:
    """Every parameter's gradient (zeros where a truncated graph did not reach it)."""
    return {
        name: torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        for name, param in model.named_parameters()
    }


def gdu_check(
    model: EnergyNet, x: Tensor, y: Tensor, cfg: EPConfig
) -> dict[str, dict[str, Tensor | float]]:
    """EP's per-step updates in the nudged phase vs BPTT's per-step gradients, on one batch.

    After T1 free steps (``s^0``), step ``t = 1..T2`` of the nudged phase gives the EP estimate
    ``-(dPhi/dtheta(s^beta_t) - dPhi/dtheta(s^0)) / beta`` (symmetric with ``thirdphase``), and
    BPTT truncated to the last ``t`` steps of a free trajectory from ``s^0`` gives the gradient
    of the final loss. By the GDU theorem the two curves agree when the free phase converged.

    Returns per parameter name: ``ep`` and ``bptt`` (T2, *param_shape), ``rel_rmse``
    ``||EP - BPTT|| / max(||EP||, ||BPTT||)`` over all steps, and ``sign_error`` (fraction of
    entries whose signs disagree at the last step).
    """
    beta = cfg.betas[1]
    encoding, free = settle(model, x, y, cfg.T1)
    code = encoding.code
    ep_steps: list[dict[str, Tensor]] = []
    nudged, nudged_negative = free, free
    for _ in range(cfg.T2):
        nudged = model(code, y, nudged, 1, beta=beta)
        if cfg.thirdphase:
            nudged_negative = model(code, y, nudged_negative, 1, beta=-beta)
            model.compute_syn_grads(code, y, nudged_negative, nudged, (-beta, beta), free)
        else:
            model.compute_syn_grads(code, y, free, nudged, (0.0, beta), free)
        ep_steps.append(_snapshot_grads(model))
    bptt_steps: list[dict[str, Tensor]] = []
    for t in range(1, cfg.T2 + 1):
        model.zero_grad(set_to_none=True)
        final = model(code, y, free, t, track_grad=True)
        model.loss(final, y).mean().backward()
        bptt_steps.append(_snapshot_grads(model))
    model.zero_grad(set_to_none=True)
    report = {}
    for name in ep_steps[0]:
        ep = torch.stack([step[name] for step in ep_steps])
        bptt = torch.stack([step[name] for step in bptt_steps])
        scale = max(ep.norm().item(), bptt.norm().item(), 1e-30)
        sign_error = (ep[-1].sign() != bptt[-1].sign()).float().mean().item()
        report[name] = {
            "ep": ep,
            "bptt": bptt,
            "rel_rmse": (ep - bptt).norm().item() / scale,
            "sign_error": sign_error,
        }
    return report


__all__ = [
    "ACTIVATIONS",
    "DivergenceError",
    "CLAMP_SLOPES",
    "DYNAMICS",
    "EPConfig",
    "Encoding",
    "EnergyNet",
    "P_CNN",
    "P_MLP",
    "PhaseRecord",
    "check_finite",
    "evaluate",
    "gdu_check",
    "make_optimizer",
    "make_scheduler",
    "settle",
    "settling_trace",
    "train",
    "train_batch",
    "train_epoch",
]
