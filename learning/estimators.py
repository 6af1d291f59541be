"""The learning rules: one object per rule, which runs a batch's phases and writes the
parameter gradient; the EP estimate of the input gradient; the GDU check of EP against BPTT.

An ``Estimator`` owns a batch's phase sequence: ``estimate(model, code, y, phases)`` runs the
phases on the fixed input ``code`` through ``phases`` (a ``dynamics.Phases``: the compiled
runner, the safe point, and the log the phase records go to) and leaves its estimate of
``dL/dtheta`` in every ``.grad``; the optimizer step is the caller's. It reads the loss through
``model.criterion`` (a ``losses.Loss``). Training (``utils_ep_fast.train_batch``), the
precision check (``precision.ep_update``) and the GDU check (``gdu_check``) all call it.

* ``EP``: the free phase, the nudged phase (one-sided, with a random sign, or +-beta with
  ``thirdphase``) and the estimate (symmetric, one-sided, or the vector-field links' estimate
  crossed with the free state).
* ``BPTT``: ``T1 - T2`` free steps without a graph, ``T2`` with one, and the gradient of the
  final loss by backpropagation.

``learning.registry.ESTIMATORS`` maps ``--alg`` to its class. Adding a rule is a class (in a file
of its own) and its entry in ``learning/registry.py`` (docs/extending.md). A rule declares the
flags of ``EPConfig`` it does not read (``IGNORES``) and refuses values it cannot train with
(``refusal``); the scripts check both (``experiment/config.py``), one rule for all: an ignored
flag that is set gets a warning line and is left as it is, a refusal stops the run before
anything is written (exit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from dynamics import EAGER, Phases
from links import in_memory_format


@dataclass(frozen=True)
class EPConfig:
    """How a batch is trained: the rule (``alg``, a ``learning.registry.ESTIMATORS`` name), ``T1``
    free and ``T2`` nudged (BPTT: backpropagated; CL, CpL: clamped) steps, the ``betas``
    (beta1, beta2) and the nudging options ``random_sign`` and ``thirdphase``; ``cpl_eta``,
    how far CpL's clamp moves toward the target, and ``adjoint_iters``, RBP's adjoint
    iterations (None: ``T2``). The defaults are the command line's."""

    alg: str = "EP"
    T1: int = 20
    T2: int = 4
    betas: tuple[float, float] = (0.0, 0.01)
    random_sign: bool = False
    thirdphase: bool = False
    cpl_eta: float = 1.0
    adjoint_iters: int | None = None


class Estimate(NamedTuple):
    """What a batch's estimate leaves besides the gradients.

    free: the states the batch is scored on (accuracy and loss): the free fixed point (BPTT:
        its final states);
    learned: the states that carried the learning signal, for ``EnergyNet.after_update``
        (EP: the nudged fixed point; BPTT: its final states).
    """

    free: list[Tensor]
    learned: list[Tensor]


class Estimator:
    """A learning rule (module docstring). Subclasses set ``NAME`` (the ``--alg`` value),
    ``IGNORES`` and implement ``estimate``."""

    NAME: ClassVar[str] = ""
    # EPConfig fields this rule does not read -> why (the warning the scripts print when set)
    IGNORES: ClassVar[dict[str, str]] = {}
    # the estimate is a difference of nearby fixed points, which rounding can swamp: --precision
    # tf32/bf16 measures it against float32 first (``precision.check_ep_update``)
    PRECISION_CHECKED: ClassVar[bool] = False

    def __init__(self, cfg: EPConfig) -> None:
        self.cfg = cfg

    @classmethod
    def refusal(cls, cfg: EPConfig) -> str | None:
        """Why this rule cannot train with ``cfg`` (one line naming the fix), or None."""
        return None

    @classmethod
    def model_refusal(cls, model) -> str | None:
        """Why this rule cannot train ``model`` (its loss, its kind; one line naming the fix),
        or None; the scripts ask before anything is written."""
        return None

    def estimate(self, model, code: Tensor, y: Tensor, phases: Phases = EAGER) -> Estimate:
        """Run the batch's phases on ``code`` (the system's fixed input, B x ...) with labels
        ``y`` (B,) through ``phases``, naming each phase (``"free"``, ``"nudged"``, ...) for
        its log; leave the estimate of ``dL/dtheta`` in every ``.grad`` it trains (the caller
        zeroed them). A per-batch statistic of the rule goes to ``phases.report``."""
        raise NotImplementedError


class EP(Estimator):
    """Equilibrium propagation (Scellier & Bengio 2017; symmetric: Laborieux et al. 2021).

    Free phase: ``T1`` steps from zero at beta_1, giving ``s^0``. Nudged phase: ``T2`` steps
    from ``s^0`` at beta_2 (its sign drawn per batch with ``random_sign``), and with
    ``thirdphase`` a second one at -beta_2. Estimate (``EnergyNet.compute_syn_grads``):
    symmetric from ``s^{-beta_2}`` and ``s^{beta_2}`` with ``thirdphase``, else one-sided from
    ``s^0`` and ``s^{beta_2}``; the vector-field links cross both with ``s^0``.
    """

    NAME = "EP"
    PRECISION_CHECKED = True
    IGNORES = {
        "cpl_eta": "only CpL reads eta",
        "adjoint_iters": "only RBP runs an adjoint",
    }

    @classmethod
    def refusal(cls, cfg: EPConfig) -> str | None:
        beta_1, beta_2 = cfg.betas
        if beta_2 == 0 or beta_1 == beta_2:
            return (
                f"EP needs a nudging beta2 that is non-zero and differs from beta1, got --betas "
                f"{beta_1} {beta_2} (e.g. --betas 0.0 0.5)"
            )
        return None

    def estimate(self, model, code: Tensor, y: Tensor, phases: Phases = EAGER) -> Estimate:
        return self.run(model, code, y, phases)

    def run(
        self,
        model,
        code: Tensor,
        y: Tensor,
        phases: Phases = EAGER,
        on_step: Callable[[], None] | None = None,
    ) -> Estimate:
        """``estimate``; with ``on_step`` the nudged phases advance one step at a time, side by
        side, and the estimate is written and ``on_step`` called after each step (the GDU
        check's per-step updates)."""
        cfg = self.cfg
        beta_1, beta_2 = cfg.betas
        start = model.init_neurons(code)
        free = phases.run(model, code, y, start, cfg.T1, beta_1, name="free")
        if cfg.random_sign:
            beta_2 = beta_2 * (1.0 if torch.rand(()) < 0.5 else -1.0)
        betas = (-beta_2, beta_2) if cfg.thirdphase else (beta_1, beta_2)
        nudged = first = free
        for steps in [cfg.T2] if on_step is None else [1] * cfg.T2:
            nudged = phases.run(model, code, y, nudged, steps, beta_2, name="nudged")
            if cfg.thirdphase:
                first = phases.run(model, code, y, first, steps, -beta_2, name="nudged")
            model.compute_syn_grads(code, y, first, nudged, betas, free)
            if on_step is not None:
                on_step()
        return Estimate(free, nudged)


class BPTT(Estimator):
    """Backpropagation through time: ``T1 - T2`` free steps from zero without a graph, then
    ``T2`` with one; ``.grad`` is the gradient of the batch's mean final loss."""

    NAME = "BPTT"
    IGNORES = {
        "thirdphase": "BPTT has no nudged phase",
        "random_sign": "BPTT has no nudged phase",
        "cpl_eta": "only CpL reads eta",
        "adjoint_iters": "only RBP runs an adjoint",
    }

    @classmethod
    def refusal(cls, cfg: EPConfig) -> str | None:
        if cfg.T2 > cfg.T1:
            return f"BPTT backpropagates the last T2 of T1 steps: T2 ({cfg.T2}) > T1"
        return None

    def estimate(self, model, code: Tensor, y: Tensor, phases: Phases = EAGER) -> Estimate:
        cfg = self.cfg
        start = model.init_neurons(code)
        free = phases.run(model, code, y, start, cfg.T1 - cfg.T2, name="free")
        final = phases.run(model, code, y, free, cfg.T2, track_grad=True)
        model.loss(final, y).mean().backward()
        final = [state.detach() for state in final]
        return Estimate(final, final)


@torch.no_grad()
def input_gradient(
    model,
    x: Tensor,
    y: Tensor,
    free: list[Tensor],
    T2: int,
    beta: float,
    nudge: Callable[[Tensor], Tensor] | None = None,
    phases: Phases = EAGER,
) -> Tensor:
    """EP estimate of ``dL/dx`` per sample, (B, *x.shape[1:]), with no graph.

    The fixed input enters ``Phi`` only through the edges leaving it, ``<F_e(x), s_target>``,
    so ``dPhi/dx = sum_{e out of x} F_e^T(s_target)`` (each link's adjoint, with the max-pool
    positions of its ``F_e(x)``). Treating ``x`` like a parameter, EP gives
    ``dL/dx = -d/dbeta dPhi/dx (s^beta)`` at ``beta = 0``, estimated symmetrically from two
    nudged phases of ``T2`` steps from the free states ``free``; the adjoints are linear in the
    target state, so::

        dL/dx ~ -sum_{e out of x} F_e^T(s_target^{+beta} - s_target^{-beta}) / (2 beta)

    ``L`` is the per-sample loss of ``model.criterion``. For the LCA front end ``x`` is the LCA
    code. With ``nudge`` (``s_out -> -dA/ds_out``, shaped like ``s_out``: ``Loss.cost_nudge``
    of an attack's cost ``A``) the phases are nudged by ``beta nudge(s_out)`` instead, and the
    estimate is ``dA/dx``; the phases run through ``phases`` (a runner declines them).
    """
    output_update = None
    if nudge is not None:

        def output_update(drive: Tensor, state: Tensor, y: Tensor, beta: float) -> Tensor:
            return model.activate_output(drive + beta * nudge(state))

    plus = phases.run(model, x, y, free, T2, beta, output_update=output_update)
    minus = phases.run(model, x, y, free, T2, -beta, output_update=output_update)
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


def gdu_check(
    model, x: Tensor, y: Tensor, cfg: EPConfig, phases: Phases = EAGER
) -> dict[str, dict[str, Tensor | float]]:
    """EP's per-step updates in the nudged phase vs BPTT's per-step gradients, on one batch.

    After T1 free steps (``s^0``), step ``t = 1..T2`` of the nudged phase gives the EP estimate
    ``-(dPhi/dtheta(s^beta_t) - dPhi/dtheta(s^0)) / beta`` (symmetric with ``thirdphase``), and
    BPTT truncated to the last ``t`` steps of a free trajectory from ``s^0`` gives the gradient
    of the final loss. By the GDU theorem the two curves agree when the free phase converged.
    The phases without a graph run through ``phases``.

    Returns per parameter name: ``ep`` and ``bptt`` (T2, *param_shape), ``rel_rmse``
    ``||EP - BPTT|| / max(||EP||, ||BPTT||)`` over all steps, and ``sign_error`` (fraction of
    entries whose signs disagree at the last step).
    """
    code = model.prepare_input(x).code
    one_sided = dataclasses.replace(cfg, alg="EP", betas=(0.0, cfg.betas[1]), random_sign=False)
    ep_steps: list[dict[str, Tensor]] = []

    def snapshot() -> None:
        ep_steps.append(_snapshot_grads(model))

    free = EP(one_sided).run(model, code, y, phases, on_step=snapshot).free
    bptt_steps: list[dict[str, Tensor]] = []
    for t in range(1, cfg.T2 + 1):
        model.zero_grad(set_to_none=True)
        final = phases.run(model, code, y, free, t, track_grad=True)
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


__all__ = [
    "BPTT",
    "EP",
    "EPConfig",
    "Estimate",
    "Estimator",
    "gdu_check",
    "input_gradient",
]
