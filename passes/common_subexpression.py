"""eliminate-common-subexpressions: compute each repeated expression once.

Exporters repeat work. torch writes a Shape -> Gather -> Unsqueeze chain for every use of a
dimension, and transformers 5 builds the same padding mask again in every layer. Two nodes
compute the same values when they have the same op, domain, attributes and number of outputs
and read the same tensors; two small constants with equal dtype, shape and bytes count as the
same tensor. The later node goes and its readers read the earlier one's outputs, so the graph
stays in topological order. This matters beyond file size: fusions see one tensor where there
was one value (fuse-attention builds one attention bias for all the layers that read one mask).

Outputs are bit-identical: ONNX operators are functions of their inputs and attributes. The
exceptions are never merged: the random ops (each draws its own values), Dropout (random when
training), ops outside the standard domain (a custom op may keep state), nodes that own
subgraphs (comparing bodies is not worth it) and nodes whose output is a graph output (its name
must stay).
"""

from __future__ import annotations

import struct

import numpy as np
import onnx_graphsurgeon as gs

from onnxmp.ir import Model, graph_output_ids, iter_graphs, remove_nodes, replace_all_uses, subgraphs
from onnxmp.pass_manager import Pass, PassContext, register

RANDOM_OPS = frozenset({
    "Bernoulli", "Dropout", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
})
STANDARD_DOMAINS = ("", "ai.onnx")
MAX_CONSTANT_ELEMENTS = 4096  # larger constants are compared by identity, not value


@register
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same values from the same inputs."""

    name = "eliminate-common-subexpressions"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        removed = 0
        for graph in list(iter_graphs(model.graph)):
            removed += remove_nodes(graph, _merge_duplicates(graph))
        return removed > 0


def _merge_duplicates(graph: gs.Graph) -> list[gs.Node]:
    """Rewire the readers of every repeated node to its first occurrence; returns the repeats."""
    outputs = graph_output_ids(graph)
    first: dict[tuple, gs.Node] = {}
    repeats = []
    for node in graph.nodes:
        if not _mergeable(node):
            continue
        key = _node_key(node)
        if key is None:
            continue
        kept = first.setdefault(key, node)
        if kept is node or any(id(t) in outputs for t in node.outputs):
            continue
        for old, new in zip(node.outputs, kept.outputs):
            replace_all_uses(old, new)
        repeats.append(node)
    return repeats


def _mergeable(node: gs.Node) -> bool:
    standard = node.domain is None or node.domain in STANDARD_DOMAINS
    return standard and node.op not in RANDOM_OPS and not subgraphs(node)


def _node_key(node: gs.Node) -> tuple | None:
    """What the node computes: op, attributes, inputs and which outputs exist; None if an
    attribute cannot be compared."""
    attrs = []
    for name in sorted(node.attrs):
        value = _value_key(node.attrs[name])
        if value is None:
            return None
        attrs.append((name, value))
    inputs = tuple(_tensor_key(t) for t in node.inputs)
    present = tuple(bool(t.name) for t in node.outputs)
    return (node.op, node.domain or "", tuple(attrs), inputs, present)


def _tensor_key(tensor: gs.Tensor) -> tuple:
    if not tensor.name:
        return ("omitted",)
    if isinstance(tensor, gs.Constant):
        key = _array_key(tensor)
        if key is not None:
            return key
    return ("tensor", id(tensor))


def _array_key(tensor: gs.Constant | np.ndarray) -> tuple | None:
    shape = tensor.shape
    if shape is None or int(np.prod(shape)) > MAX_CONSTANT_ELEMENTS:
        return None
    values = np.asarray(tensor if isinstance(tensor, np.ndarray) else tensor.values)
    return ("array", values.dtype.str, values.shape, values.tobytes())


def _value_key(value: object) -> object | None:
    """A hashable, exact stand-in for an attribute value; None for a graph or a large tensor."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))  # -0.0 and NaN compare by their bits
    if isinstance(value, (int, str, bytes)) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        items = tuple(_value_key(v) for v in value)
        return None if any(i is None for i in items) else ("list", items)
    if isinstance(value, (gs.Constant, np.ndarray)):
        return _array_key(value)
    return None
