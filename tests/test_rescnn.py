"""The residual network (rescnn.py, ``--model ResCNN`` and ``LCAResCNN``) against its energy
written by hand, its init, and every path a run takes.

The hand-written network (float64): x 3x16x16; block 1: a1 = 4x16x16 (3x3/1, pad 1 of x),
b1 = 4x8x8 (3x3/2, pad 1 of a1, plus the 1x1/2 skip of x); block 2: a2 = 6x8x8, b2 = 6x4x4
(the same from b1); out = 10 linear units on the NCHW flattening of b2; no conv has a bias,
every layer one per channel (unit); MSE on the linear output units.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import load, read_csv, torchrun
from math_checks import cosine
from tensorboard.backend.event_processing import event_accumulator as ea
from test_compiled import NO_COMPILER

import compiled
import main_fast
import precision
import robustness
from experiment import runs, storage
from experiment.records import save_dictionary
from lca import LCAConv2D
from rescnn import ResCNN
from robust_eval.evaluation import ROBUSTNESS_CSV
from utils_ep_fast import EP, EPConfig, Phases, make_optimizer, train_batch

BATCH = 3
GAINS = [0.6, 0.6, 0.7, 0.6, 0.6, 0.7, 0.8]  # the anchor's gains, in synapse order


def two_blocks(scale=GAINS, activation: str = "relu6") -> ResCNN:
    torch.manual_seed(0)
    return ResCNN(16, 3, [4, 6], [10], activation=activation, scale=scale).double()


def hand_phi(model: ResCNN, x, y, states, beta: float):
    """Phi of the two blocks, per sample, from F.conv2d / F.linear on the model's tensors."""
    a1, b1, a2, b2, out = states
    w_xa, w_ab1, w_xb, w_ba, w_ab2, w_bb, w_out = (s.weight for s in model.synapses)
    phi = (F.conv2d(x, w_xa, None, 1, 1) * a1).sum((1, 2, 3))
    phi = phi + (F.conv2d(a1, w_ab1, None, 2, 1) * b1).sum((1, 2, 3))
    phi = phi + (F.conv2d(x, w_xb, None, 2, 0) * b1).sum((1, 2, 3))
    phi = phi + (F.conv2d(b1, w_ba, None, 1, 1) * a2).sum((1, 2, 3))
    phi = phi + (F.conv2d(a2, w_ab2, None, 2, 1) * b2).sum((1, 2, 3))
    phi = phi + (F.conv2d(b1, w_bb, None, 2, 0) * b2).sum((1, 2, 3))
    phi = phi + (F.linear(b2.reshape(b2.shape[0], -1), w_out) * out).sum(1)
    for state, bias in zip(states[:4], list(model.layer_biases.values())[:4], strict=True):
        phi = phi + (state * bias.view(1, -1, 1, 1)).sum((1, 2, 3))
    phi = phi + (out * model.layer_biases["4"]).sum(1)
    onehot = F.one_hot(y, 10).to(out.dtype)
    return phi - beta * 0.5 * (out - onehot).pow(2).sum(1)


def random_case(model: ResCNN, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 16, 16, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 7, 3])
    states = [
        torch.rand(BATCH, *layer.shape, generator=generator, dtype=torch.float64)
        for layer in model.graph.layers
    ]
    return x, y, states


# ---- the engine against the hand-written energy ---------------------------------------------


def test_the_graph_is_two_blocks_and_a_linear_head():
    model = two_blocks()
    shapes = [layer.shape for layer in model.graph.layers]
    assert shapes == [(4, 16, 16), (4, 8, 8), (6, 8, 8), (6, 4, 4), (10,)]
    assert [(e.source, e.target) for e in model.graph.edges] == [
        (-1, 0), (0, 1), (-1, 1), (1, 2), (2, 3), (1, 3), (3, 4),
    ]  # fmt: skip
    assert all(synapse.bias is None for synapse in model.synapses)
    assert model.output_index == 4 and model.linear_output
    assert model.groups == [[0, 2, 4], [1], [3]]


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_one_sync_step_is_sigma_of_autograd_of_the_hand_phi_and_the_output_linear(beta):
    model = two_blocks()
    x, y, states = random_case(model)
    leaves = [state.clone().requires_grad_(True) for state in states]
    grads = torch.autograd.grad(hand_phi(model, x, y, leaves, beta).sum(), leaves)
    with torch.no_grad():
        stepped = model.step(x, y, states, beta)
    for k, (got, grad) in enumerate(zip(stepped, grads, strict=True)):
        want = grad if k == 4 else grad.clamp(0.0, 6.0)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=f"layer {k}")


def test_the_symmetric_ep_estimate_is_autograd_of_the_hand_phi_difference():
    model = two_blocks()
    x, y, first = random_case(model, seed=1)
    _, _, second = random_case(model, seed=2)
    beta = 0.3
    difference = hand_phi(model, x, y, second, beta) - hand_phi(model, x, y, first, -beta)
    params = list(model.parameters())
    expected = torch.autograd.grad(difference.mean() / (-2 * beta), params)
    model.compute_syn_grads(x, y, first, second, (-beta, beta))
    for (name, param), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want, atol=1e-12, rtol=0, msg=name)


def test_symmetric_ep_at_small_beta_matches_bptt_from_a_settled_free_state():
    model = two_blocks(scale=0.5)
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


def test_async_over_the_colouring_never_raises_the_energy():
    model = two_blocks(scale=2.0)
    model.set_dynamics("async")
    x, y, states = random_case(model)
    trace = [model.energy(x, y, states)]
    with torch.no_grad():
        for _ in range(30):
            states = model(x, y, states, 1)
            trace.append(model.energy(x, y, states))
    trace = torch.stack(trace)
    assert (trace[1:] - trace[:-1]).max().item() <= 1e-12 * trace.abs().max().item()


# ---- init and rates ---------------------------------------------------------------------------


def test_per_tensor_gains_give_their_uniform_ranges_and_the_biases_theirs():
    """Weight i is U(+-g_i / sqrt(fan_in)): every entry within the bound, the largest within
    (1 - 20/n) of it (missed with probability e^-20), and the mean square within 6 standard
    errors of bound^2 / 3. Biases: U(+-0.5 / sqrt(9 C)), C the channels of the layer before."""
    torch.manual_seed(123)
    gains = [0.3, 0.6, 0.7, 1.5, 0.6, 0.9, 0.8]
    model = ResCNN(16, 3, [48, 64], [10], scale=gains).double()
    fan_ins = [3 * 9, 48 * 9, 3, 48 * 9, 64 * 9, 48, 64 * 4 * 4]
    for synapse, gain, fan_in in zip(model.synapses, gains, fan_ins, strict=True):
        w, bound = synapse.weight.detach().flatten(), gain / math.sqrt(fan_in)
        n = w.numel()
        assert w.abs().max() <= bound and w.abs().max() >= (1 - 20 / n) * bound
        error = 6 * bound**2 * math.sqrt(4 / 45 / n)
        assert abs(w.pow(2).mean().item() - bound**2 / 3) < error
    befores = [3, 48, 48, 64, 64]
    pooled = []
    for bias, before in zip(model.layer_biases.values(), befores, strict=True):
        bound = 0.5 / math.sqrt(9 * before)
        assert bias.abs().max() <= bound
        pooled.append(bias.detach() / bound)
    pooled = torch.cat(pooled)  # 234 values, U(-1, 1) together
    assert pooled.abs().max() >= 1 - 20 / pooled.numel()


def test_each_bias_takes_the_rate_of_the_conv_that_feeds_it_from_the_layer_before():
    model = two_blocks()
    optimizer = make_optimizer(model, "sgd", [0.1 * (i + 1) for i in range(7)])
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    biases = model.layer_biases
    for k, synapse in [(0, 0), (1, 1), (2, 3), (3, 4), (4, 6)]:
        assert rate_of[id(biases[str(k)])] == pytest.approx(0.1 * (synapse + 1))
    assert len(rate_of) == 7 + 5


def test_hopfield_resnet13_has_13_weight_tensors_and_9_biases():
    model = ResCNN(32, 3, [128, 256, 512, 512], [10], scale=[0.6, 0.6, 0.7] * 4 + [0.8])
    assert len(model.synapses) == 13 and len(model.layer_biases) == 9
    assert [layer.shape for layer in model.graph.layers][-2:] == [(512, 2, 2), (10,)]


# ---- paths ------------------------------------------------------------------------------------

RES = ["--model", "ResCNN", "--task", "DIGITS", "--channels", "4", "6", "--fc", "10",
       "--act", "relu6", "--scale", *map(str, GAINS), "--lrs", "0.02", "--T1", "6", "--T2",
       "3", "--betas", "0", "0.2", "--thirdphase", "--mbs", "360", "--seed", "0", "--device",
       "cpu"]  # fmt: skip
LCARES = ["--model", "LCAResCNN", "--task", "DIGITS", "--channels", "4", "6", "--fc", "10",
          "--act", "relu6", "--lrs", "0.02", "--lca_feats", "4", "--lca_ksize", "3",
          "--lca_stride", "1", "--lca_iters", "5", "--lca_tau", "2", "--lca_lambda", "0.05",
          "--T1", "6", "--T2", "3", "--betas", "0", "0.2", "--thirdphase", "--mbs", "720",
          "--seed", "0", "--device", "cpu"]  # fmt: skip


def train(tmp_path, *extra: str, argv=RES) -> list[dict]:
    assert main_fast.main([*argv, *extra, "--save", "--results-dir", str(tmp_path)]) == 0
    (run_dir,) = runs.find_runs(tmp_path)
    return read_csv(run_dir)


LCARES_LEARN = [*LCARES, "--dict_training", "learn"]
ONE_SIDED = [flag for flag in RES if flag != "--thirdphase"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "extra"),
    [(RES, ["--alg", "EP"]), (ONE_SIDED, ["--alg", "EP"]),
     (RES, ["--alg", "EP", "--random-sign"]), (RES, ["--alg", "BPTT", "--T1", "6"]),
     (RES, ["--dynamics", "async", "--tol", "1e-3", "--T1", "40", "--T2", "10"]),
     (LCARES_LEARN, ["--alg", "BPTT"]),
     (LCARES_LEARN, ["--dynamics", "async", "--tol", "1e-3", "--T1", "40", "--T2", "10"])],
    ids=["symmetric", "one-sided", "random-sign", "bptt", "async-tol", "lca-bptt",
         "lca-async-tol"],
)  # fmt: skip
def test_a_digits_run_trains_on_every_path(tmp_path, argv, extra):
    rows = train(tmp_path, "--epochs", "1", *extra, argv=argv)
    assert len(rows) == 1 and 0.0 <= float(rows[0]["train_acc"]) <= 1.0
    if "--tol" in extra:
        assert float(rows[0]["free_steps"]) <= 40


@pytest.mark.parametrize(
    ("argv", "last_weight"),
    [(RES, "synapses.6.weight"), (LCARES_LEARN, "synapses.3.weight")],
    ids=["ResCNN", "LCAResCNN"],
)
def test_the_gdu_check_runs(capsys, argv, last_weight):
    assert main_fast.main([*argv, "--todo", "gducheck", "--T1", "30", "--T2", "3"]) == 0
    assert last_weight in capsys.readouterr().out


@pytest.mark.slow
def test_resume_is_bit_for_bit_and_evaluate_reads_the_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole, "--epochs", "2")
    train(split, "--epochs", "1")
    (run_dir,) = runs.find_runs(split)
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "2"]) == 0
    (whole_dir,) = runs.find_runs(whole)
    for name in ("model.pt",):
        a, b = load(whole_dir / name), load(run_dir / name)
        for key, tensor in a["model_state"].items():
            assert torch.equal(tensor, b["model_state"][key]), key
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(run_dir)]) == 0


def test_a_vector_field_residual_model_is_refused_in_one_line(capsys):
    assert main_fast.main([*RES, "--vf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --vf refused: there is no vector-field residual model (ResCNN)"]


def test_flags_a_resnet_does_not_have_are_warned_about(capsys):
    assert main_fast.main([*RES, "--kernels", "5", "--epochs", "1"]) == 0
    assert "warning: --kernels ignored" in capsys.readouterr().err


def test_a_wrong_number_of_gains_is_refused(capsys):
    argv = [*RES[: RES.index("--scale") + 1], "0.5", "0.5", *RES[RES.index("--lrs") :]]
    assert main_fast.main(argv) == 2
    assert "--scale needs 7 values" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["finetune", "pretrained", "learn"])
def test_lcarescnn_runs_in_every_dictionary_mode(tmp_path, mode):
    dictionary = tmp_path / "dictionary.pt"
    torch.manual_seed(1)
    lca = LCAConv2D(4, 1, kernel_size=3, stride=1)
    save_dictionary(str(dictionary), lca, subset_indices=torch.arange(400))
    rows = train(
        tmp_path / "runs", "--dict_training", mode, "--dict-path", str(dictionary),
        "--scale_feedback", "0.5", "--epochs", "1", argv=LCARES,
    )  # fmt: skip
    assert (float(rows[0]["dict_cosine"]) < 1.0) if mode != "pretrained" else True
    assert 0.0 < float(rows[0]["lca_frac_active"]) <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(NO_COMPILER, reason="inductor needs a C++ compiler on the CPU; none here")
@pytest.mark.parametrize("model_argv", [RES, LCARES_LEARN], ids=["ResCNN", "LCAResCNN"])
def test_compiled_phases_equal_eager_on_the_cpu(tmp_path, capsys, model_argv):
    """A --compile run (the whole training set in one batch: few shapes to compile) ends with
    the weights of the same run without it, to 1e-5."""
    one_batch = [*model_argv, "--mbs", "1500", "--epochs", "1"]
    train(tmp_path / "eager", argv=one_batch)
    train(tmp_path / "compiled", "--compile", argv=one_batch)
    assert "notice:" not in capsys.readouterr().out
    (eager,), (compiled,) = (
        runs.find_runs(tmp_path / "eager"),
        runs.find_runs(tmp_path / "compiled"),
    )
    eager, compiled = (load(run / "final_model.pt")["model_state"] for run in (eager, compiled))
    for name, weight in eager.items():
        assert (compiled[name] - weight).abs().max().item() <= 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("argv", [RES, LCARES_LEARN], ids=["ResCNN", "LCAResCNN"])
def test_robustness_with_every_gradient_reads_a_resnet_run(tmp_path, argv):
    train(tmp_path, "--epochs", "1", argv=argv)
    (run_dir,) = runs.find_runs(tmp_path)
    argv = ["--load-path", str(run_dir), "--device", "cpu", "--n-samples", "12", "--attacks",
            "pgd-linf", "--gradients", "ep", "bptt", "bpda", "--eps", "0", "0.2", "--steps",
            "2"]  # fmt: skip
    assert robustness.main(argv) == 0
    rows = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
    attacked = {row["gradient"] for row in rows if row["attack"] == "pgd-linf"}
    assert attacked == {"ep", "bptt", "bpda"}
    assert {row["attack"] for row in rows} >= {"clean", "pgd-linf"}


@pytest.mark.slow
@pytest.mark.parametrize("model_argv", [RES, LCARES_LEARN], ids=["ResCNN", "LCAResCNN"])
def test_torchrun_two_processes_equal_one(tmp_path, model_argv):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, "--epochs", "1", argv=model_argv)
    argv = [*model_argv, "--epochs", "1", "--save", "--results-dir", str(two)]
    done = torchrun(2, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (a,), (b,) = runs.find_runs(one), runs.find_runs(two)
    state_a, state_b = load(a / "model.pt")["model_state"], load(b / "model.pt")["model_state"]
    for key, tensor in state_a.items():  # the order of float sums differs: 1e-5 of the norm
        difference = (state_b[key] - tensor).norm() / tensor.norm().clamp_min(1e-30)
        assert difference <= 1e-5, f"{key}: relative difference {difference:.2e}"
    assert read_csv(a)[0]["train_acc"] == read_csv(b)[0]["train_acc"]


# ---- --precision and --tensorboard ----------------------------------------------------------


def test_the_update_the_precision_check_measures_is_the_one_training_applies():
    """Plain SGD at rate 1 moves every parameter (the layer biases, in their synapse's group,
    too) by minus the update: ``precision.ep_update`` must equal ``before - after``."""
    model = two_blocks()
    untouched = copy.deepcopy(model)
    x, y, _ = random_case(model)
    rule = EP(EPConfig(T1=6, T2=3, betas=(0.0, 0.5), thirdphase=True))
    train_batch(model, make_optimizer(model, "sgd", [1.0] * len(model.synapses)), x, y, rule)
    update = precision.ep_update(untouched, x, y, rule)
    moved = dict(model.named_parameters())
    assert update.keys() == moved.keys() and len(model.layer_biases) == 5
    for name, before in untouched.named_parameters():
        torch.testing.assert_close(update[name], before.detach() - moved[name].detach())


@torch.no_grad()
def test_bf16_rounds_every_layer_of_the_sync_phases_and_async_stays_float32(capsys):
    """bf16 keeps 8 significant bits: every layer moves, by a few percent of its range at
    most; ``--dynamics async`` is not captured and runs eagerly in float32 (a notice)."""
    model = two_blocks().float()
    x, y, _ = random_case(model)
    x = x.float()
    rounded = {}
    for dynamics in ("sync", "async"):
        model.set_dynamics(dynamics)
        exact = model(x, y, model.init_neurons(x), 8, beta=0.5)
        phases = Phases(runner=compiled.install(model, False, autocast_dtype=torch.bfloat16))
        rounded[dynamics] = phases.run(model, x, y, model.init_neurons(x), 8, beta=0.5)
        if dynamics == "sync":
            for k, (a, b) in enumerate(zip(rounded["sync"], exact, strict=True)):
                assert a.dtype == torch.float32 and a.shape == b.shape
                assert 0 < (a - b).abs().max().item() < 0.05 * b.abs().max().item(), f"layer {k}"
    assert all(torch.equal(a, b) for a, b in zip(rounded["async"], exact, strict=True))
    assert (
        "with --dynamics async or --tol the phases run eagerly in float32"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "argv", [RES, [*LCARES, "--dict_training", "learn"]], ids=["ResCNN", "LCAResCNN"]
)
def test_bf16_training_says_what_it_costs_the_ep_update(argv, capsys):
    assert main_fast.main([*argv, "--epochs", "1", "--precision", "bf16", "--betas", "0", "1"]) == 0
    said = capsys.readouterr()
    message = "--precision bf16: the EP update on a probe batch differs from float32's by"
    assert message in said.out + said.err


def test_bf16_is_refused_where_it_swamps_the_update_and_nothing_is_written(tmp_path, capsys):
    argv = [*RES, "--precision", "bf16", "--betas", "0", "0.0001", "--save", "--results-dir",
            str(tmp_path)]  # fmt: skip
    assert main_fast.main(argv) == 2
    err = capsys.readouterr().err
    assert "--precision bf16: the EP update on a probe batch differs" in err
    assert "use --precision fp32" in err
    assert runs.find_runs(tmp_path) == []


PROBE_IMAGES = 32  # the test images whose free fixed point TensorBoard's histograms show


def events(folder) -> ea.EventAccumulator:
    sizes = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0}
    accumulator = ea.EventAccumulator(str(folder), size_guidance=sizes)
    accumulator.Reload()
    return accumulator


def f32(value) -> float:
    return float(torch.tensor(float(value), dtype=torch.float32))


def check_board(run_dir, batches: int, layer_sizes: list[int]) -> ea.EventAccumulator:
    """results.csv's accuracies at the end of every epoch, and one histogram per layer of the
    graph (``layer_sizes`` units a sample, written out by hand) per epoch."""
    log, rows = events(run_dir / "tb"), read_csv(run_dir)
    steps = [batches * epoch for epoch in range(1, len(rows) + 1)]
    for column in ("train_acc", "test_acc"):
        tag = column.replace("_", "/")
        got = [(event.step, event.value) for event in log.Scalars(tag)]
        assert got == [(s, f32(row[column])) for s, row in zip(steps, rows, strict=True)], tag
    layer_tags = sorted(tag for tag in log.Tags()["histograms"] if "/layer" in tag)
    assert layer_tags == [f"free_fixed_point/layer{k}" for k in range(1, len(layer_sizes) + 1)]
    for k, size in enumerate(layer_sizes, start=1):
        histograms = log.Histograms(f"free_fixed_point/layer{k}")
        assert [event.step for event in histograms] == steps
        assert {event.histogram_value.num for event in histograms} == {PROBE_IMAGES * size}
    return log


@pytest.mark.slow
def test_tensorboard_logs_the_epochs_and_every_layer_of_the_resnet(tmp_path):
    train(tmp_path, "--epochs", "2", "--tensorboard")
    (run_dir,) = runs.find_runs(tmp_path)
    # 1437 training images in batches of 360; a1 4x8x8, b1 4x4x4, a2 6x4x4, b2 6x2x2, out 10
    check_board(run_dir, math.ceil(1437 / 360), [256, 64, 96, 24, 10])


@pytest.mark.slow
def test_tensorboard_logs_the_lcarescnn_code_and_its_finetuned_dictionary(tmp_path):
    dictionary = tmp_path / "dictionary.pt"
    torch.manual_seed(1)
    save_dictionary(str(dictionary), LCAConv2D(4, 1, kernel_size=3, stride=1),
                    subset_indices=torch.arange(400))  # fmt: skip
    train(tmp_path / "runs", "--dict_training", "finetune", "--dict-path", str(dictionary),
          "--epochs", "1", "--tensorboard", argv=LCARES)  # fmt: skip
    (run_dir,) = runs.find_runs(tmp_path / "runs")
    batches = math.ceil((1437 - 400) / 720)  # EP trains on the images the dictionary did not see
    # the copy layer 4x8x8, a1 6x8x8, b1 6x4x4, out 10
    log = check_board(run_dir, batches, [256, 384, 96, 10])
    (code,) = log.Histograms("free_fixed_point/lca_code")
    assert (code.step, code.histogram_value.num) == (batches, PROBE_IMAGES * 4 * 8 * 8)
    assert [event.step for event in log.Images("lca/dictionary")] == [0, batches]


# ---- the reproduction's flags -----------------------------------------------------------------


def test_nesterov_and_a_cosine_over_the_runs_epochs_down_to_its_floor():
    extra = ["--mmt", "0.9", "--nesterov", "--lr-decay", "--lr-decay-epochs", "3", "--lr-min",
             "2e-6"]  # fmt: skip
    flags = vars(main_fast.parse_args([*RES, *extra])[0])
    settings = main_fast.check_args(flags)
    training = main_fast.build_training(settings, settings.network_config(), torch.device("cpu"))
    assert all(group["nesterov"] for group in training.optimizer.param_groups)
    for _ in range(3):
        training.optimizer.step()
        training.scheduler.step()
    assert training.optimizer.param_groups[0]["lr"] == pytest.approx(2e-6)
