"""The links of an energy-based network: one small module per kind of coupling between layers.

A network is a graph (``graph``) of neuron layers driven by a fixed input ``x``. Each edge
``e = (source, target)`` has a link ``F_e`` that couples the source state (``x`` or a layer,
``below`` here) to the target layer (``above``) and adds the term ``<F_e(below), above>`` to the
primitive function ``Phi`` (``<.,.>`` sums over all non-batch elements, one value per sample).
Each link owns, for its term:

* ``drive(below)``: the forward drive ``F_e(below)`` and what its adjoint needs (``cache``);
* ``adjoint(above, cache, below_shape)``: ``F_e^T(above)``, the feedback into the source;
* ``param_grads(below, above)``: ``d<F_e(below), above>/dW_e`` and ``/db_e``, batch sums;
* ``phi(below, above)``: the term itself, per sample (B,);
* ``write_estimate``: its share of the EP estimate, written into its synapse's ``.grad``.

The kinds:

* ``ConvLink``: ``F_e(s) = P_e(conv_e(s))`` with a 2x2/2 pool ``P_e`` (``MaxPool``, ``AvgPool``
  or ``NoPool``); ``F_e^T`` is the transposed convolution after the pool's adjoint (unpool to
  the argmax positions of the current forward pass for max, spread ``value / 4`` for avg). It
  computes its target's shape and the output padding that lands ``F_e^T`` on the source's size;
* ``LinearLink``: ``F_e(s) = W_e flatten(s) + b_e``, ``F_e^T(s) = W_e^T s``;
* ``CopyLink``: ``F_e(s) = s`` (the LCA front end couples its sparse code to a copy layer this
  way); it has no parameters, and the feedback its layer receives is scaled by ``g``.

A synapse may have no bias (``bias=False``): its link then has the weight term only, and a
layer's own bias, if any, belongs to the layer (``graph.Layer``). A link refers to its synapse
(an ``nn.Conv2d`` or ``nn.Linear`` the model's ``synapses`` own) without registering it, so the
model's parameter names stay ``synapses.<i>.*``.
Tensor shapes: conv layers are ``(B, C, H, W)``, linear layers ``(B, N)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    conversion (see ``MaxPool``), while on smaller maps NCHW convolutions are faster
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


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution: ``floor((size + 2 p - k) / s) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# Pools and their adjoints
# --------------------------------------------------------------------------------------------


class MaxPool:
    """2x2 max-pool, stride 2; its adjoint sends every value to the argmax of its window."""

    has_indices = True

    def size(self, n: int) -> int:
        return n // 2

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """The pooled map of ``z`` (B, C, H, W) and its flat ``h * W + w`` argmax per plane,
        both in the layout of ``z``."""
        if z.is_cuda or z.is_contiguous(memory_format=torch.channels_last):
            return F.max_pool2d(z, 2, 2, return_indices=True)
        # PyTorch's NCHW max-pool on the CPU is 3-8x slower than its channels_last one, which
        # gives the same values and indices (ties included): pool there, hand back NCHW.
        pooled, indices = F.max_pool2d(
            z.contiguous(memory_format=torch.channels_last), 2, 2, return_indices=True
        )
        return pooled.contiguous(), indices.contiguous()

    def adjoint(self, s: Tensor, indices: Tensor | None, z_size: torch.Size) -> Tensor:
        """``P^T s`` (B, C, H//2, W//2) -> ``z_size``: each value at its window's argmax, zero
        elsewhere. The unpool runs in the layout of ``indices`` (``s`` is copied there if needed:
        with mixed layouts it takes a slower path)."""
        layout = torch.contiguous_format if indices.is_contiguous() else torch.channels_last
        s = s.contiguous(memory_format=layout)
        return F.max_unpool2d(s, indices, 2, 2, output_size=z_size[-2:])


class AvgPool:
    """2x2 average pool, stride 2; its adjoint spreads every value / 4 over its window."""

    has_indices = False

    def size(self, n: int) -> int:
        return n // 2

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return F.avg_pool2d(z, 2, 2), None

    def adjoint(self, s: Tensor, indices: Tensor | None, z_size: torch.Size) -> Tensor:
        """``P^T s``: value / 4 at each of the 4 positions of its window; rows and columns the
        pool dropped (odd sizes) receive zero."""
        spread = F.interpolate(s, scale_factor=2.0, mode="nearest") * 0.25
        missing_h = z_size[-2] - spread.shape[-2]
        missing_w = z_size[-1] - spread.shape[-1]
        return F.pad(spread, (0, missing_w, 0, missing_h)) if missing_h or missing_w else spread


class NoPool:
    """The identity in a pool's place."""

    has_indices = False

    def size(self, n: int) -> int:
        return n

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return z, None

    def adjoint(self, s: Tensor, indices: Tensor | None, z_size: torch.Size) -> Tensor:
        return s


# The pool letters of ``--pools``.
POOLS = {"m": MaxPool(), "a": AvgPool(), "i": NoPool()}


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------

Cache = tuple | None


class Link(nn.Module):
    """A link into a layer of per-sample ``shape``, through ``synapse`` (None: no weights).

    ``feedback_scale``: the factor on the feedback the layer it feeds receives from above.
    ``argmax_feedback``: whether the adjoint routes through argmax positions of the forward
    pass (a max-pool), which a vector-field link takes from its backward weights instead.
    """

    name = "link"
    feedback_scale = 1.0
    argmax_feedback = False

    def __init__(self, shape: tuple[int, ...], synapse: nn.Module | None = None) -> None:
        super().__init__()
        self.shape = tuple(shape)
        # referred to, not registered: the model's ``synapses`` own it (and name its weights)
        object.__setattr__(self, "synapse", synapse)

    def drive(self, below: Tensor, synapse: nn.Module | None = None) -> tuple[Tensor, Cache]:
        """``F_e(below)`` (through ``synapse``, default the link's own) and its adjoint's cache."""
        raise NotImplementedError

    def adjoint(
        self, above: Tensor, cache: Cache, below_shape, synapse: nn.Module | None = None
    ) -> Tensor:
        """``F_e^T(above)`` through ``synapse``'s weights (default the link's own) and the pool
        positions of ``cache``, in ``below_shape``."""
        raise NotImplementedError

    def param_grads(
        self, below: Tensor, above: Tensor, synapse: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """``d<F_e(below), above>/dW`` and ``/db`` summed over the batch, with ``F_e`` applied
        by ``synapse`` (default the link's own), whose pool positions the gradient follows."""
        raise NotImplementedError

    def phi(self, below: Tensor, above: Tensor) -> Tensor:
        """The link's term of ``Phi``, ``<F_e(below), above>`` per sample (B,)."""
        drive, _ = self.drive(below)
        return (drive * above).flatten(1).sum(1)

    def write_estimate(
        self, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], free, scale: float
    ) -> None:
        """Write ``scale (dPhi_e/dtheta(s^2) - dPhi_e/dtheta(s^1))`` into the synapse's
        ``.grad`` (the weight's, and the bias's when the synapse has one); ``first``/``second``
        are ``(below, above)`` of the states ``s^1``/``s^2`` (``free``, those of the free fixed
        point, are for the vector-field estimate)."""
        weight_2, bias_2 = self.param_grads(*second)
        weight_1, bias_1 = self.param_grads(*first)
        self.synapse.weight.grad = (weight_2 - weight_1) * scale
        if self.synapse.bias is not None:
            self.synapse.bias.grad = (bias_2 - bias_1) * scale


class CopyLink(Link):
    """``F(s) = s``: the layer copies the state below; the feedback it receives is scaled by
    ``feedback_scale = g`` (``scale_feedback``, for the LCA front end's copy layer)."""

    name = "copy"

    def __init__(self, shape: tuple[int, ...], feedback_scale: float = 1.0) -> None:
        super().__init__(shape)
        self.feedback_scale = feedback_scale

    def drive(self, below: Tensor, synapse: nn.Module | None = None) -> tuple[Tensor, Cache]:
        return below, None

    def adjoint(self, above: Tensor, cache: Cache, below_shape, synapse=None) -> Tensor:
        return above

    def write_estimate(self, first, second, free, scale: float) -> None:
        """No parameters: nothing to estimate."""


class LinearLink(Link):
    """``F(s) = W flatten(s) + b`` through an ``nn.Linear``."""

    name = "linear"

    def drive(self, below: Tensor, synapse: nn.Module | None = None) -> tuple[Tensor, Cache]:
        synapse = self.synapse if synapse is None else synapse
        return F.linear(below.flatten(1), synapse.weight, synapse.bias), None

    def adjoint(self, above: Tensor, cache: Cache, below_shape, synapse=None) -> Tensor:
        return (above @ (self.synapse if synapse is None else synapse).weight).view(below_shape)

    def param_grads(self, below: Tensor, above: Tensor, synapse=None) -> tuple[Tensor, Tensor]:
        """``above^T flatten(below)`` (N_out, N_in) and ``above`` summed."""
        return above.t() @ below.flatten(1), above.sum(0)


class ConvLink(Link):
    """``F(s) = P(conv(s))`` through an ``nn.Conv2d`` and a pool, from a source map of per-sample
    shape ``source_shape`` (C_in, H, W). The link computes its target's shape (C_out, H', W')
    and the ``output_padding`` that makes the transposed convolution land exactly on (H, W)::

        h = floor((H + 2 p - k) / s) + 1,   H' = pool(h),
        output_padding = H - ((h - 1) s - 2 p + k)

    (the same for widths); raises ``ValueError`` when the convolution or the pool leaves no
    pixels."""

    name = "conv"

    def __init__(
        self,
        source_shape: tuple[int, int, int],
        synapse: nn.Conv2d,
        pool: MaxPool | AvgPool | NoPool,
    ) -> None:
        _, height, width = source_shape
        sizes = [
            conv_output_size(size, synapse.kernel_size[d], synapse.stride[d], synapse.padding[d])
            for d, size in enumerate((height, width))
        ]
        if min(sizes) < 1:
            raise ValueError(f"leaves no pixels from a {height}x{width} map")
        output_padding = tuple(
            size
            - ((conv - 1) * synapse.stride[d] - 2 * synapse.padding[d] + synapse.kernel_size[d])
            for d, (size, conv) in enumerate(zip((height, width), sizes, strict=True))
        )
        pooled = [pool.size(conv) for conv in sizes]
        if min(pooled) < 1:
            raise ValueError("leaves no pixels after its pool: too many poolings for the input")
        super().__init__((synapse.out_channels, *pooled), synapse)
        self.pool = pool
        self.output_padding = output_padding
        self.argmax_feedback = pool.has_indices

    def drive(self, below: Tensor, synapse: nn.Module | None = None) -> tuple[Tensor, Cache]:
        """``P(conv(below))`` and ``(pool indices, pre-pool size)``."""
        synapse = self.synapse if synapse is None else synapse
        z = F.conv2d(below, synapse.weight, synapse.bias, synapse.stride, synapse.padding)
        pooled, indices = self.pool.forward(z)
        return pooled, (indices, z.shape)

    def adjoint(self, above: Tensor, cache: Cache, below_shape, synapse=None) -> Tensor:
        synapse = self.synapse if synapse is None else synapse
        indices, z_size = cache
        unpooled = self.pool.adjoint(above, indices, z_size)
        return F.conv_transpose2d(
            unpooled, synapse.weight, None, synapse.stride, synapse.padding, self.output_padding
        )

    def param_grads(self, below: Tensor, above: Tensor, synapse=None) -> tuple[Tensor, Tensor]:
        """The correlation of ``below`` with ``P^T(above)`` (B, C_out, H, W), giving
        (C_out, C_in, k, k), and ``P^T(above)`` summed for the bias."""
        synapse = self.synapse if synapse is None else synapse
        below = in_memory_format(below)  # the input x may come in NCHW
        _, (indices, z_size) = self.drive(below, synapse)
        grad_z = self.pool.adjoint(above, indices, z_size)
        weight_grad = torch.nn.grad.conv2d_weight(
            below, synapse.weight.shape, grad_z, synapse.stride, synapse.padding
        )
        return weight_grad, grad_z.sum((0, 2, 3))


__all__ = [
    "CHANNELS_LAST_MIN_PIXELS",
    "POOLS",
    "AvgPool",
    "ConvLink",
    "CopyLink",
    "LinearLink",
    "Link",
    "MaxPool",
    "NoPool",
    "conv_output_size",
    "in_memory_format",
    "memory_format_for",
]
