"""lca-pytorch's interface of LCAConv2D: warm starts, the drive term, per-step outputs, weight
initialisers, gradients and input checks, each against a computation written out here."""

import pytest
import torch
import torch.nn.functional as F

from lca import LCAConv2D

ALL_VARS = ["inputs", "input_drives", "states", "acts", "recons", "recon_errors", "conns"]


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def unit_features(n_feat: int, n_chan: int, k: int, seed: int) -> torch.Tensor:
    weights = seeded(n_feat, n_chan, k, k, seed=seed)
    return weights / weights.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def valid_lca(weights: torch.Tensor, **settings) -> LCAConv2D:
    """A float64 layer holding ``weights``: 'valid' padding, no input normalisation."""
    options = dict(kernel_size=weights.shape[-1], pad="valid", input_zero_mean=False,
                   input_unit_var=False, lambda_=0.1, tau=4)  # fmt: skip
    options.update(settings)
    lca = LCAConv2D(weights.shape[0], weights.shape[1], **options).double()
    lca.assign_weight_values(weights.detach().clone(), normalize=False)
    return lca


def reference_steps(x, weights, u0, extra_drive, stride, lam, tau, iters):
    """LCA with 'valid' padding, written with torch's own convolutions: per iteration t

        a_t = relu(u_{t-1} - lam),  u_t = u_{t-1} + (b - u_{t-1} - (D^T D a_t - |D_f|^2 a_t)) / tau

    with b = D^T x + extra_drive. Returns b and the list of (u_t, a_t), t = 1..iters.
    """
    b = F.conv2d(x, weights, stride=stride) + extra_drive
    self_overlap = weights.pow(2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    u, steps = u0, []
    for _ in range(iters):
        a = F.relu(u - lam)
        canvas = F.conv_transpose2d(a, weights, stride=stride)
        u = u + (b - u - (F.conv2d(canvas, weights, stride=stride) - self_overlap * a)) / tau
        steps.append((u, a))
    return b, steps


# ---------------------------------------------------------------------------------------------
# Warm start and the drive term
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("req_grad", [False, True])
def test_warm_start_continues_a_finished_run(req_grad):
    # Default normalisation, 'same' padding, stride 2: 2 x 50 iterations equal 100.
    settings = dict(kernel_size=5, stride=2, lambda_=0.2, tau=10, req_grad=req_grad,
                    return_vars=["states", "acts"])  # fmt: skip
    torch.manual_seed(3)
    whole = LCAConv2D(6, 2, lca_iters=100, **settings).double()
    halves = LCAConv2D(6, 2, lca_iters=50, **settings).double()
    halves.assign_weight_values(whole.weights.detach().clone(), normalize=False)
    x = seeded(2, 2, 10, 10, seed=4)

    states_100, acts_100 = whole(x)
    states_50, _ = halves(x)
    states_2x50, acts_2x50 = halves(x, initial_states=states_50)

    assert acts_100.count_nonzero() > 0
    torch.testing.assert_close(states_2x50, states_100, atol=1e-12, rtol=0)
    torch.testing.assert_close(acts_2x50, acts_100, atol=1e-12, rtol=0)


@pytest.mark.parametrize("req_grad", [False, True])
def test_initial_states_and_drive_scaling_match_the_reference_loop(req_grad):
    # lca-pytorch adds drive_scaling to the drive; input_drives is returned with it added.
    weights = unit_features(4, 2, 3, seed=5)
    x, u0, extra = (
        seeded(2, 2, 9, 9, seed=6),
        seeded(2, 4, 4, 4, seed=7),
        seeded(2, 4, 4, 4, seed=8),
    )
    lca = valid_lca(weights, stride=2, lca_iters=3, req_grad=req_grad,
                    return_vars=["input_drives", "states", "acts"])  # fmt: skip
    drives, states, acts = lca(x, extra, u0)

    b, steps = reference_steps(x, weights, u0, extra, stride=2, lam=0.1, tau=4, iters=3)
    torch.testing.assert_close(drives, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(states, steps[-1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(acts, steps[-1][1], atol=1e-12, rtol=0)
    assert steps[0][1].count_nonzero() > 0  # the warm start made the first acts non-zero
    # The caller's start is not written to.
    torch.testing.assert_close(u0, seeded(2, 4, 4, 4, seed=7), atol=0, rtol=0)


def test_one_step_from_a_given_state_by_hand():
    # One 1x1 feature d = 1 on one pixel s = 2, lambda = 0.5, tau = 2, u0 = 1.5, scaling 1:
    # b = 2 + 1 = 3, a = 1.0, G = 0, u = 1.5 + (3 - 1.5) / 2 = 2.25.
    lca = valid_lca(torch.ones(1, 1, 1, 1, dtype=torch.float64), lambda_=0.5, tau=2,
                    lca_iters=1, return_vars=["acts", "states"])  # fmt: skip
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    acts, states = lca(2 * one, drive_scaling=one, initial_states=1.5 * one)
    assert acts.item() == 1.0 and states.item() == 2.25


# ---------------------------------------------------------------------------------------------
# return_all_ts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("req_grad", [False, True])
def test_return_all_ts_stacks_the_per_step_values(req_grad):
    weights = unit_features(3, 2, 3, seed=9)
    x, iters = seeded(2, 2, 7, 7, seed=10), 4
    lca = valid_lca(weights, lca_iters=iters, return_all_ts=True, req_grad=req_grad,
                    return_vars=ALL_VARS)  # fmt: skip
    inputs, drives, states, acts, recons, errors, conns = lca(x)

    u0 = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    b, steps = reference_steps(x, weights, u0, 0.0, stride=1, lam=0.1, tau=4, iters=iters)
    last = valid_lca(weights, lca_iters=iters, return_vars=["conns"])(x)
    assert states.shape == (2, 3, 5, 5, iters) and recons.shape == (2, 2, 7, 7, iters)
    for t, (u_t, a_t) in enumerate(steps):
        recon_t = F.conv_transpose2d(a_t, weights)
        torch.testing.assert_close(states[..., t], u_t, atol=1e-12, rtol=0)
        torch.testing.assert_close(acts[..., t], a_t, atol=1e-12, rtol=0)
        torch.testing.assert_close(recons[..., t], recon_t, atol=1e-12, rtol=0)
        torch.testing.assert_close(errors[..., t], x - recon_t, atol=1e-12, rtol=0)
        torch.testing.assert_close(inputs[..., t], x, atol=0, rtol=0)
        torch.testing.assert_close(drives[..., t], b, atol=1e-12, rtol=0)
        torch.testing.assert_close(conns[..., t], last, atol=0, rtol=0)
    assert acts[..., -1].count_nonzero() > 0


def test_return_all_ts_step_t_equals_a_run_of_t_iterations():
    # 'same' padding, stride 2, input normalisation on: step t of one run is the result of a
    # separate run with lca_iters = t.
    torch.manual_seed(11)
    settings = dict(kernel_size=5, stride=2, lambda_=0.1, tau=5, return_vars=["acts", "recons"])
    stacked = LCAConv2D(4, 2, lca_iters=5, return_all_ts=True, **settings).double()
    x = seeded(1, 2, 9, 9, seed=12)
    acts_all, recons_all = stacked(x)
    for t in range(1, 6):
        single = LCAConv2D(4, 2, lca_iters=t, **settings).double()
        single.assign_weight_values(stacked.weights.detach().clone(), normalize=False)
        acts, recons = single(x)
        torch.testing.assert_close(acts_all[..., t - 1], acts, atol=1e-12, rtol=0)
        torch.testing.assert_close(recons_all[..., t - 1], recons, atol=1e-12, rtol=0)


def test_return_all_ts_single_var_is_a_tensor():
    lca = LCAConv2D(8, 3, kernel_size=7, lca_iters=6, return_all_ts=True)
    assert lca(torch.randn(9, 3, 11, 11)).shape == (9, 8, 11, 11, 6)


# ---------------------------------------------------------------------------------------------
# weight_init
# ---------------------------------------------------------------------------------------------


def unit_rows(weights: torch.Tensor) -> torch.Tensor:
    return weights / (weights.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


@pytest.mark.parametrize(
    "how",
    [
        dict(weight_init=torch.nn.init.normal_, weight_init_kwargs={"mean": 0.5, "std": 2.0}),
        dict(weight_init=(torch.nn.init.normal_, {"mean": 0.5, "std": 2.0})),
        dict(weight_init=(torch.nn.init.normal_, {"mean": 0.5}), weight_init_kwargs={"std": 2.0}),
    ],
)
def test_weight_init_callable_and_kwargs(how):
    torch.manual_seed(13)
    expected = unit_rows(torch.empty(5, 2, 3, 3).normal_(mean=0.5, std=2.0))
    torch.manual_seed(13)
    lca = LCAConv2D(5, 2, kernel_size=3, **how)
    torch.testing.assert_close(lca.weights.detach(), expected, atol=1e-7, rtol=0)


def test_default_weight_init_is_lca_pytorchs_truncated_normal():
    torch.manual_seed(14)
    expected = unit_rows(torch.nn.init.trunc_normal_(torch.empty(5, 2, 3, 3)))
    torch.manual_seed(14)
    lca = LCAConv2D(5, 2, kernel_size=3)
    torch.testing.assert_close(lca.weights.detach(), expected, atol=1e-7, rtol=0)
    assert lca.weight_init is torch.nn.init.trunc_normal_ and lca.weight_init_kwargs == {}


def test_orthogonal_init_gives_orthonormal_features():
    lca = LCAConv2D(6, 2, kernel_size=3, weight_init=torch.nn.init.orthogonal_)
    flat = lca.weights.detach().flatten(1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(6), atol=1e-5, rtol=0)


def test_weight_init_gets_an_empty_dictionary_shaped_tensor():
    seen = {}

    def count_up(tensor, step):
        seen.update(shape=tuple(tensor.shape), step=step)
        with torch.no_grad():
            tensor.copy_(torch.arange(tensor.numel()).view_as(tensor) * step)
        # returning nothing is allowed: the filled tensor is used

    lca = LCAConv2D(3, 2, kernel_size=(3, 5), weight_init=count_up, weight_init_kwargs={"step": 2})
    assert seen == {"shape": (3, 2, 3, 5), "step": 2}
    ramp = torch.arange(90, dtype=torch.float32).view(3, 2, 3, 5)
    torch.testing.assert_close(lca.weights.detach(), unit_rows(ramp), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_gradients_into_initial_states_match_finite_differences_when_asked():
    # Through the whole forward pass ('same' padding, stride 2, input normalisation) to the
    # inputs, the drive term, the dictionary and, asked for with detach_initial_states=False,
    # the initial states.
    torch.manual_seed(15)
    lca = LCAConv2D(3, 2, kernel_size=3, stride=2, lambda_=0.1, tau=3, lca_iters=4,
                    req_grad=True, return_vars=["acts", "recon_errors"]).double()  # fmt: skip
    x = seeded(1, 2, 6, 6, seed=16).requires_grad_()
    u0 = (0.3 * seeded(1, 3, 3, 3, seed=17)).requires_grad_()
    extra = (0.3 * seeded(1, 3, 3, 3, seed=18)).requires_grad_()
    weights = lca.weights.detach().clone().requires_grad_()
    into_initial_states = {"detach_initial_states": False}

    def run(x, u0, extra, weights):
        acts, errors = torch.func.functional_call(
            lca, {"weights": weights}, (x, extra, u0), into_initial_states
        )
        return acts.pow(2).sum() + errors.pow(2).sum()

    assert torch.autograd.gradcheck(run, (x, u0, extra, weights), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "into_initial_states", [False, True], ids=["default-detached", "detach_initial_states=False"]
)
def test_gradients_equal_autograd_through_the_reference_loop(into_initial_states):
    # By default the initial states enter the loop detached, as in lca-pytorch: no gradient
    # reaches them, and the other gradients are those of a loop started from a constant.
    weights = unit_features(3, 2, 3, seed=19)
    x = seeded(2, 2, 7, 7, seed=20).requires_grad_()
    u0 = (0.3 * seeded(2, 3, 5, 5, seed=21)).requires_grad_()
    lca = valid_lca(weights, lca_iters=5, req_grad=True, return_vars=["states", "acts"])
    options = {"detach_initial_states": False} if into_initial_states else {}
    states, acts = lca(x, initial_states=u0, **options)
    loss = states.pow(2).sum() + acts.sum()
    got = torch.autograd.grad(loss, (x, u0, lca.weights), allow_unused=True)

    ref_weights = weights.clone().requires_grad_()
    ref_start = u0 if into_initial_states else u0.detach()
    _, steps = reference_steps(x, ref_weights, ref_start, 0.0, stride=1, lam=0.1, tau=4, iters=5)
    ref_loss = steps[-1][0].pow(2).sum() + steps[-1][1].sum()
    expected = torch.autograd.grad(ref_loss, (x, u0, ref_weights), allow_unused=True)
    for name, g, e in zip(["inputs", "initial_states", "weights"], got, expected, strict=True):
        if name == "initial_states" and not into_initial_states:
            assert g is None and e is None  # u0 is not in either graph
            continue
        assert e.abs().sum() > 0, name
        torch.testing.assert_close(g, e, atol=1e-10, rtol=0, msg=name)


GRAD_OFF = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("with_drive_scaling", [False, True])
@pytest.mark.parametrize("grad_off", list(GRAD_OFF))
def test_req_grad_builds_a_graph_only_where_grad_mode_is_on(grad_off, with_drive_scaling):
    # lca-pytorch's LCAConv2D gradient cases, with and without a drive term: under no_grad
    # (and inference_mode) a req_grad layer builds no graph, so backward fails; in grad mode
    # it does, with the gradients of the reference loop. Both runs give the same code.
    weights = seeded(4, 2, 3, 5, seed=30)
    weights = weights / weights.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x = seeded(1, 2, 9, 11, seed=31)
    extra = (0.3 * seeded(1, 4, 7, 7, seed=32)).requires_grad_() if with_drive_scaling else None
    lca = valid_lca(weights, kernel_size=(3, 5), lca_iters=3, req_grad=True)
    with GRAD_OFF[grad_off]():
        untracked = lca(x, extra)
    assert not untracked.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        untracked.sum().backward()

    code = lca(x, extra)
    code.sum().backward()
    torch.testing.assert_close(untracked, code.detach(), atol=1e-12, rtol=0)
    ref_weights = weights.clone().requires_grad_()
    drive_term = 0.0 if extra is None else extra
    zeros = torch.zeros(1, 4, 7, 7, dtype=torch.float64)
    _, steps = reference_steps(x, ref_weights, zeros, drive_term, 1, lam=0.1, tau=4, iters=3)
    leaves = (ref_weights,) if extra is None else (ref_weights, extra)
    expected = torch.autograd.grad(steps[-1][1].sum(), leaves)
    got = (lca.weights.grad,) if extra is None else (lca.weights.grad, extra.grad)
    for g, e in zip(got, expected, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, atol=1e-10, rtol=0)


def test_warm_start_from_states_already_backpropagated_through():
    # lca-pytorch's initial-states gradient case: backward, warm-start from the returned
    # states, backward again. The second backward adds the gradient of the reference loop
    # started from those states as constants.
    weights = unit_features(3, 2, 3, seed=22)
    x = seeded(2, 2, 7, 7, seed=23)
    lca = valid_lca(weights, lca_iters=4, req_grad=True, return_vars=["states"])
    states = lca(x)
    states.sum().backward()
    first = lca.weights.grad.clone()
    lca(x, initial_states=states).sum().backward()

    ref_weights = weights.clone().requires_grad_()
    _, steps = reference_steps(x, ref_weights, states.detach(), 0.0, 1, lam=0.1, tau=4, iters=4)
    (expected,) = torch.autograd.grad(steps[-1][0].sum(), ref_weights)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(lca.weights.grad - first, expected, atol=1e-10, rtol=0)


def test_a_chain_of_warm_starts_backpropagates_as_one_run_when_asked():
    # detach_initial_states=False: two calls of 3 iterations differentiate as one of 6.
    weights = unit_features(3, 2, 3, seed=24)
    x = seeded(2, 2, 7, 7, seed=25).requires_grad_()
    lca = valid_lca(weights, lca_iters=3, req_grad=True, return_vars=["states"])
    chained = lca(x, initial_states=lca(x), detach_initial_states=False)
    got = torch.autograd.grad(chained.pow(2).sum(), (x, lca.weights))

    ref_weights = weights.clone().requires_grad_()
    zeros = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    _, steps = reference_steps(x, ref_weights, zeros, 0.0, stride=1, lam=0.1, tau=4, iters=6)
    expected = torch.autograd.grad(steps[-1][0].pow(2).sum(), (x, ref_weights))
    for g, e in zip(got, expected, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, atol=1e-10, rtol=0)


def test_get_weights_keeps_the_graph_with_req_grad():
    lca = LCAConv2D(4, 1, kernel_size=3, req_grad=True)
    scale = torch.randn(4, 1, 3, 3)
    (lca.get_weights() * scale).sum().backward()
    torch.testing.assert_close(lca.weights.grad, scale, atol=0, rtol=0)
    copy = lca.get_weights()
    copy.data.zero_()
    assert lca.weights.detach().abs().sum() > 0  # a copy, not a view
    assert not LCAConv2D(4, 1, kernel_size=3).get_weights().requires_grad


def test_no_graph_without_req_grad_even_from_tracked_states():
    lca = LCAConv2D(4, 1, kernel_size=3, lca_iters=2, return_vars=["states"])
    x = torch.randn(1, 1, 6, 6, requires_grad=True)
    u0 = torch.randn(1, 4, 6, 6, requires_grad=True)
    assert not lca(x, torch.randn(1, 4, 6, 6, requires_grad=True), u0).requires_grad


# ---------------------------------------------------------------------------------------------
# Input checks: lca-pytorch's exception types
# ---------------------------------------------------------------------------------------------

X = torch.zeros(2, 3, 8, 8)
CODE = torch.zeros(2, 5, 8, 8)


@pytest.mark.parametrize(
    ("settings", "call", "error", "message"),
    [
        (dict(transfer_func=["soft_threshold"]), None, RuntimeError, "transfer_func.*list"),
        (dict(transfer_func=torch.zeros(3)), None, RuntimeError, "transfer_func.*Tensor"),
        (dict(transfer_func="soft_thershold"), None, ValueError, "soft_thershold"),
        (dict(return_vars=["atcs"]), None, ValueError, "atcs"),
        (dict(weight_init="normal"), None, RuntimeError, "weight_init"),
        (dict(weight_init=lambda t: t[:1]), None, RuntimeError, r"weight_init.*\(5, 3, 3, 3\)"),
        ({}, dict(inputs=torch.zeros(2, 3, 8)), RuntimeError, "4D inputs.*3D"),
        ({}, dict(inputs=torch.zeros(2, 4, 8, 8)), RuntimeError, "3 channels, got 4"),
        ({}, dict(initial_states=torch.zeros(2, 5, 7, 7)), RuntimeError, "initial_states.*7, 7"),
        ({}, dict(initial_states=[0.0]), RuntimeError, "initial_states must be a tensor"),
        ({}, dict(drive_scaling=torch.zeros(2, 5, 8)), RuntimeError, "drive_scaling.*8, 8"),
    ],
)
def test_wrong_input_raises_lca_pytorch_exception(settings, call, error, message):
    def build_and_call():
        lca = LCAConv2D(5, 3, kernel_size=3, lca_iters=1, **settings)
        arguments = dict(inputs=X)
        arguments.update(call or {})
        lca(**arguments)

    with pytest.raises(error, match=message):
        build_and_call()


@pytest.mark.parametrize(
    ("attribute", "value", "error"),
    [("transfer_func", [torch.relu], RuntimeError), ("return_vars", ["bogus"], ValueError)],
)
def test_settings_changed_after_construction_are_checked(attribute, value, error):
    lca = LCAConv2D(5, 3, kernel_size=3, lca_iters=1)
    setattr(lca, attribute, value)
    with pytest.raises(error, match=attribute):
        lca(X)
    if attribute == "transfer_func":
        with pytest.raises(error, match=attribute):
            lca.transfer(CODE)
