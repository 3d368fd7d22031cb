"""cast-elimination: remove casts that change nothing and collapse cast chains.

- A Cast to the type its input already has is removed.
- In a chain ``Cast(Cast(x, B), C)`` where B holds every value of x's type A exactly, the second
  cast reads ``x`` directly; when C is A (a lossless round trip) the cast then disappears.
Lossy steps (float32 -> float16 -> float32, float -> int) are kept: they change values.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx import TensorProto as T

from onnxmp.ir import Model, bypass, elem_type, graph_output_ids, iter_graphs, producer, remove_nodes
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.shapes import infer_shapes_for

_FLOATS_FROM_8BIT = {T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE}
_NUMERIC = {
    T.FLOAT, T.UINT8, T.INT8, T.UINT16, T.INT16, T.INT32, T.INT64, T.FLOAT16, T.DOUBLE,
    T.UINT32, T.UINT64, T.BFLOAT16,
}  # fmt: skip

# source type -> types that represent every value of the source exactly
LOSSLESS: dict[int, set[int]] = {
    T.BOOL: _NUMERIC,
    T.FLOAT16: {T.FLOAT, T.DOUBLE},
    T.BFLOAT16: {T.FLOAT, T.DOUBLE},
    T.FLOAT: {T.DOUBLE},
    T.INT8: {T.INT16, T.INT32, T.INT64} | _FLOATS_FROM_8BIT,
    T.UINT8: {T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64} | _FLOATS_FROM_8BIT,
    T.INT16: {T.INT32, T.INT64, T.FLOAT, T.DOUBLE},
    T.UINT16: {T.INT32, T.UINT32, T.INT64, T.UINT64, T.FLOAT, T.DOUBLE},
    T.INT32: {T.INT64, T.DOUBLE},
    T.UINT32: {T.INT64, T.UINT64, T.DOUBLE},
    T.FLOAT8E4M3FN: {T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.FLOAT8E5M2: {T.FLOAT16, T.FLOAT, T.DOUBLE},
}


def is_lossless(source: int | None, target: int | None) -> bool:
    """True when casting ``source`` to ``target`` keeps every value exactly."""
    return source is not None and target is not None and (source == target or target in LOSSLESS.get(source, ()))


@register
class CastElimination(Pass):
    """Remove same-type casts and lossless round trips; collapse cast chains into one cast."""

    name = "cast-elimination"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        casts = [n for g in iter_graphs(model.graph) for n in g.nodes if _is_cast(n) and n.inputs]
        if not casts:
            return False
        infer_shapes_for(model, [n.inputs[0] for n in casts])  # input types decide what is lossless
        changed = False
        for graph in list(iter_graphs(model.graph)):
            changed |= _eliminate(graph)
        return changed


def _is_cast(node: gs.Node | None) -> bool:
    return node is not None and node.op == "Cast" and node.domain in ("", None, "ai.onnx")


def _eliminate(graph: gs.Graph) -> bool:
    local = {id(n) for n in graph.nodes}
    outputs = graph_output_ids(graph)
    changed = False
    removed = []
    for node in list(graph.nodes):
        if not _is_cast(node) or not node.inputs:
            continue
        first = producer(node.inputs[0])
        if _is_cast(first) and id(first) in local:
            origin = first.inputs[0]
            if is_lossless(elem_type(origin), first.attrs.get("to")):
                node.inputs[0] = origin
                changed = True
                if not first.outputs[0].outputs and id(first.outputs[0]) not in outputs:
                    first.inputs.clear()  # the skipped cast fed only this one
                    first.outputs.clear()
                    removed.append(first)
        if elem_type(node.inputs[0]) == node.attrs.get("to") and bypass(graph, node):
            removed.append(node)
    if removed:
        remove_nodes(graph, removed)
    return changed or bool(removed)
