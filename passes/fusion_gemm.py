"""fuse-matmul-add: MatMul of a 2-D input by a constant 2-D weight plus a constant bias -> Gemm.

Gemm is 2-D only, so the MatMul's first input must be known to have rank 2, the weight must be a
2-D constant and the bias a constant that Gemm can broadcast to the output ([N], [1, N] or a
scalar). Float types only.
"""

from __future__ import annotations

from onnxmp.ir import Model
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, Rule, rewrite_all
from onnxmp.shapes import infer_shapes


def matmul_add(op, a, b: Const, c: Const):
    return op.Add(op.MatMul(a, b), c)


def gemm(op, a, b, c):
    return op.Gemm(a, b, c)


def gemm_applies(match: Match) -> bool:
    a = match.bindings["a"]
    weight, bias = match.value("b"), match.value("c")
    if a.shape is None or len(a.shape) != 2 or weight.ndim != 2:
        return False
    if weight.dtype.kind != "f" or bias.dtype != weight.dtype:
        return False
    features = weight.shape[1]
    if bias.ndim == 0:
        return True
    if bias.ndim == 1:
        return bias.shape[0] in (1, features)
    return bias.ndim == 2 and bias.shape[0] == 1 and bias.shape[1] in (1, features)


RULE = Rule("fuse-matmul-add", matmul_add, gemm, when=gemm_applies)


@register
class FuseMatMulAdd(Pass):
    """Fuse MatMul + Add of a constant 2-D weight and bias into Gemm."""

    name = "fuse-matmul-add"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        infer_shapes(model)
        return rewrite_all(model, RULE, ctx)
