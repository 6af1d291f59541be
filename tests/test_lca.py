"""Tests of the LCA layer against closed forms, hand-worked numbers and dense-matrix LCA."""

import math

import pytest
import torch

from lca import (
    LCAConv2D,
    compute_frac_active,
    compute_l1_sparsity,
    compute_l2_error,
    compute_times_active_by_feature,
    make_unit_var,
    make_zero_mean,
)


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


ALL_VARS = ["inputs", "input_drives", "states", "acts", "recons", "recon_errors", "conns"]


def make_lca(weights: torch.Tensor, **kwargs) -> LCAConv2D:
    """An LCA layer (float64) holding exactly ``weights``, without input normalisation."""
    settings = dict(
        kernel_size=tuple(weights.shape[-2:]),
        input_zero_mean=False,
        input_unit_var=False,
    )
    settings.update(kwargs)
    lca = LCAConv2D(weights.shape[0], weights.shape[1], **settings).double()
    lca.assign_weight_values(weights.double(), normalize=False)
    return lca


def dense_dictionary(
    weights: torch.Tensor, stride: int, canvas: tuple[int, int], codes: tuple[int, int]
) -> torch.Tensor:
    """The dictionary as a matrix: column (f, y, x) is feature f pasted at (y*stride, x*stride)
    on a zero canvas (C, Hc, Wc). Shape (C*Hc*Wc, F*Ho*Wo)."""
    n_feat, n_chan, kh, kw = weights.shape
    phi = torch.zeros(n_chan, *canvas, n_feat, *codes, dtype=torch.float64)
    for f in range(n_feat):
        for y in range(codes[0]):
            for x in range(codes[1]):
                rows = slice(y * stride, y * stride + kh)
                cols = slice(x * stride, x * stride + kw)
                phi[:, rows, cols, f, y, x] = weights[f].double()
    return phi.reshape(n_chan * canvas[0] * canvas[1], n_feat * codes[0] * codes[1])


def random_unit_features(n_feat: int, n_chan: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(n_feat, n_chan, k, k, generator=gen, dtype=torch.float64)
    return weights / weights.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def soft(x: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.where(x > lam, x - lam, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------

EXPECTED_TRANSFER = {
    # x:             -1,   -0.3,  -0.25, 0, 0.2, 0.25, 0.26, 2     (lambda = 0.25)
    ("soft_threshold", True): [0, 0, 0, 0, 0, 0, 0.01, 1.75],
    ("soft_threshold", False): [-0.75, -0.05, 0, 0, 0, 0, 0.01, 1.75],
    ("hard_threshold", True): [0, 0, 0, 0, 0, 0, 0.26, 2],
    ("hard_threshold", False): [-1, -0.3, 0, 0, 0, 0, 0.26, 2],
}


@pytest.mark.parametrize(("transfer", "nonneg"), list(EXPECTED_TRANSFER))
def test_transfer_values(transfer, nonneg):
    lca = LCAConv2D(2, 1, kernel_size=1, lambda_=0.25, transfer_func=transfer, nonneg=nonneg)
    x = torch.tensor([-1, -0.3, -0.25, 0, 0.2, 0.25, 0.26, 2], dtype=torch.float64)
    expected = torch.tensor(EXPECTED_TRANSFER[(transfer, nonneg)], dtype=torch.float64)
    torch.testing.assert_close(lca.transfer(x), expected, atol=1e-12, rtol=0)


def orthonormal_patches(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q  # rows orthonormal


@pytest.mark.parametrize(("transfer", "nonneg"), list(EXPECTED_TRANSFER))
def test_orthonormal_1x1_dictionary_converges_to_threshold_of_drive(transfer, nonneg):
    # Orthonormal 1x1 features at stride 1 never overlap: G = 0 and u -> b, so a -> T(b).
    q = orthonormal_patches(6, seed=1)
    lca = make_lca(
        q.view(6, 6, 1, 1),
        lambda_=0.3,
        tau=5,
        lca_iters=120,
        transfer_func=transfer,
        nonneg=nonneg,
        return_vars=["acts", "input_drives", "recons"],
    )
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    acts, drive, recons = lca(x)

    expected_drive = torch.einsum("fc,nchw->nfhw", q, x)
    lam = 0.3
    if transfer == "soft_threshold":
        expected = torch.sign(expected_drive) * (expected_drive.abs() - lam).clamp(min=0)
    else:
        expected = torch.where(expected_drive.abs() > lam, expected_drive, 0.0)
    if nonneg:
        expected = torch.where(expected_drive > lam, expected, 0.0)
    torch.testing.assert_close(drive, expected_drive, atol=1e-10, rtol=0)
    torch.testing.assert_close(acts, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        recons, torch.einsum("fc,nfhw->nchw", q, expected), atol=1e-4, rtol=0
    )


def test_non_overlapping_2x2_patches_stride_2_closed_form():
    # A complete orthonormal basis of 2x2 patches tiled at stride 2: no overlap either.
    q = orthonormal_patches(4, seed=3)
    lca = make_lca(
        q.view(4, 1, 2, 2), stride=2, pad="valid", lambda_=0.0, tau=5, lca_iters=120,
        nonneg=False, return_vars=["acts", "recons"],
    )  # fmt: skip
    x = torch.randn(2, 1, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    acts, recons = lca(x)
    patches = x.view(2, 1, 3, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 3, 4, 4)
    expected = torch.einsum("fp,nyxp->nfyx", q, patches)
    torch.testing.assert_close(acts, expected, atol=1e-4, rtol=0)
    # lambda = 0 and a complete basis: perfect reconstruction.
    torch.testing.assert_close(recons, x, atol=1e-4, rtol=0)


def test_callable_transfer_func_is_used():
    q = orthonormal_patches(3, seed=5)
    lca = make_lca(q.view(3, 3, 1, 1), tau=4, lca_iters=200, transfer_func=lambda u: 0.5 * u)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    # u* = b - G a = b (G = 0), so a* = b / 2.
    expected = 0.5 * torch.einsum("fc,nchw->nfhw", q, x)
    torch.testing.assert_close(lca(x), expected, atol=1e-8, rtol=0)


def test_lambda_can_be_changed_between_calls():
    q = orthonormal_patches(4, seed=6)
    lca = make_lca(q.view(4, 4, 1, 1), tau=5, lca_iters=120, lambda_=0.1)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    drive = torch.einsum("fc,nchw->nfhw", q, x)
    torch.testing.assert_close(lca(x), soft(drive, 0.1), atol=1e-6, rtol=0)
    lca.lambda_ = 0.7
    torch.testing.assert_close(lca(x), soft(drive, 0.7), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------


def test_one_iteration_returns_zero_acts_and_drive_over_tau():
    # Iteration 1: a = T(0) = 0 is returned, then u = 0 + (b - 0 - 0) / tau.
    lca = make_lca(f64([[[[0.6, 0.8]]]]), pad="valid", tau=2, lca_iters=1,
                   return_vars=["acts", "states"])  # fmt: skip
    acts, states = lca(torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64))
    assert torch.equal(acts, torch.zeros(1, 1, 1, 2, dtype=torch.float64))
    torch.testing.assert_close(states, torch.tensor([[[[1.1, 1.8]]]], dtype=torch.float64))


def test_hand_worked_three_iterations():
    # One 1x2 feature d = [0.6, 0.8] (unit norm), input [1, 2, 3], valid, stride 1,
    # lambda = 1, tau = 2. Drive b = [0.6*1 + 0.8*2, 0.6*2 + 0.8*3] = [2.2, 3.6];
    # neighbours overlap by d0*d1 = 0.48, so G a = [0.48 a1, 0.48 a0].
    #   it 1: a = [0, 0]            u = [1.1, 1.8]
    #   it 2: a = [0.1, 0.8]        G a = [0.384, 0.048]      u = [1.458, 2.676]
    #   it 3: a = [0.458, 1.676]    G a = [0.80448, 0.21984]  u = [1.42676, 3.02808]
    # Returned acts are those of iteration 3 (before its update), states after it.
    # recon = [0.6*0.458, 0.8*0.458 + 0.6*1.676, 0.8*1.676] = [0.2748, 1.372, 1.3408]
    lca = make_lca(f64([[[[0.6, 0.8]]]]), pad="valid", lambda_=1.0, tau=2,
                   lca_iters=3, return_vars=ALL_VARS)  # fmt: skip
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64)
    inputs, drives, states, acts, recons, errors, conns = lca(x)

    def t(values):
        return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, -1)

    torch.testing.assert_close(inputs, x)
    torch.testing.assert_close(drives, t([2.2, 3.6]))
    torch.testing.assert_close(acts, t([0.458, 1.676]))
    torch.testing.assert_close(states, t([1.42676, 3.02808]))
    torch.testing.assert_close(recons, t([0.2748, 1.372, 1.3408]))
    torch.testing.assert_close(errors, t([0.7252, 0.628, 1.6592]))
    # Overlaps at shifts -1, 0, +1 with the self-overlap removed.
    torch.testing.assert_close(conns, t([0.48, 0.0, 0.48]))
    assert not torch.allclose(acts, lca.transfer(states))


def test_hand_worked_two_features_competing_for_one_pixel():
    # d0 = +1, d1 = -1 (1x1), s = 2, lambda = 0.5, tau = 2: b = [2, -2], G01 = G10 = -1.
    #   it 1: a = [0, 0]    u = [1, -1]
    #   it 2: a = [0.5, 0]  G a = [0, -0.5]  u = [1.5, -1.25]
    #   it 3: a = [1, 0]    G a = [0, -1]    u = [1.75, -1.125]
    lca = make_lca(f64([1.0, -1.0]).view(2, 1, 1, 1), lambda_=0.5, tau=2,
                   lca_iters=3, return_vars=["acts", "states", "recons"])  # fmt: skip
    acts, states, recons = lca(torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64))
    torch.testing.assert_close(acts.flatten(), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(states.flatten(), torch.tensor([1.75, -1.125], dtype=torch.float64))
    torch.testing.assert_close(recons.flatten(), torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("stride", "pad", "nonneg"),
    [(1, "same", True), (2, "same", False), (2, "valid", True), (3, "same", True)],
)
def test_matches_dense_matrix_lca(stride, pad, nonneg):
    # LCA written with an explicit dictionary matrix on the zero-padded canvas (the padding
    # ring is part of the canvas, as in lca-pytorch), then cropped for the reconstruction.
    n_feat, n_chan, k, size, lam, tau, iters = 3, 2, 3, 7, 0.2, 5.0, 12
    weights = random_unit_features(n_feat, n_chan, k, seed=stride)
    lca = make_lca(weights, stride=stride, pad=pad, lambda_=lam, tau=tau, lca_iters=iters,
                   nonneg=nonneg, return_vars=["states", "acts", "recons", "conns"])  # fmt: skip
    x = torch.randn(1, n_chan, size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))  # fmt: skip
    states, acts, recons, conns = lca(x)

    p = k // 2 if pad == "same" else 0
    canvas = size + 2 * p
    n_codes = (canvas - k) // stride + 1
    phi = dense_dictionary(weights, stride, (canvas, canvas), (n_codes, n_codes))
    s = torch.nn.functional.pad(x, (p, p, p, p)).flatten()
    gram = phi.T @ phi
    lateral = gram - torch.eye(gram.shape[0], dtype=torch.float64)

    def transfer(u):
        return soft(u, lam) if nonneg else torch.sign(u) * (u.abs() - lam).clamp(min=0)

    b = phi.T @ s
    u = torch.zeros_like(b)
    for _ in range(iters):
        a = transfer(u)
        u = u + (b - u - lateral @ a) / tau
    recon = (phi @ a).view(n_chan, canvas, canvas)[:, p : p + size, p : p + size]

    code_shape = (1, n_feat, n_codes, n_codes)
    torch.testing.assert_close(states, u.view(code_shape), atol=1e-10, rtol=0)
    torch.testing.assert_close(acts, a.view(code_shape), atol=1e-10, rtol=0)
    torch.testing.assert_close(recons, recon.unsqueeze(0), atol=1e-10, rtol=0)
    # conns[f, g, q + dy, q + dx] = overlap of f at (y, x) with g at (y + dy, x + dx).
    q = (k - 1) // stride
    g = lateral.view(n_feat, n_codes, n_codes, n_feat, n_codes, n_codes)
    centre = n_codes // 2
    for dy in range(-q, q + 1):
        for dx in range(-q, q + 1):
            expected = g[:, centre, centre, :, centre + dy, centre + dx]
            torch.testing.assert_close(conns[:, :, q + dy, q + dx], expected, atol=1e-12, rtol=0)
    # The public lateral_competition applies the same G as the loop.
    torch.testing.assert_close(
        lca.lateral_competition(acts, conns), (lateral @ a).view(code_shape), atol=1e-10, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# Energy and sparsity
# ---------------------------------------------------------------------------------------------


def lca_energy(x: torch.Tensor, acts: torch.Tensor, recons: torch.Tensor, lam: float) -> float:
    return (0.5 * (x - recons).pow(2).sum() + lam * acts.abs().sum()).item()


@pytest.mark.parametrize("tau", [2, 10, 50])
def test_energy_does_not_increase(tau):
    # 'valid' padding: the reconstruction covers the whole canvas, so LCA descends exactly E.
    # (The step 1/tau must stay below about 2 / ||D||^2: this 4x overcomplete dictionary
    # diverges at tau = 1.)
    weights = random_unit_features(8, 2, 5, seed=11)
    x = torch.randn(2, 2, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    energies = []
    for iters in [1, 3, 10, 30, 100]:
        lca = make_lca(weights, pad="valid", lambda_=0.3, tau=tau, lca_iters=iters,
                       return_vars=["acts", "recons"])  # fmt: skip
        acts, recons = lca(x)
        energies.append(lca_energy(x, acts, recons, 0.3))
    assert energies[-1] < 0.8 * energies[0]
    for before, after in zip(energies, energies[1:], strict=False):
        assert after <= before + 1e-9, energies


def test_higher_lambda_sparser_codes_larger_error():
    weights = random_unit_features(16, 3, 5, seed=13)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    l1, active, error = [], [], []
    for lam in [0.1, 0.4, 1.0]:
        lca = make_lca(weights, lambda_=lam, tau=10, lca_iters=60, input_zero_mean=True,
                       input_unit_var=True, return_vars=["acts", "recon_errors"])  # fmt: skip
        acts, errors = lca(x)
        l1.append(acts.abs().sum().item())
        active.append((acts != 0).double().mean().item())
        error.append(errors.pow(2).sum().item())
    assert l1[0] > l1[1] > l1[2]
    assert active[0] > active[1] > active[2]
    assert error[0] < error[1] < error[2]


# ---------------------------------------------------------------------------------------------
# Shapes, bookkeeping, normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stride", "pad", "code_size", "conn_size"),
    [(1, "same", 32, 17), (2, "same", 16, 9), (4, "same", 8, 5),
     (1, "valid", 24, 17), (2, "valid", 12, 9), (4, "valid", 6, 5)],
)  # fmt: skip
def test_output_shapes_and_recon_identity(stride, pad, code_size, conn_size):
    lca = LCAConv2D(6, 3, kernel_size=9, stride=stride, pad=pad, lca_iters=3,
                    return_vars=ALL_VARS)  # fmt: skip
    inputs, drives, states, acts, recons, errors, conns = lca(torch.randn(2, 3, 32, 32))
    code_shape = (2, 6, code_size, code_size)
    assert drives.shape == states.shape == acts.shape == code_shape
    assert inputs.shape == recons.shape == errors.shape == (2, 3, 32, 32)
    assert conns.shape == (6, 6, conn_size, conn_size)
    torch.testing.assert_close(recons + errors, inputs, atol=1e-6, rtol=0)


def test_recon_fits_input_when_size_is_not_a_multiple_of_stride():
    lca = LCAConv2D(4, 1, kernel_size=3, stride=2, lca_iters=2, return_vars=["acts", "recons"])
    acts, recons = lca(torch.randn(2, 1, 11, 9))
    assert acts.shape == (2, 4, 6, 5)
    assert recons.shape == (2, 1, 11, 9)


def test_single_return_var_is_a_tensor_and_order_is_kept():
    lca = LCAConv2D(5, 2, kernel_size=3, stride=2, lca_iters=2)
    assert isinstance(lca(torch.randn(1, 2, 8, 8)), torch.Tensor)
    lca.return_vars = ["recons", "acts"]
    recons, acts = lca(torch.randn(1, 2, 8, 8))
    assert recons.shape == (1, 2, 8, 8) and acts.shape == (1, 5, 4, 4)
    lca.return_vars = ["acts", "bogus"]
    with pytest.raises(ValueError, match="bogus"):
        lca(torch.randn(1, 2, 8, 8))


def test_inputs_are_normalised_per_sample():
    lca = LCAConv2D(4, 3, kernel_size=3, lca_iters=1, return_vars=["inputs"])
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]).view(
        3, 1, 1, 1
    )
    x = x + torch.tensor([2.0, -3.0, 0.0]).view(3, 1, 1, 1)
    lca = lca.double()
    flat = x.flatten(1)
    n = flat.shape[1]
    mean = flat.sum(1, keepdim=True) / n
    std = ((flat - mean).pow(2).sum(1, keepdim=True) / (n - 1)).sqrt()
    expected = ((flat - mean) / std).view_as(x)
    torch.testing.assert_close(lca(x), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(make_unit_var(make_zero_mean(x)), expected, atol=1e-10, rtol=0)


def test_no_graph_unless_req_grad():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    plain = LCAConv2D(4, 1, kernel_size=3, lca_iters=3, return_vars=["acts", "recons"])
    assert not plain.weights.requires_grad
    assert not any(out.requires_grad for out in plain(x))

    tracked = LCAConv2D(4, 1, kernel_size=3, lca_iters=3, lambda_=0.1, tau=2, req_grad=True,
                        return_vars=["recon_errors"])  # fmt: skip
    assert tracked.weights.requires_grad and "weights" in tracked.state_dict()
    tracked(x).pow(2).sum().backward()
    assert tracked.weights.grad is not None and tracked.weights.grad.abs().sum() > 0


def test_req_grad_path_gives_the_same_numbers():
    weights = random_unit_features(5, 2, 3, seed=21)
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    settings = dict(stride=2, lambda_=0.2, tau=5, lca_iters=30, return_vars=ALL_VARS)
    plain = make_lca(weights, **settings)(x)
    tracked = make_lca(weights, req_grad=True, **settings)(x)
    for a, b in zip(plain, tracked, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=0)


def test_default_dictionary_is_unit_norm_with_lcapt_shape():
    lca = LCAConv2D(64, 3, kernel_size=9, stride=2)
    assert lca.weights.shape == (64, 3, 9, 9)
    assert (lca.lambda_, lca.tau, lca.eta, lca.lca_iters, lca.pad) == (
        0.25,
        100,
        0.01,
        1000,
        "same",
    )
    assert lca.return_vars == ["acts"] and lca.d_update_clip == math.inf
    norms = lca.weights.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64), atol=1e-6, rtol=0)
    assert not torch.equal(lca.get_weights(), LCAConv2D(64, 3, kernel_size=9).get_weights())


# ---------------------------------------------------------------------------------------------
# Dictionary updates
# ---------------------------------------------------------------------------------------------


def test_weight_update_is_the_act_error_correlation():
    # Two positions at stride 2, valid: dD = sum_n sum_pos a[n, f, pos] * e[n, :, patch(pos)]
    lca = LCAConv2D(2, 1, kernel_size=(1, 2), stride=2, pad="valid").double()
    acts = torch.tensor([[[[1.0, 0.0]], [[2.0, 3.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    error = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)  # patches [1,2],[3,4]
    expected = torch.tensor([[1 * 1 + 0 * 3, 1 * 2 + 0 * 4], [2 * 1 + 3 * 3, 2 * 2 + 3 * 4]])
    update = lca.compute_weight_update(acts, error)
    torch.testing.assert_close(update, expected.view(2, 1, 1, 2).double())


def test_update_weights_rule_clip_and_unit_norm():
    start = torch.tensor([[[[0.6, 0.8]]], [[[1.0, 0.0]]]], dtype=torch.float64)
    lca = make_lca(start, stride=2, pad="valid", eta=0.5)
    acts = torch.tensor([[[[1.0, 0.0]], [[2.0, 3.0]]]], dtype=torch.float64)
    error = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    # feature 0 active once -> eta / 2; feature 1 active twice -> eta / 3
    raw = torch.tensor([[1.0, 2.0], [11.0, 16.0]], dtype=torch.float64)
    step = raw * torch.tensor([[0.5 / 2], [0.5 / 3]], dtype=torch.float64)
    update = lca.update_weights(acts, error, normalize=False)
    torch.testing.assert_close(update.view(2, 2), step)
    torch.testing.assert_close(lca.weights.detach().view(2, 2), start.view(2, 2) + step)

    lca = make_lca(start, stride=2, pad="valid", eta=0.5, d_update_clip=0.4)
    update = lca.update_weights(acts, error)
    torch.testing.assert_close(update.view(2, 2), step.clamp(-0.4, 0.4))
    moved = start.view(2, 2) + step.clamp(-0.4, 0.4)
    expected = moved / moved.norm(dim=1, keepdim=True)
    torch.testing.assert_close(lca.weights.detach().view(2, 2), expected)


def test_features_stay_unit_norm_after_many_updates():
    lca = LCAConv2D(8, 3, kernel_size=5, stride=2, lca_iters=20, lambda_=0.1, eta=0.5,
                    return_vars=["acts", "recon_errors"])  # fmt: skip
    gen = torch.Generator().manual_seed(31)
    for _ in range(5):
        acts, errors = lca(torch.randn(4, 3, 12, 12, generator=gen))
        lca.update_weights(acts, errors)
    norms = lca.weights.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8), atol=1e-6, rtol=0)


def test_assign_weight_values_checks_shape_and_normalises():
    lca = LCAConv2D(2, 1, kernel_size=1)
    with pytest.raises(RuntimeError, match="shape"):
        lca.assign_weight_values(torch.ones(3, 1, 1, 1))
    lca.assign_weight_values(torch.tensor([3.0, -4.0]).view(2, 1, 1, 1))
    torch.testing.assert_close(lca.get_weights().flatten(), torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------------------------------------
# Metrics and the feature grid
# ---------------------------------------------------------------------------------------------


def test_metrics_on_hand_values():
    acts = torch.tensor([[[[0.0, 2.0]], [[-1.0, 0.0]]], [[[0.0, 0.0]], [[3.0, 1.0]]]])  # (2,2,1,2)
    assert compute_l1_sparsity(acts, 0.5).item() == pytest.approx(0.5 * (3 + 4) / 2)
    assert compute_frac_active(acts) == pytest.approx(4 / 8)
    times = compute_times_active_by_feature(acts)
    assert times.shape == (2, 1, 1, 1) and times.flatten().tolist() == [1.0, 3.0]
    inputs = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    recons = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 2.0]]]])
    assert compute_l2_error(inputs, recons).item() == pytest.approx((0.5 * 5 + 0.5 * 4) / 2)
