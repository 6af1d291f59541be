"""A saved network as a classifier of pixels: the model wrapper every robustness measurement uses.

``PixelClassifier`` maps images ``p`` (B, C, H, W) with pixels in [0, 1] to the logits of the
free state after T1 steps (the task's normalisation and, for an LCACNN, the LCA encode first),
and gives the input gradients the attacks follow: backpropagation through the dynamics
(``bptt``), its straight-through variant (``bpda``) and the EP estimate (``ep``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from experiment import data_loading
from learning import estimators
from robust_eval import attacks
from utils_ep_fast import EAGER, EnergyNet, Phases, settle


class PixelClassifier(nn.Module):
    """A saved network as a classifier of images ``p`` (B, C, H, W) with pixels in [0, 1].

    ``x = (p - mean) / std`` (the task's test normalisation), the LCA code of ``x`` for an
    LCACNN, T1 free steps from zero; the logits (B, classes) are ``output_logits`` of that
    state. ``input_gradient`` gives ``dL/dp`` of the model's own per-sample loss ``L``.
    """

    def __init__(
        self,
        model: EnergyNet,
        task: str,
        T1: int,
        T2: int,
        beta: float,
        chunk: int,
        phases: Phases = EAGER,
    ) -> None:
        super().__init__()
        self.model = model
        self.T1, self.T2, self.beta, self.chunk = T1, T2, beta, chunk
        self.phases = phases  # the engine's loop (no compiled runner), with its safe point
        mean, std = data_loading.input_normalization(task)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalise(self, pixels: Tensor) -> Tensor:
        """``(p - mean) / std``, what the model was trained on."""
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """Logits (B, classes) of the free state after T1 steps; no graph."""
        labels = torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        free = settle(self.model, self.normalise(pixels), labels, self.T1, self.phases)[1]
        return self.model.output_logits(free)

    @torch.no_grad()
    def losses(self, pixels: Tensor, labels: Tensor) -> Tensor:
        """The model's per-sample loss (B,) at the free state after T1 steps."""
        free = settle(self.model, self.normalise(pixels), labels, self.T1, self.phases)[1]
        return self.model.loss(free, labels)

    def code_with_graph(self, pixels: Tensor) -> Tensor:
        """The system's fixed input for ``pixels``, with an autograd graph back to them: the
        normalised images, or for an LCACNN their LCA code (the LCA loop run with a graph)."""
        return self.model.code_with_graph(self.normalise(pixels))

    def logits_with_graph(self, pixels: Tensor) -> Tensor:
        """The logits (B, classes) with an autograd graph back to ``pixels`` through the
        encode and all T1 steps."""
        code = self.code_with_graph(pixels)
        labels = torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        start = self.model.init_neurons(code)
        final = self.phases.run(self.model, code, labels, start, self.T1, track_grad=True)
        return self.model.output_logits(final)

    def ep_gradient(self, pixels: Tensor, cost: attacks.LogitCost) -> Tensor:
        """The EP estimate of ``dA/dp`` (B, C, H, W) of the cost ``A`` on the logits: the
        nudged phases follow ``A`` itself (``attacks.output_nudge``), ``chunk`` images at a
        time, carried back to the pixels through the encode."""
        parts = []
        criterion = self.model.criterion
        for start in range(0, pixels.shape[0], self.chunk):
            rows = cost.rows(start, start + self.chunk)

            def nudge(state: Tensor, rows=rows) -> Tensor:
                return attacks.output_nudge(rows, state, criterion)

            chunk = pixels[start : start + self.chunk]
            parts.append(self._ep_through_encode(chunk, rows.labels, nudge))
        return torch.cat(parts)

    def cost_gradient(self, kind: str) -> attacks.InputGradient:
        """``(p, cost) -> dA/dp`` by ``bptt`` (backpropagation through the dynamics), ``bpda``
        (the same with every clamp and LCA threshold straight-through) or ``ep``."""
        if kind == "ep":
            return self.ep_gradient
        backprop = attacks.backprop_gradient(self.logits_with_graph, self.chunk)
        if kind == "bptt":
            return backprop

        def straight_through(pixels: Tensor, cost: attacks.LogitCost) -> Tensor:
            with attacks.straight_through_activations(self.model):
                return backprop(pixels, cost)

        return straight_through

    def input_gradient(self, pixels: Tensor, labels: Tensor, kind: str) -> Tensor:
        """``dL/dp`` (B, C, H, W) of the model's own loss by ``bptt``, ``bpda`` or ``ep``,
        computed ``chunk`` images at a time."""
        if kind == "bpda":
            with attacks.straight_through_activations(self.model):
                return self.input_gradient(pixels, labels, "bptt")
        method = self._bptt_gradient if kind == "bptt" else self._ep_gradient
        parts = [
            method(pixels[start : start + self.chunk], labels[start : start + self.chunk])
            for start in range(0, pixels.shape[0], self.chunk)
        ]
        return torch.cat(parts)

    def _bptt_gradient(self, pixels: Tensor, labels: Tensor) -> Tensor:
        """Backpropagation through the whole dynamics: the encode and all T1 steps."""
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            code = self.code_with_graph(pixels)
            start = self.model.init_neurons(code)
            final = self.phases.run(self.model, code, labels, start, self.T1, track_grad=True)
            loss = self.model.loss(final, labels).sum()
            return torch.autograd.grad(loss, pixels)[0]

    def _ep_gradient(self, pixels: Tensor, labels: Tensor) -> Tensor:
        """The EP estimate of ``dL/dcode`` of the model's loss at the free fixed point."""
        return self._ep_through_encode(pixels, labels, None)

    def _ep_through_encode(self, pixels: Tensor, labels: Tensor, nudge) -> Tensor:
        """The EP estimate of the gradient w.r.t. the code at the free fixed point (of the
        loss, or of the cost whose ``nudge`` is given), carried back to the pixels through
        the (cheap) encode: the normalisation, and the LCA loop for an LCACNN."""
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            code = self.code_with_graph(pixels)
        fixed = code.detach()
        free = self.phases.run(self.model, fixed, labels, self.model.init_neurons(fixed), self.T1)
        code_gradient = estimators.input_gradient(
            self.model, fixed, labels, free, self.T2, self.beta, nudge, self.phases
        )
        return torch.autograd.grad(code, pixels, code_gradient.reshape(code.shape))[0]

    @torch.no_grad()
    def accuracy(self, pixels: Tensor, labels: Tensor, batch_size: int) -> float:
        """Fraction of ``pixels`` classified as ``labels``, ``batch_size`` images at a time."""
        correct = 0
        for start in range(0, pixels.shape[0], batch_size):
            logits = self(pixels[start : start + batch_size])
            correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
        return correct / pixels.shape[0]
