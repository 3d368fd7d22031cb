"""fuse-matmul-add: MatMul of a 2-D input by a constant 2-D weight plus a constant bias -> Gemm.

Gemm is 2-D only, so the MatMul's first input must be known to have rank 2, the weight must be a
2-D constant and the bias a constant that Gemm can broadcast to the output ([N], [1, N] or a
scalar). Float types only.
"""

from __future__ import annotations

from onnxmp.ir import Model, constant_layout, iter_graphs
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, Rule, rewrite_all
from onnxmp.shapes import infer_shapes_for


def matmul_add(op, a, b: Const, c: Const):
    return op.Add(op.MatMul(a, b), c)


def gemm(op, a, b, c):
    return op.Gemm(a, b, c)


def gemm_applies(match: Match) -> bool:
    a = match.bindings["a"]
    (weight_shape, weight_type), (bias_shape, bias_type) = (constant_layout(match.bindings[k]) for k in "bc")
    if a.shape is None or len(a.shape) != 2 or len(weight_shape) != 2:
        return False
    if weight_type.kind != "f" or bias_type != weight_type:
        return False
    features = weight_shape[1]
    if len(bias_shape) == 0:
        return True
    if len(bias_shape) == 1:
        return bias_shape[0] in (1, features)
    return len(bias_shape) == 2 and bias_shape[0] == 1 and bias_shape[1] in (1, features)


RULE = Rule("fuse-matmul-add", matmul_add, gemm, when=gemm_applies)


@register
class FuseMatMulAdd(Pass):
    """Fuse MatMul + Add of a constant 2-D weight and bias into Gemm."""

    name = "fuse-matmul-add"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        infer_shapes_for(model, [n.inputs[0] for g in iter_graphs(model.graph) for n in g.nodes if n.op == "MatMul"])
        return rewrite_all(model, RULE, ctx)
