"""Captured phases: how a phase runs under ``--compile`` (and ``--precision bf16``).

A phase is ``T`` calls of the engine's step ``s <- step(y, s, beta, [F_e(x)])`` (one drive per
edge leaving the input)
(``dynamics.sync_step``), and an LCA encode is ``lca_iters`` calls of
``LCAConv2D.iterate``. On a GPU each step of the seed RCNN is about twenty small kernel
launches from Python, so launch overhead rather than arithmetic can set the cost. This module
runs those loops from the outside: a ``PhaseRunner``, which the caller hands to whatever runs
phases (``dynamics.Phases.runner``), and ``LCAConv2D.settle_runner`` (a ``CapturedLCA``);
``install`` makes the first and sets the second.

* Compiled: the step (and the LCA iteration) go through ``torch.compile`` (inductor, default
  mode, static shapes), which fuses the elementwise work between the convolutions; the loop
  calls the compiled function ``T`` times. This is the CPU path.
* Captured (CUDA): the compiled step is recorded once in a CUDA graph that updates static
  state buffers in place, ``s <- step(s)``. A phase copies its input, labels, ``F_e(x)`` and
  starting states into the buffers, replays the graph ``T`` times (one launch per step) and
  hands back copies of the states, so later phases never overwrite states a caller holds. The
  LCA encode is captured the same way (one graph per iteration, replayed ``lca_iters`` times).
  The graph reads the weights where they live, so in-place optimizer steps and dictionary
  updates are seen; a parameter that moved (``model.to``) forces a new capture.
  torch.compile's own mode "reduce-overhead" is not used: its CUDA-graph trees hand out outputs
  that the next replay overwrites, and a loop feeding each output back in records a chain.
* Shapes: every distinct shape (the last, smaller batch of an epoch, the test batches, the plot
  probe) gets its own compile and capture; no batch is dropped. The key also holds ``beta``
  and the dtypes and layouts of the tensors.
* Fallbacks, each announced by exactly one ``notice:`` line, after which that part runs eagerly:
  a torch without ``torch.compile``; a compile that fails (no C++ compiler for inductor on the
  CPU, an unsupported operation); a CUDA graph capture that fails (the compiled step then runs
  without graphs); and phases with an autograd graph (BPTT), which always run eagerly.
* ``--precision bf16``: the phases without a graph run under ``torch.autocast(bfloat16)`` on
  states cast to bfloat16, and hand back float32 states, so the EP estimate, the optimizer and
  the LCA encode stay float32 (``precision.py`` measures what the rounding costs the EP update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from dynamics import sync_step
from experiment.entry import first_line
from lca import LCAConv2D
from utils_ep_fast import EnergyNet

# Every (shape, beta, dtype) pair is its own compile; the default limit of 8 per function would
# silently send the ninth (e.g. the plot probe's batch) back to eager Python.
RECOMPILE_LIMIT = 64
# Calls on a side stream before a capture: cuDNN's algorithm search, lazy initialisation and the
# compile itself must all happen outside the graph.
WARMUP_CALLS = 3


class Notices:
    """Prints each notice once (keyed by its reason) as ``notice: ...`` on stdout."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def once(self, reason: str, message: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            print(f"notice: {message}", flush=True)


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


class CompiledFunction:
    """``function`` through ``torch.compile``; if that is missing or fails, one notice and from
    then on ``function`` itself (a compile fails before anything runs, so nothing is half done).
    """

    def __init__(self, function: Callable, what: str, notices: Notices) -> None:
        self.function = function
        self.what = what
        self.notices = notices
        self.compiled: Callable | None = None
        if not hasattr(torch, "compile"):
            notices.once(
                "no torch.compile",
                f"--compile: torch {torch.__version__} has no torch.compile; {what} runs eagerly",
            )
            return
        _raise_recompile_limit()
        self.compiled = torch.compile(function, dynamic=False)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.compiled = None
                self.notices.once(
                    f"compile {self.what}",
                    f"--compile: compiling {self.what} failed ({first_line(error)}); "
                    f"it runs eagerly",
                )
        return self.function(*args)


def cuda_graph(function: Callable[[], None], pool) -> Callable[[], None]:
    """Record ``function`` (which reads and writes only tensors that outlive it) in a CUDA
    graph after ``WARMUP_CALLS`` calls on a side stream; returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        function()
    return graph.replay


def capture(function: Callable[[], None], device: torch.device, pool) -> Callable[[], None]:
    """A replay of ``function`` on its buffers: a CUDA graph on CUDA; elsewhere, where there are
    no graphs, ``function`` itself (same buffers, same operations: the path tests run on)."""
    if device.type == "cuda":
        return cuda_graph(function, pool)
    return function


def captured_or_none(make: Callable[[], object], what: str, notices: Notices):
    """``make()`` (a capture of ``what``), or None with one notice when capturing fails."""
    try:
        return make()
    except Exception as error:  # noqa: BLE001 - any capture failure means: no graphs
        notices.once(
            f"capture {what}",
            f"--compile: capturing {what} in a CUDA graph failed ({first_line(error)}); "
            f"it runs compiled without graphs",
        )
        return None


def _layout(tensor: Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


class StepGraph:
    """One engine step ``s <- step(y, s, beta, [F_e(x)])`` captured on static buffers."""

    def __init__(
        self,
        step: Callable,
        model: EnergyNet,
        y: Tensor,
        neurons: list[Tensor],
        beta: float,
        input_drives: list[Tensor],
        pool,
    ) -> None:
        self.inputs = [y.clone(), *(drive.clone() for drive in input_drives)]
        self.states = [state.clone() for state in neurons]
        static_y, *static_drives = self.inputs

        def one_step() -> None:
            updated = step(model, static_y, self.states, beta, static_drives)
            for state, value in zip(self.states, updated, strict=True):
                state.copy_(value)

        self.replay = capture(one_step, y.device, pool)

    def run(
        self,
        y: Tensor,
        neurons: list[Tensor],
        input_drives: list[Tensor],
        T: int,
        safe_point: Callable[[], None] | None = None,
    ) -> list[Tensor]:
        """``T`` steps from ``neurons`` (``safe_point``, if any, between them); fresh tensors
        come back (the buffers stay here)."""
        for static, value in zip(self.inputs, (y, *input_drives), strict=True):
            static.copy_(value)
        for state, value in zip(self.states, neurons, strict=True):
            state.copy_(value)
        for step in range(T):
            if safe_point is not None and step > 0:
                safe_point()
            self.replay()
        return [state.clone() for state in self.states]


class Capturer:
    """What ``PhaseRunner`` and ``CapturedLCA`` share: the unbound ``function`` they run (its
    compiled copy with ``compile``), whether they capture it in CUDA graphs (``graphs``;
    ``None``: on CUDA when ``compile``), and the graphs already captured, one per key."""

    def __init__(
        self, function: Callable, what: str, compile: bool, graphs: bool | None, notices
    ) -> None:
        self.what = what
        self.compile = compile
        self.graphs = graphs
        self.notices = notices or Notices()
        self.function = CompiledFunction(function, what, self.notices) if compile else function
        self.captured: dict[tuple, object] = {}
        self.pool = None

    def _use_graphs(self, device: torch.device) -> bool:
        if self.graphs is None:
            return self.compile and device.type == "cuda"
        return self.graphs

    def _graph(self, key: tuple, device: torch.device, make: Callable[[object], object]):
        """The capture for ``key``, made on first use by ``make(pool)``, or ``None`` after a
        failed capture (one notice; from then on the function runs without graphs)."""
        if key not in self.captured:
            if self.pool is None and device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            graph = captured_or_none(lambda: make(self.pool), self.what, self.notices)
            if graph is None:
                self.graphs = False
                return None
            self.captured[key] = graph
        return self.captured[key]


class PhaseRunner(Capturer):
    """Runs a model's phases in the engine's loop's place (``dynamics.Phases.runner``).

    Args:
        model: the network whose step (``dynamics.sync_step``) is run.
        compile: compile the step with torch.compile.
        graphs: capture the step in CUDA graphs; ``None``: on CUDA when ``compile``.
        autocast_dtype: run the phases in this dtype (``torch.bfloat16``), or ``None``.
        notices: where the one-line fallback notices are counted.
    """

    def __init__(
        self,
        model: EnergyNet,
        compile: bool = True,
        graphs: bool | None = None,
        autocast_dtype: torch.dtype | None = None,
        notices: Notices | None = None,
    ) -> None:
        super().__init__(sync_step, "the EP step", compile, graphs, notices)
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.parameter_addresses: tuple[int, ...] = ()

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no cast cache: a cached weight cast would be a tensor captured from outside the graph
        return torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        neurons: list[Tensor],
        T: int,
        beta: float,
        track_grad: bool,
        safe_point: Callable[[], None] | None = None,
    ) -> list[Tensor] | None:
        """The states after ``T`` steps from ``neurons``, or ``None`` (with one notice) for a
        phase with an autograd graph, or asynchronous or stopped by a tolerance, which the
        engine then runs itself, eagerly in float32. ``safe_point``, when given, runs between
        steps."""
        if track_grad:
            self.notices.once(
                "track_grad",
                "a phase backpropagated through (BPTT) keeps its autograd graph, so it runs "
                "eagerly in float32 (not compiled, captured or in reduced precision)",
            )
            return None
        if self.model.dynamics != "sync" or self.model.tol is not None:
            return None  # said once by install; diagnostics switch dynamics for a moment
        dtype = neurons[0].dtype
        with self._autocast(x.device):
            input_drives = self.model.input_drives(x)
            if self.autocast_dtype is not None:
                x = x.to(self.autocast_dtype)
                input_drives = [drive.to(self.autocast_dtype) for drive in input_drives]
                neurons = [state.to(self.autocast_dtype) for state in neurons]
            graph = None
            if self._use_graphs(x.device):
                graph = self._graph_for(x, y, neurons, beta, input_drives)
            if graph is not None:
                neurons = graph.run(y, neurons, input_drives, T, safe_point)
            else:
                for step in range(T):
                    if safe_point is not None and step > 0:
                        safe_point()
                    neurons = self.function(self.model, y, neurons, beta, input_drives)
        return [state.to(dtype) for state in neurons]

    def _graph_for(self, x, y, neurons, beta, input_drives) -> StepGraph | None:
        """The capture of the step on ``x`` (B, ...), ``y`` (B,), ``neurons`` and ``input_drives``
        for these shapes and ``beta`` (made on first use), or ``None`` after a failed capture
        (one notice; the step then runs compiled, without graphs)."""
        addresses = tuple(p.data_ptr() for p in self.model.parameters())
        if addresses != self.parameter_addresses:  # moved parameters: old graphs read old ones
            self.captured.clear()
            self.parameter_addresses = addresses
        key = (beta, *(_layout(t) for t in (x, y, *input_drives, *neurons)))
        return self._graph(
            key,
            x.device,
            lambda pool: StepGraph(self.function, self.model, y, neurons, beta, input_drives, pool),
        )


class LCAGraph:
    """One LCA iteration captured on static buffers (drive, ``||D_f||^2``, states, scratch)."""

    def __init__(self, iterate: Callable, lca: LCAConv2D, drive: Tensor, pool) -> None:
        self.drive = drive.clone()
        self.self_overlap = lca.self_overlap()
        self.states = torch.zeros_like(drive)
        scratch = lca.scratch_for(drive)
        self.acts = scratch.acts
        weights = lca.weights

        def one_iteration() -> None:
            iterate(lca, self.drive, weights, self.self_overlap, self.states, scratch)

        self.replay = capture(one_iteration, drive.device, pool)

    def step(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """``LCAConv2D.settle_loop``'s step: one replay on the buffers (``states`` is them)."""
        self.replay()
        return self.states, self.acts

    def run(self, lca: LCAConv2D, drive: Tensor) -> tuple[Tensor, Tensor]:
        """``lca_iters`` iterations from ``u = 0``; fresh ``(states, acts)`` come back."""
        self.drive.copy_(drive)
        self.self_overlap.copy_(lca.self_overlap())
        states, acts = lca.settle_loop(self.states.zero_(), self.step)
        return states.clone(), acts.clone()


class CapturedLCA(Capturer):
    """Runs ``LCAConv2D``'s no-graph loop (installed as ``lca.settle_runner``); arguments as
    ``PhaseRunner``'s."""

    def __init__(
        self,
        lca: LCAConv2D,
        compile: bool = True,
        graphs: bool | None = None,
        notices: Notices | None = None,
    ) -> None:
        super().__init__(type(lca).iterate, "the LCA iteration", compile, graphs, notices)
        self.lca = lca

    def __call__(self, drive: Tensor) -> tuple[Tensor, Tensor]:
        lca = self.lca
        if self._use_graphs(drive.device):
            # what the graph bakes in: shapes, the weights' storage, and the settings read as
            # Python numbers (the step size 1 / tau and the threshold)
            transfer = (lca.tau, lca.lambda_, lca.nonneg, lca.transfer_func)
            key = (_layout(drive), lca.weights.data_ptr(), transfer)
            graph = self._graph(
                key, drive.device, lambda pool: LCAGraph(self.function, lca, drive, pool)
            )
            if graph is not None:
                return graph.run(lca, drive)
        step = lca.step_from(drive, lca.scratch_for(drive), self.function)
        return lca.settle_loop(torch.zeros_like(drive), step)


def install(
    model: EnergyNet,
    compile: bool,
    autocast_dtype: torch.dtype | None = None,
    graphs: bool | None = None,
) -> PhaseRunner | None:
    """The runner of ``model``'s phases as the flags ask (``compile`` for ``--compile``,
    ``autocast_dtype`` for ``--precision bf16``; ``graphs`` as ``PhaseRunner``'s), for the
    caller's ``dynamics.Phases``; and its LCA front end's encode, if any, hooked. None (and
    nothing hooked) without any. The runner and the hook share their notices."""
    notices = Notices()
    runner = None
    if compile or graphs or autocast_dtype is not None:
        runner = PhaseRunner(model, compile, graphs, autocast_dtype, notices)
        if model.dynamics != "sync" or model.tol is not None:
            notices.once(
                "dynamics",
                "--compile and --precision capture the synchronous phases of fixed length: "
                "with --dynamics async or --tol the phases run eagerly in float32",
            )
    lca = getattr(model, "lca", None)
    if (compile or graphs) and isinstance(lca, LCAConv2D):
        lca.settle_runner = CapturedLCA(lca, compile, graphs, notices)
    return runner


def uninstall(model: EnergyNet) -> None:
    """The LCA front end's encode back to its own loop (a runner is simply dropped)."""
    lca = getattr(model, "lca", None)
    if isinstance(lca, LCAConv2D):
        lca.settle_runner = None
