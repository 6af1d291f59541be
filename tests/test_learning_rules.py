"""The learning rules as objects (learning/estimators.py, learning/registry.py), the flags a
rule ignores or refuses, the metrics object (learning/metrics.py) they report to, and the rule
of docs/extending.md."""

from __future__ import annotations

import pytest
import torch
from helpers import DIGITS_CNN, docs_example
from math_checks import converged_case

import main_fast
from dynamics import PhaseRecord, Phases
from learning.clamped_learning import ContrastiveLearning, CoupledLearning
from learning.estimators import BPTT, EP, EPConfig
from learning.metrics import Metrics
from learning.recurrent_backprop import RecurrentBackprop
from learning.registry import ESTIMATORS, make_estimator
from utils_ep_fast import P_MLP


def small_case():
    torch.manual_seed(0)
    model = P_MLP([5, 4, 3], activation="sigmoid").double()
    x = torch.rand(6, 5, dtype=torch.float64)
    return model, x, torch.tensor([0, 1, 2, 0, 1, 2])


def test_the_registry_names_every_rule_by_its_alg():
    assert ESTIMATORS == {
        "EP": EP, "BPTT": BPTT, "RBP": RecurrentBackprop, "CL": ContrastiveLearning,
        "CpL": CoupledLearning,
    }  # fmt: skip
    assert isinstance(make_estimator(EPConfig(alg="BPTT")), BPTT)
    with pytest.raises(ValueError, match="unknown learning rule 'Hebb'"):
        make_estimator(EPConfig(alg="Hebb"))


def test_bptt_writes_the_gradient_of_the_final_loss_and_names_its_free_phase():
    """Reference: the same T1 - T2 steps without a graph, then T2 unrolled by hand with
    ``model.step`` under autograd, the mean final loss differentiated."""
    model, x, y = small_case()
    free = model(x, y, model.init_neurons(x), 4)
    states = free
    with torch.enable_grad():
        for _ in range(3):
            states = model.step(x, y, states)
        want = torch.autograd.grad(model.loss(states, y).mean(), list(model.parameters()))
    metrics = Metrics()
    estimate = BPTT(EPConfig(alg="BPTT", T1=7, T2=3)).estimate(model, x, y, Phases(log=metrics))
    for param, grad in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(param.grad, grad, atol=1e-12, rtol=0)
    assert all(not state.requires_grad for state in estimate.free)
    assert estimate.free is estimate.learned
    assert [(name, record.steps) for name, record in metrics.phases] == [("free", 4)]


def test_ep_names_its_phases_and_hands_back_the_nudged_states():
    model, x, y = small_case()
    metrics = Metrics()
    rule = EP(EPConfig(T1=5, T2=2, betas=(0.0, 0.5), thirdphase=True))
    estimate = rule.estimate(model, x, y, Phases(log=metrics))
    assert [name for name, _ in metrics.phases] == ["free", "nudged", "nudged"]
    nudged = model(x, y, estimate.free, 2, beta=0.5)
    assert all(torch.equal(a, b) for a, b in zip(estimate.learned, nudged, strict=True))


def test_a_flag_the_rule_ignores_gets_one_warning_line_and_the_run_trains(capsys):
    argv = [*DIGITS_CNN, "--alg", "BPTT", "--thirdphase", "--random-sign", "--device", "cpu"]
    assert main_fast.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "warning: --thirdphase ignored: --alg BPTT does not read it (BPTT has no nudged phase)",
        "warning: --random-sign ignored: --alg BPTT does not read it (BPTT has no nudged phase)",
    ]


def test_ep_reads_every_flag_and_warns_of_none(capsys):
    argv = [*DIGITS_CNN, "--alg", "EP", "--thirdphase", "--betas", "0", "0.5", "--device", "cpu"]
    assert main_fast.main(argv) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [(["--alg", "EP", "--betas", "0.2", "0.2"], "EP needs a nudging beta2"),
     (["--alg", "BPTT", "--T2", "4"], "BPTT backpropagates the last T2 of T1 steps")],
)  # fmt: skip
def test_a_setting_the_rule_refuses_stops_the_run_with_one_line(extra, message, capsys, tmp_path):
    argv = [*DIGITS_CNN, *extra, "--device", "cpu", "--save", "--results-dir", str(tmp_path)]
    assert main_fast.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


class Board:
    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_batch(self, batch: int, accuracy: float, loss: float) -> None:
        self.seen.append((batch, accuracy, loss))


def test_metrics_sum_over_ranks_and_count_the_phases_by_hand():
    """Two batches here (3 of 4 right, loss 2.0; 1 of 2 right, loss 4.0, stat 0.5 and 0.2);
    a second rank, faked by adding its sums (5 right of 6, loss 3.0, stat sum 1.2)."""

    def two_ranks(totals):
        other = {"correct": 5, "seen": 6, "loss": 3.0, "sparsity": 1.2}
        return {name: value + other[name] for name, value in totals.items()}

    board = Board()
    metrics = Metrics(two_ranks, board)
    metrics.add_batch(3, 2.0, 4, {"sparsity": 0.5})
    metrics.add_batch(1, 4.0, 2, {"sparsity": 0.2})
    metrics.add_phase("free", PhaseRecord(10, True))
    metrics.add_phase("free", PhaseRecord(20, False))
    metrics.add_phase("nudged", PhaseRecord(4, None))
    assert board.seen == [(1, 0.75, 0.5), (2, 4 / 6, 1.0)]
    means = metrics.epoch_means(with_phases=True)
    assert list(means) == ["train_acc", "train_loss", "sparsity", "free_steps", "free_at_cap",
                           "nudged_steps", "nudged_at_cap"]  # fmt: skip
    assert means["train_acc"] == pytest.approx(9 / 12)
    assert means["train_loss"] == pytest.approx(9.0 / 12)
    assert means["sparsity"] == pytest.approx((0.5 * 4 + 0.2 * 2 + 1.2) / 12)
    assert (means["free_steps"], means["free_at_cap"]) == (15.0, 0.5)
    assert (means["nudged_steps"], means["nudged_at_cap"]) == (4.0, 1.0)
    assert metrics.evaluation_means(2, 1.0, 4) == pytest.approx((7 / 10, 4.0 / 10))
    metrics.start_epoch()
    assert metrics.epoch_means(with_phases=True)["train_acc"] == pytest.approx(5 / 6)


# ---- the learning rule of docs/extending.md, run as written there ------------------------------


@pytest.fixture(scope="module")
def docs_rule():
    """The docs' extrapolated EP, executed from the page."""
    with docs_example("class ExtrapolatedEP", "extrapolated_ep") as module:
        return module.ExtrapolatedEP


def flat_grads(model) -> torch.Tensor:
    return torch.cat([param.grad.flatten() for param in model.parameters()])


def gradient_of(model, rule, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    rule.estimate(model, x, y)
    return flat_grads(model)


def test_the_docs_rule_is_twice_ep_at_beta_minus_ep_at_twice_beta(docs_rule):
    model, x, y = small_case()
    near = gradient_of(model, EP(EPConfig(T1=30, T2=10, betas=(0.0, 0.3))), x, y)
    far = gradient_of(model, EP(EPConfig(T1=30, T2=10, betas=(0.0, 0.6))), x, y)
    got = gradient_of(model, docs_rule(EPConfig(T1=30, T2=10, betas=(0.0, 0.3))), x, y)
    torch.testing.assert_close(got, 2.0 * near - far, atol=1e-12, rtol=0)


def test_the_docs_rule_is_closer_to_backpropagation_than_one_sided_ep(docs_rule):
    """On a network whose phases converge: the gradient of the loss at the fixed point by
    backpropagation through 150 steps from it, against both estimates at beta 0.2."""
    model, x, y = converged_case()
    free = model(x, y, model.init_neurons(x), 150)
    model.zero_grad(set_to_none=True)
    model.loss(model(x, y, free, 150, track_grad=True), y).mean().backward()
    true = flat_grads(model)
    cfg = EPConfig(T1=150, T2=150, betas=(0.0, 0.2))
    one_sided = gradient_of(model, EP(cfg), x, y)
    extrapolated = gradient_of(model, docs_rule(cfg), x, y)
    assert (extrapolated - true).norm() < 0.75 * (one_sided - true).norm()


def test_the_registered_docs_rule_trains_warns_and_refuses_from_the_command_line(
    docs_rule, monkeypatch, capsys
):
    monkeypatch.setitem(ESTIMATORS, "EPX", docs_rule)
    argv = [*DIGITS_CNN, "--alg", "EPX", "--betas", "0", "0.5", "--device", "cpu"]
    assert main_fast.main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    assert main_fast.main([*argv, "--thirdphase"]) == 0
    assert "warning: --thirdphase ignored: --alg EPX does not read it" in capsys.readouterr().err
    assert main_fast.main([*argv, "--betas", "0.1", "0.5"]) == 2
    assert "--alg EPX nudges from the free phase: use --betas 0 0.5" in capsys.readouterr().err
