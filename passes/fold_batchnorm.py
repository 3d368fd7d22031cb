"""fold-batchnorm: fold an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm
that feeds it, when that producer's weights and the BatchNormalization's parameters are constant
and nothing else reads the producer's output.

With ``f = scale / sqrt(var + epsilon)`` per output channel: ``W' = W * f`` along the output
channel axis and ``b' = (b - mean) * f + shift``. Weights are computed in float64 and stored in
the weights' own dtype.
"""

from __future__ import annotations

import numpy as np

from onnxmp.ir import Model
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, RewriteBuilder, Rule, rewrite_all

FLOAT_KINDS = "f"


def _with_bias(op_type: str):
    def target(op, x, w: Const, b: Const, scale: Const, shift: Const, mean: Const, var: Const):
        producer = getattr(op, op_type)(x, w, b, _name="producer")
        return op.BatchNormalization(producer, scale, shift, mean, var, _name="bn")

    return target


def _without_bias(op_type: str):
    def target(op, x, w: Const, scale: Const, shift: Const, mean: Const, var: Const):
        producer = getattr(op, op_type)(x, w, _name="producer")
        return op.BatchNormalization(producer, scale, shift, mean, var, _name="bn")

    return target


def _fold(op: RewriteBuilder, match: Match):
    producer, bn = match.nodes["producer"], match.nodes["bn"]
    if bn.attrs.get("training_mode", 0):
        return None
    weight = match.value("w")
    if weight.dtype.kind not in FLOAT_KINDS:
        return None
    scale, shift, mean, var = (match.value(k).astype(np.float64) for k in ("scale", "shift", "mean", "var"))
    factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    folded = _fold_weights(producer.op, producer.attrs, weight.astype(np.float64), factor)
    if folded is None:
        return None
    new_weight, channels = folded
    bias = match.value("b") if "b" in match.bindings else np.zeros(channels)
    if producer.op == "Gemm":
        new_bias = _gemm_bias(producer.attrs, bias, mean, factor, shift)
    elif bias.shape == (channels,):
        new_bias = (bias.astype(np.float64) - mean) * factor + shift
    else:
        return None
    if new_bias is None:
        return None
    attrs = dict(producer.attrs)
    if producer.op == "Gemm":
        attrs["alpha"], attrs["beta"] = 1.0, 1.0
    return getattr(op, producer.op)(
        match.bindings["x"],
        op.const(new_weight.astype(weight.dtype), "weight"),
        op.const(new_bias.astype(weight.dtype), "bias"),
        **attrs,
    )


def _fold_weights(op_type: str, attrs: dict, weight: np.ndarray, factor: np.ndarray):
    """``weight`` scaled per output channel, and the channel count; None if shapes disagree."""
    if op_type == "Conv":
        channels = weight.shape[0]
        if factor.shape != (channels,):
            return None
        return weight * factor.reshape((-1,) + (1,) * (weight.ndim - 1)), channels
    if op_type == "ConvTranspose":  # weight [C_in, C_out/group, k...]
        group = int(attrs.get("group", 1))
        per_group = weight.shape[1]
        channels = per_group * group
        if factor.shape != (channels,) or weight.shape[0] % group:
            return None
        grouped = weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])
        scaled = grouped * factor.reshape((group, 1, per_group) + (1,) * (weight.ndim - 2))
        return scaled.reshape(weight.shape), channels
    # Gemm: output features are B's columns, or its rows when transB=1; alpha goes into B.
    if weight.ndim != 2:
        return None
    axis = 0 if attrs.get("transB", 0) else 1
    channels = weight.shape[axis]
    if factor.shape != (channels,):
        return None
    per_feature = factor[:, None] if axis == 0 else factor[None, :]
    return weight * per_feature * float(attrs.get("alpha", 1.0)), channels


def _gemm_bias(attrs: dict, bias: np.ndarray, mean: np.ndarray, factor: np.ndarray, shift: np.ndarray):
    """Gemm's new C with beta folded in; alpha was folded into the weights."""
    beta = float(attrs.get("beta", 1.0))
    if bias.ndim > 2:
        return None
    try:
        return (beta * bias.astype(np.float64) - mean) * factor + shift
    except ValueError:
        return None


RULES = [
    Rule(f"fold-batchnorm-{op.lower()}{suffix}", make(op), _fold)
    for op in ("Conv", "ConvTranspose", "Gemm")
    for suffix, make in (("", _with_bias), ("-nobias", _without_bias))
]


@register
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""

    name = "fold-batchnorm"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        return rewrite_all(model, RULES, ctx)
