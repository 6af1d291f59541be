"""Milliseconds per training batch of every learning rule of ``--alg``, against symmetric EP.

One batch is a rule's whole estimate (``Estimator.estimate``: its phases and the gradient it
writes), on the digits RCNN 16-32 of the README's comparison (8x8x1 images, batch 16, T1 = 20,
T2 = 5, ``my_hard_sig``, MSE on the output units so that every rule applies). The model's
weights are the same for every rule and are not stepped, so each rule times the same work on
every repeat. The variants are interleaved (``common.interleaved_times``); the table gives the
median ms per batch and the median of the per-repeat ratios to symmetric EP. What each rule
costs in steps: EP one-sided T1 + T2, symmetric T1 + 2 T2; BPTT T1 - T2 without a graph and T2
with one, then a backward pass; RBP T1 and ``--adjoint-iters`` (T2) vector-Jacobian products of
one step; CL and CpL T1 + T2.
"""

from __future__ import annotations

import argparse

import torch
from common import SEED_CNN, interleaved_times, load_average, median, paired_ratio, print_table

from learning.estimators import EPConfig
from learning.registry import make_estimator
from utils_ep_fast import P_CNN

DIGITS_RCNN = dict(SEED_CNN, in_size=8, in_channels=1, channels=[16, 32], kernels=[3, 3],
                   strides=[1, 1], paddings=[1, 1], pools="mm", softmax=False,
                   loss="mse")  # fmt: skip
# label -> the rule's settings beyond T1 and T2 (the comparison's: betas 0 0.5, CpL eta 0.5)
RULES = {
    "EP symmetric": dict(alg="EP", betas=(0.0, 0.5), thirdphase=True),
    "EP one-sided": dict(alg="EP", betas=(0.0, 0.5)),
    "EP random sign": dict(alg="EP", betas=(0.0, 0.5), random_sign=True),
    "BPTT": dict(alg="BPTT"),
    "RBP": dict(alg="RBP"),
    "CL": dict(alg="CL"),
    "CpL": dict(alg="CpL", cpl_eta=0.5),
}
REFERENCE = "EP symmetric"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--T1", type=int, default=20, help="free steps")
    parser.add_argument("--T2", type=int, default=5, help="nudged, clamped or adjoint steps")
    parser.add_argument("--repeats", type=int, default=9, help="median of this many timings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {load_average()} before")
    torch.manual_seed(0)
    model = P_CNN(**DIGITS_RCNN)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)

    def batch_of(rule):
        def run():
            model.zero_grad(set_to_none=True)
            rule.estimate(model, x, y)

        return run

    variants = {
        label: batch_of(make_estimator(EPConfig(T1=args.T1, T2=args.T2, **settings)))
        for label, settings in RULES.items()
    }
    times = interleaved_times(variants, args.repeats)
    rows = [
        [label, f"{1e3 * median(seconds):.1f}", f"{paired_ratio(seconds, times[REFERENCE]):.2f}"]
        for label, seconds in times.items()
    ]
    print(f"digits RCNN 16-32, batch {args.batch}, T1 {args.T1}, T2 {args.T2}, MSE outputs")
    print_table(["rule", "ms / batch", f"/ {REFERENCE}"], rows)
    print(f"load average {load_average()} after")


if __name__ == "__main__":
    main()
