"""fuse-rowwise-gemm: a Gemm between a Transpose/Reshape round trip runs on the tensor as it was.

PyTorch's nn.MultiheadAttention (torchvision's ViT) exports its output projection as::

    X [B, S, E] -> Transpose(1, 0, 2) -> Reshape [S*B, E] -> Gemm(W, C) -> Reshape [S, B, N] -> Transpose(1, 0, 2)

A Gemm treats each row on its own, and a transpose that keeps the last axis in place only
reorders rows, so the round trip is the identity around it: the whole chain equals
``MatMul(X, W') + C`` on X directly (W' = W transposed when ``transB``). Two transposes of the
activation per layer go away, and the bias Add is left for fuse-skip-layernorm to absorb.

Only static shapes are proven here (after specialize-shapes, or in a model exported with fixed
sizes): both reshapes must be exactly "flatten the leading axes" and "unflatten them back", the
second transpose the inverse of the first, the Gemm plain (alpha = beta = 1, transA = 0) with a
constant 2-D weight and a constant bias of [N], [1, N] or a scalar. Anything else is left alone.
"""

from __future__ import annotations

import numpy as np

from onnxmp.fusion import set_like
from onnxmp.ir import Model, constant_layout, constant_value, iter_graphs
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, Rule, rewrite_all
from onnxmp.shapes import infer_shapes


def transposed_gemm(op, x, flat: Const, w: Const, c: Const, unflat: Const):
    rows = op.Reshape(op.Transpose(x, _name="to_rows"), flat, _name="flatten")
    product = op.Gemm(rows, w, c, _name="gemm")
    return op.Transpose(op.Reshape(product, unflat, _name="unflatten"), _name="back")


def rowwise(op, x, w, c, match: Match):
    weight = constant_value(w)
    if match.nodes["gemm"].attrs.get("transB", 0):
        weight = weight.T
    # Typed like the output they stand for: x may come from a contrib op that onnx's shape
    # inference cannot see through, and fuse-skip-layernorm checks shapes and types.
    product = set_like(op.MatMul(x, op.const(np.ascontiguousarray(weight), "weight")), match.output)
    return set_like(op.Add(product, op.const(constant_value(c).reshape(-1), "bias")), match.output)


def _static(shape) -> list[int] | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape]


def round_trip(match: Match) -> bool:
    """Whether the chain is exactly a row reordering around a plain row-wise Gemm."""
    shape = _static(match.bindings["x"].shape)
    gemm, first, second = match.nodes["gemm"], match.nodes["to_rows"], match.nodes["back"]
    if shape is None or len(shape) < 2:
        return False
    rank = len(shape)
    perm = list(first.attrs.get("perm") or range(rank - 1, -1, -1))
    if perm[-1] != rank - 1 or sorted(perm) != list(range(rank)):
        return False
    inverse = list(np.argsort(perm))
    if list(second.attrs.get("perm") or range(rank - 1, -1, -1)) != inverse:
        return False
    if any(gemm.attrs.get(k, d) != d for k, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0))):
        return False
    if any(match.nodes[n].attrs.get("allowzero", 0) for n in ("flatten", "unflatten")):
        return False
    (w_shape, w_type), (c_shape, c_type) = (constant_layout(match.bindings[k]) for k in "wc")
    if len(w_shape) != 2 or w_type.kind != "f" or c_type != w_type:
        return False
    features = w_shape[0] if gemm.attrs.get("transB", 0) else w_shape[1]
    inner = w_shape[1] if gemm.attrs.get("transB", 0) else w_shape[0]
    if inner != shape[-1] or int(np.prod(c_shape)) not in (1, features) or len(c_shape) > 2:
        return False
    moved = [shape[p] for p in perm]
    rows = int(np.prod(moved[:-1]))
    flat = [int(v) for v in constant_value(match.bindings["flat"]).reshape(-1)]
    unflat = [int(v) for v in constant_value(match.bindings["unflat"]).reshape(-1)]
    return flat in ([rows, shape[-1]], [-1, shape[-1]]) and unflat == moved[:-1] + [features]


RULE = Rule("fuse-rowwise-gemm", transposed_gemm, rowwise, when=round_trip)


@register
class FuseRowwiseGemm(Pass):
    """Run a Gemm wrapped in a Transpose/Reshape round trip as MatMul + Add on the original tensor."""

    name = "fuse-rowwise-gemm"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        if not any(n.op == "Gemm" for g in iter_graphs(model.graph) for n in g.nodes):
            return False
        infer_shapes(model)
        return rewrite_all(model, RULE, ctx)
