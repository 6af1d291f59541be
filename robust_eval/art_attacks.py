"""The ART attacks (PGD, APGD-CE, Square) on a ``PixelClassifier``, and their budget.

``art_classifier`` wraps the classifier for ART with the model's own loss and input gradient;
``make_attack`` builds the attack of a name at an epsilon; ``attack_images`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from robust_eval import attacks
from robust_eval.pixel_classifier import PixelClassifier


@dataclass(frozen=True)
class AttackBudget:
    """What an attack may spend: ``batch_size`` images at a time, ``steps`` iterations of PGD
    and APGD, ``queries`` iterations of the Square attack, ``restarts`` random starts of each."""

    batch_size: int
    steps: int
    queries: int
    restarts: int = 1


def art_classifier(net: PixelClassifier, gradient: str, input_shape, classes: int, device):
    """``net`` as an ART ``PyTorchClassifier`` whose loss and input gradient are the model's
    own: ``loss_gradient`` is ``net.input_gradient(.., gradient)`` (``bptt``, ``bpda`` or
    ``ep``), and
    ``compute_loss`` the model's loss at the free state."""
    from art.estimators.classification import PyTorchClassifier

    class EnergyClassifier(PyTorchClassifier):
        def _labels(self, y) -> Tensor:
            labels = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y)
            labels = labels.argmax(1) if labels.dim() == 2 else labels
            return labels.to(device=device, dtype=torch.long)

        def loss_gradient(self, x, y, training_mode: bool = False, **kwargs):
            pixels = torch.as_tensor(x, dtype=torch.float32, device=device)
            grad = net.input_gradient(pixels, self._labels(y), gradient)
            return grad.cpu().numpy() if isinstance(x, np.ndarray) else grad.to(x.device)

        def compute_loss(self, x, y, reduction: str = "none", **kwargs):
            pixels = torch.as_tensor(x, dtype=torch.float32, device=device)
            losses = net.losses(pixels, self._labels(y))
            losses = {"mean": losses.mean(), "sum": losses.sum()}.get(reduction, losses)
            return losses.cpu().numpy() if isinstance(x, np.ndarray) else losses

    return attacks.art_wrapped(EnergyClassifier, net, input_shape, classes, device)


def make_attack(name: str, classifier, eps: float, budget: AttackBudget):
    """The ART attack ``name`` (``pgd-linf`` ... ``square-l2``) at ``eps``: PGD with step
    ``2.5 eps / steps`` and a random start, APGD-CE (the model's loss) with ``budget.steps``
    iterations, Square with ``budget.queries`` iterations."""
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        ProjectedGradientDescent,
        SquareAttack,
    )

    kind, norm_name = name.split("-")
    norm = np.inf if norm_name == "linf" else 2
    common = {"norm": norm, "eps": eps, "batch_size": budget.batch_size, "verbose": False}
    # ART wants a positive step even at eps = 0, where the projection undoes any step
    tiny = 1e-12
    if kind == "pgd":
        return ProjectedGradientDescent(
            classifier, eps_step=max(2.5 * eps / budget.steps, tiny), max_iter=budget.steps,
            num_random_init=budget.restarts, **common,
        )  # fmt: skip
    if kind == "apgd":
        return AutoProjectedGradientDescent(
            classifier, eps_step=max(2.0 * eps, tiny), max_iter=budget.steps,
            nb_random_init=budget.restarts, loss_type=None, **common,
        )  # fmt: skip
    return SquareAttack(classifier, max_iter=budget.queries, nb_restarts=budget.restarts, **common)


def attack_images(
    name: str, classifier, eps: float, budget: AttackBudget, pixels: Tensor, labels: Tensor
) -> Tensor:
    """Adversarial versions of ``pixels`` (N, C, H, W) by the attack ``name`` at ``eps``. ART's
    APGD and Square refuse a zero radius: there the images come back unchanged."""
    if eps == 0.0 and not name.startswith("pgd"):
        return pixels
    with np.errstate(divide="ignore", invalid="ignore"):  # ART's Square L2 on tiny windows
        adversarial = make_attack(name, classifier, eps, budget).generate(
            x=pixels.cpu().numpy(), y=labels.cpu().numpy()
        )
    return torch.as_tensor(adversarial, dtype=torch.float32, device=pixels.device)
