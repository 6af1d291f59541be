"""Time one LCA iteration against the floor set by the convolutions it must run.

Each iteration computes ``G a = D^T (D a) - ||D_f||^2 a`` through the full reconstruction canvas:
one transposed convolution (F -> C, written as a matrix product and a fold) and one
convolution (C -> F). The floor is those two convolutions alone, on the same tensors; the ratio
shows what the rest of the loop (threshold, state update) costs on top. For reference the table
also times torch's ``conv_transpose2d`` + ``conv2d`` for the same product, lca-pytorch's
formulation of it, one F -> F convolution with the lateral-connectivity kernel G, and a whole
iteration in lca-pytorch's formulation (threshold, that convolution, out-of-place update; written
here with conv2d, where lca-pytorch runs the same product as a conv3d of depth 1), with the
speed-up of ``LCAConv2D`` over it.

    python benchmarks/bench_lca.py                    # 64 features, 9x9, stride 2, batch 32
    python benchmarks/bench_lca.py --threads 1 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lca import LCAConv2D  # noqa: E402


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall time of ``calls`` calls of ``fn`` (after one warm-up call), divided by ``calls``."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--kernel-size", type=int, default=9)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--iters", type=int, default=100, help="LCA iterations per timed call")
    parser.add_argument("--repeats", type=int, default=7, help="median of this many timings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    lca = LCAConv2D(args.features, args.channels, kernel_size=args.kernel_size,
                    stride=args.stride, lambda_=0.25, lca_iters=args.iters).to(device)  # fmt: skip
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    weights = lca.weights.detach()
    stride = (lca.sh, lca.sw)
    # a realistic (sparse) code, with its drive and states, for the timings of single pieces
    lca.return_vars = ["input_drives", "states", "acts"]
    drive, states, acts = lca(x)
    lca.return_vars = ["acts"]
    conns = lca.compute_lateral_connectivity(weights)

    def lca_call(iters: int) -> Callable[[], object]:
        def call() -> object:
            lca.lca_iters = iters
            return lca(x)

        return call

    n, f, h, w = acts.shape
    flat_weights = weights.reshape(f, -1).t()
    patches = acts.new_empty(n, flat_weights.shape[0], h * w)
    canvas_size = ((h - 1) * lca.sh + lca.kh, (w - 1) * lca.sw + lca.kw)

    def floor_call() -> None:
        torch.matmul(flat_weights, acts.reshape(n, f, h * w), out=patches)
        canvas = F.fold(patches, canvas_size, (lca.kh, lca.kw), stride=stride)
        F.conv2d(canvas, weights, stride=stride)

    def torch_convs_call() -> None:
        canvas = F.conv_transpose2d(acts, weights, stride=stride)
        F.conv2d(canvas, weights, stride=stride)

    def lateral_call() -> None:
        lca.lateral_competition(acts, conns)

    def lcapt_iteration_call() -> None:
        code = lca.transfer(states)
        inhibition = lca.lateral_competition(code, conns)
        states + (1 / lca.tau) * (drive - states - inhibition)

    per_iter, floor, torch_convs, lateral, lcapt_iter = [], [], [], [], []
    for _ in range(args.repeats):
        # Difference of a long and a 1-iteration call: the per-call setup cancels out.
        long = seconds_per_call(lca_call(args.iters), device, 1)
        short = seconds_per_call(lca_call(1), device, 3)
        per_iter.append((long - short) / (args.iters - 1))
        floor.append(seconds_per_call(floor_call, device, args.iters // 4 or 1))
        torch_convs.append(seconds_per_call(torch_convs_call, device, args.iters // 4 or 1))
        lateral.append(seconds_per_call(lateral_call, device, args.iters // 4 or 1))
        lcapt_iter.append(seconds_per_call(lcapt_iteration_call, device, args.iters // 4 or 1))

    ms_iter = 1e3 * statistics.median(per_iter)
    ms_floor = 1e3 * statistics.median(floor)
    ms_torch_convs = 1e3 * statistics.median(torch_convs)
    ms_lateral = 1e3 * statistics.median(lateral)
    ms_lcapt_iter = 1e3 * statistics.median(lcapt_iter)
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(
        f"LCA {args.features} features {args.channels}x{args.kernel_size}x{args.kernel_size}, "
        f"stride {args.stride}, input {args.batch}x{args.channels}x{args.size}x{args.size}, "
        f"device {device}, threads {threads}, median of {args.repeats}"
    )
    print(f"| {'what':<52} | {'ms / iteration':>14} |")
    print(f"| {'-' * 52} | {'-' * 14} |")
    print(f"| {'LCA iteration (LCAConv2D.forward)':<52} | {ms_iter:>14.3f} |")
    print(f"| {'floor: its two convolutions alone':<52} | {ms_floor:>14.3f} |")
    print(f"| {'ratio LCA / floor':<52} | {ms_iter / ms_floor:>13.2f}x |")
    print(f"| {'reference: torch conv_transpose2d + conv2d':<52} | {ms_torch_convs:>14.3f} |")
    print(f"| {'reference: one F->F conv with G (lca-pytorch)':<52} | {ms_lateral:>14.3f} |")
    print(
        f"| {'reference: lca-pytorch iteration (T, G conv, update)':<52} | {ms_lcapt_iter:>14.3f} |"
    )
    print(f"| {'speed-up of LCAConv2D over it':<52} | {ms_lcapt_iter / ms_iter:>13.2f}x |")


if __name__ == "__main__":
    main()
