"""cleanup: remove nodes whose outputs reach no graph output, and with them the initializers
nothing reads any more (a graph's initializers are those its nodes read)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmp.ir import Model, iter_graphs, outer_scope_inputs, remove_nodes, subgraphs
from onnxmp.pass_manager import Pass, PassContext, register


@register
class Cleanup(Pass):
    """Remove dead nodes and unused initializers, in the graph and its subgraphs."""

    name = "cleanup"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        removed = 0
        for graph in list(iter_graphs(model.graph)):
            removed += remove_nodes(graph, _dead_nodes(graph))
        return removed > 0


def _dead_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Nodes from which no output of ``graph`` can be reached (one walk back from the outputs).

    A node that owns subgraphs keeps alive the outer tensors its subgraphs read.
    """
    producers = {id(t): node for node in graph.nodes for t in node.outputs}
    live: set[int] = set()
    stack = [producers[id(t)] for t in graph.outputs if id(t) in producers]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        reads = list(node.inputs) + (outer_scope_inputs(node) if subgraphs(node) else [])
        stack.extend(producers[id(t)] for t in reads if id(t) in producers)
    return [node for node in graph.nodes if id(node) not in live]
