"""The graph of an energy-based network: its layers, the couplings between them, and a colouring.

Layers are nodes ``s_0 .. s_{L-1}`` (list indices, each with a per-sample shape); the fixed input
``x`` is the source ``INPUT`` and never a node. A coupling is an edge ``e = (source, target)``
from ``x`` or a layer to a layer; the model pairs edge ``e`` with its link ``F_e`` (``links``),
which adds ``<F_e(s_source), s_target>`` to ``Phi``. The graph keeps, per layer, the edges that
arrive (``incoming``) and leave (``outgoing``) in the order they were added, built once as the
edges come, so every sum over edges adds its terms in that order::

    dPhi/ds_k = b_k + sum_{e in incoming(k)} F_e(s_source(e))
                    + sum_{e in outgoing(k)} F_e^T(s_target(e))

A chain ``x -> s_0 -> s_1 -> ...`` is the graph with the edges ``(k - 1, k)``.

``colouring`` splits the layers into groups in which no two layers share an edge, for the
asynchronous dynamics (``dynamics``): every layer of a group is then updated from states the
group's update leaves alone. A graph whose layers split in two (bipartite: a chain, any graph
without odd cycles) gets two groups, the one holding layer 0 first, so a chain gets its odd
layers ``s_0, s_2, ...`` (1-based ``s_1, s_3, ...``), then the even ones. Any other graph (a
triangle ``u -> a -> b`` with the skip ``u -> b``) gets the greedy colouring in layer order, at
least three groups.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT = -1  # the source index of the fixed input x


@dataclass(frozen=True)
class Layer:
    """A node: per-sample ``shape`` ((C, H, W) map or (N,) vector), ``feedback_scale`` ``g``
    on the sum of the adjoints it receives (1: the energy gradient), and whether it has a bias
    ``b_k`` of its own (one per channel of a map, one per unit of a vector)."""

    shape: tuple[int, ...]
    feedback_scale: float = 1.0
    bias: bool = False


@dataclass(frozen=True)
class Edge:
    """A coupling from ``source`` (``INPUT`` or a layer index) to the layer ``target``."""

    source: int
    target: int


class Graph:
    """Layers and edges, with each layer's incoming and outgoing edge indices."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.edges: list[Edge] = []
        self.incoming: list[list[int]] = []
        self.outgoing: list[list[int]] = []
        self.input_edges: list[int] = []

    def add_layer(self, layer: Layer) -> int:
        """Append ``layer``; returns its index."""
        self.layers.append(layer)
        self.incoming.append([])
        self.outgoing.append([])
        return len(self.layers) - 1

    def add_edge(self, source: int, target: int) -> int:
        """Append the edge ``source -> target``; returns its index."""
        if not 0 <= target < len(self.layers):
            raise ValueError(f"an edge must end at a layer, got target {target}")
        if source != INPUT and not 0 <= source < len(self.layers):
            raise ValueError(f"an edge starts at the input or a layer, got source {source}")
        if source == target:
            raise ValueError(f"layer {target} cannot couple to itself")
        index = len(self.edges)
        self.edges.append(Edge(source, target))
        self.incoming[target].append(index)
        if source == INPUT:
            self.input_edges.append(index)
        else:
            self.outgoing[source].append(index)
        return index

    def __len__(self) -> int:
        return len(self.layers)

    def neighbours(self, k: int) -> set[int]:
        """The layers that share an edge with layer ``k`` (the input is not a layer)."""
        sources = {self.edges[e].source for e in self.incoming[k]} - {INPUT}
        return sources | {self.edges[e].target for e in self.outgoing[k]}

    def colouring(self) -> list[list[int]]:
        """Groups of layers (each in increasing order) with no edge inside a group: the
        two-colouring when the layer graph has one (the group of layer 0 first), else greedy."""
        return _two_colouring(self) or _greedy_colouring(self)


def _two_colouring(graph: Graph) -> list[list[int]] | None:
    """Colour 0 for layer 0, then alternate along edges (breadth first, each component from its
    lowest layer); None if an edge joins two layers of one colour (an odd cycle)."""
    colour: dict[int, int] = {}
    for start in range(len(graph)):
        if start in colour:
            continue
        colour[start] = 0
        frontier = [start]
        while frontier:
            k = frontier.pop(0)
            for other in sorted(graph.neighbours(k)):
                if other not in colour:
                    colour[other] = 1 - colour[k]
                    frontier.append(other)
                elif colour[other] == colour[k]:
                    return None
    groups = [[k for k in range(len(graph)) if colour[k] == c] for c in (0, 1)]
    return [group for group in groups if group]


def _greedy_colouring(graph: Graph) -> list[list[int]]:
    """Each layer, in increasing order, takes the lowest colour none of its neighbours has."""
    colour: dict[int, int] = {}
    for k in range(len(graph)):
        taken = {colour[other] for other in graph.neighbours(k) if other in colour}
        colour[k] = min(c for c in range(len(graph) + 1) if c not in taken)
    count = max(colour.values(), default=-1) + 1
    return [[k for k in range(len(graph)) if colour[k] == c] for c in range(count)]


def is_independent(graph: Graph, group: list[int]) -> bool:
    """Whether no edge joins two layers of ``group``."""
    members = set(group)
    return all(not (graph.neighbours(k) & members) for k in group)


__all__ = ["INPUT", "Edge", "Graph", "Layer", "is_independent"]
