"""Fewer steps to the same fixed point: synchronous vs asynchronous dynamics, and --tol.

    python benchmarks/bench_async.py [--part steps digits epoch] [--threads 1] [--cap 300]
                                     [--epochs 15] [--repeats 3] [--net rcnn | rescnn]
                                     [--schedules 20/5:sync 20/5:async ...]

``steps``: free-phase steps from zero until ``max |s_t - s_(t-1)|`` first falls below 1e-3 and
1e-4 (``>cap`` when it does not within ``--cap`` steps), sync vs async, at batch 32 for
    * the seed RCNN (3 -> 64 -> 128 -> 256 -> 512 on 32x32, default init) on random images,
    * the seed LCACNN body (copy layer 64 on 16x16, convs 256 and 512, init scale 0.5,
      scale_feedback 0.01) on the LCA code (the seed's LCA, 600 iterations) of random images,
    * the digits RCNN 16-32 and a digits LCACNN (16 features 3x3, copy layer, conv 32), both
      first trained here with sync steps (T1 = 20, T2 = 5), on 32 test images.
For the trained digits nets it also settles the whole test set both ways (up to ``--cap``
steps, or until max|ds| < 1e-6) and reports how many images end in a different fixed point
(max state difference > 1e-3) and the test accuracy of each dynamics' fixed point.

``digits``: the README's digits RCNN 16-32 run (symmetric EP, betas 0 / 0.5, batch 16, SGD
momentum 0.9, lrs 0.05 0.03 0.02, ``--epochs`` epochs, seed 0) under each schedule
``T1/T2:dynamics[:tol]``: best and final test accuracy (the test phase uses the run's T1 and
dynamics), mean free-phase steps, wall time of the whole run, and its speed-up over the first
schedule (the README's sync T1 = 20, T2 = 5).

``epoch``: the time of one training epoch of the same run under each schedule, the schedules
taken in turn every repeat (``--repeats``), as a median and the median per-repeat speed-up over
the first schedule: a ratio less exposed to load from other jobs than the whole runs' times.

``--net rescnn`` takes the README's digits ResCNN 16-32 (two residual blocks, ``--scale 2``,
lrs 0.05 per tensor of block 1, 0.03 of block 2, 0.02 for the readout, batch 16) instead of the
RCNN in ``digits`` and ``epoch``, and in ``steps`` measures it alone, at its initialisation (also
with gains of 1) and trained (its colouring has three groups: ``a_1, a_2``, then ``b_1``, then
``b_2``).

Each part is measured in one process; other jobs on the machine slow every timing alike only
roughly (runs are sequential), so the header gives the load average before and after.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import common as bench
import torch

from experiment import data_loading
from lca_utils_ep_fast import LCA_CNN
from rescnn import ResCNN
from utils_ep_fast import (
    EP,
    P_CNN,
    EPConfig,
    Schedule,
    make_optimizer,
    max_change,
    train,
    train_epoch,
)

TOLS = (1e-3, 1e-4)
# The README's digits nets: RCNN 16-32 on 8x8x1; LCACNN with 16 LCA features 3x3, stride 1
DIGITS_RCNN = {**bench.SEED_CNN, "in_size": 8, "in_channels": 1, "channels": [16, 32],
               "kernels": [3, 3], "strides": [1, 1], "paddings": [1, 1], "pools": "mm"}  # fmt: skip
DIGITS_LCACNN = {**bench.SEED_LCACNN, "in_size": 8, "in_channels": 1, "lca_feats": 16,
                 "lca_ksize": 3, "lca_stride": 1, "lca_lambda": 0.1, "lca_eta": 0.01,
                 "lca_iters": 100,
                 "channels": [16, 32], "kernels": [3], "strides": [1], "paddings": [1],
                 "pools": "im", "scale": None, "scale_feedback": 0.01,
                 "dict_training": "learn"}  # fmt: skip

DIGITS_RESCNN = {"in_size": 8, "in_channels": 1, "channels": [16, 32], "fc": [10],
                 "activation": "my_hard_sig", "softmax": True, "loss": "cel",
                 "scale": 2.0}  # fmt: skip
# --net: the digits net of the digits and epoch parts (and of steps for the ResCNN), its --lrs
NETS = {
    "rcnn": (lambda: P_CNN(**DIGITS_RCNN), [0.05, 0.03, 0.02]),
    "rescnn": (lambda: ResCNN(**DIGITS_RESCNN), [0.05] * 3 + [0.03] * 3 + [0.02]),
}


@torch.no_grad()
def steps_to_tolerances(model, code, y, dynamics: str, cap: int):
    """First step at which max|ds| < each of TOLS (None past ``cap``), and the last states."""
    found: dict[float, int] = {}
    with model.dynamics_set_to(dynamics):
        neurons = model.init_neurons(code)
        for step in range(1, cap + 1):
            previous, neurons = neurons, model(code, y, neurons, 1)
            change = max_change(previous, neurons)
            for tol in TOLS:
                if tol not in found and change < tol:
                    found[tol] = step
            if len(found) == len(TOLS):
                break
    return [found.get(tol) for tol in TOLS], neurons


def digits_loaders(batch: int, seed: int = 0):
    train_set, test_set = data_loading.build_datasets("DIGITS", download=False)
    train_loader = data_loading.make_loader(train_set, batch, shuffle=True, seed=seed)
    return train_loader, data_loading.make_loader(test_set, 360, shuffle=False)


def train_digits(model, lrs, epochs, batch, T1, T2, dynamics="sync", tol=None):
    """Symmetric EP on the digits (betas 0 / 0.5, SGD momentum 0.9); history and seconds."""
    torch.manual_seed(0)
    train_loader, test_loader = digits_loaders(batch)
    model.set_dynamics(dynamics, tol)
    optimizer = make_optimizer(model, "sgd", lrs, mmt=0.9)
    rule = EP(EPConfig(T1=T1, T2=T2, betas=(0.0, 0.5), thirdphase=True))
    started = time.perf_counter()
    history = train(model, optimizer, (train_loader, test_loader), rule, Schedule(epochs))
    return history, time.perf_counter() - started


@torch.no_grad()
def fixed_point_agreement(model, cap: int) -> list[str]:
    """Settle every digits test image with sync and with async; how many differ, accuracies."""
    _, test_loader = digits_loaders(32)
    x, y = next(iter(test_loader))
    code = model.prepare_input(x).code
    settled = {}
    for dynamics in ("sync", "async"):
        with model.dynamics_set_to(dynamics, tol=1e-6):
            settled[dynamics] = model(code, y, model.init_neurons(code), cap)
    gaps = torch.stack(
        [
            (a - b).abs().flatten(1).max(1).values
            for a, b in zip(settled["sync"], settled["async"], strict=True)
        ]
    ).amax(0)
    accuracy = {name: (model.predict(s) == y).float().mean().item() for name, s in settled.items()}
    return [
        f"{(gaps > 1e-3).float().mean().item():.3f}",
        f"{gaps.max().item():.2f}",
        f"{100 * accuracy['sync']:.1f}",
        f"{100 * accuracy['async']:.1f}",
    ]


def rescnn_cases(args) -> list[tuple]:
    """The digits ResCNN 16-32 at its initialisation (with its gains of 2, and with gains of 1),
    then trained with sync steps."""
    build, lrs = NETS["rescnn"]
    digits_x, digits_y = next(iter(digits_loaders(32)[1]))
    digits_x, digits_y = digits_x[:32], digits_y[:32]
    torch.manual_seed(0)
    cases = [("digits ResCNN 16-32, random init", build(), digits_x, digits_y, None)]
    torch.manual_seed(0)
    gain_1 = ResCNN(**{**DIGITS_RESCNN, "scale": 1.0})
    cases.append(("digits ResCNN 16-32, gains 1, random init", gain_1, digits_x, digits_y, None))
    print("training the digits ResCNN with sync steps (T1 = 20, T2 = 5) ...", flush=True)
    torch.manual_seed(0)
    model = build()
    history, _ = train_digits(model, lrs, args.train_epochs, 16, 20, 5)
    name = f"digits ResCNN 16-32, {args.train_epochs} epochs ({100 * history[-1]['test_acc']:.1f}%)"
    return [*cases, (name, model, digits_x, digits_y, "agreement")]


def seed_and_digits_cases(args) -> list[tuple]:
    """The seed RCNN and LCACNN body at their initialisation; the digits RCNN and LCACNN
    trained with sync steps."""
    cases = []
    torch.manual_seed(0)
    x, y = bench.cifar_like_batch(32)
    cases.append(("seed RCNN, random init", P_CNN(**bench.SEED_CNN), x, y, None))
    lca_model = bench.seed_lcacnn(scale_feedback=0.01)
    cases.append(("seed LCACNN body, random init", lca_model, x, y, None))
    print("training the digits nets with sync steps (T1 = 20, T2 = 5) ...", flush=True)
    torch.manual_seed(0)
    rcnn = P_CNN(**DIGITS_RCNN)
    history, _ = train_digits(rcnn, [0.05, 0.03, 0.02], args.train_epochs, 16, 20, 5)
    digits_x, digits_y = next(iter(digits_loaders(32)[1]))
    digits_x, digits_y = digits_x[:32], digits_y[:32]
    name = f"digits RCNN 16-32, {args.train_epochs} epochs ({100 * history[-1]['test_acc']:.1f}%)"
    cases.append((name, rcnn, digits_x, digits_y, "agreement"))
    torch.manual_seed(0)
    lca = LCA_CNN(**DIGITS_LCACNN)
    history, _ = train_digits(lca, [0.5, 0.2], args.train_epochs, 32, 20, 5)
    name = f"digits LCACNN 16-32, {args.train_epochs} epochs ({100 * history[-1]['test_acc']:.1f}%)"
    cases.append((name, lca, digits_x, digits_y, "agreement"))
    return cases


def part_steps(args) -> None:
    cases = rescnn_cases(args) if args.net == "rescnn" else seed_and_digits_cases(args)
    rows, agreement_rows = [], []
    for name, model, images, labels, agreement in cases:
        model.eval()
        code = model.prepare_input(images).code
        found = {}
        for dynamics in ("sync", "async"):
            found[dynamics], _ = steps_to_tolerances(model, code, labels, dynamics, args.cap)
        row = [name]
        for i in range(len(TOLS)):
            sync, asyn = found["sync"][i], found["async"][i]
            ratio = f"{sync / asyn:.2f}" if sync and asyn else "n/a"
            row += [str(sync or f">{args.cap}"), str(asyn or f">{args.cap}"), ratio]
        rows.append(row)
        print(" | ".join(row), flush=True)
        if agreement:
            agreement_rows.append([name, *fixed_point_agreement(model, args.cap)])
    header = ["case (batch 32)"]
    for tol in TOLS:
        header += [f"sync<{tol:g}", f"async<{tol:g}", "sync/async"]
    bench.print_table(header, rows)
    print()
    header = ["digits test set (360)", "differ>1e-3", "max_gap", "acc_sync%", "acc_async%"]
    bench.print_table(header, agreement_rows)


def part_digits(args) -> None:
    rows = []
    baseline = None
    build, lrs = NETS[args.net]
    for schedule in args.schedules:
        T1, T2, dynamics, tol = parse_schedule(schedule)
        torch.manual_seed(0)
        model = build()
        history, seconds = train_digits(model, lrs, args.epochs, 16, T1, T2, dynamics, tol)
        baseline = baseline or seconds
        best = max(h["test_acc"] for h in history)
        free_steps = sum(h.get("free_steps", T1) for h in history) / len(history)
        row = [schedule, f"{100 * best:.1f}", f"{100 * history[-1]['test_acc']:.1f}"]
        row += [f"{free_steps:.1f}", f"{seconds:.1f}", f"{baseline / seconds:.2f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["T1/T2:dynamics[:tol]", "best%", "final%", "free_steps", "seconds", "speed-up"]
    bench.print_table(header, rows)


def part_epoch(args) -> None:
    """Seconds of one training epoch under each schedule, the schedules taken in turn every
    repeat (so that load from other jobs falls on all alike), each run going on from its last
    epoch (all start from the same weights):
    medians and the bench.median per-repeat speed-up over the first schedule."""
    variants = {}
    build, lrs = NETS[args.net]
    for schedule in args.schedules:
        T1, T2, dynamics, tol = parse_schedule(schedule)
        torch.manual_seed(0)
        model = build()
        model.set_dynamics(dynamics, tol)
        optimizer = make_optimizer(model, "sgd", lrs, mmt=0.9)
        rule = EP(EPConfig(T1=T1, T2=T2, betas=(0.0, 0.5), thirdphase=True))
        loader = digits_loaders(16)[0]
        variants[schedule] = partial(train_epoch, model, optimizer, loader, rule)
    times = bench.interleaved_times(variants, args.repeats, warmup=0)
    first = times[args.schedules[0]]
    rows = [
        [name, f"{bench.median(seconds):.1f}", f"{bench.paired_ratio(first, seconds):.2f}"]
        for name, seconds in times.items()
    ]
    bench.print_table(["T1/T2:dynamics[:tol]", "epoch_s", "speed-up"], rows)


def parse_schedule(schedule: str) -> tuple[int, int, str, float | None]:
    """``T1/T2:dynamics[:tol]`` -> (T1, T2, dynamics, tol)."""
    fields = schedule.split(":")
    T1, T2 = (int(v) for v in fields[0].split("/"))
    return T1, T2, fields[1], float(fields[2]) if len(fields) > 2 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", default=["steps", "digits", "epoch"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cap", type=int, default=300, help="most steps a settling may take")
    parser.add_argument("--train-epochs", type=int, default=8, help="epochs of the trained nets")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of each digits run")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per schedule")
    parser.add_argument("--net", choices=list(NETS), default="rcnn", help="the digits net")
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["20/5:sync", "20/5:async", "10/3:async", "6/2:async", "20/5:async:0.01"],
    )
    args = parser.parse_args()
    threads = bench.set_threads(args.threads)
    print(
        f"bench_async: {threads} thread(s), float32, digits net {args.net}, load average "
        f"{bench.load_average()}"
    )
    if "steps" in args.part:
        part_steps(args)
    if "digits" in args.part:
        part_digits(args)
    if "epoch" in args.part:
        part_epoch(args)
    print(f"load average at the end: {bench.load_average()}")


if __name__ == "__main__":
    main()
