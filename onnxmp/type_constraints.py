"""Which inputs and outputs of a node may change element type, read from onnx's operator schemas.

A schema binds each formal parameter to a type variable (``T``) with a list of allowed types, or
to a fixed type (``tensor(float)``). Tensors bound to the same variable must share a type, so a
precision change is decided per variable: a variable bound to float32 tensors can move to float16
(or bfloat16) when the schema allows it for the model's opset; parameters with a fixed type, and
variables that do not allow the lower type, stay as they are. Integer and bool tensors are never
touched. Cast, Constant and ConstantOfShape carry their output type in an attribute, handled here
too.

onnxruntime's contrib ops that the fusion passes create have no onnx schema; ``CONTRIB_SIGNATURES``
gives theirs, from onnxruntime's contrib operator specs (docs/ContribOperators.md), so that the
precision pass types them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxmp.ir import elem_type, is_omitted

FLOAT32 = TensorProto.FLOAT
TYPE_NAMES = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
# Attributes that set an output's element type (EyeLike, Random*, Bernoulli, the window
# functions, MelWeightMatrix, DequantizeLinear): a float32 value there pins the output.
TYPE_ATTRIBUTES = ("dtype", "output_datatype", "output_dtype")


@dataclass
class NodeTyping:
    """How a node's float32 tensors may change when the node runs in a lower precision."""

    inputs: list[int] = field(default_factory=list)  # input positions that follow the node's precision
    outputs: list[int] = field(default_factory=list)  # output positions that follow it
    fixed_inputs: list[int] = field(default_factory=list)  # float32 inputs that must stay float32
    attribute: str | None = None  # attribute holding the output type ("to", "value")
    reason: str = ""  # why the node cannot change precision, when it cannot

    @property
    def convertible(self) -> bool:
        return bool(self.outputs or self.inputs) and not self.reason


_FLOATS = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")
_GPU_FLOATS = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
_INT32 = ("tensor(int32)",)
# (domain, op) -> (inputs, outputs, type constraints); a formal is "name:TYPE", optional ones
# marked "?". onnxruntime registers SimplifiedLayerNormalization in the ai.onnx domain.
CONTRIB_SIGNATURES: dict[tuple[str, str], tuple[list[str], list[str], dict[str, tuple[str, ...]]]] = {
    ("com.microsoft", "Gelu"): (["X:T"], ["Y:T"], {"T": _FLOATS}),
    ("com.microsoft", "FastGelu"): (["X:T", "bias:T?"], ["Y:T"], {"T": _GPU_FLOATS}),
    ("com.microsoft", "BiasGelu"): (["A:T", "B:T"], ["C:T"], {"T": _FLOATS}),
    ("com.microsoft", "SkipLayerNormalization"): (
        ["input:T", "skip:T", "gamma:T", "beta:T?", "bias:T?"],
        ["output:T", "mean:U?", "inv_std_var:U?", "input_skip_bias_sum:T?"],
        {"T": _FLOATS, "U": ("tensor(float)",)},
    ),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (
        ["input:T", "skip:T", "gamma:T", "bias:T?"],
        ["output:T", "mean:U?", "inv_std_var:U?", "input_skip_bias_sum:T?"],
        {"T": _FLOATS, "U": ("tensor(float)",)},
    ),
    ("", "SimplifiedLayerNormalization"): (
        ["X:T", "scale:V"],
        ["Y:V", "inv_std_var:U?"],
        {"T": _FLOATS, "U": ("tensor(float)", "tensor(double)"), "V": _FLOATS},
    ),
    ("com.microsoft", "MultiHeadAttention"): (
        ["query:T", "key:T?", "value:T?", "bias:T?", "key_padding_mask:M?", "attention_bias:T?",
         "past_key:T?", "past_value:T?", "past_sequence_length:M?", "cache_indirection:M?"],
        ["output:T", "present_key:T?", "present_value:T?", "qk:QK?"],
        {"T": _GPU_FLOATS, "M": _INT32, "QK": _GPU_FLOATS},
    ),
    ("com.microsoft", "Attention"): (
        ["input:T", "weights:T", "bias:T?", "mask_index:M?", "past:T?", "attention_bias:T?", "past_sequence_length:M?"],
        ["output:T", "present:T?"],
        {"T": _GPU_FLOATS, "M": _INT32},
    ),
    ("com.microsoft", "EmbedLayerNormalization"): (
        ["input_ids:T1", "segment_ids:T1?", "word_embedding:T", "position_embedding:T", "segment_embedding:T?",
         "gamma:T", "beta:T", "mask:T1?", "position_ids:T1?"],
        ["output:T", "mask_index:T1?", "embedding_sum:T?"],
        {"T": ("tensor(float)", "tensor(float16)"), "T1": _INT32},
    ),
    ("com.microsoft", "FusedConv"): (
        ["X:T", "W:T", "B:T?", "Z:T?"], ["Y:T"], {"T": ("tensor(float16)", "tensor(float)", "tensor(double)")}
    ),
}  # fmt: skip


@lru_cache(maxsize=None)
def op_schema(op_type: str, domain: str, opset: int) -> onnx.defs.OpSchema | None:
    """onnx's schema of the op at ``opset``, or one built from ``CONTRIB_SIGNATURES``; None if unknown."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return _contrib_schema(op_type, domain)


def _contrib_schema(op_type: str, domain: str) -> onnx.defs.OpSchema | None:
    """An unregistered OpSchema built from ``CONTRIB_SIGNATURES`` (its formals are what callers read)."""
    signature = CONTRIB_SIGNATURES.get((domain, op_type))
    if signature is None:
        return None
    inputs, outputs, constraints = signature

    def formals(specs: list[str]) -> list[onnx.defs.OpSchema.FormalParameter]:
        made = []
        for spec in specs:
            name, type_str = spec.rstrip("?").split(":")
            options = onnx.defs.OpSchema.FormalParameterOption
            option = options.Optional if spec.endswith("?") else options.Single
            made.append(onnx.defs.OpSchema.FormalParameter(name, type_str, param_option=option))
        return made

    return onnx.defs.OpSchema(
        op_type,
        domain,
        1,
        inputs=formals(inputs),
        outputs=formals(outputs),
        type_constraints=[(name, list(types), "") for name, types in constraints.items()],
    )


def node_typing(node: gs.Node, opset: int, low: int) -> NodeTyping:
    """The float32 inputs/outputs of ``node`` that would move to type ``low``, per its schema."""
    domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
    if any(not is_tensor_value(t) for t in list(node.inputs) + list(node.outputs) if not is_omitted(t)):
        # A sequence's or optional's element type is tied to tensors the schema binds to other
        # type variables (SplitToSequence, SequenceAt, OptionalGetElement): it cannot be changed alone.
        return NodeTyping(reason="it reads or writes sequences or optionals")
    if node.op == "BitCast" and not domain:
        return NodeTyping(reason="BitCast reinterprets the bits of its input")
    if node.op == "Cast" and not domain:
        return _cast_typing(node)
    if node.op == "CastLike" and not domain:
        return _castlike_typing(node)
    if node.op in ("Constant", "ConstantOfShape") and not domain:
        return _constant_typing(node)
    schema = op_schema(node.op, domain, opset)
    if schema is None:
        return NodeTyping(reason=f"no schema for {domain or 'ai.onnx'}.{node.op} at opset {opset}")
    for name in TYPE_ATTRIBUTES:
        if name in schema.attributes and node.attrs.get(name, _default_int(schema, name)) == FLOAT32:
            return NodeTyping(reason=f"its attribute '{name}' fixes its output type to float32")
    bindings = _bind(schema, node)
    if bindings is None:
        return NodeTyping(reason="inputs or outputs do not fit the schema")
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    typing = NodeTyping()
    unknown = False
    for type_str, members in bindings.items():
        types = {elem_type(tensor) for _, _, tensor in members} - {None}
        if not types:
            unknown = True
            continue
        if types != {FLOAT32}:  # one variable, one type: known members decide for all
            continue
        follows = type_str in constraints and TYPE_NAMES[low] in constraints[type_str]
        for kind, index, _ in members:
            if follows:
                (typing.inputs if kind == "in" else typing.outputs).append(index)
            elif kind == "in":
                typing.fixed_inputs.append(index)
    if unknown and not (typing.inputs or typing.outputs):
        typing.reason = "element types unknown (shape inference could not type the node)"
    elif not (typing.inputs or typing.outputs) and typing.fixed_inputs:
        typing.reason = f"the {node.op} schema allows no {onnx.helper.tensor_dtype_to_np_dtype(low).name} here"
    return typing


def _default_int(schema: onnx.defs.OpSchema, name: str) -> int | None:
    """An int attribute's default (the window functions' output_datatype is float32 unless set)."""
    default = schema.attributes[name].default_value
    return default.i if default.name and default.type == onnx.AttributeProto.INT else None


def is_tensor_value(tensor: gs.Tensor) -> bool:
    """A plain tensor, not a sequence, optional or map (whose dtype onnx-graphsurgeon also keeps)."""
    return getattr(tensor, "type", "tensor_type") == "tensor_type"


def is_float32_tensor(tensor: gs.Tensor) -> bool:
    return elem_type(tensor) == FLOAT32 and is_tensor_value(tensor)


def _bind(schema: onnx.defs.OpSchema, node: gs.Node):
    """``{type_str: [(kind, position, tensor), ...]}`` for the node's present inputs and outputs."""
    bindings: dict[str, list] = {}
    for kind, formals, actuals in (("in", schema.inputs, node.inputs), ("out", schema.outputs, node.outputs)):
        if not formals:
            if actuals:
                return None
            continue
        for position, tensor in enumerate(actuals):
            if is_omitted(tensor):
                continue
            index = min(position, len(formals) - 1)
            formal = formals[index]
            if position >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
                return None
            type_str = formal.type_str
            if formal.option == onnx.defs.OpSchema.FormalParameterOption.Variadic and not formal.is_homogeneous:
                type_str = f"{type_str}#{position}"  # heterogeneous variadic: each its own type
            bindings.setdefault(type_str, []).append((kind, position, tensor))
    return bindings


def _cast_typing(node: gs.Node) -> NodeTyping:
    source, target = elem_type(node.inputs[0]), node.attrs.get("to")
    typing = NodeTyping(attribute="to")
    if target == FLOAT32:
        typing.outputs.append(0)
        if source == FLOAT32:
            typing.inputs.append(0)  # float32 -> float32: an identity at any precision
    elif source == FLOAT32:
        typing.fixed_inputs.append(0)  # float -> int or other: rounding first would change it
        typing.reason = "casts a float32 value to another type"
    return typing


def _castlike_typing(node: gs.Node) -> NodeTyping:
    """CastLike as Cast, with the target type read from its second input: a float32 value cast
    to another type must not be rounded to the low type first (CastLike(x, int_like) of 2049.0
    would give 2048)."""
    source, target = elem_type(node.inputs[0]), elem_type(node.inputs[1])
    typing = NodeTyping()
    if target == FLOAT32:
        typing.inputs.append(1)
        typing.outputs.append(0)
        if source == FLOAT32:
            typing.inputs.append(0)
    elif source == FLOAT32:
        typing.fixed_inputs.append(0)
        typing.reason = "casts a float32 value to another type"
    return typing


def _constant_typing(node: gs.Node) -> NodeTyping:
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant) and elem_type(value) == FLOAT32:
        return NodeTyping(outputs=[0], attribute="value")
    return NodeTyping(reason="not a float32 constant")
