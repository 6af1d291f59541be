"""The loss objects (learning/losses.py): each nudge is ``-beta dL/ds_out`` by autograd of the
loss in float64, each loss and prediction agrees with a hand computation, the readout's parameter
gradients with autograd, the clamp zeroes the loss where it is defined, a model's output
layer takes the loss's update, and the loss of docs/extending.md does all this as written."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DIGITS_CNN, docs_example
from torch import nn

import main_fast
from graph import INPUT
from learning.losses import LOSSES, CrossEntropy, Loss, SoftmaxReadout, SquaredError, make_loss
from utils_ep_fast import P_MLP

BETA = 0.37


def readout() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(6, 4).double()


def case(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    state = torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    return state, torch.tensor([0, 3, 1, 3, 2])


LOSS_CASES = {
    "mse": (lambda: SquaredError(4), (4,)),
    "cel": (lambda: CrossEntropy(4), (4,)),
    "softmax": (lambda: SoftmaxReadout(4, readout()), (6,)),
    "softmax, a map": (lambda: SoftmaxReadout(4, readout()), (3, 1, 2)),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_the_nudge_is_minus_beta_times_autograd_of_the_loss(name):
    make, shape = LOSS_CASES[name]
    loss = make()
    state, y = case(shape)
    leaf = state.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss.value(leaf, y).sum(), leaf)
    torch.testing.assert_close(BETA * loss.nudge(state, y), -BETA * gradient, atol=1e-12, rtol=0)
    drive = torch.randn(state.shape, dtype=torch.float64)
    updated = loss.output_update(drive, state, y, BETA, torch.tanh)
    torch.testing.assert_close(updated, torch.tanh(drive - BETA * gradient), atol=1e-12, rtol=0)
    torch.testing.assert_close(loss.output_update(drive, state, y, 0.0, torch.tanh), drive.tanh())


def test_squared_error_by_hand():
    loss = SquaredError(3)
    state = torch.tensor([[0.5, 0.2, 0.9], [1.0, -1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    # 0.5 (0.25 + 0.04 + 0.01) = 0.15; 0.5 (0 + 1 + 0) = 0.5
    torch.testing.assert_close(loss.value(state, y), torch.tensor([0.15, 0.5], dtype=torch.float64))
    assert loss.predict(state).tolist() == [2, 0]
    clamped = loss.clamp(state, y)
    assert clamped.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert loss.value(clamped, y).tolist() == [0.0, 0.0]


def test_cross_entropy_by_hand():
    loss = CrossEntropy(3)
    state = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    want = [math.log(3.0), -2.0 + math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))]
    torch.testing.assert_close(loss.value(state, y), torch.tensor(want, dtype=torch.float64))
    assert loss.predict(state).tolist()[1] == 0
    assert loss.clamp(state, y) is None  # no finite state has zero cross-entropy
    assert loss.LINEAR_OUTPUT


def test_softmax_readout_by_hand():
    linear = nn.Linear(2, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        linear.bias.copy_(torch.tensor([0.0, -1.0]))
    loss = SoftmaxReadout(2, linear)
    state = torch.tensor([[1.0, 1.0], [3.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    # logits (1, 1) and (3, 0): CE = log 2, and log(e^3 + 1) - 0
    torch.testing.assert_close(loss.logits(state), torch.tensor([[1.0, 1.0], [3.0, 0.0]]).double())
    want = torch.tensor([math.log(2.0), math.log(math.exp(3.0) + 1.0)], dtype=torch.float64)
    torch.testing.assert_close(loss.value(state, y), want)
    assert loss.predict(state).tolist()[1] == 0
    assert loss.clamp(state, y) is None


def test_the_readout_parameter_grads_are_autograd_of_the_summed_loss():
    loss = SoftmaxReadout(4, readout())
    state, y = case((6,))
    (weight, bias) = torch.autograd.grad(
        loss.value(state, y).sum(), list(loss.readout.parameters())
    )
    grads = loss.parameter_grads(state, y)
    torch.testing.assert_close(grads["weight"], weight, atol=1e-12, rtol=0)
    torch.testing.assert_close(grads["bias"], bias, atol=1e-12, rtol=0)


def test_the_cost_nudge_is_minus_the_cost_gradient_through_the_readout():
    loss = SoftmaxReadout(4, readout())
    state, _ = case((6,))
    target = torch.randn(5, 4, dtype=torch.float64)

    def logit_gradient(z):  # A(z) = 0.5 ||z - target||^2
        return z - target

    leaf = state.clone().requires_grad_(True)
    cost = 0.5 * (loss.logits(leaf) - target).pow(2).sum()
    (want,) = torch.autograd.grad(cost, leaf)
    torch.testing.assert_close(loss.cost_nudge(logit_gradient, state), -want, atol=1e-12, rtol=0)


def test_make_loss_and_the_registry():
    assert set(LOSSES) == {"mse", "cel"}
    assert isinstance(make_loss("mse", 10), SquaredError)
    assert isinstance(make_loss("mse", 10, nn.Linear(3, 10)), SoftmaxReadout)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_loss("hinge", 10)


@pytest.mark.parametrize("loss, softmax", [("mse", False), ("cel", False), ("mse", True)])
def test_a_model_output_layer_takes_its_loss_update(loss, softmax):
    """The output layer's new state in a nudged step is ``activate_output(drive + beta
    nudge)``: sigma for mse and the readout, the identity for cel on the output units."""
    torch.manual_seed(0)
    model = P_MLP([5, 4, 3], activation="sigmoid", softmax=softmax, loss=loss).double()
    x = torch.rand(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    start = [torch.rand(6, *layer.shape, dtype=torch.float64) for layer in model.graph.layers]
    after = model(x, y, start, 1, beta=BETA)
    out = model.output_index
    (edge,) = model.graph.incoming[out]
    source = model.graph.edges[edge].source
    drive = model.links[edge].drive(x if source == INPUT else start[source])[0]
    bias = model.layer_bias(out)
    drive = drive if bias is None else drive + bias
    leaf = start[out].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model.criterion.value(leaf, y).sum(), leaf)
    total = drive - BETA * gradient
    want = total if (loss == "cel" and not softmax) else torch.sigmoid(total)
    torch.testing.assert_close(after[out], want, atol=1e-12, rtol=0)


# ---- the loss of docs/extending.md, run as written there ----------------------------------------


@pytest.fixture(scope="module")
def docs_loss():
    """The docs' squared hinge, executed from the page in a namespace holding ``Loss``."""
    with docs_example("class SquaredHinge", "hinge_example", Loss=Loss) as module:
        return module.SquaredHinge


def test_the_docs_loss_nudge_is_autograd_and_its_loss_a_hand_computation(docs_loss):
    loss = docs_loss(3)
    state = torch.tensor([[0.5, 0.2, 0.9], [2.0, 0.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    # sample 1: margins 1 + 0.5 - 0.9 = 0.6 and 1 + 0.2 - 0.9 = 0.3 -> 0.5 (0.36 + 0.09);
    # sample 2: 1 + 0 - 2 < 0 and 1 + 0.5 - 2 < 0 -> 0
    torch.testing.assert_close(loss.value(state, y), torch.tensor([0.225, 0.0]).double())
    leaf = state.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss.value(leaf, y).sum(), leaf)
    torch.testing.assert_close(BETA * loss.nudge(state, y), -BETA * gradient, atol=1e-12, rtol=0)
    assert loss.nudge(state, y)[0].tolist() == pytest.approx([-0.6, -0.3, 0.9])
    assert loss.value(loss.clamp(state, y), y).tolist() == [0.0, 0.0]
    assert loss.predict(state).tolist() == [2, 0]


def test_the_registered_docs_loss_trains_from_the_command_line(docs_loss, monkeypatch):
    monkeypatch.setitem(LOSSES, "hinge", docs_loss)
    argv = [*DIGITS_CNN, "--loss", "hinge", "--betas", "0", "0.5", "--device", "cpu"]
    assert main_fast.main(argv) == 0
    assert main_fast.main([*argv, "--alg", "BPTT"]) == 0
