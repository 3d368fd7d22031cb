"""Helpers shared by the fusion passes: targets, axes, and the layout checks of fused kernels.

The target is ``ctx.target``: ``cpu`` and ``cuda`` mean onnxruntime (which runs its contrib ops of
the ``com.microsoft`` domain), ``tensorrt`` means TensorRT, which parses standard ONNX ops only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmp.ir import Model, constant_layout, constant_value, is_constant
from onnxmp.pattern import Rejected, RewriteBuilder

MS_DOMAIN = "com.microsoft"
ONNXRUNTIME_TARGETS = ("cpu", "cuda")
FLOAT_TYPES = (np.float32, np.float16, np.float64)


def for_onnxruntime(target: str) -> bool:
    """Whether the model is made for onnxruntime, which may use its com.microsoft contrib ops."""
    return target in ONNXRUNTIME_TARGETS


def use_ms_domain(model: Model) -> None:
    """Import the com.microsoft domain (version 1), which the fused contrib ops need."""
    model.require_opset(MS_DOMAIN, 1)


def float_dtype(tensor: gs.Tensor) -> np.dtype:
    """The tensor's numpy dtype when it is a float type onnxruntime's fused kernels take; else rejects."""
    dtype = tensor.dtype
    if dtype is None or isinstance(dtype, int) or np.dtype(dtype) not in [np.dtype(t) for t in FLOAT_TYPES]:
        raise Rejected(f"'{tensor.name}' is not known to be float32, float16 or float64")
    return np.dtype(dtype)


def last_dim(tensor: gs.Tensor) -> tuple[int, int]:
    """(rank, static size of the last axis) of ``tensor``; rejects when either is unknown."""
    shape = tensor.shape
    if shape is None or len(shape) == 0:
        raise Rejected(f"the rank of '{tensor.name}' is unknown")
    last = shape[-1]
    if not isinstance(last, (int, np.integer)) or last <= 0:
        raise Rejected(f"the last dimension of '{tensor.name}' is not static")
    return len(shape), int(last)


def reduces_last_axis(node: gs.Node, rank: int) -> None:
    """Rejects unless a ReduceMean keeps its dims and reduces exactly the last of ``rank`` axes,
    given as the ``axes`` attribute (opset < 18) or a constant second input (opset 18+)."""
    if node.attrs.get("keepdims", 1) != 1:
        raise Rejected(f"'{node.name}' does not keep the reduced dimension")
    axes = node.attrs.get("axes")
    if len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        axes = None if value is None else value.reshape(-1).tolist()
    if axes is None or [a % rank for a in axes] != [rank - 1]:
        raise Rejected(f"'{node.name}' does not reduce over the last axis only (axes={axes})")


def scalar(tensor: gs.Tensor, what: str) -> float:
    """The value of a one-element float constant; rejects anything else (a per-channel epsilon)."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        raise Rejected(f"the {what} '{tensor.name}' is not a float scalar constant")
    return float(value.reshape(-1)[0])


def check_vector(tensor: gs.Tensor, size: int, rank: int, dtype: np.dtype, what: str) -> None:
    """Rejects unless ``tensor`` is a constant that broadcasts along the last axis only, i.e. of
    shape [..., 1, size] (or one element) with at most ``rank`` dimensions, of type ``dtype``."""
    if not is_constant(tensor):
        raise Rejected(f"the {what} '{tensor.name}' is not a constant")
    shape, kind = constant_layout(tensor)
    if kind != dtype:
        raise Rejected(f"the {what} '{tensor.name}' is {kind}, the input {dtype}")
    if len(shape) > rank or any(d != 1 for d in shape[:-1]) or (shape and shape[-1] not in (1, size)):
        raise Rejected(f"the {what} '{tensor.name}' of shape {list(shape)} does not broadcast along the last axis only")


def as_vector(op: RewriteBuilder, tensor: gs.Tensor, size: int, hint: str) -> gs.Tensor:
    """The constant as a 1-D tensor of ``size`` elements, reusing it when it already is one."""
    shape, _ = constant_layout(tensor)
    if tuple(shape) == (size,):
        return tensor
    values = constant_value(tensor)
    return op.const(np.ascontiguousarray(np.broadcast_to(values.reshape(-1), (size,))), hint)


def set_like(result: gs.Tensor, like: gs.Tensor) -> gs.Tensor:
    """Give a created tensor the dtype and shape of the one it stands for (contrib ops have no
    onnx shape inference, so later passes would see them untyped)."""
    result.dtype, result.shape = like.dtype, like.shape
    return result
