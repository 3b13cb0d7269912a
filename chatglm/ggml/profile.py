"""Where a graph's compute time goes, op by op: each node of an allocated graph computed alone, timed.

The CPU backend has no per-node timer, so every node is run as a graph of its own (``ggml_graph_add_node`` into a
one-node graph over the same tensors) and timed; the cost of one compute call on a node that does nothing (a view,
which the CPU backend skips) is measured the same way and taken off each. Inputs and the KV cache are left as the
full graph's last run left them, so a profile is taken right after a real evaluation. Nodes are summed per op
(``ggml_op_desc``: unary ops by their own name); the total is compared with the full graph's own compute time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from chatglm.ggml.backend import Backend
from chatglm.ggml.ops import Graph, TensorStruct, api

EMPTY_OPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})  # the CPU backend skips them


@dataclass
class OpTime:
    op: str
    n_nodes: int = 0
    seconds: float = 0.0
    shapes: set = field(default_factory=set)


@dataclass
class Profile:
    ops: list[OpTime]  # slowest first
    call_overhead_s: float  # one compute call of a node that does nothing
    graph_s: float  # the whole graph computed at once (median)

    @property
    def total_s(self) -> float:
        return sum(o.seconds for o in self.ops)


def _one_node_graph(node: int) -> Graph:
    g = Graph(0, 1)
    api().graph_add_node(g.graph, node)
    return g


def _time(backend: Backend, g: Graph, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.compute(g)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile(backend: Backend, graph: Graph, repeats: int = 5) -> Profile:
    """Per-op compute time of ``graph`` (allocated, its inputs set)."""
    a = api()
    nodes = [a.graph_node(graph.graph, i) for i in range(graph.n_nodes)]
    graph_s = _time(backend, graph, repeats)
    names = [(a.op_desc(p) or b"?").decode() for p in nodes]
    empty = next((p for p, n in zip(nodes, names) if n in EMPTY_OPS), None)
    overhead = 0.0
    if empty is not None:
        with _one_node_graph(empty) as g:
            overhead = _time(backend, g, 4 * repeats)
    ops: dict[str, OpTime] = {}
    for ptr, name in zip(nodes, names):
        if name in EMPTY_OPS:
            continue
        with _one_node_graph(ptr) as g:
            seconds = max(0.0, _time(backend, g, repeats) - overhead)
        t = TensorStruct.from_address(ptr)
        entry = ops.setdefault(name, OpTime(name))
        entry.n_nodes += 1
        entry.seconds += seconds
        entry.shapes.add(tuple(int(n) for n in t.ne))
    return Profile(sorted(ops.values(), key=lambda o: -o.seconds), overhead, graph_s)


def table(p: Profile) -> str:
    """Markdown rows: op, nodes, ms, share of the per-node sum."""
    total = p.total_s or 1.0
    lines = ["| op | nodes | ms | share |", "|---|---:|---:|---:|"]
    for o in p.ops:
        lines.append(f"| {o.op} | {o.n_nodes} | {1e3 * o.seconds:.2f} | {100 * o.seconds / total:.1f}% |")
    lines.append(f"| sum of nodes | {sum(o.n_nodes for o in p.ops)} | {1e3 * p.total_s:.2f} | |")
    lines.append(f"| whole graph, one call | | {1e3 * p.graph_s:.2f} | |")
    return "\n".join(lines)
