"""Memory of the two input gradients of robustness.py: backpropagation through the dynamics
grows with T1 and the batch, the EP estimate does not.

    python benchmarks/bench_robustness.py [--threads N]

For the seed CNN and the seed LCACNN (64 features 9x9, stride 2, 600 LCA iterations) on
CIFAR-sized images, each case runs in a fresh process one ``PixelClassifier.input_gradient``
and records ``tensor_peak``: the largest number of bytes held by the tensors created during
the call, from PyTorch's profiler (as in bench_memory.py). Backpropagation keeps a graph whose
size is ``batch * (a + b * T1)`` (``a``: the LCA loop's graph, ``b``: one step of the
dynamics); ``a`` and ``b`` are fitted from two T1 at batch 2, and the table extrapolates them to
a batch of 128 at T1 = 250, and to chunks of 32 images (robustness.py computes 16 at a time
by default, `--grad-chunk`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import print_table

MIB = 2**20
BATCH = 2
STEPS = (5, 15)


def child(model_name: str, kind: str, T1: int, threads: int | None) -> None:
    """One gradient in this fresh process; prints its tensor peak (MiB) as JSON."""
    import torch
    from bench_memory import tensor_peak_bytes
    from common import cifar_like_batch, seed_cnn, seed_lcacnn, set_threads
    from torch.profiler import ProfilerActivity, profile

    from robust_eval.pixel_classifier import PixelClassifier

    set_threads(threads)
    model = (seed_cnn() if model_name == "CNN" else seed_lcacnn()).eval()
    x, y = cifar_like_batch(BATCH)
    pixels = torch.rand_like(x)
    net = PixelClassifier(model, "CIFAR10", T1=T1, T2=T1, beta=0.01, chunk=BATCH)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        net.input_gradient(pixels, y, kind)
    print(json.dumps({"tensor_peak": tensor_peak_bytes(profiler.events()) / MIB}))


def measure(model_name: str, kind: str, T1: int, threads: int | None) -> float:
    command = [sys.executable, __file__, "--child", model_name, kind, str(T1)]
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["tensor_peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (cores)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODEL KIND T1
    args = parser.parse_args()
    if args.child:
        model_name, kind, T1 = args.child
        child(model_name, kind, int(T1), args.threads)
        return
    print(f"bench_robustness: input gradient of batch {BATCH}, float32; tensor peaks in MiB")
    rows = []
    for model_name in ("CNN", "LCACNN"):
        for kind in ("bptt", "ep"):
            short, long = (measure(model_name, kind, T1, args.threads) for T1 in STEPS)
            per_step = (long - short) / (BATCH * (STEPS[1] - STEPS[0]))
            fixed = short / BATCH - per_step * STEPS[0]
            rows.append(
                [
                    model_name,
                    kind,
                    f"{short:.1f}",
                    f"{long:.1f}",
                    f"{per_step:.2f}",
                    f"{fixed:.1f}",
                    f"{32 * (fixed + 250 * per_step) / 1024:.2f}",
                    f"{128 * (fixed + 250 * per_step) / 1024:.2f}",
                ]
            )
    header = ["model", "gradient", f"T1={STEPS[0]}", f"T1={STEPS[1]}", "per_image_step",
              "per_image_fixed", "GiB_32x250", "GiB_128x250"]  # fmt: skip
    print_table(header, rows)


if __name__ == "__main__":
    main()
