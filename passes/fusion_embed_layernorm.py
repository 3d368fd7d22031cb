"""fuse-embed-layernorm: BERT-style embeddings + LayerNorm -> com.microsoft EmbedLayerNormalization.

For onnxruntime targets (``cpu``, ``cuda``) only. Matched::

    LayerNormalization(word[ids] + position[positions] (+ segment[segment_ids]), gamma, beta)

with the three Gathers (axis 0, constant 2-D tables of one hidden size) added in any order and
association. One of them must read the positions 0 .. S-1, S being the sequence length of the
token ids: either constant indices [1, S] equal to that range (a model with static shapes), or
transformers' ``Slice(position_ids_buffer, 0, S, axis 1)`` of a constant buffer [1, P] that holds
0 .. P-1, with S computed from the token ids' shape. The other two read [B, S] integer tensors of
one shape (the token ids and the token types); their roles are interchangeable in the sum, so the
larger table becomes ``word_embedding``.

The fused node computes the same sum and normalization in one kernel; it takes int32 ids, so
int64 ids go through a Cast (ids beyond the int32 range could not index a table anyway). Its
``mask_index`` output (which onnxruntime's shape inference requires) is not read, and it takes no
mask: the padding mask stays
with the attention (``simplify-padding-mask``, ``fuse-attention``), which is exact for any
padding, where onnxruntime's own optimizer turns the mask into sequence lengths (right padding
only). Run after ``fuse-layernorm``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxmp.fusion import MS_DOMAIN, as_vector, check_vector, float_dtype, for_onnxruntime, last_dim, set_like, use_ms_domain
from onnxmp.head_layout import Analysis, dim_size
from onnxmp.ir import Model, constant_value, producer
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Const, Match, Rejected, Rule, rewrite_all
from onnxmp.shapes import infer_shapes

NAME = "fuse-embed-layernorm"
DEFAULT_EPSILON = 1e-5  # LayerNormalization's default
INDEX_TYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _lookup(op, table, indices, index: int):
    return op.Gather(table, indices, axis=lambda a: a in (None, 0), _name=f"gather{index}")


def _norm(op, total, gamma, beta):
    return op.LayerNormalization(total, gamma, beta, _name="ln")


# Add is commutative and the roles are assigned after matching, so these cover every order.
def three_lookups(op, t0: Const, i0, t1: Const, i1, t2: Const, i2, gamma: Const, beta: Const):
    """BERT: word, token type and position lookups."""
    total = op.Add(op.Add(_lookup(op, t0, i0, 0), _lookup(op, t1, i1, 1)), _lookup(op, t2, i2, 2))
    return _norm(op, total, gamma, beta)


def two_lookups(op, t0: Const, i0, t1: Const, i1, gamma: Const, beta: Const):
    """DistilBERT: word and position lookups."""
    return _norm(op, op.Add(_lookup(op, t0, i0, 0), _lookup(op, t1, i1, 1)), gamma, beta)


def two_lookups_folded_positions(op, t0: Const, i0, t1: Const, i1, positions: Const, gamma: Const, beta: Const):
    """BERT with static shapes: the position lookup folded into a constant [1, S, H]."""
    total = op.Add(op.Add(_lookup(op, t0, i0, 0), _lookup(op, t1, i1, 1)), positions)
    return _norm(op, total, gamma, beta)


def one_lookup_folded_positions(op, t0: Const, i0, positions: Const, gamma: Const, beta: Const):
    """DistilBERT with static shapes."""
    return _norm(op, op.Add(_lookup(op, t0, i0, 0), positions), gamma, beta)


FORMS = (three_lookups, two_lookups, two_lookups_folded_positions, one_lookup_folded_positions)


# ---------------------------------------------------------------- conditions
def _lookups(match: Match) -> list[tuple[gs.Tensor, gs.Tensor]]:
    count = sum(1 for name in match.nodes if name.startswith("gather"))
    return [(match.bindings[f"t{i}"], match.bindings[f"i{i}"]) for i in range(count)]


def roles(match: Match) -> dict[str, tuple[gs.Tensor | np.ndarray, gs.Tensor | None]]:
    """{'position': ..., 'word': ..., 'segment': ...} (segment only when there are two id
    lookups), each a (table, indices) pair; for the folded forms the position table is the
    folded constant's values as [S, H] and its indices None. Rejected unless the position lookup reads
    exactly the rows 0 .. S-1."""
    lookups = _lookups(match)
    folded = match.bindings.get("positions")
    ids = [indices for _, indices in lookups if folded is not None or not _is_position_range(indices, None)]
    if len(ids) != len(lookups) - (0 if folded is not None else 1):
        raise Rejected(f"{len(lookups) - len(ids)} of the lookups read constant or sliced positions; one must")
    for indices in ids:
        if indices.dtype is None or np.dtype(indices.dtype) not in INDEX_TYPES or indices.shape is None or len(indices.shape) != 2:
            raise Rejected(f"'{indices.name}' is not a [batch, sequence] int32/int64 tensor")
    if len(ids) == 2 and (ids[0].shape != ids[1].shape or ids[0].dtype != ids[1].dtype):
        raise Rejected(f"'{ids[0].name}' {ids[0].shape} and '{ids[1].name}' {ids[1].shape} differ in shape or type")
    token_ids = ids[0]
    if folded is not None:
        position = (_folded_table(folded, token_ids), None)
    else:
        positions = [pair for pair in lookups if _is_position_range(pair[1], token_ids)]
        if not positions:
            raise Rejected(f"the position lookup does not read 0 .. S-1 for the sequence length of '{token_ids.name}'")
        position = positions[0]
    others = sorted((pair for pair in lookups if pair is not position), key=lambda pair: -_rows(pair[0]))
    found = {"position": position, "word": others[0]}
    if len(others) == 2:
        found["segment"] = others[1]
    return found


def _folded_table(positions: gs.Tensor, token_ids: gs.Tensor) -> np.ndarray:
    """A constant [1, S, H] or [S, H] added for every batch row is a table of S positions."""
    value = constant_value(positions)
    sequence = dim_size(token_ids, 1)
    if value is None or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[0] != 1):
        raise Rejected(f"the constant '{positions.name}' is not [1, S, H] or [S, H]")
    if not sequence.static or value.shape[-2] != sequence.coef:
        raise Rejected(f"the constant '{positions.name}' {list(value.shape)} does not span the sequence of '{token_ids.name}'")
    return np.ascontiguousarray(value.reshape(value.shape[-2:]))


def _rows(table: gs.Tensor) -> int:
    shape = table.shape or [0]
    return int(shape[0])


def _is_position_range(indices: gs.Tensor, token_ids: gs.Tensor | None) -> bool:
    """Whether ``indices`` holds [[0, 1, ..., S-1]] for the sequence length S of ``token_ids``
    (any S when ``token_ids`` is None: only the form is checked then)."""
    value = constant_value(indices)
    if value is not None:
        if value.ndim != 2 or value.shape[0] != 1 or not np.array_equal(value[0], np.arange(value.shape[1])):
            return False
        return token_ids is None or dim_size(token_ids, 1).coef == value.shape[1] and dim_size(token_ids, 1).static
    node = producer(indices)
    if node is None or node.op != "Slice" or len(node.inputs) < 3:
        return False
    buffer = constant_value(node.inputs[0])
    if buffer is None or buffer.ndim != 2 or buffer.shape[0] != 1 or not np.array_equal(buffer[0], np.arange(buffer.shape[1])):
        return False
    starts, axes, steps = (_ints(node, i) for i in (1, 3, 4))
    if starts != [0] or axes not in ([1], [-1]) or steps not in (None, [1]):
        return False
    if token_ids is None:
        return True
    try:
        _, ends = Analysis(1).value(node.inputs[2])
    except Rejected:
        return False
    return len(ends) == 1 and ends[0] == dim_size(token_ids, 1)


def _ints(node: gs.Node, index: int) -> list[int] | None:
    if len(node.inputs) <= index or node.inputs[index].name == "":
        return None
    value = constant_value(node.inputs[index])
    return None if value is None else [int(v) for v in value.reshape(-1)]


def embed_applies(match: Match) -> bool:
    """The layout onnxruntime's EmbedLayerNormalization kernels accept (embed_layer_norm_helper.cc)."""
    found = roles(match)
    norm = match.nodes["ln"]
    output = match.outputs[0]
    dtype = float_dtype(output)
    rank, hidden = last_dim(output)
    if rank != 3 or norm.attrs.get("axis", -1) % 3 != 2:
        raise Rejected(f"'{norm.name}' does not normalize the last axis of a 3-D tensor")
    for role, (table, _) in found.items():
        shape = table.shape
        if shape is None or len(shape) != 2 or shape[1] != hidden or np.dtype(table.dtype) != dtype:
            raise Rejected(f"the {role} table '{table.name}' is not [rows, {hidden}] of {dtype}")
    check_vector(match.bindings["gamma"], hidden, 1, dtype, "scale")
    check_vector(match.bindings["beta"], hidden, 1, dtype, "bias")
    return True


# ---------------------------------------------------------------- replacement
def embed_layernorm(op, gamma, beta, match):
    found = roles(match)
    hidden = last_dim(match.outputs[0])[1]
    word_table, word_ids = found["word"]
    position_table, _ = found["position"]
    if isinstance(position_table, np.ndarray):
        position_table = op.const(position_table, "position_table")
    segment_table, segment_ids = found.get("segment", (None, None))
    inputs = [_int32(op, word_ids), _int32(op, segment_ids) if segment_ids is not None else None,
              word_table, position_table, segment_table, as_vector(op, gamma, hidden, "gamma"), as_vector(op, beta, hidden, "beta")]
    epsilon = float(match.nodes["ln"].attrs.get("epsilon", DEFAULT_EPSILON))
    # onnxruntime's shape inference reads output 1 (mask_index) unconditionally, so it is written
    # though nothing reads it.
    output, mask_index = op.EmbedLayerNormalization(*inputs, _domain=MS_DOMAIN, _outputs=[True, True], epsilon=epsilon)
    mask_index.dtype, mask_index.shape = np.int32, [word_ids.shape[0]]
    return set_like(output, match.outputs[0])


def _int32(op, ids: gs.Tensor) -> gs.Tensor:
    if np.dtype(ids.dtype) == np.int32:
        return ids
    cast = op.Cast(ids, to=TensorProto.INT32)
    cast.dtype, cast.shape = np.int32, ids.shape
    return cast


def rules() -> list[Rule]:
    return [Rule(NAME, form, embed_layernorm, when=embed_applies) for form in FORMS]


@register
class FuseEmbedLayerNorm(Pass):
    """Fuse token/position/segment embedding lookups + LayerNorm into com.microsoft EmbedLayerNormalization."""

    name = NAME
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        if not for_onnxruntime(ctx.target):
            return False
        infer_shapes(model)
        changed = rewrite_all(model, rules(), ctx)
        if changed:
            use_ms_domain(model)
        return changed
