"""``--precision fp32|tf32|bf16`` and what a reduced precision costs the EP update.

* ``fp32``: every convolution and matrix product in IEEE float32 (on CUDA this turns off the
  TF32 convolutions torch allows by default).
* ``tf32``: on CUDA, convolutions and matrix products on TF32 tensor cores (10-bit mantissa
  products, float32 storage). The CPU has no TF32: refused there.
* ``bf16``: the phases without an autograd graph (EP's free and nudged phases, evaluation) run
  under ``torch.autocast(bfloat16)`` on bfloat16 states (``compiled.PhaseRunner``); the fixed
  points come back in float32, and the EP estimate, the optimizer, the LCA encode and BPTT's
  backpropagated phase stay in float32.
* not given: torch's own settings, unchanged (float32 on the CPU; on CUDA torch's defaults,
  i.e. TF32 convolutions and float32 matrix products).

Why it matters: the EP estimate ``(dPhi/dtheta(s^beta) - dPhi/dtheta(s^0)) / beta`` is a
difference between two nearby fixed points, so rounding the states can swamp it.
``ep_update_error`` measures this: the relative error
``||g_p - g_fp32|| / ||g_fp32||`` of the EP update ``g`` (all parameters together) computed in
precision ``p`` against the same update in float32, on the same batch and weights.
``check_ep_update`` turns it into a warning above ``WARN_ERROR`` and a refusal above
``REFUSE_ERROR``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from compiled import PhaseRunner
from dynamics import EAGER, Phases
from experiment.entry import UsageError, warn
from learning.estimators import Estimator
from utils_ep_fast import EnergyNet

PRECISIONS = ("fp32", "tf32", "bf16")
# Relative error of the EP update against float32 above which a run is warned / refused.
WARN_ERROR = 0.05
REFUSE_ERROR = 0.25


def check_available(precision: str | None, device: torch.device) -> None:
    """UsageError for a precision the device cannot run."""
    if precision == "tf32" and device.type != "cuda":
        raise UsageError(
            "--precision tf32 needs a CUDA GPU (TF32 is a tensor-core format; the CPU has "
            "none): use --precision fp32 or bf16 on the CPU"
        )


def _tf32_api():
    """(matmul settings, conv settings, attribute): torch >= 2.9's ``fp32_precision`` or the
    older ``allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and conv is not None:
        return torch.backends.cuda.matmul, conv, "fp32_precision"
    return torch.backends.cuda.matmul, torch.backends.cudnn, "allow_tf32"


def _set_tf32(allowed: bool) -> None:
    """TF32 for CUDA convolutions and matrix products on or off."""
    matmul, conv, attribute = _tf32_api()
    value = ("tf32" if allowed else "ieee") if attribute == "fp32_precision" else allowed
    setattr(matmul, attribute, value)
    setattr(conv, attribute, value)


def apply(precision: str | None, device: torch.device) -> torch.dtype | None:
    """Set the backends for ``precision`` on ``device``; return the dtype the phases run in
    (``torch.bfloat16`` for bf16, else None, for ``compiled.install``)."""
    check_available(precision, device)
    if precision is not None and device.type == "cuda":
        _set_tf32(precision == "tf32")
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def running_in(model: EnergyNet, precision: str, device: torch.device):
    """Within the block the CUDA backends are set for ``precision``; yields the ``Phases``
    that run ``model``'s phases eagerly in it. The backends are put back afterwards."""
    matmul, conv, attribute = _tf32_api()
    saved_tf32 = getattr(matmul, attribute), getattr(conv, attribute)
    try:
        dtype = apply(precision, device)
        yield Phases(runner=PhaseRunner(model, False, False, dtype) if dtype else None)
    finally:
        setattr(matmul, attribute, saved_tf32[0])
        setattr(conv, attribute, saved_tf32[1])


@torch.no_grad()
def ep_update(
    model: EnergyNet, x: Tensor, y: Tensor, estimator: Estimator, phases: Phases = EAGER
) -> dict[str, Tensor]:
    """The update ``train_batch`` would apply for ``(x, y)`` with ``estimator`` (with ``beta_2``
    as given, no random sign): its estimate per parameter name, its phases run through
    ``phases``; nothing is applied and the gradients are cleared."""
    code = model.prepare_input(x).code
    fixed_sign = type(estimator)(dataclasses.replace(estimator.cfg, random_sign=False))
    fixed_sign.estimate(model, code, y, phases)
    update = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return update


def relative_error(update: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """``||update - reference|| / ||reference||`` over all parameters together."""
    difference = sum((update[name] - ref).pow(2).sum() for name, ref in reference.items())
    norm = sum(ref.pow(2).sum() for ref in reference.values())
    return (difference / norm.clamp_min(1e-30)).sqrt().item()


def ep_update_error(
    model: EnergyNet, x: Tensor, y: Tensor, estimator: Estimator, precision: str
) -> float:
    """Relative error of ``estimator``'s update in ``precision`` against float32 on
    ``(x, y)``."""
    device = x.device
    with running_in(model, "fp32", device) as phases:
        reference = ep_update(model, x, y, estimator, phases)
    with running_in(model, precision, device) as phases:
        update = ep_update(model, x, y, estimator, phases)
    return relative_error(update, reference)


def check_ep_update(
    model: EnergyNet,
    x: Tensor,
    y: Tensor,
    estimator: Estimator,
    precision: str | None,
    refuse: bool = True,
) -> float | None:
    """For tf32 and bf16 with a rule whose estimate rounding can swamp
    (``Estimator.PRECISION_CHECKED``, e.g. EP): measure ``ep_update_error`` on ``(x, y)`` and
    say it; warn above ``WARN_ERROR`` and, with ``refuse``, raise a UsageError above
    ``REFUSE_ERROR``. None when there is nothing to measure."""
    if precision in (None, "fp32") or not estimator.PRECISION_CHECKED:
        return None
    error = ep_update_error(model, x, y, estimator, precision)
    message = (
        f"--precision {precision}: the {estimator.NAME} update on a probe batch differs from "
        f"float32's by {100 * error:.2f}% (relative error)"
    )
    if refuse and error > REFUSE_ERROR:
        raise UsageError(
            f"{message}, above the {100 * REFUSE_ERROR:.0f}% this tool accepts: the rounding "
            f"swamps the EP estimate; use --precision fp32 (or a larger |beta2|)"
        )
    if error > WARN_ERROR:
        warn(f"{message}, above {100 * WARN_ERROR:.0f}%: the EP estimate is noisier")
    else:
        print(f"notice: {message}")
    return error
