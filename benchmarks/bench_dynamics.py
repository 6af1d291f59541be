"""Milliseconds per step of the explicit EP dynamics, against autograd of Phi and against the floor.

    python benchmarks/bench_dynamics.py [--repeats 7] [--steps 3] [--threads N] [--beta 0]
                                        [--batches 32 128]

Cases: the seed RCNN (3 -> 64 -> 128 -> 256 -> 512 on 32x32, kernels 3 pad 1, max-pools,
softmax readout 10) at batch 32 and 128, and the seed LCACNN body (copy layer 64 on 16x16 ->
conv 256 -> conv 512, pools i m m, softmax readout 10; its input is an LCA code) at batch 32
and 128. Every variant starts from the same weights, input and states (float32):

    explicit      ``model(x, y, states, T)``: the engine's steps, no graph, each map in the
                  layout of ``memory_format_for`` (channels_last for maps of >= 8x8 pixels),
                  the fixed input's drive ``F_0(x)`` computed once per call of T steps
    states_nchw   the same engine with every state kept NCHW (its layout choice switched off)
    autograd      ``s <- sigma(autograd dPhi/ds)``, the reference semantics written the plain
                  way: Phi from plain torch calls (conv2d, max_pool2d, linear) on NCHW states,
                  as a researcher would write it; the 1.6x target is measured against this
    autograd_eng  the same derivative by autograd of ``model.Phi`` on the engine's layouts: the
                  engine's own pooling and layouts given to autograd as well
    floor         only the step's own conv2d, max-pool (with indices), max-unpool and
                  conv_transpose2d calls (and linear ones, if any), in the engine's layouts,
                  the input's drive once per call as in ``explicit``

Every repeat runs each variant once for ``--steps`` steps, in turn, so that load from other jobs
falls on all of them alike. The table gives medians over repeats of ms/step and the median of
the per-repeat ratios. Checks of one step: ``max|diff|`` is the largest difference between the
explicit step and autograd_eng (same kernels and layouts: float rounding only); ``off_plain`` is
the fraction of state entries more than 1e-4 away from the plain autograd step: a max-pool
window whose two largest values are within float32 rounding may pick another argmax in another
layout (either one may then differ from float64).

Targets: autograd / explicit >= 1.6 at batch 32 and explicit / floor <= 1.15.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    cifar_like_batch,
    interleaved_times,
    load_average,
    median,
    paired_ratio,
    print_table,
    seed_cnn,
    seed_lcacnn,
    set_threads,
)

import links
from graph import INPUT
from links import AvgPool, MaxPool, in_memory_format
from utils_ep_fast import EnergyNet


def plain_phi(
    model: EnergyNet, x: torch.Tensor, y: torch.Tensor, neurons: list[torch.Tensor], beta: float
) -> torch.Tensor:
    """``sum_k <F_k(s_k), s_{k+1}> - beta L`` per sample, from plain torch calls (no engine
    helper): the textbook way to write the primitive function."""
    below = [x, *neurons[:-1]]
    phi = x.new_zeros(x.shape[0])
    for k, link in enumerate(model.links):
        drive, synapse = below[k], link.synapse
        if isinstance(synapse, torch.nn.Linear):
            drive = F.linear(drive.flatten(1), synapse.weight, synapse.bias)
        elif synapse is not None:
            drive = F.conv2d(drive, synapse.weight, synapse.bias, synapse.stride, synapse.padding)
            if isinstance(link.pool, MaxPool):
                drive = F.max_pool2d(drive, 2, 2)
            elif isinstance(link.pool, AvgPool):
                drive = F.avg_pool2d(drive, 2, 2)
        phi = phi + (drive * neurons[k]).flatten(1).sum(1)
    if beta != 0.0:
        phi = phi - beta * model.loss(neurons, y)
    return phi


def autograd_step(
    model: EnergyNet,
    x: torch.Tensor,
    y: torch.Tensor,
    neurons: list[torch.Tensor],
    beta: float,
    phi=plain_phi,
) -> list[torch.Tensor]:
    """One step ``s <- sigma(dPhi/ds)`` with the derivative taken by autograd of ``phi``
    (``plain_phi`` or the model's own ``Phi``)."""
    leaves = [state.detach().requires_grad_(True) for state in neurons]
    with torch.enable_grad():
        grads = torch.autograd.grad(phi(model, x, y, leaves, beta).sum(), leaves)
    with torch.no_grad():
        updated = [model.sigma(grad) for grad in grads]
        if model.linear_output:
            updated[-1] = grads[-1]  # linear output units take dPhi/ds itself
    return updated


@torch.no_grad()
def floor_calls(model: EnergyNet, x: torch.Tensor, neurons: list[torch.Tensor], edges) -> None:
    """The heavy calls of the given edges (indices into ``model.graph.edges``; a chain's edge
    ``k`` feeds its layer ``k``) in one explicit step, and nothing else: the forward convolution
    and pool of the edge's source; for an edge leaving a layer (not the input ``x``), the pool's
    adjoint and the transposed convolution of its target (the feedback). Inputs are expected
    in the engine's layouts."""
    for e in edges:
        edge, link = model.graph.edges[e], model.links[e]
        synapse = link.synapse
        if synapse is None:
            continue
        below = x if edge.source == INPUT else neurons[edge.source]
        above = neurons[edge.target]
        if isinstance(synapse, torch.nn.Linear):
            F.linear(below.flatten(1), synapse.weight, synapse.bias)
            if edge.source != INPUT:
                above @ synapse.weight
            continue
        z = F.conv2d(below, synapse.weight, synapse.bias, synapse.stride, synapse.padding)
        _, indices = link.pool.forward(z)
        if edge.source != INPUT:
            unpooled = link.pool.adjoint(above, indices, z.shape)
            F.conv_transpose2d(
                unpooled, synapse.weight, None, synapse.stride, synapse.padding, link.output_padding
            )


def all_nchw(run):
    """``run`` with every state kept NCHW by the engine (its channels_last threshold out of reach;
    its max-pool still runs on channels_last internally)."""

    def wrapped():
        saved = links.CHANNELS_LAST_MIN_PIXELS
        links.CHANNELS_LAST_MIN_PIXELS = float("inf")
        try:
            return run()
        finally:
            links.CHANNELS_LAST_MIN_PIXELS = saved

    return wrapped


def bench_case(
    name: str,
    model: EnergyNet,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    repeats: int,
    beta: float,
) -> list[str]:
    model.eval()
    generator = torch.Generator().manual_seed(1)
    batch = x.shape[0]
    states = [torch.rand((batch, *link.shape), generator=generator) for link in model.links]
    x_fmt = in_memory_format(x)
    states_fmt = [in_memory_format(state) for state in states]

    with torch.no_grad():
        explicit_one = model.step(x_fmt, y, states_fmt, beta)
    engine_one = autograd_step(model, x_fmt, y, states_fmt, beta, phi=type(model).Phi)
    plain_one = autograd_step(model, x, y, states, beta)
    max_diff = max(
        (a - b).abs().max().item() for a, b in zip(explicit_one, engine_one, strict=True)
    )
    off_plain = sum(
        ((a - b).abs() > 1e-4).sum().item() for a, b in zip(explicit_one, plain_one, strict=True)
    ) / sum(state.numel() for state in explicit_one)

    def explicit():
        model(x_fmt, y, states_fmt, steps, beta=beta)

    def explicit_nchw():
        model(x, y, states, steps, beta=beta)

    def autograd_plain():
        neurons = states
        for _ in range(steps):
            neurons = autograd_step(model, x, y, neurons, beta)

    def autograd_engine():
        neurons = states_fmt
        for _ in range(steps):
            updated = autograd_step(model, x_fmt, y, neurons, beta, phi=type(model).Phi)
            neurons = [in_memory_format(state) for state in updated]

    @torch.no_grad()
    def floor():
        # as in ``model.forward``: the fixed input's drive once per call, the other links per step
        floor_calls(model, x_fmt, states_fmt, range(1))
        for _ in range(steps):
            floor_calls(model, x_fmt, states_fmt, range(1, model.num_layers))

    times = interleaved_times(
        {
            "explicit": explicit,
            "states_nchw": all_nchw(explicit_nchw),
            "autograd": autograd_plain,
            "autograd_eng": autograd_engine,
            "floor": floor,
        },
        repeats,
    )
    ms = {key: 1e3 * median(values) / steps for key, values in times.items()}
    return [
        name,
        str(batch),
        f"{ms['explicit']:.1f}",
        f"{ms['states_nchw']:.1f}",
        f"{ms['autograd']:.1f}",
        f"{ms['autograd_eng']:.1f}",
        f"{ms['floor']:.1f}",
        f"{paired_ratio(times['autograd'], times['explicit']):.2f}",
        f"{paired_ratio(times['autograd_eng'], times['explicit']):.2f}",
        f"{paired_ratio(times['states_nchw'], times['explicit']):.2f}",
        f"{paired_ratio(times['explicit'], times['floor']):.2f}",
        f"{max_diff:.1e}",
        f"{off_plain:.0e}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed call")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (cores)")
    parser.add_argument("--beta", type=float, default=0.0, help="0 = free phase (most steps)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    threads = set_threads(args.threads)
    load_before = load_average()

    rows = []
    for batch in args.batches:
        x, y = cifar_like_batch(batch)
        rows.append(bench_case("RCNN", seed_cnn(), x, y, args.steps, args.repeats, args.beta))
    for batch in args.batches:
        x, y = cifar_like_batch(batch)
        model = seed_lcacnn(lca_iters=30)  # a realistic sparse code; LCA is not timed here
        code = model.prepare_input(x).code
        rows.append(bench_case("LCACNN body", model, code, y, args.steps, args.repeats, args.beta))

    print(
        f"bench_dynamics: ms per step, float32, {threads} threads, beta={args.beta}, medians of "
        f"{args.repeats} interleaved repeats x {args.steps} steps; load average {load_before} "
        f"-> {load_average()}"
    )
    print_table(
        [
            "case",
            "batch",
            "explicit",
            "states_nchw",
            "autograd",
            "autograd_eng",
            "floor",
            "autograd/expl",
            "autograd_eng/expl",
            "nchw/expl",
            "expl/floor",
            "max|diff|",
            "off_plain",
        ],
        rows,
    )
    print("targets: autograd/expl >= 1.6 at batch 32; expl/floor <= 1.15")


if __name__ == "__main__":
    main()
