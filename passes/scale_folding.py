"""scale-folding: remove re-quantization that changes nothing and fold constant scale arithmetic.

* ``collapse-requantize``: ``QuantizeLinear(DequantizeLinear(x, s, z), s', z')`` with the same
  scale, zero point (value and type) and axis is ``x`` exactly (every value of ``x`` dequantizes
  to a float that quantizes back to itself), so a Q -> DQ -> Q -> DQ chain with equal parameters
  becomes Q -> DQ. Readers of the Q's output read ``x``; the DQ stays while others read it. A Q
  whose output is a graph output is left alone (graph outputs keep their names).
* ``fold-scale-mul`` / ``fold-scale-div``: ``DequantizeLinear(x, s, z) * c`` (or ``/ c``) with a
  constant, finite, positive scalar ``c`` is ``DequantizeLinear(x, s * c, z)`` (``s / c``), when
  nothing else reads the DQ output and ``c`` does not broadcast ``x`` to a higher rank.

Equality of parameters is exact (the same float32 values), never within a tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmp.ir import Model, constant_value, elem_type, graph_output_ids, is_omitted, producer, remove_nodes, toposort
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, RewriteBuilder, Rule, rewrite_all
from onnxmp.shapes import infer_shapes_for

from onnx import TensorProto


def _dq_mul(op, x, s: Const, z: Const, c: Const):
    return op.Mul(op.DequantizeLinear(x, s, z, _name="dq"), c)


def _dq_div(op, x, s: Const, z: Const, c: Const):
    return op.Div(op.DequantizeLinear(x, s, z, _name="dq"), c)


def _folded(divide: bool):
    def replace(op: RewriteBuilder, x, s, z, c, match: Match):
        factor = np.asarray(constant_value(c))
        scale = np.asarray(constant_value(s))
        rank = len(x.shape) if x.shape is not None else None
        if factor.size != 1 or not np.isfinite(factor).all() or float(factor.reshape(())) <= 0:
            return None
        if factor.ndim > 0 and (rank is None or factor.ndim > rank):
            return None  # c would broadcast the result to a higher rank
        if scale.dtype != np.float32 or factor.dtype != np.float32:
            return None
        value = np.float32(factor.reshape(()))
        new_scale = (scale / value if divide else scale * value).astype(np.float32)
        if not (np.isfinite(new_scale).all() and (new_scale >= np.finfo(np.float32).tiny).all()):
            return None
        attrs = {key: match.nodes["dq"].attrs[key] for key in ("axis", "block_size") if key in match.nodes["dq"].attrs}
        return op.DequantizeLinear(x, op.const(new_scale, "scale"), z, **attrs)

    return replace


RULES = [
    Rule("fold-scale-mul", _dq_mul, _folded(divide=False)),
    Rule("fold-scale-div", _dq_div, _folded(divide=True)),
]


@register
class ScaleFolding(Pass):
    """Collapse Q(DQ(x)) with equal parameters to x; fold constant scalar Mul/Div into DQ scales."""

    name = "scale-folding"
    preserves_fp32 = False  # collapse-requantize is exact; a folded scale may round differently by an ulp

    def run(self, model: Model, ctx: PassContext) -> bool:
        if not any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.nodes):
            return False
        # Element types of Q/DQ inputs without a zero point, and the ranks of DQ inputs. After
        # qdq-insertion every tensor is typed already (it types what it creates), so inference
        # would change nothing; it runs while some tensor lacks its dtype or shape.
        infer_shapes_for(model, [t for t in model.graph.tensors().values() if isinstance(t, gs.Variable)])
        changed = _collapse_requantize(model.graph, ctx)
        changed = rewrite_all(model, RULES, ctx) or changed
        return changed


def _collapse_requantize(graph: gs.Graph, ctx: PassContext) -> bool:
    outputs = graph_output_ids(graph)
    doomed: list[gs.Node] = []
    for node in list(graph.nodes):
        if node.op != "QuantizeLinear" or id(node.outputs[0]) in outputs:
            continue
        dq = producer(node.inputs[0])
        if dq is None or dq.op != "DequantizeLinear" or not _same_parameters(dq, node):
            continue
        source, result = dq.inputs[0], node.outputs[0]
        for user in list(result.outputs):
            for index, tensor in enumerate(user.inputs):
                if tensor is result:
                    user.inputs[index] = source
        ctx.record(**{"pass": "scale-folding", "node": node.name, "rule": "collapse-requantize", "source": source.name})
        doomed.append(node)
        if not dq.outputs[0].outputs or all(u is node for u in dq.outputs[0].outputs):
            if id(dq.outputs[0]) not in outputs:
                doomed.append(dq)
    if doomed:
        remove_nodes(graph, doomed)
        toposort(graph)
    return bool(doomed)


def _same_parameters(dq: gs.Node, q: gs.Node) -> bool:
    """Same scale, zero point (value and type), axis and block size; the Q outputs x's type."""
    if len(dq.inputs) < 2 or len(q.inputs) < 2:
        return False
    dq_scale, q_scale = constant_value(dq.inputs[1]), constant_value(q.inputs[1])
    if dq_scale is None or q_scale is None or dq_scale.dtype != q_scale.dtype:
        return False
    if dq_scale.shape != q_scale.shape or not np.array_equal(dq_scale, q_scale):
        return False
    dq_zero, q_zero = _zero_point(dq), _zero_point(q)
    if dq_zero is None or q_zero is None or dq_zero.dtype != q_zero.dtype or dq_zero.shape != q_zero.shape:
        return False
    if not np.array_equal(dq_zero, q_zero):
        return False
    for key, default in (("axis", 1), ("block_size", 0)):
        if dq.attrs.get(key, default) != q.attrs.get(key, default) and dq_scale.size > 1:
            return False
    if q.attrs.get("output_dtype", 0) not in (0, _quantized_type(q, q_zero)):
        return False
    if _has_zero_point(dq) and _has_zero_point(q):
        return True  # x and the zero point share one type in both ops
    source_type = elem_type(dq.inputs[0])
    return source_type is not None and source_type == _quantized_type(q, q_zero)


def _has_zero_point(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and not is_omitted(node.inputs[2])


def _zero_point(node: gs.Node) -> np.ndarray | None:
    if len(node.inputs) > 2 and not is_omitted(node.inputs[2]):
        return constant_value(node.inputs[2])
    scale = constant_value(node.inputs[1])
    return None if scale is None else np.zeros(scale.shape, np.uint8)  # the default: uint8 zero


def _quantized_type(q: gs.Node, zero_point: np.ndarray) -> int:
    """The element type a QuantizeLinear produces."""
    if q.attrs.get("output_dtype", 0):
        return int(q.attrs["output_dtype"])
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(zero_point.dtype) if zero_point.dtype != np.uint8 else TensorProto.UINT8
