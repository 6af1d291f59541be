"""robust_eval/attacks.py and robust_eval/autoattack.py: the attack costs against hand-worked values
and autograd, AutoAttack's per-image worst case checked image by image from scratch, every white-box
component really following the classifier's own input gradient, the straight-through gradient
against backpropagation and a hand-worked clamped network, and the adaptive checks' verdicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lca import LCAConv2D, soft_threshold
from robust_eval import attacks, autoattack
from robust_eval.attacks import LogitCost
from robust_eval.autoattack import AutoAttackBudget
from utils_ep_fast import P_MLP, my_hard_sig

BUDGET = AutoAttackBudget(iterations=10, restarts=1, targets=3, queries=40, batch_size=64)
N_IMAGES = 48
FLOAT32_SLACK = 1e-6  # clean + delta rounded to float32


@pytest.fixture(scope="module")
def digits():
    """A logistic regression on the 8x8 digits (float32), and 48 held-out images in [0, 1]."""
    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(pixels[:1500]), labels[:1500]).backward()
        optimizer.step()
    model.requires_grad_(False)
    return model.eval(), pixels[1500 : 1500 + N_IMAGES], labels[1500 : 1500 + N_IMAGES]


def autograd_gradient(model: nn.Module):
    """The reference input gradient: autograd of ``sum_b A(z_b)`` through ``model``."""

    def gradient(pixels, cost):
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(cost.value(model(pixels)).sum(), pixels)[0]

    return gradient


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


# ---- costs ---------------------------------------------------------------------------------


HAND_LOGITS = torch.tensor([[1.0, 4.0, 2.0, 3.0], [5.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 0])
HAND_TARGETS = torch.tensor([2, 3])


def test_dlr_losses_match_hand_worked_values():
    # row 0: sorted 4, 3, 2, 1; best other 4: -(1 - 4) / (4 - 2); targeted: -(1 - 2) / (4 - 1.5)
    # row 1: sorted 5, 3, 2, 1; best other 3: -(5 - 3) / (5 - 2); targeted: -(5 - 2) / (5 - 1.5)
    dlr = attacks.dlr_loss(HAND_LOGITS, HAND_LABELS)
    targeted = attacks.targeted_dlr_loss(HAND_LOGITS, HAND_LABELS, HAND_TARGETS)
    assert dlr.tolist() == pytest.approx([1.5, -2.0 / 3.0], abs=1e-10)
    assert targeted.tolist() == pytest.approx([0.4, -3.0 / 3.5], abs=1e-10)
    ce = attacks.cross_entropy(HAND_LOGITS, HAND_LABELS)
    expected_ce = [math.log(sum(math.exp(v) for v in row)) - row[0] for row in HAND_LOGITS.tolist()]
    assert ce.tolist() == pytest.approx(expected_ce, abs=1e-10)
    difference = LogitCost("logit-difference", HAND_LABELS, HAND_TARGETS).value(HAND_LOGITS)
    assert difference.tolist() == [1.0, -3.0]


@pytest.mark.parametrize("kind", attacks.COST_KINDS)
def test_closed_form_logit_gradients_match_autograd(kind):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 10, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    targets = (labels + torch.randint(1, 10, (16,), generator=generator)) % 10
    targeted = kind in ("dlr-targeted", "logit-difference")
    cost = LogitCost(kind, labels, targets if targeted else None)
    leaf = logits.clone().requires_grad_(True)
    expected = torch.autograd.grad(cost.value(leaf).sum(), leaf)[0]
    assert torch.allclose(cost.logit_gradient(logits), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("with_readout", [True, False])
def test_output_nudge_is_minus_the_cost_gradient_wrt_the_output_layer(with_readout):
    torch.manual_seed(2)
    state = torch.randn(5, 6 if with_readout else 10, dtype=torch.float64)
    readout = nn.Linear(6, 10).double() if with_readout else None
    cost = LogitCost("dlr", torch.tensor([0, 3, 9, 2, 2]))
    leaf = state.clone().requires_grad_(True)
    logits = readout(leaf) if with_readout else leaf
    expected = -torch.autograd.grad(cost.value(logits).sum(), leaf)[0]
    assert torch.allclose(attacks.output_nudge(cost, state, readout), expected, atol=1e-10)


def test_backprop_gradient_matches_autograd_in_chunks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5)).double()
    pixels = torch.rand(9, 3, 2, 2, dtype=torch.float64)
    labels, targets = torch.randint(0, 5, (9,)), torch.randint(0, 5, (9,))
    cost = LogitCost("dlr-targeted", labels, (labels + 1 + targets % 4) % 5)
    found = attacks.backprop_gradient(model, chunk=4)(pixels, cost)
    assert torch.allclose(found, autograd_gradient(model)(pixels, cost), atol=1e-10, rtol=0)


def test_default_epsilons_follow_the_benchmark():
    assert attacks.default_epsilons("CIFAR10") == (8 / 255, 0.5)
    assert attacks.default_epsilons("SVHN") == (8 / 255, 0.5)
    assert attacks.default_epsilons("DIGITS") == (0.3, 2.0)
    assert attacks.default_epsilons("FashionMNIST") == (0.1, 1.5)
    with pytest.raises(ValueError, match="--eps"):
        attacks.default_epsilons("ImageNet")


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


def test_the_art_classifier_loss_is_the_attack_cost(digits):
    model, pixels, labels = digits
    targets = (labels + 1) % 10
    classifier = attacks.attack_classifier(
        model, autograd_gradient(model), "dlr-targeted", (1, 8, 8), 10, torch.device("cpu")
    )
    encoded = attacks.encode_labels(labels, targets, 10)
    losses = classifier.compute_loss(pixels.numpy(), encoded, reduction="none")
    expected = attacks.targeted_dlr_loss(model(pixels), labels, targets)
    assert torch.allclose(torch.as_tensor(losses), expected, atol=1e-6)


# ---- straight-through ----------------------------------------------------------------------


def test_straight_through_equals_autograd_inside_the_linear_range():
    x = torch.linspace(0.01, 1.99, 50, dtype=torch.float64).requires_grad_(True)
    wrapped = attacks.straight_through(my_hard_sig, 0.5)
    assert wrapped.on_linear_part(x.detach()).all()
    weights = torch.arange(50, dtype=torch.float64)
    found = torch.autograd.grad((weights * wrapped(x)).sum(), x)[0]
    expected = torch.autograd.grad((weights * my_hard_sig(x)).sum(), x)[0]
    assert torch.equal(wrapped(x), my_hard_sig(x)) and torch.equal(found, expected)


def test_straight_through_on_a_hand_worked_clamped_case():
    # y = 3 * my_hard_sig(2 x) at x = 2: 2x = 4 is clamped, y = 3 * 1; backprop gives 0,
    # straight-through 3 * 0.5 * 2 = 3
    x = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    wrapped = attacks.straight_through(my_hard_sig, 0.5)
    y = 3.0 * wrapped(2.0 * x)
    assert y.item() == 3.0 and not wrapped.on_linear_part(2.0 * x.detach())
    assert torch.autograd.grad(y, x)[0].item() == 3.0
    assert torch.autograd.grad(3.0 * my_hard_sig(2.0 * x), x)[0].item() == 0.0


def _mlp(bias: float) -> P_MLP:
    torch.manual_seed(4)
    model = P_MLP([6, 5, 4], activation="my_hard_sig").double()
    with torch.no_grad():
        for synapse in model.synapses:
            synapse.weight.mul_(0.1)
            synapse.bias.fill_(bias)
    return model


def _bptt_gradient(model: P_MLP, x, y, T: int):
    x = x.clone().requires_grad_(True)
    final = model(x, y, model.init_neurons(x), T, track_grad=True)
    return torch.autograd.grad(model.loss(final, y).sum(), x)[0]


def test_bpda_equals_backprop_on_a_network_with_no_unit_clamped():
    model = _mlp(bias=1.0)  # drives near 1, inside my_hard_sig's linear range (0, 2)
    x, y = torch.rand(3, 6, dtype=torch.float64), torch.tensor([0, 2, 3])
    drives = []
    original = model.sigma
    model.sigma = lambda u: (drives.append(u.detach()), original(u))[1]
    expected = _bptt_gradient(model, x, y, T=6)
    with attacks.straight_through_activations(model):
        found = _bptt_gradient(model, x, y, T=6)
    assert all(((d > 0) & (d < 2)).all() for d in drives)
    assert torch.equal(found, expected) and expected.abs().max() > 0


def test_bpda_on_a_clamped_network_is_the_hand_worked_straight_through_value():
    # biases 3: every unit clamped at 1, so backprop gives 0. Two sync steps from zero:
    # s1 = sigma(W0 x + b0), s2 = sigma(W1 s1 + b1); L = 0.5 ||s2 - e_y||^2, and the
    # straight-through gradient is c^2 W0^T W1^T (s2 - e_y) with c = 1/2.
    model = _mlp(bias=3.0)
    x, y = torch.rand(3, 6, dtype=torch.float64), torch.tensor([0, 2, 3])
    assert _bptt_gradient(model, x, y, T=2).abs().max() == 0.0
    with attacks.straight_through_activations(model):
        found = _bptt_gradient(model, x, y, T=2)
    assert model.sigma is not None and not isinstance(model.sigma, attacks.StraightThrough)
    w0, w1 = model.synapses[0].weight, model.synapses[1].weight
    error = torch.ones(3, 4, dtype=torch.float64) - F.one_hot(y, 4).double()
    assert torch.allclose(found, 0.25 * error @ w1 @ w0, atol=1e-12, rtol=0)


class _FrontEnd(nn.Module):
    """An engine network's attributes the swap touches: a clamp and an LCA layer."""

    activation = "my_hard_sig"

    def __init__(self) -> None:
        super().__init__()
        self.sigma = my_hard_sig
        self.lca = LCAConv2D(out_neurons=3, in_neurons=1, kernel_size=3, lambda_=0.3)


def test_lca_thresholding_passes_through_with_slope_one():
    front = _FrontEnd()
    u = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64).requires_grad_(True)
    with attacks.straight_through_activations(front):
        value = front.lca.transfer(u)
        gradient = torch.autograd.grad(value.sum(), u)[0]
    assert torch.equal(value, soft_threshold(u, 0.3))
    assert torch.equal(gradient, torch.ones_like(u))
    assert front.lca.transfer_func == "soft_threshold" and front.sigma is my_hard_sig


def test_bpda_refuses_a_smooth_activation():
    with pytest.raises(ValueError, match="clamp activation"):
        with attacks.straight_through_activations(P_MLP([3, 2], activation="tanh")):
            pass


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
