"""Contrastive learning (CL) and coupled learning (CpL; Stern, Hexner, Rocks and Liu, PRX 2021):
learning rules that clamp the output units instead of nudging them.

Both start from the free state ``s^0`` (``T1`` steps from zero). The clamped phase then runs
``T2`` steps of the model's dynamics from ``s^0`` with the output layer held at a target ``c``
(B, K) at every step (its update returns ``c``, whatever its drive), so the other layers settle
to the fixed point of the network with ``s_out = c``::

    CL:   c = onehot(y)
    CpL:  c = s_out^0 + eta (onehot(y) - s_out^0),      eta in (0, 1]

and the estimate, written into every ``.grad`` by each link as for EP
(``EnergyNet.compute_syn_grads`` with ``betas = (0, eta)``), is::

    grad(theta) = -(dPhi/dtheta(s^c) - dPhi/dtheta(s^0)) / eta       (batch mean; CL: eta = 1)

For CL it is the gradient of ``E(s^c) - E(s^0) >= 0`` (the clamped state's energy above the
free one's); CpL at ``eta = 1`` is CL. The target is the output units' own values, so the
output units must be a layer of the system: with the softmax readout the rule is refused
(``model_refusal``), as it is for vector-field models (no ``Phi`` to differentiate). Under
``--tol`` the clamped phase stops when it settles, like any other; ``after_update`` (the LCA
dictionary) gets the clamped states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dynamics import EAGER, Phases
from learning.estimators import Estimate, Estimator


class ContrastiveLearning(Estimator):
    """CL: clamp the output units at ``onehot(y)`` (module docstring)."""

    NAME = "CL"
    IGNORES = {
        "betas": "CL clamps the output units instead of nudging them",
        "random_sign": "CL has no nudged phase",
        "thirdphase": "CL has no nudged phase",
        "cpl_eta": "only CpL reads eta",
        "adjoint_iters": "only RBP runs an adjoint",
    }

    def coupling(self) -> float:
        """``eta``: how far the target moves from ``s_out^0`` toward ``onehot(y)``."""
        return 1.0

    @classmethod
    def model_refusal(cls, model) -> str | None:
        return clamp_refusal(cls.NAME, model)

    @torch.no_grad()
    def estimate(self, model, code: Tensor, y: Tensor, phases: Phases = EAGER) -> Estimate:
        eta = self.coupling()
        free = phases.run(model, code, y, model.init_neurons(code), self.cfg.T1, name="free")
        clamped = clamped_phase(model, code, y, free, self.cfg.T2, eta, phases)
        model.compute_syn_grads(code, y, free, clamped, (0.0, eta))
        return Estimate(free, clamped)


class CoupledLearning(ContrastiveLearning):
    """CpL: clamp the output units at ``s_out^0 + eta (onehot(y) - s_out^0)`` and divide the
    estimate by ``eta`` (``cpl_eta``, in (0, 1])."""

    NAME = "CpL"
    IGNORES = {
        "betas": "CpL clamps the output units instead of nudging them (its eta: --cpl-eta)",
        "random_sign": "CpL has no nudged phase",
        "thirdphase": "CpL has no nudged phase",
        "adjoint_iters": "only RBP runs an adjoint",
    }

    @classmethod
    def refusal(cls, cfg) -> str | None:
        if not 0.0 < cfg.cpl_eta <= 1.0:
            return f"CpL's --cpl-eta must lie in (0, 1], got {cfg.cpl_eta}"
        return None

    def coupling(self) -> float:
        return self.cfg.cpl_eta


def clamp_refusal(name: str, model) -> str | None:
    """Why a clamping rule cannot train ``model`` (one line), or None."""
    if model.softmax:
        return (
            f"{name} clamps the output units to the target, which the softmax readout reads "
            f"through its own weights: drop --softmax (use --loss mse or cel)"
        )
    if getattr(model, "backward_pairs", None) is not None:
        return f"{name} needs an energy; a vector-field model has none: use --alg EP or BPTT"
    return None


def clamp_target(output: Tensor, y: Tensor, eta: float) -> Tensor:
    """``s_out^0 + eta (onehot(y) - s_out^0)`` (B, K) from the free output ``output`` (B, K);
    exactly ``onehot(y)`` at ``eta = 1``."""
    onehot = F.one_hot(y, output.shape[1]).to(output.dtype)
    return onehot if eta == 1.0 else output + eta * (onehot - output)


def clamped_phase(
    model, code: Tensor, y: Tensor, free: list[Tensor], T: int, eta: float, phases: Phases = EAGER
) -> list[Tensor]:
    """``T`` steps from ``free`` with the output layer held at ``clamp_target`` (set at the
    start and returned by its every update); the phase is logged as ``"clamped"``."""
    out = model.output_index
    target = clamp_target(free[out], y, eta)
    start = list(free)
    start[out] = target

    def held(drive: Tensor, state: Tensor, y: Tensor, beta: float) -> Tensor:
        return target

    return phases.run(model, code, y, start, T, name="clamped", output_update=held)


__all__ = ["ContrastiveLearning", "CoupledLearning", "clamp_target", "clamped_phase"]
