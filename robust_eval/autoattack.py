"""AutoAttack's standard version and the adaptive-attack checks, on a pixel classifier.

Built on ``robust_eval/attacks.py`` (the costs on the logits, the input gradients, the ART
classifier of one cost):

* AutoAttack (Croce & Hein 2020, ``autoattack``): APGD-CE, APGD-T (targeted DLR over the top
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

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from robust_eval.attacks import InputGradient, LogitCost, attack_classifier, encode_labels

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


def available_components() -> tuple[str, ...]:
    """The components of ``COMPONENTS`` that can be had here, in AutoAttack's order."""
    return tuple(name for name in COMPONENTS if name != "fab-t" or fab_available())


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
    random.seed(setting.seed)  # ART's L2 Square draws from Python's generator too
    np.random.seed(setting.seed)
    torch.manual_seed(setting.seed)
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
