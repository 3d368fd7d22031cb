"""precision: lower float32 computation to float16 or bfloat16, node by node, by rules.

A node stays float32 when a rule says so, and the report names the rule:
- ``keep-op-type``: its op type is in ``keep_op_types`` (numerically sensitive ops by default);
- ``keep-node-pattern``: its name matches a regular expression of ``keep_node_patterns``;
- ``no-kernel``: onnxruntime has no kernel of that type for it on the policy's target;
- ``schema``: its operator schema does not allow the type for its float inputs;
- ``range-overflow`` / ``range-underflow``: calibration saw values beyond ``overflow_threshold`` of
  the type's largest value, or mostly below its smallest normal value; ``initializer-range`` the
  same for its constant inputs (values of 1e30 and beyond stand for infinity and saturate instead);
- ``long-reduction``: a reduction over more than ``max_reduction_elements`` elements;
- ``subgraph``: it owns If/Loop/Scan bodies, whose interface stays float32;
- ``placement``: lowering it would cost more in casts than it saves.
Every other node runs in the low type. Where the two regions meet, the minimum cut of
``onnxmp.regions`` places the casts; constant inputs are converted once instead of cast, and with
``keep_io_types`` the model's inputs and outputs stay float32 under their original names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxmp.errors import PolicyError
from onnxmp.ir import Model, elem_type, is_omitted, set_provenance, subgraphs
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.policy import compile_patterns
from onnxmp.regions import S, T, RegionProblem
from onnxmp.shapes import infer_shapes
from onnxmp.type_constraints import CONTRIB_SIGNATURES, FLOAT32, NodeTyping, is_float32_tensor, node_typing

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
LOW_NAMES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
LIMITS = {  # largest finite value, smallest normal value
    TensorProto.FLOAT16: (65504.0, 2.0**-14),
    TensorProto.BFLOAT16: (3.3895e38, 2.0**-126),
}
RANDOM_AND_TYPED = ["Bernoulli", "EyeLike", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"]
DEFAULT_KEEP = {
    "fp16": sorted(
        ["Pow", "Exp", "Log", "LogSoftmax", "CumSum", "Range", "ReduceProd", "ReduceSumSquare", "ReduceL2",
         "ReduceLogSum", "ReduceLogSumExp", "NonMaxSuppression", "RoiAlign", "Det"] + RANDOM_AND_TYPED
    ),
    "bf16": sorted(
        ["CumSum", "Range", "ReduceProd", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
         "ReduceLogSum", "ReduceLogSumExp", "NonMaxSuppression", "RoiAlign", "Det"] + RANDOM_AND_TYPED
    ),
}  # fmt: skip
REDUCTIONS = {"ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd"}
# Compute-bound ops: low precision is always worth its casts (tensor cores, halved weights).
HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "LSTM", "GRU", "RNN", "Attention"}
CAST_COST, CAST_OVERHEAD, TRAFFIC_GAIN = 6.0, 64.0, 2.0  # bytes moved per element; per-cast launch
UNKNOWN_ELEMENTS = 1024
# Inputs that are only added to the result (biases, shifts): one too small for the low type changes
# the sum by less than the sum's own rounding, so their underflow does not matter. None: all inputs.
ADDITIVE_INPUTS: dict[str, set[int] | None] = {
    "Add": None, "Sub": None, "Sum": None,
    "Conv": {2}, "ConvTranspose": {2}, "Gemm": {2}, "LayerNormalization": {2},
    "BiasGelu": {1}, "FastGelu": {1}, "Attention": {2}, "MultiHeadAttention": {3},
    "SkipLayerNormalization": {1, 3, 4}, "SkipSimplifiedLayerNormalization": {1, 3},
}  # fmt: skip
# Constants this large (float32's max, 1e30, ...) stand for infinity: attention-mask fill values,
# open clip bounds, reduction seeds. Converted, they saturate to the low type's largest finite value
# instead of keeping their node float32 or becoming inf: -65504 masks as well as -3.4e38 does, while
# -inf would turn a fully masked softmax row into NaN where float32 gives a finite result.
INFINITY_STAND_IN = 1e30
CPU_NO_LOW_REDUCTION = {"ScatterElements", "ScatterND"}  # onnxruntime CPU: no float16 path with a reduction


@dataclass
class PrecisionOptions:
    dtype: Literal["fp16", "bf16"] = field(default="fp16", metadata={"help": "the low precision type"})
    keep_io_types: bool = field(default=True, metadata={"help": "keep model inputs and outputs float32"})
    keep_op_types: list[str] | None = field(
        default=None, metadata={"help": "op types that stay float32 (null: the defaults for dtype)"}
    )
    keep_node_patterns: list[str] = field(
        default_factory=list, metadata={"help": "regular expressions; matching node names stay float32"}
    )
    overflow_threshold: float = field(
        default=0.5, metadata={"help": "fraction of the type's max value above which a node stays float32", "minimum": 0}
    )
    underflow_threshold: float = field(
        default=0.5, metadata={"help": "fraction of nonzero values below the smallest normal that keeps a node float32", "minimum": 0}
    )
    max_reduction_elements: int = field(
        default=4096, metadata={"help": "reductions over more elements stay float32", "minimum": 1}
    )
    respect_kernels: bool = field(
        default=True, metadata={"help": "keep float32 where the target's onnxruntime has no kernel for the type"}
    )


@register
class Precision(Pass):
    """Lower float32 nodes to float16 or bfloat16 by rules, with casts placed by a minimum cut."""

    name = "precision"
    preserves_fp32 = False
    Options = PrecisionOptions

    def __init__(self, options: PrecisionOptions | None = None):
        super().__init__(options)
        self.low = LOW_TYPES[self.options.dtype]
        self.keep_ops = set(self.options.keep_op_types if self.options.keep_op_types is not None else DEFAULT_KEEP[self.options.dtype])
        unknown = sorted(op for op in self.keep_ops if not _known_op(op))
        if unknown:
            raise PolicyError(f"keep_op_types: unknown op type(s) {unknown}; use ONNX op names such as 'Softmax'")
        self.patterns = compile_patterns(self.options.keep_node_patterns, "keep_node_patterns")

    def run(self, model: Model, ctx: PassContext) -> bool:
        infer_shapes(model)
        stats = ctx.calibration.statistics(model.to_proto()) if ctx.calibration is not None else {}
        graph = model.graph
        typings = {id(n): node_typing(n, model.opset(), self.low) for n in graph.nodes}
        forced = {id(n): self._keep_reason(n, typings[id(n)], model, ctx.target, stats) for n in graph.nodes}
        low_nodes = self._place(graph, typings, forced)
        for node in graph.nodes:
            precision = LOW_NAMES[self.low] if id(node) in low_nodes else "float32"
            if typings[id(node)].convertible or forced[id(node)]:
                rule = forced[id(node)] or ("lowered" if id(node) in low_nodes else "placement")
                ctx.record(node=node.name, op=node.op, precision=precision, rule=rule)
        if not low_nodes:
            return False
        _Retyper(model, ctx, self.low, typings, low_nodes, self.options.keep_io_types).apply()
        return True

    # ---------------------------------------------------------------- rules
    def _keep_reason(self, node: gs.Node, typing: NodeTyping, model: Model, target: str, stats: dict) -> str:
        if subgraphs(node):
            return "subgraph"
        if not typing.convertible:
            return f"schema: {typing.reason}" if typing.reason else ""
        if node.op in self.keep_ops:
            return "keep-op-type"
        for pattern in self.patterns:
            if pattern.search(node.name):
                return f"keep-node-pattern: {pattern.pattern}"
        if self.options.respect_kernels and _no_kernel(node, model.opset(), target, self.low):
            return f"no-kernel: onnxruntime {target} has no {LOW_NAMES[self.low]} {node.op}"
        if node.op in REDUCTIONS:
            reduced = _reduced_elements(node)
            if reduced is None or reduced > self.options.max_reduction_elements:
                return f"long-reduction: {reduced if reduced is not None else 'unknown number of'} elements"
        return self._range_reason(node, typing, stats)

    def _range_reason(self, node: gs.Node, typing: NodeTyping, stats: dict) -> str:
        largest, smallest = LIMITS[self.low]
        # Underflow of an input matters only where it scales the result, not where it is added.
        additive = ADDITIVE_INPUTS.get(node.op, set())
        for index in typing.inputs:
            tensor = node.inputs[index]
            inputs_may_underflow = additive is not None and index not in additive
            if isinstance(tensor, gs.Constant):
                values = np.abs(np.asarray(tensor.values, dtype=np.float64))
                values = values[np.isfinite(values)]  # the low types hold inf and NaN exactly (-inf masks)
                values = values[values < INFINITY_STAND_IN]  # converted saturated, see INFINITY_STAND_IN
                nonzero = values[values > 0]
                if values.size and values.max() > largest:
                    return f"initializer-range: {tensor.name} reaches {values.max():.3g}"
                if inputs_may_underflow and nonzero.size and np.mean(nonzero < smallest) > self.options.underflow_threshold:
                    return f"initializer-range: {tensor.name} mostly below {smallest:.3g}"
        observed = [(node.inputs[i], additive is not None and i not in additive) for i in typing.inputs]
        observed += [(node.outputs[i], True) for i in typing.outputs]
        for tensor, check_underflow in observed:
            seen = stats.get(tensor.name)
            if seen is None:
                continue
            if seen.absmax > self.options.overflow_threshold * largest:
                return f"range-overflow: {tensor.name} reaches {seen.absmax:.3g}"
            if check_underflow and seen.underflow_fraction > self.options.underflow_threshold:
                return f"range-underflow: {seen.underflow_fraction:.0%} of {tensor.name} below {smallest:.3g}"
        return ""

    # ---------------------------------------------------------------- placement
    def _place(self, graph: gs.Graph, typings: dict, forced: dict) -> set[int]:
        """Ids of the nodes that run in low precision."""
        problem = RegionProblem()
        keys = {id(n): ("node", index) for index, n in enumerate(graph.nodes)}
        for node in graph.nodes:
            typing = typings[id(node)]
            if forced[id(node)] or not typing.convertible:
                keys[id(node)] = T
            elif node.op in HEAVY:
                keys[id(node)] = S
            else:
                problem.add_vertex(keys[id(node)], gain=_traffic_gain(node, typing))
        io_side = T if self.options.keep_io_types else S
        members = {id(n) for n in graph.nodes}
        outputs = {id(t) for t in graph.outputs}
        for tensor in _float32_tensors(graph):
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is None:
                start = io_side  # graph input
            elif id(producer) in members and list(producer.outputs).index(tensor) in typings[id(producer)].outputs:
                start = keys[id(producer)]
            else:
                start = T  # an output with a fixed float32 type
            vertex = ("tensor", tensor.name)
            cost = CAST_COST * _elements(tensor) + CAST_OVERHEAD
            problem.connect(start, vertex, cost)
            for user in tensor.outputs:
                for side in _consumer_sides(user, tensor, typings, keys, members):
                    problem.connect(vertex, side, cost)
            if id(tensor) in outputs:
                problem.connect(vertex, io_side, cost)
        low = problem.solve()
        return {id(n) for n in graph.nodes if keys[id(n)] == S or keys[id(n)] in low}


def _consumer_sides(user: gs.Node, tensor: gs.Tensor, typings: dict, keys: dict, members: set) -> set:
    """Where a read of ``tensor`` pulls: the reader's own side if the input follows its
    precision, float32 for every other read (fixed-type inputs, float32 nodes, subgraphs)."""
    if id(user) not in members:
        return {T}
    typing = typings[id(user)]
    sides = set()
    for index, read in enumerate(user.inputs):
        if read is tensor:
            follows = index in typing.inputs and keys[id(user)] != T
            sides.add(keys[id(user)] if follows else T)
    return sides


def _float32_tensors(graph: gs.Graph) -> list[gs.Variable]:
    seen: dict[str, gs.Variable] = {}
    for tensor in graph.inputs:
        if is_float32_tensor(tensor):
            seen[tensor.name] = tensor
    for node in graph.nodes:
        for tensor in node.outputs:
            if is_float32_tensor(tensor) and tensor.name:
                seen[tensor.name] = tensor
    return list(seen.values())


def _elements(tensor: gs.Tensor) -> int:
    if tensor.shape is None:
        return UNKNOWN_ELEMENTS
    count = 1
    for dim in tensor.shape:
        count *= dim if isinstance(dim, (int, np.integer)) and dim > 0 else 1
    return count


def _traffic_gain(node: gs.Node, typing: NodeTyping) -> float:
    moved = sum(_elements(node.inputs[i]) for i in typing.inputs if not isinstance(node.inputs[i], gs.Constant))
    moved += sum(_elements(node.outputs[i]) for i in typing.outputs)
    return TRAFFIC_GAIN * moved


def _reduced_elements(node: gs.Node) -> int | None:
    shape = node.inputs[0].shape
    if shape is None:
        return None
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values.tolist()
    if axes is None or len(axes) == 0:
        if node.attrs.get("noop_with_empty_axes", 0):
            return 1
        axes = range(len(shape))
    count = 1
    for axis in axes:
        dim = shape[axis]
        if not isinstance(dim, (int, np.integer)):
            return None
        count *= int(dim)
    return count


def _known_op(op_type: str) -> bool:
    import onnx

    known = any(onnx.defs.has(op_type, domain) for domain in ("", "com.microsoft", "ai.onnx.ml"))
    return known or any(name == op_type for _, name in CONTRIB_SIGNATURES)


def _no_kernel(node: gs.Node, opset: int, target: str, low: int) -> bool:
    from onnxmp.kernels import kernel_supports

    domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
    if node.op in ("Constant", "Cast", "ConstantOfShape") and not domain:
        return False
    if target == "cpu" and node.op in CPU_NO_LOW_REDUCTION and not domain and node.attrs.get("reduction", "none") != "none":
        return True  # registered for every type, but its CPU kernel refuses float16 reductions at run time
    return kernel_supports(target, node.op, domain or "ai.onnx", opset, LOW_NAMES[low]) is False


class _Retyper:
    """Rewrites the graph for a chosen set of low-precision nodes: types, constants, casts."""

    def __init__(self, model: Model, ctx: PassContext, low: int, typings: dict, low_nodes: set[int], keep_io: bool):
        self.model, self.ctx, self.low = model, ctx, low
        self.graph = model.graph
        self.typings, self.low_nodes, self.keep_io = typings, low_nodes, keep_io
        self.low_dtype = helper.tensor_dtype_to_np_dtype(low)
        self.casts: dict[tuple[str, int], gs.Variable] = {}
        # By identity, not name: attribute tensors (ConstantOfShape's value) are often unnamed, so
        # names would mix up their values. The original is kept so that its id is not reused.
        self.converted: dict[int, tuple[gs.Constant, gs.Constant]] = {}
        self.members = {id(n) for n in self.graph.nodes}

    def apply(self) -> None:
        self.original = {t.name: FLOAT32 for t in _float32_tensors(self.graph)}
        if not self.keep_io:
            for tensor in self.graph.inputs:
                if is_float32_tensor(tensor):
                    tensor.dtype = self.low_dtype
        for node in self.graph.nodes:
            if id(node) in self.low_nodes:
                self._lower_node(node)
        for node in list(self.graph.nodes):
            if id(node) in self.members:
                self._fix_inputs(node)
        self._fix_outer_scope_reads()
        self._fix_outputs()

    def _lower_node(self, node: gs.Node) -> None:
        typing = self.typings[id(node)]
        for index in typing.outputs:
            node.outputs[index].dtype = self.low_dtype
        if typing.attribute == "to":
            node.attrs["to"] = self.low
        elif typing.attribute == "value":
            node.attrs["value"] = self._convert_constant(node.attrs["value"])

    def _required(self, node: gs.Node, index: int, tensor: gs.Tensor) -> int | None:
        """The type input ``index`` must have: low where it follows a lowered node, else as before."""
        if id(node) in self.low_nodes and index in self.typings[id(node)].inputs:
            return self.low
        return self.original.get(tensor.name)

    def _fix_inputs(self, node: gs.Node) -> None:
        for index, tensor in enumerate(list(node.inputs)):
            if is_omitted(tensor):
                continue
            wanted = self._required(node, index, tensor)
            if wanted is None or elem_type(tensor) == wanted:
                continue
            node.inputs[index] = self._as_type(tensor, wanted)

    def _as_type(self, tensor: gs.Tensor, wanted: int) -> gs.Tensor:
        if isinstance(tensor, gs.Constant):
            return self._convert_constant(tensor) if wanted == self.low else tensor
        key = (tensor.name, wanted)
        if key not in self.casts:
            suffix = LOW_NAMES.get(wanted, "float32")
            out = gs.Variable(self.ctx.fresh_name(f"{tensor.name}/{suffix}"), dtype=helper.tensor_dtype_to_np_dtype(wanted), shape=tensor.shape)
            cast = gs.Node("Cast", self.ctx.fresh_name(f"{tensor.name}/cast_{suffix}"), {"to": wanted}, [tensor], [out])
            set_provenance(cast, Precision.name)
            self.graph.nodes.append(cast)
            self.casts[key] = out
        return self.casts[key]

    def _convert_constant(self, constant: gs.Constant) -> gs.Constant:
        if id(constant) not in self.converted:
            largest, _ = LIMITS[self.low]
            values = np.asarray(constant.values, dtype=np.float32)
            values = np.where(np.isfinite(values), np.clip(values, -largest, largest), values)  # keep +-inf
            name = self.ctx.fresh_name(f"{constant.name}/{LOW_NAMES[self.low]}")
            self.converted[id(constant)] = (constant, gs.Constant(name, np.asarray(values.astype(self.low_dtype))))
        return self.converted[id(constant)][1]

    def _fix_outer_scope_reads(self) -> None:
        """Subgraphs read outer tensors by name and keep their float32 interface."""
        tensors = self.graph.tensors()
        top_level = {id(n) for n in self.graph.nodes}  # including the casts made so far
        for name, was in self.original.items():
            tensor = tensors.get(name)
            if tensor is None or elem_type(tensor) == was:
                continue
            for user in list(tensor.outputs):
                if id(user) in top_level:
                    continue
                fixed = self._as_type(tensor, was)
                for index, read in enumerate(user.inputs):
                    if read is tensor:
                        user.inputs[index] = fixed

    def _fix_outputs(self) -> None:
        for position, tensor in enumerate(list(self.graph.outputs)):
            if elem_type(tensor) != self.low or not self.keep_io or tensor.name not in self.original:
                continue  # only outputs this pass lowered go back to float32, not native float16 ones
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is None:
                continue
            renamed = gs.Variable(self.ctx.fresh_name(f"{tensor.name}/{LOW_NAMES[self.low]}"), dtype=self.low_dtype, shape=tensor.shape)
            producer.outputs[list(producer.outputs).index(tensor)] = renamed
            for user in list(tensor.outputs):
                for index, read in enumerate(user.inputs):
                    if read is tensor:
                        user.inputs[index] = renamed
            tensor.dtype = np.float32
            cast = gs.Node("Cast", self.ctx.fresh_name(f"{tensor.name}/cast_float32"), {"to": FLOAT32}, [renamed], [tensor])
            set_provenance(cast, Precision.name)
            self.graph.nodes.append(cast)
