"""qdq-insertion for target ``tensorrt``: explicit INT8 / FP8 (E4M3FN) quantization as TensorRT expects it.

Not a pass of its own: ``qdq-insertion`` calls ``quantize_for_tensorrt`` when the policy's target is
``tensorrt``; options, calibration and the report are the pass's. TensorRT itself is not run here.

What this follows, read rather than guessed:

* TensorRT developer guide, "Explicit Quantization" (docs.nvidia.com/deeplearning/tensorrt/latest/
  inference-library/quantized-types-explicit-quantization.html), sections "Quantized Weights",
  "Q/DQ Layer-Placement Recommendations" and "Q/DQ Limitations":
  - "Quantize all inputs of weighted-operations (Convolution, Transposed Convolution and GEMM)":
    input 0 and the weight of Conv, ConvTranspose, Gemm and MatMul are quantized; a MatMul whose
    two inputs are both computed (attention) gets both quantized as activations.
  - "By default, do not quantize the outputs of weighted-operations": no Q/DQ on any output. Relu,
    MaxPool, Reshape, Transpose, Concat and the like get none either: TensorRT's Q/DQ propagation
    moves a Q backward and a DQ forward through layers that commute with (de)quantization, and it
    fuses batch normalization and ReLU into the convolution itself ("do not simulate
    batch-normalization and ReLU fusions").
  - "Quantize the residual input in skip-connections": TensorRT fuses an element-wise addition
    into the weighted layer before it; the precision of the addition's other input decides whether
    the fused output can be INT8. So an Add summing a quantized convolution's output with another
    tensor gets Q/DQ on that other (skip) tensor, none on the convolution's output.
  - "Use per-tensor quantization for activations; and per-channel quantization for weights."
  - "Q/DQ Limitations": some of TensorRT's rewrites compare the scales of Q/DQ layers and apply
    only when they are equal, so one Q/DQ pair per tensor is shared by all quantized readers.
  - Pre-quantized weights need a DequantizeLinear between the weights and the operator: weights
    are stored as INT8/FP8 initializers feeding a DequantizeLinear (TensorRT 10; 8.x wanted
    float weights behind a Q/DQ pair).
* TensorRT "Quantization Schemes" (same guide): symmetric only (zero point 0; the ONNX parser
  refuses others); INT8 ``roundWithTiesToEven(clip(x / s, -128, 127))``; FP8
  ``castToFp8(clip(x / s, -448, 448))`` with ``s`` a scalar. Hence INT8 activation scale amax/127,
  FP8 scale amax/448, and FP8 weights per tensor. FP8 needs ONNX opset 19
  (QuantizeLinear/DequantizeLinear with float8 types).
* NVIDIA Model Optimizer's ONNX quantizer (github.com/NVIDIA/Model-Optimizer, modelopt/onnx/
  quantization: ``configure_ort``'s TensorRT options in int8.py, ``build_non_residual_input_map`` and
  ``get_fusible_backbone`` in graph_utils.py, fp8.py). The same choices: ``QuantizeBias: False``
  (biases stay float: TensorRT folds them into the fused kernel and refuses an INT32
  DequantizeLinear), ``ActivationSymmetric``, no output quantization, per-channel weight axes
  Conv 0 / ConvTranspose 1, and for a residual Add the input on the convolution branch left
  unquantized. Differences, on purpose: weights stored quantized (Model Optimizer puts a Q/DQ pair
  on float weights), one shared pair per tensor (it uses dedicated pairs), FP8 weights per tensor
  (its FP8 path rescales a per-channel INT8 model), and a residual Add is recognised only when the
  convolution output feeds nothing but the Add (Model Optimizer also looks through Relu and
  BatchNormalization; fold-batchnorm runs first in the presets).

Rules that keep a node float (reported like the CPU target's): ``keep-op-type``,
``keep-node-pattern``, ``subgraph``, ``not-float32``, ``constant-data``, ``dynamic-weight`` (a
Conv/ConvTranspose/Gemm weight that is computed: TensorRT's per-channel kernel weights must be
constants), ``activation-matmul`` (with ``quantize_activation_matmul`` off), and the calibration
rules ``no-statistics``, ``non-finite``, ``zero-range``. Per-channel weight axes: Conv 0, Gemm 0
with transB else 1, 2-D MatMul weight 1, ConvTranspose 1 (its weight is [C_in, C_out/group, ...]);
a grouped ConvTranspose or a MatMul weight of other rank is quantized per tensor, since axis 1 is
then not the whole output-channel axis.

FP8 on a model below opset 19: the model is moved to opset 19 (IR version at least 9). When none
of its ops changed between the two opsets, only the opset import changes (exact); otherwise
onnx's version converter rewrites the changed ops (e.g. ReduceMean's axes attribute becomes an
input at opset 18), and a failure is a PassError.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxmp.errors import DataError, PassError
from onnxmp.ir import Model, constant_value, elem_type, graph_output_ids, iter_graphs, present_outputs, provenance
from onnxmp.pass_manager import PassContext
from onnxmp.passes.qdq_insertion import (
    NAME,
    QTYPES,
    TENSORRT_OPS,
    QdqEmitter,
    QuantParams,
    _activation_params,
    _weight_params,
    kept_by_user,
)
from onnxmp.shapes import infer_shapes

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FP8 = QTYPES["fp8"]
FP8_MAX = float(FP8.qmax)  # largest finite FLOAT8E4M3FN value
FP8_OPSET = 19
FP8_IR_VERSION = 9


def quantize_for_tensorrt(model: Model, ctx: PassContext, owner: Any) -> bool:
    """Insert TensorRT-placed Q/DQ into ``model`` (shapes inferred, calibration set); True when
    anything was quantized. ``owner`` is the qdq-insertion pass: its options and keep patterns."""
    options = owner.options
    if options.activation_dtype == "uint8" or not options.activation_symmetric or options.measure:
        raise PassError(
            f"pass '{NAME}' for target tensorrt needs symmetric signed quantization and does not time on the CPU: "
            "set activation_dtype=int8 (or fp8), activation_symmetric=true and measure=false "
            "(the int8-tensorrt and fp8-tensorrt presets do)"
        )
    fp8 = options.activation_dtype == "fp8"
    plan = _Placement(model, owner, fp8)
    try:
        stats = ctx.calibration.histograms(model.to_proto(), plan.observed_tensors(), options.histogram_bins)
    except DataError as exc:  # the pipeline reports only PassError as a pass's own failure
        raise PassError(f"pass '{NAME}' cannot calibrate: {exc}") from exc
    plan.stats = stats
    plan.solve()
    if plan.quantized and fp8 and model.opset() < FP8_OPSET:
        upgrade_opset(model, FP8_OPSET)
        infer_shapes(model)
        plan = _Placement(model, owner, fp8)
        plan.stats = stats
        plan.solve()
    if plan.quantized:
        _Rewriter(model, ctx, plan).apply()
    plan.record(ctx)
    return bool(plan.quantized)


# ------------------------------------------------------------------------------ opset upgrade
def upgrade_opset(model: Model, version: int) -> None:
    """Move the default domain to opset ``version`` (IR version at least 9), keeping semantics.

    Exact when no op of the model changed between its opset and ``version`` (only the import
    changes); otherwise onnx's version converter rewrites the changed ops.
    """
    old = model.opset()
    changed = sorted({node.op for graph in iter_graphs(model.graph) for node in graph.nodes
                      if node.domain in ("", "ai.onnx", None) and _schema_changed(node.op, old, version)})  # fmt: skip
    model.ir_version = max(model.ir_version, FP8_IR_VERSION)
    if not changed:
        model.require_opset("", version)
        model.shapes_current = False
        return
    kept = {node.name: provenance(node) for node in model.graph.nodes}
    try:
        converted = onnx.version_converter.convert_version(model.to_proto(), version)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise PassError(
            f"pass '{NAME}': FP8 needs opset {version} and onnx's version converter could not move the model "
            f"from opset {old} (ops that changed: {', '.join(changed)}): {str(exc).splitlines()[0]}; "
            f"export the model at opset {version} or later"
        ) from exc
    model.adopt(converted, kept)


def _schema_changed(op: str, old: int, new: int) -> bool:
    try:
        return onnx.defs.get_schema(op, old).since_version != onnx.defs.get_schema(op, new).since_version
    except onnx.defs.SchemaError:
        return True


# ------------------------------------------------------------------------------ placement
class _Placement:
    """Which weighted nodes and residual Adds are quantized, and the parameters of each tensor."""

    def __init__(self, model: Model, owner: Any, fp8: bool):
        self.model, self.owner, self.fp8 = model, owner, fp8
        self.stats: dict = {}  # calibration histograms of observed_tensors(), by name
        self.graph = model.graph
        self.options = owner.options
        allowed = set(self.options.op_types) if self.options.op_types is not None else set(TENSORRT_OPS)
        self.allowed = allowed & set(TENSORRT_OPS)
        self.reasons: dict[int, str] = {}  # node id -> why it stays float
        self.quantized: dict[int, gs.Node] = {}  # weighted nodes
        self.residual: dict[int, tuple[int, str, gs.Node]] = {}  # add id -> (skip index, skip name, conv)
        self.params: dict[int, QuantParams] = {}  # tensor id -> activation parameters
        self.cache: dict[int, QuantParams | str] = {}

    def observed_tensors(self) -> list[str]:
        """Activation tensors this placement may quantize, from the graph alone: the data inputs
        of weighted nodes no structural rule keeps float, and both inputs of every Add that may
        be a residual add (one fed by a convolution). Calibration observes only these."""
        names: dict[str, None] = {}
        for node in self.graph.nodes:
            if not self._candidate(node) or self._keep_reason(node):
                continue
            if node.op in WEIGHTED and not self._weighted_reason(node, statistics=False):
                names.update((node.inputs[i].name, None) for i in self.data_inputs(node))
            elif node.op == "Add" and any(p.op in ("Conv", "ConvTranspose") for t in node.inputs for p in t.inputs):
                names.update((t.name, None) for t in node.inputs if constant_value(t) is None)
        return list(names)

    def _candidate(self, node: gs.Node) -> bool:
        return node.op in self.allowed and node.domain in (None, "", "ai.onnx")

    def solve(self) -> None:
        for node in self.graph.nodes:
            if node.op in WEIGHTED and self._candidate(node):
                reason = self._keep_reason(node) or self._weighted_reason(node)
                if reason:
                    self.reasons[id(node)] = reason
                else:
                    self.quantized[id(node)] = node
        if "Add" in self.allowed:
            self._residual_adds()

    def _keep_reason(self, node: gs.Node) -> str:
        kept = kept_by_user(node, self.owner)
        if kept:
            return kept
        outputs = present_outputs(node)
        if len(outputs) != 1 or elem_type(outputs[0]) != TensorProto.FLOAT:
            return "not-float32: the node must have one float32 output"
        return ""

    def _weighted_reason(self, node: gs.Node, statistics: bool = True) -> str:
        if constant_value(node.inputs[0]) is not None:
            return f"constant-data: {node.inputs[0].name}"
        weight = node.inputs[1]
        if node.op == "MatMul" and constant_value(weight) is None and not self.options.quantize_activation_matmul:
            return "activation-matmul: both inputs are computed (quantize_activation_matmul is off)"
        if node.op != "MatMul" and constant_value(weight) is None:
            return f"dynamic-weight: {weight.name} is not a constant"
        for tensor in node.inputs[:2]:
            if elem_type(tensor) != TensorProto.FLOAT:
                return f"not-float32: input {tensor.name}"
        for index in self.data_inputs(node) if statistics else ():
            found = self.activation(node.inputs[index])
            if isinstance(found, str):
                return found
        return ""

    def _residual_adds(self) -> None:
        depth = self._depths()
        outputs = graph_output_ids(self.graph)
        for node in self.graph.nodes:
            if node.op != "Add" or len(node.inputs) != 2 or node.domain not in (None, "", "ai.onnx"):
                continue
            a, b = node.inputs
            if constant_value(a) is not None or constant_value(b) is not None:
                continue  # a bias or scalar add, not a skip connection
            if a.shape is None or b.shape is None or list(a.shape) != list(b.shape):
                continue  # broadcasting: not an element-wise sum TensorRT fuses into a convolution
            convs = {}
            for index, tensor in enumerate(node.inputs):
                conv = tensor.inputs[0] if len(tensor.inputs) == 1 else None
                if (conv is not None and conv.op in ("Conv", "ConvTranspose") and id(conv) in self.quantized
                        and len(tensor.outputs) == 1 and id(tensor) not in outputs):  # fmt: skip
                    convs[index] = conv
            if not convs:
                continue
            # The convolution branch is the deeper input (Model Optimizer: the longer path from
            # the common ancestor); the other input is the skip connection.
            main = max(convs, key=lambda i: (depth.get(id(convs[i]), 0), -i))
            skip = 1 - main
            reason = self._keep_reason(node)
            found = self.activation(node.inputs[skip]) if not reason else reason
            if isinstance(found, str):
                self.reasons[id(node)] = found
            else:
                self.residual[id(node)] = (skip, node.inputs[skip].name, convs[main])

    def _depths(self) -> dict[int, int]:
        """Longest path, in nodes, from the graph inputs to each node (nodes are in topological order)."""
        depth: dict[int, int] = {}
        for node in self.graph.nodes:
            parents = [t.inputs[0] for t in node.inputs if len(t.inputs) == 1]
            depth[id(node)] = 1 + max((depth.get(id(p), 0) for p in parents), default=0)
        return depth

    def data_inputs(self, node: gs.Node) -> list[int]:
        """Inputs quantized as activations: input 0, and input 1 of a MatMul whose weight is computed."""
        return [0, 1] if node.op == "MatMul" and constant_value(node.inputs[1]) is None else [0]

    def activation(self, tensor: gs.Tensor) -> QuantParams | str:
        """Symmetric per-tensor parameters by the calibration method (INT8 threshold/127, FP8
        threshold/448, zero point 0), or the rule that keeps the reader float."""
        key = id(tensor)
        if key not in self.cache:
            qtype = FP8 if self.fp8 else QTYPES["int8"]
            options = self.options
            self.cache[key] = _activation_params(tensor.name, self.stats, qtype, True, options.calibration_method,
                                                 options.percentile)  # fmt: skip
        return self.cache[key]

    def weight_axis(self, node: gs.Node, values: np.ndarray) -> int | None:
        """The output-channel axis of a weight, or None for per-tensor."""
        if self.fp8 or not self.options.per_channel:
            return None
        if node.op == "Conv":
            return 0
        if node.op == "ConvTranspose":
            return 1 if int(node.attrs.get("group", 1)) == 1 else None
        if node.op == "Gemm":
            return 0 if node.attrs.get("transB", 0) else 1
        return 1 if values.ndim == 2 else None

    def record(self, ctx: PassContext) -> None:
        precision = "fp8" if self.fp8 else "int8"
        for node in self.graph.nodes:
            key = id(node)
            if key in self.quantized:
                ctx.record(**{"pass": NAME, "node": node.name, "op": node.op, "precision": precision, "rule": "quantized"})
            elif key in self.residual:
                _, skip, conv = self.residual[key]  # the skip tensor's name before rewriting
                rule = f"residual-add: skip input {skip} quantized; TensorRT fuses the add into {conv.name}"
                ctx.record(**{"pass": NAME, "node": node.name, "op": node.op, "precision": precision, "rule": rule})
            elif key in self.reasons:
                ctx.record(**{"pass": NAME, "node": node.name, "op": node.op, "precision": "float32", "rule": self.reasons[key]})


# ------------------------------------------------------------------------------ rewriting
class _Rewriter(QdqEmitter):
    """Shared Q/DQ pairs on the chosen activations; weights stored quantized behind a DequantizeLinear."""

    def __init__(self, model: Model, ctx: PassContext, plan: _Placement):
        super().__init__(ctx)
        self.model, self.plan = model, plan
        self.weights: dict[tuple[str, int | None], gs.Variable] = {}

    def apply(self) -> None:
        plan = self.plan
        readers: list[tuple[gs.Node, int]] = []
        for node in plan.graph.nodes:
            if id(node) in plan.quantized:
                readers += [(node, index) for index in plan.data_inputs(node)]
            elif id(node) in plan.residual:
                readers.append((node, plan.residual[id(node)][0]))
        dequantized: dict[int, gs.Variable] = {}
        for node, index in readers:
            tensor = node.inputs[index]
            if id(tensor) not in dequantized:
                dequantized[id(tensor)] = self._qdq(tensor, plan.activation(tensor))
            node.inputs[index] = dequantized[id(tensor)]
        for node in list(plan.graph.nodes):
            if id(node) in plan.quantized and constant_value(node.inputs[1]) is not None:
                node.inputs[1] = self._weight(node)
        plan.graph.nodes.extend(self.created)
        self.model.shapes_current = False

    def _weight(self, node: gs.Node) -> gs.Variable:
        weight = node.inputs[1]
        values = np.asarray(constant_value(weight), np.float32)
        axis = self.plan.weight_axis(node, values)
        key = (weight.name, axis)
        if key not in self.weights:
            quantized, params = _fp8_weight(values) if self.plan.fp8 else _weight_params(values, axis)
            stored = gs.Constant(self.ctx.fresh_name(f"{weight.name}/quantized"), np.ascontiguousarray(quantized))
            scale, zero_point = self._param_constants(weight.name, params)
            out = gs.Variable(self.ctx.fresh_name(f"{weight.name}/dequantized"), np.float32, list(values.shape))
            attrs = {"axis": axis} if axis is not None else {}
            self._node("DequantizeLinear", f"{weight.name}/dq", [stored, scale, zero_point], out, **attrs)
            self.ctx.record(**{"pass": NAME, "tensor": weight.name, "role": "weight", **params.report()})
            self.weights[key] = out
        return self.weights[key]


def _fp8_weight(values: np.ndarray) -> tuple[np.ndarray, QuantParams]:
    """FLOAT8E4M3FN weights per tensor: scale amax/448 (1 for an all-zero weight), round to nearest even."""
    amax = np.float32(np.max(np.abs(values))) if values.size else np.float32(0)
    scale = np.float32(amax / np.float32(FP8_MAX)) if amax > 0 else np.float32(1.0)
    quantized = np.clip(values / scale, -FP8_MAX, FP8_MAX).astype(FP8.numpy)
    return quantized, QuantParams(np.asarray(scale, np.float32), np.zeros((), FP8.numpy), FP8, "absmax", 0.0)
