"""Data-parallel training over processes started by ``torchrun`` (``torch.distributed``).

    torchrun --nproc_per_node N main_fast.py <flags>                     # one node
    torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT main_fast.py <flags>              # M nodes

A plain ``python main_fast.py`` never initialises a process group, and then every function
here is the identity (or a no-op): nothing changes for one process.

Under torchrun each process (rank ``r`` of ``N``) holds the whole model. On CUDA it uses the
GPU ``LOCAL_RANK`` and NCCL, on the CPU gloo (``--device cpu``, or no CUDA). Every rank draws the
same sequence of global batches of ``--mbs`` images as one process would with the same
``--seed`` (all ranks iterate the same loader, so augmentation and ``--random-sign`` draws stay
in step), and keeps its part of each (``split_batches``): ``tensor_split`` sizes, the first
``B mod N`` ranks one image more. The per-rank gradient ``g_r`` (a mean over its ``B_r``
images) becomes the global batch mean before the optimizer step::

    g = sum_r (B_r / B) g_r          one all-reduce of all gradients, flattened into one buffer

so N processes follow the one-process trajectory up to the order of floating-point sums. The
LCA dictionary update is exact the same way: its batch sums (``weight_update_terms``) are
summed over ranks (``collectives.sum_over_ranks``, with the all-reduce this module's gradient
average uses too) before the rule is applied. Metrics are sums over every sample
(``sum_totals``); evaluation gives each rank whole batches in turn (``shard_evaluation``), so
every image is computed in the very batch one process would use.

Only rank 0 prints and writes files; the other ranks' stdout and stderr go to ``os.devnull``.
Failures (``run``): the first rank that fails prints one line naming itself, records its exit
status in the rendezvous store and exits with it; every other rank sees the record (a watcher
thread polls the store, and a collective that loses its peer raises) and exits with the same
status. Collectives time out after ``--dist-timeout`` seconds, so a hung rank stops the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, SequentialSampler

from collectives import active, all_reduce_flat, unflatten
from experiment import entry
from experiment.entry import UsageError, first_line

FAILURE_KEY = "failure"
STOPPED_KEY = "stopped"  # how many other ranks have seen the failure and are exiting
WATCH_SECONDS = 0.5  # how often every rank looks for another rank's failure
RANK_ZERO_GRACE_SECONDS = 0.5  # a failure seen everywhere at once is reported by rank 0


def launched() -> bool:
    """Whether this process was started by torchrun (its environment names a rank)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    """Rank 0, the one process that prints and writes files."""
    return rank() == 0


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """``--device``: ``cpu``; a GPU index ``N``, ``cuda`` or ``cuda:N``; or ``auto`` (the first
    GPU). A GPU asked for where CUDA is absent falls back to the CPU with a notice."""
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    index = {"auto": "0", "cuda": "0"}.get(spec, spec.removeprefix("cuda:"))
    if not index.isdigit():
        raise UsageError(
            f"--device takes a GPU index or 'cpu' (or cuda, cuda:N, auto), got {spec!r}"
        )
    if not torch.cuda.is_available():
        print("notice: CUDA is not available, running on the CPU")
        return torch.device("cpu")
    if int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
    torch.backends.cudnn.benchmark = True
    return torch.device(f"cuda:{index}")


def device_for(spec: str) -> torch.device:
    """``--device`` for this process: :func:`resolve_device` for one process; under
    torchrun the GPU ``LOCAL_RANK`` (NCCL), or the CPU (gloo) with ``--device cpu`` or without
    CUDA."""
    if not active():
        return resolve_device(spec)
    if uses_cuda(spec):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def uses_cuda(spec: str) -> bool:
    """Whether a torchrun process with ``--device spec`` computes on its GPU."""
    return torch.cuda.is_available() and str(spec).strip().lower() != "cpu"


def setup(device_spec: str, device_typed: bool, timeout_s: float) -> None:
    """Join the process group torchrun describes in the environment.

    NCCL for CUDA tensors (with gloo beside it for the CPU-side sums), gloo alone on the CPU;
    ``timeout_s`` bounds every collective. Ranks other than 0 go quiet; every rank starts the
    failure watcher and, without ``--seed``, seeds its RNGs like rank 0 so that all ranks
    build the same model and draw the same batches.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if uses_cuda(device_spec):
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                "use at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    quiet_unless_rank_zero()
    if rank() == 0 and device_typed and uses_cuda(device_spec):
        print(f"notice: --device {device_spec} ignored under torchrun: each process uses the GPU "
              "of its LOCAL_RANK")  # fmt: skip
    FailureBoard.start(timeout)
    share_seed()


def quiet_unless_rank_zero() -> None:
    """Under torchrun, send the stdout and stderr of every rank but 0 to ``os.devnull`` (the
    failure report writes to ``sys.__stderr__``); nothing for one process."""
    if launched() and os.environ["RANK"] != "0" and sys.stdout is sys.__stdout__:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)


def share_seed() -> None:
    """Seed Python's, numpy's and torch's RNGs on every rank with one number drawn by rank 0.

    ``--seed`` reseeds them all afterwards when given; without it, this is what keeps the
    ranks' initial weights and data order the same."""
    seed = torch.tensor([int.from_bytes(os.urandom(4), "little") >> 1], dtype=torch.int64)
    dist.broadcast(seed, src=0)  # rank 0's draw replaces the others
    random.seed(seed.item())
    np.random.seed(seed.item())
    torch.manual_seed(seed.item())


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the block on local rank 0 of every node first, then on the others: one process per
    node downloads a missing dataset while the rest wait, then read it."""
    first = not active() or os.environ.get("LOCAL_RANK", "0") == "0"
    if not first:
        dist.barrier()
    yield
    if active() and first:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def shard_bounds(batch: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s part of a batch of ``batch`` items, in the sizes of
    ``torch.tensor_split``: ``batch // world`` each, one more for the first ``batch % world``."""
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SplitBatches:
    """The batches of ``loader`` cut into ``world`` contiguous parts; yields part ``rank``.

    ``fraction`` is ``B_r / B`` of the last batch yielded: the weight of this rank's gradient
    in the global mean (``average_gradients``). A rank's part may be empty (a last batch
    smaller than ``world``); it then contributes zeros.
    """

    def __init__(self, loader: DataLoader, rank: int, world: int) -> None:
        self.loader = loader
        self.rank = rank
        self.world = world
        self.fraction = 1.0 / world

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The loader's iterator is made here, not at the first batch: making one draws a seed
        # from the RNGs, and the ranks must draw exactly what one process iterating the loader
        # draws (a progress bar may make an iterator it never reads).
        return self._parts(iter(self.loader))

    def _parts(self, batches: Iterator) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            stop_agreed()
            start, stop = shard_bounds(len(y), self.rank, self.world)
            self.fraction = (stop - start) / len(y)
            yield x[start:stop], y[start:stop]


def stop_agreed() -> None:
    """A safe point that every rank passes together, at a batch boundary: if any rank was asked
    to stop (Ctrl-C, SIGTERM), every rank stops here (``entry.raise_if_stopped``), so that no
    rank waits in a collective that the others have left. One all-reduce of one number."""
    if active():
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        flag = torch.tensor([entry.stop_requested() or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            entry.request_stop(int(flag.item()))
    entry.raise_if_stopped()


def split_batches(loader: DataLoader, optimizer: torch.optim.Optimizer | None = None) -> Iterable:
    """The training batches of this rank (``SplitBatches``), with ``optimizer`` (if given) now
    averaging the gradients over ranks before every step. Every batch boundary is a safe point
    where a stop request is honoured (``stop_agreed``), with or without a process group."""
    if not active():
        return SplitBatches(loader, 0, 1)
    if loader.batch_size < world_size():
        raise UsageError(
            f"--mbs {loader.batch_size} is smaller than the {world_size()} processes: every "
            f"process needs a part of each batch (--mbs is the global batch)"
        )
    batches = SplitBatches(loader, rank(), world_size())
    if optimizer is not None:
        optimizer.register_step_pre_hook(lambda *_: average_gradients(optimizer, batches.fraction))
    return batches


def shard_evaluation(loader: DataLoader) -> DataLoader:
    """The whole batches ``r, r + N, r + 2N, ...`` of the unshuffled ``loader`` for rank ``r``.

    The same images in the same batches as one process computes them, so the summed counts
    give exactly one process's accuracy. Iterating it draws from the RNGs what ``loader``
    draws (one worker seed per pass), so the ranks stay in step. ``loader`` without a group.
    """
    if not active():
        return loader
    if not isinstance(loader.sampler, SequentialSampler):
        raise ValueError("only an unshuffled loader can be sharded for evaluation")
    batches = list(loader.batch_sampler)[rank() :: world_size()]
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        generator=loader.generator,
    )


# --------------------------------------------------------------------------------------------
# Sums over ranks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def average_gradients(optimizer: torch.optim.Optimizer, fraction: float) -> None:
    """Every ``.grad`` of ``optimizer``'s parameters becomes ``sum_r fraction_r * grad_r``, the
    gradient of the global batch when ``fraction_r = B_r / B``; one all-reduce for all of them.
    Parameters without a gradient (the same ones on every rank) are left out."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    grads = [grad for grad in grads if grad is not None]
    if not grads:
        return
    summed = all_reduce_flat(grads, scale=fraction)
    for grad, total in zip(grads, unflatten(summed, grads), strict=True):
        grad.copy_(total)


def sum_totals(totals: dict[str, float]) -> dict[str, float]:
    """Every value summed over ranks (in float64 on the CPU); ``totals`` without a group."""
    if not active():
        return totals
    values = torch.tensor(list(totals.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(totals, values.tolist(), strict=True))


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


class FailureBoard:
    """The first failure of any rank, kept in the rendezvous store as ``"<status> <rank>"``.

    A watcher thread on every rank polls it and ends the rank with the same exit status, so a
    rank that computes (not waiting in a collective) stops too, whatever the backend.
    """

    store: dist.Store | None = None
    lock = threading.Lock()
    stopping = False  # this rank is already on its way out (Ctrl-C): let it finish
    done = threading.Event()  # set on a clean exit: the watcher returns
    watcher: threading.Thread | None = None

    @classmethod
    def start(cls, timeout: datetime.timedelta) -> None:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timeout,
        )  # fmt: skip
        cls.store = dist.PrefixStore(f"data_parallel_failures/{restart}", client)
        cls.watcher = threading.Thread(target=cls._watch, name="failure-watcher", daemon=True)
        cls.watcher.start()
        entry.note_interrupts(cls.stop)

    @classmethod
    def close(cls) -> None:
        """Stop the watcher and let go of the store before a clean exit: a thread still inside
        a store call while the interpreter shuts down aborts the process (SIGABRT)."""
        cls.done.set()
        if cls.watcher is not None:
            cls.watcher.join(timeout=2 * WATCH_SECONDS + 1.0)
        with cls.lock:
            cls.store = None

    @classmethod
    def stop(cls) -> None:
        """This rank is on its way out (Ctrl-C): the watcher lets it finish."""
        cls.stopping = True

    @classmethod
    def read(cls) -> tuple[int, int] | None:
        """(exit status, rank) of the recorded failure, or None."""
        with cls.lock:
            if cls.store is None or not cls.store.check([FAILURE_KEY]):
                return None
            status, failed_rank = cls.store.get(FAILURE_KEY).decode().split()
        return int(status), int(failed_rank)

    @classmethod
    def record(cls, status: int) -> tuple[int, int]:
        """Record this rank's failure unless one is there already; returns the one kept."""
        mine = f"{status} {rank()}"
        with cls.lock:
            kept = cls.store.compare_set(FAILURE_KEY, "", mine).decode()
        failed_status, failed_rank = kept.split()
        return int(failed_status), int(failed_rank)

    @classmethod
    def follow(cls, status: int) -> None:
        """Exit with another rank's failure ``status``, telling it so."""
        with cls.lock:
            cls.store.add(STOPPED_KEY, 1)
        _exit_now(status)

    @classmethod
    def wait_for_the_others(cls) -> None:
        """Give the other ranks time to exit with this rank's status before this one exits
        (torchrun ends the rest with SIGTERM as soon as one has gone)."""
        deadline = time.monotonic() + 2 * WATCH_SECONDS + 1.0
        while time.monotonic() < deadline:
            with cls.lock:
                if cls.store.add(STOPPED_KEY, 0) >= world_size() - 1:
                    return
            time.sleep(0.05)

    @classmethod
    def _watch(cls) -> None:
        try:
            while not cls.done.wait(WATCH_SECONDS):
                failure = cls.read()
                # rank 0 on its way out is saving interrupted.pt: it follows once that is done
                held = cls.stopping and rank() == 0
                if failure is not None and failure[1] != rank() and not held:
                    cls.follow(failure[0])
        except Exception:  # the store went away: torchrun is tearing the run down
            return


def _exit_now(status: int) -> None:
    """Flush and leave at once: a process group that lost a peer may block a clean exit."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


# what gloo and NCCL say when a peer has gone (killed) or stopped answering (--dist-timeout)
LOST_PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Connection refused",
    "NCCL communicator was aborted",
)


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective or store call that lost another process of the run."""
    if isinstance(error, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in LOST_PEER_SIGNS)


def status_and_message(error: BaseException, statuses: entry.Statuses) -> tuple[int, str, bool]:
    """Exit status, one-line message, and whether a traceback helps (an unforeseen error): a
    lost process (``entry.EXIT_LOST``), ``entry.failure``'s, else 1 and the error's first
    line."""
    if lost_peer(error):
        lost = "lost another process of the run (killed, or it stopped answering within "
        return entry.EXIT_LOST, f"{lost}--dist-timeout): {first_line(error)}", False
    fix = "check the free space and permissions there (--results-dir, --data-dir)"
    known = entry.failure(error, statuses, fix)
    if known is None:
        return 1, first_line(error), True
    return (*known, False)


def fail(status: int, message: str, error: BaseException | None = None) -> None:
    """Stop every rank with ``status``: report once (the first rank to fail), then exit."""
    FailureBoard.stopping = True
    if rank() != 0:
        time.sleep(RANK_ZERO_GRACE_SECONDS)
    kept_status, failed_rank = FailureBoard.record(status)
    if failed_rank != rank():
        FailureBoard.follow(kept_status)
    if error is not None:
        traceback.print_exception(error, file=sys.__stderr__)
    if message:
        # on a line of its own: rank 0's progress bar may be half-way along the terminal's
        print(f"\nerror (rank {rank()} of {world_size()}): {message}", file=sys.__stderr__)
    FailureBoard.wait_for_the_others()
    _exit_now(kept_status)


def run(
    todo: Callable[[], int],
    device_spec: str,
    device_typed: bool,
    timeout_s: float,
    statuses: entry.Statuses = (),
) -> int:
    """Run ``todo`` (returns an exit status) as one rank of a torchrun job; see the module
    docstring for the failure protocol. ``statuses``: (kind of error, exit status) pairs, the
    script's own (``storage.ERROR_STATUSES`` and more). Returns 0 after leaving the group
    cleanly."""
    if not timeout_s > 0:  # every rank finds this; rank 0 says it
        return entry.fail(
            f"--dist-timeout must be positive seconds, got {timeout_s}", entry.EXIT_USAGE
        )
    try:
        setup(device_spec, device_typed, timeout_s)
        status = todo()
    except BaseException as error:  # noqa: BLE001 (every failure must reach the other ranks)
        status, message, unforeseen = status_and_message(error, statuses)
        if FailureBoard.store is None:  # failed before joining: nobody to tell
            print(f"error: {message}", file=sys.__stderr__)
            return status
        fail(status, message, error if unforeseen and FailureBoard.read() is None else None)
    if status != 0:  # the todo has said why, but only rank 0's output is shown
        stopped = {
            entry.EXIT_INTERRUPTED: "interrupted",
            entry.EXIT_TERMINATED: "terminated (SIGTERM)",
        }.get(status, "stopped")
        fail(status, "" if rank() == 0 else stopped)
    FailureBoard.close()
    dist.destroy_process_group()
    return 0


__all__ = [
    "SplitBatches",
    "active",
    "average_gradients",
    "device_for",
    "is_main_process",
    "launched",
    "rank",
    "run",
    "shard_bounds",
    "shard_evaluation",
    "split_batches",
    "sum_totals",
    "world_size",
]
