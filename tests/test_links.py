"""The conv, pool and dense links against a Phi written out by hand, in float64.

``hand_phi`` below writes the primitive function of REFERENCE.md section 1 directly with
``F.conv2d``, ``F.max_pool2d`` / ``F.avg_pool2d`` (2x2, stride 2) and matrix products, reading
only the weights and biases of the model's synapses; it calls no link method and no engine
function, and takes each conv's kernel, stride and padding from the test's own spec::

    Phi(x, s, beta) = sum_i < P_i(conv_i(s_i) + b_i), s_{i+1} >         (s_0 = x, conv layers)
                    + sum_j < W_j flatten(s_j) + b_j, s_{j+1} >         (dense layers)
                    - beta * L

with ``L = 0.5 ||s_L - onehot(y)||^2`` on the output units, or with the softmax readout
``L = CE(W_out s_L + b_out, y)`` (the readout is not a layer of the system). There is no
``-||s||^2 / 2`` term in Phi.

Against it, for CNNs with max, average and no pooling (one conv layer, and two conv layers
whose kernel, stride and padding differ so that the transposed convolution needs an output
padding and a pool drops an odd row and column), the tests check:

* the engine's ``Phi`` has the hand-written value;
* one synchronous step of the engine (``model.step``) equals ``sigma(dPhi/ds_k)`` for every
  layer, with ``dPhi/ds_k`` from ``torch.autograd.grad`` of the hand-written Phi (free phase,
  and nudged through the loss term);
* the EP estimate the engine writes into every weight's and bias's ``.grad``
  (``compute_syn_grads``, and the ``EP`` estimator on real free and nudged phases) equals
  ``d/dtheta mean_batch(Phi(x, s^2, b2) - Phi(x, s^1, b1)) / (b1 - b2)`` by autograd of the
  hand-written Phi; one-sided (``b1 = 0``) this is ``-(1/beta) d/dtheta [Phi(s^beta) - Phi(s^0)]``
  averaged over the batch. Max-pool argmax positions are piecewise constant, so autograd is
  exact there.

All comparisons are absolute, to 1e-10.
"""

import pytest
import torch
import torch.nn.functional as F

from learning.estimators import EP, EPConfig
from utils_ep_fast import P_CNN

TOL = 1e-10
BATCH = 3

# A conv layer: (out_channels, kernel, stride, padding).
# One conv: 2x6x6 -> conv 3@3x3/1 pad 1 -> 3x6x6 -> pool -> 3x3x3 (or 3x6x6 with no pool).
ONE_CONV = dict(in_size=6, in_channels=2, convs=[(3, 3, 1, 1)], fc=[5, 4])
# Two convs: 1x8x8 -> conv 3@3x3/2 pad 1 -> 3x4x4 (the transposed conv needs output padding 1)
# -> pool -> 3x2x2 | 3x4x4 -> conv 2@2x2/1 pad 1 -> 2x3x3 | 2x5x5 -> pool (drops the odd row
# and column) -> 2x1x1 | 2x2x2, or no pool -> 2x3x3 | 2x5x5.
TWO_CONV = dict(in_size=8, in_channels=1, convs=[(3, 3, 2, 1), (2, 2, 1, 1)], fc=[5, 4])

POOL_FUNCTIONS = {
    "m": lambda z: F.max_pool2d(z, kernel_size=2, stride=2),
    "a": lambda z: F.avg_pool2d(z, kernel_size=2, stride=2),
    "i": lambda z: z,
}

# (id, architecture, pools, softmax readout, activation)
CASES = [
    *[(f"1conv-{p}-mse", ONE_CONV, p, False, "my_hard_sig") for p in "mai"],
    *[(f"2conv-{p}{q}-mse", TWO_CONV, p + q, False, "my_hard_sig") for p in "mai" for q in "mai"],
    ("2conv-ma-softmax", TWO_CONV, "ma", True, "mysig"),
    ("2conv-im-softmax", TWO_CONV, "im", True, "my_hard_sig"),
]
CASE_IDS = [case[0] for case in CASES]


def build(arch: dict, pools: str, softmax: bool, activation: str) -> P_CNN:
    """The model through its public constructor, float64, seeded."""
    torch.manual_seed(0)
    convs = arch["convs"]
    model = P_CNN(
        in_size=arch["in_size"],
        in_channels=arch["in_channels"],
        channels=[c[0] for c in convs],
        kernels=[c[1] for c in convs],
        strides=[c[2] for c in convs],
        paddings=[c[3] for c in convs],
        pools=pools,
        fc=arch["fc"],
        activation=activation,
        softmax=softmax,
        loss="cel" if softmax else "mse",
    )
    return model.double()


def random_case(model: P_CNN, arch: dict, seed: int = 1):
    """A batch ``x`` in [0, 1), labels, and random states in [0, 1) of the engine's shapes."""
    generator = torch.Generator().manual_seed(seed)
    size = arch["in_size"]
    x = torch.rand(
        (BATCH, arch["in_channels"], size, size), generator=generator, dtype=torch.float64
    )
    y = torch.randint(0, arch["fc"][-1], (BATCH,), generator=generator)
    states = [
        torch.rand((BATCH, *link.shape), generator=generator, dtype=torch.float64)
        for link in model.links
    ]
    return x, y, states


def hand_phi(model, arch, pools, softmax, x, y, states, beta):
    """Phi per sample (B,), written out by hand from the synapses' weights (module docstring)."""
    convs, fc = arch["convs"], arch["fc"]
    synapses = list(model.synapses)
    phi = torch.zeros(x.shape[0], dtype=x.dtype)
    below = x
    for i, (out_channels, kernel, stride, padding) in enumerate(convs):
        weight, bias = synapses[i].weight, synapses[i].bias
        assert weight.shape == (out_channels, below.shape[1], kernel, kernel)
        z = F.conv2d(below, weight, bias, stride=stride, padding=padding)
        pooled = POOL_FUNCTIONS[pools[i]](z)
        assert pooled.shape == states[i].shape, f"conv layer {i + 1}"
        phi = phi + (pooled * states[i]).sum((1, 2, 3))
        below = states[i]
    below = below.flatten(1)
    dense = len(fc) - 1 if softmax else len(fc)
    for j in range(len(convs), len(convs) + dense):
        weight, bias = synapses[j].weight, synapses[j].bias
        drive = below @ weight.T + bias
        assert drive.shape == states[j].shape, f"dense layer {j + 1}"
        phi = phi + (drive * states[j]).sum(1)
        below = states[j]
    assert len(states) == len(convs) + dense
    if beta != 0.0:
        if softmax:
            readout = synapses[-1]
            logits = below @ readout.weight.T + readout.bias
            loss = torch.logsumexp(logits, 1) - logits.gather(1, y[:, None])[:, 0]
        else:
            onehot = torch.zeros_like(below)
            onehot[torch.arange(below.shape[0]), y] = 1.0
            loss = 0.5 * (below - onehot).pow(2).sum(1)
        phi = phi - beta * loss
    return phi


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("name,arch,pools,softmax,activation", CASES, ids=CASE_IDS)
def test_engine_phi_equals_hand_written_phi(name, arch, pools, softmax, activation, beta):
    model = build(arch, pools, softmax, activation)
    x, y, states = random_case(model, arch)
    with torch.no_grad():
        want = hand_phi(model, arch, pools, softmax, x, y, states, beta)
        got = model.Phi(x, y, states, beta)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5], ids=["free", "nudged"])
@pytest.mark.parametrize("name,arch,pools,softmax,activation", CASES, ids=CASE_IDS)
def test_step_equals_sigma_of_autograd_of_hand_phi(name, arch, pools, softmax, activation, beta):
    model = build(arch, pools, softmax, activation)
    x, y, states = random_case(model, arch)
    leaves = [state.clone().requires_grad_(True) for state in states]
    phi = hand_phi(model, arch, pools, softmax, x, y, leaves, beta).sum()
    grads = torch.autograd.grad(phi, leaves)
    with torch.no_grad():
        stepped = model.step(x, y, states, beta)
    assert len(stepped) == len(grads)
    for k, (got, grad) in enumerate(zip(stepped, grads, strict=True)):
        want = model.sigma(grad)
        torch.testing.assert_close(
            got, want, atol=TOL, rtol=0, msg=lambda m, k=k: f"s_{k + 1}: {m}"
        )


def expected_estimate(model, arch, pools, softmax, x, y, first, second, betas):
    """``d/dtheta mean(Phi(s^2, b2) - Phi(s^1, b1)) / (b1 - b2)`` by autograd of the hand Phi."""
    beta_1, beta_2 = betas
    difference = hand_phi(model, arch, pools, softmax, x, y, second, beta_2) - hand_phi(
        model, arch, pools, softmax, x, y, first, beta_1
    )
    objective = difference.mean() / (beta_1 - beta_2)
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(objective, params), strict=True))


def assert_grads_match(model, expected):
    names = {name for name, _ in model.named_parameters()}
    assert names == set(expected)
    assert any(name.endswith("bias") for name in names)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert expected[name].abs().max() > 1e-4, name  # a gradient the check can see
        torch.testing.assert_close(param.grad, expected[name], atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("betas", [(0.0, 0.5), (-0.3, 0.3)], ids=["one-sided", "symmetric"])
@pytest.mark.parametrize("name,arch,pools,softmax,activation", CASES, ids=CASE_IDS)
def test_estimate_equals_autograd_of_hand_phi_difference(
    name, arch, pools, softmax, activation, betas
):
    model = build(arch, pools, softmax, activation)
    x, y, first = random_case(model, arch, seed=1)
    _, _, second = random_case(model, arch, seed=2)
    expected = expected_estimate(model, arch, pools, softmax, x, y, first, second, betas)
    model.zero_grad(set_to_none=True)
    model.compute_syn_grads(x, y, first, second, betas)
    assert_grads_match(model, expected)


@pytest.mark.parametrize("name,arch,pools,softmax,activation", CASES, ids=CASE_IDS)
def test_ep_estimate_equals_autograd_of_hand_phi_difference(name, arch, pools, softmax, activation):
    """Real phases: free ``s^0`` after T1 steps from zero, nudged ``s^beta`` after T2 more; the
    estimate is ``-(1/beta) d/dtheta mean(Phi(x, s^beta, beta) - Phi(x, s^0, 0))``. With
    ``mysig`` (never saturating) every parameter gets a gradient the check can see; with a
    clamp, the default init leaves the dense hidden layer of the 1-conv pooled nets at 0."""
    model = build(arch, pools, softmax, "mysig")
    x, y, _ = random_case(model, arch)
    beta = 0.5
    model.zero_grad(set_to_none=True)
    free, nudged = EP(EPConfig(T1=6, T2=4, betas=(0.0, beta))).estimate(model, x, y)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(free, nudged, strict=True))
    expected = expected_estimate(model, arch, pools, softmax, x, y, free, nudged, (0.0, beta))
    assert_grads_match(model, expected)
