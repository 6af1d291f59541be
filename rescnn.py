"""The residual energy-based network: Hopfield-ResNet blocks (Elayedam & Srinivasan 2025) as a
graph of the engine, and the same body behind an LCA front end.

Block ``i`` takes its input ``u`` (the fixed input ``x``, or the LCA copy layer, for the first
block; the previous block's ``b`` after it) and has two layers, each with one bias per channel,
and three bias-free convolutions::

    a_i = 3x3 conv, stride 1, padding 1, of u                     (c_i, H, W)
    b_i = 3x3 conv, stride 2, padding 1, of a_i
        + 1x1 conv, stride 2, padding 0, of u  (the skip)         (c_i, floor((H-1)/2)+1, ...)

then dense layers of ``fc`` on the NCHW flattening of ``b_n`` (bias-free links, a bias per
layer), the last the output units. So, with ``W_e`` each edge's weight and ``b_k`` each
layer's bias,

    Phi = sum_i ( <conv3x3(u_i), a_i> + <conv3x3/2(a_i), b_i> + <conv1x1/2(u_i), b_i> )
          + <W_out flatten(b_n), s_out> + sum_k <b_k, s_k>  -  beta L

which is minus the anchor's energy ``E_anchor`` (it has no quadratic term: its update is
``s = act(-dE/ds)``). The output units are linear (``OUTPUT_LINEAR``): ``s_out = dPhi/ds_out``
plus the nudge. The anchor's dense weight is a ``(C, H, W, 10)`` tensor contracted with ``b_n``;
it equals ``W.T.reshape(C, H, W, 10)`` of the ``(10, C*H*W)`` weight here.
``--channels 128 256 512 512 --fc 10`` is Hopfield-ResNet13: 13 weight tensors, 9 biases.

Init (the anchor's): a weight tensor with gain ``g`` is ``U(+-g / sqrt(fan_in))``, ``fan_in``
its input channels times its kernel area (its input features for a dense one); the bias of a
layer is ``U(+-0.5 / sqrt(9 C))``, ``C`` the channels (or units) of the layer before it in the
list ``x, a_1, b_1, ..., a_n, b_n, fc...`` (so the output's bias uses ``9 c_n``, not the dense
head's fan-in), whatever the gains.

Rates: synapse ``i`` (in the order ``u->a_1, a_1->b_1, u->b_1, u->a_2, ...``, then the dense
ones) has the ``--lrs``/``--wds`` entry ``i``; each layer's bias shares the entry of the conv
that feeds it from the layer before it (``a_i``: ``u->a_i``; ``b_i``: ``a_i->b_i``; a dense
layer: its dense weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from graph import INPUT
from lca_utils_ep_fast import LCAFrontEnd, check_front_end, lca_code_size
from links import POOLS, ConvLink, CopyLink, LinearLink
from utils_ep_fast import EnergyNet, synapse_gains

BIAS_GAIN = 0.5  # a layer's bias is U(+-BIAS_GAIN / sqrt(9 C))


class ResCNN(EnergyNet):
    """Residual blocks of ``channels`` then dense layers of ``fc`` (module docstring).

    Args:
        in_size: input height and width; in_channels: the input's channels.
        channels: ``c_1 .. c_n``, one block each; fc: the dense sizes, the last the classes
            (with ``softmax`` the last is the readout, outside the system).
        scale: the gains: one for every weight tensor, one per weight tensor (in synapse
            order), or None (1 each).
        input_copy, scale_feedback: a copy layer of the input first (the LCA code's), whose
            received feedback is scaled by ``scale_feedback``; the first block reads it.
    """

    OUTPUT_LINEAR = True

    def __init__(
        self,
        in_size: int,
        in_channels: int,
        channels: Sequence[int],
        fc: Sequence[int],
        activation: str = "relu6",
        softmax: bool = False,
        loss: str = "mse",
        scale: float | Sequence[float] | None = None,
        input_copy: bool = False,
        scale_feedback: float = 1.0,
    ) -> None:
        super().__init__(activation, softmax, loss, scale_feedback)
        if not channels or not fc:
            raise ValueError("a ResCNN needs at least one block (channels) and the classes (fc)")
        # layer k -> the synapse whose rate its bias takes, and the bound of its bias draw
        self.bias_synapse: dict[int, int] = {}
        self._bias_bounds: dict[int, float] = {}
        shape = (in_channels, in_size, in_size)
        source = INPUT
        if input_copy:
            source = self.add_layer(shape, scale_feedback)
            self.couple(INPUT, source, CopyLink(shape, scale_feedback))
        for width in channels:
            source, shape = self._add_block(source, shape, width)
        self._add_dense(source, shape, list(fc))
        self.initialise(scale)

    def _add_block(
        self, source: int, shape: tuple[int, int, int], width: int
    ) -> tuple[int, tuple[int, int, int]]:
        """Block ``u -> a, a -> b, u -> b`` from ``source`` (of per-sample ``shape``) with
        ``width`` channels; returns ``b`` and its shape."""
        conv_ua = self._synapse(nn.Conv2d(shape[0], width, 3, 1, 1, bias=False))
        link_ua = ConvLink(shape, conv_ua, POOLS["i"])
        conv_ab = self._synapse(nn.Conv2d(width, width, 3, 2, 1, bias=False))
        link_ab = ConvLink(link_ua.shape, conv_ab, POOLS["i"])
        conv_ub = self._synapse(nn.Conv2d(shape[0], width, 1, 2, 0, bias=False))
        link_ub = ConvLink(shape, conv_ub, POOLS["i"])
        a = self._biased_layer(link_ua.shape, len(self.synapses) - 3, shape[0])
        b = self._biased_layer(link_ab.shape, len(self.synapses) - 2, width)
        self.couple(source, a, link_ua)
        self.couple(a, b, link_ab)
        self.couple(source, b, link_ub)
        return b, link_ab.shape

    def _add_dense(self, source: int, shape: tuple[int, ...], fc: list[int]) -> None:
        """Dense layers on the flattening of ``source``; the last is the output layer, or
        the readout with ``softmax``."""
        self.num_classes = fc[-1]
        self.set_output(source)
        features, before = math.prod(shape), shape[0]
        for i, size in enumerate(fc):
            readout = self.softmax and i == len(fc) - 1
            linear = self._synapse(nn.Linear(features, size, bias=readout))
            if readout:
                self.set_readout(linear)
                self._readout_bound = _bias_bound(before)
                break
            layer = self._biased_layer((size,), len(self.synapses) - 1, before)
            self.couple(source, layer, LinearLink((size,), linear))
            self.set_output(layer)
            source, features, before = layer, size, size

    def _synapse(self, module: nn.Module) -> nn.Module:
        self.synapses.append(module)
        return module

    def _biased_layer(self, shape: tuple[int, ...], synapse: int, before: int) -> int:
        """A layer of ``shape`` with a bias of its own, which takes synapse ``synapse``'s rate
        and is drawn from ``U(+-0.5 / sqrt(9 before))``."""
        k = self.add_layer(shape, bias=True)
        self.bias_synapse[k] = synapse
        self._bias_bounds[k] = _bias_bound(before)
        return k

    @torch.no_grad()
    def initialise(self, scale: float | Sequence[float] | None) -> None:
        """Every weight tensor ``U(+-g / sqrt(fan_in))`` with its gain ``g`` (``scale``: one
        for all, one per synapse, None: 1), in synapse order; then every layer bias
        ``U(+-0.5 / sqrt(9 C))`` in layer order, and the readout's bias likewise."""
        gains = (
            [1.0] * len(self.synapses)
            if scale is None
            else synapse_gains(scale, len(self.synapses))
        )
        for synapse, gain in zip(self.synapses, gains, strict=True):
            bound = gain / math.sqrt(synapse.weight[0].numel())
            synapse.weight.uniform_(-bound, bound)
        for name, bias in self.layer_biases.items():
            bound = self._bias_bounds[int(name)]
            bias.uniform_(-bound, bound)
        if self.readout is not None:
            self.readout.bias.uniform_(-self._readout_bound, self._readout_bound)

    def optimizer_groups(self) -> list[tuple[int, list[nn.Parameter]]]:
        """Synapse ``i`` with the layer biases that take its rate (``bias_synapse``)."""
        groups = [(i, list(synapse.parameters())) for i, synapse in enumerate(self.synapses)]
        for name, bias in self.layer_biases.items():
            groups[self.bias_synapse[int(name)]][1].append(bias)
        return groups


def _bias_bound(channels: int) -> float:
    return BIAS_GAIN / math.sqrt(9 * channels)


class LCA_ResCNN(LCAFrontEnd, ResCNN):
    """LCA front end + copy layer ``s_0`` of the code + the residual blocks and dense layers.

    Args:
        in_size, in_channels: the image.
        lca_feats, lca_ksize, lca_stride, lca_lambda, lca_tau, lca_eta, lca_iters: the LCA
            layer (as ``lca_utils_ep_fast.LCA_CNN``'s).
        channels: ``[lca_feats, c_1, .., c_n]``: the copy layer, then one block per entry.
        fc, activation, softmax, loss, scale: as ``ResCNN``'s (the gains are the convs' and
            dense weights'; the copy layer has none).
        scale_feedback: ``g``, the scale of the top-down feedback into ``s_0``.
        dict_training: ``pretrained``, ``finetune`` or ``learn``.
    """

    # fmt: off
    def __init__(
        self,
        in_size: int, in_channels: int,
        lca_feats: int, lca_ksize: int, lca_stride: int,
        lca_lambda: float, lca_tau: float, lca_eta: float, lca_iters: int,
        channels: list[int], fc: list[int],
        activation: str = "relu6", softmax: bool = False, loss: str = "mse",
        scale: float | Sequence[float] | None = None, scale_feedback: float = 1.0,
        dict_training: str = "pretrained",
    ) -> None:
        check_front_end(dict_training, channels, lca_feats)
        super().__init__(
            lca_code_size(in_size, lca_ksize, lca_stride), lca_feats, list(channels[1:]), fc,
            activation=activation, softmax=softmax, loss=loss, scale=scale,
            input_copy=True, scale_feedback=scale_feedback,
        )
        self.attach_lca(
            in_channels, lca_feats, lca_ksize, lca_stride, lca_lambda, lca_tau, lca_eta,
            lca_iters, dict_training,
        )
        # fmt: on


__all__ = ["BIAS_GAIN", "LCA_ResCNN", "ResCNN"]
