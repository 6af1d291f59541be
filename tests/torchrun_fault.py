"""``main_fast.py`` with a fault injected into one rank, for the data-parallel failure tests.

    torchrun --nproc_per_node 2 tests/torchrun_fault.py <main_fast flags>

Environment: ``FAULT`` is ``raise`` (a RuntimeError), ``interrupt`` (a KeyboardInterrupt, as
Ctrl-C raises) or ``hang`` (the rank stops answering);
``FAULT_RANK`` the rank that fails; ``FAULT_BATCH`` the training batch (counted from 1 over the
whole run) at which it does.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_fast  # noqa: E402
import utils_ep_fast  # noqa: E402

train_batch = utils_ep_fast.train_batch
batches_done = 0


def faulty_train_batch(*args, **kwargs):
    """``train_batch``, but the chosen rank fails at the chosen batch."""
    global batches_done
    batches_done += 1
    if os.environ["RANK"] == os.environ["FAULT_RANK"] and batches_done == int(
        os.environ["FAULT_BATCH"]
    ):
        if os.environ["FAULT"] == "hang":
            time.sleep(3600)
        if os.environ["FAULT"] == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("injected failure")
    return train_batch(*args, **kwargs)


utils_ep_fast.train_batch = faulty_train_batch
sys.exit(main_fast.main())
