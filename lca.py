"""Convolutional sparse coding with the Locally Competitive Algorithm (LCA).

LCA finds a sparse code ``a`` for an input ``s`` and a dictionary ``D`` of unit-norm features by
minimising

    E(a) = 0.5 * ||s - D * a||^2 + lambda * ||a||_1

with a population of leaky integrator neurons (membrane potentials ``u``, activations
``a = T_lambda(u)``):

    u <- u + (b - u - G a) / tau,    b = D^T s,    G a = (D^T D - I) a.

``LCAConv2D`` is a drop-in equivalent of ``lcapt.lca.LCAConv2D`` from lca-pytorch: same
argument names and defaults, same returned variables and the same numbers (up to float
rounding). Shapes throughout: inputs ``(N, C, H, W)``, dictionary ``(F, C, kh, kw)``, codes
``(N, F, H_out, W_out)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

RETURN_VAR_NAMES = (
    "inputs",
    "input_drives",
    "states",
    "acts",
    "recons",
    "recon_errors",
    "conns",
)
TRANSFER_NAMES = ("soft_threshold", "hard_threshold")


# ----------------------------------------------------------------------------------------------
# Input preprocessing and metrics
# ----------------------------------------------------------------------------------------------


def make_zero_mean(batch: Tensor) -> Tensor:
    """Subtract from each sample its own mean over all non-batch dims: ``x_n - mean(x_n)``."""
    dims = tuple(range(1, batch.dim()))
    return batch - batch.mean(dim=dims, keepdim=True)


def make_unit_var(batch: Tensor, eps: float = 1e-12) -> Tensor:
    """Divide each sample by its own standard deviation: ``x_n / (std(x_n) + eps)``.

    ``std`` is the unbiased estimate (divides by n - 1) over all non-batch dims.
    """
    dims = tuple(range(1, batch.dim()))
    return batch / (batch.std(dim=dims, keepdim=True) + eps)


def compute_l1_sparsity(acts: Tensor, lambda_: float) -> Tensor:
    """Batch mean of the sparsity cost ``lambda * ||a_n||_1``; ``acts`` (N, ...) -> scalar."""
    dims = tuple(range(1, acts.dim()))
    return lambda_ * acts.abs().sum(dim=dims).mean()


def compute_l2_error(inputs: Tensor, recons: Tensor) -> Tensor:
    """Batch mean of the reconstruction cost ``0.5 * ||s_n - recon_n||^2`` -> scalar."""
    dims = tuple(range(1, inputs.dim()))
    return 0.5 * (inputs - recons).pow(2).sum(dim=dims).mean()


def compute_frac_active(acts: Tensor) -> float:
    """Fraction of all code entries that are non-zero."""
    return (acts != 0).float().mean().item()


def compute_times_active_by_feature(acts: Tensor) -> Tensor:
    """Number of non-zero entries of each feature over batch and positions.

    ``acts`` (N, F, ...) -> (F, 1, ..., 1), broadcastable against the dictionary.
    """
    dims = [d for d in range(acts.dim()) if d != 1]
    counts = (acts != 0).float().sum(dim=dims)
    return counts.reshape((acts.shape[1],) + (1,) * len(dims))


# ----------------------------------------------------------------------------------------------
# Transfer functions
# ----------------------------------------------------------------------------------------------


def soft_threshold(x: Tensor, threshold: float, nonneg: bool = True) -> Tensor:
    """``relu(x - l)`` if ``nonneg`` else ``relu(x - l) - relu(-x - l)``."""
    if nonneg:
        return F.relu(x - threshold)
    return F.relu(x - threshold) - F.relu(-x - threshold)


def hard_threshold(x: Tensor, threshold: float, nonneg: bool = True) -> Tensor:
    """``x * [x > l]`` if ``nonneg`` else ``x * [|x| > l]``."""
    if nonneg:
        return F.threshold(x, threshold, 0.0)
    return F.threshold(x, threshold, 0.0) - F.threshold(-x, threshold, 0.0)


# ----------------------------------------------------------------------------------------------
# The LCA layer
# ----------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")


InitFunc = Callable[..., Tensor | None]
WeightInit = InitFunc | tuple[InitFunc, dict[str, Any]]


def _split_weight_init(
    weight_init: WeightInit, extra_kwargs: dict[str, Any] | None
) -> tuple[InitFunc, dict[str, Any]]:
    """``(init, kwargs)`` from a callable or lca-pytorch's ``(init, kwargs)`` pair."""
    if extra_kwargs is not None and not isinstance(extra_kwargs, dict):
        raise RuntimeError(f"weight_init_kwargs must be a dict, got {extra_kwargs!r}.")
    if callable(weight_init):
        init, kwargs = weight_init, {}
    elif (
        isinstance(weight_init, tuple | list)
        and len(weight_init) == 2
        and callable(weight_init[0])
        and isinstance(weight_init[1], dict)
    ):
        init, kwargs = weight_init
    else:
        raise RuntimeError(
            f"weight_init must be a callable such as torch.nn.init.normal_ or a pair "
            f"(callable, kwargs dict), got {weight_init!r}."
        )
    return init, {**kwargs, **(extra_kwargs or {})}


StepHook = Callable[[Tensor, Tensor], None]
# one LCA iteration as a function of the states: u -> (u after the update, a = T(u) before it)
Step = Callable[[Tensor], tuple[Tensor, Tensor]]


class Scratch(NamedTuple):
    """What the in-place iteration writes besides the states: the acts ``a`` and the target
    ``b - G a`` (N, F, H_out, W_out), and the patches of ``D a`` (N, C*kh*kw, H_out*W_out)."""

    acts: Tensor
    target: Tensor
    patches: Tensor


def _check_code_shaped(tensor: Tensor, drive: Tensor, name: str) -> None:
    """RuntimeError unless ``tensor`` is a tensor shaped like the code (N, F, H_out, W_out)."""
    if not isinstance(tensor, Tensor):
        raise RuntimeError(
            f"{name} must be a tensor of shape {tuple(drive.shape)}, got a {type(tensor).__name__}."
        )
    if tensor.shape != drive.shape:
        raise RuntimeError(
            f"Expected {name} of shape {tuple(drive.shape)} (N, F, H_out, W_out: the code's "
            f"shape for these inputs), got {tuple(tensor.shape)}."
        )


class _Trajectory:
    """Copies of the states and acts of every LCA iteration (only those asked for)."""

    def __init__(self, return_vars: Sequence[str]) -> None:
        self.keep_states = "states" in return_vars
        self.keep_acts = bool({"acts", "recons", "recon_errors"} & set(return_vars))
        self.states: list[Tensor] = []
        self.acts: list[Tensor] = []

    def record(self, states: Tensor, acts: Tensor) -> None:
        if self.keep_states:
            self.states.append(states.clone())
        if self.keep_acts:
            self.acts.append(acts.clone())

    def stacked(self) -> tuple[Tensor | None, Tensor | None]:
        """``(states, acts)``, each (N, F, H_out, W_out, lca_iters), None if not kept."""
        states = torch.stack(self.states, dim=-1) if self.states else None
        acts = torch.stack(self.acts, dim=-1) if self.acts else None
        return states, acts


class LCAConv2D(torch.nn.Module):
    """LCA with 2-D convolutional features on 4-D inputs (behaves like ``lcapt``'s).

    Args:
        out_neurons: number of dictionary features F.
        in_neurons: number of input channels C.
        result_dir: kept for lca-pytorch's positional order (its third argument); this layer
            writes no files, so nothing is stored there.
        kernel_size: feature size k (int or (kh, kw)).
        stride: feature stride s (int or (sh, sw)).
        lambda_: threshold of the transfer function (and L1 weight); may be changed between
            calls.
        tau: time constant of the neurons (the step size is 1 / tau).
        eta: learning rate of the built-in dictionary update.
        lca_iters: number of LCA iterations per forward pass (>= 1).
        pad: 'same' (padding k // 2, odd k only) or 'valid' (no padding).
        return_vars: names of the returned tensors, in this order, among 'inputs',
            'input_drives', 'states', 'acts', 'recons', 'recon_errors', 'conns'.
        return_all_ts: return every variable at every LCA iteration, stacked along a new last
            (time) axis of length lca_iters, instead of only after the last iteration.
        nonneg: keep activations non-negative (ignored by a callable transfer_func).
        transfer_func: 'soft_threshold', 'hard_threshold', or a callable u -> a.
        input_zero_mean: make each input sample zero-mean before coding.
        input_unit_var: make each input sample unit-variance before coding.
        d_update_clip: clip each entry of a dictionary update to [-clip, clip].
        req_grad: make ``weights`` require gradients and, where grad mode is on, build an
            autograd graph through the LCA loop, so gradients reach the inputs, the drive term
            and the dictionary (the initial states only with ``detach_initial_states=False``);
            otherwise nothing is tracked.
        weight_init: how the dictionary starts: a callable ``init(tensor, **kwargs)`` that
            fills (and returns) an empty (F, C, kh, kw) tensor, e.g. ``torch.nn.init.normal_``
            or ``torch.nn.init.orthogonal_``, or lca-pytorch's pair ``(init, kwargs)``. The
            result is scaled to unit-norm features.
        weight_init_kwargs: keyword arguments for ``weight_init`` (added to those of a pair).

    Shapes:
        inputs, recons, recon_errors: (N, C, H, W)
        input_drives, states, acts: (N, F, H_out, W_out), H_out = floor((H + 2p - kh) / sh) + 1
        weights: (F, C, kh, kw); conns: (F, F, 2 * (kh - 1) // sh + 1, 2 * (kw - 1) // sw + 1)
        with return_all_ts, each returned variable gains a last axis of length lca_iters
    """

    def __init__(
        self,
        out_neurons: int,
        in_neurons: int,
        result_dir: str = "./lca_results",
        kernel_size: int | tuple[int, int] = 7,
        stride: int | tuple[int, int] = 1,
        lambda_: float = 0.25,
        tau: float = 100,
        eta: float = 0.01,
        lca_iters: int = 1000,
        pad: str = "same",
        return_vars: Iterable[str] = ("acts",),
        return_all_ts: bool = False,
        nonneg: bool = True,
        transfer_func: str | Callable[[Tensor], Tensor] = "soft_threshold",
        input_zero_mean: bool = True,
        input_unit_var: bool = True,
        d_update_clip: float = math.inf,
        req_grad: bool = False,
        weight_init: WeightInit = (torch.nn.init.trunc_normal_, {}),
        weight_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.out_neurons = int(out_neurons)
        self.in_neurons = int(in_neurons)
        self.result_dir = result_dir
        self.kernel_size = kernel_size
        self.stride = stride
        self.lambda_ = float(lambda_)
        self.tau = tau
        self.eta = eta
        self.lca_iters = int(lca_iters)
        self.pad = pad
        self.return_vars = list(return_vars)
        self.return_all_ts = return_all_ts
        self.nonneg = nonneg
        self.transfer_func = transfer_func
        self.input_zero_mean = input_zero_mean
        self.input_unit_var = input_unit_var
        self.d_update_clip = d_update_clip
        self.req_grad = req_grad
        self.weight_init, self.weight_init_kwargs = _split_weight_init(
            weight_init, weight_init_kwargs
        )
        # replaces the no-graph loop when set (compiled.CapturedLCA): (drive) -> (states, acts)
        self.settle_runner: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None

        self.kh, self.kw = _pair(kernel_size, "kernel_size")
        self.sh, self.sw = _pair(stride, "stride")
        self._check_settings()
        # Padding of the forward convolution (and crop of the transposed one).
        self.input_pad = (self.kh // 2, self.kw // 2) if pad == "same" else (0, 0)
        # Largest shift, in input pixels and on the stride grid, at which two features overlap.
        self.lat_conn_pad = (
            (self.kh - 1) // self.sh * self.sh,
            (self.kw - 1) // self.sw * self.sw,
        )
        # The same shift counted in code positions: the reach of lateral inhibition.
        self.surround = (self.lat_conn_pad[0] // self.sh, self.lat_conn_pad[1] // self.sw)

        self.weights = torch.nn.Parameter(self._initial_weights(), requires_grad=req_grad)
        self.normalize_weights()

    def _initial_weights(self) -> Tensor:
        """``weight_init(empty (F, C, kh, kw), **weight_init_kwargs)``, before normalisation."""
        blank = torch.empty(self.out_neurons, self.in_neurons, self.kh, self.kw)
        filled = self.weight_init(blank, **self.weight_init_kwargs)
        weights = blank if filled is None else filled
        if not isinstance(weights, Tensor) or weights.shape != blank.shape:
            raise RuntimeError(
                f"weight_init must fill or return a tensor of shape {tuple(blank.shape)}, got "
                f"{weights!r:.80}."
            )
        return weights

    def _check_settings(self) -> None:
        if self.pad not in ("same", "valid"):
            raise ValueError(f"pad must be 'same' or 'valid', got {self.pad!r}.")
        if self.pad == "same" and (self.kh % 2 == 0 or self.kw % 2 == 0):
            raise ValueError(f"pad='same' needs an odd kernel_size, got {self.kernel_size!r}.")
        if self.lca_iters < 1:
            raise ValueError(f"lca_iters must be >= 1, got {self.lca_iters}.")
        if self.sh < 1 or self.sw < 1 or self.kh < 1 or self.kw < 1:
            raise ValueError("kernel_size and stride must be positive.")
        self._check_transfer_func()
        self._check_return_vars()

    def _check_transfer_func(self) -> None:
        """ValueError for an unknown name, RuntimeError for anything neither str nor callable
        (a list, a tensor), as lca-pytorch raises."""
        func = self.transfer_func
        if isinstance(func, str):
            if func not in TRANSFER_NAMES:
                raise ValueError(
                    f"transfer_func must be one of {TRANSFER_NAMES} or a callable, got {func!r}."
                )
        elif not callable(func):
            raise RuntimeError(
                f"transfer_func must be a str or a function, got a {type(func).__name__}; pass "
                f"'soft_threshold', 'hard_threshold' or a callable u -> a."
            )

    def _check_return_vars(self) -> None:
        bad = [name for name in self.return_vars if name not in RETURN_VAR_NAMES]
        if bad or not self.return_vars:
            raise ValueError(
                f"return_vars must be a non-empty list of names from {RETURN_VAR_NAMES}, got "
                f"{self.return_vars!r}."
            )

    # ------------------------------------------------------------------ dictionary handling

    def get_weights(self) -> Tensor:
        """A copy of the dictionary, shape (F, C, kh, kw).

        With ``req_grad`` the copy stays in the autograd graph, so gradients through it reach
        ``weights``; without, ``weights`` tracks nothing and the copy is a plain tensor.
        """
        return self.weights.clone()

    def normalize_weights(self, eps: float = 1e-12) -> None:
        """Scale every feature to unit L2 norm: ``D_f <- D_f / (||D_f|| + eps)``."""
        with torch.no_grad():
            norms = torch.linalg.vector_norm(self.weights, dim=(1, 2, 3), keepdim=True)
            self.weights.div_(norms + eps)

    def assign_weight_values(self, tensor: Tensor, normalize: bool = True) -> None:
        """Copy ``tensor`` (same shape and dtype as ``weights``) into the dictionary."""
        if tensor.shape != self.weights.shape:
            raise RuntimeError(
                f"Expected a dictionary of shape {tuple(self.weights.shape)}, got "
                f"{tuple(tensor.shape)}."
            )
        if tensor.dtype != self.weights.dtype:
            raise RuntimeError(
                f"Expected a dictionary of dtype {self.weights.dtype}, got {tensor.dtype}."
            )
        with torch.no_grad():
            self.weights.copy_(tensor)
        if normalize:
            self.normalize_weights()

    def compute_weight_update(self, acts: Tensor, error: Tensor) -> Tensor:
        """Correlation of codes and reconstruction errors, summed over batch and positions.

            dD[f, c, i, j] = sum_{n, y, x} a[n, f, y, x] * e_pad[n, c, y*sh + i, x*sw + j]

        which is ``-dE/dD`` of the reconstruction term. ``acts`` (N, F, H_out, W_out),
        ``error`` (N, C, H, W) -> (F, C, kh, kw).
        """
        return torch.nn.grad.conv2d_weight(
            error,
            self.weights.shape,
            acts,
            stride=(self.sh, self.sw),
            padding=self.input_pad,
        )

    def update_weights(self, acts: Tensor, recon_error: Tensor, normalize: bool = True) -> Tensor:
        """One step of the built-in dictionary learning rule; returns the applied update.

            update_f = clip(eta * dD_f / (times_active_f + 1), +-d_update_clip)
            D <- D + update, then (if ``normalize``) every feature back to unit norm,

        with ``dD`` from ``compute_weight_update`` and ``times_active_f`` the number of
        non-zero entries of feature f in ``acts``.
        """
        return self.apply_weight_update(*self.weight_update_terms(acts, recon_error), normalize)

    @torch.no_grad()
    def weight_update_terms(self, acts: Tensor, recon_error: Tensor) -> tuple[Tensor, Tensor]:
        """The two batch sums of the rule: ``dD`` (F, C, kh, kw) and ``times_active`` (F, 1, 1, 1).

        Both are sums over the batch, so the terms of the parts of a batch, added, are the
        terms of the whole (how data-parallel processes share one update).
        """
        return self.compute_weight_update(acts, recon_error), compute_times_active_by_feature(acts)

    def apply_weight_update(
        self, correlation: Tensor, times_active: Tensor, normalize: bool = True
    ) -> Tensor:
        """The rule of ``update_weights`` from its terms ``dD`` and ``times_active``; returns the
        applied update."""
        with torch.no_grad():
            update = correlation * (self.eta / (times_active.to(correlation.dtype) + 1))
            update.clamp_(min=-self.d_update_clip, max=self.d_update_clip)
            self.weights.add_(update)
        if normalize:
            self.normalize_weights()
        return update

    # ------------------------------------------------------------------ the pieces of LCA

    def transfer(self, x: Tensor) -> Tensor:
        """Activations from membrane potentials, ``a = T_lambda(u)``, same shape as ``x``."""
        self._check_transfer_func()
        if callable(self.transfer_func):
            return self.transfer_func(x)
        if self.transfer_func == "soft_threshold":
            return soft_threshold(x, self.lambda_, self.nonneg)
        return hard_threshold(x, self.lambda_, self.nonneg)

    def _transfer_into(self, states: Tensor, acts: Tensor) -> None:
        """``acts[...] = transfer(states)`` without allocating (no-graph path only)."""
        lam = self.lambda_
        if callable(self.transfer_func):
            acts.copy_(self.transfer_func(states))
        elif self.transfer_func == "soft_threshold" and self.nonneg:
            torch.sub(states, lam, out=acts).clamp_(min=0.0)
        elif self.transfer_func == "soft_threshold":
            # sign(u) * max(|u| - l, 0): the values of relu(u - l) - relu(-u - l), zeros signed.
            torch.abs(states, out=acts).sub_(lam).clamp_(min=0.0).copysign_(states)
        elif self.nonneg:
            acts.copy_(states)
            torch.threshold_(acts, lam, 0.0)
        else:
            # u * [|u| > l]; the comparison writes 1.0 / 0.0 into acts.
            torch.abs(states, out=acts).gt_(lam).mul_(states)

    def compute_input_drive(self, inputs: Tensor, weights: Tensor) -> Tensor:
        """Feed-forward drive ``b = D^T s``: (N, C, H, W) -> (N, F, H_out, W_out)."""
        return F.conv2d(inputs, weights, stride=(self.sh, self.sw), padding=self.input_pad)

    def compute_lateral_connectivity(self, weights: Tensor) -> Tensor:
        """Feature-to-feature overlaps ``G = D^T D - I`` as a convolution kernel.

            G[f, g, m, n] = <D_f shifted by ((m - q_h) sh, (n - q_w) sw), D_g>,
                            q = surround, with G[f, f, q_h, q_w] (self-overlap) set to 0.

        (F, C, kh, kw) -> (F, F, 2 q_h + 1, 2 q_w + 1).
        """
        conns = F.conv2d(weights, weights, stride=(self.sh, self.sw), padding=self.lat_conn_pad)
        not_self = torch.ones_like(conns)
        features = torch.arange(conns.shape[0], device=conns.device)
        not_self[features, features, self.surround[0], self.surround[1]] = 0.0
        return conns * not_self

    def lateral_competition(self, acts: Tensor, conns: Tensor) -> Tensor:
        """Inhibition ``G a``: (N, F, H_out, W_out) -> (N, F, H_out, W_out)."""
        return F.conv2d(acts, conns, padding=self.surround)

    def _overlap(self, acts: Tensor, weights: Tensor, patches: Tensor | None = None) -> Tensor:
        """``D^T D a`` through the full (uncropped) reconstruction canvas.

        Equal to ``lateral_competition(acts, conns) + ||D_f||^2 a``: the canvas
        ``(N, C, (H_out - 1) sh + kh, (W_out - 1) sw + kw)`` holds every pixel the features
        touch, so no overlap is lost at the borders, and going F -> C -> F costs far less than
        one F -> F convolution with the (2 q + 1)^2 kernel G.

        ``D a`` (a transposed convolution) is computed as one matrix product, the patch
        ``sum_f a[n, f, y, x] D_f`` for every position, ``(N, C*kh*kw, H_out*W_out)`` (written
        into ``patches`` when given), then a fold that adds the patches onto the canvas; on CPU
        this is several times faster than ``conv_transpose2d`` with few input channels.
        """
        n, f, h, w = acts.shape
        flat_weights = weights.reshape(f, -1).t()
        patches = torch.matmul(flat_weights, acts.reshape(n, f, h * w), out=patches)
        canvas_size = ((h - 1) * self.sh + self.kh, (w - 1) * self.sw + self.kw)
        canvas = F.fold(patches, canvas_size, (self.kh, self.kw), stride=(self.sh, self.sw))
        return F.conv2d(canvas, weights, stride=(self.sh, self.sw))

    def compute_recon(
        self, acts: Tensor, weights: Tensor, output_size: Sequence[int] | None = None
    ) -> Tensor:
        """Reconstruction ``D a`` on the input grid: (N, F, H_out, W_out) -> (N, C, H, W).

        Without ``output_size`` the extra rows / columns of the transposed convolution are
        ``s - 1`` for odd kernels and 0 for even ones (exact when ``H + 2p - k`` is a
        multiple of ``s``); with it, they are chosen to give exactly (H, W).
        """
        if output_size is None:
            extra = (
                self.sh - 1 if self.kh % 2 else 0,
                self.sw - 1 if self.kw % 2 else 0,
            )
        else:
            height, width = output_size[-2], output_size[-1]
            extra = (
                (height + 2 * self.input_pad[0] - self.kh) % self.sh,
                (width + 2 * self.input_pad[1] - self.kw) % self.sw,
            )
        return F.conv_transpose2d(
            acts,
            weights,
            stride=(self.sh, self.sw),
            padding=self.input_pad,
            output_padding=extra,
        )

    def compute_recon_error(self, inputs: Tensor, recons: Tensor) -> Tensor:
        """``inputs - recons``."""
        return inputs - recons

    # ------------------------------------------------------------------ the dynamics

    def self_overlap(self) -> Tensor:
        """``||D_f||^2`` per feature, (1, F, 1, 1): the diagonal that ``G = D^T D - I`` drops."""
        return self.weights.pow(2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)

    def scratch_for(self, drive: Tensor) -> Scratch:
        """Empty buffers for the in-place ``iterate`` on codes shaped like ``drive``."""
        n, _, h, w = drive.shape
        patches = drive.new_empty(n, self.weights[0].numel(), h * w)
        return Scratch(torch.empty_like(drive), torch.empty_like(drive), patches)

    def iterate(
        self,
        drive: Tensor,
        weights: Tensor,
        self_overlap: Tensor,
        states: Tensor,
        scratch: Scratch | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One LCA iteration, the only place its update rule is written:

            a = T(u);    u <- u + (b - G a - u) / tau,    G a = D^T D a - ||D_f||^2 a.

        ``drive`` is ``b`` and ``states`` ``u`` (N, F, H_out, W_out), ``weights`` ``D``
        (F, C, kh, kw), ``self_overlap`` ``||D_f||^2`` (1, F, 1, 1). Returns ``(u, a)``, ``u``
        after the update and ``a`` from before it.

        With ``scratch`` the iteration allocates nothing and builds no graph: ``u`` is updated
        where it lies, ``a``, the target ``b - G a`` and the patches of ``_overlap`` are
        written into ``scratch``, and the tensors returned are ``states`` and ``scratch.acts``.
        Without, every result is a new tensor, so autograd differentiates the iteration.
        """
        if scratch is None:
            acts, target, patches, updated = self.transfer(states), None, None, None
        else:
            acts, target, patches, updated = scratch.acts, scratch.target, scratch.patches, states
            self._transfer_into(states, acts)
        target = torch.sub(drive, self._overlap(acts, weights, patches), out=target)
        target.addcmul_(self_overlap, acts)
        # u + (target - u) / tau, as one kernel
        return torch.lerp(states, target, 1.0 / self.tau, out=updated), acts

    def step_from(
        self, drive: Tensor, scratch: Scratch | None = None, iterate: Callable | None = None
    ) -> Step:
        """``u -> iterate(self, drive, D, ||D_f||^2, u, scratch)``, the dictionary's terms read
        once; ``iterate`` is ``LCAConv2D.iterate`` (or a compiled copy of it) when None."""
        iterate = type(self).iterate if iterate is None else iterate
        weights, self_overlap = self.weights, self.self_overlap()
        return lambda states: iterate(self, drive, weights, self_overlap, states, scratch)

    def settle_loop(
        self, states: Tensor, step: Step, on_step: StepHook | None = None
    ) -> tuple[Tensor, Tensor]:
        """The LCA loop: ``lca_iters`` times ``states, acts = step(states)`` (``step_from``'s
        iteration, or a replay of its capture), ``on_step(states, acts)`` after each. Returns
        the last ``(states, acts)``."""
        for _ in range(self.lca_iters):
            states, acts = step(states)
            if on_step is not None:
                on_step(states, acts)
        return states, acts

    def _settle_in_place(
        self, drive: Tensor, states: Tensor | None = None, on_step: StepHook | None = None
    ) -> tuple[Tensor, Tensor]:
        """The loop without a graph, on preallocated buffers.

        ``states`` (N, F, H_out, W_out) is the start ``u`` (zeros when None) and is updated in
        place; ``on_step(states, acts)`` sees the live buffers. A ``settle_runner``
        (``compiled.CapturedLCA``, for ``--compile``) runs the loop in its place when one is
        set and the run starts from zero without a step hook.
        """
        if self.settle_runner is not None and states is None and on_step is None:
            return self.settle_runner(drive)
        states = torch.zeros_like(drive) if states is None else states
        return self.settle_loop(states, self.step_from(drive, self.scratch_for(drive)), on_step)

    def builds_graph(self) -> bool:
        """Whether an encode now runs with an autograd graph: ``req_grad`` and the caller's
        grad mode on (not under ``torch.no_grad()`` or ``torch.inference_mode()``)."""
        return self.req_grad and torch.is_grad_enabled()

    def _grad_mode(self) -> contextlib.AbstractContextManager:
        """No graph at all without ``req_grad``; with it, the caller's grad mode."""
        return contextlib.nullcontext() if self.req_grad else torch.no_grad()

    def encode(
        self,
        inputs: Tensor,
        drive_scaling: Tensor | None = None,
        initial_states: Tensor | None = None,
        *,
        detach_initial_states: bool = True,
    ) -> tuple[Tensor, ...]:
        """Sparse-code already normalised ``inputs`` (N, C, H, W).

        Starting from ``u = initial_states`` (zeros when None) it runs ``lca_iters`` times

            a = T_lambda(u);    u <- u + (b - u - G a) / tau,    b = D^T s + drive_scaling

        and returns the tensors named in ``return_vars``, in that order: ``acts`` is the
        ``a`` of the last iteration (computed before the last update of ``u``), ``states``
        the ``u`` after it, ``recons = D a``, ``recon_errors = inputs - recons``,
        ``input_drives = b``, ``conns = G``. With ``return_all_ts`` each of them gets a last
        axis of length ``lca_iters`` whose entry t holds the values of iteration t + 1
        (``inputs``, ``input_drives`` and ``conns`` repeat).

        ``drive_scaling`` and ``initial_states`` must have the code's shape
        (N, F, H_out, W_out); RuntimeError otherwise. The loop builds a graph when
        ``builds_graph()``; ``initial_states`` then enter it detached, as in lca-pytorch, unless
        ``detach_initial_states=False`` asks for gradients into them too.
        """
        self._check_settings()
        with self._grad_mode():
            drive = self.compute_input_drive(inputs, self.weights)
            if drive_scaling is not None:
                _check_code_shaped(drive_scaling, drive, "drive_scaling")
                drive = drive + drive_scaling
            if initial_states is not None:
                _check_code_shaped(initial_states, drive, "initial_states")
            trajectory = _Trajectory(self.return_vars) if self.return_all_ts else None
            on_step = None if trajectory is None else trajectory.record
            if self.builds_graph():
                start = torch.zeros_like(drive) if initial_states is None else initial_states
                start = start.detach() if detach_initial_states else start
                states, acts = self.settle_loop(start.to(drive), self.step_from(drive), on_step)
            else:
                # the loop writes into its start: a copy, in the drive's dtype and layout
                start = None
                if initial_states is not None:
                    start = torch.empty_like(drive).copy_(initial_states)
                states, acts = self._settle_in_place(drive, start, on_step)
            if trajectory is not None:
                states, acts = trajectory.stacked()
            return self._select_outputs(inputs, drive, states, acts)

    def _select_outputs(
        self, inputs: Tensor, drive: Tensor, states: Tensor | None, acts: Tensor | None
    ) -> tuple[Tensor, ...]:
        """The tensors named in ``return_vars``, in order (see ``encode``).

        With ``return_all_ts``, ``states`` and ``acts`` arrive with the time axis last (None
        when not asked for); reconstructions are made for every step, the constant
        variables are repeated along that axis.
        """
        steps = self.lca_iters if self.return_all_ts else 0

        def over_time(x: Tensor) -> Tensor:
            return x.unsqueeze(-1).expand(*x.shape, steps).contiguous() if steps else x

        recons = None
        if {"recons", "recon_errors"} & set(self.return_vars):
            recons = (
                self._recon_over_time(acts, inputs.shape)
                if steps
                else self.compute_recon(acts, self.weights, inputs.shape)
            )
        available: dict[str, Callable[[], Tensor]] = {
            "inputs": lambda: over_time(inputs),
            "input_drives": lambda: over_time(drive),
            "states": lambda: states,
            "acts": lambda: acts,
            "recons": lambda: recons,
            "recon_errors": lambda: self.compute_recon_error(
                inputs.unsqueeze(-1) if steps else inputs, recons
            ),
            "conns": lambda: over_time(self.compute_lateral_connectivity(self.weights)),
        }
        return tuple(available[name]() for name in self.return_vars)

    def _recon_over_time(self, acts: Tensor, output_size: Sequence[int]) -> Tensor:
        """``compute_recon`` of every step at once: (N, F, H_out, W_out, T) -> (N, C, H, W, T)."""
        steps = acts.shape[-1]
        recons = self.compute_recon(acts.movedim(-1, 0).flatten(0, 1), self.weights, output_size)
        return recons.unflatten(0, (steps, -1)).movedim(0, -1)

    def forward(
        self,
        inputs: Tensor,
        drive_scaling: Tensor | None = None,
        initial_states: Tensor | None = None,
        *,
        detach_initial_states: bool = True,
    ) -> Tensor | tuple[Tensor, ...]:
        """Normalise ``inputs`` (N, C, H, W) per sample as configured, then ``encode``.

        Args (as lca-pytorch's ``forward``):
            drive_scaling: (N, F, H_out, W_out), added to the input drive, ``b <- b +
                drive_scaling`` (lca-pytorch adds it, whatever its name says); the returned
                ``input_drives`` include it.
            initial_states: (N, F, H_out, W_out), the membrane potentials to start from
                instead of zeros, e.g. the ``states`` of an earlier call, which this call then
                continues. It enters the loop detached, as in lca-pytorch: a warm start
                from the ``states`` of a call already backpropagated through builds a graph
                of its own.
            detach_initial_states: False to let gradients flow back into ``initial_states``
                as well (with ``req_grad``, where grad mode is on).

        With ``req_grad`` the normalisation and the loop build an autograd graph where grad mode
        is on, and none under ``torch.no_grad()`` or ``torch.inference_mode()``; without it,
        never. Returns one tensor if one return var is asked, else a tuple in the asked order.
        Wrongly shaped inputs, drive_scaling or initial_states raise RuntimeError.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            got = f"{inputs.dim()}D inputs" if isinstance(inputs, Tensor) else type(inputs).__name__
            raise RuntimeError(f"Expected 4D inputs (N, C, H, W), got {got}.")
        if inputs.shape[1] != self.in_neurons:
            raise RuntimeError(
                f"Expected inputs with {self.in_neurons} channels, got {inputs.shape[1]}."
            )
        with self._grad_mode():
            if self.input_zero_mean:
                inputs = make_zero_mean(inputs)
            if self.input_unit_var:
                inputs = make_unit_var(inputs)
        # Pass on only what differs from the defaults, so that code wrapping encode(inputs)
        # keeps working.
        given = {
            "drive_scaling": drive_scaling,
            "initial_states": initial_states,
            "detach_initial_states": None if detach_initial_states else False,
        }
        outputs = self.encode(inputs, **{k: v for k, v in given.items() if v is not None})
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return (
            f"{self.out_neurons}, {self.in_neurons}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, lambda_={self.lambda_}, tau={self.tau}, "
            f"lca_iters={self.lca_iters}, pad={self.pad!r}"
        )

    def settings(self) -> dict[str, Any]:
        """The LCA settings as plain Python values (what ``records.save_dictionary`` stores)."""
        transfer = self.transfer_func
        return {
            "out_neurons": self.out_neurons,
            "in_neurons": self.in_neurons,
            "kernel_size": self.kernel_size
            if isinstance(self.kernel_size, int)
            else tuple(self.kernel_size),
            "stride": self.stride if isinstance(self.stride, int) else tuple(self.stride),
            "lambda_": float(self.lambda_),
            "tau": float(self.tau),
            "eta": float(self.eta),
            "lca_iters": int(self.lca_iters),
            "pad": self.pad,
            "nonneg": bool(self.nonneg),
            "transfer_func": transfer if isinstance(transfer, str) else transfer.__name__,
            "input_zero_mean": bool(self.input_zero_mean),
            "input_unit_var": bool(self.input_unit_var),
        }
