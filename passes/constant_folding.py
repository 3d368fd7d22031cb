"""fold-constants: evaluate subgraphs whose inputs are all constant and store the results.

Values are computed by onnxruntime on the very nodes being folded (optimizations off), falling
back to onnx's reference evaluator node by node, so folded values follow the operator specs.
Shape and Size of tensors with static shapes become constants, so shape computations fold too.
Never folded: random ops, Quantize/DequantizeLinear (a quantized weight stays quantized), ops with
subgraphs, ops outside the ai.onnx domain, and results larger than ``max_output_elements`` that
would grow the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxmp.ir import (
    Model,
    constant_value,
    graph_output_ids,
    is_omitted,
    iter_graphs,
    make_constant,
    remove_nodes,
    replace_all_uses,
    set_provenance,
    static_shape,
    subgraphs,
)
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.runtime import as_written_options
from onnxmp.shapes import infer_shapes

NEVER_FOLD = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}


@dataclass
class FoldConstantsOptions:
    max_output_elements: int = field(
        default=1 << 20,
        metadata={"help": "largest folded result (elements) allowed to exceed its inputs' size", "minimum": 0},
    )
    fold_shapes: bool = field(
        default=True, metadata={"help": "turn Shape and Size of statically shaped tensors into constants"}
    )


@register
class FoldConstants(Pass):
    """Replace constant subgraphs (and static shape computations) by their computed values."""

    name = "fold-constants"
    preserves_fp32 = True
    Options = FoldConstantsOptions

    def run(self, model: Model, ctx: PassContext) -> bool:
        changed = False
        if self.options.fold_shapes:
            measured = [n.inputs[0] for n in model.graph.nodes if n.op in ("Shape", "Size") and n.inputs]
            if any(t.shape is None or None in list(t.shape) for t in measured):
                infer_shapes(model)  # unknown ranks or dimensions; named (symbolic) ones stay open
            changed |= _fold_static_shapes(model.graph, ctx)
        for graph in list(iter_graphs(model.graph)):
            changed |= _fold_graph(graph, model, ctx, self.options.max_output_elements)
        return changed


# ------------------------------------------------------------------ shapes
def _fold_static_shapes(graph: gs.Graph, ctx: PassContext) -> bool:
    folded = []
    for node in graph.nodes:
        if node.op not in ("Shape", "Size") or node.domain not in ("", None, "ai.onnx"):
            continue
        shape = static_shape(node.inputs[0])
        if shape is None or not node.outputs:
            continue
        if node.op == "Size":
            value = np.array(int(np.prod(shape)), dtype=np.int64)
        else:
            start, end = _shape_slice(node, len(shape))
            value = np.array(shape[start:end], dtype=np.int64)
        if _replace_with_constant(graph, node.outputs[0], value, ctx):
            folded.append(node)
    return remove_nodes(graph, folded) > 0


def _shape_slice(node: gs.Node, rank: int) -> tuple[int, int]:
    """Shape's start/end attributes (opset 15), clamped as the spec says."""
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return start, end


# ------------------------------------------------------------------ constant subgraphs
def _fold_graph(graph: gs.Graph, model: Model, ctx: PassContext, max_elements: int) -> bool:
    foldable = _foldable_nodes(graph, max_elements)
    if not foldable:
        return False
    members = {id(n) for n in foldable}
    outputs = graph_output_ids(graph)
    frontier = []
    for node in foldable:
        for tensor in node.outputs:
            if id(tensor) in outputs or any(id(user) not in members for user in tensor.outputs):
                frontier.append(tensor)
    values = _evaluate(foldable, frontier, model)
    # A result of unknown size is kept only if no larger than the limit or the largest weight it
    # derives from; otherwise its producers stay in the graph and compute it at run time.
    ceiling = max(max_elements, _largest_constant_input(foldable))
    folded_any = False
    for tensor in frontier:
        value = values.get(tensor.name)
        if not isinstance(value, np.ndarray) or value.size > ceiling:  # sequences stay computed
            continue
        folded_any |= _replace_with_constant(graph, tensor, value, ctx)
    if not folded_any:
        return False
    # Folded nodes whose outputs nothing reads any more are dead; later ones first, so that
    # removing a node frees its producers.
    dead = []
    for node in reversed(foldable):
        if all(not t.outputs and id(t) not in outputs for t in node.outputs):
            node.inputs.clear()
            node.outputs.clear()
            dead.append(node)
    remove_nodes(graph, dead)
    return True


def _foldable_nodes(graph: gs.Graph, max_elements: int) -> list[gs.Node]:
    """Nodes, in order, whose every input is constant or produced by another foldable node."""
    constant_ids: set[int] = set()
    foldable = []
    for node in graph.nodes:
        if not _may_fold(node):
            continue
        inputs = [t for t in node.inputs if not is_omitted(t)]
        if not all(isinstance(t, gs.Constant) or id(t) in constant_ids for t in inputs):
            continue
        if _grows_too_much(node, inputs, max_elements):
            continue
        foldable.append(node)
        constant_ids.update(id(t) for t in node.outputs)
    return foldable


def _largest_constant_input(nodes: list[gs.Node]) -> int:
    sizes = [int(np.prod(t.shape)) for n in nodes for t in n.inputs if isinstance(t, gs.Constant)]
    return max(sizes, default=0)


def _may_fold(node: gs.Node) -> bool:
    return (
        node.domain in ("", None, "ai.onnx")
        and node.op not in NEVER_FOLD
        and not subgraphs(node)
        and len(node.outputs) > 0
    )


def _grows_too_much(node: gs.Node, inputs: list[gs.Tensor], max_elements: int) -> bool:
    produced = 0
    for tensor in node.outputs:
        shape = static_shape(tensor)
        if shape is None:
            return False  # unknown: decided after evaluation
        produced += int(np.prod(shape))
    consumed = sum(int(np.prod(t.shape)) for t in inputs if t.shape is not None and static_shape(t) is not None)
    return produced > max_elements and produced > consumed


def _replace_with_constant(graph: gs.Graph, tensor: gs.Tensor, value: np.ndarray, ctx: PassContext) -> bool:
    """Make ``tensor``'s readers read an initializer; a graph output gets a Constant node."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        return False
    maker = tensor.inputs[0]
    is_output = id(tensor) in graph_output_ids(graph)
    if is_output and maker.op == "Constant":
        return False  # already as folded as a graph output can be
    maker.outputs[list(maker.outputs).index(tensor)] = gs.Variable(ctx.fresh_name(f"{tensor.name}/folded"))
    if is_output:
        constant = make_constant(ctx.fresh_name(f"{tensor.name}/value"), value)
        node = gs.Node("Constant", ctx.fresh_name(f"{tensor.name}/fold-constants"), {"value": constant}, outputs=[tensor])
        set_provenance(node, FoldConstants.name)
        graph.nodes.append(node)
        tensor.dtype, tensor.shape = value.dtype, list(value.shape)
    else:
        replace_all_uses(tensor, make_constant(tensor.name, value))
    return True


# ------------------------------------------------------------------ evaluation
def _evaluate(nodes: list[gs.Node], wanted: list[gs.Tensor], model: Model) -> dict[str, np.ndarray]:
    """Values of ``wanted`` computed from ``nodes``: one onnxruntime run, else node by node."""
    try:
        return _run_onnxruntime(nodes, wanted, model)
    except Exception:  # any failure of the batch run: retry node by node to fold what we can
        return _evaluate_node_by_node(nodes, wanted, model)


def _evaluate_node_by_node(nodes: list[gs.Node], wanted: list[gs.Tensor], model: Model) -> dict[str, np.ndarray]:
    known: dict[int, np.ndarray] = {}
    for node in nodes:
        inputs = [t for t in node.inputs if not is_omitted(t)]
        values = [constant_value(t) if isinstance(t, gs.Constant) else known.get(id(t)) for t in inputs]
        if any(v is None for v in values):
            continue
        feeds = {t.name: make_constant(t.name, v) for t, v in zip(inputs, values)}
        results = _evaluate_single(node, feeds, model)
        if results is None:
            continue
        for tensor, value in zip(node.outputs, results):
            if isinstance(value, np.ndarray):
                known[id(tensor)] = value
    return {t.name: known[id(t)] for t in wanted if id(t) in known}


def _evaluate_single(node: gs.Node, feeds: dict[str, gs.Constant], model: Model) -> list | None:
    proto = _standalone_model([node], node.outputs, model, feeds)
    for runner in (_ort_outputs, _reference_outputs):
        try:
            return runner(proto)
        except Exception:  # an op or type one evaluator lacks: try the other
            continue
    return None


def _run_onnxruntime(nodes: list[gs.Node], wanted: list[gs.Tensor], model: Model) -> dict[str, np.ndarray]:
    proto = _standalone_model(nodes, wanted, model)
    values = _ort_outputs(proto)
    return {t.name: v for t, v in zip(wanted, values)}


def _standalone_model(
    nodes: list[gs.Node], wanted: list[gs.Tensor], model: Model, feeds: dict[str, gs.Constant] | None = None
) -> onnx.ModelProto:
    """A model with no inputs: the constants the nodes read as initializers, ``wanted`` as outputs."""
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for tensor in node.inputs:
            source = (feeds or {}).get(tensor.name, tensor)
            if isinstance(source, gs.Constant) and tensor.name not in initializers:
                initializers[tensor.name] = OnnxExporter.export_tensor_proto(source)
    graph = helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes],
        "fold",
        [],
        [helper.make_empty_tensor_value_info(t.name) for t in wanted],
        initializer=list(initializers.values()),
    )
    opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)


def _ort_outputs(proto: onnx.ModelProto) -> list:
    import onnxruntime as ort

    options = as_written_options(log_severity=4)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {})


def _reference_outputs(proto: onnx.ModelProto) -> list:
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(proto).run(None, {}))
