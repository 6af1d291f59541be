"""The LCA front-end RCNN: dynamics against autograd of its own energy; dictionary modes."""

import pytest
import torch
import torch.nn.functional as F
from math_checks import LCA_SMALL as SMALL
from math_checks import digit_like_batch as batch

from experiment.records import ep_training_indices, load_model_dictionary, save_dictionary
from lca import LCAConv2D
from lca_utils_ep_fast import LCA_CNN
from learning.registry import make_estimator
from utils_ep_fast import EPConfig, make_optimizer, train_batch


def small_model(**overrides) -> LCA_CNN:
    torch.manual_seed(0)
    return LCA_CNN(**{**SMALL, **overrides})


def phi_by_hand(model, acts, y, s, beta):
    """<acts, s_0> + <maxpool(conv_1 s_0), s_1> + <maxpool(conv_2 s_1), s_2> - beta CE(readout)."""
    conv1, conv2, readout = model.synapses
    phi = (acts * s[0]).sum((1, 2, 3))
    phi = phi + (F.max_pool2d(conv1(s[0]), 2) * s[1]).sum((1, 2, 3))
    phi = phi + (F.max_pool2d(conv2(s[1]), 2) * s[2]).sum((1, 2, 3))
    logits = readout(s[2].flatten(1))
    return phi - beta * F.cross_entropy(logits, y, reduction="none")


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_step_with_unit_feedback_is_sigma_of_energy_gradient(beta):
    model = small_model(scale_feedback=1.0).double()
    x, y = batch()
    acts = model.prepare_input(x.double()).code
    assert acts.shape == (5, 4, 8, 8) and (acts > 0).any()
    generator = torch.Generator().manual_seed(1)
    states = [
        torch.rand((5, *link.shape), generator=generator, dtype=torch.float64)
        for link in model.links
    ]
    leaves = [state.clone().requires_grad_(True) for state in states]
    grads = torch.autograd.grad(phi_by_hand(model, acts, y, leaves, beta).sum(), leaves)
    with torch.no_grad():
        updated = model.step(acts, y, states, beta)
    for k, (got, grad) in enumerate(zip(updated, grads, strict=True)):
        torch.testing.assert_close(got, model.sigma(grad), atol=1e-10, rtol=0, msg=f"s_{k}")


def test_zero_feedback_keeps_copy_layer_at_sigma_of_code():
    model = small_model(scale_feedback=0.0)
    x, y = batch()
    acts = model.prepare_input(x).code
    expected = model.sigma(acts)
    neurons = model.init_neurons(acts)
    for beta, steps in ((0.0, 6), (0.5, 3), (-0.5, 3)):
        for _ in range(steps):
            neurons = model(acts, y, neurons, 1, beta=beta)
            torch.testing.assert_close(neurons[0], expected, atol=0, rtol=0)


def write_dictionary(tmp_path, num_train=40, used=(0, 3, 5, 7, 11)):
    torch.manual_seed(5)
    lca = LCAConv2D(4, 1, kernel_size=3, stride=1)
    path = tmp_path / "dictionary.pt"
    save_dictionary(str(path), lca, subset_indices=torch.tensor(used))
    return path, lca.get_weights()


def train_steps(model, steps=2, alg="EP"):
    """``steps`` training batches; returns the encoding of the last one."""
    optimizer = make_optimizer(model, "sgd", [0.05, 0.05, 0.05], mmt=0.9)
    cfg = EPConfig(alg=alg, T1=5, T2=2, betas=(0.0, 0.5), thirdphase=True)
    for seed in range(steps):
        x, y = batch(seed=seed)
        _, encoding = train_batch(model, optimizer, x, y, make_estimator(cfg))
    return encoding


def test_pretrained_dictionary_is_loaded_and_stays_fixed(tmp_path):
    path, saved = write_dictionary(tmp_path)
    model = small_model(dict_training="pretrained")
    load_model_dictionary(model, path)
    assert torch.equal(model.lca.weights.detach(), saved)
    train_steps(model)
    assert torch.equal(model.lca.weights.detach(), saved)


def test_finetune_updates_the_dictionary_from_the_nudged_phase(tmp_path):
    """One EP batch (third phase) moves the dictionary by exactly the layer's own two updates:
    on the encoding's (acts, recon error), then on ``T_lambda(s_0^{+beta})`` of the nudged
    phase (not the free or the -beta one), both with the dictionary from before the batch; the
    features stay unit-norm."""
    path, saved = write_dictionary(tmp_path)
    model = small_model(dict_training="finetune")
    load_model_dictionary(model, path)
    expected = small_model(dict_training="finetune")
    expected.load_state_dict(model.state_dict())
    x, y = batch()
    cfg = EPConfig(T1=5, T2=2, betas=(0.0, 0.5), thirdphase=True)
    optimizer = make_optimizer(model, "sgd", [0.05] * 3)
    _, encoding = train_batch(model, optimizer, x, y, make_estimator(cfg))
    with torch.no_grad():
        images, acts, errors = expected.lca(x)
        free = expected(acts, y, expected.init_neurons(acts), cfg.T1)
        nudged_acts = expected.lca.transfer(expected(acts, y, free, cfg.T2, beta=0.5)[0])
    nudged_errors = images - expected.lca.compute_recon(nudged_acts, saved, images.shape)
    expected.lca.update_weights(acts, errors)
    expected.lca.update_weights(nudged_acts, nudged_errors)
    weights = model.lca.weights.detach()
    assert (weights - saved).abs().max() > 1e-5
    torch.testing.assert_close(weights, expected.lca.weights.detach(), atol=1e-7, rtol=0)
    torch.testing.assert_close(weights.flatten(1).norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    assert model.batch_stats(encoding)["dict_cosine"] < 1.0


@pytest.mark.parametrize("mode", ["finetune", "learn"])
def test_bptt_updates_the_dictionary_with_the_lca_rule(tmp_path, mode):
    """One BPTT batch moves the dictionary by exactly the two LCA updates: on the encoding's
    (acts, recon error), then on T_lambda(s_0) of BPTT's final states, both taken with the
    dictionary from before the batch (computed here with the layer's own update rule)."""
    path, _ = write_dictionary(tmp_path)
    model = small_model(dict_training=mode)
    if mode == "finetune":
        load_model_dictionary(model, path)
    before = model.lca.get_weights()
    x, y = batch()
    expected = small_model(dict_training=mode)
    expected.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, "sgd", [0.05, 0.05, 0.05])
    cfg = EPConfig(alg="BPTT", T1=5, T2=2)
    final, encoding = train_batch(model, optimizer, x, y, make_estimator(cfg))
    # the model's final states come after its own step; rebuild them from the same weights
    after_step = model.state_dict()
    expected.load_state_dict({**after_step, "lca.weights": before})
    images, acts, errors = expected.lca(x)
    torch.testing.assert_close(acts, encoding.code)
    nudged_acts = expected.lca.transfer(final[0])
    nudged_errors = images - expected.lca.compute_recon(nudged_acts, before, images.shape)
    expected.lca.update_weights(acts, errors)
    expected.lca.update_weights(nudged_acts, nudged_errors)
    assert (model.lca.weights.detach() - before).abs().max() > 1e-5
    torch.testing.assert_close(model.lca.weights.detach(), expected.lca.weights.detach())


def test_learn_starts_from_a_random_dictionary(tmp_path):
    _, saved = write_dictionary(tmp_path)
    first, second = small_model(dict_training="learn"), small_model(dict_training="learn")
    torch.manual_seed(123)
    second.lca = LCAConv2D(4, 1, kernel_size=3, stride=1)
    assert not torch.allclose(first.lca.weights, saved)
    assert not torch.allclose(first.lca.weights, second.lca.weights)
    before = first.lca.get_weights()
    train_steps(first)
    assert (first.lca.weights.detach() - before).abs().max() > 1e-4


def test_ep_training_set_is_the_complement_of_the_dictionary_subset(tmp_path):
    used = (0, 3, 5, 7, 11, 39)
    path, _ = write_dictionary(tmp_path, used=used)
    rest = ep_training_indices(40, path)
    assert set(rest.tolist()).isdisjoint(used)
    assert set(rest.tolist()) | set(used) == set(range(40))
    assert len(rest) == 40 - len(used)


def test_lca_runs_once_per_training_batch():
    model = small_model(dict_training="finetune")
    calls = []
    encode = model.lca.encode
    model.lca.encode = lambda inputs: calls.append(1) or encode(inputs)
    optimizer = make_optimizer(model, "sgd", [0.05, 0.05, 0.05])
    x, y = batch()
    train_batch(model, optimizer, x, y, make_estimator(EPConfig(T1=4, T2=2, thirdphase=True)))
    assert len(calls) == 1


def test_copy_layer_must_match_lca_features_and_identity_pool():
    with pytest.raises(ValueError, match="lca_feats"):
        small_model(channels=[5, 6, 8])
    with pytest.raises(ValueError, match="'i'"):
        small_model(pools="mmm")
