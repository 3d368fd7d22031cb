"""fuse-skip-layernorm: residual Add + LayerNorm -> com.microsoft SkipLayerNormalization.

For onnxruntime targets (``cpu``, ``cuda``) only; TensorRT fuses residual adds itself. Matched::

    LayerNormalization(Add(x, skip), gamma[, beta])            -> SkipLayerNormalization(x, skip, gamma, beta)
    LayerNormalization(Add(Add(x, bias), skip), gamma[, beta])  -> ... with bias (a linear layer's bias)
    RMSNorm(Add(x, skip)), decomposed as fuse-layernorm matches it or RMSNormalization (opset 23)
                                                                -> SkipSimplifiedLayerNormalization

Run it after ``fuse-layernorm``. When the sum is read elsewhere too (pre-LN transformers such as
ViT, where the residual stream goes on), the fused node also writes it, as its fourth output
``input_skip_bias_sum``. onnxruntime's kernels take 2-D or 3-D inputs of the same shape, with
1-D gamma, beta and bias of the hidden size; anything else is left alone: inputs of another rank
or of different (broadcast) shapes, a LayerNormalization over another axis or whose mean or
inverse standard deviation outputs are read.
"""

from __future__ import annotations

from itertools import product

from onnxmp.fusion import (
    MS_DOMAIN,
    as_vector,
    check_vector,
    float_dtype,
    for_onnxruntime,
    last_dim,
    reduces_last_axis,
    scalar,
    set_like,
    use_ms_domain,
)
from onnxmp.ir import Model
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, Rejected, Rule, rewrite_all
from onnxmp.passes.fusion_layernorm import rmsnorm_math
from onnxmp.shapes import infer_shapes

DEFAULT_EPSILON = 1e-5  # LayerNormalization's and RMSNormalization's default
RMS_FORMS = list(product(("pow", "mul"), ("div", "reciprocal", "pow")))


def residual(op, x, skip, bias, with_bias: bool):
    first = op.Add(x, bias, _name="bias_add") if with_bias else x
    return op.Add(first, skip, _name="sum")


def layernorm_target(with_bias: bool, with_beta: bool):
    def target(op, x, skip, gamma: Const, beta: Const, bias: Const):
        total = residual(op, x, skip, bias, with_bias)
        scale_and_bias = (gamma, beta) if with_beta else (gamma,)
        norm = op.LayerNormalization(total, *scale_and_bias, _name="ln")
        return norm, total

    return target


def rms_node_target(with_bias: bool):
    def target(op, x, skip, gamma: Const, bias: Const):
        total = residual(op, x, skip, bias, with_bias)
        return op.RMSNormalization(total, gamma, _name="ln"), total

    return target


def rms_math_target(with_bias: bool, axes_input: bool, sq: str, div: str):
    def target(op, x, skip, gamma: Const, bias: Const, eps: Const, axes1: Const):
        total = residual(op, x, skip, bias, with_bias)
        return rmsnorm_math(op, total, gamma, eps, axes1 if axes_input else None, sq, div), total

    return target


# ---------------------------------------------------------------- conditions
def skip_applies(match: Match) -> bool:
    """The layout onnxruntime's SkipLayerNormalization kernels accept (skip_layer_norm_helper.h)."""
    x, skip = match.bindings["x"], match.bindings["skip"]
    dtype = float_dtype(x)
    rank, hidden = last_dim(x)
    if rank not in (2, 3):
        raise Rejected(f"'{x.name}' has rank {rank}; the kernel takes 2-D or 3-D inputs")
    if skip.shape is None or list(skip.shape) != list(x.shape) or skip.dtype != x.dtype:
        raise Rejected(f"'{x.name}' {x.shape} and '{skip.name}' {skip.shape} do not have the same shape and type")
    norm = match.nodes.get("ln")
    if norm is not None:
        if norm.attrs.get("axis", -1) % rank != rank - 1:
            raise Rejected(f"'{norm.name}' normalizes from axis {norm.attrs.get('axis')}, not the last axis")
    else:
        reduces_last_axis(match.nodes["var"], rank)
        scalar(match.bindings["eps"], "epsilon")
    for name, what in (("gamma", "scale"), ("beta", "bias"), ("bias", "bias")):
        if match.bindings.get(name) is not None:
            check_vector(match.bindings[name], hidden, 1, dtype, what)
    return True


def _epsilon(match: Match) -> float:
    if "eps" in match.bindings:
        return scalar(match.bindings["eps"], "epsilon")
    return float(match.nodes["ln"].attrs.get("epsilon", DEFAULT_EPSILON))


def _fused(op, op_type: str, inputs: list, match: Match):
    """The fused node; it writes the sum too when something outside the match reads it."""
    wants_sum = match.used_outside(1)
    outputs = getattr(op, op_type)(*inputs, _domain=MS_DOMAIN, _outputs=[True, False, False, wants_sum], epsilon=_epsilon(match))
    total = set_like(outputs[3], match.outputs[1]) if wants_sum else None
    return set_like(outputs[0], match.outputs[0]), total


def _vector(op, tensor, x, hint: str):
    return None if tensor is None else as_vector(op, tensor, last_dim(x)[1], hint)


def skip_layernorm(op, x, skip, gamma, beta, bias, match):
    inputs = [x, skip, _vector(op, gamma, x, "gamma"), _vector(op, beta, x, "beta"), _vector(op, bias, x, "bias")]
    return _fused(op, "SkipLayerNormalization", inputs, match)


def skip_simplified(op, x, skip, gamma, bias, match):
    inputs = [x, skip, _vector(op, gamma, x, "gamma"), _vector(op, bias, x, "bias")]
    return _fused(op, "SkipSimplifiedLayerNormalization", inputs, match)


def rules(opset: int) -> list[Rule]:
    name = "fuse-skip-layernorm"
    found = []
    for with_bias in (True, False):
        found += [Rule(name, layernorm_target(with_bias, beta), skip_layernorm, when=skip_applies) for beta in (True, False)]
    # SkipSimplifiedLayerNormalization's bias input: onnxruntime versions disagree on whether the
    # fourth output includes it, so a bias Add stays outside the fused RMSNorm.
    found.append(Rule(name, rms_node_target(False), skip_simplified, when=skip_applies))
    axes_input = opset >= 18
    found += [
        Rule(name, rms_math_target(False, axes_input, sq, div), skip_simplified, when=skip_applies) for sq, div in RMS_FORMS
    ]
    return found


@register
class FuseSkipLayerNorm(Pass):
    """Fuse residual Add + LayerNorm/RMSNorm into com.microsoft SkipLayerNormalization (onnxruntime targets)."""

    name = "fuse-skip-layernorm"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        if not for_onnxruntime(ctx.target):
            return False
        infer_shapes(model)
        changed = rewrite_all(model, rules(model.opset()), ctx)
        if changed:
            use_ms_domain(model)
        return changed
