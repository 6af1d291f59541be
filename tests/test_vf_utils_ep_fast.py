"""Vector-field models: explicit dynamics and EP estimate against autograd of the reference's
layer-wise phis (written here with plain torch calls), the symmetric limit, --same-update, the
optimizer's rates for backward weights, BPTT through them, the LCA front end and the CLI."""

import copy
import csv
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from math_checks import ARCHITECTURES, MLPS, build, digits_loaders, random_case
from math_checks import LCA_SMALL as SMALL
from math_checks import digit_like_batch as batch

import main_fast
from experiment import records
from links import AvgPool, CopyLink, MaxPool
from utils_ep_fast import EP, EPConfig, Schedule, make_optimizer, train, train_batch
from vf_utils_ep_fast import VF_CNN, VF_LCA_CNN, VF_MLP

CASES = ARCHITECTURES + MLPS
CASE_IDS = [case[0] for case in CASES]


def build_vf(kwargs: dict, same_update: bool = False):
    torch.manual_seed(0)
    model_class = VF_MLP if "archi" in kwargs else VF_CNN
    return model_class(**kwargs, same_update=same_update).double()


# ---- the reference's layer-wise phis, with plain torch calls ----------------------------------


def plain_map(model, k: int, below, synapse):
    """``F_k`` (``synapse = W_k``) or ``G_k`` (``synapse = B_k``): pool(conv), linear or copy."""
    link = model.links[k]
    if isinstance(link, CopyLink):
        return below
    if isinstance(link.synapse, torch.nn.Linear):
        return F.linear(below.flatten(1), synapse.weight, synapse.bias)
    z = F.conv2d(below, synapse.weight, synapse.bias, synapse.stride, synapse.padding)
    pool = type(link.base.pool)
    pools = {MaxPool: lambda t: F.max_pool2d(t, 2), AvgPool: lambda t: F.avg_pool2d(t, 2)}
    return pools.get(pool, lambda t: t)(z)


def plain_loss(model, last, y):
    if model.softmax:
        readout = model.synapses[-1]
        return F.cross_entropy(F.linear(last.flatten(1), readout.weight, readout.bias), y, None,
                               reduction="none")  # fmt: skip
    if model.loss_name == "cel":
        return F.cross_entropy(last, y, reduction="none")
    return 0.5 * (last - F.one_hot(y, model.num_classes)).pow(2).sum(1)


def layer_phis(model, x, y, first, second, beta):
    """``phi_k(s^1, s^2) = <F_{k-1}(s^1_{k-1}), s^2_k> + <G_k(s^2_k), s^1_{k+1}>``, the last
    one ``- beta L(s^2)``: Laborieux's ``VF_CNN.Phi(..., neurons_2)``, one (B,) per layer."""
    layers_1, layers_2 = [x, *first], [x, *second]
    phis = []
    for k in range(model.num_layers):
        forward = model.links[k].synapse
        phi = (plain_map(model, k, layers_1[k], forward) * layers_2[k + 1]).flatten(1).sum(1)
        if k + 1 < model.num_layers:
            backward = model.links[k + 1].backward
            feedback = plain_map(model, k + 1, layers_2[k + 1], backward) * layers_1[k + 2]
            phi = phi + feedback.flatten(1).sum(1)
        phis.append(phi)
    phis[-1] = phis[-1] - beta * plain_loss(model, second[-1], y)
    return phis


def sigma_of_phi_gradients(model, x, y, states, beta, feedback_scale: float = 1.0):
    """``sigma(d phi_k(s, s) / d s_k)`` per layer (the output units of CE: the derivative)."""
    leaves = [state.clone().requires_grad_(True) for state in states]
    phis = layer_phis(model, x, y, leaves, leaves, beta)
    grads = [
        torch.autograd.grad(phi.sum(), leaf)[0] for phi, leaf in zip(phis, leaves, strict=True)
    ]
    if isinstance(model.links[0], CopyLink):  # only the feedback part is scaled
        grads[0] = x + feedback_scale * (grads[0] - x)
    expected = [model.sigma(grad) for grad in grads]
    if not model.softmax and model.loss_name == "cel":
        expected[-1] = grads[-1]
    return expected


def weight_pairs(model):
    """(name of W_k, name of B_k) for every link with backward weights."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [
        (names[id(link.synapse.weight)], names[id(link.backward.weight)])
        for link in model.links
        if getattr(link, "backward", None) is not None
    ]


# ---- dynamics and EP estimate -----------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.7])
@pytest.mark.parametrize("name,kwargs,input_shape", CASES, ids=CASE_IDS)
def test_vf_step_is_sigma_of_autograd_of_layer_phis(name, kwargs, input_shape, beta):
    model = build_vf(kwargs)
    x, y, neurons = random_case(model, input_shape)
    expected = sigma_of_phi_gradients(model, x, y, neurons, beta)
    with torch.no_grad():
        updated = model.step(x, y, neurons, beta)
    for k, (got, want) in enumerate(zip(updated, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"layer {k + 1}")


VARIANTS = [
    ("one-sided", (0.0, 0.5), False),
    ("random sign drew -beta", (0.0, -0.5), False),
    ("third phase", (-0.5, 0.5), True),
]


@pytest.mark.parametrize("same_update", [False, True], ids=["crossed", "same-update"])
@pytest.mark.parametrize("variant,betas,third", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("name,kwargs,input_shape", CASES, ids=CASE_IDS)
def test_vf_syn_grads_equal_autograd_of_reference_phis(
    name, kwargs, input_shape, variant, betas, third, same_update
):
    """Crossed: ``sum_k mean(phi_k(s^0, s^2, b2) - phi_k(s^0, s^1, b1)) / (b1 - b2)`` with
    ``s^0`` the free state (``= s^1`` unless third phase); same-update: the uncrossed
    ``phi_k(s^i, s^i)``, then W and B gradients averaged."""
    model = build_vf(kwargs, same_update)
    x, y, free = random_case(model, input_shape, seed=1)
    nudged = random_case(model, input_shape, seed=2)[2]
    first = random_case(model, input_shape, seed=3)[2] if third else free
    beta_1, beta_2 = betas
    anchor_2, anchor_1 = (nudged, first) if same_update else (free, free)
    phis_2 = layer_phis(model, x, y, anchor_2, nudged, beta_2)
    phis_1 = layer_phis(model, x, y, anchor_1, first, beta_1)
    objective = sum((p2 - p1).mean() for p2, p1 in zip(phis_2, phis_1, strict=True))
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(objective / (beta_1 - beta_2), list(model.parameters()))
    expected = dict(zip(names, grads, strict=True))
    if same_update:
        for forward, backward in weight_pairs(model):
            average = 0.5 * (expected[forward] + expected[backward])
            expected[forward] = expected[backward] = average

    model.compute_syn_grads(x, y, first, nudged, betas, free)
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[param_name], atol=1e-10, rtol=0,
                                   msg=param_name)  # fmt: skip


@pytest.mark.parametrize("name,kwargs,input_shape", CASES, ids=CASE_IDS)
def test_backward_equal_to_forward_is_the_symmetric_model(name, kwargs, input_shape):
    """B_k = W_k: the same states in every phase, exactly, and with --same-update the same EP
    updates (both weights getting the symmetric model's), exactly."""
    symmetric = build(kwargs)
    model = build_vf(kwargs, same_update=True)
    model.load_state_dict(symmetric.state_dict(), strict=False)
    with torch.no_grad():
        for forward, backward in weight_pairs(model):
            model.get_parameter(backward).copy_(model.get_parameter(forward))
    x, y, _ = random_case(symmetric, input_shape)
    beta = 0.5
    phases = {}
    for net in (symmetric, model):
        free = net(x, y, net.init_neurons(x), 8)
        phases[net] = [free, net(x, y, free, 4, beta=beta), net(x, y, free, 4, beta=-beta)]
        net.compute_syn_grads(x, y, phases[net][2], phases[net][1], (-beta, beta), free)
    for phase_s, phase_v in zip(phases[symmetric], phases[model], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(phase_s, phase_v, strict=True))
    for param_name, param in symmetric.named_parameters():
        assert torch.equal(param.grad, model.get_parameter(param_name).grad), param_name
    for forward, backward in weight_pairs(model):
        assert torch.equal(
            model.get_parameter(backward).grad, symmetric.get_parameter(forward).grad
        )


# ---- --same-update, optimizer rates, BPTT -----------------------------------------------------


def small_vf_cnn(same_update: bool) -> VF_CNN:
    torch.manual_seed(0)
    return VF_CNN(8, 1, [4, 6], [3, 3], [1, 1], [1, 0], "ma", [8, 10], activation="my_hard_sig",
                  softmax=True, loss="cel", same_update=same_update)  # fmt: skip


@pytest.mark.parametrize(
    "cfg",
    [
        EPConfig(T1=10, T2=4, betas=(0.0, 0.5)),
        EPConfig(T1=10, T2=4, betas=(0.0, 0.5), random_sign=True),
        EPConfig(T1=10, T2=4, betas=(0.0, 0.5), thirdphase=True),
    ],
    ids=["one-sided", "random sign", "third phase"],
)
def test_same_update_moves_both_weights_alike(cfg):
    """Every step both weights get one update, so ``W - B`` does not move (SGD, momentum); and
    weights that start equal (with weight decay too) stay equal: their angle stays at 0."""
    model = small_vf_cnn(same_update=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for forward, backward in weight_pairs(twin):
            twin.get_parameter(backward).copy_(twin.get_parameter(forward))
    gaps = {f: model.get_parameter(f) - model.get_parameter(b) for f, b in weight_pairs(model)}
    twin_angles = twin.backward_angles()
    optimizer = make_optimizer(model, "sgd", [0.2, 0.1, 0.05, 0.05], mmt=0.9)
    twin_optimizer = make_optimizer(twin, "sgd", [0.2, 0.1, 0.05, 0.05], [1e-3] * 4, mmt=0.9)
    generator = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, y = torch.rand(6, 1, 8, 8, generator=generator), torch.arange(6)
        for net, opt in ((model, optimizer), (twin, twin_optimizer)):
            train_batch(net, opt, x, y, EP(cfg))
            for forward, backward in weight_pairs(net):
                forward_grad = net.get_parameter(forward).grad
                assert forward_grad.abs().max() > 0
                assert torch.equal(forward_grad, net.get_parameter(backward).grad)
    for forward, backward in weight_pairs(model):
        gap = model.get_parameter(forward) - model.get_parameter(backward)
        torch.testing.assert_close(gap, gaps[forward], atol=1e-6, rtol=0)
        assert torch.equal(twin.get_parameter(forward), twin.get_parameter(backward))
    for key, angle in twin.backward_angles().items():
        assert angle == pytest.approx(twin_angles[key], abs=1e-5) and angle < 1e-5


@pytest.mark.parametrize("thirdphase", [False, True], ids=["one-sided", "third phase"])
def test_seeded_vf_training_step_applies_the_reference_estimate(thirdphase):
    """One seeded training step of the crossed VF_CNN (float64, plain SGD): every gradient is
    autograd of the reference's crossed phis on the phases' own states (the nudged states
    crossed with the free one, with the third phase too), every weight moves by ``-lr`` times
    it, and each W_k and its B_k get different updates."""
    model = small_vf_cnn(same_update=False).double()
    untouched = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    x, y = torch.rand(6, 1, 8, 8, generator=generator, dtype=torch.float64), torch.arange(6)
    cfg = EPConfig(T1=10, T2=4, betas=(0.0, 0.5), thirdphase=thirdphase)
    train_batch(model, make_optimizer(model, "sgd", [0.1] * 4), x, y, EP(cfg))

    free = untouched(x, y, untouched.init_neurons(x), cfg.T1)
    nudged = untouched(x, y, free, cfg.T2, beta=0.5)
    first, beta_1 = (untouched(x, y, free, cfg.T2, beta=-0.5), -0.5) if thirdphase else (free, 0.0)
    phis_2 = layer_phis(untouched, x, y, free, nudged, 0.5)
    phis_1 = layer_phis(untouched, x, y, free, first, beta_1)
    objective = sum((p2 - p1).mean() for p2, p1 in zip(phis_2, phis_1, strict=True))
    grads = torch.autograd.grad(objective / (beta_1 - 0.5), list(untouched.parameters()))
    for (name, before), want in zip(untouched.named_parameters(), grads, strict=True):
        after = model.get_parameter(name)
        torch.testing.assert_close(after.grad, want, atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(after, before - 0.1 * want, atol=1e-12, rtol=0, msg=name)
    for forward, backward in weight_pairs(model):
        assert not torch.allclose(model.get_parameter(forward).grad,
                                  model.get_parameter(backward).grad)  # fmt: skip


def test_backward_weights_take_the_rates_of_their_forward_synapse():
    model = small_vf_cnn(same_update=False)
    lrs, wds = [0.4, 0.3, 0.2, 0.1], [1e-1, 1e-2, 1e-3, 1e-4]
    optimizer = make_optimizer(model, "sgd", lrs, wds)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == len(list(model.parameters()))
    synapse_of = {id(synapse.weight): i for i, synapse in enumerate(model.synapses)}
    backward_links = [link for link in model.links if getattr(link, "backward", None) is not None]
    assert len(backward_links) == len(model.backward_synapses) == 2
    for link in backward_links:
        group = group_of[id(link.backward.weight)]
        synapse = synapse_of[id(link.synapse.weight)]
        assert (group["lr"], group["weight_decay"]) == (lrs[synapse], wds[synapse])


def test_bptt_gradient_of_backward_weights_matches_finite_differences():
    """d loss(T steps from s) / dB along a random direction, by autograd and central
    differences (float64)."""
    model = small_vf_cnn(same_update=False).double()
    x, y = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3])
    start = model(x, y, model.init_neurons(x), 5)
    backward = model.backward_synapses[0].weight
    direction = torch.randn_like(backward)

    def final_loss():
        return model.loss(model(x, y, start, 4, track_grad=True), y).mean()

    model.zero_grad()
    final_loss().backward()
    along = (backward.grad * direction).sum().item()
    assert abs(along) > 1e-6
    eps = 1e-6
    with torch.no_grad():
        backward.add_(eps * direction)
        plus = final_loss().item()
        backward.sub_(2 * eps * direction)
        minus = final_loss().item()
        backward.add_(eps * direction)
    assert (plus - minus) / (2 * eps) == pytest.approx(along, rel=1e-4)


def test_scale_multiplies_backward_init():
    torch.manual_seed(0)
    plain = VF_MLP([6, 5, 4, 3])
    torch.manual_seed(0)
    scaled = VF_MLP([6, 5, 4, 3], scale=0.5)
    assert len(scaled.backward_synapses) == 2
    for a, b in zip(plain.backward_synapses, scaled.backward_synapses, strict=True):
        assert a.bias is None and a.weight.shape == b.weight.shape
        bound = 1 / a.weight.shape[1] ** 0.5  # PyTorch's default init: U(-bound, bound)
        assert a.weight.abs().max() > 0.5 * bound >= b.weight.abs().max()


@pytest.mark.slow
def test_vfcnn_with_same_update_learns_digits():
    """8x8x1 -> conv 16@3x3 + maxpool -> conv 32@3x3 + maxpool (its own backward weights) ->
    softmax readout; my_hard_sig, T1 = 20, T2 = 5, beta = 0.5 with a third phase, SGD momentum
    0.9, lrs 0.1 0.05 0.02 with cosine decay over 10 epochs, batch 16. Measured: 94.2%, 95.0%,
    94.2% for seeds 0, 1, 2; the angle falls from about 90 to 30 degrees."""
    torch.manual_seed(0)
    train_loader, test_loader = digits_loaders()
    model = VF_CNN(8, 1, [16, 32], [3, 3], [1, 1], [1, 1], "mm", [10], activation="my_hard_sig",
                   softmax=True, loss="cel", same_update=True)  # fmt: skip
    optimizer = make_optimizer(model, "sgd", [0.1, 0.05, 0.02], mmt=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    cfg = EPConfig(T1=20, T2=5, betas=(0.0, 0.5), thirdphase=True)
    start_angle = model.backward_angles()["angle_syn1"]
    loaders = train_loader, test_loader
    history = train(model, optimizer, loaders, EP(cfg), Schedule(10, scheduler=scheduler))
    assert history[-1]["test_acc"] >= 0.93, [round(m["test_acc"], 3) for m in history]
    assert history[-1]["angle_syn1"] < 45 < start_angle - 30


# ---- LCA front end ----------------------------------------------------------------------------


@pytest.mark.parametrize("feedback_scale", [1.0, 0.3])
def test_lca_vf_step_scales_only_the_feedback_into_the_copy_layer(feedback_scale):
    torch.manual_seed(0)
    model = VF_LCA_CNN(**{**SMALL, "scale_feedback": feedback_scale}, dict_training="learn")
    model = model.double()
    assert [link.name for link in model.links[:2]] == ["copy", "conv"]
    assert len(model.backward_synapses) == 2
    x, y = batch()
    code = model.prepare_input(x.double()).code
    generator = torch.Generator().manual_seed(1)
    states = [torch.rand((5, *link.shape), generator=generator, dtype=torch.float64)
              for link in model.links]  # fmt: skip
    expected = sigma_of_phi_gradients(model, code, y, states, 0.5, feedback_scale)
    with torch.no_grad():
        updated = model.step(code, y, states, 0.5)
    for k, (got, want) in enumerate(zip(updated, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"layer {k}")


def test_saved_names_are_the_synapses_the_backward_synapses_and_the_lca_layer():
    """Links refer to the weights without registering them: a state dict holds exactly the
    names runs have always been saved with."""
    model = VF_LCA_CNN(**SMALL, dict_training="learn")
    forward = {f"synapses.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    backward = {f"backward_synapses.{j}.weight" for j in range(2)}
    assert set(model.state_dict()) == forward | backward | {"lca.weights", "initial_dictionary"}
    assert [name for name, _ in model.named_parameters()][-2:] == sorted(backward)


# ---- command line -----------------------------------------------------------------------------

DIGITS_VFMLP = ["--model", "VFMLP", "--task", "DIGITS", "--archi", "64", "32", "16", "10",
                "--lrs", "0.1", "0.05", "0.02", "--T1", "4", "--T2", "2", "--betas", "0", "0.5",
                "--mbs", "256", "--seed", "0", "--same-update", "--epochs", "2"]  # fmt: skip


@pytest.mark.slow
def test_cli_vfmlp_logs_and_plots_angles_and_resumes(tmp_path, capsys):
    assert main_fast.main(DIGITS_VFMLP + ["--save", "--results-dir", str(tmp_path)]) == 0
    (run_dir,) = [p.parent for p in tmp_path.rglob("results.csv")]
    assert (run_dir / "angles.png").is_file()
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"angle_syn1", "angle_syn2"} <= set(rows[0])
    assert all(0 < float(row["angle_syn1"]) < 180 for row in rows)
    record = torch.load(run_dir / "final_model.pt", weights_only=True)
    network = records.network_config(record)
    assert network["model"] == "VFMLP" and network["kwargs"]["same_update"] is True
    assert "backward_synapses.1.weight" in record["model_state"]
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "3"]) == 0
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0
    assert main_fast.main(["--todo", "gducheck", "--load-path", str(run_dir)]) == 0
    assert "backward_synapses.0.weight" in capsys.readouterr().out


def test_cli_vf_flag_checks(capsys):
    assert main_fast.main(["--model", "CNN", "--vf", "--lrs", "0.1", "0.1", "0.1"]) == 2
    assert "use --model VFCNN or VFMLP" in capsys.readouterr().err
    argv = ["--model", "LCACNN", "--vf", "--same-update", "--dict_training", "learn",
            "--channels", "64", "8", "--kernels", "3", "--pools", "im",
            "--lrs", "1", "1"]  # fmt: skip
    args, _ = main_fast.parse_args(argv)
    config = main_fast.check_args(vars(args)).network_config()
    assert config["model"] == "VFLCACNN" and config["kwargs"]["same_update"] is True
    assert isinstance(records.build_model(config), VF_LCA_CNN)


@pytest.mark.parametrize(
    "script,same_update",
    [("vfcnn_cifar10.sh", False), ("vfcnn_cifar10_same_update.sh", True)],
)
def test_run_scripts_build_laborieux_vfcnn(script, same_update):
    """The reference's VFCNN CIFAR-10 commands: 4 convs, backward weights on the 3 non-input
    convs, the same update only where asked."""
    text = (Path(__file__).resolve().parents[1] / "run" / script).read_text()
    (command,) = [line for line in text.splitlines() if line.startswith("python main_fast.py")]
    args, _ = main_fast.parse_args(shlex.split(command)[2:-1])
    config = main_fast.check_args(vars(args)).network_config()
    assert (config["model"], config["kwargs"]["same_update"]) == ("VFCNN", same_update)
    model = records.build_model(config)
    assert [b.weight.shape for b in model.backward_synapses] == [
        model.synapses[i].weight.shape for i in (1, 2, 3)
    ]
