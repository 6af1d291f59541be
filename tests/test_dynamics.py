"""Asynchronous (odd/even) dynamics, the energy they descend, and phases that stop when settled.

Independent references: ``sigma(autograd dPhi/ds)`` for fixed points, a two-neuron network
worked by hand for the energy, and a step-by-step loop for the stopping rule.
"""

import pytest
import torch
from math_checks import ARCHITECTURES, LCA_SMALL, converged_case, cosine

from dynamics import EAGER, Phases, half_step
from lca_utils_ep_fast import LCA_CNN
from learning.metrics import Metrics
from learning.registry import make_estimator
from links import CopyLink
from utils_ep_fast import P_CNN, P_MLP, EPConfig, gdu_check, max_change, train_batch

# the seed RCNN's layout (4 convs 3x3 pad 1, max-pools, softmax readout), small
SEED_SHAPED = {**ARCHITECTURES[3][1], "pools": "mmmm", "fc": [10], "activation": "my_hard_sig"}
MLP_SMALL = dict(archi=[12, 9, 7, 10], activation="my_hard_sig", loss="mse")


def make_model(kind: str, scale: float, seed: int = 0, **overrides):
    """A float64 model: ``cnn`` (seed-shaped), ``lca`` (LCACNN) or ``mlp``."""
    torch.manual_seed(seed)
    if kind == "cnn":
        model = P_CNN(**{**SEED_SHAPED, "scale": scale, **overrides})
    elif kind == "lca":
        model = LCA_CNN(**{**LCA_SMALL, "scale": scale, **overrides})
    else:
        model = P_MLP(**{**MLP_SMALL, "scale": scale, **overrides})
    return model.double()


def images(kind: str, batch: int = 4, seed: int = 1):
    """Random float64 images of the model kind's input shape, and labels."""
    generator = torch.Generator().manual_seed(seed)
    shape = {"cnn": (3, 16, 16), "lca": (1, 8, 8), "mlp": (12,)}[kind]
    x = torch.rand((batch, *shape), generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 10, (batch,), generator=generator)


def inputs(model, kind: str, batch: int = 4, seed: int = 1):
    """The system's fixed input (the LCA code for ``lca``) and labels."""
    x, y = images(kind, batch, seed)
    return model.prepare_input(x).code, y


def settle_with(model, dynamics: str, x, y, T: int, beta: float = 0.0, start=None):
    model.set_dynamics(dynamics)
    start = model.init_neurons(x) if start is None else start
    return model(x, y, start, T, beta=beta)


def sigma_of_autograd_dphi(model, x, y, neurons, beta=0.0):
    """The synchronous map written from autograd of Phi, the copy layer's feedback scaled."""
    leaves = [state.clone().requires_grad_(True) for state in neurons]
    grads = torch.autograd.grad(model.Phi(x, y, leaves, beta).sum(), leaves)
    grads = list(grads)
    if isinstance(model.links[0], CopyLink):
        grads[0] = x + model.scale_feedback * (grads[0] - x)
    return [model.sigma(grad) for grad in grads]


CASES = [
    ("seed-shaped RCNN", "cnn", {}),
    ("LCACNN g=1", "lca", {"scale_feedback": 1.0}),
    ("LCACNN g=0.01", "lca", {"scale_feedback": 0.01}),
    ("MLP", "mlp", {}),
]


@pytest.mark.parametrize("name,kind,overrides", CASES, ids=[c[0] for c in CASES])
def test_async_and_sync_reach_the_same_unique_fixed_point(name, kind, overrides):
    """Small weights (init scale 0.3): a contraction, one fixed point. Each dynamics' settled
    state is a fixed point of the synchronous map sigma(dPhi/ds), and both states agree."""
    model = make_model(kind, 0.3, **overrides)
    x, y = inputs(model, kind)
    settled = {dyn: settle_with(model, dyn, x, y, 200) for dyn in ("sync", "async")}
    for dynamics, states in settled.items():
        mapped = sigma_of_autograd_dphi(model, x, y, states)
        assert max_change(states, mapped) < 1e-9, dynamics
    assert max_change(settled["sync"], settled["async"]) <= 1e-5
    assert any(state.abs().max() > 0.01 for state in settled["async"])  # not a trivial zero


def test_fixed_points_of_one_dynamics_are_fixed_points_of_the_other():
    """Large weights (init scale 2.5): the two dynamics may settle in different fixed points,
    but each one's is a fixed point of the other's map."""
    model = make_model("cnn", 2.5)
    x, y = inputs(model, "cnn", batch=6)
    sync = settle_with(model, "sync", x, y, 400)
    asyn = settle_with(model, "async", x, y, 400)
    assert max_change(asyn, settle_with(model, "async", x, y, 1, start=asyn)) < 1e-9
    assert max_change(asyn, settle_with(model, "sync", x, y, 1, start=asyn)) < 1e-9
    if max_change(sync, settle_with(model, "sync", x, y, 1, start=sync)) < 1e-9:  # settled
        assert max_change(sync, settle_with(model, "async", x, y, 1, start=sync)) < 1e-9


def test_a_full_async_step_is_the_odd_then_the_even_half_step():
    model = make_model("lca", 1.0, scale_feedback=0.01)
    x, y = inputs(model, "lca")
    start = [torch.rand_like(state) for state in model.init_neurons(x)]
    odd_first = half_step(model, x, y, half_step(model, x, y, start, 1, 0.3), 0, 0.3)
    step = settle_with(model, "async", x, y, 1, beta=0.3, start=start)
    assert max_change(odd_first, step) == 0.0
    # a half-step updates exactly its parity (1-based: list indices 0, 2 are layers 1, 3)
    half = half_step(model, x, y, start, 1, 0.3)
    assert torch.equal(half[1], start[1]) and not torch.equal(half[0], start[0])
    # and each updated layer is sigma(dPhi/ds) of the current states
    assert max_change(half[0::2], sigma_of_autograd_dphi(model, x, y, start, 0.3)[0::2]) < 1e-12


# ---- the energy ----------------------------------------------------------------------------


def two_neurons(activation: str = "hard_sigmoid") -> P_MLP:
    """MLP 1 -> 1 -> 1 with s_1 driven by a bias of 1, s_2 = clamp(-2 s_1 + 1): the two units
    inhibit each other."""
    model = P_MLP([1, 1, 1], activation=activation, loss="mse").double()
    with torch.no_grad():
        model.synapses[0].weight.zero_()
        model.synapses[0].bias.fill_(1.0)
        model.synapses[1].weight.fill_(-2.0)
        model.synapses[1].bias.fill_(1.0)
    return model


def test_energy_of_two_neurons_by_hand():
    """hard_sigmoid (c = 1): E = s1^2/2 + s2^2/2 - (1 s1 + (-2 s1 + 1) s2);
    my_hard_sig (c = 1/2): E = s1^2 + s2^2 - (same Phi)."""
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0])
    s1, s2 = 0.3, 0.8
    neurons = [torch.tensor([[s1]], dtype=torch.float64), torch.tensor([[s2]], dtype=torch.float64)]
    phi = s1 + (-2 * s1 + 1) * s2
    hard = two_neurons("hard_sigmoid").energy(x, y, neurons)
    assert hard.item() == pytest.approx(s1**2 / 2 + s2**2 / 2 - phi, abs=1e-12)
    mine = two_neurons("my_hard_sig").energy(x, y, neurons)
    assert mine.item() == pytest.approx(s1**2 + s2**2 - phi, abs=1e-12)


def test_sync_raises_the_energy_where_async_lowers_it():
    """From s = (0, 0), E = 0. Sync: s_1 = clamp(1 - 2*0) = 1 and s_2 = clamp(-2*0 + 1) = 1
    together, E = 1/2 + 1/2 - (1 + (-2 + 1)) = 1: up. Async: s_1 = 1, then s_2 = clamp(-2 + 1)
    = 0, E = 1/2 - 1 = -1/2: down. Sync then oscillates between (0, 0) and (1, 1)."""
    model = two_neurons()
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0])
    zero = model.init_neurons(x)
    sync = settle_with(model, "sync", x, y, 1, start=zero)
    assert [s.item() for s in sync] == [1.0, 1.0]
    assert model.energy(x, y, sync).item() == pytest.approx(1.0)
    assert [s.item() for s in settle_with(model, "sync", x, y, 2, start=zero)] == [0.0, 0.0]
    asyn = settle_with(model, "async", x, y, 1, start=zero)
    assert [s.item() for s in asyn] == [1.0, 0.0]
    assert model.energy(x, y, asyn).item() == pytest.approx(-0.5)


DESCENT_CASES = [
    ("seed-shaped RCNN", "cnn", {}),
    ("avg pools, fc, mse", "cnn", dict(pools="aami", fc=[7, 10], softmax=False, loss="mse")),
    ("cel on output units", "cnn", dict(pools="mimi", softmax=False, loss="cel")),
    ("LCACNN g=0.01", "lca", {"scale_feedback": 0.01}),
    ("LCACNN g=1", "lca", {"scale_feedback": 1.0}),
    ("MLP", "mlp", {}),
]


@pytest.mark.parametrize("activation", ["hard_sigmoid", "my_hard_sig"])
@pytest.mark.parametrize("name,kind,overrides", DESCENT_CASES, ids=[c[0] for c in DESCENT_CASES])
def test_async_half_steps_never_raise_the_energy(name, kind, overrides, activation):
    """Free phase, large random weights (init scale 3, several fixed points), random starts in
    the box, 5 seeds x 8 steps: E of every sample never goes up from one half-step to the
    next (float64 rounding aside), and it does go down."""
    top = {"hard_sigmoid": 1.0, "my_hard_sig": 1.0}[activation]
    total_drop = 0.0
    for seed in range(5):
        model = make_model(kind, 3.0, seed=seed, activation=activation, **overrides)
        x, y = inputs(model, kind, seed=seed)
        generator = torch.Generator().manual_seed(100 + seed)
        neurons = [
            torch.rand(state.shape, generator=generator, dtype=torch.float64) * top
            for state in model.init_neurons(x)
        ]
        if not model.softmax and model.loss_name == "cel":
            neurons[-1] = neurons[-1] * 4 - 2  # output units without an activation
        energy = model.energy(x, y, neurons)
        for _ in range(8):
            for parity in (1, 0):
                neurons = half_step(model, x, y, neurons, parity)
                after = model.energy(x, y, neurons)
                scale = 1e-12 * (1 + energy.abs())
                assert (after - energy <= scale).all(), (seed, (after - energy).max().item())
                total_drop += (energy - after).sum().item()
                energy = after
    assert total_drop > 1.0


def test_energy_is_stationary_at_a_settled_state():
    """dE/ds_k = s_k / c - dPhi/ds_k vanishes on units strictly inside the clamp's box: E is the
    function the dynamics settle (here LCACNN with g = 0.01, whose copy terms E divides by g)."""
    model = make_model("lca", 0.3, scale_feedback=0.01)
    x, y = inputs(model, "lca")
    settled = settle_with(model, "async", x, y, 200)
    leaves = [state.clone().requires_grad_(True) for state in settled]
    grads = torch.autograd.grad(model.energy(x, y, leaves).sum(), leaves)
    for k, (state, grad) in enumerate(zip(settled, grads, strict=True)):
        inside = (state > 1e-9) & (state < 1 - 1e-9)
        assert inside.any(), k
        assert grad[inside].abs().max() < 1e-8, k


def test_energy_needs_a_clamp_activation():
    model = make_model("mlp", 1.0, activation="tanh")
    x, y = inputs(model, "mlp")
    with pytest.raises(ValueError, match="clamp activations"):
        model.energy(x, y, model.init_neurons(x))


# ---- EP and BPTT with async dynamics -------------------------------------------------------


@pytest.mark.parametrize("kind", ["cnn", "lca"])
def test_ep_updates_from_async_fixed_points_equal_those_from_sync(kind):
    model = make_model(kind, 0.3)
    x, y = images(kind)
    cfg = EPConfig(T1=150, T2=150, betas=(0.0, 0.2), thirdphase=True)
    grads = {}
    for dynamics in ("sync", "async"):
        model.set_dynamics(dynamics)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights
        train_batch(model, optimizer, x, y, make_estimator(cfg))
        grads[dynamics] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for sync, asyn in zip(grads["sync"], grads["async"], strict=True):
        torch.testing.assert_close(asyn, sync, atol=1e-7, rtol=1e-6)


def test_gdu_theorem_holds_with_async_dynamics_once_the_nudged_phase_settled():
    """The GDU check of test_utils_ep_fast with async steps in every phase and in BPTT's graph. EP's
    update after the nudged phase equals BPTT's gradient through as many steps from the free
    fixed point (the fixed-point form of the theorem). The step-by-step identity of the
    transient is a property of the synchronous map: with async steps the first layer's curve
    differs early on (measured: rel. RMSE 0.28 over 12 steps, 0.16 over 40)."""
    model, x, y = converged_case()
    model.set_dynamics("async")
    report = gdu_check(model, x, y, EPConfig(T1=150, T2=40, betas=(0.0, 0.01), thirdphase=True))
    for name, entry in report.items():
        ep, bptt = entry["ep"][-1], entry["bptt"][-1]
        assert (ep - bptt).norm() <= 1e-3 * bptt.norm(), name
        assert cosine(ep, bptt) > 0.999, name


def test_bptt_backpropagates_through_async_steps():
    """BPTT's gradient through T async steps equals autograd of the loss of the same steps
    unrolled by hand with half_step."""
    model = make_model("cnn", 1.0)
    x, y = inputs(model, "cnn")
    start = [torch.rand_like(state) for state in model.init_neurons(x)]
    model.set_dynamics("async")
    model.zero_grad()
    model.loss(model(x, y, start, 3, track_grad=True), y).mean().backward()
    engine = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    states = start
    for _ in range(3):
        states = half_step(model, x, y, half_step(model, x, y, states, 1), 0)
    model.loss(states, y).mean().backward()
    for got, want in zip(engine, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# ---- phases that stop when settled ---------------------------------------------------------


def first_settled_step(model, dynamics, x, y, T, tol, every):
    """Step one at a time (no tolerance): the first t that is a multiple of ``every`` (or T)
    where max|s_t - s_(t-1)| < tol, and the states then."""
    neurons = model.init_neurons(x)
    for t in range(1, T + 1):
        previous, neurons = neurons, settle_with(model, dynamics, x, y, 1, start=neurons)
        if (t % every == 0 or t == T) and max_change(previous, neurons) < tol:
            return t, True, neurons
    return T, False, neurons


@pytest.mark.parametrize("dynamics", ["sync", "async"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("tol,T", [(1e-4, 200), (1e-7, 200), (1e-30, 4)])
def test_tol_stops_at_the_first_check_where_settled(dynamics, every, tol, T):
    model = make_model("mlp", 2.0)
    x, y = inputs(model, "mlp")
    want_steps, want_settled, want_states = first_settled_step(model, dynamics, x, y, T, tol, every)
    model.set_dynamics(dynamics, tol=tol, tol_every=every)
    got, record = EAGER.run_recorded(model, x, y, model.init_neurons(x), T)
    assert record.steps == want_steps <= T
    assert record.settled is want_settled
    assert max_change(got, want_states) == 0.0
    if tol == 1e-30:
        assert (want_steps, want_settled) == (T, False)  # the cap, reported as not settled
    else:
        assert every < want_steps < T


def test_without_tol_phases_take_exactly_T1_and_T2_steps():
    model = make_model("cnn", 1.0)
    x, y = inputs(model, "cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for dynamics in ("sync", "async"):
        model.set_dynamics(dynamics)
        metrics = Metrics()
        rule = make_estimator(EPConfig(T1=7, T2=3, thirdphase=True))
        train_batch(model, optimizer, x, y, rule, Phases(log=metrics))
        assert [(name, record.steps, record.settled) for name, record in metrics.phases] == [
            ("free", 7, None),
            ("nudged", 3, None),
            ("nudged", 3, None),
        ]


def test_a_phase_that_never_settles_stops_at_its_cap_and_says_so():
    """The two inhibiting neurons: sync oscillates between (0, 0) and (1, 1) forever; async
    settles at (1, 0) after its first step (checked at step 5, the first check)."""
    model = two_neurons()
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0])
    model.set_dynamics("sync", tol=1e-3)
    assert EAGER.run_recorded(model, x, y, model.init_neurons(x), 23)[1] == (23, False)
    model.set_dynamics("async", tol=1e-3)
    states, record = EAGER.run_recorded(model, x, y, model.init_neurons(x), 23)
    assert [s.item() for s in states] == [1.0, 0.0]
    assert record == (5, True)


def test_tol_does_not_cut_bptt_graph():
    model = make_model("cnn", 0.3)
    x, y = inputs(model, "cnn")
    model.set_dynamics("async", tol=1e-3, tol_every=1)
    record = EAGER.run_recorded(model, x, y, model.init_neurons(x), 100, track_grad=True)[1]
    assert record == (100, None)


@pytest.mark.parametrize("activation", ["my_hard_sig", "tanh"])
def test_settling_trace_and_its_figure(activation, tmp_path):
    """The diagnostic behind settling.png: per step of each dynamics, the mean energy (async:
    never up in the free phase) and max|ds| (async: 0 once settled); tanh has no energy."""
    import data_utils
    from experiment import storage
    from utils_ep_fast import settling_trace

    model = make_model("cnn", 2.0, activation=activation)
    x, y = images("cnn")
    traces = settling_trace(model, x, y, 30, 6, (0.0, 0.5))
    assert set(traces) == {"sync", "async"}
    for trace in traces.values():
        assert trace["free_change"].shape == (30,) and trace["nudged_change"].shape == (6,)
    if activation == "tanh":
        assert traces["async"]["free_energy"] is None
    else:
        energy = traces["async"]["free_energy"]
        assert energy.shape == (31,) and (energy.diff() <= 1e-12 * energy.abs()[1:]).all()
        mean_energy = model.energy(x, y, settle_with(model, "async", x, y, 30)).mean()
        torch.testing.assert_close(energy[-1], mean_energy)
    storage.save_figure(data_utils.plot_settling(traces, "title"), tmp_path / "settling.png")
    assert (tmp_path / "settling.png").stat().st_size > 0
