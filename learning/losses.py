"""The losses: what the output layer is trained to, one class per loss.

A loss ``L(s_out, y)`` acts on the output layer's state ``s_out`` (B, *shape_out) and the labels
``y`` (B,). It enters the primitive function as ``-beta L`` (``utils_ep_fast``), so a loss owns

* ``value``: ``L`` per sample (B,);
* ``logits`` and ``predict``: the class scores (B, K) it compares with ``y``, and their argmax;
* ``nudge``: ``-dL/ds_out`` (shaped like ``s_out``), which a nudged phase adds, times ``beta``,
  to the output layer's drive (``output_update``);
* ``cost_nudge``: ``-dA/ds_out`` of another cost ``A(z)`` on the same logits (an attack's,
  ``robust_eval.attacks.LogitCost``), for the EP estimate of ``dA/dx``;
* ``clamp``: the output state at which ``L`` is zero, for rules that clamp the output units to
  the target (None where no finite state reaches it, as for cross-entropy).

The output layer's activation stays with the model (``EnergyNet.activate_output``): sigma, or
the identity for linear output units; ``LINEAR_OUTPUT`` says a loss asks for linear units.

``LOSSES`` maps ``--loss`` to its class; ``--softmax`` puts ``SoftmaxReadout`` in its place.
Adding a loss is a class here and its entry in ``LOSSES`` (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn


class Loss:
    """A loss on the output units ``s_out`` (B, K), which are the logits; ``num_classes`` K."""

    NAME: ClassVar[str] = ""
    # the output units take their drive (and nudge) without the activation
    LINEAR_OUTPUT: ClassVar[bool] = False

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def onehot(self, y: Tensor, like: Tensor) -> Tensor:
        """``onehot(y)`` (B, K) in ``like``'s dtype."""
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def logits(self, state: Tensor) -> Tensor:
        """The class scores (B, K) of the output state: the units themselves."""
        return state

    def predict(self, state: Tensor) -> Tensor:
        """Predicted class per sample (B,): the argmax of ``logits``."""
        return self.logits(state).argmax(1)

    def value(self, state: Tensor, y: Tensor) -> Tensor:
        """``L(s_out, y)`` per sample (B,)."""
        raise NotImplementedError

    def nudge(self, state: Tensor, y: Tensor) -> Tensor:
        """``-dL/ds_out`` (shaped like ``state``)."""
        raise NotImplementedError

    def cost_nudge(self, logit_gradient: Callable[[Tensor], Tensor], state: Tensor) -> Tensor:
        """``-dA/ds_out`` of a cost ``A(z)`` on the logits, given ``z -> dA/dz`` (B, K)."""
        return -logit_gradient(state)

    def clamp(self, state: Tensor, y: Tensor) -> Tensor | None:
        """The output state (shaped like ``state``) where ``L`` is zero, or None."""
        return None

    def output_update(
        self,
        drive: Tensor,
        state: Tensor,
        y: Tensor,
        beta: float,
        activate: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """The output layer's new state: ``activate(dPhi/ds_out)`` with ``dPhi/ds_out = drive
        + beta nudge(s_out)`` (the drive alone at ``beta = 0``)."""
        if beta != 0.0:
            drive = drive + beta * self.nudge(state, y)
        return activate(drive)

    def parameter_grads(self, state: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Batch sums of ``dL/dp`` of the loss's own parameters at ``s_out`` (none here)."""
        return {}


class SquaredError(Loss):
    """``L = 0.5 ||s_out - onehot(y)||^2``; ``-dL/ds_out = onehot(y) - s_out``; clamp to
    ``onehot(y)``."""

    NAME = "mse"

    def value(self, state: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (state - self.onehot(y, state)).pow(2).sum(1)

    def nudge(self, state: Tensor, y: Tensor) -> Tensor:
        return self.onehot(y, state) - state

    def clamp(self, state: Tensor, y: Tensor) -> Tensor:
        return self.onehot(y, state)


class CrossEntropy(Loss):
    """``L = CE(s_out, y) = -log softmax(s_out)_y`` on the output units, which are then linear
    (Laborieux's convention); ``-dL/ds_out = onehot(y) - softmax(s_out)``; no clamp."""

    NAME = "cel"
    LINEAR_OUTPUT = True

    def value(self, state: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(state, y, reduction="none")

    def nudge(self, state: Tensor, y: Tensor) -> Tensor:
        return self.onehot(y, state) - state.softmax(1)


class SoftmaxReadout(Loss):
    """``L = CE(W_out s_out + b_out, y)``: a linear readout outside the system, ``readout``
    (K, N), reads the flattened output layer (B, N). ``-dL/ds_out = W_out^T (onehot(y) -
    softmax(z))`` with ``z = W_out s_out + b_out``; its parameters' gradients are
    ``dL/dW_out = (softmax(z) - onehot(y))^T s_out`` and ``dL/db_out = softmax(z) - onehot(y)``
    (``parameter_grads``, summed over the batch); no clamp (the readout is outside)."""

    NAME = "softmax"

    def __init__(self, num_classes: int, readout: nn.Linear) -> None:
        super().__init__(num_classes)
        self.readout = readout

    def logits(self, state: Tensor) -> Tensor:
        return F.linear(state.flatten(1), self.readout.weight, self.readout.bias)

    def value(self, state: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(state), y, reduction="none")

    def nudge(self, state: Tensor, y: Tensor) -> Tensor:
        logits = self.logits(state)
        error = self.onehot(y, logits) - logits.softmax(1)
        return (error @ self.readout.weight).view_as(state)

    def cost_nudge(self, logit_gradient: Callable[[Tensor], Tensor], state: Tensor) -> Tensor:
        return -(logit_gradient(self.logits(state)) @ self.readout.weight).view_as(state)

    def parameter_grads(self, state: Tensor, y: Tensor) -> dict[str, Tensor]:
        last = state.flatten(1)
        error = self.logits(state).softmax(1) - self.onehot(y, last)
        return {"weight": error.t() @ last, "bias": error.sum(0)}


# --loss NAME -> its class (on the output units; --softmax reads them through SoftmaxReadout)
LOSSES: dict[str, type[Loss]] = {cls.NAME: cls for cls in (SquaredError, CrossEntropy)}


def make_loss(name: str, num_classes: int, readout: nn.Linear | None = None) -> Loss:
    """The loss ``--loss name`` on the output units, or the softmax readout when ``readout``
    is given (``--softmax``, whatever ``name``)."""
    if readout is not None:
        return SoftmaxReadout(num_classes, readout)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {list(LOSSES)}")
    return LOSSES[name](num_classes)


__all__ = ["CrossEntropy", "LOSSES", "Loss", "SoftmaxReadout", "SquaredError", "make_loss"]
