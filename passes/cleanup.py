"""cleanup: remove nodes whose outputs reach no graph output, and initializers nothing reads."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmp.ir import Model, iter_graphs
from onnxmp.pass_manager import Pass, PassContext, register


@register
class Cleanup(Pass):
    """Remove dead nodes and unused initializers, in the graph and its subgraphs."""

    name = "cleanup"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        before = _size(model)
        model.graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        return _size(model) != before


def _size(model: Model) -> tuple[int, int]:
    nodes = initializers = 0
    for graph in iter_graphs(model.graph):
        nodes += len(graph.nodes)
        initializers += sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
    return nodes, initializers
