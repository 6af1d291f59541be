"""Sums over the processes of a data-parallel run, for the engine and the run machinery alike.

Under ``torchrun`` (a process group initialised by ``experiment.distributed``) each sum is one
``torch.distributed`` all-reduce of the tensors flattened into one buffer; without a process
group every function is the identity. The engine calls ``sum_over_ranks`` where an update needs
the global batch's sums (the LCA dictionary update); ``experiment.distributed`` builds the
gradient average and the metrics' sums on the same two pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """Whether a process group is up (only under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_flat(tensors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """One buffer holding ``scale * t`` for every tensor, flattened and concatenated, summed
    over ranks by a single all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if scale != 1.0:
        flat.mul_(scale)
    dist.all_reduce(flat)
    return flat


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` cut back into views shaped like each tensor of ``like``, in order."""
    sizes = [t.numel() for t in like]
    return [part.view_as(t) for part, t in zip(flat.split(sizes), like, strict=True)]


def sum_over_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``sum_r t_r`` of every tensor (same dtype and device), in one all-reduce; the tensors
    themselves without a process group."""
    if not active() or not tensors:
        return list(tensors)
    return unflatten(all_reduce_flat(tensors), tensors)
