"""Contrastive learning (CL) and coupled learning (CpL) against updates worked out by hand.

On a two-layer MLP ``x -> h -> o`` with ``Phi = <W1 x + b1, h> + <W2 h + b2, o>`` the free phase
is iterated by hand (synchronous: both layers from the old states; asynchronous: ``h`` then
``o``), and the clamped phase has a closed form: with ``o`` fixed at the target ``c``, every
step gives ``h^c = sigma(W1 x + b1 + W2^T c)``. The estimate is
``-(dPhi/dtheta(s^c) - dPhi/dtheta(s^0)) / eta`` with ``dPhi/dW1 = h^T x``, ``dPhi/db1 = h``,
``dPhi/dW2 = o^T h``, ``dPhi/db2 = o`` (batch means).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import docs_example

from learning.clamped_learning import ContrastiveLearning, CoupledLearning, clamped_phase
from learning.estimators import EPConfig
from learning.registry import ESTIMATORS
from utils_ep_fast import P_CNN, P_MLP

T1, T2 = 7, 3


def sigma(u):
    return u.clamp(0.0, 2.0) / 2


def clamped_estimate(model, x, y, eta, rule="CpL"):
    """The rule's estimate through its registered class: T1 free, T2 clamped steps."""
    cfg = EPConfig(alg=rule, T1=T1, T2=T2, cpl_eta=1.0 if eta is None else eta)
    return ESTIMATORS[rule](cfg).estimate(model, x, y)


def two_layer_case(seed=0):
    torch.manual_seed(seed)
    model = P_MLP([4, 3, 2], "my_hard_sig", loss="mse").double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(5, 4, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 2, (5,), generator=g)
    return model, x, y


def hand_free_phase(model, x, dynamics):
    w1, b1 = model.synapses[0].weight, model.synapses[0].bias
    w2, b2 = model.synapses[1].weight, model.synapses[1].bias
    h = x.new_zeros(x.shape[0], 3)
    o = x.new_zeros(x.shape[0], 2)
    for _ in range(T1):
        h_next = sigma(x @ w1.t() + b1 + o @ w2)
        o = sigma((h_next if dynamics == "async" else h) @ w2.t() + b2)
        h = h_next
    return h, o


def hand_update(model, x, y, eta, dynamics):
    """The CpL update (CL at eta = 1) per parameter name, by hand."""
    w1, b1 = model.synapses[0].weight, model.synapses[0].bias
    w2 = model.synapses[1].weight
    h0, o0 = hand_free_phase(model, x, dynamics)
    target = o0 + eta * (F.one_hot(y, 2).double() - o0)
    hc = sigma(x @ w1.t() + b1 + target @ w2)
    batch = x.shape[0]
    return {
        "synapses.0.weight": -((hc - h0).t() @ x) / (batch * eta),
        "synapses.0.bias": -(hc - h0).sum(0) / (batch * eta),
        "synapses.1.weight": -(target.t() @ hc - o0.t() @ h0) / (batch * eta),
        "synapses.1.bias": -(target - o0).sum(0) / (batch * eta),
    }, (hc, target)


@pytest.mark.parametrize("dynamics", ["sync", "async"])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_the_update_equals_the_hand_worked_one(dynamics, eta):
    model, x, y = two_layer_case()
    model.set_dynamics(dynamics)
    expected, _ = hand_update(model, x, y, eta, dynamics)
    with torch.no_grad():
        clamped_estimate(model, x, y, eta)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], rtol=0, atol=1e-14), name


def test_coupled_learning_at_eta_one_is_contrastive_learning():
    model, x, y = two_layer_case(seed=4)
    clamped_estimate(model, x, y, 1.0, rule="CpL")
    coupled = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    clamped_estimate(model, x, y, None, rule="CL")
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, coupled[name]), name


def test_the_clamped_phase_settles_the_rest_with_the_output_fixed():
    """A three-layer MLP: the output stays at the target at every step; the others reach the
    clamped fixed point ``h1 = sigma(W1 x + b1 + W2^T h2)``, ``h2 = sigma(W2 h1 + b2 + W3^T c)``."""
    torch.manual_seed(2)
    model = P_MLP([4, 5, 3, 2], "my_hard_sig", loss="mse", scale=0.5).double()
    x = torch.rand(3, 4, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 1])
    free = model(x, y, model.init_neurons(x), 30)
    clamped = clamped_phase(model, x, y, free, 200, 0.5)
    target = free[-1] + 0.5 * (F.one_hot(y, 2).double() - free[-1])
    assert (clamped[-1] - target).abs().max() < 1e-15
    (w1, b1), (w2, b2), (w3, _) = [(s.weight, s.bias) for s in model.synapses]
    h1, h2 = clamped[0], clamped[1]
    assert (h1 - sigma(x @ w1.t() + b1 + h2 @ w2)).abs().max() < 1e-13
    assert (h2 - sigma(h1 @ w2.t() + b2 + target @ w3)).abs().max() < 1e-13


def test_softmax_readout_is_refused_in_one_line():
    torch.manual_seed(0)
    model = P_CNN(8, 1, [2], [3], [1], [1], "m", [4, 3], softmax=True, loss="cel")
    for rule in (ContrastiveLearning, CoupledLearning):
        message = rule.model_refusal(model)
        assert message is not None and "\n" not in message and "--softmax" in message
        assert rule.model_refusal(P_MLP([4, 3, 2])) is None


def test_the_docs_example_rule_gives_the_hand_worked_update():
    """docs/extending.md's contrastive-learning class, executed from the page."""
    with docs_example("class ContrastiveLearning", "rule_example") as module:
        model, x, y = two_layer_case(seed=5)
        expected, _ = hand_update(model, x, y, 1.0, "sync")
        module.ContrastiveLearning(EPConfig(alg="CL", T1=T1, T2=T2)).estimate(model, x, y)
        refused = module.ContrastiveLearning.model_refusal(P_MLP([4, 3, 2, 2], softmax=True))
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], rtol=0, atol=1e-14), name
    assert "--softmax" in refused
