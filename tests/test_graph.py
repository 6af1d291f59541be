"""The engine on a graph that is not a chain, against its Phi written by hand; the colouring of
the asynchronous dynamics; bias-free links and a second coupling leaving x.

The graph (float64): x 1x8x8 -> a 3x8x8 (conv 3x3/1, pad 1) -> b 4x4x4 (conv 3x3/2, pad 1), the
skip x -> b (conv 1x1/2), b -> c 6 (linear), the skip a -> c (linear: a and c have the same
parity, so a, b, c make a triangle), then a softmax readout of c with 3 classes. The convs have
no bias; every layer has one of its own, one per channel of a map.
"""

import helpers
import pytest
import torch
import torch.nn.functional as F
from math_checks import cosine
from torch import nn

import dynamics
from graph import INPUT, Graph, Layer, is_independent
from learning.estimators import EP, EPConfig, input_gradient
from links import POOLS, ConvLink, LinearLink
from utils_ep_fast import P_CNN, EnergyNet, make_optimizer, train_batch

BATCH = 3


class SkipNet(EnergyNet):
    """The graph of the module docstring, built edge by edge; ``skip_scale`` multiplies the
    weights of the skip a -> c."""

    def __init__(self, activation: str = "my_hard_sig", gain: float = 1.0, skip_scale=1.0):
        super().__init__(activation, softmax=True, loss="cel")
        self.num_classes = 3
        x_shape = (1, 8, 8)
        conv_xa = nn.Conv2d(1, 3, 3, 1, 1, bias=False)
        conv_ab = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
        conv_xb = nn.Conv2d(1, 4, 1, 2, 0, bias=False)
        linear_bc = nn.Linear(64, 6, bias=False)
        linear_ac = nn.Linear(192, 6, bias=False)
        readout = nn.Linear(6, 3)
        self.synapses.extend([conv_xa, conv_ab, conv_xb, linear_bc, linear_ac, readout])
        xa = ConvLink(x_shape, conv_xa, POOLS["i"])
        a = self.add_layer(xa.shape, bias=True)
        ab = ConvLink(xa.shape, conv_ab, POOLS["i"])
        b = self.add_layer(ab.shape, bias=True)
        c = self.add_layer((6,), bias=True)
        self.couple(INPUT, a, xa)
        self.couple(a, b, ab)
        self.couple(INPUT, b, ConvLink(x_shape, conv_xb, POOLS["i"]))
        self.couple(b, c, LinearLink((6,), linear_bc))
        self.couple(a, c, LinearLink((6,), linear_ac))
        self.set_readout(readout)
        self.set_output(c)
        with torch.no_grad():
            for synapse in self.synapses[:-1]:
                synapse.weight.mul_(gain)
            linear_ac.weight.mul_(skip_scale)
            for bias in self.layer_biases.values():
                bias.uniform_(-0.2, 0.2)


def skip_net(**options) -> SkipNet:
    torch.manual_seed(0)
    return SkipNet(**options).double()


def hand_phi(model: SkipNet, x, y, states, beta: float):
    """Phi of the graph, per sample, from F.conv2d / F.linear on the model's tensors."""
    a, b, c = states
    w_xa, w_ab, w_xb, w_bc, w_ac, readout = (s.weight for s in model.synapses)
    bias_a, bias_b, bias_c = model.layer_biases.values()
    phi = (F.conv2d(x, w_xa, None, 1, 1) * a).sum((1, 2, 3))
    phi = phi + (F.conv2d(a, w_ab, None, 2, 1) * b).sum((1, 2, 3))
    phi = phi + (F.conv2d(x, w_xb, None, 2, 0) * b).sum((1, 2, 3))
    phi = phi + (F.linear(b.flatten(1), w_bc) * c).sum(1)
    phi = phi + (F.linear(a.flatten(1), w_ac) * c).sum(1)
    phi = phi + (a * bias_a.view(-1, 1, 1)).sum((1, 2, 3))
    phi = phi + (b * bias_b.view(-1, 1, 1)).sum((1, 2, 3))
    phi = phi + (c * bias_c).sum(1)
    logits = F.linear(c, readout, model.synapses[-1].bias)
    return phi - beta * F.cross_entropy(logits, y, reduction="none")


def random_case(model: SkipNet, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    states = [
        torch.rand(BATCH, *layer.shape, generator=generator, dtype=torch.float64)
        for layer in model.graph.layers
    ]
    return x, y, states


# ---- the engine against the hand-written Phi ----------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_one_sync_step_is_sigma_of_autograd_of_the_hand_phi(beta):
    model = skip_net()
    x, y, states = random_case(model)
    leaves = [state.clone().requires_grad_(True) for state in states]
    grads = torch.autograd.grad(hand_phi(model, x, y, leaves, beta).sum(), leaves)
    with torch.no_grad():
        stepped = model.step(x, y, states, beta)
    for k, (got, grad) in enumerate(zip(stepped, grads, strict=True)):
        torch.testing.assert_close(got, model.sigma(grad), atol=1e-12, rtol=0, msg=f"layer {k}")


@pytest.mark.parametrize("betas", [(0.0, 0.5), (-0.3, 0.3)], ids=["one-sided", "symmetric"])
def test_ep_estimate_is_autograd_of_the_hand_phi_difference(betas):
    model = skip_net()
    x, y, first = random_case(model, seed=1)
    _, _, second = random_case(model, seed=2)
    beta_1, beta_2 = betas
    difference = hand_phi(model, x, y, second, beta_2) - hand_phi(model, x, y, first, beta_1)
    params = list(model.parameters())
    expected = torch.autograd.grad(difference.mean() / (beta_1 - beta_2), params)
    model.compute_syn_grads(x, y, first, second, betas)
    for (name, param), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want, atol=1e-12, rtol=0, msg=name)


def test_symmetric_ep_at_small_beta_matches_bptt_from_a_settled_free_state():
    model = skip_net(gain=0.5)
    x, y, _ = random_case(model)
    free = model(x, y, model.init_neurons(x), 200)
    settled = model(x, y, free, 1)
    assert max((a - b).abs().max().item() for a, b in zip(settled, free, strict=True)) < 1e-13
    beta = 1e-4
    plus = model(x, y, free, 200, beta=beta)
    minus = model(x, y, free, 200, beta=-beta)
    model.compute_syn_grads(x, y, minus, plus, (-beta, beta))
    ep = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    final = model(x, y, free, 200, track_grad=True)
    model.loss(final, y).mean().backward()
    for name, param in model.named_parameters():
        assert cosine(ep[name], param.grad) >= 0.9999, name


# ---- the colouring ----------------------------------------------------------------------------


def test_a_chain_is_two_coloured_odd_then_even_and_the_triangle_needs_three():
    chain = P_CNN(8, 1, [2, 2], [3, 3], [1, 1], [1, 1], "mi", [5, 4, 3])
    odd, even = (list(dynamics.parity_group(chain.num_layers, p)) for p in (1, 0))
    assert chain.groups == [odd, even] == [[0, 2, 4], [1, 3]]
    model = skip_net()
    assert len(model.groups) >= 3
    for group in model.groups:
        assert is_independent(model.graph, group)
    assert sorted(k for group in model.groups for k in group) == [0, 1, 2]


def test_the_colouring_of_a_graph_never_groups_an_edge():
    graph = Graph()
    for _ in range(6):
        graph.add_layer(Layer((1,)))
    for source, target in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 2), (2, 4), (1, 5)]:
        graph.add_edge(source, target)
    groups = graph.colouring()
    assert sorted(k for group in groups for k in group) == list(range(6))
    for group in groups:
        for edge in graph.edges:
            assert not (edge.source in group and edge.target in group), (edge, group)


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_a_group_half_step_is_its_layers_updated_one_at_a_time(beta):
    model = skip_net()
    x, y, states = random_case(model)
    with torch.no_grad():
        for group in model.groups:
            together = dynamics.group_step(model, x, y, states, group, beta)
            one_by_one = states
            for k in group:
                one_by_one = dynamics.group_step(model, x, y, one_by_one, [k], beta)
            for got, want in zip(together, one_by_one, strict=True):
                torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def energies(model, x, y, states, step, steps: int = 40) -> torch.Tensor:
    """Per-sample energies (steps + 1, B) along ``steps`` calls of ``step`` from ``states``."""
    trace = [model.energy(x, y, states)]
    with torch.no_grad():
        for _ in range(steps):
            states = step(states)
            trace.append(model.energy(x, y, states))
    return torch.stack(trace)


@pytest.mark.parametrize("skip_scale", [-4.0, 8.0])
def test_async_over_the_colouring_never_raises_the_energy(skip_scale):
    model = skip_net(gain=2.0, skip_scale=skip_scale)
    model.set_dynamics("async")
    x, y, start = random_case(model)
    trace = energies(model, x, y, start, lambda states: model(x, y, states, 1))
    rises = trace[1:] - trace[:-1]
    assert rises.max().item() <= 1e-12 * trace.abs().max().item()


@pytest.mark.parametrize("skip_scale", [-4.0, 8.0])
def test_a_grouping_with_a_coupled_pair_raises_the_energy(skip_scale):
    """a and c share the skip a -> c: updating them together reads each other's old state."""
    model = skip_net(gain=2.0, skip_scale=skip_scale)
    x, y, start = random_case(model)
    wrong = [[0, 2], [1]]

    def step(states):
        drives = {}
        input_drives = model.input_drives(x)
        dynamics.refresh(model, states, input_drives, wrong[1], drives)
        return dynamics.half_steps(model, y, states, 0.0, input_drives, drives, wrong)

    trace = energies(model, x, y, start, step)
    assert (trace[1:] - trace[:-1]).max().item() > 1e-6


# ---- edges ------------------------------------------------------------------------------------


def test_a_bias_free_link_trains():
    model = skip_net()
    x, y, _ = random_case(model)
    optimizer = make_optimizer(model, "sgd", [0.1] * 9)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    rule = EP(EPConfig(T1=10, T2=4, betas=(0.0, 0.5), thirdphase=True))
    train_batch(model, optimizer, x, y, rule)
    for synapse in model.synapses[:-1]:
        assert synapse.bias is None
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        assert not torch.equal(param, before[name]), name


def test_two_couplings_leaving_x_give_the_input_gradient_of_the_hand_phi():
    """The EP input gradient ``-(dPhi/dx(s^+) - dPhi/dx(s^-)) / (2 beta)`` sums the adjoints
    of x -> a and x -> b; here against autograd of the hand Phi in x at the same states."""
    model = skip_net(gain=0.5)
    x, y, _ = random_case(model)
    free = model(x, y, model.init_neurons(x), 100)
    beta = 0.05
    got = input_gradient(model, x, y, free, 20, beta)
    plus = model(x, y, free, 20, beta=beta)
    minus = model(x, y, free, 20, beta=-beta)
    leaf = x.clone().requires_grad_(True)
    difference = hand_phi(model, leaf, y, plus, 0.0) - hand_phi(model, leaf, y, minus, 0.0)
    (want,) = torch.autograd.grad(difference.sum() / (-2.0 * beta), leaf)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert len(model.graph.input_edges) == 2


def test_the_input_gradient_at_small_beta_matches_backpropagation_of_the_loss():
    model = skip_net(gain=0.5)
    x, y, _ = random_case(model)
    free = model(x, y, model.init_neurons(x), 200)
    ep = input_gradient(model, x, y, free, 200, 1e-4)
    leaf = x.clone().requires_grad_(True)
    final = model(leaf, y, free, 200, track_grad=True)
    (bptt,) = torch.autograd.grad(model.loss(final, y).sum(), leaf)
    assert cosine(ep, bptt) >= 0.9999


# ---- the coupling kind of docs/extending.md, run as written there ------------------------------


@pytest.fixture(scope="module")
def docs_example():
    """The docs' gated skip and its network, executed from the page."""
    with helpers.docs_example("class GatedSkipLink", "coupling_example") as module:
        yield module


def skip_cnn(docs_example):
    torch.manual_seed(1)
    model = docs_example.SkipCNN(classes=3).double()
    with torch.no_grad():
        model.synapses[3].weight.uniform_(-1.0, 1.0)
        for bias in model.layer_biases.values():
            bias.uniform_(-0.2, 0.2)
    return model


def skip_cnn_phi(model, x, y, states, beta: float):
    """Phi of the docs' SkipCNN by hand: three convs, the gain on a paired with c, biases."""
    a, b, c = states
    w_a, w_b, w_c, gain, readout = (s.weight for s in model.synapses)
    phi = (F.conv2d(x, w_a, None, 1, 1) * a).sum((1, 2, 3))
    phi = phi + (F.conv2d(a, w_b, None, 1, 1) * b).sum((1, 2, 3))
    phi = phi + (F.conv2d(b, w_c, None, 1, 1) * c).sum((1, 2, 3))
    phi = phi + (gain.view(-1, 1, 1) * a * c).sum((1, 2, 3))
    for state, bias in zip(states, model.layer_biases.values(), strict=True):
        phi = phi + (state * bias.view(-1, 1, 1)).sum((1, 2, 3))
    logits = F.linear(c.flatten(1), readout, model.synapses[-1].bias)
    return phi - beta * F.cross_entropy(logits, y, reduction="none")


def skip_cnn_case(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, 8, 8, generator=generator, dtype=torch.float64)
    states = [torch.rand(BATCH, 4, 8, 8, generator=generator, dtype=torch.float64)
              for _ in range(3)]  # fmt: skip
    return x, torch.tensor([0, 2, 1]), states


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_the_docs_skip_link_steps_as_sigma_of_its_hand_phi(docs_example, beta):
    model = skip_cnn(docs_example)
    assert model.groups == [[0], [1], [2]]
    x, y, states = skip_cnn_case(model, 0)
    leaves = [state.clone().requires_grad_(True) for state in states]
    grads = torch.autograd.grad(skip_cnn_phi(model, x, y, leaves, beta).sum(), leaves)
    with torch.no_grad():
        stepped = model.step(x, y, states, beta)
    for got, grad in zip(stepped, grads, strict=True):
        torch.testing.assert_close(got, model.sigma(grad), atol=1e-12, rtol=0)


def test_the_docs_skip_link_estimate_is_autograd_of_its_hand_phi(docs_example):
    model = skip_cnn(docs_example)
    x, y, first = skip_cnn_case(model, 1)
    _, _, second = skip_cnn_case(model, 2)
    difference = skip_cnn_phi(model, x, y, second, 0.5) - skip_cnn_phi(model, x, y, first, 0.0)
    expected = torch.autograd.grad(difference.mean() / -0.5, list(model.parameters()))
    model.compute_syn_grads(x, y, first, second, (0.0, 0.5))
    for (name, param), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want, atol=1e-12, rtol=0, msg=name)


def test_the_docs_skip_network_trains_every_parameter(docs_example):
    model = skip_cnn(docs_example)
    model.set_dynamics("async")
    x, y, _ = skip_cnn_case(model, 3)
    optimizer = make_optimizer(model, "sgd", [0.05] * 8)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    rule = EP(EPConfig(T1=10, T2=4, betas=(0.0, 0.5), thirdphase=True))
    train_batch(model, optimizer, x, y, rule)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all() and not torch.equal(param, before[name]), name
