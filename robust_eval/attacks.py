"""The attacks and adaptive-attack checks that ``robustness.py`` runs on a pixel classifier.

A *pixel classifier* is an ``nn.Module`` mapping images ``p`` (B, C, H, W) with pixels in
[0, 1] to logits ``z`` (B, K), paired with an *input gradient*: a function
``(p, cost) -> dA/dp`` (B, C, H, W) of a cost ``A = sum_b cost(z_b)`` on the logits. The
attacks here ask for that gradient for their own loss (``LogitCost``), so whatever computes it
(backpropagation through the dynamics, its straight-through variant, or the EP estimate nudged
by ``LogitCost.logit_gradient``) is what every white-box component follows.

* Default epsilons per task, as the robustness benchmarks quote them (``default_epsilons``).
* The costs on the logits: cross-entropy, DLR and targeted DLR (Croce & Hein 2020), and the
  targeted logit difference of FAB-T, each with its closed-form gradient ``dA/dz``, which is
  also the nudge an EP phase needs (``output_nudge``).
* BPDA / straight-through: ``straight_through(fn, slope, offset)`` keeps ``fn``'s value and
  backpropagates the slope of its linear part; ``straight_through_activations(model)`` swaps
  it into an engine network's clamp activation and LCA thresholding for a block.
* The pixel classifier as an ART classifier whose loss and input gradient are one cost's
  (``attack_classifier``), so every ART attack given it follows the chosen gradient.

AutoAttack and the adaptive-attack checks built on these are in ``robust_eval/autoattack.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learning.losses import Loss

# --------------------------------------------------------------------------------------------
# Default epsilons
# --------------------------------------------------------------------------------------------

# task -> (L-inf epsilon, L2 epsilon), pixels in [0, 1]
DEFAULT_EPSILONS: dict[str, tuple[float, float]] = {
    "CIFAR10": (8.0 / 255.0, 0.5),
    "CIFAR100": (8.0 / 255.0, 0.5),
    "SVHN": (8.0 / 255.0, 0.5),
    "MNIST": (0.3, 2.0),
    "DIGITS": (0.3, 2.0),
    "FashionMNIST": (0.1, 1.5),
}


def default_epsilons(task: str) -> tuple[float, float]:
    """``(L-inf eps, L2 eps)`` of ``task`` (its spelling in ``data_loading.TASKS``): CIFAR10,
    CIFAR100, SVHN 8/255 and 0.5; MNIST, DIGITS 0.3 and 2.0; FashionMNIST 0.1 and 1.5."""
    if task not in DEFAULT_EPSILONS:
        raise ValueError(f"no default epsilons for task {task!r}; give --eps and --eps-l2")
    return DEFAULT_EPSILONS[task]


# --------------------------------------------------------------------------------------------
# Costs on the logits
# --------------------------------------------------------------------------------------------

# keeps the DLR denominators positive when the top logits tie (as AutoAttack does)
DLR_DELTA = 1e-12
COST_KINDS = ("ce", "dlr", "dlr-targeted", "logit-difference")


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``CE(z, y) = -z_y + log sum_i exp(z_i)`` per sample (B,)."""
    return F.cross_entropy(logits, labels, reduction="none")


def cross_entropy_gradient(logits: Tensor, labels: Tensor) -> Tensor:
    """``dCE/dz = softmax(z) - e_y`` (B, K)."""
    return logits.softmax(1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)


def _sorted_ranks(logits: Tensor) -> Tensor:
    """Class indices (B, K) by decreasing logit: column ``r - 1`` holds ``pi_r``."""
    return logits.argsort(1, descending=True)


def _best_other(logits: Tensor, labels: Tensor) -> Tensor:
    """``argmax_{i != y} z_i`` (B,)."""
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.argmax(1)


def _pick(logits: Tensor, index: Tensor) -> Tensor:
    return logits.gather(1, index[:, None])[:, 0]


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The difference of logits ratio (B,), with ``pi`` the classes by decreasing logit::

    DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + delta)

    It is positive exactly when the image is misclassified; needs K >= 3."""
    ranks = _sorted_ranks(logits)
    margin = _pick(logits, labels) - _pick(logits, _best_other(logits, labels))
    scale = _pick(logits, ranks[:, 0]) - _pick(logits, ranks[:, 2]) + DLR_DELTA
    return -margin / scale


def dlr_gradient(logits: Tensor, labels: Tensor) -> Tensor:
    """``dDLR/dz`` (B, K) where the sort is locally constant, with ``m = argmax_{i != y} z_i``,
    ``N = z_y - z_m`` and ``D = z_pi1 - z_pi3 + delta``::

    dDLR/dz = -(e_y - e_m) / D + N (e_pi1 - e_pi3) / D^2"""
    ranks = _sorted_ranks(logits)
    other = _best_other(logits, labels)
    margin = _pick(logits, labels) - _pick(logits, other)
    scale = _pick(logits, ranks[:, 0]) - _pick(logits, ranks[:, 2]) + DLR_DELTA
    numerator = _basis(logits, labels) - _basis(logits, other)
    denominator = _basis(logits, ranks[:, 0]) - _basis(logits, ranks[:, 2])
    return -numerator / scale[:, None] + (margin / scale**2)[:, None] * denominator


def targeted_dlr_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """The targeted DLR (B,) of APGD-T, towards class ``t``::

    DLR_t(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + delta)

    Needs K >= 4."""
    ranks = _sorted_ranks(logits)
    margin = _pick(logits, labels) - _pick(logits, targets)
    return -margin / _targeted_scale(logits, ranks)


def targeted_dlr_gradient(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """``dDLR_t/dz`` (B, K) where the sort is locally constant, with ``N = z_y - z_t`` and
    ``D = z_pi1 - (z_pi3 + z_pi4) / 2 + delta``::

    dDLR_t/dz = -(e_y - e_t) / D + N (e_pi1 - (e_pi3 + e_pi4) / 2) / D^2"""
    ranks = _sorted_ranks(logits)
    margin = _pick(logits, labels) - _pick(logits, targets)
    scale = _targeted_scale(logits, ranks)
    numerator = _basis(logits, labels) - _basis(logits, targets)
    denominator = _basis(logits, ranks[:, 0]) - 0.5 * (
        _basis(logits, ranks[:, 2]) + _basis(logits, ranks[:, 3])
    )
    return -numerator / scale[:, None] + (margin / scale**2)[:, None] * denominator


def _targeted_scale(logits: Tensor, ranks: Tensor) -> Tensor:
    """``z_pi1 - (z_pi3 + z_pi4) / 2 + delta`` (B,)."""
    third, fourth = _pick(logits, ranks[:, 2]), _pick(logits, ranks[:, 3])
    return _pick(logits, ranks[:, 0]) - 0.5 * (third + fourth) + DLR_DELTA


def _basis(logits: Tensor, index: Tensor) -> Tensor:
    """``e_index`` (B, K) in the logits' dtype."""
    return F.one_hot(index, logits.shape[1]).to(logits.dtype)


@dataclass(frozen=True)
class LogitCost:
    """A cost ``A(z)`` per sample on the logits ``z`` (B, K), the loss an attack ascends.

    ``kind``: ``ce`` (``CE(z, y)``), ``dlr`` (``DLR(z, y)``), ``dlr-targeted``
    (``DLR_t(z, y, t)``) or ``logit-difference`` (``z_t - z_y``, FAB-T's linearised
    boundary). ``labels`` (B,) are the true classes, ``targets`` (B,) the target classes of
    the targeted kinds (None otherwise).

    EP estimates the input gradient of whatever cost nudges the output layer, so an EP input
    gradient for this attack nudges with ``-beta dA/ds_L`` (``output_nudge``)."""

    kind: str
    labels: Tensor
    targets: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in COST_KINDS:
            raise ValueError(f"unknown cost {self.kind!r}; choose from {COST_KINDS}")
        targeted = self.kind in ("dlr-targeted", "logit-difference")
        if targeted != (self.targets is not None):
            raise ValueError(f"the {self.kind} cost takes targets exactly when it is targeted")

    def value(self, logits: Tensor) -> Tensor:
        """``A(z)`` per sample (B,)."""
        if self.kind == "ce":
            return cross_entropy(logits, self.labels)
        if self.kind == "dlr":
            return dlr_loss(logits, self.labels)
        if self.kind == "dlr-targeted":
            return targeted_dlr_loss(logits, self.labels, self.targets)
        return _pick(logits, self.targets) - _pick(logits, self.labels)

    def logit_gradient(self, logits: Tensor) -> Tensor:
        """``dA/dz`` (B, K), in closed form."""
        if self.kind == "ce":
            return cross_entropy_gradient(logits, self.labels)
        if self.kind == "dlr":
            return dlr_gradient(logits, self.labels)
        if self.kind == "dlr-targeted":
            return targeted_dlr_gradient(logits, self.labels, self.targets)
        return _basis(logits, self.targets) - _basis(logits, self.labels)

    def rows(self, start: int, stop: int) -> LogitCost:
        """The same cost for samples ``start .. stop``."""
        targets = None if self.targets is None else self.targets[start:stop]
        return LogitCost(self.kind, self.labels[start:stop], targets)


def output_nudge(cost: LogitCost, last_state: Tensor, criterion: Loss) -> Tensor:
    """``-dA/ds_L`` (shaped like ``last_state``), the direction an EP nudged phase adds (times
    ``beta``) to the output layer's drive: ``criterion.cost_nudge`` of the cost's closed-form
    ``dA/dz`` (with a readout ``z = W s_L + b`` it is ``-(dA/dz) W``, else ``-dA/dz``)."""
    return criterion.cost_nudge(cost.logit_gradient, last_state)


# --------------------------------------------------------------------------------------------
# Input gradients
# --------------------------------------------------------------------------------------------

InputGradient = Callable[[Tensor, LogitCost], Tensor]


def backprop_gradient(logits_with_graph: Callable[[Tensor], Tensor], chunk: int) -> InputGradient:
    """The input gradient by backpropagation: ``dA/dp = (dz/dp)^T dA/dz`` with ``dA/dz`` the
    cost's closed form, ``chunk`` images at a time. ``logits_with_graph(p)`` must build the
    autograd graph from ``p`` to the logits (for an engine network: the encode and all T1
    steps with ``track_grad``)."""

    def gradient(pixels: Tensor, cost: LogitCost) -> Tensor:
        parts = []
        for start in range(0, pixels.shape[0], chunk):
            part = pixels[start : start + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = logits_with_graph(part)
                seed = cost.rows(start, start + chunk).logit_gradient(logits.detach())
                parts.append(torch.autograd.grad(logits, part, seed)[0])
        return torch.cat(parts)

    return gradient


# --------------------------------------------------------------------------------------------
# BPDA / straight-through
# --------------------------------------------------------------------------------------------


class _SlopeBackward(torch.autograd.Function):
    """Forward ``fn(x)``; backward ``slope * grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor], slope: float) -> Tensor:
        ctx.slope = slope
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.slope, None, None


@dataclass(frozen=True)
class StraightThrough:
    """``fn`` with the backward pass of its linear part ``l(x) = slope x + offset``: the value
    is ``fn(x)`` unchanged, the derivative ``slope`` everywhere (Athalye et al. 2018, BPDA).
    Where ``fn`` is on its linear part, ``fn(x) = l(x)`` and this is ordinary backprop."""

    fn: Callable[[Tensor], Tensor]
    slope: float
    offset: float = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.fn(x)
        return _SlopeBackward.apply(x, self.fn, self.slope)

    def linear_part(self, x: Tensor) -> Tensor:
        """``l(x) = slope x + offset``."""
        return self.slope * x + self.offset

    def on_linear_part(self, x: Tensor) -> Tensor:
        """Where ``fn(x) = l(x)``: the units that are neither clamped nor thresholded."""
        return self.fn(x) == self.linear_part(x)


def straight_through(fn: Callable[[Tensor], Tensor], slope: float, offset: float = 0.0):
    """``StraightThrough(fn, slope, offset)``: value ``fn(x)``, derivative ``slope``."""
    return StraightThrough(fn, slope, offset)


def _clamp_slope(model: nn.Module) -> float:
    """The slope ``c`` of the engine network's clamp activation (its linear part is ``c x``)."""
    from utils_ep_fast import CLAMP_SLOPES

    activation = getattr(model, "activation", None)
    if activation not in CLAMP_SLOPES:
        raise ValueError(
            f"the bpda gradient needs a clamp activation ({', '.join(CLAMP_SLOPES)}), "
            f"the model uses {activation!r}: use --gradients bptt or ep"
        )
    return CLAMP_SLOPES[activation]


def _swap_activation(model: nn.Module, activation: Callable[[Tensor], Tensor]):
    """Set the activation every layer update calls, return the one it replaces. (The one place
    that knows where the engine keeps it.)"""
    replaced, model.sigma = model.sigma, activation
    return replaced


def _straight_through_transfer(lca: nn.Module) -> StraightThrough:
    """The LCA layer's thresholding ``T_lambda`` as a pass-through with slope 1 (read at call
    time, so a changed ``lambda_`` is followed)."""
    from lca import hard_threshold, soft_threshold

    named = {"soft_threshold": soft_threshold, "hard_threshold": hard_threshold}
    kind = lca.transfer_func
    if callable(kind):
        return straight_through(kind, 1.0)

    def threshold(u: Tensor) -> Tensor:
        return named[kind](u, lca.lambda_, lca.nonneg)

    return straight_through(threshold, 1.0, -lca.lambda_ if kind == "soft_threshold" else 0.0)


@contextmanager
def straight_through_activations(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` (an engine network) backpropagates through its clamp as
    slope ``c`` everywhere and through an LCA front end's thresholding as slope 1; its values
    are unchanged. Its phases must run in the engine's loop (no compiled runner), which reads
    the activation it is given."""
    activation = straight_through(model.sigma, _clamp_slope(model))
    lca = getattr(model, "lca", None)
    replaced = _swap_activation(model, activation)
    transfer = lca.transfer_func if lca is not None else None
    try:
        if lca is not None:
            lca.transfer_func = _straight_through_transfer(lca)
        yield
    finally:
        _swap_activation(model, replaced)
        if lca is not None:
            lca.transfer_func = transfer


# --------------------------------------------------------------------------------------------
# The pixel classifier as an ART classifier of one cost
# --------------------------------------------------------------------------------------------


def encode_labels(labels: Tensor, targets: Tensor | None, classes: int) -> np.ndarray:
    """ART labels (N, K) float32 that also carry the targets: ``e_y - e_t`` (``e_y`` without
    targets). ART's APGD reads the true class as the argmax and hands the rows on unchanged."""
    encoded = F.one_hot(labels.cpu(), classes).float()
    if targets is not None:
        encoded = encoded - F.one_hot(targets.cpu(), classes).float()
    return encoded.numpy()


def decode_cost(kind: str, y, device: torch.device) -> LogitCost:
    """The cost ``kind`` for ART labels ``y``: class indices (N,), or rows of
    ``encode_labels`` (N, K) whose argmax is the true class and argmin the target."""
    rows = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y, device=device)
    if rows.dim() == 1:
        return LogitCost(kind, rows.long())
    targeted = kind in ("dlr-targeted", "logit-difference")
    return LogitCost(kind, rows.argmax(1), rows.argmin(1) if targeted else None)


def attack_classifier(
    net: nn.Module,
    gradient: InputGradient,
    cost_kind: str,
    input_shape: Sequence[int],
    classes: int,
    device: torch.device,
):
    """``net`` (pixels -> logits) as an ART ``PyTorchClassifier`` whose loss is the cost
    ``cost_kind`` and whose input gradient is ``gradient`` for that cost: every ART attack
    given it (PGD, APGD with ``loss_type=None``) follows that gradient. ``predict`` is
    ``net``'s forward pass, run without a graph."""
    from art.estimators.classification import PyTorchClassifier

    class CostClassifier(PyTorchClassifier):
        def _pixels(self, x) -> Tensor:
            return torch.as_tensor(x, dtype=torch.float32, device=device)

        def loss_gradient(self, x, y, training_mode: bool = False, **kwargs):
            grad = gradient(self._pixels(x), decode_cost(cost_kind, y, device))
            return grad.cpu().numpy() if isinstance(x, np.ndarray) else grad.to(x.device)

        def compute_loss(self, x, y, reduction: str = "none", **kwargs):
            with torch.no_grad():
                losses = decode_cost(cost_kind, y, device).value(net(self._pixels(x)))
            losses = {"mean": losses.mean(), "sum": losses.sum()}.get(reduction, losses)
            return losses.cpu().numpy() if isinstance(x, np.ndarray) else losses

    return art_wrapped(CostClassifier, net, input_shape, classes, device)


def art_wrapped(
    classifier_class: type, net: nn.Module, input_shape: Sequence[int], classes: int, device
):
    """An instance of ``classifier_class`` (an ART ``PyTorchClassifier`` subclass) over ``net``,
    for images of ``input_shape`` (C, H, W) with pixels in [0, 1] and ``classes`` classes. The
    loss given to ART is a placeholder: the subclass's ``loss_gradient`` and ``compute_loss``
    stand in for it."""
    return classifier_class(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
