"""Milliseconds per step of the ResCNN (Hopfield-ResNet13) dynamics against its convolution floor,
and the CIFAR-10 epoch they project.

    python benchmarks/bench_rescnn.py [--repeats 5] [--steps 2] [--threads N] [--batches 32 128]

The net: ``--model ResCNN --channels 128 256 512 512 --fc 10 --act relu6`` with the anchor's
gains, MSE on the linear output units, on random 32x32x3 inputs (float32): 13 weight tensors,
8 hidden maps (128x32x32, 128x16x16, 256x16x16, 256x8x8, 512x8x8, 512x4x4, 512x4x4, 512x2x2)
and 10 output units. Every variant starts from the same weights, input and states:

    sync       ``model(x, y, states, T)`` with ``--dynamics sync``: every layer from the old
               states
    async      the same with ``--dynamics async``: one half-step per group of the colouring
               (three groups: the ``a_i`` and the output, the odd ``b_i``, the even ``b_i``)
    async_start  what an async phase does once before its first step: the forward pass of the
               edges feeding the second and third groups (``dynamics.refresh``), whose caches the
               first half-step's feedback reads (``dynamics.stepper``)
    floor      only the step's own convolutions: ``conv2d`` of every edge's source and
               ``conv_transpose2d`` of every edge's target (``linear`` and its transpose for the
               dense head), the edges leaving ``x`` once per call as the engine does
               (``bench_dynamics.floor_calls``)

Each repeat runs them in turn, ``--steps`` steps per call (load from other jobs falls on all
alike); the table gives medians over repeats of ms/step and the median of the per-repeat ratios.
``async`` per step counts the start-up once per call (``async_start`` ms, spread over
``--steps``); ``async_in_phase`` takes it out, ``(async - async_start) / steps``: the cost of a
step inside a long phase, where the start-up is once per 120 or 50 steps. ``max|diff|``: one
explicit sync step against ``sigma`` of autograd of the model's ``Phi`` (float rounding only).
Target: sync / floor <= 1.2.

The projection (second table, per batch size): one training batch of ``run/rescnn_cifar10.sh``
runs T1 = 120 free and 2 x T2 = 2 x 50 nudged steps (``--thirdphase``), then the EP estimate
(``compute_syn_grads``, timed here, median of ``--repeats`` calls); so

    batch_s = 220 * step_s + ep_grad_s,    epoch_h = 391 * batch_s / 3600

with ``step_s`` sync's ms/step, or async's in a phase plus its start-up once per phase
(``step_s = async_in_phase + 3 * async_start / 220``)
(50,000 images in 391 batches of 128; the last, of 80 images, counted as a full one). The
optimizer step and data loading are left out: under 1% of a training batch on the seed nets
(``bench_train.py``).
"""

from __future__ import annotations

import argparse
import time

import common as bench
import torch
from bench_dynamics import autograd_step, floor_calls

from dynamics import refresh
from graph import INPUT
from links import in_memory_format
from rescnn import ResCNN

# --channels 128 256 512 512 --fc 10 with the anchor's gains in the project's synapse order
HOPFIELD_RESNET13 = dict(
    in_size=32, in_channels=3, channels=[128, 256, 512, 512], fc=[10], activation="relu6",
    loss="mse", scale=[0.6, 0.6, 0.7] * 4 + [0.8],
)  # fmt: skip
T1, T2, PHASES = 120, 50, 3  # the anchor's steps; free, +beta and -beta phases
CIFAR10_BATCHES = 391  # ceil(50000 / 128)


def hopfield_resnet13(seed: int = 0) -> ResCNN:
    torch.manual_seed(seed)
    return ResCNN(**HOPFIELD_RESNET13)


def bench_case(model: ResCNN, batch: int, steps: int, repeats: int) -> tuple[list[str], dict]:
    """ms per step of sync, async and the floor at ``batch``; returns the table row and the
    median seconds per step of each dynamics."""
    model.eval()
    x, y = bench.cifar_like_batch(batch)
    generator = torch.Generator().manual_seed(1)
    states = [
        torch.rand((batch, *layer.shape), generator=generator) for layer in model.graph.layers
    ]
    x_fmt = in_memory_format(x)
    states = [in_memory_format(state) for state in states]

    with torch.no_grad():
        explicit_one = model.step(x_fmt, y, states, 0.0)
    autograd_one = autograd_step(model, x_fmt, y, states, 0.0, phi=type(model).Phi)
    max_diff = max(
        (a - b).abs().max().item() for a, b in zip(explicit_one, autograd_one, strict=True)
    )

    def run(dynamics: str):
        def phase():
            with model.dynamics_set_to(dynamics):
                model(x_fmt, y, states, steps)

        return phase

    input_edges = model.graph.input_edges
    inner_edges = [e for e, edge in enumerate(model.graph.edges) if edge.source != INPUT]
    input_drives = model.input_drives(x_fmt)

    @torch.no_grad()
    def async_start():
        drives = {}
        for group in model.groups[1:]:
            refresh(model, states, input_drives, group, drives)

    @torch.no_grad()
    def floor():
        floor_calls(model, x_fmt, states, input_edges)
        for _ in range(steps):
            floor_calls(model, x_fmt, states, inner_edges)

    times = bench.interleaved_times(
        {"sync": run("sync"), "async": run("async"), "async_start": async_start, "floor": floor},
        repeats,
    )
    times["async_in_phase"] = [
        whole - start for whole, start in zip(times["async"], times["async_start"], strict=True)
    ]
    ms = {key: 1e3 * bench.median(values) / steps for key, values in times.items()}
    ms["async_start"] *= steps  # once per call, not per step
    row = [
        str(batch),
        f"{ms['sync']:.1f}",
        f"{ms['async']:.1f}",
        f"{ms['async_start']:.1f}",
        f"{ms['async_in_phase']:.1f}",
        f"{ms['floor']:.1f}",
        f"{bench.paired_ratio(times['sync'], times['floor']):.2f}",
        f"{bench.paired_ratio(times['async'], times['floor']):.2f}",
        f"{bench.paired_ratio(times['async_in_phase'], times['floor']):.2f}",
        f"{max_diff:.1e}",
    ]
    phase_steps = T1 + (PHASES - 1) * T2
    async_step = ms["async_in_phase"] + PHASES * ms["async_start"] / phase_steps
    return row, {"sync": ms["sync"] / 1e3, "async": async_step / 1e3}


def ep_grad_seconds(model: ResCNN, batch: int, repeats: int) -> float:
    """Median seconds of one symmetric EP estimate (``compute_syn_grads``) at ``batch``."""
    x, y = bench.cifar_like_batch(batch)
    generator = torch.Generator().manual_seed(2)
    minus, plus = (
        [in_memory_format(torch.rand((batch, *layer.shape), generator=generator))
         for layer in model.graph.layers]
        for _ in range(2)
    )  # fmt: skip
    x_fmt = in_memory_format(x)
    seconds = []
    for _ in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        model.compute_syn_grads(x_fmt, y, minus, plus, (-0.1, 0.1))
        seconds.append(time.perf_counter() - started)
    return bench.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed call")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (cores)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    threads = bench.set_threads(args.threads)
    load_before = bench.load_average()

    model = hopfield_resnet13()
    rows, projections = [], []
    for batch in args.batches:
        row, step_s = bench_case(model, batch, args.steps, args.repeats)
        rows.append(row)
        grad_s = ep_grad_seconds(model, batch, args.repeats)
        for dynamics, seconds in step_s.items():
            batch_s = (T1 + (PHASES - 1) * T2) * seconds + grad_s
            epoch_h = CIFAR10_BATCHES * batch_s / 3600 * (128 / batch)
            row = [str(batch), dynamics, f"{1e3 * seconds:.1f}", f"{1e3 * grad_s:.0f}"]
            projections.append([*row, f"{batch_s:.1f}", f"{epoch_h:.1f}"])

    print(
        f"bench_rescnn: Hopfield-ResNet13 (channels 128 256 512 512, fc 10, relu6) on 32x32x3, "
        f"ms per step, float32, {threads} threads, medians of {args.repeats} interleaved repeats "
        f"x {args.steps} steps; load average {load_before} -> {bench.load_average()}"
    )
    header = ["batch", "sync", "async", "async_start", "async_in_phase", "floor", "sync/floor",
              "async/floor", "in_phase/floor", "max|diff|"]  # fmt: skip
    bench.print_table(header, rows)
    print("target: sync/floor <= 1.2")
    print()
    print(
        f"projected CIFAR-10 epoch: {T1} free + 2 x {T2} nudged steps per batch, then the EP "
        f"estimate; {CIFAR10_BATCHES} batches of 128 (a smaller batch: 128/batch times as many); "
        f"async: its step in a phase plus its start-up once per phase"
    )
    bench.print_table(
        ["batch", "dynamics", "step_ms", "ep_grad_ms", "batch_s", "epoch_h"], projections
    )


if __name__ == "__main__":
    main()
