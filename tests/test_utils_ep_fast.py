"""The explicit EP engine against autograd of Phi, EP against BPTT (the GDU theorem), and the
settling trace against a long async settle."""

import pytest
import torch
from math_checks import ARCHITECTURES, MLPS, build, converged_case, cosine, random_case

import data_utils
from utils_ep_fast import P_MLP, EPConfig, gdu_check, settling_trace


@pytest.mark.parametrize("beta", [0.0, 0.7])
@pytest.mark.parametrize(
    "name,kwargs,input_shape", ARCHITECTURES + MLPS, ids=[a[0] for a in ARCHITECTURES + MLPS]
)
def test_explicit_step_equals_sigma_of_autograd_dphi(name, kwargs, input_shape, beta):
    model = build(kwargs)
    x, y, neurons = random_case(model, input_shape)
    leaves = [state.clone().requires_grad_(True) for state in neurons]
    phi = model.Phi(x, y, leaves, beta).sum()
    grads = torch.autograd.grad(phi, leaves)
    expected = [model.sigma(g) for g in grads]
    if not model.softmax and model.loss_name == "cel":
        expected[-1] = grads[-1]  # output units take dPhi/ds itself with CE on them
    with torch.no_grad():
        updated = model.step(x, y, neurons, beta)
    for k, (got, want) in enumerate(zip(updated, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"layer {k + 1}")


@pytest.mark.parametrize("betas", [(0.0, 0.5), (-0.3, 0.3)], ids=["one-sided", "symmetric"])
@pytest.mark.parametrize(
    "name,kwargs,input_shape", ARCHITECTURES + MLPS, ids=[a[0] for a in ARCHITECTURES + MLPS]
)
def test_syn_grads_equal_autograd_of_phi_difference(name, kwargs, input_shape, betas):
    model = build(kwargs)
    x, y, neurons_1 = random_case(model, input_shape, seed=1)
    _, _, neurons_2 = random_case(model, input_shape, seed=2)
    beta_1, beta_2 = betas
    objective = (model.Phi(x, y, neurons_2, beta_2) - model.Phi(x, y, neurons_1, beta_1)).mean()
    expected = torch.autograd.grad(objective / (beta_1 - beta_2), list(model.parameters()))
    model.compute_syn_grads(x, y, neurons_1, neurons_2, betas)
    for (param_name, param), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want, atol=1e-10, rtol=0, msg=param_name)


def test_phi_hand_worked_mlp():
    """Phi for a 2-1-1 MLP written out by hand: <W1 x + b1, s1> + <W2 s1 + b2, s2> - beta L."""
    model = P_MLP([2, 1, 1], loss="mse").double()
    with torch.no_grad():
        model.synapses[0].weight.copy_(torch.tensor([[0.5, -1.0]]))
        model.synapses[0].bias.fill_(0.25)
        model.synapses[1].weight.fill_(2.0)
        model.synapses[1].bias.fill_(-0.5)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    s1 = torch.tensor([[0.3]], dtype=torch.float64)
    s2 = torch.tensor([[0.8]], dtype=torch.float64)
    y = torch.tensor([0])
    # (0.5 - 2 + 0.25) * 0.3 + (2 * 0.3 - 0.5) * 0.8 - 0.1 * 0.5 * (0.8 - 1)^2
    expected = -1.25 * 0.3 + 0.1 * 0.8 - 0.1 * 0.5 * 0.04
    assert model.Phi(x, y, [s1, s2], beta=0.1).item() == pytest.approx(expected, abs=1e-12)


def test_avg_pool_adjoint_is_a_quarter_spread():
    from links import AvgPool

    s = torch.tensor([[[[4.0]]]])
    spread = AvgPool().adjoint(s, None, torch.Size([1, 1, 3, 3]))
    expected = torch.tensor([[[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
    torch.testing.assert_close(spread, expected)


def test_symmetric_ep_matches_bptt_gradient_at_small_beta():
    """Theorem (Scellier & Bengio 2017; Ernoult et al. 2019): at a free fixed point, symmetric EP
    with beta -> 0 gives the gradient of the loss of the fixed point, which BPTT from the fixed
    point computes. Network: 6x6x1 -> conv 4@3x3 + maxpool -> fc 8 -> softmax readout 5;
    my_hard_sig, init scale 0.6; T1 = T2 = 150; beta = 0.01; float64."""
    model, x, y = converged_case()
    free = model(x, y, model.init_neurons(x), 150)
    after = model(x, y, free, 1)
    assert max((a - b).abs().max().item() for a, b in zip(after, free, strict=True)) < 1e-10

    beta = 0.01
    positive = model(x, y, free, 150, beta=beta)
    negative = model(x, y, free, 150, beta=-beta)
    model.compute_syn_grads(x, y, negative, positive, (-beta, beta))
    ep = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    final = model(x, y, free, 150, track_grad=True)
    model.loss(final, y).mean().backward()
    for name, param in model.named_parameters():
        bptt = param.grad
        relative_error = ((ep[name] - bptt).norm() / bptt.norm()).item()
        assert cosine(ep[name], bptt) >= 0.99, name
        assert relative_error <= 0.02, (name, relative_error)


def test_gdu_check_curves_agree_on_converged_network():
    model, x, y = converged_case()
    report = gdu_check(model, x, y, EPConfig(T1=150, T2=12, betas=(0.0, 0.01), thirdphase=True))
    assert set(report) == {name for name, _ in model.named_parameters()}
    for name, entry in report.items():
        assert entry["ep"].shape == entry["bptt"].shape == (12, *model.get_parameter(name).shape)
        assert entry["rel_rmse"] < 0.05, (name, entry["rel_rmse"])
        assert entry["sign_error"] < 0.05, name


def test_safe_point_runs_between_the_steps_of_every_phase_and_before_every_batch():
    """T1 = 4, T2 = 3 with a third phase: 3 + 2 + 2 calls inside a batch's phases, one more
    before each batch; the hook is passed in ``Phases``, no part of the model."""
    from utils_ep_fast import EP, Phases, make_optimizer, train_epoch

    torch.manual_seed(0)
    model = P_MLP([6, 5, 3])
    calls = []
    phases = Phases(safe_point=lambda: calls.append(len(calls)))
    loader = [(torch.rand(4, 6), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    rule = EP(EPConfig(T1=4, T2=3, betas=(0.0, 0.5), thirdphase=True))
    train_epoch(model, make_optimizer(model, "sgd", [0.1, 0.1]), loader, rule, phases=phases)
    assert len(calls) == 2 * (1 + 3 + 2 + 2)
    assert not hasattr(model, "safe_point")
    assert set(model.state_dict()) == {
        f"synapses.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")
    }


def test_settling_gap_is_measured_against_a_long_async_settle():
    """The reference is the lowest energy of 4 T1 async free steps from zero, then 4 T2 nudged
    ones (computed here step by step); an async free phase of T1 steps never goes below it,
    and an unsettled phase ends above it instead of at 1e-12."""
    _, layers, shape = ARCHITECTURES[3]  # 4 convs and 2 fc layers
    model = build({**layers, "activation": "my_hard_sig", "scale": 2.0})
    x, y, _ = random_case(model, shape, batch=4)
    T1, T2, betas = 3, 2, (0.0, 0.5)
    traces = settling_trace(model, x, y, T1, T2, betas)
    model.set_dynamics("async")
    neurons = model.init_neurons(x)
    lowest = []
    with torch.no_grad():
        for steps, beta in ((4 * T1, betas[0]), (4 * T2, betas[1])):
            energies = [model.energy(x, y, neurons, beta).mean().item()]
            for _ in range(steps):
                neurons = model(x, y, neurons, 1, beta=beta)
                energies.append(model.energy(x, y, neurons, beta).mean().item())
            lowest.append(min(energies))
    for trace in traces.values():
        assert trace["free_reference"].item() == pytest.approx(lowest[0], rel=1e-12)
        assert trace["nudged_reference"].item() == pytest.approx(lowest[1], rel=1e-12)
    async_free = traces["async"]["free_energy"]
    assert (async_free >= lowest[0] - 1e-12 * abs(lowest[0])).all()
    free_gap, _ = data_utils.energy_gaps(traces["async"])
    assert free_gap[-1].item() == pytest.approx(async_free[-1].item() - lowest[0], rel=1e-9)
    assert free_gap[-1].item() > 1e-3  # 3 steps do not settle this network
