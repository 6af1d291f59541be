"""Where the time of one EP training iteration goes, for the seed CNN and LCACNN commands.

    python benchmarks/bench_train.py [--batch 32] [--T1 25] [--T2 5] [--lca-iters 60]
                                     [--repeats 3] [--threads N]

One iteration is what ``train_batch`` does with the seed's options (SGD with momentum,
``--thirdphase``, softmax readout, CE): LCA encode (LCACNN only, once per batch), free phase
(T1 steps), the two nudged phases (+beta and -beta, T2 steps each), the EP gradient
(``compute_syn_grads``), the optimizer step and, with ``finetune`` / ``learn``, the dictionary
update. T1, T2 and the LCA iterations are shortened (defaults 25 / 5 / 60, a tenth of the seed's
250 / 50 / 600); each part is timed on its own, and ``train_batch`` itself is timed in the same
repeat to show that the parts add up. Every repeat runs each model in turn; the table gives
medians over repeats (float32, random CIFAR-sized images).

The last columns extrapolate linearly to the seed's T1 = 250, T2 = 50, lca_iters = 600 (the
phases cost T x the per-step time, LCA lca_iters x its per-iteration time): the time of one batch
and of one training epoch over the seed's training images at this batch size (CNN: 50,000;
LCACNN pretrained / finetune: the 25,000 not used for the dictionary), without evaluation.
"""

from __future__ import annotations

import argparse
import time

from common import (
    cifar_like_batch,
    load_average,
    median,
    print_table,
    seed_cnn,
    seed_lcacnn,
    set_threads,
)

from utils_ep_fast import EP, EPConfig, make_optimizer, train_batch

SEED_T1, SEED_T2, SEED_LCA_ITERS = 250, 50, 600
PARTS = ("lca", "free", "nudged", "ep_grad", "optim", "dict")


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def iteration_parts(model, optimizer, x, y, cfg: EPConfig) -> dict[str, float]:
    """The steps of ``train_batch`` (EP, symmetric nudging), each timed in seconds."""
    seconds = {}
    encoding, seconds["lca"] = timed(model.prepare_input, x)
    code = encoding.code
    neurons = model.init_neurons(code)
    optimizer.zero_grad(set_to_none=True)
    beta_1, beta_2 = cfg.betas
    free, seconds["free"] = timed(model, code, y, neurons, cfg.T1, beta=beta_1)
    started = time.perf_counter()
    positive = model(code, y, free, cfg.T2, beta=beta_2)
    negative = model(code, y, free, cfg.T2, beta=-beta_2)
    seconds["nudged"] = time.perf_counter() - started
    _, seconds["ep_grad"] = timed(
        model.compute_syn_grads, code, y, negative, positive, (-beta_2, beta_2)
    )
    _, seconds["optim"] = timed(optimizer.step)
    _, seconds["dict"] = timed(model.after_update, encoding, positive)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T1", type=int, default=25)
    parser.add_argument("--T2", type=int, default=5)
    parser.add_argument("--lca-iters", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (cores)")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    load_before = load_average()

    lrs, wds = [0.25, 0.15, 0.1, 0.08, 0.05], [3e-4] * 5
    # name -> (model, betas, training images per epoch in the seed command)
    cases = {
        "CNN": (seed_cnn(), (0.0, 1.0), 50_000),
        "LCACNN pretrained": (
            seed_lcacnn(lca_iters=args.lca_iters, dict_training="pretrained"),
            (0.0, 0.5),
            25_000,
        ),
        "LCACNN finetune": (
            seed_lcacnn(lca_iters=args.lca_iters, dict_training="finetune"),
            (0.0, 0.5),
            25_000,
        ),
    }
    x, y = cifar_like_batch(args.batch)
    runs = {}
    for name, (model, betas, _) in cases.items():
        model.train()
        optimizer = make_optimizer(model, "sgd", lrs, wds, mmt=0.9)
        cfg = EPConfig(T1=args.T1, T2=args.T2, betas=betas, thirdphase=True)
        runs[name] = (model, optimizer, cfg)

    parts = {name: {part: [] for part in (*PARTS, "sum", "train_batch")} for name in cases}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, (model, optimizer, cfg) in runs.items():
            seconds = iteration_parts(model, optimizer, x, y, cfg)
            _, whole = timed(train_batch, model, optimizer, x, y, EP(cfg))
            if repeat == 0:
                continue
            for part, value in seconds.items():
                parts[name][part].append(value)
            parts[name]["sum"].append(sum(seconds.values()))
            parts[name]["train_batch"].append(whole)

    print(
        f"bench_train: one training iteration at batch {args.batch}, T1={args.T1}, T2={args.T2}, "
        f"lca_iters={args.lca_iters}; float32, {threads} threads; ms, medians of {args.repeats} "
        f"interleaved repeats; load average {load_before} -> {load_average()}"
    )
    header = ["case", *PARTS, "sum", "train_batch", "seed_batch_s", "seed_epoch_h"]
    rows = []
    shares = []
    for name, (model, _, n_train) in cases.items():
        ms = {part: 1e3 * median(values) for part, values in parts[name].items()}
        has_lca = hasattr(model, "lca")
        seed_ms = (
            ms["lca"] * (SEED_LCA_ITERS / args.lca_iters if has_lca else 1.0)
            + ms["free"] * SEED_T1 / args.T1
            + ms["nudged"] * SEED_T2 / args.T2
            + ms["ep_grad"]
            + ms["optim"]
            + ms["dict"]
        )
        epoch_h = seed_ms / 1e3 * (n_train / args.batch) / 3600
        rows.append(
            [
                name,
                *(f"{ms[part]:.0f}" for part in PARTS),
                f"{ms['sum']:.0f}",
                f"{ms['train_batch']:.0f}",
                f"{seed_ms / 1e3:.1f}",
                f"{epoch_h:.1f}",
            ]
        )
        shares.append(
            f"{name}: " + ", ".join(f"{part} {100 * ms[part] / ms['sum']:.0f}%" for part in PARTS)
        )
    print_table(header, rows)
    print("share of the iteration (shortened T):")
    for line in shares:
        print("  " + line)
    print(
        f"seed_batch_s / seed_epoch_h: linear extrapolation to T1={SEED_T1}, T2={SEED_T2}, "
        f"lca_iters={SEED_LCA_ITERS} at this batch size, training only (no evaluation)"
    )


if __name__ == "__main__":
    main()
