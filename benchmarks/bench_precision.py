"""What ``--precision`` costs the EP update: its relative error against float32.

    python benchmarks/bench_precision.py [--device cpu|cuda] [--batch 32] [--T1 250] [--T2 50]
                                         [--betas 1.0 0.1 0.01] [--batches 2] [--threads N]
                                         [--models RCNN LCACNN]

For the seed RCNN and the seed LCACNN (``--thirdphase``, softmax readout, CE; random
initial weights, random CIFAR-sized images), every reduced precision (bf16 everywhere, tf32
on CUDA only) and every nudging strength ``beta2`` in ``--betas``, it prints
``||g_p - g_fp32|| / ||g_fp32||`` for the EP update ``g`` of one batch (all parameters together,
``precision.ep_update_error``), the median over ``--batches`` batches, with the minimum and
maximum. The seed commands use beta2 = 1.0 (RCNN) and 0.5 (LCACNN); ``precision.py`` warns
above 5% and refuses above 25%.
"""

from __future__ import annotations

import argparse

import common as bench
import torch

import precision
from utils_ep_fast import EP, EPConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T1", type=int, default=250)
    parser.add_argument("--T2", type=int, default=50)
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--lca-iters", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=["RCNN", "LCACNN"])
    args = parser.parse_args()
    threads = bench.set_threads(args.threads)
    device = torch.device(args.device)
    precisions = ["bf16"] + (["tf32"] if device.type == "cuda" else [])
    print(
        f"# {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}),"
        f" torch {torch.__version__}, {threads} threads, batch {args.batch}, T1 {args.T1}, "
        f"T2 {args.T2}, LCA {args.lca_iters} iterations, load {bench.load_average()}"
    )
    builders = {
        "RCNN": bench.seed_cnn,
        "LCACNN": lambda: bench.seed_lcacnn(lca_iters=args.lca_iters),
    }
    models = {name: builders[name]() for name in args.models}
    rows = []
    for name, model in models.items():
        model.to(device)
        for beta in args.betas:
            rule = EP(EPConfig(T1=args.T1, T2=args.T2, betas=(0.0, beta), thirdphase=True))
            for kind in precisions:
                errors = []
                for seed in range(args.batches):
                    x, y = bench.cifar_like_batch(args.batch, seed)
                    x, y = x.to(device), y.to(device)
                    errors.append(precision.ep_update_error(model, x, y, rule, kind))
                rows.append(
                    [
                        name,
                        kind,
                        f"{beta:g}",
                        f"{100 * bench.median(errors):.2f}",
                        f"{100 * min(errors):.2f}",
                        f"{100 * max(errors):.2f}",
                    ]
                )
                print(" ".join(rows[-1]), flush=True)
    print()
    bench.print_table(["model", "precision", "beta2", "rel_err_%", "min_%", "max_%"], rows)


if __name__ == "__main__":
    main()
