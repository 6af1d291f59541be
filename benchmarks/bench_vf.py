"""Milliseconds per step of a vector-field RCNN against the symmetric one of the same shape.

A vector-field step adds, per max-pooled backward link, one convolution of the state with the
backward weights: the feedback unpools to the argmax of that pass (as the reference does). The
table gives both models' ms per step (interleaved repeats, medians) and the per-repeat ratio, for
the seed RCNN (CIFAR-10, batch 32) and the digits RCNN 16-32 (batch 16).
"""

from __future__ import annotations

import argparse

import torch
from common import (
    SEED_CNN,
    interleaved_times,
    load_average,
    median,
    paired_ratio,
    print_table,
    set_threads,
)

from utils_ep_fast import P_CNN
from vf_utils_ep_fast import VF_CNN

DIGITS_CNN = dict(SEED_CNN, in_size=8, in_channels=1, channels=[16, 32], kernels=[3, 3],
                  strides=[1, 1], paddings=[1, 1], pools="mm")  # fmt: skip
CASES = {"seed RCNN": (SEED_CNN, 32), "digits RCNN 16-32": (DIGITS_CNN, 16)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=7, help="median of this many timings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    print(f"threads {threads}, load average {load_average()} before")
    rows = []
    for name, (kwargs, batch) in CASES.items():
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch, kwargs["in_channels"], kwargs["in_size"], kwargs["in_size"],
                       generator=generator)  # fmt: skip
        y = torch.randint(0, 10, (batch,), generator=generator)
        models = {"symmetric": P_CNN(**kwargs), "vector field": VF_CNN(**kwargs)}
        variants = {
            label: (lambda m=model, x=x, y=y: m(x, y, m.init_neurons(x), args.steps))
            for label, model in models.items()
        }
        times = interleaved_times(variants, args.repeats)
        per_step = {label: 1e3 * median(t) / args.steps for label, t in times.items()}
        ratio = paired_ratio(times["vector field"], times["symmetric"])
        rows.append([name, str(batch), f"{per_step['symmetric']:.2f}",
                     f"{per_step['vector field']:.2f}", f"{ratio:.2f}"])  # fmt: skip
    print_table(["case", "batch", "symmetric ms", "vector field ms", "vf/symmetric"], rows)
    print(f"load average {load_average()} after")


if __name__ == "__main__":
    main()
