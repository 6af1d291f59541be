"""Vector-field models built on the engine: EP with separate forward and backward weights.

As in ``utils_ep_fast`` the layers are ``s_1 .. s_L`` with the fixed input ``s_0 = x``, and link
``k`` drives ``s_{k+1}`` with ``F_k(s_k)`` (conv + pool ``P_k``, linear, or copy). Every link
``k >= 1`` that is not a copy also has backward weights ``B_k``: the shape of ``W_k``, no bias,

    G_k(s) = P_k(conv(s, B_k))   (conv link)        G_k(s) = B_k flatten(s)   (linear link)

and the feedback into ``s_k`` goes through ``B_k`` instead of ``W_k``. The dynamics are::

    s_k <- sigma( F_{k-1}(s_{k-1}) + G_k^T(s_{k+1}) )          (+ nudge on s_L, as the engine)

where ``G_k^T`` is the transposed convolution with ``B_k`` after unpooling ``s_{k+1}`` to the
argmax positions of ``P_k(conv(s_k, B_k))`` (for ``m``; ``a`` spreads value / 4, as the engine).
With the LCA front end the feedback into the copy layer is scaled by ``scale_feedback``.

This field is the gradient of no single Phi. Laborieux et al.'s ``VF_CNN`` instead gives every
layer its own primitive function, crossing a first state ``s^1`` with a second state ``s^2``::

    phi_k(s^1, s^2) = < F_{k-1}(s^1_{k-1}), s^2_k >  +  < G_k(s^2_k), s^1_{k+1} >
                      ( - beta L(s^2) for k = L;  no G term for k = L )

The dynamics are ``s_k <- sigma(d phi_k(s, s) / d s_k)``. The parameters of ``phi_k`` are
``W_{k-1}, b_{k-1}`` and ``B_k``, in no other phi, so the EP estimate of each one comes from
its own layer. With ``s^0`` the free fixed point, ``s^1``/``s^2`` the first/second state handed
to ``compute_syn_grads`` (betas ``b1``/``b2``) and ``mean`` over the batch::

    grad(theta) = d/dtheta sum_k mean( phi_k(s^0, s^2, b2) - phi_k(s^0, s^1, b1) ) / (b1 - b2)

that is, written out with ``c = 1 / ((b1 - b2) B)``::

    W_{k-1}.grad = c corr( s^0_{k-1}, P^T(s^2_k - s^1_k) )       i.e. (s^2 - s^1)_above x s^0_below
    b_{k-1}.grad = c sum P^T(s^2_k - s^1_k)
    B_k.grad     = c [ corr(s^2_k, P^T s^0_{k+1}) - corr(s^1_k, P^T s^0_{k+1}) ]
                                                                i.e. s^0_above x (s^2 - s^1)_below

(``P^T`` unpools to the argmax of the pass it belongs to: ``W_{k-1} s^0_{k-1} + b`` for W,
``B_k s^i_k`` for B; a linear link has no pool). The three EP variants, as the reference runs
them:

* one-sided (and random sign): ``s^1 = s^0`` the free state, ``s^2`` the nudged one, so
  ``phi_k(s^0, s^1)`` is the plain layer phi: ``dW ~ (s^2 - s^0)_above x s^0_below``,
  ``dB ~ s^0_above x (s^2 - s^0)_below``;
* third phase: ``s^1 = s^{-beta}``, ``s^2 = s^{+beta}``, both crossed with the free state
  ``s^0`` (the reference's ``neurons_3`` path for models without ``same_update``);
* ``same_update``: the uncrossed estimate ``phi_k(s^2, s^2, b2) - phi_k(s^1, s^1, b1)`` for both
  weights (the symmetric model's for W, the same with ``G_k`` for B), then both gradients
  replaced by their average ``(W_k.grad + B_k.grad) / 2``; with the third phase ``s^1, s^2`` are
  ``s^{-beta}, s^{+beta}``. Equal updates keep ``W_k - B_k`` fixed under SGD, so the two
  align as the weights grow.

The readout (``softmax``) is outside the system, as in the engine, with no backward weights.
BPTT differentiates the dynamics above (``same_update`` only concerns the EP estimate, as in the
reference). The angle ``acos(<W_k, B_k> / (|W_k| |B_k|))`` in degrees is the alignment
diagnostic, logged per epoch as ``angle_syn<i>`` (``i`` the index of ``W_k`` in ``synapses``).

Each of these links is a ``VectorFieldLink``: the engine's link with its backward weights,
which owns the feedback through ``B_k`` and the crossed estimate; every step rule of the engine
applies unchanged.

The optimizer gives ``B_k`` the learning rate and weight decay of ``W_k`` (``--lrs`` / ``--wds``
keep one entry per forward synapse), as the reference does. The reference's ``VF_MLP`` stores
``B_k`` transposed and has no ``same_update``; ``VF_MLP`` here is ``VF_CNN`` without convs, whose
updates are the same up to that layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from graph import INPUT
from lca_utils_ep_fast import LCA_CNN
from links import CopyLink, Link
from utils_ep_fast import P_CNN, P_MLP, synapse_gains


def _backward_synapse(forward: nn.Module) -> nn.Module:
    """A new synapse of ``forward``'s shape, stride and padding, without bias (default init)."""
    if isinstance(forward, nn.Conv2d):
        return nn.Conv2d(
            forward.in_channels,
            forward.out_channels,
            forward.kernel_size,
            forward.stride,
            forward.padding,
            bias=False,
        )
    return nn.Linear(forward.in_features, forward.out_features, bias=False)


class VectorFieldLink(Link):
    """A conv or linear link ``base`` with backward weights ``B_k`` (None for a link from ``x``,
    whose feedback is never taken), and the vector-field estimate (module docstring).

    ``drive`` takes the feedback's max-pool positions from ``P_k(conv(below, B_k))``, ``adjoint``
    goes through ``B_k``; ``same_update`` averages the forward and backward updates.
    """

    def __init__(self, base: Link, backward: nn.Module | None, same_update: bool) -> None:
        super().__init__(base.shape, base.synapse)
        self.base = base
        self.name = base.name
        object.__setattr__(self, "backward", backward)  # the model's backward_synapses own it
        self.same_update = same_update

    def drive(self, below: Tensor, synapse: nn.Module | None = None) -> tuple[Tensor, tuple | None]:
        drive, cache = self.base.drive(below, synapse)
        if self.backward is not None and self.base.argmax_feedback:
            with torch.no_grad():
                cache = self.base.drive(below, self.backward)[1]
        return drive, cache

    def adjoint(self, above: Tensor, cache, below_shape, synapse=None) -> Tensor:
        feedback = self.synapse if self.backward is None else self.backward
        return self.base.adjoint(
            above, cache, below_shape, feedback if synapse is None else synapse
        )

    def param_grads(self, below: Tensor, above: Tensor, synapse=None) -> tuple[Tensor, Tensor]:
        return self.base.param_grads(below, above, synapse)

    def write_estimate(self, first, second, free, scale: float) -> None:
        """``W``: ``(s^2 - s^1)_above x s^0_below``; ``B``: ``s^0_above x (s^2 - s^1)_below``
        (as differences of two correlations); with ``same_update`` both the uncrossed estimate,
        then both their average."""
        synapse = self.synapse
        if self.same_update:
            self.base.write_estimate(first, second, free, scale)
        else:
            weight, bias = self.param_grads(free[0], second[1] - first[1])
            synapse.weight.grad = weight * scale
            if synapse.bias is not None:
                synapse.bias.grad = bias * scale
        backward = self.backward
        if backward is None:
            return
        above_1, above_2 = (first[1], second[1]) if self.same_update else (free[1], free[1])
        grad_2, _ = self.param_grads(second[0], above_2, backward)
        grad_1, _ = self.param_grads(first[0], above_1, backward)
        backward.weight.grad = (grad_2 - grad_1) * scale
        if self.same_update:
            common = 0.5 * (synapse.weight.grad + backward.weight.grad)
            synapse.weight.grad = common
            backward.weight.grad = common.clone()


class VectorField:
    """Mixin that turns an engine model into its vector-field version (see the module docstring):
    every link that is not a copy becomes a ``VectorFieldLink``.

    Attributes:
        backward_synapses: ``nn.ModuleList`` of the ``B_k``, in link order.
        same_update: average the forward and backward updates.
    """

    def __init__(self, *args, same_update: bool = False, scale: float | None = None, **kwargs):
        """The base model's arguments (``scale`` by keyword), then its backward weights."""
        super().__init__(*args, scale=scale, **kwargs)
        self._add_backward_synapses(same_update, scale)

    def _add_backward_synapses(self, same_update: bool, scale: float | None) -> None:
        """One ``B_k`` per link that is not a copy and whose source is a layer (nothing is fed
        back into ``x``), in edge order; ``--scale g`` multiplies their default init by ``g``
        like the forward weights' (each its forward synapse's ``g`` when there is one per
        synapse)."""
        self.same_update = same_update
        self.backward_synapses = nn.ModuleList()
        for k, (edge, link) in enumerate(zip(self.graph.edges, self.links, strict=True)):
            if isinstance(link, CopyLink):
                continue
            backward = None
            if edge.source != INPUT:
                backward = _backward_synapse(link.synapse)
                self.backward_synapses.append(backward)
            self.links[k] = VectorFieldLink(link, backward, same_update)
        if scale is not None:
            gains = synapse_gains(scale, len(self.synapses))
            with torch.no_grad():
                for i, synapse in self.backward_pairs():
                    synapse.weight.mul_(gains[i])

    def backward_pairs(self) -> list[tuple[int, nn.Module]]:
        """``(i, B_k)`` for every link with backward weights, ``i`` the index of its ``W_k`` in
        ``synapses``, in link order."""
        index = {id(synapse): i for i, synapse in enumerate(self.synapses)}
        return [
            (index[id(link.synapse)], link.backward)
            for link in self.links
            if getattr(link, "backward", None) is not None
        ]

    # ---- engine hooks ---------------------------------------------------------------------

    @property
    def has_energy(self) -> bool:
        """A vector field is not the gradient of an energy: none to trace."""
        return False

    def Phi(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError(
            "a vector-field model has no single Phi: its dynamics follow the layer-wise phis "
            "of vf_utils_ep_fast's docstring"
        )

    def optimizer_groups(self) -> list[tuple[int, list[nn.Parameter]]]:
        """The forward synapses, then each ``B_k`` with the rate entry of its ``W_k``."""
        groups = super().optimizer_groups()
        groups += [(i, [backward.weight]) for i, backward in self.backward_pairs()]
        return groups

    def epoch_stats(self) -> dict[str, float]:
        return {**super().epoch_stats(), **self.backward_angles()}

    # ---- diagnostics ----------------------------------------------------------------------

    @torch.no_grad()
    def backward_angles(self) -> dict[str, float]:
        """``angle_syn<i>``: the angle in degrees between ``W_k`` (``synapses[i]``) and ``B_k``,
        ``acos(<W, B> / (|W| |B|))``, computed in float64."""
        angles = {}
        for i, backward in self.backward_pairs():
            forward = self.synapses[i].weight.double().flatten()
            backward = backward.weight.double().flatten()
            cosine = forward @ backward / (forward.norm() * backward.norm()).clamp_min(1e-300)
            angle = math.degrees(math.acos(cosine.clamp(-1.0, 1.0).item()))
            angles[f"angle_syn{i}"] = angle
        return angles


class VF_CNN(VectorField, P_CNN):
    """``P_CNN`` (same arguments, by keyword past ``fc``) with backward weights; ``same_update``
    averages the forward and backward updates."""


class VF_MLP(VectorField, P_MLP):
    """``P_MLP`` (same arguments) with backward weights; see ``VF_CNN``."""


class VF_LCA_CNN(VectorField, LCA_CNN):
    """``LCA_CNN`` (same arguments) with backward weights, the first one (``B_1``) carrying the
    feedback into the copy layer that ``scale_feedback`` scales; see ``VF_CNN``."""


__all__ = ["VF_CNN", "VF_LCA_CNN", "VF_MLP", "VectorField", "VectorFieldLink"]
