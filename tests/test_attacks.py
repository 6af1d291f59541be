"""robust_eval/attacks.py: the attack costs against hand-worked values and autograd, the ART
classifier's loss, and the straight-through gradient against backpropagation and a hand-worked
clamped network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import autograd_gradient, digits_classifier
from torch import nn

from lca import LCAConv2D, soft_threshold
from learning.losses import make_loss
from robust_eval import attacks
from robust_eval.attacks import LogitCost
from utils_ep_fast import P_MLP, my_hard_sig

N_IMAGES = 48


@pytest.fixture(scope="module")
def digits():
    """A logistic regression on the 8x8 digits (float32), and 48 held-out images in [0, 1]."""
    return digits_classifier(N_IMAGES)


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
    criterion = make_loss("cel", 10, readout)
    cost = LogitCost("dlr", torch.tensor([0, 3, 9, 2, 2]))
    leaf = state.clone().requires_grad_(True)
    logits = readout(leaf) if with_readout else leaf
    expected = -torch.autograd.grad(cost.value(logits).sum(), leaf)[0]
    assert torch.allclose(attacks.output_nudge(cost, state, criterion), expected, atol=1e-10)


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
