"""``main_fast.py`` with a fault injected into one rank, for the data-parallel failure tests.

    torchrun --nproc_per_node 2 tests/torchrun_fault.py <main_fast flags>

Environment: ``FAULT`` is ``raise`` (a RuntimeError), ``interrupt`` (a KeyboardInterrupt, as
Ctrl-C raises), ``hang`` (the rank stops answering), ``kill`` (the rank kills itself with
SIGKILL), ``sigterm`` (the rank sends itself SIGTERM) or ``sigterm-launcher`` (it sends SIGTERM
to torchrun, its parent, which passes it on to every rank); ``FAULT_RANK`` the rank that fails;
``FAULT_BATCH`` the training batch (counted from 1 over the whole run) at which it does, or,
with ``FAULT_IN_SAVE`` set, the figure of rank 0's epoch-end saves (counted from 1) during
which the signal is sent.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiment import entry  # noqa: E402

entry.install_stop_handlers()  # as main_fast.py does when it is the script

import main_fast  # noqa: E402
import utils_ep_fast  # noqa: E402
from experiment import runs  # noqa: E402

train_batch = utils_ep_fast.train_batch
save_figure = runs.save_figure
counted = 0


def fault() -> None:
    """What ``FAULT`` names, on this rank."""
    kind = os.environ["FAULT"]
    if kind == "hang":
        time.sleep(3600)
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind in ("sigterm", "sigterm-launcher"):
        os.kill(os.getppid() if kind == "sigterm-launcher" else os.getpid(), signal.SIGTERM)
        return
    raise RuntimeError("injected failure")


def at_the_chosen_moment() -> bool:
    """Whether this call is the chosen one of the chosen rank (every call is counted)."""
    global counted
    counted += 1
    return os.environ["RANK"] == os.environ["FAULT_RANK"] and counted == int(
        os.environ["FAULT_BATCH"]
    )


def faulty_train_batch(*args, **kwargs):
    """``train_batch``, but the chosen rank fails at the chosen batch."""
    if at_the_chosen_moment():
        fault()
    return train_batch(*args, **kwargs)


def faulty_save_figure(fig, path):
    """``storage.save_figure``, the fault sent during the chosen figure's drawing."""
    if at_the_chosen_moment():
        fault()
    return save_figure(fig, path)


if os.environ.get("FAULT_IN_SAVE"):
    runs.save_figure = faulty_save_figure
else:
    utils_ep_fast.train_batch = faulty_train_batch
sys.exit(main_fast.main())
