"""--precision: bf16 phases, the EP update's error against float32, and the CLI's refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from math_checks import RCNN, digit_like_batch

import compiled
import main_fast
import precision
from utils_ep_fast import EP, P_CNN, EPConfig, Phases, make_optimizer, train_batch
from vf_utils_ep_fast import VF_CNN


def tiny_model() -> P_CNN:
    torch.manual_seed(0)
    return P_CNN(**RCNN)


def images(n: int = 8):
    return digit_like_batch(n, seed=3)


@pytest.mark.parametrize("vector_field", [False, True], ids=["CNN", "VFCNN"])
@pytest.mark.parametrize("thirdphase", [False, True])
def test_ep_update_is_what_train_batch_applies(thirdphase, vector_field):
    """With plain SGD at learning rate 1 a training step moves every weight by minus the
    update, so ``ep_update`` must equal ``before - after``: also for the vector-field estimate,
    which crosses the nudged states with the free one (with the third phase too)."""
    torch.manual_seed(0)
    model = VF_CNN(**RCNN) if vector_field else P_CNN(**RCNN)
    untouched = copy.deepcopy(model)
    x, y = images()
    cfg = EPConfig(T1=6, T2=3, betas=(0.0, 0.5), thirdphase=thirdphase)
    optimizer = make_optimizer(model, "sgd", [1.0] * len(model.synapses))
    train_batch(model, optimizer, x, y, EP(cfg))
    update = precision.ep_update(untouched, x, y, EP(cfg))
    moved = dict(model.named_parameters())
    assert update.keys() == moved.keys()
    for name, before in untouched.named_parameters():
        torch.testing.assert_close(update[name], before.detach() - moved[name].detach())
    assert all(param.grad is None for param in untouched.parameters())  # nothing left behind


def test_relative_error_by_hand():
    update = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    reference = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0])}
    # ||(0, 2, 2)|| / ||(1, 0, 1)|| = sqrt(8) / sqrt(2) = 2
    assert precision.relative_error(update, reference) == pytest.approx(2.0)


@torch.no_grad()
def test_bf16_phases_round_the_states_and_hand_back_float32():
    model = tiny_model()
    x, y = images()
    exact = model(x, y, model.init_neurons(x), 8, beta=0.5)
    phases = Phases(runner=compiled.install(model, compile=False, autocast_dtype=torch.bfloat16))
    rounded = phases.run(model, x, y, model.init_neurons(x), 8, beta=0.5)
    for a, b in zip(rounded, exact, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        difference = (a - b).abs().max().item()
        assert 0 < difference < 0.05  # bfloat16 keeps 8 significant bits (relative 2^-8)


def test_bf16_error_of_the_ep_update_grows_as_beta_shrinks():
    """The update is a difference of nearby fixed points over beta: rounding the states
    weighs more the closer they are."""
    model = tiny_model()
    x, y = images()
    errors = [
        precision.ep_update_error(model, x, y, EP(EPConfig(T1=20, T2=5, betas=(0.0, beta))), "bf16")
        for beta in (1.0, 0.01)
    ]
    assert 0 < errors[0] < errors[1]


DIGITS = ["--model", "CNN", "--task", "DIGITS", "--channels", "3", "--kernels", "3",
          "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.1",
          "0.1", "--T1", "10", "--T2", "3", "--mbs", "500", "--seed", "0",
          "--device", "cpu"]  # fmt: skip


def test_cli_refuses_tf32_on_the_cpu(capsys):
    assert main_fast.main(DIGITS + ["--precision", "tf32"]) == 2
    assert "--precision tf32 needs a CUDA GPU" in capsys.readouterr().err


def test_cli_refuses_bf16_where_it_swamps_the_ep_update(capsys):
    assert main_fast.main(DIGITS + ["--precision", "bf16", "--betas", "0.0", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert "--precision bf16: the EP update on a probe batch differs from float32's by" in err
    assert "use --precision fp32" in err


def test_cli_trains_in_bf16_and_says_what_it_costs(capsys):
    assert main_fast.main(DIGITS + ["--precision", "bf16", "--betas", "0.0", "1.0"]) == 0
    said = capsys.readouterr()
    assert "--precision bf16: the EP update on a probe batch differs" in said.out + said.err
