"""fuse-layernorm: decomposed LayerNorm -> LayerNormalization, RMSNorm -> RMSNormalization.

LayerNorm, as exporters write it::

    d = x - ReduceMean(x)                      # over the last axis, keepdims
    y = d / Sqrt(ReduceMean(d^2) + eps) * gamma + beta

with the square as Pow(d, 2) or Mul(d, d), the division as Div or Mul by Reciprocal, the axes as
an attribute (opset < 18) or a constant input (opset 18+), beta optional. It becomes
LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps), for every target, from opset 17:
onnxruntime also registers a LayerNormalization for opsets 1-16 in the ai.onnx domain, but
onnx.checker rejects it there, so older models keep the decomposed form.

RMSNorm (``x / Sqrt(ReduceMean(x^2) + eps) * gamma``, or ``x * Reciprocal(Sqrt(..))``, or
``x * Pow(.., -0.5)``) becomes RMSNormalization at opset 23+. onnxruntime's own
SimplifiedLayerNormalization is registered in the ai.onnx domain, which onnx.checker rejects, so
it is not emitted; ``fuse-skip-layernorm`` turns a residual Add + RMSNorm into com.microsoft
SkipSimplifiedLayerNormalization at any opset.

Left alone: a reduction over another or several axes, or without keepdims; an epsilon that is
not a float scalar constant; a gamma or beta that is not a constant broadcasting along the last
axis only; a mean taken of another tensor than the one normalized; intermediates read elsewhere.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from onnxmp.fusion import as_vector, check_vector, float_dtype, last_dim, reduces_last_axis, scalar, set_like
from onnxmp.ir import Model, iter_graphs
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, PVar, Rule, literal, rewrite_all
from onnxmp.shapes import infer_shapes_for

LAYERNORM_OPSET = 17
RMSNORM_OPSET = 23


# ---------------------------------------------------------------- the math, in its variants
def reduce_mean(op, value, axes: PVar | None, tag: str):
    """ReduceMean over axes given as an attribute (``axes`` None) or as a constant input."""
    if axes is None:
        return op.ReduceMean(value, _name=tag)
    return op.ReduceMean(value, axes, _name=tag)


def square(op, value, form: str):
    return op.Pow(value, literal(2.0)) if form == "pow" else op.Mul(value, value)


def inverse_std(op, mean_square, eps, form: str):
    """1 / sqrt(mean_square + eps) as it multiplies (``form`` 'reciprocal' or 'pow'), or the
    sqrt that divides (``form`` 'div'); returns (tensor, how it applies: 'div' or 'mul')."""
    if form == "pow":
        return op.Pow(op.Add(mean_square, eps), literal(-0.5)), "mul"
    root = op.Sqrt(op.Add(mean_square, eps))
    return (op.Reciprocal(root), "mul") if form == "reciprocal" else (root, "div")


def normalize(op, value, scale_form):
    scale, how = scale_form
    return op.Div(value, scale) if how == "div" else op.Mul(value, scale)


def layernorm_math(op, x, gamma, beta, eps, axes: tuple | None, sq: str, div: str):
    """The decomposed LayerNorm of ``x`` (beta None: without the bias)."""
    d = op.Sub(x, reduce_mean(op, x, axes and axes[0], "mean"))
    var = reduce_mean(op, square(op, d, sq), axes and axes[1], "var")
    y = op.Mul(normalize(op, d, inverse_std(op, var, eps, div)), gamma)
    return y if beta is None else op.Add(y, beta)


def rmsnorm_math(op, x, gamma, eps, axes: PVar | None, sq: str, div: str):
    """The decomposed RMSNorm of ``x``."""
    mean_square = reduce_mean(op, square(op, x, sq), axes, "var")
    return op.Mul(normalize(op, x, inverse_std(op, mean_square, eps, div)), gamma)


def layernorm_target(axes_input: bool, sq: str, div: str, with_beta: bool):
    def target(op, x, gamma: Const, beta: Const, eps: Const, axes1: Const, axes2: Const):
        axes = (axes1, axes2) if axes_input else None
        return layernorm_math(op, x, gamma, beta if with_beta else None, eps, axes, sq, div)

    return target


def rmsnorm_target(axes_input: bool, sq: str, div: str):
    def target(op, x, gamma: Const, eps: Const, axes1: Const):
        return rmsnorm_math(op, x, gamma, eps, axes1 if axes_input else None, sq, div)

    return target


def layernorm_targets(axes_input: bool) -> list:
    """Every LayerNorm target function for one way of giving the axes."""
    forms = product(("pow", "mul"), ("div", "reciprocal"), (True, False))
    return [layernorm_target(axes_input, sq, div, beta) for sq, div, beta in forms]


def rmsnorm_targets(axes_input: bool) -> list:
    return [rmsnorm_target(axes_input, sq, div) for sq, div in product(("pow", "mul"), ("div", "reciprocal", "pow"))]


# ---------------------------------------------------------------- conditions and replacements
def norm_layout(match: Match, x_name: str = "x") -> tuple[int, int, Any]:
    """Checks shared by LayerNorm and RMSNorm matches: (rank, hidden size, dtype) of the input."""
    x = match.bindings[x_name]
    dtype = float_dtype(x)
    rank, hidden = last_dim(x)
    for tag in ("mean", "var"):
        if tag in match.nodes:
            reduces_last_axis(match.nodes[tag], rank)
    scalar(match.bindings["eps"], "epsilon")
    check_vector(match.bindings["gamma"], hidden, rank, dtype, "scale")
    if match.bindings.get("beta") is not None:
        check_vector(match.bindings["beta"], hidden, rank, dtype, "bias")
    return rank, hidden, dtype


def layernorm_applies(match: Match) -> bool:
    norm_layout(match)
    return True


def layernorm(op, x, gamma, beta, eps, match):
    _, hidden = last_dim(x)
    scale = as_vector(op, gamma, hidden, "scale")
    bias = as_vector(op, beta, hidden, "bias") if beta is not None else None
    out = op.LayerNormalization(x, scale, bias, axis=-1, epsilon=scalar(eps, "epsilon"))
    return set_like(out, match.output)


def rmsnorm(op, x, gamma, eps, match):
    _, hidden = last_dim(x)
    out = op.RMSNormalization(x, as_vector(op, gamma, hidden, "scale"), axis=-1, epsilon=scalar(eps, "epsilon"))
    return set_like(out, match.output)


def rules(opset: int) -> list[Rule]:
    """The rules that apply at the model's ai.onnx opset."""
    axes_input = opset >= 18
    found = []
    if opset >= LAYERNORM_OPSET:
        found += [Rule("fuse-layernorm", t, layernorm, when=layernorm_applies) for t in layernorm_targets(axes_input)]
    if opset >= RMSNORM_OPSET:
        found += [Rule("fuse-layernorm", t, rmsnorm, when=layernorm_applies) for t in rmsnorm_targets(axes_input)]
    return found


@register
class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm into LayerNormalization (opset 17+), RMSNorm into RMSNormalization (opset 23+)."""

    name = "fuse-layernorm"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        found = rules(model.opset())
        if not found:
            return False
        infer_shapes_for(model, [n.inputs[0] for g in iter_graphs(model.graph) for n in g.nodes if n.op == "ReduceMean"])
        return rewrite_all(model, found, ctx)
