"""fuse-gelu: erf and tanh GELU -> one op, chosen by the target.

Matched, in the arrangements exporters write (``0.5 * x * (1 + g)``, ``x * 0.5 * (1 + g)``,
``x * (0.5 * (1 + g))``, any operand order)::

    erf:   g = Erf(x / sqrt(2))    or Erf(x * (1 / sqrt(2)))
    tanh:  g = Tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)),  x^3 as Pow(x, 3) or x * (x * x)

What replaces it:
- target ``cpu`` / ``cuda`` (onnxruntime): com.microsoft Gelu (erf) or FastGelu (tanh); when x
  is ``Add(a, bias)`` with a constant 1-D bias over the last axis, com.microsoft BiasGelu (erf)
  or FastGelu with its bias input (tanh), so the bias add runs in the same kernel;
- target ``tensorrt``: ONNX Gelu (``approximate="tanh"`` for the tanh form) from opset 20; older
  models keep the decomposed form, which TensorRT fuses itself.
"""

from __future__ import annotations

import math
from itertools import product

from onnxmp.fusion import MS_DOMAIN, as_vector, check_vector, float_dtype, for_onnxruntime, last_dim, set_like, use_ms_domain
from onnxmp.ir import Model
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, Rule, literal, rewrite_all
from onnxmp.shapes import infer_shapes

GELU_OPSET = 20
TOLERANCE = 1e-4  # relative, on the constants: exporters round sqrt(2), sqrt(2/pi) differently


def _c(value: float):
    return literal(value, rtol=TOLERANCE, atol=0.0)


def erf_inner(op, x, scale: str):
    scaled = op.Div(x, _c(math.sqrt(2.0))) if scale == "div" else op.Mul(x, _c(1.0 / math.sqrt(2.0)))
    return op.Erf(scaled)


def tanh_inner(op, x, cube: str):
    cubed = op.Pow(x, _c(3.0)) if cube == "pow" else op.Mul(x, op.Mul(x, x))
    return op.Tanh(op.Mul(op.Add(x, op.Mul(cubed, _c(0.044715))), _c(math.sqrt(2.0 / math.pi))))


def gelu_outer(op, x, g, arrangement: str):
    """0.5 * x * (1 + g) in one of its arrangements."""
    one_plus = op.Add(g, _c(1.0))
    if arrangement == "x_then_half":
        return op.Mul(op.Mul(x, one_plus), _c(0.5))
    if arrangement == "half_x_first":
        return op.Mul(op.Mul(x, _c(0.5)), one_plus)
    return op.Mul(x, op.Mul(one_plus, _c(0.5)))


ARRANGEMENTS = ("x_then_half", "half_x_first", "half_inside")


def gelu_target(form: str, variant: str, arrangement: str, with_bias: bool):
    inner = erf_inner if form == "erf" else tanh_inner

    if with_bias:

        def target(op, a, bias: Const):
            x = op.Add(a, bias, _name="bias_add")
            return gelu_outer(op, x, inner(op, x, variant), arrangement)

        return target

    def target(op, x):
        return gelu_outer(op, x, inner(op, x, variant), arrangement)

    return target


def gelu_targets(form: str, with_bias: bool) -> list:
    variants = ("div", "mul") if form == "erf" else ("pow", "mul")
    return [gelu_target(form, v, a, with_bias) for v, a in product(variants, ARRANGEMENTS)]


# ---------------------------------------------------------------- replacements
def bias_applies(match: Match) -> bool:
    """The bias must be a constant over the last axis that onnxruntime's kernels take as 1-D."""
    a = match.bindings["a"]
    rank, hidden = last_dim(a)
    check_vector(match.bindings["bias"], hidden, rank, float_dtype(a), "bias")
    return True


def _bias_vector(op, a, bias):
    return as_vector(op, bias, last_dim(a)[1], "bias")


def ort_gelu(op, x, match):
    return set_like(op.Gelu(x, _domain=MS_DOMAIN), match.output)


def ort_fast_gelu(op, x, match):
    return set_like(op.FastGelu(x, _domain=MS_DOMAIN), match.output)


def ort_bias_gelu(op, a, bias, match):
    return set_like(op.BiasGelu(a, _bias_vector(op, a, bias), _domain=MS_DOMAIN), match.output)


def ort_fast_gelu_bias(op, a, bias, match):
    return set_like(op.FastGelu(a, _bias_vector(op, a, bias), _domain=MS_DOMAIN), match.output)


def onnx_gelu(op, x, match):
    return set_like(op.Gelu(x), match.output)


def onnx_gelu_tanh(op, x, match):
    return set_like(op.Gelu(x, approximate="tanh"), match.output)


def rules(target: str, opset: int) -> list[Rule]:
    """The rules for a target and ai.onnx opset, the bias-absorbing ones first."""
    name = "fuse-gelu"
    if for_onnxruntime(target):
        return (
            [Rule(name, t, ort_bias_gelu, when=bias_applies) for t in gelu_targets("erf", True)]
            + [Rule(name, t, ort_fast_gelu_bias, when=bias_applies) for t in gelu_targets("tanh", True)]
            + [Rule(name, t, ort_gelu) for t in gelu_targets("erf", False)]
            + [Rule(name, t, ort_fast_gelu) for t in gelu_targets("tanh", False)]
        )
    if opset >= GELU_OPSET:
        return [Rule(name, t, onnx_gelu) for t in gelu_targets("erf", False)] + [
            Rule(name, t, onnx_gelu_tanh) for t in gelu_targets("tanh", False)
        ]
    return []


@register
class FuseGelu(Pass):
    """Fuse erf/tanh GELU into com.microsoft Gelu/FastGelu/BiasGelu (onnxruntime) or Gelu (opset 20+)."""

    name = "fuse-gelu"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        found = rules(ctx.target, model.opset())
        if not found:
            return False
        infer_shapes(model)
        changed = rewrite_all(model, found, ctx)
        if changed and for_onnxruntime(ctx.target):
            use_ms_domain(model)
        return changed
