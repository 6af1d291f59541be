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
* AutoAttack's standard version (``autoattack``): APGD-CE, APGD-T (targeted DLR over the top
  classes) and Square from ART, FAB-T from ``pyautoattack`` when it is installed, each with its
  budget (``AutoAttackBudget``). An image is robust only if no component fooled it; the
  per-image, per-component table and the adversarial images come back (``AutoAttackResult``),
  one ``ComponentResult`` per component so that an interrupted run resumes per component.
* Adaptive-attack checks (Carlini et al. 2019) as pure functions of accuracies: convergence in
  steps and restarts (``convergence_runs``, ``convergence_check``), the unbounded attack
  (``unbounded_check``), white-box against Square (``blackbox_check``), and the results line
  (``checks_line``); ``pgd`` runs the attacks they compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def output_nudge(cost: LogitCost, last_state: Tensor, readout: nn.Linear | None) -> Tensor:
    """``-dA/ds_L`` (shaped like ``last_state``), the direction an EP nudged phase adds (times
    ``beta``) to the output layer's drive: with a readout ``z = W s_L + b`` it is
    ``-(dA/dz) W``, else (the output units are the logits) ``-dA/dz``."""
    if readout is None:
        return -cost.logit_gradient(last_state)
    logits = F.linear(last_state.flatten(1), readout.weight, readout.bias)
    return -(cost.logit_gradient(logits) @ readout.weight).view_as(last_state)


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
    are unchanged. A compiled phase runner is set aside, as it holds the original activation."""
    activation = straight_through(model.sigma, _clamp_slope(model))
    lca = getattr(model, "lca", None)
    runner = getattr(model, "phase_runner", None)
    replaced = _swap_activation(model, activation)
    transfer = lca.transfer_func if lca is not None else None
    try:
        if lca is not None:
            lca.transfer_func = _straight_through_transfer(lca)
        if runner is not None:
            model.phase_runner = None
        yield
    finally:
        _swap_activation(model, replaced)
        if lca is not None:
            lca.transfer_func = transfer
        if runner is not None:
            model.phase_runner = runner


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

    return CostClassifier(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


# --------------------------------------------------------------------------------------------
# AutoAttack's components
# --------------------------------------------------------------------------------------------

COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
NORMS = ("linf", "l2")
# why a component can be missing, printed with it
MISSING_REASONS = {"fab-t": "ART has no FAB and pyautoattack is not installed"}


@dataclass(frozen=True)
class AutoAttackBudget:
    """The budget of every component; the defaults are AutoAttack's standard version.

    iterations: of APGD-CE, APGD-T (per target) and FAB-T (per target);
    restarts: random restarts of every component (the first start included);
    targets: target classes of APGD-T and FAB-T, the highest clean logits after the top one;
    queries: Square's iterations (one query per image each);
    batch_size: images per attacked batch."""

    iterations: int = 100
    restarts: int = 1
    targets: int = 9
    queries: int = 5000
    batch_size: int = 100

    def __post_init__(self) -> None:
        for name in ("iterations", "restarts", "targets", "queries", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"the AutoAttack {name} must be at least 1")


@dataclass(frozen=True)
class AttackSetting:
    """What every component needs: the classifier ``net`` (pixels -> logits) and its
    ``gradient``, the threat model (``norm`` in ``NORMS``, radius ``eps``) and the budget."""

    net: nn.Module
    gradient: InputGradient
    norm: str
    eps: float
    budget: AutoAttackBudget
    classes: int
    seed: int = 0

    def classifier(self, cost_kind: str, input_shape: Sequence[int], device: torch.device):
        return attack_classifier(
            self.net, self.gradient, cost_kind, input_shape, self.classes, device
        )

    @property
    def art_norm(self):
        return np.inf if self.norm == "linf" else 2

    @property
    def target_count(self) -> int:
        return min(self.budget.targets, self.classes - 1)


def fab_available() -> bool:
    """Whether FAB-T can be had: ``pyautoattack`` (AutoAttack's own code) imports."""
    try:
        import pyautoattack.fab_pt  # noqa: F401
    except ImportError:
        return False
    return True


def batched_logits(net: nn.Module, pixels: Tensor, batch_size: int) -> Tensor:
    """``net``'s logits (N, K) of ``pixels``, evaluated from scratch without a graph."""
    with torch.no_grad():
        parts = [
            net(pixels[start : start + batch_size])
            for start in range(0, pixels.shape[0], batch_size)
        ]
    return torch.cat(parts)


def predicted(net: nn.Module, pixels: Tensor, batch_size: int) -> Tensor:
    """``argmax_k z_k`` (N,), evaluated from scratch."""
    return batched_logits(net, pixels, batch_size).argmax(1)


def _art_generate(attack, pixels: Tensor, labels_art: np.ndarray) -> Tensor:
    with np.errstate(divide="ignore", invalid="ignore"):  # ART's Square L2 on tiny windows
        adversarial = attack.generate(x=pixels.cpu().numpy(), y=labels_art)
    return torch.as_tensor(adversarial, dtype=torch.float32, device=pixels.device)


def _apgd(setting: AttackSetting, cost_kind: str, pixels: Tensor, labels_art: np.ndarray):
    """ART's APGD ascending the cost ``cost_kind`` along the setting's gradient."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    classifier = setting.classifier(cost_kind, pixels.shape[1:], pixels.device)
    attack = AutoProjectedGradientDescent(
        classifier,
        norm=setting.art_norm,
        eps=setting.eps,
        eps_step=2.0 * setting.eps,
        max_iter=setting.budget.iterations,
        targeted=False,
        nb_random_init=setting.budget.restarts,
        batch_size=setting.budget.batch_size,
        loss_type=None,
        verbose=False,
    )
    return _art_generate(attack, pixels, labels_art)


def apgd_ce(setting: AttackSetting, pixels: Tensor, labels: Tensor) -> Tensor:
    """APGD on the cross-entropy: candidates (N, C, H, W)."""
    return _apgd(setting, "ce", pixels, encode_labels(labels, None, setting.classes))


def apgd_t(setting: AttackSetting, pixels: Tensor, labels: Tensor) -> Tensor:
    """APGD-T: APGD on the targeted DLR towards each of the ``target_count`` classes with the
    highest clean logits after the top one, each run on the images not yet fooled."""
    clean_logits = batched_logits(setting.net, pixels, setting.budget.batch_size)
    ranks = clean_logits.argsort(1, descending=True)  # AutoAttack's order of targets
    candidates = pixels.clone()
    open_ = torch.ones(pixels.shape[0], dtype=torch.bool, device=pixels.device)
    for rank in range(1, setting.target_count + 1):
        if not open_.any():
            break
        targets = ranks[open_, rank]
        encoded = encode_labels(labels[open_], targets, setting.classes)
        found = _apgd(setting, "dlr-targeted", pixels[open_], encoded)
        fooled = predicted(setting.net, found, setting.budget.batch_size) != labels[open_]
        rows = open_.nonzero()[:, 0][fooled]
        candidates[rows] = found[fooled]
        open_[rows] = False
    return candidates


def fab_t(setting: AttackSetting, pixels: Tensor, labels: Tensor) -> Tensor:
    """FAB-T (``pyautoattack``'s FAB, targeted over ``target_count`` classes) whose
    linearisation of ``z_t - z_y`` takes its input gradient from the setting."""
    attack = _fab_attack(setting, pixels.device)
    parts = []
    size = setting.budget.batch_size
    for start in range(0, pixels.shape[0], size):
        parts.append(attack.perturb(pixels[start : start + size], labels[start : start + size]))
    return torch.cat(parts)


def _fab_attack(setting: AttackSetting, device: torch.device):
    """A ``pyautoattack`` FAB-T whose targeted step asks ``setting.gradient``."""
    from pyautoattack.fab_pt import FABAttack_PT

    def logits(pixels: Tensor) -> Tensor:
        with torch.no_grad():
            return setting.net(pixels)

    class GradientFAB(FABAttack_PT):
        def get_diff_logits_grads_batch_targeted(self, imgs, la, la_target):
            cost = LogitCost("logit-difference", la, la_target)
            difference = cost.value(logits(imgs))
            return difference[:, None], setting.gradient(imgs, cost)[:, None]

    return GradientFAB(
        logits,
        norm="Linf" if setting.norm == "linf" else "L2",
        n_restarts=setting.budget.restarts,
        n_iter=setting.budget.iterations,
        eps=setting.eps,
        targeted=True,
        n_target_classes=setting.target_count,
        device=device,
        seed=setting.seed,
    )


def square(setting: AttackSetting, pixels: Tensor, labels: Tensor) -> Tensor:
    """ART's Square attack (margin loss, ``p_init`` 0.8) with ``queries`` iterations; it only
    queries the logits."""
    from art.attacks.evasion import SquareAttack

    classifier = setting.classifier("ce", pixels.shape[1:], pixels.device)
    attack = SquareAttack(
        classifier,
        norm=setting.art_norm,
        max_iter=setting.budget.queries,
        eps=setting.eps,
        p_init=0.8,
        nb_restarts=setting.budget.restarts,
        batch_size=setting.budget.batch_size,
        verbose=False,
    )
    return _art_generate(attack, pixels, encode_labels(labels, None, setting.classes))


COMPONENT_ATTACKS: dict[str, Callable[[AttackSetting, Tensor, Tensor], Tensor]] = {
    "apgd-ce": apgd_ce,
    "apgd-t": apgd_t,
    "fab-t": fab_t,
    "square": square,
}


# --------------------------------------------------------------------------------------------
# The worst case per image
# --------------------------------------------------------------------------------------------


def project(candidates: Tensor, clean: Tensor, norm: str, eps: float) -> Tensor:
    """``candidates`` (N, C, H, W) moved into the ``norm`` ball of radius ``eps`` around
    ``clean`` and into [0, 1]: ``clean + delta`` with ``delta`` clipped to ``[-eps, eps]``
    (L-inf) or scaled by ``min(1, eps / ||delta||_2)`` (L2), then clamped to [0, 1] (which
    only moves pixels towards ``clean``, itself in [0, 1])."""
    delta = candidates - clean
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        lengths = delta.flatten(1).norm(dim=1)
        safe = lengths.clamp_min(torch.finfo(lengths.dtype).tiny)
        factors = torch.where(lengths > eps, eps / safe, torch.ones_like(lengths))
        delta = delta * factors.view(-1, *([1] * (delta.dim() - 1)))
    return (clean + delta).clamp(0.0, 1.0)


@dataclass
class ComponentResult:
    """One component's outcome on N images.

    robust: (N,) bool, classified correctly after the attack (False where the clean image is
        already misclassified);
    adversarial: (N, C, H, W), the kept adversarial image where the attack fooled the model,
        else the clean image; every kept image lies in the ball and in [0, 1];
    seconds: the time it took."""

    name: str
    robust: Tensor
    adversarial: Tensor
    seconds: float

    def state(self) -> dict:
        """Tensors and numbers only (``torch.load(..., weights_only=True)`` reads it)."""
        return {
            "name": self.name,
            "robust": self.robust.cpu(),
            "adversarial": self.adversarial.cpu(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: Mapping) -> ComponentResult:
        return cls(state["name"], state["robust"], state["adversarial"], float(state["seconds"]))


@dataclass
class AutoAttackResult:
    """AutoAttack on N images: ``clean`` (N,) bool (classified correctly), one
    ``ComponentResult`` per component run, and ``missing``, the components that could not be
    had (``"fab-t"`` without ``pyautoattack``)."""

    norm: str
    eps: float
    gradient: str
    clean: Tensor
    components: dict[str, ComponentResult]
    missing: tuple[str, ...] = field(default_factory=tuple)

    def table(self) -> Tensor:
        """(N, components) bool: image ``i`` survives component ``j`` (columns in run order)."""
        columns = [result.robust for result in self.components.values()]
        return torch.stack(columns, 1) if columns else self.clean.new_ones((len(self.clean), 0))

    def robust(self) -> Tensor:
        """(N,) bool, the worst case: classified correctly and fooled by no component."""
        return self.clean & self.table().all(1)

    def adversarial(self) -> Tensor:
        """(N, C, H, W): per image, the adversarial of the first component that fooled it, else
        the clean image."""
        chosen = None
        for result in reversed(list(self.components.values())):
            fooled = (~result.robust).view(-1, *([1] * (result.adversarial.dim() - 1)))
            chosen = (
                result.adversarial
                if chosen is None
                else torch.where(fooled, result.adversarial, chosen)
            )
        return chosen

    @property
    def clean_accuracy(self) -> float:
        return _fraction(self.clean)

    @property
    def robust_accuracy(self) -> float:
        return _fraction(self.robust())

    def component_accuracies(self) -> dict[str, float]:
        """Each component's own robust accuracy (each attacks every clean-correct image)."""
        return {name: _fraction(r.robust) for name, r in self.components.items()}

    def summary_line(self) -> str:
        """RobustBench's way: clean, robust, epsilon, norm, images; then each component and
        the missing ones."""
        norm = "Linf" if self.norm == "linf" else "L2"
        parts = ", ".join(f"{name} {acc:.2%}" for name, acc in self.component_accuracies().items())
        missing = ", ".join(f"{name} ({MISSING_REASONS[name]})" for name in self.missing) or "none"
        return (
            f"AutoAttack {norm} eps {self.eps:.4g} ({self.gradient} gradients), "
            f"{self.clean.numel()} images: clean accuracy {self.clean_accuracy:.2%}, robust "
            f"accuracy {self.robust_accuracy:.2%} ({parts}); missing components: {missing}"
        )


def _fraction(mask: Tensor) -> float:
    """The count of True over the count, as a Python float (no float32 rounding)."""
    return int(mask.sum()) / mask.numel()


def autoattack(
    net: nn.Module,
    gradient: InputGradient,
    pixels: Tensor,
    labels: Tensor,
    norm: str,
    eps: float,
    budget: AutoAttackBudget = AutoAttackBudget(),
    gradient_name: str = "bptt",
    components: Sequence[str] = COMPONENTS,
    done: Mapping[str, ComponentResult] | None = None,
    on_component: Callable[[ComponentResult], None] | None = None,
    seed: int = 0,
) -> AutoAttackResult:
    """AutoAttack on ``pixels`` (N, C, H, W) in [0, 1] with ``labels`` (N,) at ``eps``.

    Every component in ``components`` attacks every clean-correct image, seeded with ``seed``;
    its candidates are projected (``project``) and evaluated again from scratch, and an image
    counts as fooled by it only if that projected image is misclassified. Components found in
    ``done`` (of an interrupted run on the same images) are reused, and every new one is
    handed to ``on_component`` (to be saved) as soon as it ends. FAB-T is listed in
    ``missing`` and skipped when ``pyautoattack`` does not import."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    unknown = [name for name in components if name not in COMPONENT_ATTACKS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; choose from {COMPONENTS}")
    done = done or {}
    missing = tuple(n for n in components if n == "fab-t" and n not in done and not fab_available())
    classes = batched_logits(net, pixels[:1], 1).shape[1]
    setting = AttackSetting(net, gradient, norm, eps, budget, classes, seed)
    clean = predicted(net, pixels, budget.batch_size) == labels
    results = {}
    for name in components:
        if name in missing:
            continue
        if name in done:
            results[name] = _checked_resume(done[name], pixels)
            continue
        results[name] = run_component(setting, name, pixels, labels, clean)
        if on_component is not None:
            on_component(results[name])
    return AutoAttackResult(norm, eps, gradient_name, clean, results, missing)


def run_component(
    setting: AttackSetting, name: str, pixels: Tensor, labels: Tensor, clean: Tensor
) -> ComponentResult:
    """Component ``name`` on the clean-correct images (at ``eps = 0``, where ART refuses to
    run, the candidates are the clean images), kept as ``project`` and re-evaluated."""
    started = time.perf_counter()
    torch.manual_seed(setting.seed)
    np.random.seed(setting.seed)
    candidates = pixels.clone()
    if setting.eps > 0.0 and clean.any():
        attack = COMPONENT_ATTACKS[name]
        candidates[clean] = attack(setting, pixels[clean], labels[clean])
    kept = project(candidates, pixels, setting.norm, setting.eps)
    robust = clean & (predicted(setting.net, kept, setting.budget.batch_size) == labels)
    fooled = (clean & ~robust).view(-1, *([1] * (pixels.dim() - 1)))
    adversarial = torch.where(fooled, kept, pixels)
    return ComponentResult(name, robust, adversarial, time.perf_counter() - started)


def _checked_resume(result: ComponentResult, pixels: Tensor) -> ComponentResult:
    if result.adversarial.shape != pixels.shape or result.robust.shape != pixels.shape[:1]:
        raise ValueError(
            f"the saved {result.name} results are for {result.adversarial.shape[0]} images of "
            f"{tuple(result.adversarial.shape[1:])}, not these {pixels.shape[0]}: delete them"
        )
    device = pixels.device
    return ComponentResult(
        result.name, result.robust.to(device), result.adversarial.to(device), result.seconds
    )


# --------------------------------------------------------------------------------------------
# Adaptive-attack checks
# --------------------------------------------------------------------------------------------


def pgd(
    net: nn.Module,
    gradient: InputGradient,
    pixels: Tensor,
    labels: Tensor,
    norm: str,
    eps: float,
    steps: int,
    restarts: int = 1,
    batch_size: int = 100,
) -> Tensor:
    """ART's PGD on the cross-entropy along ``gradient`` (step ``2.5 eps / steps``, ``restarts``
    random starts; per image ART keeps a start that fools the model): adversarial images
    (N, C, H, W), kept as ``project``. The convergence and unbounded checks run it."""
    from art.attacks.evasion import ProjectedGradientDescent

    if eps == 0.0:
        return pixels.clone()
    classes = batched_logits(net, pixels[:1], 1).shape[1]
    classifier = attack_classifier(net, gradient, "ce", pixels.shape[1:], classes, pixels.device)
    attack = ProjectedGradientDescent(
        classifier,
        norm=np.inf if norm == "linf" else 2,
        eps=eps,
        eps_step=2.5 * eps / steps,
        max_iter=steps,
        num_random_init=restarts,
        batch_size=batch_size,
        verbose=False,
    )
    found = _art_generate(attack, pixels, encode_labels(labels, None, classes))
    return project(found, pixels, norm, eps)


CONVERGENCE_TOLERANCE = 0.01  # one point of accuracy
UNBOUNDED_EPS = 1.0  # L-inf, the whole pixel range
UNBOUNDED_LIMIT = 0.01
SLACK = 1e-9  # accuracies are fractions of counts: compare them without rounding noise


@dataclass(frozen=True)
class CheckResult:
    """An adaptive-attack check: its ``name``, whether it ``passed``, and what it saw."""

    name: str
    passed: bool
    detail: str


def convergence_runs(steps: int) -> dict[str, tuple[int, int]]:
    """The PGD runs of the convergence check, label -> (steps, restarts)."""
    return {
        "base": (steps, 1),
        "2x steps": (2 * steps, 1),
        "4x steps": (4 * steps, 1),
        "5 restarts": (steps, 5),
    }


def convergence_check(
    accuracies: Mapping[str, float], tolerance: float = CONVERGENCE_TOLERANCE
) -> CheckResult:
    """Passed when no longer run (``convergence_runs`` labels) lowers the ``base`` PGD
    accuracy by more than ``tolerance``."""
    base = accuracies["base"]
    drops = {label: base - acc for label, acc in accuracies.items() if label != "base"}
    failed = [
        f"{label} {accuracies[label]:.3f} < {base:.3f}"
        for label, drop in drops.items()
        if drop > tolerance + SLACK
    ]
    seen = ", ".join(f"{label} {acc:.3f}" for label, acc in accuracies.items())
    return CheckResult("convergence", not failed, "; ".join(failed) or seen)


def unbounded_check(accuracy: float, limit: float = UNBOUNDED_LIMIT) -> CheckResult:
    """Passed when PGD at L-inf ``UNBOUNDED_EPS`` leaves at most ``limit`` accuracy."""
    passed = accuracy <= limit + SLACK
    return CheckResult("unbounded", passed, f"PGD at L-inf eps 1 leaves {accuracy:.3f}")


def blackbox_check(pairs: Sequence[tuple[str, float, float]]) -> CheckResult:
    """Passed when every white-box attack does at least as well as Square at the same norm and
    epsilon; ``pairs`` holds (label, white-box accuracy, Square accuracy)."""
    failed = [
        f"{label}: {white:.3f} > square {black:.3f}"
        for label, white, black in pairs
        if white > black + SLACK
    ]
    detail = "; ".join(failed) or f"{len(pairs)} white-box results at most Square's"
    return CheckResult("white-box vs square", not failed, detail)


def checks_line(results: Sequence[CheckResult]) -> str:
    """``adaptive checks: passed: ...; gradient masking suspected: name (what it saw); ...``"""
    passed = [result.name for result in results if result.passed]
    failed = [f"{result.name} ({result.detail})" for result in results if not result.passed]
    line = f"adaptive checks: passed: {', '.join(passed) or 'none'}"
    if failed:
        line += f"; gradient masking suspected: {'; '.join(failed)}"
    return line
