"""Captured phases (compiled.py) against the engine's own eager loops, and their fallbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from math_checks import LCA_SMALL as SMALL
from math_checks import RCNN
from math_checks import digit_like_batch as images

import compiled
import main_fast
from lca_utils_ep_fast import LCA_CNN
from utils_ep_fast import P_CNN, Phases

LCACNN = {**SMALL, "lca_iters": 6}


def make(cls, config):
    torch.manual_seed(0)
    return cls(**config)


@torch.no_grad()
def phases(model, x, y, runner=None, T: int = 6, beta: float = 0.5) -> list[torch.Tensor]:
    """The LCA code (for the LCACNN), then the free states and the nudged states from them,
    the phases run by ``runner`` (None: the engine's loop)."""
    through = Phases(runner=runner)
    code = model.prepare_input(x).code
    free = through.run(model, code, y, model.init_neurons(code), T)
    nudged = through.run(model, code, y, free, T, beta=beta)
    return [code, *free, *nudged]


def assert_states_match(got, expected, tolerance: float) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max().item() <= tolerance


def notices(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]


def notices_of_two_runs(cls, config, capsys, **install) -> list[str]:
    """Phases run twice with ``compiled.install(**install)`` (after whatever the test broke):
    both times the eager states; returns the notices printed."""
    model = make(cls, config)
    x, y = images(5)
    expected = phases(model, x, y)
    runner = compiled.install(model, **install)
    for _ in range(2):
        assert_states_match(phases(model, x, y, runner), expected, 0.0)
    return notices(capsys)


NO_COMPILER = shutil.which("cc") is None and shutil.which("gcc") is None


# One batch of all 1437 training digits and one of the 360 test digits: few shapes to compile.
DIGITS_RUN = ["--model", "CNN", "--task", "DIGITS", "--channels", "3", "--kernels", "3",
              "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.2",
              "0.1", "--T1", "4", "--T2", "2", "--betas", "0.0", "0.5", "--thirdphase",
              "--mbs", "1500", "--epochs", "2", "--seed", "0", "--save",
              "--device", "cpu"]  # fmt: skip


def final_weights(results: Path) -> dict[str, torch.Tensor]:
    (path,) = results.glob("*/*/*/*/*/run_*/final_model.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


@pytest.mark.slow
@pytest.mark.skipif(NO_COMPILER, reason="inductor needs a C++ compiler on the CPU; none here")
def test_compiled_phases_give_the_eager_states_and_weights(tmp_path, capsys):
    """torch.compile of the EP step and of the LCA iteration: the same states as the engine's
    loops to 1e-6 (float32) on a small RCNN and a small LCACNN, and a --compile digits run
    ends with the weights of the same run without it to 1e-5. (The only test that compiles.)"""
    x, y = images(5)
    for cls, config in ((P_CNN, RCNN), (LCA_CNN, LCACNN)):
        model = make(cls, config)
        expected = phases(model, x, y)
        runner = compiled.install(model, compile=True, graphs=False)
        assert_states_match(phases(model, x, y, runner), expected, 1e-6)
    assert notices(capsys) == []  # nothing fell back

    assert main_fast.main(DIGITS_RUN + ["--results-dir", str(tmp_path / "eager")]) == 0
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled_run = DIGITS_RUN + ["--results-dir", str(tmp_path / "compiled"), "--compile"]
    assert main_fast.main(compiled_run) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it compiled
    assert notices(capsys) == []
    eager, captured = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert eager.keys() == captured.keys()
    for name, weight in eager.items():
        assert (captured[name] - weight).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("cls, config", [(P_CNN, RCNN), (LCA_CNN, LCACNN)])
def test_static_buffer_replays_give_the_eager_states(cls, config):
    """The CUDA-graph path's static buffers, replayed by plain calls on the CPU: exactly the
    eager states; one capture per shape and beta; returned states are never overwritten."""
    model = make(cls, config)
    x, y = images(5)
    x_small, y_small = images(3, seed=1)
    expected = phases(model, x, y)
    expected_small = phases(model, x_small, y_small)
    runner = compiled.install(model, compile=False, graphs=True)
    got = phases(model, x, y, runner)
    got_small = phases(model, x_small, y_small, runner)
    assert_states_match(got, expected, 0.0)
    assert_states_match(got_small, expected_small, 0.0)
    assert_states_match(phases(model, x, y, runner), expected, 0.0)  # replayed, not re-captured
    assert len(runner.captured) == 4  # 2 shapes x (beta 0, beta 0.5)
    if cls is LCA_CNN:
        assert len(model.lca.settle_runner.captured) == 2
    # states handed out earlier survive later phases of the same shape and beta
    assert_states_match(got, expected, 0.0)


def test_a_compile_that_fails_says_so_once_then_runs_eagerly(monkeypatch, capsys):
    def failing_compile(function, **kwargs):
        def run(*args):
            raise RuntimeError("no working C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    said = notices_of_two_runs(LCA_CNN, LCACNN, capsys, compile=True, graphs=False)
    assert said == [  # the encode runs first
        "notice: --compile: compiling the LCA iteration failed (RuntimeError: no working C++ "
        "compiler); it runs eagerly",
        "notice: --compile: compiling the EP step failed (RuntimeError: no working C++ "
        "compiler); it runs eagerly",
    ]


def test_a_torch_without_compile_says_so_once(monkeypatch, capsys):
    monkeypatch.delattr(torch, "compile")
    said = notices_of_two_runs(P_CNN, RCNN, capsys, compile=True, graphs=False)
    assert len(said) == 1 and "has no torch.compile; the EP step runs eagerly" in said[0]


def test_a_failed_capture_says_so_once_then_runs_without_graphs(monkeypatch, capsys):
    def failing_capture(function, device, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(compiled, "capture", failing_capture)
    said = notices_of_two_runs(LCA_CNN, LCACNN, capsys, compile=False, graphs=True)
    assert len(said) == 2
    assert "capturing the LCA iteration in a CUDA graph failed (RuntimeError: operation" in said[0]
    assert "capturing the EP step in a CUDA graph failed" in said[1]


def test_bptt_phase_runs_eagerly_with_one_notice(capsys):
    model = make(P_CNN, RCNN)
    x, y = images(5)
    neurons = model.init_neurons(x)
    expected = model(x, y, neurons, 3, beta=0.5, track_grad=True)
    through = Phases(runner=compiled.install(model, compile=False, graphs=True))
    for _ in range(2):
        got = through.run(model, x, y, neurons, 3, beta=0.5, track_grad=True)
        assert all(state.requires_grad for state in got)
        assert_states_match([s.detach() for s in got], [s.detach() for s in expected], 0.0)
    said = notices(capsys)
    assert len(said) == 1 and "(BPTT) keeps its autograd graph, so it runs eagerly" in said[0]


@pytest.mark.parametrize("dynamics, tol", [("async", None), ("sync", 1e-3)])
def test_async_or_tolerance_phases_run_eagerly_with_one_notice(dynamics, tol, capsys):
    """The captured phase is the synchronous fixed-length loop: with async steps or a tolerance
    the engine runs its own loop (the same states as without the hook), said once."""
    model = make(P_CNN, RCNN)
    model.set_dynamics(dynamics, tol)
    x, y = images(5)
    expected = phases(model, x, y)
    runner = compiled.install(model, compile=False, graphs=True)
    for _ in range(2):
        assert_states_match(phases(model, x, y, runner), expected, 0.0)
    said = notices(capsys)
    assert len(said) == 1 and "with --dynamics async or --tol the phases run eagerly" in said[0]
