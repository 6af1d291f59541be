"""robust_eval/autoattack.py: AutoAttack's per-image worst case checked image by image from
scratch, resumes and missing components, every white-box component really following the
classifier's own input gradient, and the adaptive checks' verdicts."""

from __future__ import annotations

import pytest
import torch
from helpers import autograd_gradient, digits_classifier
from torch import nn

from robust_eval import autoattack
from robust_eval.autoattack import AutoAttackBudget

BUDGET = AutoAttackBudget(iterations=10, restarts=1, targets=3, queries=40, batch_size=64)
N_IMAGES = 48
FLOAT32_SLACK = 1e-6  # clean + delta rounded to float32


@pytest.fixture(scope="module")
def digits():
    """A logistic regression on the 8x8 digits (float32), and 48 held-out images in [0, 1]."""
    return digits_classifier(N_IMAGES)


def attack_digits(digits, norm: str, eps: float, gradient=None, **options):
    """``autoattack.autoattack`` on the digits fixture with the test budget (autograd gradients
    unless ``gradient`` is given)."""
    model, pixels, labels = digits
    gradient = gradient or autograd_gradient(model)
    return autoattack.autoattack(model, gradient, pixels, labels, norm, eps, BUDGET, **options)


class RecordingGradient:
    """The autograd gradient times ``sign``, recording the cost kind of every call."""

    def __init__(self, model: nn.Module, sign: float = 1.0) -> None:
        self.reference, self.sign, self.kinds = autograd_gradient(model), sign, []

    def __call__(self, pixels, cost):
        self.kinds.append(cost.kind)
        return self.sign * self.reference(pixels, cost)


# ---- AutoAttack ----------------------------------------------------------------------------


def test_at_epsilon_zero_every_component_leaves_the_clean_accuracy(digits):
    model, pixels, labels = digits
    clean = int((model(pixels).argmax(1) == labels).sum()) / N_IMAGES
    for norm in autoattack.NORMS:
        result = attack_digits(digits, norm, 0.0)
        assert result.robust_accuracy == clean
        assert set(result.component_accuracies().values()) == {clean}
        assert torch.equal(result.adversarial(), pixels)
    zero_pgd = autoattack.pgd(model, autograd_gradient(model), pixels, labels, "linf", 0.0, 5)
    assert torch.equal(zero_pgd, pixels)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_kept_adversarials_are_valid_and_the_worst_case_is_the_table_count(digits, norm, eps):
    model, pixels, labels = digits
    result = attack_digits(digits, norm, eps)
    expected = [name for name in autoattack.COMPONENTS if name not in result.missing]
    assert list(result.components) == expected and len(expected) >= 3
    clean_correct = model(pixels).argmax(1) == labels
    worst_case = 0
    for i in range(N_IMAGES):
        survived_all = bool(clean_correct[i])
        for component in result.components.values():
            image = component.adversarial[i : i + 1]
            delta = (image - pixels[i : i + 1]).flatten()
            size = delta.abs().max() if norm == "linf" else delta.norm()
            assert size <= eps + FLOAT32_SLACK and image.min() >= 0.0 and image.max() <= 1.0
            correct_now = bool(model(image).argmax(1) == labels[i])
            assert bool(component.robust[i]) == (bool(clean_correct[i]) and correct_now)
            if clean_correct[i] and not correct_now:
                assert not torch.equal(image, pixels[i : i + 1])  # a kept adversarial
            survived_all = survived_all and correct_now
        worst_case += survived_all
    assert result.robust_accuracy == worst_case / N_IMAGES
    assert result.robust_accuracy < result.clean_accuracy  # the attacks did something
    kept = result.adversarial()
    fooled = clean_correct & ~result.robust()
    assert (model(kept[fooled]).argmax(1) != labels[fooled]).all()


def test_a_resumed_run_reuses_saved_components_and_gives_the_same_worst_case(digits, tmp_path):
    model = digits[0]
    saved = []
    first = attack_digits(digits, "linf", 0.1, components=("apgd-ce",), on_component=saved.append)
    torch.save(saved[0].state(), tmp_path / "apgd-ce.pt")
    loaded = autoattack.ComponentResult.from_state(
        torch.load(tmp_path / "apgd-ce.pt", weights_only=True)
    )
    recording = RecordingGradient(model)
    components = ("apgd-ce", "apgd-t")
    resumed = attack_digits(
        digits, "linf", 0.1, recording, components=components, done={"apgd-ce": loaded}
    )
    assert recording.kinds and "ce" not in recording.kinds  # only APGD-T ran
    assert torch.equal(resumed.components["apgd-ce"].robust, first.components["apgd-ce"].robust)
    fresh = attack_digits(digits, "linf", 0.1, components=components)
    assert torch.equal(resumed.robust(), fresh.robust())


def test_a_missing_component_is_named_in_the_result_and_the_summary(digits, monkeypatch):
    monkeypatch.setattr(autoattack, "fab_available", lambda: False)
    result = attack_digits(digits, "linf", 0.05, components=("fab-t", "square"))
    assert result.missing == ("fab-t",) and list(result.components) == ["square"]
    line = result.summary_line()
    assert "missing components: fab-t" in line and f"{N_IMAGES} images" in line
    assert f"clean accuracy {result.clean_accuracy:.2%}" in line


NEEDS_FAB = pytest.mark.skipif(not autoattack.fab_available(), reason="pyautoattack not installed")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("apgd-ce", "ce"), ("apgd-t", "dlr-targeted"),
     pytest.param("fab-t", "logit-difference", marks=NEEDS_FAB)],
)  # fmt: skip
def test_every_white_box_component_follows_the_given_gradient(digits, name, kind):
    model = digits[0]
    followed, reversed_ = RecordingGradient(model), RecordingGradient(model, sign=-1.0)
    accuracies = [
        attack_digits(digits, "linf", 0.08, gradient, components=(name,)).robust_accuracy
        for gradient in (followed, reversed_)
    ]
    assert followed.kinds and set(followed.kinds) == {kind}
    assert accuracies[0] < accuracies[1]  # ascending the attack's loss beats descending it


def test_square_never_asks_for_a_gradient(digits):
    model = digits[0]
    recording = RecordingGradient(model)
    result = attack_digits(digits, "linf", 0.08, recording, components=("square",))
    assert recording.kinds == [] and result.robust_accuracy < result.clean_accuracy


# ---- adaptive checks -----------------------------------------------------------------------


def test_convergence_check_allows_one_point():
    runs = autoattack.convergence_runs(10)
    assert runs == {
        "base": (10, 1),
        "2x steps": (20, 1),
        "4x steps": (40, 1),
        "5 restarts": (10, 5),
    }
    held = autoattack.convergence_check(
        {"base": 0.52, "2x steps": 0.51, "4x steps": 0.515, "5 restarts": 0.52}
    )
    assert held.passed
    dropped = autoattack.convergence_check(
        {"base": 0.52, "2x steps": 0.51, "4x steps": 0.49, "5 restarts": 0.52}
    )
    assert not dropped.passed and "4x steps" in dropped.detail and "2x" not in dropped.detail


def test_unbounded_and_blackbox_checks_and_the_results_line(digits):
    model, pixels, labels = digits
    adversarial = autoattack.pgd(
        model, autograd_gradient(model), pixels, labels, "linf", autoattack.UNBOUNDED_EPS, steps=5
    )
    accuracy = (model(adversarial).argmax(1) == labels).float().mean().item()
    unbounded = autoattack.unbounded_check(accuracy)
    assert unbounded.passed
    assert not autoattack.unbounded_check(0.02).passed and autoattack.unbounded_check(0.01).passed
    blackbox = autoattack.blackbox_check(
        [("pgd-linf bptt eps 0.1", 0.40, 0.35), ("pgd-linf ep eps 0.1", 0.30, 0.35)]
    )
    assert not blackbox.passed and "ep eps" not in blackbox.detail
    line = autoattack.checks_line([unbounded, blackbox])
    assert line.startswith("adaptive checks: passed: unbounded; gradient masking suspected: ")
    assert "white-box vs square (pgd-linf bptt eps 0.1: 0.400 > square 0.350)" in line
