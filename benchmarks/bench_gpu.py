"""GPU figures: eager against captured phases, the floor, LCA, a seed training iteration.

    python benchmarks/bench_gpu.py [--batch 128] [--precisions fp32 tf32 bf16] [--steps 20]
                                   [--repeats 5] [--lca-iters 600] [--T1 250] [--T2 50]
    python benchmarks/bench_gpu.py --device cpu --batch 4 --T1 4 --T2 2 --lca-iters 4 \\
                                   --steps 2 --repeats 1 --precisions fp32 bf16   # dry run

Four tables, for the seed RCNN and the seed LCACNN (as in the seed README's commands, random
CIFAR-sized images, random weights):

1. ms per step at ``--batch`` for every precision in ``--precisions``:
   ``eager`` (the engine's loop), ``captured`` (``--compile``: on CUDA the compiled step replayed
   from a CUDA graph, ``compiled.PhaseRunner``), ``autograd`` (``s <- sigma(autograd dPhi/ds)``
   of the plain Phi of ``bench_dynamics.py``, the reference formulation) and ``floor`` (the
   step's own convolutions, pools, unpools and transposed convolutions alone), with the ratios
   autograd / captured and captured / floor. The LCACNN rows time its body (the phases on a
   fixed LCA code). Goals on CUDA: captured / floor <= 1.3, autograd / captured >= 3 (RCNN).
2. LCA ms per iteration of the encode at ``--batch``, eager and captured.
3. One training iteration (``train_batch``: free phase of T1 steps, nudged phases at +beta and
   -beta of T2 steps, EP estimate, SGD with momentum; the LCACNN's encode of ``--lca-iters``)
   and one evaluation batch (encode and T1 free steps), eager and captured, and the projected
   epoch of the seed commands: training batches (CNN: 50,000 images; LCACNN pretrained: the
   25,000 not used for the dictionary) plus the 10,000 test images, loader time excluded.
   ``busy_%`` is the share of the captured iteration's wall time the GPU spends in kernels,
   from the profiler (CUDA only; goal >= 90%).
4. The loader: CIFAR-10 training images per second through the ``--data-aug`` transforms
   (flip, crop, to tensor, normalise) in batches of ``--batch``, by number of workers, and the
   seconds to the first batch (the worker start-up every epoch pays). Compare with the images
   per second a captured training iteration consumes (table 3): the loader keeps up when it
   delivers more.

CUDA timings synchronise at the end of every timed call. Every repeat runs all the variants in
turn (``common.interleaved_times``); tables give medians. ``--device cpu`` runs the same code on
the CPU (captured = compiled with inductor, no graphs), to check the script: its figures are CPU
figures, not GPU ones.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import common as bench
import numpy as np
import torch
from bench_dynamics import autograd_step, floor_calls
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import compiled
import precision
from experiment import data_loading
from utils_ep_fast import (
    EP,
    EnergyNet,
    EPConfig,
    Phases,
    in_memory_format,
    make_optimizer,
    settle,
    train_batch,
)

SEED_TRAIN_IMAGES = {"RCNN": 50_000, "LCACNN": 25_000}
SEED_TEST_IMAGES = 10_000
SEED_BETAS = {"RCNN": (0.0, 1.0), "LCACNN": (0.0, 0.5)}
SEED_LRS, SEED_WDS = [0.25, 0.15, 0.1, 0.08, 0.05], [3e-4] * 5


def synchronized(run, device: torch.device):
    """``run`` followed by a wait for the device, so a timer sees the work itself."""

    def wrapped():
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return wrapped


def hooks_for(model: EnergyNet, kind: str = "fp32") -> dict[bool, tuple]:
    """The eager (False) and captured (True) phase runner and LCA hook of ``model`` in
    precision ``kind``, made once so that captures and compiles are kept between repeats."""
    dtype = torch.bfloat16 if kind == "bf16" else None
    hooks = {}
    for captured in (False, True):
        runner = compiled.install(model, compile=captured, autocast_dtype=dtype)
        lca = getattr(model, "lca", None)
        hooks[captured] = Phases(runner=runner), lca.settle_runner if lca is not None else None
    compiled.uninstall(model)
    return hooks


def hooked(model: EnergyNet, hooks: tuple, run, device: torch.device):
    """``run(phases)`` with the phases of ``hooks`` (and the LCA hook set), synchronised."""

    def wrapped():
        if hasattr(model, "lca"):
            model.lca.settle_runner = hooks[1]
        return run(hooks[0])

    return synchronized(wrapped, device)


def in_precision(kind: str, device: torch.device):
    """bf16 runs the reference and floor calls under autocast; tf32 / fp32 are backend flags."""
    if kind == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def step_row(name, model, x, y, kind, args, device) -> list[str]:
    """Table 1: one model, one precision."""
    precision.apply(kind, device)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    states = [torch.rand((x.shape[0], *link.shape), generator=generator) for link in model.links]
    states = [in_memory_format(state.to(device)) for state in states]
    x_fmt = in_memory_format(x)
    steps, beta = args.steps, 0.0

    @torch.no_grad()
    def phase(phases):
        phases.run(model, x_fmt, y, states, steps, beta=beta)

    def autograd():
        neurons = states
        with in_precision(kind, device):
            for _ in range(steps):
                neurons = autograd_step(model, x_fmt, y, neurons, beta)

    @torch.no_grad()
    def floor():
        with in_precision(kind, device):
            floor_calls(model, x_fmt, states, range(1))
            for _ in range(steps):
                floor_calls(model, x_fmt, states, range(1, model.num_layers))

    hooks = hooks_for(model, kind)
    variants = {
        "eager": hooked(model, hooks[False], phase, device),
        "captured": hooked(model, hooks[True], phase, device),
        "autograd": synchronized(autograd, device),
        "floor": synchronized(floor, device),
    }
    times = bench.interleaved_times(variants, args.repeats)
    compiled.uninstall(model)
    ms = {key: 1e3 * bench.median(values) / steps for key, values in times.items()}
    return [
        name,
        kind,
        *(f"{ms[key]:.3f}" for key in ("eager", "captured", "autograd", "floor")),
        f"{bench.paired_ratio(times['eager'], times['captured']):.2f}",
        f"{bench.paired_ratio(times['autograd'], times['captured']):.2f}",
        f"{bench.paired_ratio(times['captured'], times['floor']):.2f}",
    ]


def lca_row(model, x, args, device) -> list[str]:
    """Table 2: ms per LCA iteration, eager and captured (float32)."""
    hooks = hooks_for(model)

    @torch.no_grad()
    def encode(phases):
        model.lca(x)

    times = bench.interleaved_times(
        {
            "eager": hooked(model, hooks[False], encode, device),
            "captured": hooked(model, hooks[True], encode, device),
        },
        args.repeats,
    )
    compiled.uninstall(model)
    ms = {key: 1e3 * bench.median(values) / model.lca.lca_iters for key, values in times.items()}
    return [
        "LCACNN",
        f"{ms['eager']:.3f}",
        f"{ms['captured']:.3f}",
        f"{bench.paired_ratio(times['eager'], times['captured']):.2f}",
    ]


def busy_fraction(run, device: torch.device) -> float | None:
    """Share of ``run``'s wall time the GPU spends in kernels (profiler); None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        started = time.perf_counter()
        run()
        wall = time.perf_counter() - started
    kernels_us = sum(
        event.self_device_time_total
        for event in profiler.key_averages()
        if event.device_type == DeviceType.CUDA  # kernels and copies on one stream: no overlap
    )
    return kernels_us / 1e6 / wall


def train_rows(name, make_model, x, y, args, device) -> list[list[str]]:
    """Table 3: one training iteration and one evaluation batch, eager and captured."""
    model = make_model().to(device)
    optimizer = make_optimizer(model, "sgd", SEED_LRS, SEED_WDS, mmt=0.9)
    rule = EP(EPConfig(T1=args.T1, T2=args.T2, betas=SEED_BETAS[name], thirdphase=True))
    hooks = hooks_for(model)

    def iteration(phases):
        model.train()
        train_batch(model, optimizer, x, y, rule, phases)

    def evaluation(phases):
        model.eval()
        with torch.no_grad():
            settle(model, x, y, args.T1, phases)

    variants = {}
    for captured, label in ((False, "eager"), (True, "captured")):
        variants[f"{label}_train"] = hooked(model, hooks[captured], iteration, device)
        variants[f"{label}_eval"] = hooked(model, hooks[captured], evaluation, device)
    times = bench.interleaved_times(variants, args.repeats)
    busy = busy_fraction(variants["captured_train"], device)
    seconds = {key: bench.median(values) for key, values in times.items()}
    batches_train = SEED_TRAIN_IMAGES[name] / x.shape[0]
    batches_test = SEED_TEST_IMAGES / x.shape[0]
    rows = []
    for label in ("eager", "captured"):
        train_s, eval_s = seconds[f"{label}_train"], seconds[f"{label}_eval"]
        epoch_min = (batches_train * train_s + batches_test * eval_s) / 60
        rows.append(
            [
                name,
                label,
                f"{train_s:.3f}",
                f"{eval_s:.3f}",
                f"{x.shape[0] / train_s:.0f}",
                f"{epoch_min:.1f}",
                f"{100 * busy:.0f}" if (busy is not None and label == "captured") else "-",
            ]
        )
    compiled.uninstall(model)
    return rows


class RandomCifar(Dataset):
    """Random 32x32x3 uint8 images handed to the CIFAR-10 training transforms as PIL images,
    as torchvision's CIFAR10 does for every item."""

    def __init__(self, n: int) -> None:
        self.images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.transform = data_loading._transforms("CIFAR10", data_aug=True)[0]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), index % 10


def loader_rows(args) -> list[list[str]]:
    """Table 4: images per second of the augmented CIFAR-10 loader, by workers."""
    dataset = RandomCifar(args.batch * (args.loader_batches + 1))
    rows = []
    for workers in args.workers:
        loader = DataLoader(
            dataset,
            batch_size=args.batch,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
        )
        started = time.perf_counter()
        batches = iter(loader)
        next(batches)
        first = time.perf_counter() - started
        started = time.perf_counter()
        count = sum(x.shape[0] for x, _ in batches)
        rate = count / (time.perf_counter() - started)
        rows.append([str(workers), f"{rate:.0f}", f"{first:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed call (table 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lca-iters", type=int, default=600)
    parser.add_argument("--T1", type=int, default=250)
    parser.add_argument("--T2", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["steps", "lca", "train", "loader"]
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: CUDA is not available here (--device cpu for a dry run)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        what = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        what = "CPU (a dry run: CPU figures, not GPU ones)"
    print(
        f"# bench_gpu: {what}, torch {torch.__version__}, batch {args.batch}, "
        f"load {bench.load_average()}"
    )
    x, y = (tensor.to(device) for tensor in bench.cifar_like_batch(args.batch))
    cnn = bench.seed_cnn().to(device)
    lcacnn = bench.seed_lcacnn(lca_iters=args.lca_iters).to(device)
    if "steps" not in args.skip:
        with torch.no_grad():
            code = lcacnn.prepare_input(x).code
        rows = [
            step_row(name, model, inputs, y, kind, args, device)
            for kind in args.precisions
            for name, model, inputs in (("RCNN", cnn, x), ("LCACNN body", lcacnn, code))
        ]
        print(f"\n1. ms per step, batch {args.batch}, {args.steps} steps per call (beta 0)")
        header = ["case", "precision", "eager", "captured", "autograd", "floor"]
        bench.print_table(header + ["eager/capt", "autograd/capt", "capt/floor"], rows)
    precision.apply("fp32", device)

    if "lca" not in args.skip:
        print(f"\n2. LCA ms per iteration, batch {args.batch}, float32")
        bench.print_table(
            ["case", "eager", "captured", "eager/capt"], [lca_row(lcacnn, x, args, device)]
        )

    if "train" not in args.skip:
        rows = train_rows("RCNN", bench.seed_cnn, x, y, args, device)
        rows += train_rows(
            "LCACNN", lambda: bench.seed_lcacnn(lca_iters=args.lca_iters), x, y, args, device
        )
        print(
            f"\n3. training iteration at T1 {args.T1}, T2 {args.T2} (third phase), "
            f"{args.lca_iters} LCA iterations, batch {args.batch}, float32; seconds"
        )
        header = ["case", "phases", "train_s", "eval_s", "images/s", "epoch_min", "busy_%"]
        bench.print_table(header, rows)

    if "loader" not in args.skip:
        print(f"\n4. CIFAR-10 --data-aug loader, batch {args.batch}, {args.loader_batches} batches")
        bench.print_table(["workers", "images/s", "first_batch_s"], loader_rows(args))


if __name__ == "__main__":
    main()
