"""qdq-insertion: quantize to INT8 where the target runs the node faster in INT8, as a QDQ model.

The output is the standard ONNX QDQ form that onnxruntime fuses into integer kernels:
activations get ``QuantizeLinear -> DequantizeLinear`` (one pair per tensor, shared by its
readers), weights are stored quantized (an int8 initializer feeding a ``DequantizeLinear``, never
a float weight behind a Q/DQ pair), and a Conv/Gemm bias is stored as int32 with scale
``input_scale * weight_scale``, as onnxruntime's own quantizer writes it.

Placement for target ``cpu`` follows the fusion rules of onnxruntime's CPU provider
(``QDQSelectorActionTransformer``; see ``CPU_OPS``). A node is quantized only in a form the
provider fuses; anything else would run as extra float work (a DequantizeLinear of the weights on
every run, and a Q/DQ round trip per tensor):

* ``anchor`` ops (Conv, MatMul, Gemm) are quantized wherever they are eligible. Conv needs a
  quantized output to become QLinearConv; MatMul and Gemm without one become
  MatMulIntegerToFloat / QGemm with a float output, and get a quantized output (QLinearMatMul,
  QGemm with int8 output) only when a quantized node reads it.
* ``qlinear`` ops (Add, Mul, pools, Sigmoid, LeakyRelu, Softmax, Concat) become QLinear* kernels,
  and ``move`` ops (MaxPool, Reshape, Transpose, Flatten, Split, ...) run on the 8-bit data
  directly with their output (every output of a Split) sharing the input's scale and zero point.
  Both are quantized only inside an integer region: every activation input comes from a
  quantized node that already emits a quantized output, and a quantized node reads the result.
  Alone they would only add Q/DQ work. The region is the largest set that satisfies this, found
  by removing violators until none is left.
* A Relu, or a Clip with constant bounds, that is the only reader of a quantized node's output is
  absorbed: the Q/DQ pair goes after it, its zero point (qmin for an unsigned range starting at
  0) makes it redundant, and onnxruntime drops it while fusing. It stays in the graph, so the
  model is right whether or not it is fused.

A node stays float and the report names the rule: ``keep-op-type``, ``keep-node-pattern``,
``keep-node-name``, ``not-float32``, ``dynamic-weight`` / ``dynamic-bias``, ``bias-shape``, ``activation-matmul``
(both MatMul inputs computed, with ``quantize_activation_matmul`` off), ``graph-output`` (its
quantized output would be a graph output, which onnxruntime does not fuse), ``no-statistics``,
``non-finite`` (calibration saw NaN/Inf in a tensor it would quantize), ``zero-range`` (the range
of such a tensor, which always includes 0, is empty: an all-zero tensor), ``outside-region``
(qlinear/move ops outside an integer region), ``opset`` (MaxPool before opset 12).

Calibration: placement runs twice. First from the graph alone (``_Placement.observed_tensors``:
the activation tensors expected to get a Q/DQ pair, around the nodes that no structural rule keeps
float; not the output of a node whose Relu/Clip is expected to be absorbed, nor a graph output),
then ``ctx.calibration.histograms`` observes only those tensors in one pass over the data: fixed-size
``|x|`` histograms (``histogram_bins``) merged batch by batch, so memory stays flat in the number
of batches; cached next to the statistics, keyed by model, data, tensor list and bins (the range
method is applied afterwards, so every method reuses them). Then placement runs on the
parameters; should it ask for a tensor left out (an absorption the data prevents), the left-out
tensors are observed in a second pass and placement runs again, so the result is the same as if
every candidate tensor had been observed. NaN/Inf in the data is an error naming the batch file
and input; NaN/Inf the model computes keeps the readers of that tensor float (rule ``non-finite``).

Scales: activations get the range ``calibration_method`` picks from the histogram (minmax,
percentile, entropy or mse, ``onnxmp.quant_calibration``; mse by default: on the benchmark models
it kept top-1 agreement at least as well as minmax and entropy, see benchmarks/README.md),
widened to include 0, asymmetric uint8 by default (the u8s8 fast path of x86 VNNI; onnxruntime
does not fuse int8-activation Conv on x86). Weights are int8, symmetric in [-127, 127], per
output channel (axis 0 for Conv, the output axis of a Gemm or 2-D MatMul weight); an all-zero
channel gets scale 1. The report lists every quantized tensor with its scale, zero point,
method, range and clip fraction (the share of calibration values beyond the range).

``cost_model`` (off by default; on in the ``int8-cpu`` preset, with ``min_speedup`` 1.2): the
float and the QDQ model are costed by ``onnxmp.cpu_cost`` (MACs and output elements of the
integer-kernel anchors, elements converted at region boundaries, node overhead). First each
anchor whose integer kernel is estimated slower than its float one stays float (rule
``estimated-slower-in-int8``: an RGB stem, a 16-channel 1x1, a 10-class head), so the regions
form around the layers that gain; then, when INT8 is not estimated
``min_speedup`` times faster, the pass returns the float model unchanged and records rule
``estimated-slower-in-int8``. Deterministic: the same input gives the same bytes.

``measure`` (off by default): after placement (and the cost model, when on and it kept INT8), the
model before and after this pass are timed on onnxruntime's CPU provider at batch 1 (alternating
runs on the same random inputs, ``measure_repeats`` each or more so that at least half a second
is timed, median); when the INT8 model is not at least ``min_speedup`` times faster, the pass
returns the float model unchanged and records rule ``slower-in-int8``. The timing makes the
output depend on the machine; leave it off where byte-stable output matters.

A model that already holds QuantizeLinear/DequantizeLinear or integer ops is left as it is
(rule ``already-quantized``). Only the main graph is quantized. Target ``tensorrt`` (INT8 or,
with ``activation_dtype=fp8``, FP8 E4M3FN) has a placement of its own, TensorRT's explicit
quantization: ``passes/qdq_tensorrt.py``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxmp.errors import DataError, PassError, PolicyError
from onnxmp.ir import (
    Model,
    constant_value,
    elem_type,
    graph_output_ids,
    is_omitted,
    present_outputs,
    provenance,
    set_provenance,
    subgraphs,
)
from onnxmp.cpu_cost import CostEstimate
from onnxmp.cpu_cost import estimate as estimate_cost
from onnxmp.cpu_cost import integer_pays
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.policy import compile_patterns
from onnxmp.quant_calibration import DEFAULT_BINS, METHODS, MIN_BINS, TensorHistogram, quantization_params
from onnxmp.shapes import infer_shapes

NAME = "qdq-insertion"
ANCHOR, QLINEAR, MOVE = "anchor", "qlinear", "move"
FLOAT32 = TensorProto.FLOAT


@dataclass(frozen=True)
class OpRule:
    """How onnxruntime fuses one op type: its kind, which inputs carry data, whether the output
    must be quantized for the fusion, and the first opset where the fused form exists."""

    kind: str
    data_inputs: tuple[int, ...] | None = (0,)  # None: every input (Concat, Add, Mul)
    output_required: bool = True
    min_opset: int = 10
    multi_output: bool = False  # Split: a move op with a Q/DQ pair on every output


# onnxruntime 1.31 CPU provider, qdq_selector_action_transformer.cc:
#   Conv -> QLinearConv (DQ x, DQ w, DQ b int32, Q y required); MatMul -> QLinearMatMul with Q y,
#   MatMulIntegerToFloat without; Gemm -> QGemm (Q y optional, bias int32, beta 1);
#   Add/Mul -> QLinearAdd/QLinearMul ("2DQ"); AveragePool, GlobalAveragePool, LeakyRelu, Sigmoid,
#   Softmax -> QLinear* ("1DQ"); Concat -> QLinearConcat ("*DQ"); MaxPool (opset >= 12, positive
#   scale), Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Gather, Expand, Tile, Resize:
#   DQ and Q dropped when both carry the same scale and zero point ("drop"); Split: the same with a
#   Q on every output ("dropSplitQDQ", SplitSelector with equal quantization parameters).
CPU_OPS: dict[str, OpRule] = {
    "Conv": OpRule(ANCHOR),
    "MatMul": OpRule(ANCHOR, (0, 1), output_required=False),
    "Gemm": OpRule(ANCHOR, output_required=False),
    "Add": OpRule(QLINEAR, None),
    "Mul": OpRule(QLINEAR, None),
    "Concat": OpRule(QLINEAR, None),
    "AveragePool": OpRule(QLINEAR),
    "GlobalAveragePool": OpRule(QLINEAR),
    "LeakyRelu": OpRule(QLINEAR),
    "Sigmoid": OpRule(QLINEAR),
    "Softmax": OpRule(QLINEAR),
    "MaxPool": OpRule(MOVE, min_opset=12),
    "Reshape": OpRule(MOVE),
    "Flatten": OpRule(MOVE),
    "Transpose": OpRule(MOVE),
    "Squeeze": OpRule(MOVE),
    "Unsqueeze": OpRule(MOVE),
    "Slice": OpRule(MOVE),
    "Gather": OpRule(MOVE),
    "Expand": OpRule(MOVE),
    "Tile": OpRule(MOVE),
    "Resize": OpRule(MOVE),
    "Split": OpRule(MOVE, multi_output=True),
}
TARGET_OPS = {"cpu": CPU_OPS}
TENSORRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")  # placement: passes/qdq_tensorrt.py
ABSORBABLE = ("Relu", "Clip")
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul", "QGemm", "MatMulIntegerToFloat",
}  # fmt: skip
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MEASURE_SECONDS = 0.5  # with measure: time at least this long per model (more runs for small models)


# ------------------------------------------------------------------------------ quantization types
@dataclass(frozen=True)
class QType:
    name: str
    onnx: int
    numpy: Any
    qmin: int
    qmax: int


QTYPES = {
    "uint8": QType("uint8", TensorProto.UINT8, np.uint8, 0, 255),
    "int8": QType("int8", TensorProto.INT8, np.int8, -128, 127),
    # FLOAT8E4M3FN, for target tensorrt only (opset 19); its name is quant_calibration's dtype
    "fp8": QType("float8e4m3fn", TensorProto.FLOAT8E4M3FN, helper.tensor_dtype_to_np_dtype(TensorProto.FLOAT8E4M3FN), -448, 448),
}
WEIGHT_QMAX = 127  # weights: int8 symmetric in [-127, 127]


def kept_by_user(node: gs.Node, owner: "QdqInsertion") -> str:
    """The rule that keeps ``node`` float whatever the target (it owns subgraphs, or the policy's
    keep_op_types / keep_node_patterns name it), or "" when none does."""
    if subgraphs(node):
        return "subgraph"
    if node.op in owner.options.keep_op_types:
        return "keep-op-type"
    if node.name in owner.options.keep_node_names:
        return "keep-node-name"
    for pattern in owner.patterns:
        if pattern.search(node.name or ""):
            return f"keep-node-pattern: {pattern.pattern}"
    return ""


@dataclass
class QuantParams:
    """Scale and zero point of one quantized tensor, and how they were found."""

    scale: np.ndarray  # float32, scalar or 1-D (per channel)
    zero_point: np.ndarray  # of the quantized type, same shape as scale
    qtype: QType
    method: str
    clip_fraction: float = 0.0
    axis: int | None = None
    range: tuple[float, float] | None = None

    def report(self) -> dict[str, Any]:
        scale = self.scale.tolist()
        zero_point = self.zero_point.tolist()
        entry = {"dtype": self.qtype.name, "scale": scale, "zero_point": zero_point, "method": self.method,
                 "clip_fraction": self.clip_fraction}  # fmt: skip
        if self.axis is not None:
            entry["axis"] = self.axis
        if self.range is not None:
            entry["range"] = [self.range[0], self.range[1]]
        return entry


def _activation_params(
    name: str, stats: dict[str, TensorHistogram], qtype: QType, symmetric: bool, method: str = "minmax",
    percentile: float = 99.99,
) -> QuantParams | str:  # fmt: skip
    """Scale and zero point of activation tensor ``name``, or the rule that keeps it float.

    ``stats`` holds the ``|x|`` histograms of ``onnxmp.quant_calibration``; ``method`` turns one
    into a clipping threshold (``quantization_params``: the range widened to include 0, so that
    zero, padding and Relu outputs, is exact). The clip fraction is the share of calibration
    values beyond the range. A tensor that is 0 on every calibration value keeps its readers
    float (rule ``zero-range``): no scale says anything about values calibration never saw. When
    a percentile falls on the exact zeros of a mostly-zero tensor (range 0, values beyond it),
    the tensor falls back to its min-max range.
    """
    seen = stats.get(name)
    if seen is None:
        return f"no-statistics: {name}"
    if seen.nonfinite:
        return (f"non-finite: {name} held {seen.nonfinite} NaN/Inf values in calibration "
                f"(first on batch '{seen.nonfinite_batch}')")  # fmt: skip
    if seen.count == 0:
        return f"zero-range: {name} has no finite calibration values"
    if seen.absmax == 0:
        return f"zero-range: {name} is constant 0 in calibration"
    found = quantization_params({name: seen}, method, symmetric, qtype.name, percentile)[name]
    label = method
    if found.threshold <= 0:
        found = quantization_params({name: seen}, "minmax", symmetric, qtype.name)[name]
        label = f"minmax ({method} range was 0)"
    return QuantParams(np.asarray(found.scale, np.float32), np.asarray(found.zero_point, qtype.numpy), qtype, label,
                       found.clip_fraction, None, (found.low, found.high))  # fmt: skip


def _constant_params(values: np.ndarray, qtype: QType, symmetric: bool) -> QuantParams | str:
    """Activation-type parameters for a constant input of Add/Mul/Concat, from its own range."""
    values = np.asarray(values, np.float32)
    if not np.isfinite(values).all():
        return "non-finite constant"
    histogram = TensorHistogram("constant", MIN_BINS)
    histogram.update(values, "constant")
    found = _activation_params("constant", {"constant": histogram}, qtype, symmetric)
    if isinstance(found, QuantParams):
        found.method = "minmax-constant"
    return found


def _weight_params(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, QuantParams]:
    """int8 symmetric weights, per channel along ``axis`` (None: per tensor)."""
    values = np.asarray(values, np.float32)
    if axis is None:
        absmax = np.asarray(np.max(np.abs(values)) if values.size else 0.0, np.float32)
        broadcast = absmax
    else:
        others = tuple(i for i in range(values.ndim) if i != axis)
        absmax = np.max(np.abs(values), axis=others).astype(np.float32) if values.size else np.zeros(values.shape[axis], np.float32)
        shape = [1] * values.ndim
        shape[axis] = -1
        broadcast = absmax.reshape(shape)
    scale = np.where(absmax > 0, absmax / np.float32(WEIGHT_QMAX), np.float32(1.0)).astype(np.float32)
    scale_b = np.where(broadcast > 0, broadcast / np.float32(WEIGHT_QMAX), np.float32(1.0)).astype(np.float32)
    quantized = np.clip(np.rint(values / scale_b), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    zero_point = np.zeros(scale.shape, np.int8)
    method = "absmax-per-channel" if axis is not None else "absmax"
    return quantized, QuantParams(scale, zero_point, QTYPES["int8"], method, 0.0, axis)


def _bias_params(values: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> tuple[np.ndarray, QuantParams]:
    """int32 bias with scale input_scale * weight_scale (per channel when the weight is)."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    exact = np.asarray(values, np.float64) / np.where(scale > 0, scale, 1.0).astype(np.float64)
    clipped = (exact < INT32_MIN) | (exact > INT32_MAX)
    quantized = np.clip(np.rint(exact), INT32_MIN, INT32_MAX).astype(np.int32)
    fraction = float(np.mean(clipped)) if clipped.size else 0.0
    axis = 0 if scale.ndim == 1 else None
    return quantized, QuantParams(scale, np.zeros(scale.shape, np.int32), QType("int32", TensorProto.INT32, np.int32, INT32_MIN, INT32_MAX), "input-scale*weight-scale", fraction, axis)


# ------------------------------------------------------------------------------ options
@dataclass
class QdqInsertionOptions:
    op_types: list[str] | None = field(
        default=None,
        metadata={"help": "op types that may be quantized (null: every op the target fuses; see `onnxmp passes`)"},
    )
    activation_dtype: Literal["uint8", "int8", "fp8"] = field(
        default="uint8",
        metadata={"help": "activation type; uint8 is onnxruntime's fused path on x86 (u8s8); fp8 (E4M3FN, weights too) for target tensorrt"},
    )
    activation_symmetric: bool = field(
        default=False, metadata={"help": "symmetric activation ranges (zero point 0 / 128); asymmetric by default"}
    )
    per_channel: bool = field(default=True, metadata={"help": "per-output-channel weight scales"})
    quantize_activation_matmul: bool = field(
        default=True, metadata={"help": "quantize MatMul whose both inputs are computed (attention scores)"}
    )
    keep_op_types: list[str] = field(default_factory=list, metadata={"help": "op types that stay float"})
    keep_node_patterns: list[str] = field(
        default_factory=list, metadata={"help": "regular expressions; matching node names stay float"}
    )
    keep_node_names: list[str] = field(
        default_factory=list,
        metadata={"help": "exact node names that stay float (what validation.fallback adds; no regular-expression escaping needed)"},
    )
    measure: bool = field(
        default=False,
        metadata={"help": "time the model before and after on the CPU provider and keep the float model unless INT8 is faster"},
    )
    min_speedup: float = field(
        default=1.0, metadata={"help": "with measure or cost_model: INT8 must be (estimated) at least this many times faster", "minimum": 0}
    )
    measure_repeats: int = field(default=20, metadata={"help": "with measure: timed runs per model", "minimum": 1})
    cost_model: bool = field(
        default=False,
        metadata={"help": "keep the float model unless INT8 is estimated min_speedup times faster (onnxmp.cpu_cost: deterministic)"},
    )
    calibration_method: Literal["minmax", "percentile", "entropy", "mse"] = field(
        default="mse",
        metadata={"help": "activation range from the calibration histograms: minmax, percentile, entropy (KL, as TensorRT) or mse"},
    )
    percentile: float = field(
        default=99.99, metadata={"help": "with calibration_method=percentile: the percentile of |x| kept", "minimum": 50, "maximum": 100}
    )
    histogram_bins: int = field(
        default=DEFAULT_BINS, metadata={"help": "bins of each calibration histogram (a power of two >= 512)", "minimum": MIN_BINS}
    )


# ------------------------------------------------------------------------------ the pass
@register
class QdqInsertion(Pass):
    """Quantize to INT8 (QDQ form) where the target's onnxruntime fuses it into integer kernels."""

    name = NAME
    preserves_fp32 = False
    Options = QdqInsertionOptions

    def __init__(self, options: QdqInsertionOptions | None = None):
        super().__init__(options)
        known = set().union(*TARGET_OPS.values(), TENSORRT_OPS)
        chosen = self.options.op_types
        if chosen is not None:
            unknown = sorted(set(chosen) - known)
            if unknown:
                raise PolicyError(f"op_types: {unknown} cannot be quantized; supported: {', '.join(sorted(known))}")
        self.patterns = compile_patterns(self.options.keep_node_patterns, "keep_node_patterns")
        self.qtype = QTYPES[self.options.activation_dtype]
        bins = self.options.histogram_bins
        if bins < MIN_BINS or bins & (bins - 1):
            raise PolicyError(f"histogram_bins: {bins} is not a power of two of at least {MIN_BINS}; the default is {DEFAULT_BINS}")
        if self.options.calibration_method not in METHODS:
            raise PolicyError(f"calibration_method: '{self.options.calibration_method}' is not one of {', '.join(METHODS)}")
        if not 50 <= self.options.percentile <= 100:
            raise PolicyError(f"percentile: {self.options.percentile} is not between 50 and 100")

    def run(self, model: Model, ctx: PassContext) -> bool:
        graph = model.graph
        if any(n.op in QUANTIZED_OPS for n in graph.nodes):
            ctx.record(**{"pass": NAME, "rule": "already-quantized"})
            return False
        if ctx.target not in (*TARGET_OPS, "tensorrt"):
            raise PassError(
                f"pass '{NAME}' has placement rules for target(s) {', '.join((*TARGET_OPS, 'tensorrt'))} only, not "
                f"'{ctx.target}'; use --target cpu or --target tensorrt"
            )
        if self.options.activation_dtype == "fp8" and ctx.target != "tensorrt":
            raise PassError(f"pass '{NAME}': activation_dtype fp8 is for target tensorrt; '{ctx.target}' has no fp8 kernels")
        if ctx.calibration is None:
            raise PassError(
                f"pass '{NAME}' needs calibration data for activation scales; give --calibration-data "
                "(a folder of .npz batches, see README 'Data') or a policy 'calibration' section"
            )
        if model.opset() < 10:
            raise PassError(f"pass '{NAME}' needs opset 10 or later (QuantizeLinear); the model has opset {model.opset()}")
        infer_shapes(model)
        if ctx.target == "tensorrt":
            from onnxmp.passes.qdq_tensorrt import quantize_for_tensorrt

            return quantize_for_tensorrt(model, ctx, self)
        before = model.to_proto() if self.options.measure or self.options.cost_model else None
        kept_provenance = {n.name: provenance(n) for n in graph.nodes} if before is not None else {}
        float_cost = estimate_cost(graph) if self.options.cost_model else None
        plan = self._placement(model, ctx, before or model.to_proto())
        if not plan.quantized:
            plan.record(ctx, None)
            return False
        _Rewriter(model, ctx, plan).apply()
        verdicts = []
        if float_cost is not None:
            verdicts.append(_estimate_verdict(float_cost, estimate_cost(model.graph), self.options.min_speedup))
        if self.options.measure and all(v["kept"] for v in verdicts):
            verdicts.append(_measure(before, model.to_proto(), self.options.measure_repeats, self.options.min_speedup))
        for verdict in verdicts:
            ctx.record(**{"pass": NAME, **verdict})
            if not verdict["kept"]:
                model.adopt(before, kept_provenance)
                infer_shapes(model)
                plan.record(ctx, verdict["rule"])
                return False
        plan.record(ctx, None)
        return True

    def _placement(self, model: Model, ctx: PassContext, proto: Any) -> "_Placement":
        """The solved placement, calibrated on the tensors it reads. The deferred tensors (see
        ``_Placement.observed_tensors``) are observed in a second pass over the data only when
        the placement asked for one of them; it is then solved again on every tensor."""
        plan = _Placement(model, ctx, self)
        observed, deferred = plan.observed_tensors()
        plan.stats = self._histograms(ctx, proto, observed)
        plan.solve()
        if not plan.unobserved.intersection(deferred):
            return plan
        stats = {**plan.stats, **self._histograms(ctx, proto, deferred)}
        plan = _Placement(model, ctx, self)
        plan.stats = stats
        plan.solve()
        return plan

    def _histograms(self, ctx: PassContext, proto: Any, tensors: list[str]) -> dict[str, TensorHistogram]:
        try:
            return ctx.calibration.histograms(proto, tensors, self.options.histogram_bins)
        except DataError as exc:  # the pipeline reports only PassError as a pass's own failure
            raise PassError(f"pass '{NAME}' cannot calibrate: {exc}") from exc


# ------------------------------------------------------------------------------ placement
class _Placement:
    """Which nodes run in INT8, which tensors carry Q/DQ and with which parameters."""

    def __init__(self, model: Model, ctx: PassContext, owner: QdqInsertion):
        self.model, self.ctx, self.owner = model, ctx, owner
        self.stats: dict[str, TensorHistogram] = {}  # set after observed_tensors() were calibrated
        self.graph = model.graph
        self.options = owner.options
        table = TARGET_OPS[ctx.target]
        allowed = set(self.options.op_types) if self.options.op_types is not None else set(table)
        self.rules = {op: rule for op, rule in table.items() if op in allowed}
        self.outputs = graph_output_ids(self.graph)
        self.order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self.reasons: dict[int, str] = {}  # node id -> why it stays float
        self.quantized: dict[int, gs.Node] = {}
        self.absorbed: dict[int, gs.Node] = {}  # node id -> the Relu/Clip after it that Q makes redundant
        self.params: dict[int, QuantParams] = {}  # tensor id -> activation params
        self.param_cache: dict[int, QuantParams | str] = {}
        self.unobserved: set[str] = set()  # tensors whose parameters were asked for without statistics

    # -------------------------------------------------------------- rules
    def observed_tensors(self) -> tuple[list[str], list[str]]:
        """(observed, deferred) activation tensor names, from the graph alone.

        Observed: what this placement is expected to quantize: the activation inputs of each
        node that no structural rule keeps float, its output, and the output of a Relu/Clip it
        may absorb. Deferred: outputs expected to get no Q/DQ pair: a graph output, an output
        whose Relu/Clip is expected to be absorbed (the pair goes after it), and an optional
        output (MatMul, Gemm) that no such node reads. Calibration observes only the first;
        the second only when the placement turns out to need one of them."""
        candidates = {}
        for node in self.graph.nodes:
            rule = self.rules.get(node.op)
            if rule is None or node.domain not in (None, "", "ai.onnx"):
                continue
            if not self._static_reason(node, rule, statistics=False):
                candidates[id(node)] = (node, rule)
        observed: dict[str, None] = {}
        deferred: dict[str, None] = {}
        for node, rule in candidates.values():
            for index in self.data_inputs(node, rule):
                if constant_value(node.inputs[index]) is None:
                    observed[node.inputs[index].name] = None
            for out in present_outputs(node):
                follower = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op in ABSORBABLE else None
                unread = not rule.output_required and not any(id(user) in candidates for user in out.outputs)
                if id(out) in self.outputs or unread or self._absorption_expected(rule, follower):
                    deferred[out.name] = None
                else:
                    observed[out.name] = None
                if follower is not None:
                    observed[follower.outputs[0].name] = None
        return list(observed), [name for name in deferred if name not in observed]

    def _absorption_expected(self, rule: OpRule, follower: gs.Node | None) -> bool:
        """Whether ``follower`` (a Relu/Clip, the only reader of the node's output) will be
        absorbed whatever the data: an asymmetric range of values that are never negative starts
        at 0, which is the zero point ``_made_redundant`` asks for, when the Clip starts at 0."""
        if follower is None or rule.kind == MOVE or self.options.activation_symmetric:
            return False
        if follower.op == "Relu":
            return True
        return _constant_clip(follower) and _clip_bounds(follower)[0] == 0.0

    def solve(self) -> None:
        candidates = {}
        for node in self.graph.nodes:
            rule = self.rules.get(node.op)
            if rule is None or (node.domain not in (None, "", "ai.onnx")):
                continue
            reason = self._static_reason(node, rule)
            if reason:
                self.reasons[id(node)] = reason
            else:
                candidates[id(node)] = node
        self.quantized = candidates
        self._absorb()
        while True:
            doomed = {}
            emitters = self.emitters()
            for key, node in self.quantized.items():
                reason = self._region_reason(node, self.rules[node.op], emitters)
                if reason:
                    doomed[key] = reason
            if not doomed:
                break
            for key, reason in doomed.items():
                self.reasons[key] = reason
                del self.quantized[key]
            self._absorb()
        self._assign_params()

    def _static_reason(self, node: gs.Node, rule: OpRule, statistics: bool = True) -> str:
        kept = kept_by_user(node, self.owner)
        if kept:
            return kept
        if self.model.opset() < rule.min_opset:
            return f"opset: onnxruntime fuses {node.op} in 8 bits from opset {rule.min_opset}"
        outputs = present_outputs(node)
        if not outputs or (len(outputs) > 1 and not rule.multi_output) or any(elem_type(t) != FLOAT32 for t in outputs):
            return f"not-float32: the node must have {'float32 outputs' if rule.multi_output else 'one float32 output'}"
        reason = self._cost_reason(node) if rule.kind == ANCHOR else ""
        if reason:  # decided before statistics: its inputs are not observed
            return reason
        for index in self.data_inputs(node, rule):
            tensor = node.inputs[index]
            if elem_type(tensor) != FLOAT32:
                return f"not-float32: input {tensor.name}"
            if constant_value(tensor) is not None:
                if rule.kind != QLINEAR:
                    return f"constant-data: {tensor.name}"
                if rule.kind == QLINEAR:
                    found = _constant_params(constant_value(tensor), self.owner.qtype, self.options.activation_symmetric)
                    if isinstance(found, str):
                        return f"{found}: {tensor.name}"
                continue
            found = self.activation(tensor) if statistics else None
            if isinstance(found, str):
                return found
        if all(constant_value(node.inputs[i]) is not None for i in self.data_inputs(node, rule)):
            return "constant-data: every data input is a constant (fold-constants computes it)"
        if rule.kind == ANCHOR:
            return self._weight_reason(node)
        return ""

    def _cost_reason(self, node: gs.Node) -> str:
        """With ``cost_model``: an anchor whose integer kernel is estimated slower than its float
        one stays float (``onnxmp.cpu_cost.integer_pays``), whatever the rest of the model does."""
        if self.options.cost_model and not integer_pays(node):
            return "estimated-slower-in-int8: too few products per output for the integer kernel to gain"
        return ""

    def _weight_reason(self, node: gs.Node) -> str:
        if node.op == "MatMul":
            if constant_value(node.inputs[1]) is None and not self.options.quantize_activation_matmul:
                return "activation-matmul: both inputs are computed (quantize_activation_matmul is off)"
            return ""
        weight = node.inputs[1]
        if constant_value(weight) is None:
            return f"dynamic-weight: {weight.name} is not a constant"
        if elem_type(weight) != FLOAT32:
            return f"not-float32: weight {weight.name}"
        if len(node.inputs) > 2 and not is_omitted(node.inputs[2]):
            bias = constant_value(node.inputs[2])
            if bias is None:
                return f"dynamic-bias: {node.inputs[2].name} is not a constant"
            channels = _output_channels(node)
            if bias.size not in (1, channels) or (bias.ndim > 1 and bias.shape[-1] != bias.size):
                return f"bias-shape: {node.inputs[2].name} {list(bias.shape)} is not per output channel"
        return ""

    def data_inputs(self, node: gs.Node, rule: OpRule) -> list[int]:
        """Indices of the inputs quantized as activations (weights and biases are not)."""
        present = [i for i, t in enumerate(node.inputs) if not is_omitted(t)]
        if node.op == "MatMul":
            return [0] if constant_value(node.inputs[1]) is not None else [0, 1]
        if rule.data_inputs is None:
            return present
        return [i for i in rule.data_inputs if i in present]

    def activation(self, tensor: gs.Tensor) -> QuantParams | str:
        key = id(tensor)
        if key not in self.param_cache:
            if tensor.name not in self.stats:
                self.unobserved.add(tensor.name)
            self.param_cache[key] = _activation_params(
                tensor.name, self.stats, self.owner.qtype, self.options.activation_symmetric,
                self.options.calibration_method, self.options.percentile,
            )
        return self.param_cache[key]

    def _absorb(self) -> None:
        """Relu/Clip that a quantized output makes redundant: the Q goes after them."""
        self.absorbed = {}
        for key, node in self.quantized.items():
            if self.rules[node.op].kind == MOVE:
                continue  # onnxruntime's drop rule refuses a Clip/Relu between the op and its Q
            out = node.outputs[0]
            if id(out) in self.outputs or len(out.outputs) != 1:
                continue
            follower = out.outputs[0]
            if follower.op not in ABSORBABLE or id(follower) in self.quantized:
                continue
            if follower.op == "Clip" and not _constant_clip(follower):
                continue
            params = self.activation(follower.outputs[0])
            if isinstance(params, str) or not self._made_redundant(follower, params):
                continue
            self.absorbed[key] = follower

    def _made_redundant(self, follower: gs.Node, params: QuantParams) -> bool:
        zero_point, scale, qtype = int(params.zero_point), float(params.scale), params.qtype
        if follower.op == "Relu":
            return zero_point == qtype.qmin
        low, high = _clip_bounds(follower)
        return int(np.rint(low / scale)) + zero_point <= qtype.qmin and int(np.rint(high / scale)) + zero_point >= qtype.qmax

    def out_tensors(self, node: gs.Node) -> list[gs.Tensor]:
        """The tensors that carry a quantized node's result: its outputs (more than one only for
        Split), or the output of the Relu/Clip it absorbed."""
        follower = self.absorbed.get(id(node))
        return [follower.outputs[0]] if follower is not None else present_outputs(node)

    def emits_q(self, node: gs.Node) -> bool:
        """Whether quantized ``node`` gets a Q/DQ pair on its output (each output of a move op)."""
        rule = self.rules[node.op]
        if rule.output_required:
            return True
        (out,) = self.out_tensors(node)
        if id(out) in self.outputs or not any(self._reads_quantized(user, out) for user in out.outputs):
            return False
        return not isinstance(self.activation(out), str)

    def _reads_quantized(self, user: gs.Node, tensor: gs.Tensor) -> bool:
        if id(user) not in self.quantized:
            return False
        indices = self.data_inputs(user, self.rules[user.op])
        return any(user.inputs[i] is tensor for i in indices)

    def _region_reason(self, node: gs.Node, rule: OpRule, emitters: dict[int, gs.Node]) -> str:
        outs = self.out_tensors(node)
        if rule.output_required:
            for out in outs:
                if id(out) in self.outputs:
                    return f"graph-output: {out.name} would be quantized; onnxruntime does not fuse a node that produces a graph output"
                if rule.kind != MOVE:
                    found = self.activation(out)
                    if isinstance(found, str):
                        return found
        if rule.kind == ANCHOR:
            return ""
        for index in self.data_inputs(node, rule):
            tensor = node.inputs[index]
            if constant_value(tensor) is None and id(tensor) not in emitters:
                return f"outside-region: input {tensor.name} does not come from a quantized node"
        if not any(self._reads_quantized(user, out) for out in outs for user in out.outputs):
            return f"outside-region: no quantized node reads {' or '.join(out.name for out in outs)}"
        return ""

    def emitters(self) -> dict[int, gs.Node]:
        """Tensor id -> the quantized node that puts a Q/DQ pair on it."""
        return {id(out): n for n in self.quantized.values() if self.emits_q(n) for out in self.out_tensors(n)}

    # -------------------------------------------------------------- parameters
    def _assign_params(self) -> None:
        """Parameters of every tensor that gets a Q/DQ pair; move ops pass theirs on."""
        for node in self.graph.nodes:  # topological order: inputs are assigned first
            if id(node) not in self.quantized:
                continue
            rule = self.rules[node.op]
            for index in self.data_inputs(node, rule):
                tensor = node.inputs[index]
                if constant_value(tensor) is None and id(tensor) not in self.params:
                    self.params[id(tensor)] = self.activation(tensor)
            if self.emits_q(node):
                for out in self.out_tensors(node):
                    if rule.kind == MOVE:
                        self.params[id(out)] = self.params[id(node.inputs[0])]
                    else:
                        self.params[id(out)] = self.activation(out)

    # -------------------------------------------------------------- report
    def record(self, ctx: PassContext, override: str | None) -> None:
        absorbed = {id(f) for f in self.absorbed.values()}
        for node in self.graph.nodes:
            key = id(node)
            if node.op not in self.rules and key not in absorbed:
                continue
            if key in self.quantized and override is None:
                ctx.record(**{"pass": NAME, "node": node.name, "op": node.op, "precision": "int8", "rule": "quantized"})
            elif override is None and key in absorbed:
                ctx.record(**{"pass": NAME, "node": node.name, "op": node.op, "precision": "int8", "rule": "absorbed-by-q"})
            elif key in self.quantized or key in self.reasons:
                rule = override if key in self.quantized else self.reasons[key]
                ctx.record(**{"pass": NAME, "node": node.name, "op": node.op, "precision": "float32", "rule": rule})


def _constant_clip(node: gs.Node) -> bool:
    try:
        _clip_bounds(node)
    except ValueError:
        return False
    return True


def _clip_bounds(node: gs.Node) -> tuple[float, float]:
    """A Clip's constant (min, max); ValueError when they are computed."""
    low, high = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
    for index, default in ((1, -np.inf), (2, np.inf)):
        if len(node.inputs) > index and not is_omitted(node.inputs[index]):
            value = constant_value(node.inputs[index])
            if value is None:
                raise ValueError("computed clip bound")
            if index == 1:
                low = float(value)
            else:
                high = float(value)
    return float(low), float(high)


# ------------------------------------------------------------------------------ rewriting
class QdqEmitter:
    """Creates Q/DQ nodes and their scale/zero-point constants for a placement's rewriter (every
    target's); created nodes carry the pass's provenance and are collected in ``created``."""

    def __init__(self, ctx: PassContext):
        self.ctx = ctx
        self.created: list[gs.Node] = []

    def _qdq(self, tensor: gs.Tensor, params: QuantParams) -> gs.Variable:
        scale, zero_point = self._param_constants(tensor.name, params)
        quantized = gs.Variable(self.ctx.fresh_name(f"{tensor.name}/quantized"), params.qtype.numpy, tensor.shape)
        dequantized = gs.Variable(self.ctx.fresh_name(f"{tensor.name}/dequantized"), np.float32, tensor.shape)
        self._node("QuantizeLinear", f"{tensor.name}/q", [tensor, scale, zero_point], quantized)
        self._node("DequantizeLinear", f"{tensor.name}/dq", [quantized, scale, zero_point], dequantized)
        self.ctx.record(**{"pass": NAME, "tensor": tensor.name, "role": "activation", **params.report()})
        return dequantized

    def _param_constants(self, base: str, params: QuantParams) -> tuple[gs.Constant, gs.Constant]:
        shared = getattr(params, "_constants", None)
        if shared is None:  # one scale/zero-point pair per parameter set: move ops share it exactly
            shared = (
                gs.Constant(self.ctx.fresh_name(f"{base}/scale"), np.asarray(params.scale, np.float32)),
                gs.Constant(self.ctx.fresh_name(f"{base}/zero_point"), np.asarray(params.zero_point, params.qtype.numpy)),
            )
            params._constants = shared  # type: ignore[attr-defined]
        return shared

    def _node(self, op: str, base: str, inputs: list, output: gs.Variable, **attrs: Any) -> gs.Node:
        node = gs.Node(op, self.ctx.fresh_name(base), attrs, inputs, [output])
        set_provenance(node, NAME)
        self.created.append(node)
        return node


class _Rewriter(QdqEmitter):
    """Inserts the Q/DQ pairs, quantized weights and biases that a placement chose."""

    def __init__(self, model: Model, ctx: PassContext, plan: _Placement):
        super().__init__(ctx)
        self.model, self.plan = model, plan
        self.graph = model.graph
        self.dequantized: dict[int, gs.Variable] = {}  # tensor id -> DQ output
        self.weights: dict[tuple[str, int | None], tuple[gs.Variable, QuantParams]] = {}

    def apply(self) -> None:
        plan = self.plan
        emitting = plan.emitters()
        self.input_params = {
            id(n): plan.params.get(id(n.inputs[0])) for n in plan.quantized.values() if plan.rules[n.op].kind == ANCHOR
        }
        tensors = self._quantized_tensors()
        for tensor in tensors:
            dq_out = self._qdq(tensor, plan.params[id(tensor)])
            if id(tensor) in emitting:
                readers = [u for u in tensor.outputs if not any(u is c for c in self.created)]
                for user in readers:
                    _rewire(user, tensor, dq_out)
            else:
                for user in list(tensor.outputs):
                    if id(user) in plan.quantized:
                        for index in plan.data_inputs(user, plan.rules[user.op]):
                            if user.inputs[index] is tensor:
                                user.inputs[index] = dq_out
        for node in list(self.graph.nodes):
            if id(node) in plan.quantized:
                self._constants(node)
        self.graph.nodes.extend(self.created)

    def _quantized_tensors(self) -> list[gs.Tensor]:
        seen: dict[int, gs.Tensor] = {}
        for tensor in self.graph.inputs:
            if id(tensor) in self.plan.params:
                seen[id(tensor)] = tensor
        for node in self.graph.nodes:
            for tensor in list(node.inputs) + list(node.outputs):
                if id(tensor) in self.plan.params and id(tensor) not in seen:
                    seen[id(tensor)] = tensor
        return list(seen.values())

    def _constants(self, node: gs.Node) -> None:
        """Quantized weights, biases and constant data inputs of one quantized node."""
        plan, rule = self.plan, self.plan.rules[node.op]
        if rule.kind == QLINEAR:
            for index in plan.data_inputs(node, rule):
                value = constant_value(node.inputs[index])
                if value is not None:
                    params = _constant_params(value, plan.owner.qtype, plan.options.activation_symmetric)
                    assert isinstance(params, QuantParams)
                    node.inputs[index] = self._stored(node.inputs[index], _quantize(value, params), params, None, role="constant")
            return
        if rule.kind != ANCHOR or (node.op == "MatMul" and constant_value(node.inputs[1]) is None):
            return
        weight = node.inputs[1]
        values = constant_value(weight)
        axis = self._weight_axis(node, values) if plan.options.per_channel else None
        channels = _output_channels(node) if node.op != "MatMul" else 0
        key = (weight.name, axis)
        if key not in self.weights:
            quantized, params = _weight_params(values, axis)
            dq_out = self._stored(weight, quantized, params, axis)
            self.weights[key] = (dq_out, params)
        dq_out, weight_params = self.weights[key]
        node.inputs[1] = dq_out
        if node.op == "MatMul" or len(node.inputs) < 3 or is_omitted(node.inputs[2]):
            return
        bias = node.inputs[2]
        values = np.asarray(constant_value(bias), np.float32)
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            values = values * np.float32(beta)
            node.attrs["beta"] = 1.0
        values = np.broadcast_to(values.reshape(-1), (channels,)).copy()
        quantized, params = _bias_params(values, self.input_params[id(node)].scale, weight_params.scale)
        node.inputs[2] = self._stored(bias, quantized, params, params.axis, role="bias")

    def _weight_axis(self, node: gs.Node, values: np.ndarray) -> int | None:
        if node.op == "Conv":
            return 0 if values.ndim >= 2 else None
        if node.op == "Gemm":
            return 0 if node.attrs.get("transB", 0) else 1
        return 1 if values.ndim == 2 else None  # MatMul [K, N]: per output column

    def _stored(self, original: gs.Tensor, quantized: np.ndarray, params: QuantParams, axis: int | None,
                role: str = "weight") -> gs.Variable:  # fmt: skip
        """``quantized`` as an initializer feeding a DequantizeLinear; returns the DQ output."""
        base = original.name
        stored = gs.Constant(self.ctx.fresh_name(f"{base}/quantized"), np.asarray(quantized, order="C"))
        scale, zero_point = self._param_constants(base, params)
        out = gs.Variable(self.ctx.fresh_name(f"{base}/dequantized"), np.float32, list(quantized.shape))
        attrs = {"axis": axis} if axis is not None and params.scale.ndim == 1 else {}
        self._node("DequantizeLinear", f"{base}/dq", [stored, scale, zero_point], out, **attrs)
        self.ctx.record(**{"pass": NAME, "tensor": base, "role": role, **params.report()})
        return out


def _quantize(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """QuantizeLinear of a constant, per tensor (round half to even, saturate)."""
    exact = np.asarray(values, np.float32) / params.scale + np.float32(params.zero_point)
    return np.clip(np.rint(exact), params.qtype.qmin, params.qtype.qmax).astype(params.qtype.numpy)


def _output_channels(node: gs.Node) -> int:
    """Output channels of a Conv or Gemm, from its constant weight."""
    weight = constant_value(node.inputs[1])
    if node.op == "Conv":
        return int(weight.shape[0])
    return int(weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[-1])


def _rewire(user: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(user.inputs):
        if tensor is old:
            user.inputs[index] = new


# ------------------------------------------------------------------------------ measuring
def _estimate_verdict(float_cost: CostEstimate, int8_cost: CostEstimate, min_speedup: float) -> dict[str, Any]:
    """Whether the QDQ model is estimated at least ``min_speedup`` times faster (``onnxmp.cpu_cost``)."""
    speedup = float_cost.ms / int8_cost.ms if int8_cost.ms > 0 else float("inf")
    kept = speedup >= min_speedup
    return {"rule": "estimated" if kept else "estimated-slower-in-int8", "kept": kept, "estimated_speedup": round(speedup, 3),
            "min_speedup": min_speedup, "fp32_estimate": float_cost.report(), "int8_estimate": int8_cost.report()}  # fmt: skip


def _measure(before: Any, after: Any, repeats: int, min_speedup: float) -> dict[str, Any]:
    """Median latency of both models on the CPU provider, runs alternating on the same inputs."""
    from onnxmp.errors import OnnxmpError
    from onnxmp.runtime import make_inputs, make_session

    try:
        fp32 = make_session(before, "cpu")
        int8 = make_session(after, "cpu")
        feeds = make_inputs(fp32, batch=1)
        for _ in range(3):
            fp32.run(None, feeds)
            int8.run(None, feeds)
        start = time.perf_counter()
        fp32.run(None, feeds)
        first = time.perf_counter() - start
        repeats = max(repeats, min(int(MEASURE_SECONDS / max(first, 1e-6)), 2000))  # small models: more runs
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for session, bucket in ((fp32, times[0]), (int8, times[1])):
                start = time.perf_counter()
                session.run(None, feeds)
                bucket.append((time.perf_counter() - start) * 1000.0)
    except OnnxmpError as exc:
        return {"rule": "not-measured", "kept": True, "note": str(exc)}
    fp32_ms, int8_ms = statistics.median(times[0]), statistics.median(times[1])
    speedup = fp32_ms / int8_ms if int8_ms > 0 else float("inf")
    kept = speedup >= min_speedup
    return {"rule": "measured" if kept else "slower-in-int8", "kept": kept, "fp32_ms": round(fp32_ms, 4),
            "int8_ms": round(int8_ms, 4), "speedup": round(speedup, 3), "min_speedup": min_speedup}  # fmt: skip
