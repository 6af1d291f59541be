"""The EP estimators: a batch's phase sequence and the parameter estimate it leaves, the
estimate of the input gradient, and the GDU check of the estimate against BPTT.

``ep_phases`` is the one routine that runs a batch's phases: the free phase, the nudged phase
(one-sided, with a random sign, or +-beta with ``thirdphase``) and the estimate (symmetric,
one-sided, or the vector-field links' estimate crossed with the free state). Training
(``utils_ep_fast.train_batch``), the precision check (``precision.ep_update``) and the GDU check
(``gdu_check``, through its per-step hook) all call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dynamics import PhaseRecord
from links import in_memory_format


@dataclass
class EPConfig:
    """How a batch is trained: the algorithm, phase lengths and nudging."""

    alg: str = "EP"  # "EP" or "BPTT"
    T1: int = 20
    T2: int = 4
    betas: tuple[float, float] = (0.0, 0.1)
    random_sign: bool = False
    thirdphase: bool = False


def ep_phases(
    model,
    code: Tensor,
    y: Tensor,
    cfg: EPConfig,
    phases: list[tuple[str, PhaseRecord]] | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """A batch's EP phases on the fixed input ``code``; the estimate is left in every ``.grad``.

    Free phase: T1 steps from zero at beta_1, giving ``s^0``. Nudged phase: T2 steps from
    ``s^0`` at beta_2 (its sign drawn per batch with ``random_sign``), and with ``thirdphase``
    a second one at -beta_2. Estimate (``compute_syn_grads``): symmetric from ``s^{-beta_2}``
    and ``s^{beta_2}`` with ``thirdphase``, else one-sided from ``s^0`` and ``s^{beta_2}``; the
    vector-field links cross both with ``s^0``. With ``on_step`` the nudged phases advance one
    step at a time, side by side, and the estimate is written and ``on_step`` called after
    each step. ``phases``, when given, receives ``("free" | "nudged", model.last_phase)`` per
    phase run. Returns ``s^0`` and ``s^{beta_2}``.
    """

    def record(name: str) -> None:
        if phases is not None:
            phases.append((name, model.last_phase))

    beta_1, beta_2 = cfg.betas
    free = model(code, y, model.init_neurons(code), cfg.T1, beta=beta_1)
    record("free")
    if cfg.random_sign:
        beta_2 = beta_2 * (1.0 if torch.rand(()) < 0.5 else -1.0)
    betas = (-beta_2, beta_2) if cfg.thirdphase else (beta_1, beta_2)
    nudged = first = free
    for steps in [cfg.T2] if on_step is None else [1] * cfg.T2:
        nudged = model(code, y, nudged, steps, beta=beta_2)
        record("nudged")
        if cfg.thirdphase:
            first = model(code, y, first, steps, beta=-beta_2)
            record("nudged")
        model.compute_syn_grads(code, y, first, nudged, betas, free)
        if on_step is not None:
            on_step()
    return free, nudged


@torch.no_grad()
def input_gradient(
    model, x: Tensor, y: Tensor, free: list[Tensor], T2: int, beta: float, nudge=None
) -> Tensor:
    """EP estimate of ``dL/dx`` per sample, (B, *x.shape[1:]), with no graph.

    The fixed input enters ``Phi`` only through the edges leaving it, ``<F_e(x), s_target>``,
    so ``dPhi/dx = sum_{e out of x} F_e^T(s_target)`` (each link's adjoint, with the max-pool
    positions of its ``F_e(x)``). Treating ``x`` like a parameter, EP gives
    ``dL/dx = -d/dbeta dPhi/dx (s^beta)`` at ``beta = 0``, estimated symmetrically from two
    nudged phases of ``T2`` steps from the free states ``free``; the adjoints are linear in the
    target state, so::

        dL/dx ~ -sum_{e out of x} F_e^T(s_target^{+beta} - s_target^{-beta}) / (2 beta)

    ``L`` is the per-sample loss of ``loss``. For the LCA front end ``x`` is the LCA code.
    With ``nudge`` (``s_L -> -dA/ds_L``, shaped like ``s_L``) the phases are nudged by
    ``beta nudge(s_L)`` instead, and the estimate is ``dA/dx`` of that cost ``A`` (an attack's);
    a compiled phase runner, which knows only the loss's nudge, is set aside for them.
    """
    runner = model.phase_runner
    if nudge is not None:
        model.output_nudge, model.phase_runner = nudge, None
    try:
        plus = model(x, y, free, T2, beta=beta)
        minus = model(x, y, free, T2, beta=-beta)
    finally:
        model.output_nudge, model.phase_runner = None, runner
    x = in_memory_format(x)
    graph = model.graph
    total = None
    for e in graph.input_edges:
        link, target = model.links[e], graph.edges[e].target
        _, cache = link.drive(x)
        term = link.adjoint(plus[target] - minus[target], cache, x.shape)
        total = term if total is None else total + term
    return total / (-2.0 * beta)


def _snapshot_grads(model) -> dict[str, Tensor]:
    """Every parameter's gradient (zeros where a truncated graph did not reach it)."""
    return {
        name: torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        for name, param in model.named_parameters()
    }


def gdu_check(model, x: Tensor, y: Tensor, cfg: EPConfig) -> dict[str, dict[str, Tensor | float]]:
    """EP's per-step updates in the nudged phase vs BPTT's per-step gradients, on one batch.

    After T1 free steps (``s^0``), step ``t = 1..T2`` of the nudged phase gives the EP estimate
    ``-(dPhi/dtheta(s^beta_t) - dPhi/dtheta(s^0)) / beta`` (symmetric with ``thirdphase``), and
    BPTT truncated to the last ``t`` steps of a free trajectory from ``s^0`` gives the gradient
    of the final loss. By the GDU theorem the two curves agree when the free phase converged.

    Returns per parameter name: ``ep`` and ``bptt`` (T2, *param_shape), ``rel_rmse``
    ``||EP - BPTT|| / max(||EP||, ||BPTT||)`` over all steps, and ``sign_error`` (fraction of
    entries whose signs disagree at the last step).
    """
    code = model.prepare_input(x).code
    one_sided = dataclasses.replace(cfg, betas=(0.0, cfg.betas[1]), random_sign=False)
    ep_steps: list[dict[str, Tensor]] = []

    def snapshot() -> None:
        ep_steps.append(_snapshot_grads(model))

    free, _ = ep_phases(model, code, y, one_sided, on_step=snapshot)
    bptt_steps: list[dict[str, Tensor]] = []
    for t in range(1, cfg.T2 + 1):
        model.zero_grad(set_to_none=True)
        final = model(code, y, free, t, track_grad=True)
        model.loss(final, y).mean().backward()
        bptt_steps.append(_snapshot_grads(model))
    model.zero_grad(set_to_none=True)
    report = {}
    for name in ep_steps[0]:
        ep = torch.stack([step[name] for step in ep_steps])
        bptt = torch.stack([step[name] for step in bptt_steps])
        scale = max(ep.norm().item(), bptt.norm().item(), 1e-30)
        sign_error = (ep[-1].sign() != bptt[-1].sign()).float().mean().item()
        report[name] = {
            "ep": ep,
            "bptt": bptt,
            "rel_rmse": (ep - bptt).norm().item() / scale,
            "sign_error": sign_error,
        }
    return report


__all__ = ["EPConfig", "ep_phases", "gdu_check", "input_gradient"]
