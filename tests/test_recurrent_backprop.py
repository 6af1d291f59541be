"""Recurrent backprop against a dense implicit gradient, in float64.

Each case writes its network's primitive function ``Phi`` by hand (torch ops on the weights,
not the engine's links), and the fixed-point map ``F(s) = sigma(dPhi/ds)`` with each layer's
output rule. The engine's free phase settles ``s*``; ``F(s*) = s*`` is checked to 1e-13 with
that hand-written ``F``, no max-pool window ties and no unit sits on a clamp's kink. Then,
with ``J = dF/ds`` from ``torch.autograd.functional.jacobian``, ``(I - J)^T lambda = dL/ds``
is solved densely and ``dL/dtheta = (dF/dtheta)^T lambda`` (+ the readout's direct term).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynamics import Phases
from learning.estimators import EP, EPConfig
from learning.metrics import Metrics
from learning.recurrent_backprop import RecurrentBackprop, rbp_gradient
from rescnn import ResCNN
from utils_ep_fast import P_CNN, P_MLP
from vf_utils_ep_fast import VF_MLP

BATCH = 2
SETTLE = 400  # free steps and adjoint iterations: the maps contract at rate <= ~0.5


def my_hard_sig(u):
    return u.clamp(0.0, 2.0) / 2


def relu6(u):
    return u.clamp(0.0, 6.0)


def maxpool(z):
    return F.max_pool2d(z, 2, 2)


def avgpool(z):
    return F.avg_pool2d(z, 2, 2)


def dot(a, b):
    return (a * b).flatten(1).sum(1)


# ---- the cases: per-sample Phi, each layer's rule, the loss, and their kinks -------------------


def mlp_phi(x, s, p):
    """``<W1 x + b1, s1> + <W2 s1 + b2, s2>``."""
    drive_1 = x @ p["synapses.0.weight"].t() + p["synapses.0.bias"]
    drive_2 = s[0] @ p["synapses.1.weight"].t() + p["synapses.1.bias"]
    return dot(drive_1, s[0]) + dot(drive_2, s[1])


def softmax_mlp_phi(x, s, p):
    """The same two layers; the readout ``W3 s2 + b3`` is outside ``Phi``."""
    return mlp_phi(x, s, p)


def cnn_phi(x, s, p, first=None):
    """``<maxpool(conv(x)), s1> + <avgpool(conv(s1)), s2> + <W3 flat(s2) + b3, s3>`` (biases
    inside the convs), from ``first`` (the input, or the copy layer) on."""
    source = x if first is None else first
    z1 = F.conv2d(source, p["synapses.0.weight"], p["synapses.0.bias"], padding=1)
    z2 = F.conv2d(s[0], p["synapses.1.weight"], p["synapses.1.bias"], padding=1)
    out = s[1].flatten(1) @ p["synapses.2.weight"].t() + p["synapses.2.bias"]
    return dot(maxpool(z1), s[0]) + dot(avgpool(z2), s[1]) + dot(out, s[2])


def copy_cnn_phi(x, s, p):
    """``<x, s0>`` (the copy layer) then ``cnn_phi`` on ``s0``."""
    return dot(x, s[0]) + cnn_phi(x, s[1:], p, first=s[0])


def rescnn_phi(x, s, p):
    """One residual block ``a = conv3(x)``, ``b = conv3/2(a) + conv1/2(x)``, then ``out =
    W flat(b)``; every layer its own bias."""
    a, b, out = s
    za = F.conv2d(x, p["synapses.0.weight"], padding=1)
    zb = F.conv2d(a, p["synapses.1.weight"], stride=2, padding=1)
    zskip = F.conv2d(x, p["synapses.2.weight"], stride=2)
    zout = b.flatten(1) @ p["synapses.3.weight"].t()
    biases = (
        dot(p["layer_biases.0"].view(-1, 1, 1).expand_as(a), a)
        + dot(p["layer_biases.1"].view(-1, 1, 1).expand_as(b), b)
        + dot(p["layer_biases.2"].expand_as(out), out)
    )
    return dot(za, a) + dot(zb + zskip, b) + dot(zout, out) + biases


def mse(s, p, y, classes):
    return 0.5 * (s[-1] - F.one_hot(y, classes).double()).pow(2).sum(1)


def readout_ce(s, p, y, classes):
    logits = s[-1] @ p["synapses.2.weight"].t() + p["synapses.2.bias"]
    return F.cross_entropy(logits, y, reduction="none")


def fixed_point_map(phi, rules, x, p):
    """``F(s)``: each layer's rule applied to ``dPhi/ds_k`` (``("copy", g)``: ``sigma(x + g
    (dPhi/ds_k - x))``, the copy layer's feedback scaled by ``g``)."""

    def step(s):
        s = [state if state.requires_grad else state.requires_grad_(True) for state in s]
        grads = torch.autograd.grad(phi(x, s, p).sum(), s, create_graph=True)
        out = []
        for rule, u in zip(rules, grads, strict=True):
            if rule == "linear":
                out.append(u)
            elif isinstance(rule, tuple):
                out.append(rule[1](x + rule[0] * (u - x)))
            else:
                out.append(rule(u))
        return out

    return step


def preactivations(phi, rules, x, p, s):
    """``u_k = dPhi/ds_k`` with the copy layer's scaled feedback, to check the kinks."""
    s = [state.detach().requires_grad_(True) for state in s]
    grads = torch.autograd.grad(phi(x, s, p).sum(), s)
    return [x + rule[0] * (u - x) if isinstance(rule, tuple) else u
            for rule, u in zip(rules, grads, strict=True)]  # fmt: skip


def case(name):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(11)
    if name in ("mlp", "softmax mlp"):
        softmax = name == "softmax mlp"
        archi = [6, 5, 4, 3] if softmax else [6, 5, 4]
        model = P_MLP(archi, "my_hard_sig", softmax=softmax, loss="cel" if softmax else "mse")
        x = torch.rand(BATCH, 6, generator=g, dtype=torch.float64) * 2
        phi, rules = mlp_phi, [my_hard_sig, my_hard_sig]
        loss, kinks = (readout_ce if softmax else mse), (0.0, 2.0)
    elif name in ("cnn", "lcacnn"):
        copy = name == "lcacnn"
        in_channels = 2
        model = P_CNN(8, in_channels, [in_channels, 3] if copy else [2, 3], [3, 3], [1, 1],
                      [1, 1], "ma", [4], "my_hard_sig", loss="mse", scale=0.5,
                      input_copy=copy, scale_feedback=0.6 if copy else 1.0)  # fmt: skip
        x = torch.rand(BATCH, in_channels, 8, 8, generator=g, dtype=torch.float64) * 2
        if copy:
            phi, rules = copy_cnn_phi, [(0.6, my_hard_sig)] + [my_hard_sig] * 3
        else:
            phi, rules = cnn_phi, [my_hard_sig] * 3
        loss, kinks = mse, (0.0, 2.0)
    elif name == "rescnn":
        model = ResCNN(6, 1, [2], [3], "relu6", loss="mse", scale=0.4)
        x = torch.rand(BATCH, 1, 6, 6, generator=g, dtype=torch.float64) * 2
        phi, rules, loss, kinks = rescnn_phi, [relu6, relu6, "linear"], mse, (0.0, 6.0)
    model = model.double()
    y = torch.randint(0, model.num_classes, (BATCH,), generator=g)
    return model, x, y, phi, rules, loss, kinks


def leaves(model):
    return {name: param.detach().clone().requires_grad_(True)
            for name, param in model.named_parameters()}  # fmt: skip


def settled(model, x, y, phi, rules, kinks, p):
    """The engine's free state, checked to be a fixed point of the hand-written map, away from
    kinks and pool ties."""
    free = model(x, y, model.init_neurons(x), SETTLE)
    step = fixed_point_map(phi, rules, x, p)
    residual = max((a - b).abs().max().item() for a, b in zip(step(free), free, strict=True))
    assert residual < 1e-13
    for k, (rule, u) in enumerate(zip(rules, preactivations(phi, rules, x, p, free), strict=True)):
        if rule != "linear":
            distance = min((u - kink).abs().min().item() for kink in kinks)
            assert distance > 1e-6, f"layer {k} sits {distance:.1e} from a kink"
    return [state.detach() for state in free]


def assert_no_pool_ties(model, x, free):
    """Every max-pool window's largest pre-pool value beats the second by > 1e-6."""
    for edge, link in zip(model.graph.edges, model.links, strict=True):
        if getattr(getattr(link, "pool", None), "has_indices", False):
            source = x if edge.source < 0 else free[edge.source]
            z = F.conv2d(source, link.synapse.weight, link.synapse.bias,
                         link.synapse.stride, link.synapse.padding)  # fmt: skip
            windows = F.unfold(z.flatten(0, 1).unsqueeze(1), 2, stride=2)
            top = windows.topk(2, dim=1).values
            assert (top[:, 0] - top[:, 1]).min().item() > 1e-6


def dense_gradient(model, x, y, phi, rules, loss, free, p):
    """``(dF/dtheta)^T lambda + dL/dtheta|direct`` with ``(I - J)^T lambda = dL/ds``, J dense."""
    shapes = [state.shape for state in free]
    sizes = [state.numel() for state in free]
    step = fixed_point_map(phi, rules, x, p)

    def flat_map(flat):
        s = [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]
        return torch.cat([out.flatten() for out in step(s)])

    s_flat = torch.cat([state.flatten() for state in free])
    jacobian = torch.autograd.functional.jacobian(flat_map, s_flat)
    states = [state.clone().requires_grad_(True) for state in free]
    mean_loss = loss(states, p, y, model.num_classes).mean()
    dl_ds = torch.autograd.grad(mean_loss, states, retain_graph=True, allow_unused=True)
    rhs = torch.cat([(torch.zeros_like(state) if grad is None else grad).flatten()
                     for grad, state in zip(dl_ds, states, strict=True)])  # fmt: skip
    identity = torch.eye(len(rhs), dtype=torch.float64)
    adjoint = torch.linalg.solve((identity - jacobian).t(), rhs)
    names = list(p)
    stepped = torch.cat([out.flatten() for out in step([state.clone() for state in free])])
    through = torch.autograd.grad(stepped, [p[n] for n in names], adjoint, allow_unused=True)
    direct = torch.autograd.grad(mean_loss, [p[n] for n in names], allow_unused=True)
    total = {}
    for name, a, b in zip(names, through, direct, strict=True):
        value = torch.zeros_like(p[name])
        for part in (a, b):
            if part is not None:
                value = value + part
        total[name] = value
    return total


def relative_error(model, expected):
    grads = dict(model.named_parameters())
    diff = torch.cat([(grads[n].grad - expected[n]).flatten() for n in expected])
    scale = torch.cat([expected[n].flatten() for n in expected]).norm()
    assert scale > 1e-6  # a gradient that is there
    return (diff.norm() / scale).item()


CASES = ["mlp", "softmax mlp", "cnn", "lcacnn", "rescnn"]


@pytest.mark.parametrize("name", CASES)
def test_rbp_equals_the_dense_implicit_gradient(name):
    model, x, y, phi, rules, loss, kinks = case(name)
    p = leaves(model)
    free = settled(model, x, y, phi, rules, kinks, p)
    assert_no_pool_ties(model, x, free)
    expected = dense_gradient(model, x, y, phi, rules, loss, free, p)
    _, residual = rbp_gradient(model, x, y, free, SETTLE)
    assert residual < 1e-14
    assert relative_error(model, expected) < 1e-8


@pytest.mark.parametrize("name", ["cnn", "lcacnn"])
def test_rbp_from_an_async_free_phase_is_the_same_gradient(name):
    """Async dynamics settle to the same fixed point; the adjoint is the same."""
    model, x, y, phi, rules, loss, kinks = case(name)
    p = leaves(model)
    model.set_dynamics("async")
    free = settled(model, x, y, phi, rules, kinks, p)
    expected = dense_gradient(model, x, y, phi, rules, loss, free, p)
    rbp_gradient(model, x, y, free, SETTLE)
    assert relative_error(model, expected) < 1e-8


def test_an_unconverged_adjoint_reports_its_residual():
    model, x, y, phi, rules, loss, kinks = case("cnn")
    p = leaves(model)
    free = settled(model, x, y, phi, rules, kinks, p)
    expected = dense_gradient(model, x, y, phi, rules, loss, free, p)
    _, residual = rbp_gradient(model, x, y, free, 2)
    assert residual > 1e-6
    assert relative_error(model, expected) > 1e-6


@pytest.mark.parametrize("name", ["mlp", "softmax mlp", "cnn", "lcacnn"])
def test_symmetric_ep_at_a_small_beta_agrees_with_rbp(name):
    """RBP is EP's limit as beta -> 0: the symmetric estimate's error is O(beta^2)."""
    model, x, y, phi, rules, loss, kinks = case(name)
    p = leaves(model)
    free = settled(model, x, y, phi, rules, kinks, p)
    expected = dense_gradient(model, x, y, phi, rules, loss, free, p)
    config = EPConfig(T1=SETTLE, T2=SETTLE, betas=(0.0, 1e-4), thirdphase=True)
    EP(config).estimate(model, x, y)
    assert relative_error(model, expected) < 2e-8


def test_the_rule_settles_then_writes_the_gradient_and_reports_its_residual():
    """Through its registered class: T1 free steps, ``adjoint_iters`` iterations (T2 when
    unset); the residual reaches the metrics as a batch statistic."""
    model, x, y, phi, rules, loss, kinks = case("lcacnn")
    p = leaves(model)
    free = settled(model, x, y, phi, rules, kinks, p)
    expected = dense_gradient(model, x, y, phi, rules, loss, free, p)
    metrics = Metrics()
    rule = RecurrentBackprop(EPConfig(alg="RBP", T1=SETTLE, T2=3, adjoint_iters=SETTLE))
    estimate = rule.estimate(model, x, y, Phases(log=metrics))
    assert all(torch.equal(a, b) for a, b in zip(estimate.free, free, strict=True))
    assert relative_error(model, expected) < 1e-8
    metrics.add_batch(0, 0.0, BATCH, {})
    assert metrics.epoch_means(with_phases=False)["adjoint_residual"] < 1e-14
    RecurrentBackprop(EPConfig(alg="RBP", T1=SETTLE, T2=3)).estimate(model, x, y)
    by_default = {name: param.grad.clone() for name, param in model.named_parameters()}
    _, residual = rbp_gradient(model, x, y, free, 3)
    assert residual > 1e-6 and relative_error(model, expected) > 1e-6
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, by_default[name]), name


def test_vector_field_models_are_refused():
    torch.manual_seed(0)
    message = RecurrentBackprop.model_refusal(VF_MLP([6, 5, 4]))
    assert message is not None and "\n" not in message and "vector-field" in message
    assert RecurrentBackprop.model_refusal(P_MLP([6, 5, 4])) is None
