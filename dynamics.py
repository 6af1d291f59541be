"""The dynamics: how a phase moves an energy-based network's states, step by step.

A step updates layers ``s_k <- sigma(dPhi/ds_k)`` (``EnergyNet.layer_update``), with
``dPhi/ds_k = sum_{e into k} F_e(s_source) + b_k + sum_{e out of k} F_e^T(s_target)`` over the
edges of the network's graph (``graph``). Both dynamics are the same two moves over groups of
layers: *refresh* the edges feeding the group (``F_e`` on the current source state, and the
cache its adjoint needs), then *update* the group's layers from those drives and the caches of
the edges leaving them.

* ``sync`` (default): one group, every layer, from the old states of all its neighbours
  (Jacobi-like).
* ``async``: one half-step per group of ``EnergyNet.groups``, a colouring of the layer graph
  (``graph.Graph.colouring``): no edge joins two layers of a group, each group updated from the
  current states of the others (Scellier et al., NeurIPS 2023, for a chain). ``dPhi/ds_k``
  only involves the layers ``s_k`` shares an edge with, none of them in its group, so a
  half-step updates a whole group at once, each layer exactly as if it were updated alone. A
  chain has two groups, its odd layers ``s_1, s_3, ...`` (1-based; ``x`` counts as even) then
  its even ones; a graph with a triangle (a skip ``u -> b`` beside ``u -> a -> b``) needs three
  or more. The edges a half-step refreshes read the states of other groups, which stay as they
  are until their own half-step, and that half-step reads only the caches of edges leaving it,
  refreshed after its previous update: an asynchronous step runs every link's forward pass
  once, as a synchronous one does.

  For an activation that is a clamp with slope ``c`` on its linear range (``hard_sigmoid`` and
  ``ctrd_hard_sig``: ``c = 1``; ``my_hard_sig``: ``c = 1/2``) take the energy
  ``E(s) = sum_k ||s_k||^2 / (2c) - Phi(s)`` on the box of the clamp (``energy``).
  ``E`` is quadratic in ``s_k`` for linear, copy, identity- and average-pooled links, and
  ``s_k <- clamp(c dPhi/ds_k)`` is its exact minimiser over the box in ``s_k`` with the other
  layers fixed; for a group of layers no edge joins, ``E`` is a sum of such terms, one per
  layer of the group, so a half-step is exact block-coordinate descent of ``E`` on every graph
  the engine builds. Through a max-pool, ``<P(conv(s_k)), s_target>`` is convex in ``s_k``
  when ``s_target >= 0`` (as it is for ``hard_sigmoid`` and ``my_hard_sig``), and the update
  minimises the majoriser of ``E`` that linearises it at the current ``s_k``: ``E`` still never
  increases (majorise-minimise). Either way the fixed points of ``async`` are those of ``sync``,
  which updates every layer from old neighbours and can raise ``E`` and oscillate. A grouping
  that puts two coupled layers together updates each from the other's old state, as ``sync``
  does, and loses the guarantee. The copy layer's scaled feedback (``scale_feedback = g > 0``)
  is the exact minimiser of ``E`` with that layer's own terms ``||s_k||^2 / (2c) - <F_e(x),
  s_k>`` divided by ``g`` (a layer fed by ``x`` only). Where the argument does not hold:
  the nudge (``beta != 0``) uses the output layer's current state, so the nudged phase is not
  exact descent; ``ctrd_hard_sig`` takes negative states, so a max-pooled term is no longer
  convex in its source; smooth activations (sigmoid, tanh) follow the same scheme with their
  own energy, which ``energy`` does not provide; vector-field models have no energy at all.

A phase (``run_phase``) runs ``T`` steps; with ``EnergyNet.tol`` it stops as soon as
``max |s_t - s_(t-1)|`` over every layer and sample is below ``tol``, checked every
``tol_every`` steps and at the cap ``T`` (a reduction and one host sync per check, none per
step). Its ``PhaseRecord`` says how many steps it took and whether it settled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from graph import INPUT
from links import in_memory_format

DYNAMICS = ("sync", "async")
# The slope c of every activation that is a clamp on its linear range (see energy).
CLAMP_SLOPES: dict[str, float] = {
    "hard_sigmoid": 1.0, "my_hard_sig": 0.5, "ctrd_hard_sig": 1.0, "relu6": 1.0,
}  # fmt: skip
REFERENCE_FACTOR = 4  # a phase's reference energy comes from a settle this many times longer
TOL_EVERY = 5  # with a tolerance, a phase checks whether it settled every this many steps

# edge e -> (F_e on its current source state, its adjoint's cache), for the edges refreshed so far
Drives = dict[int, tuple[Tensor, tuple | None]]
# the output layer's update in a phase, in the loss's place: (drive, s_out, y, beta) -> new s_out
OutputUpdate = Callable[[Tensor, Tensor, Tensor, float], Tensor]


class PhaseRecord(NamedTuple):
    """What a phase (one call of ``Phases.run``) did.

    steps: the steps it took (``T`` without a tolerance);
    settled: whether ``max |s_t - s_(t-1)|`` fell below the tolerance (None without one; False
        when the phase stopped at its cap ``T``).
    """

    steps: int
    settled: bool | None


def max_change(before: list[Tensor], after: list[Tensor]) -> float:
    """``max |after - before|`` over every layer and sample (one host sync)."""
    changes = [(new - old).abs().max() for old, new in zip(before, after, strict=True)]
    return torch.stack(changes).max().item()


def parity_group(num_layers: int, parity: int) -> range:
    """List indices of a chain's layers ``s_k`` (1-based, ``s_0 = x``) with ``k % 2 == parity``."""
    return range(1 - parity, num_layers, 2)


def refresh(
    model, neurons: list[Tensor], input_drives: list[Tensor], layers, drives: Drives
) -> None:
    """Into ``drives``: every edge feeding a layer of ``layers``, on its current source state
    (an edge from ``x`` takes its entry of ``input_drives``, ``F_e(x)`` computed once per phase,
    with no cache: nothing is fed back into ``x``)."""
    graph, links = model.graph, model.links
    from_input = dict(zip(graph.input_edges, input_drives, strict=True))
    for k in layers:
        for e in graph.incoming[k]:
            source = graph.edges[e].source
            if source == INPUT:
                drives[e] = (from_input[e], None)
            else:
                drives[e] = links[e].drive(neurons[source])


def update(
    model,
    y: Tensor,
    neurons: list[Tensor],
    beta: float,
    layers,
    drives: Drives,
    output_update: OutputUpdate | None = None,
) -> None:
    """The layers of ``layers`` in the list ``neurons`` (in place, in increasing order) from
    their drives and the caches of the edges leaving them, every one from the states as they
    were before the first of them changed (``output_update``: see ``EnergyNet.layer_update``)."""
    before = list(neurons)
    for k in layers:
        neurons[k] = model.layer_update(k, drives, before, y, beta, output_update)


def sync_step(
    model,
    y: Tensor,
    neurons: list[Tensor],
    beta: float,
    input_drives: list[Tensor],
    output_update: OutputUpdate | None = None,
) -> list[Tensor]:
    """One synchronous step: every layer from the old states (the step ``--compile`` runs)."""
    neurons, drives = list(neurons), {}
    every = range(model.num_layers)
    refresh(model, neurons, input_drives, every, drives)
    update(model, y, neurons, beta, every, drives, output_update)
    return neurons


def half_steps(
    model,
    y: Tensor,
    neurons: list[Tensor],
    beta: float,
    input_drives: list[Tensor],
    drives: Drives,
    groups: list[list[int]],
    output_update: OutputUpdate | None = None,
) -> list[Tensor]:
    """Asynchronous half-steps, one per group of ``groups`` in turn (a step: every group of
    ``model.groups``), on a copy of ``neurons``. ``drives`` must hold the edges feeding the
    other groups, refreshed since their sources last changed; it is left so for the next."""
    neurons = list(neurons)
    for group in groups:
        refresh(model, neurons, input_drives, group, drives)
        update(model, y, neurons, beta, group, drives, output_update)
    return neurons


def stepper(
    model,
    y: Tensor,
    beta: float,
    input_drives: list[Tensor],
    output_update: OutputUpdate | None = None,
) -> Callable[[list[Tensor]], list[Tensor]]:
    """The model's step for one phase, ``states -> next states``; the asynchronous one carries
    its edges' drives from step to step."""
    if model.dynamics == "sync":
        return lambda neurons: sync_step(model, y, neurons, beta, input_drives, output_update)
    drives: Drives = {}
    groups = model.groups

    def async_step(neurons: list[Tensor]) -> list[Tensor]:
        if not drives:
            for group in groups[1:]:
                refresh(model, neurons, input_drives, group, drives)
        return half_steps(model, y, neurons, beta, input_drives, drives, groups, output_update)

    return async_step


def run_phase(
    model,
    x: Tensor,
    y: Tensor,
    neurons: list[Tensor],
    T: int,
    beta: float,
    track_grad: bool,
    output_update: OutputUpdate | None = None,
    safe_point: Callable[[], None] | None = None,
) -> tuple[list[Tensor], PhaseRecord]:
    """At most ``T`` steps of the model's dynamics from ``neurons`` (in the engine's layouts).

    With ``model.tol`` (and no ``track_grad``: BPTT backpropagates through exactly ``T``
    steps) stop at the first check (every ``tol_every`` steps, and at ``T``) where
    ``max |s_t - s_(t-1)|`` is below ``tol``. ``safe_point``, when given, runs between steps;
    ``output_update`` replaces the loss's update of the output layer. Returns the states and
    the phase's record.
    """
    if T == 0:
        return neurons, PhaseRecord(0, None if model.tol is None or track_grad else False)
    advance = stepper(model, y, beta, model.input_drives(x), output_update)
    checks = model.tol is not None and not track_grad
    steps, settled = T, False if checks else None
    for step in range(1, T + 1):
        if safe_point is not None and step > 1:
            safe_point()
        previous, neurons = neurons, advance(neurons)
        if checks and (step % model.tol_every == 0 or step == T):
            settled = max_change(previous, neurons) < model.tol
            if settled:
                steps = step
                break
    return neurons, PhaseRecord(steps, settled)


class PhaseLog(Protocol):
    """Where a phase's record goes, and a learning rule's per-batch statistics
    (``metrics.Metrics``)."""

    def add_phase(self, name: str, record: PhaseRecord) -> None: ...

    def add_stat(self, name: str, value: float) -> None: ...


@dataclass(frozen=True)
class Phases:
    """How a caller's phases run, passed to whatever runs them (nothing is set on the model).

    runner: runs a phase in the engine's loop's place (``compiled.PhaseRunner``), called as
        ``runner(x, y, neurons, T, beta, track_grad, safe_point)``; it returns None to decline
        (then the engine's ``run_phase`` runs it). None: always the engine's loop.
    safe_point: called between the steps of every phase (a stop request raises there), and by
        training before every batch; None: no call, no cost.
    log: receives ``(name, record)`` for every phase run with a ``name`` (``metrics.Metrics``
        counts the steps per phase name); None: records are not kept.
    """

    runner: Callable[..., list[Tensor] | None] | None = None
    safe_point: Callable[[], None] | None = None
    log: PhaseLog | None = None

    def report(self, name: str, value: float) -> None:
        """A learning rule's statistic ``name`` of the current batch (RBP's adjoint residual)
        for ``log``, which averages it over the epoch's samples; dropped without a log."""
        if self.log is not None:
            self.log.add_stat(name, value)

    def run(self, model, *args, **kwargs) -> list[Tensor]:
        """The states after the phase ``run_recorded(model, ...)`` runs (same arguments)."""
        return self.run_recorded(model, *args, **kwargs)[0]

    def run_recorded(
        self,
        model,
        x: Tensor,
        y: Tensor,
        neurons: list[Tensor],
        T: int,
        beta: float = 0.0,
        *,
        name: str | None = None,
        track_grad: bool = False,
        output_update: OutputUpdate | None = None,
    ) -> tuple[list[Tensor], PhaseRecord]:
        """Run ``T`` steps of ``model``'s dynamics on the fixed input ``x`` (B, ...) from
        ``neurons`` at ``beta`` (to a tolerance if the model has one, unless ``track_grad``);
        return the settled states and the phase's record, which ``log`` gets under ``name``.

        No autograd graph unless ``track_grad``; the input list is left untouched; the input
        and states are put once in the layout of ``memory_format_for``. ``output_update``
        (``(drive, s_out, y, beta) -> new s_out``) replaces the loss's update of the output
        layer (a phase nudged by another cost, or clamped); the runner declines such phases.
        """
        with torch.set_grad_enabled(track_grad):
            x = in_memory_format(x)
            neurons = [in_memory_format(state) for state in neurons]
            settled = None
            if self.runner is not None and T > 0 and output_update is None:
                settled = self.runner(x, y, neurons, T, beta, track_grad, self.safe_point)
            if settled is not None:
                neurons, record = settled, PhaseRecord(T, None)
            else:
                neurons, record = run_phase(
                    model, x, y, neurons, T, beta, track_grad, output_update, self.safe_point
                )
        if name is not None and self.log is not None:
            self.log.add_phase(name, record)
        return neurons, record


EAGER = Phases()  # the engine's own loop, no safe point, no log (``EnergyNet.forward``)


def group_step(
    model, x: Tensor, y: Tensor, neurons: list[Tensor], group: list[int], beta: float = 0.0
) -> list[Tensor]:
    """One asynchronous half-step on its own: the layers of ``group`` (which no edge should
    join) from the current states of every other layer; the others are kept."""
    neurons = [in_memory_format(state) for state in neurons]
    input_drives = model.input_drives(in_memory_format(x))
    drives: Drives = {}
    others = [k for k in range(model.num_layers) if k not in set(group)]
    refresh(model, neurons, input_drives, others, drives)
    return half_steps(model, y, neurons, beta, input_drives, drives, [list(group)])


def half_step(model, x: Tensor, y: Tensor, neurons: list[Tensor], parity: int, beta: float = 0.0):
    """A chain's half-step: ``group_step`` of its layers of 1-based ``parity`` (1: odd)."""
    return group_step(model, x, y, neurons, list(parity_group(model.num_layers, parity)), beta)


def energy(model, x: Tensor, y: Tensor, neurons: list[Tensor], beta: float = 0.0) -> Tensor:
    """``E = sum_k ||s_k||^2 / (2c) - Phi(x, s, beta)`` per sample (B,), for an activation
    that is a clamp with slope ``c`` (``CLAMP_SLOPES``); states must lie in its box.

    Output units without an activation (``EnergyNet.linear_output``) take ``c = 1``. A layer
    whose feedback is scaled by ``g != 1`` (the copy layer) has its own terms
    ``||s_k||^2 / (2c) - sum_{e into k} <F_e(x), s_k>`` divided by ``g``: the dynamics descend
    that energy (module docstring), for such a layer fed by ``x`` alone. The asynchronous free
    phase never raises ``E``.
    """
    if not model.has_energy:
        raise ValueError(
            f"energy is defined for clamp activations ({', '.join(CLAMP_SLOPES)}), "
            f"not {model.activation!r}"
        )
    slopes = [CLAMP_SLOPES[model.activation]] * model.num_layers
    if model.linear_output:
        slopes[model.output_index] = 1.0
    squares = [
        state.pow(2).flatten(1).sum(1) / (2 * c) for state, c in zip(neurons, slopes, strict=True)
    ]
    energy = sum(squares) - model.Phi(x, y, neurons, beta)
    graph = model.graph
    for k, layer in enumerate(graph.layers):
        g = layer.feedback_scale
        if g == 1.0:
            continue
        own_terms = squares[k]
        for e in graph.incoming[k]:
            if graph.edges[e].source != INPUT:
                raise ValueError(f"layer {k} scales its feedback but is fed by another layer")
            own_terms = own_terms - model.links[e].phi(x, neurons[k])
        energy = energy + (1.0 / g - 1.0) * own_terms
    return energy


@torch.no_grad()
def settling_trace(
    model, x: Tensor, y: Tensor, T1: int, T2: int, betas: tuple[float, float]
) -> dict[str, dict[str, Tensor | None]]:
    """How each dynamics settles the batch ``x``: per ``sync`` and ``async``, a free phase of
    ``T1`` steps from zero at ``betas[0]`` and a nudged phase of ``T2`` steps from its end at
    ``betas[1]``, every step taken (no tolerance).

    Returns per dynamics ``free_energy`` (T1 + 1,) and ``nudged_energy`` (T2 + 1,): the mean
    energy (``EnergyNet.energy``, with each phase's beta) over the batch from the phase's start,
    None when the model has none (``has_energy``); ``free_change`` (T1,), ``nudged_change`` (T2,):
    ``max |s_t - s_(t-1)|`` over layers and samples at every step; ``free_reference`` and
    ``nudged_reference`` (scalars, the same for both dynamics, None without an energy): the
    phases' ``reference_energies``, against which a gap ``E_t - E_ref`` is measured.
    """
    encoding = model.prepare_input(x)
    code = encoding.code
    has_energy = model.has_energy
    references = reference_energies(model, code, y, T1, T2, betas) if has_energy else (None, None)
    traces = {}
    for dynamics in DYNAMICS:
        trace: dict[str, Tensor | None] = {}
        neurons = model.init_neurons(code)
        with model.dynamics_set_to(dynamics):
            for phase, T, beta in (("free", T1, betas[0]), ("nudged", T2, betas[1])):
                energies, changes = [], []
                for step in range(T + 1):
                    if has_energy:
                        energies.append(model.energy(code, y, neurons, beta).mean())
                    if step < T:
                        previous, neurons = neurons, model(code, y, neurons, 1, beta)
                        changes.append(torch.tensor(max_change(previous, neurons)))
                trace[f"{phase}_energy"] = torch.stack(energies).cpu() if has_energy else None
                trace[f"{phase}_change"] = torch.stack(changes) if changes else torch.zeros(0)
        trace["free_reference"], trace["nudged_reference"] = references
        traces[dynamics] = trace
    return traces


@torch.no_grad()
def reference_energies(
    model, code: Tensor, y: Tensor, T1: int, T2: int, betas: tuple[float, float],
    factor: int = REFERENCE_FACTOR,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The lowest mean energy (over the batch, a scalar on the CPU) of each phase of a long
    ``async`` settle: ``factor T1`` free steps from zero at ``betas[0]``, then ``factor T2``
    nudged steps from there at ``betas[1]``, each minimum over the phase's start and steps.

    Async free steps never raise the energy (module docstring), so the free reference is at
    or below every energy of an async free phase of T1 steps from zero, which is the start of
    this settle; the gap to it does not vanish at the phase's last step unless the phase has
    settled. The nudge makes the nudged phase inexact descent, hence its minimum, not its end.
    """
    neurons = model.init_neurons(code)
    lowest = []
    with model.dynamics_set_to("async"):
        for steps, beta in ((factor * T1, betas[0]), (factor * T2, betas[1])):
            energies = [model.energy(code, y, neurons, beta).mean()]
            for _ in range(steps):
                neurons = model(code, y, neurons, 1, beta)
                energies.append(model.energy(code, y, neurons, beta).mean())
            lowest.append(torch.stack(energies).min().cpu())
    return lowest[0], lowest[1]
