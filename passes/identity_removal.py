"""remove-identity: drop Identity nodes, keeping every graph output's name."""

from __future__ import annotations

from onnxmp.ir import Model, bypass, iter_graphs, remove_nodes
from onnxmp.pass_manager import Pass, PassContext, register


@register
class RemoveIdentity(Pass):
    """Remove Identity nodes; an Identity between two graph-level names stays."""

    name = "remove-identity"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        changed = False
        for graph in list(iter_graphs(model.graph)):
            removed = [
                node
                for node in list(graph.nodes)
                if node.op == "Identity"
                and node.domain in ("", None, "ai.onnx")
                and node.inputs
                and node.outputs
                and bypass(graph, node)
            ]
            changed |= remove_nodes(graph, removed) > 0
        return changed
