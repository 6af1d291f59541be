"""Recurrent backprop (RBP; Almeida 1987, Pineda 1987): the exact gradient of the loss at the
free fixed point, by implicit differentiation, with no autograd graph through time.

The free phase settles ``s* = F(s*)``, where one synchronous step is the map
``F(s)_k = sigma_k(u_k(s))`` with ``u_k = dPhi/ds_k`` (``g_k`` scaling the feedback a layer
receives; the output rule of the output layer). Its Jacobian at ``s*`` is::

    J = dF/ds = D G H,     D = diag(sigma'(u*)),   G = diag(g_k),   H = d^2 Phi / ds^2

``H`` (symmetric) is the couplings as a linear map: every link's drive ``F_e`` and adjoint
``F_e^T`` without bias, through the max-pool positions of ``s*``. Implicit differentiation of
``s* = F(s*; theta)`` gives::

    lambda = J^T lambda + dL/ds(s*)               (the adjoint, iterated from lambda = dL/ds)
    dL/dtheta = (dF/dtheta)^T lambda + dL/dtheta|_direct

``J^T lambda = H (G D lambda)`` is exactly the vector-Jacobian product of one step at ``s*``:
autograd of a max-pool routes to ``s*``'s argmax, the unpool of an adjoint reads integer
positions (constants), the biases and the input drives are constant in ``s``. So the adjoint
iteration builds the graph of that one step once and reuses it (``iterations``
products), and ``(dF/dtheta)^T lambda`` is the same graph's product with the parameters: each
link's weight gradient paired once with ``(s*_source, (G D lambda)_target)`` and once with
``((G D lambda)_source, s*_target)``, and each bias with ``(G D lambda)_target`` summed. The
direct term is the readout's (``softmax``: ``L`` reads ``W_out s_out + b_out``).

``G D`` as written holds when a layer with ``g != 1`` is fed by the input alone (the LCA copy
layer), as every model the engine builds has; the product of the step is ``J^T`` in any case.
The adjoint converges when ``J``'s spectral radius is below 1, as it is where the free phase
converges to a stable fixed point. Its residual ``max |lambda_n - lambda_(n-1)|`` (the
equation's residual at ``lambda_(n-1)``) is reported.

Vector-field models have ``H`` not symmetric; a step's product is still ``J^T``, but the
study's RBP is for energy-based models, so they are refused (``model_refusal``).
Shapes: ``free`` and ``lambda`` are lists of per-layer states (B, *shape_k); ``L`` is the
batch mean of the per-sample loss (B,), so the gradient is the batch mean's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynamics import EAGER, Phases, sync_step
from learning.estimators import Estimate, Estimator
from links import in_memory_format


class RecurrentBackprop(Estimator):
    """RBP: ``T1`` free steps, then ``adjoint_iters`` adjoint iterations (``T2`` when None)
    and the implicit gradient (module docstring); the adjoint's final residual is reported as
    the batch statistic ``adjoint_residual``. ``after_update`` gets the free states."""

    NAME = "RBP"
    IGNORES = {
        "betas": "RBP has no nudged phase",
        "random_sign": "RBP has no nudged phase",
        "thirdphase": "RBP has no nudged phase",
        "cpl_eta": "only CpL reads eta",
    }

    @classmethod
    def refusal(cls, cfg) -> str | None:
        if cfg.adjoint_iters is not None and cfg.adjoint_iters < 1:
            return f"--adjoint-iters must be at least 1, got {cfg.adjoint_iters}"
        return None

    @classmethod
    def model_refusal(cls, model) -> str | None:
        if getattr(model, "backward_pairs", None) is not None:
            return (
                "RBP needs an energy (a symmetric coupling matrix); a vector-field model has "
                "separate backward weights: use --alg EP or BPTT"
            )
        return None

    def estimate(self, model, code: Tensor, y: Tensor, phases: Phases = EAGER) -> Estimate:
        cfg = self.cfg
        free = phases.run(model, code, y, model.init_neurons(code), cfg.T1, name="free")
        iterations = cfg.T2 if cfg.adjoint_iters is None else cfg.adjoint_iters
        _, residual = rbp_gradient(model, code, y, free, iterations)
        phases.report("adjoint_residual", residual)
        return Estimate(free, free)


def rbp_gradient(
    model, code: Tensor, y: Tensor, free: list[Tensor], iterations: int
) -> tuple[list[Tensor], float]:
    """Write ``dL/dtheta`` at the free fixed point ``free`` into the ``.grad`` of every
    parameter the optimizer trains (``model.optimizer_groups``; zeros where ``L`` does not
    depend on it), from ``iterations`` adjoint steps.

    ``code``: the system's fixed input (B, ...); ``y``: labels (B,). ``L`` is the batch mean
    of ``model.loss`` (an empty batch gives zero gradients). Returns the adjoint ``lambda``
    (one tensor per layer) and its final residual ``max |lambda_n - lambda_(n-1)|`` (0.0 for
    an empty batch or no iteration)."""
    params = [param for _, group in model.optimizer_groups() for param in group]
    code = in_memory_format(code)
    batch = max(code.shape[0], 1)
    with torch.enable_grad():
        states = [in_memory_format(state).detach().requires_grad_(True) for state in free]
        loss = model.loss(states, y).sum() / batch
        loss_grads = torch.autograd.grad(loss, states + params, allow_unused=True)
        stepped = sync_step(model, y, states, 0.0, model.input_drives(code))
        loss_ds = [_or_zeros(grad, state) for grad, state in zip(loss_grads, states, strict=False)]
        adjoint = [grad.clone() for grad in loss_ds]
        residual = 0.0
        for _ in range(iterations):
            # a layer no other layer reads (a one-layer system) has no product
            products = torch.autograd.grad(
                stepped, states, adjoint, retain_graph=True, allow_unused=True
            )
            following = [
                grad if product is None else product + grad
                for product, grad in zip(products, loss_ds, strict=True)
            ]
            residual = max(
                (new - old).abs().max().item() if new.numel() else 0.0
                for new, old in zip(following, adjoint, strict=True)
            )
            adjoint = following
        param_grads = torch.autograd.grad(stepped, params, adjoint, allow_unused=True)
    direct = loss_grads[len(states) :]
    for param, through_states, directly in zip(params, param_grads, direct, strict=True):
        total = _or_zeros(through_states, param)
        if directly is not None:
            total = total + directly
        param.grad = total.detach()
    return [grad.detach() for grad in adjoint], residual


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad
