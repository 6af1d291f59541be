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

The dynamics are synchronous, ``s_k <- sigma(dPhi/ds_k)``, with the derivative written out::

    dPhi/ds_k = F_{k-1}(s_{k-1}) + F_k^T(s_{k+1})       (+ nudge on the last layer)

where ``F^T`` is the adjoint: transposed convolution after the pool's adjoint (unpool to the
argmax positions of the current forward pass for ``m``, spread ``value / 4`` for ``a``), or
``W^T s`` for a linear link. The EP parameter estimate is::

    grad(theta) = d/dtheta [ mean_batch(Phi(s^2, beta_2) - Phi(s^1, beta_1)) / (beta_1 - beta_2) ]

written out explicitly as weight-gradient correlations. Tensor shapes: conv layers are
``(B, C, H, W)``, linear layers ``(B, N)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
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
POOLS = ("m", "a", "i")
LOSSES = ("mse", "cel")


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

    def _link_adjoint(self, k: int, above: Tensor, cache: tuple | None, below_shape) -> Tensor:
        """``F_k^T(above)``: the feedback that layer ``k+1`` sends to the state below link ``k``."""
        kind = self.link_kinds[k]
        if kind == "copy":
            return above
        synapse = self.synapses[self.link_synapse[k]]
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

    def _link_param_grads(self, k: int, below: Tensor, above: Tensor) -> tuple[Tensor, Tensor]:
        """``dPhi/dW_k`` and ``dPhi/db_k`` of ``<F_k(below), above>`` summed over the batch.

        conv: the correlation of ``below`` with ``P_k^T(above)`` (B, C_out, H, W), giving
        (C_out, C_in, k, k); linear: ``above^T flatten(below)``, giving (N_out, N_in).
        Biases: ``P_k^T(above)`` (or ``above``) summed.
        """
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
        updated = []
        for k, (drive, _) in enumerate(forwards):
            grad = drive
            if k < last:
                feedback = self._link_adjoint(
                    k + 1, neurons[k + 1], forwards[k + 1][1], drive.shape
                )
                if k == 0 and self.link_kinds[0] == "copy" and self.scale_feedback != 1.0:
                    feedback = feedback * self.scale_feedback
                grad = grad + feedback
            if k == last:
                new_state = self._output_update(grad, neurons[k], y, beta)
            else:
                new_state = self.sigma(grad)
            updated.append(in_memory_format(new_state))
        return updated

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
        """Run ``T`` explicit steps from ``neurons`` and return the settled states.

        No graph is built unless ``track_grad`` (BPTT). The input list is left untouched. The
        input and the states are put once in the layout of ``memory_format_for`` (a copy only
        where they are not in it yet), and the input's drive ``F_0(x)`` is computed once for
        the T steps.
        """
        with torch.set_grad_enabled(track_grad):
            x = in_memory_format(x)
            neurons = [in_memory_format(state) for state in neurons]
            input_drive = self._link_forward(0, x)[0] if T > 0 else None
            for _ in range(T):
                neurons = self._step(x, y, neurons, beta, input_drive)
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
    ) -> None:
        """Write ``d/dtheta [mean(Phi(s^2, b2) - Phi(s^1, b1)) / (b1 - b2)]`` into every ``.grad``.

        One-sided EP: ``s^1`` the free fixed point, ``betas = (0, beta)``; symmetric EP:
        ``s^1 = s^{-beta}``, ``betas = (-beta, beta)``. The readout (``softmax``) only appears in
        ``-beta L``: its estimate is ``(b2 dL(s^2) - b1 dL(s^1)) / (b2 - b1)`` with
        ``dL/dW_out = (softmax - onehot)^T s_L``.
        """
        beta_1, beta_2 = betas
        scale = 1.0 / ((beta_1 - beta_2) * max(x.shape[0], 1))  # an empty batch gives zeros
        below_1 = [x, *neurons_1[:-1]]
        below_2 = [x, *neurons_2[:-1]]
        for k in range(self.num_layers):
            if self.link_kinds[k] == "copy":
                continue
            weight_2, bias_2 = self._link_param_grads(k, below_2[k], neurons_2[k])
            weight_1, bias_1 = self._link_param_grads(k, below_1[k], neurons_1[k])
            synapse = self.synapses[self.link_synapse[k]]
            synapse.weight.grad = (weight_2 - weight_1) * scale
            synapse.bias.grad = (bias_2 - bias_1) * scale
        if self.softmax:
            weight_2, bias_2 = self._readout_loss_grads(neurons_2, y)
            weight_1, bias_1 = self._readout_loss_grads(neurons_1, y)
            self.readout.weight.grad = (beta_1 * weight_1 - beta_2 * weight_2) * scale
            self.readout.bias.grad = (beta_1 * bias_1 - beta_2 * bias_2) * scale

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
    """SGD (momentum ``mmt``) or Adam with one learning rate / weight decay per synapse."""
    synapses = list(model.synapses)
    if len(lrs) < len(synapses):
        raise ValueError(f"{len(synapses)} synapses need {len(synapses)} learning rates")
    wds = wds or [0.0] * len(synapses)
    if len(wds) < len(synapses):
        raise ValueError(f"{len(synapses)} synapses need {len(synapses)} weight decays")
    groups = [
        {"params": list(syn.parameters()), "lr": lrs[i], "weight_decay": wds[i]}
        for i, syn in enumerate(synapses)
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
    model: EnergyNet, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, cfg: EPConfig
) -> tuple[list[Tensor], Encoding]:
    """Train on one batch; return the free-phase states (for accuracy) and the batch's encoding.

    EP: free phase (T1 steps from zero, beta_1), nudged phase (T2 steps from the free fixed
    point at beta_2, its sign drawn per batch with ``random_sign``) and with ``thirdphase`` a
    second nudged phase at -beta_2; then the EP estimate and the optimizer step.
    BPTT: T1 - T2 steps without a graph, T2 with one, backpropagate the final loss.
    Then ``after_update`` gets the encoding and the nudged states (BPTT: its final states).
    """
    encoding = model.prepare_input(x)
    code = encoding.code
    neurons = model.init_neurons(code)
    optimizer.zero_grad(set_to_none=True)
    if cfg.alg == "BPTT":
        free = model(code, y, neurons, cfg.T1 - cfg.T2)
        final = model(code, y, free, cfg.T2, track_grad=True)
        model.loss(final, y).mean().backward()
        optimizer.step()
        final = [state.detach() for state in final]
        model.after_update(encoding, final)
        return final, encoding
    beta_1, beta_2 = cfg.betas
    free = model(code, y, neurons, cfg.T1, beta=beta_1)
    if cfg.random_sign:
        beta_2 = beta_2 * (1.0 if torch.rand(()) < 0.5 else -1.0)
    nudged = model(code, y, free, cfg.T2, beta=beta_2)
    if cfg.thirdphase:
        nudged_negative = model(code, y, free, cfg.T2, beta=-beta_2)
        model.compute_syn_grads(code, y, nudged_negative, nudged, (-beta_2, beta_2))
    else:
        model.compute_syn_grads(code, y, free, nudged, (beta_1, beta_2))
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
    over every sample of the epoch. Raises ``DivergenceError`` when states or weights blow up.

    ``sum_totals`` turns this process's sums (correct, seen, stats) into sums over every
    process of a data-parallel run (``distributed.sum_totals``); here they are all there is."""
    model.train()
    correct, seen = 0, 0
    stat_sums: dict[str, float] = {}
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    for x, y in progress:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        free, encoding = train_batch(model, optimizer, x, y, cfg)
        check_finite(model, free)
        batch = y.shape[0]
        correct += (model.predict(free) == y).sum().item()
        seen += batch
        for name, value in model.batch_stats(encoding).items() if batch else ():
            stat_sums[name] = stat_sums.get(name, 0.0) + value * batch
        progress.set_postfix(acc=f"{correct / max(seen, 1):.3f}")
    totals = sum_totals({"correct": correct, "seen": seen, **stat_sums})
    seen = totals.pop("seen")
    metrics = {"train_acc": totals.pop("correct") / max(seen, 1)}
    metrics.update({name: total / max(seen, 1) for name, total in totals.items()})
    return metrics


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
    T1 steps, step the scheduler and hand the metrics (``epoch`` counted from 1) to
    ``on_epoch_end`` (which saves checkpoints and logs). ``sum_totals``: see ``train_epoch``."""
    history = []
    for epoch in range(start_epoch, epochs):
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        description = f"epoch {epoch + 1}/{epochs}"
        metrics = train_epoch(model, optimizer, train_loader, cfg, device, description, sum_totals)
        metrics["test_acc"] = evaluate(model, test_loader, cfg.T1, device, "test", sum_totals)
        if scheduler is not None:
            scheduler.step()
        metrics = {"epoch": epoch + 1, **metrics, "lr": lr, "seconds": time.time() - started}
        tqdm.write(
            f"epoch {epoch + 1}/{epochs}: train {metrics['train_acc']:.4f} "
            f"test {metrics['test_acc']:.4f} ({metrics['seconds']:.1f}s)"
        )
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    return history


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
            model.compute_syn_grads(code, y, nudged_negative, nudged, (-beta, beta))
        else:
            model.compute_syn_grads(code, y, free, nudged, (0.0, beta))
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
    "EPConfig",
    "Encoding",
    "EnergyNet",
    "P_CNN",
    "P_MLP",
    "check_finite",
    "evaluate",
    "gdu_check",
    "make_optimizer",
    "make_scheduler",
    "settle",
    "train",
    "train_batch",
    "train_epoch",
]
