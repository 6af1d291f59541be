"""Peak memory of one training iteration against the number of steps: EP stays flat, BPTT grows.

    python benchmarks/bench_memory.py [--batch 32] [--threads N]

Cases (seed CNN, batch 32, float32, the seed's SGD with momentum, symmetric nudging): EP at
(T1, T2) = (25, 5) and (250, 50), and BPTT at the same (T1, T2) for contrast.

Each case runs twice, each time in a fresh Python process that builds the model, optimizer and
batch and then runs ONE ``train_batch``, measured one way per run:

* ``tensor_peak``: the largest number of bytes held by tensors created during the iteration, at
  any time. PyTorch's profiler (``profile_memory=True``) reports every CPU tensor allocation and
  release with the operator it happens in; their running sum, in time order, is the memory held
  by the iteration's tensors (states, pool indices, convolution outputs, gradients, momentum
  buffers and, for BPTT, the graph kept for the backward pass). Exact at operator granularity,
  and independent of how the allocator caches freed memory. The target is checked on this one:
  EP at T1 = 250 within 10% of T1 = 25.
* ``rss_growth``: the process's peak resident set size (``ru_maxrss``) after the iteration minus
  before it: what the operating system saw, including allocator caching and oneDNN's scratch
  memory, so it is an upper bound with a few MiB of noise. Measured in the run without the
  profiler, whose own records grow with the number of operations.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from common import print_table

STEPS = [(25, 5), (250, 50)]
MIB = 2**20


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_peak_bytes(events) -> int:
    """Largest running sum of the profiler's per-event tensor memory (allocations minus
    releases, each counted once, at the event's start), in time order."""
    held = peak = 0
    for event in sorted(events, key=lambda event: event.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def child(measure: str, alg: str, T1: int, T2: int, batch: int, threads: int | None) -> None:
    """One case, in this fresh process, measured by ``tensors`` or ``rss``; prints JSON."""
    from common import cifar_like_batch, seed_cnn, set_threads
    from torch.profiler import ProfilerActivity, profile

    from learning.registry import make_estimator
    from utils_ep_fast import EPConfig, make_optimizer, train_batch

    set_threads(threads)
    model = seed_cnn()
    optimizer = make_optimizer(model, "sgd", [0.25, 0.15, 0.1, 0.08, 0.05], [3e-4] * 5, mmt=0.9)
    x, y = cifar_like_batch(batch)
    rule = make_estimator(EPConfig(alg=alg, T1=T1, T2=T2, betas=(0.0, 1.0), thirdphase=True))
    if measure == "tensors":
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            train_batch(model, optimizer, x, y, rule)
        print(json.dumps({"tensor_peak": tensor_peak_bytes(profiler.events()) / MIB}))
    else:
        before = max_rss_mib()
        train_batch(model, optimizer, x, y, rule)
        print(json.dumps({"rss_before": before, "rss_after": max_rss_mib()}))


def run_case(alg: str, T1: int, T2: int, batch: int, threads: int | None) -> dict:
    """Both measures of one case, each from its own fresh process."""
    result = {}
    for measure in ("tensors", "rss"):
        command = [sys.executable, __file__, "--child", measure, alg, str(T1), str(T2)]
        command += ["--batch", str(batch)] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (cores)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # MEASURE ALG T1 T2
    args = parser.parse_args()
    if args.child:
        measure, alg, T1, T2 = args.child
        child(measure, alg, int(T1), int(T2), args.batch, args.threads)
        return

    import torch

    results = {
        (alg, T1, T2): run_case(alg, T1, T2, args.batch, args.threads)
        for alg in ("EP", "BPTT")
        for T1, T2 in STEPS
    }
    threads = args.threads or torch.get_num_threads()
    print(
        f"bench_memory: one train_batch of the seed CNN, batch {args.batch}, float32, {threads} "
        "threads; MiB; each case in a fresh process"
    )
    rows = []
    ratios = {}
    for alg in ("EP", "BPTT"):
        short = results[(alg, *STEPS[0])]
        short_rss = short["rss_after"] - short["rss_before"]
        for T1, T2 in STEPS:
            result = results[(alg, T1, T2)]
            rss = result["rss_after"] - result["rss_before"]
            ratios[(alg, T1)] = result["tensor_peak"] / short["tensor_peak"]
            rows.append(
                [
                    alg,
                    str(T1),
                    str(T2),
                    f"{result['tensor_peak']:.1f}",
                    f"{ratios[(alg, T1)]:.2f}",
                    f"{rss:.0f}",
                    f"{rss / short_rss:.2f}",
                    f"{result['rss_after']:.0f}",
                ]
            )
    header = ["alg", "T1", "T2", "tensor_peak", "vs_short", "rss_growth", "vs_short", "rss_peak"]
    print_table(header, rows)
    ep_ratio = ratios[("EP", STEPS[1][0])]
    verdict = "met" if abs(ep_ratio - 1.0) <= 0.10 else "NOT met"
    print(
        f"target: EP tensor_peak at T1={STEPS[1][0]} within 10% of T1={STEPS[0][0]}: "
        f"ratio {ep_ratio:.2f} ({verdict})"
    )


if __name__ == "__main__":
    main()
