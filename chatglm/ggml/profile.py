"""Where a graph's compute time goes, op by op: each node of an allocated graph computed alone, timed.

The CPU backend has no per-node timer, so every node is run as a graph of its own (``ggml_graph_add_node`` into a
one-node graph over the same tensors), in the graph's order, and timed; the cost of one compute call on a node that
does nothing (a view, which the CPU backend skips) is measured the same way and taken off each. ggml-alloc lets
later nodes reuse the memory of inputs already consumed, so each pass starts with ``set_inputs`` and runs every node
in order, as the whole graph does. Nodes are summed per op (``ggml_op_desc``: unary ops by their own name, matrix products by
the type of their first operand); the sum is printed beside the whole graph's own compute time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from chatglm.ggml.backend import Backend
from chatglm.ggml.ops import Graph, TensorStruct, api, type_name

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


def _label(node: int) -> str:
    """The op's name; a matrix product also by its first operand's type (weights apart from the f16 cache)."""
    name = (api().op_desc(node) or b"?").decode()
    if name != "MUL_MAT":
        return name
    return f"{name} {type_name(TensorStruct.from_address(TensorStruct.from_address(node).src[0]).type)}"


def _one_node_graph(node: int) -> Graph:
    g = Graph(0, 1)
    api().graph_add_node(g.graph, node)
    return g


def _timed(backend: Backend, g: Graph) -> float:
    start = time.perf_counter()
    backend.compute(g)
    return time.perf_counter() - start


def profile(backend: Backend, graph: Graph, set_inputs: Callable[[], None], repeats: int = 5) -> Profile:
    """Per-op compute time of ``graph`` (allocated); ``set_inputs`` fills its inputs before every pass."""
    a = api()
    nodes = [a.graph_node(graph.graph, i) for i in range(graph.n_nodes)]
    names = [_label(p) for p in nodes]
    whole = []
    for _ in range(repeats):
        set_inputs()
        whole.append(_timed(backend, graph))
    singles = [g for g in (_one_node_graph(p) for p, n in zip(nodes, names) if n not in EMPTY_OPS)]
    try:
        empty = next((p for p, n in zip(nodes, names) if n in EMPTY_OPS), None)
        overhead = 0.0
        if empty is not None:
            with _one_node_graph(empty) as g:
                overhead = statistics.median(_timed(backend, g) for _ in range(8 * repeats))
        passes = []
        for _ in range(repeats):
            set_inputs()
            passes.append([_timed(backend, g) for g in singles])
        per_node = [max(0.0, statistics.median(column) - overhead) for column in zip(*passes)]
    finally:
        for g in singles:
            g.close()
    ops: dict[str, OpTime] = {}
    for ptr, name, seconds in zip([p for p, n in zip(nodes, names) if n not in EMPTY_OPS],
                                  [n for n in names if n not in EMPTY_OPS], per_node):
        entry = ops.setdefault(name, OpTime(name))
        entry.n_nodes += 1
        entry.seconds += seconds
        entry.shapes.add(tuple(int(n) for n in TensorStruct.from_address(ptr).ne))
    return Profile(sorted(ops.values(), key=lambda o: -o.seconds), overhead, statistics.median(whole))


def table(p: Profile) -> str:
    """Markdown rows: op, nodes, ms, share of the per-node sum."""
    total = p.total_s or 1.0
    lines = ["| op | nodes | ms | share |", "|---|---:|---:|---:|"]
    for o in p.ops:
        lines.append(f"| {o.op} | {o.n_nodes} | {1e3 * o.seconds:.2f} | {100 * o.seconds / total:.1f}% |")
    lines.append(f"| sum of nodes | {sum(o.n_nodes for o in p.ops)} | {1e3 * p.total_s:.2f} | |")
    lines.append(f"| whole graph, one call | | {1e3 * p.graph_s:.2f} | |")
    return "\n".join(lines)
