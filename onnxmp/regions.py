"""Choosing low- and full-precision regions with the fewest, cheapest casts: a minimum s-t cut.

Each node that may change precision is a vertex; the source side (S) runs in low precision and
the sink side (T) in float32. Nodes that must be low precision are joined to S, nodes that must
stay float32 to T. A float tensor is a vertex joined to its producer and to each consumer whose
input follows the consumer's precision, with the cost of casting it on each edge: a cut edge is a
cast. A node that gains from low precision (less memory traffic) hangs from S by that gain, so it
stays float32 only where casts around it would cost more. Cutting one producer edge instead of
several consumer edges is one cast shared by all consumers, which the cut finds by itself.

The network splits into independent components once S and T are taken out, and each is solved on
its own with networkx; components that never reach T are all low precision without a flow run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable

import networkx as nx

S, T = "__low__", "__float32__"


class RegionProblem:
    """Vertices are hashable keys; ``S`` and ``T`` are the two terminals."""

    def __init__(self) -> None:
        self._edges: dict[tuple[Hashable, Hashable], float] = defaultdict(float)
        self._gain: dict[Hashable, float] = defaultdict(float)
        self._vertices: dict[Hashable, None] = {}

    def add_vertex(self, key: Hashable, gain: float = 0.0) -> None:
        """A node free to take either side; ``gain`` is what low precision saves on it."""
        self._vertices.setdefault(key, None)
        if gain:
            self._gain[key] += gain

    def connect(self, a: Hashable, b: Hashable, cost: float) -> None:
        """An undirected edge: ``cost`` is paid when ``a`` and ``b`` end on different sides."""
        if a == b or cost <= 0:
            return
        for key in (a, b):
            if key not in (S, T):
                self._vertices.setdefault(key, None)
        self._edges[(a, b) if str(a) <= str(b) else (b, a)] += cost

    def solve(self) -> set[Hashable]:
        """The vertices on the low-precision side of a minimum cut."""
        low: set[Hashable] = set()
        components = self._components()
        # Bucket the edges by component in one pass: filtering every edge per component is
        # quadratic in graph size (one component per few nodes).
        where = {key: index for index, members in enumerate(components) for key in members}
        buckets: list[list[tuple[Hashable, Hashable, float]]] = [[] for _ in components]
        for (a, b), cost in self._edges.items():
            index = where.get(a, where.get(b))
            if index is not None:
                buckets[index].append((a, b, cost))
        for component, edges in zip(components, buckets):
            low |= self._solve_component(component, edges)
        return low

    def _components(self) -> list[list[Hashable]]:
        neighbours: dict[Hashable, list[Hashable]] = defaultdict(list)
        for a, b in self._edges:
            if a not in (S, T) and b not in (S, T):
                neighbours[a].append(b)
                neighbours[b].append(a)
        seen: set[Hashable] = set()
        components = []
        for start in self._vertices:
            if start in seen:
                continue
            seen.add(start)
            stack, members = [start], []
            while stack:
                key = stack.pop()
                members.append(key)
                for other in neighbours[key]:
                    if other not in seen:
                        seen.add(other)
                        stack.append(other)
            components.append(members)
        return components

    def _solve_component(self, members: list[Hashable], edges: list[tuple[Hashable, Hashable, float]]) -> set[Hashable]:
        inside = set(members)
        if not any(T in (a, b) for a, b, _ in edges):
            return inside  # nothing pulls towards float32: no casts either way
        network = nx.DiGraph()
        network.add_node(S)
        network.add_node(T)
        for a, b, cost in edges:
            _add_capacity(network, a, b, cost)
            _add_capacity(network, b, a, cost)
        for key in members:
            if self._gain.get(key):
                _add_capacity(network, S, key, self._gain[key])
        _, (source_side, _) = nx.minimum_cut(network, S, T)
        return inside & source_side


def _add_capacity(network: nx.DiGraph, a: Hashable, b: Hashable, cost: float) -> None:
    if network.has_edge(a, b):
        network[a][b]["capacity"] += cost
    else:
        network.add_edge(a, b, capacity=cost)
