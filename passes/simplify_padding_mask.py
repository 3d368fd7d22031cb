"""simplify-padding-mask: an attention mask built by a long index computation becomes one Where.

transformers 5 exports the padding mask of encoders such as BERT through its vmapped mask
functions: Range, Unsqueeze, Gather of the flattened ``attention_mask``, And, Expand and Where,
about forty integer and bool nodes that produce the additive mask [B, 1, S, S] every layer adds
to its attention scores. onnxruntime's CUDA provider runs most of them on the CPU, with device
copies in between: on an H100 that is about 0.3 ms of every BERT-base run. Yet the tensor they
compute is only the key-padding mask, ``where(attention_mask[b, j] != 0, 0, min)`` broadcast
over heads and queries, which one Cast, one Unsqueeze and one Where write as [B, 1, 1, S].

What is proven before anything changes, for each float tensor of rank 4 that only Add nodes
read (attention scores plus mask):

- its value depends on exactly one graph input M of rank 2 (the mask); any other tensor it reads
  is read only through Shape or Size, and no random op, subgraph or custom-domain op is on the way;
- run on its own in onnxruntime (the other tensors stand in by their shapes, from shape inference
  at each size), it equals ``where(M[b, j] != 0, a, c)`` broadcast over its axes 1 and 2, with the
  same two constants a and c, on every probe: random masks with left and right padding, fully
  masked and unmasked rows, and values other than 0 and 1 (so a mask used as ``M == 1`` or as
  ``(1 - M) * c`` is not mistaken for one used as ``M != 0``), at batch and sequence sizes from
  (1, 1) to (2, 300), and (1, 1031) where the model runs at that length. A mask that differs
  from a key-padding mask at some length (causal, sliding-window or block masks) differs on
  these probes unless its window exceeds 1031 keys;
- each Add gives the same shape with [B, 1, 1, S] as with the original's shape at every probe.

Anything else leaves the tensor alone, with the reason in the report's decisions. The probes
show the two functions agree on the probed sizes and masks, not on every input: that is why
the rule is narrow (one mask input, value-independent of everything else) and why ``optimize``
validates the whole model afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxmp.ir import (
    Model,
    consumers,
    elem_type,
    graph_output_ids,
    make_constant,
    producer,
    remove_nodes,
    replace_all_uses,
    set_provenance,
    subgraphs,
    toposort,
)
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Rejected
from onnxmp.runtime import as_written_options
from onnxmp.shapes import infer_shapes, lightweight_proto, static_shapes_at

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

NAME = "simplify-padding-mask"
PROBE_SIZES = ((1, 1), (2, 5), (3, 16), (1, 64), (2, 67), (2, 300), (1, 1031))
REQUIRED_SEQUENCE = 67  # every probe up to this length must run; longer ones only where the model does
MAX_CONE_NODES = 400
MAX_CONSTANT_ELEMENTS = 4096
REPLACEMENT_NODES = 3  # Cast, Unsqueeze, Where: a smaller computation is left as it is
SHAPE_READERS = ("Shape", "Size")
RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial")
PROBE_VALUES = {"b": [False, True], "i": [0, 1, 1, 2, -1], "u": [0, 1, 1, 2], "f": [0.0, 1.0, 1.0, 0.5, -2.0]}


@dataclass
class MaskCone:
    """The computation of one additive mask: ``nodes`` (graph order) compute ``output`` from the
    graph input ``mask``, and from ``shape_sources`` through their shapes only."""

    output: gs.Variable
    mask: gs.Variable
    nodes: list[gs.Node]
    shape_sources: list[gs.Tensor]


@dataclass
class KeyPaddingMask:
    """``where(mask != 0, attend, masked)`` over [B, 1, 1, S]."""

    cone: MaskCone
    attend: np.ndarray  # 0-d, the output's dtype
    masked: np.ndarray
    probed: list[tuple[int, int]]


@register
class SimplifyPaddingMask(Pass):
    """Replace an index-heavy computation of a key-padding attention mask by Cast + Unsqueeze + Where."""

    name = NAME
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        graph = model.graph
        candidates = _mask_candidates(graph)
        if not candidates:
            return False
        infer_shapes(model)
        proto = lightweight_proto(model)
        changed = False
        for tensor in candidates:
            try:
                cone = find_cone(tensor, graph)
                if cone is None:
                    continue
                found = prove_key_padding(cone, proto)
            except Rejected as exc:
                ctx.record(**{"pass": NAME, "node": _producer_name(tensor), "op": "mask", "rule": f"{NAME}: kept, {exc}"})
                continue
            rewrite(found, graph, model.opset(), ctx)
            changed = True
        if changed:
            toposort(graph)
            model.shapes_current = False
        return changed


# ------------------------------------------------------------------ finding the computation
def _mask_candidates(graph: gs.Graph) -> list[gs.Variable]:
    """Computed float tensors of rank 4 (as far as known) added to what a Softmax reads, and read
    by such Adds only: the additive masks of attention."""
    found: dict[int, gs.Variable] = {}
    outputs = graph_output_ids(graph)
    for node in graph.nodes:
        if not _is_add(node) or not any(c.op == "Softmax" for c in consumers(node.outputs[0])):
            continue
        for tensor in node.inputs:
            if not isinstance(tensor, gs.Variable) or producer(tensor) is None or id(tensor) in outputs:
                continue
            if tensor.dtype is not None and np.dtype(tensor.dtype).kind != "f":
                continue
            if tensor.shape is not None and len(tensor.shape) != 4:
                continue
            if all(_is_add(c) for c in consumers(tensor)):
                found[id(tensor)] = tensor
    return list(found.values())


def _is_add(node: gs.Node) -> bool:
    return node.op == "Add" and node.domain in (None, "") and len(node.inputs) == 2


def find_cone(output: gs.Variable, graph: gs.Graph) -> MaskCone | None:
    """The nodes that compute ``output``, stopping at constants, graph inputs and Shape/Size reads.

    None when ``output`` is not a mask computation at all: its value depends on no or several graph
    inputs, on one that is not of rank 2, on a weight (a constant of more than
    ``MAX_CONSTANT_ELEMENTS``) or on more than ``MAX_CONE_NODES`` nodes. Rejected when it is one
    this pass cannot probe.
    """
    graph_inputs = {id(t) for t in graph.inputs}
    nodes: dict[int, gs.Node] = {}
    values: dict[int, gs.Tensor] = {}
    sources: dict[int, gs.Tensor] = {}
    stack = [output]
    while stack:
        tensor = stack.pop()
        if isinstance(tensor, gs.Constant) and tensor.shape is not None and int(np.prod(tensor.shape)) > MAX_CONSTANT_ELEMENTS:
            return None  # a weight: this computes activations, not a mask
        if isinstance(tensor, gs.Constant) or tensor.name == "":
            continue
        if id(tensor) in graph_inputs:
            values[id(tensor)] = tensor
            continue
        node = producer(tensor)
        if node is None or id(node) in nodes:
            continue
        nodes[id(node)] = node
        if len(nodes) > MAX_CONE_NODES or len(values) > 1:
            return None
        if node.op in SHAPE_READERS:
            sources[id(node.inputs[0])] = node.inputs[0]
        else:
            stack.extend(node.inputs)
    if len(values) != 1:
        return None
    (mask,) = values.values()
    if mask.shape is None or len(mask.shape) != 2:
        return None
    for node in nodes.values():
        _check_node(node)
    _check_mask_input(mask)
    if len(nodes) <= REPLACEMENT_NODES:
        raise Rejected(f"its computation has only {len(nodes)} nodes")
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    computed = {id(t) for node in nodes.values() for t in node.outputs}
    shape_sources = [t for t in sources.values() if t is not mask and id(t) not in computed]
    return MaskCone(output, mask, sorted(nodes.values(), key=lambda n: order[id(n)]), shape_sources)


def _check_node(node: gs.Node) -> None:
    if node.domain not in (None, "", "ai.onnx"):
        raise Rejected(f"node '{node.name}' is a {node.domain} op")
    if node.op in RANDOM_OPS:
        raise Rejected(f"node '{node.name}' is random ({node.op})")
    if subgraphs(node):
        raise Rejected(f"node '{node.name}' has subgraphs")


def _check_mask_input(mask: gs.Tensor) -> None:
    if mask.dtype is None:
        raise Rejected(f"the type of the graph input '{mask.name}' is unknown")
    if np.dtype(mask.dtype).kind not in PROBE_VALUES:
        raise Rejected(f"the graph input '{mask.name}' is of type {np.dtype(mask.dtype)}")


def _producer_name(tensor: gs.Tensor) -> str:
    node = producer(tensor)
    return node.name if node is not None else tensor.name


# ------------------------------------------------------------------ proving it by probes
def prove_key_padding(cone: MaskCone, proto: onnx.ModelProto) -> KeyPaddingMask:
    """Probe ``cone`` in onnxruntime at ``PROBE_SIZES``; Rejected unless it is a key-padding mask."""
    session = _probe_session(cone, proto)
    readers = [_other_operand(node, cone.output) for node in consumers(cone.output)]
    rng = np.random.default_rng(0)
    constants: list[np.ndarray | None] = [None, None]
    probed = []
    for batch, seq in _probe_sizes(cone.mask):
        names = [t.name for t in cone.shape_sources] + [t.name for t in readers]
        shapes = static_shapes_at(proto, _dims(cone.mask, batch, seq), names)
        if any(shapes[name] is None for name in names):
            if seq <= REQUIRED_SEQUENCE:
                missing = next(name for name in names if shapes[name] is None)
                raise Rejected(f"the shape of '{missing}' is unknown at batch {batch}, sequence {seq}")
            continue
        mask = _probe_mask(rng, cone.mask, batch, seq)
        feeds = {cone.mask.name: mask}
        for source in cone.shape_sources:
            feeds[source.name] = np.zeros(shapes[source.name], np.dtype(source.dtype))
        try:
            (result,) = session.run([cone.output.name], feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            if seq <= REQUIRED_SEQUENCE:
                raise Rejected(f"the mask computation fails at batch {batch}, sequence {seq}: {exc}") from exc
            continue
        _check_probe(result, mask, constants, batch, seq)
        for reader in readers:
            _check_broadcast(shapes[reader.name], result.shape, (batch, 1, 1, seq), reader)
        probed.append((batch, seq))
    attend, masked = constants
    if attend is None or masked is None:
        raise Rejected("no probe had both set and clear mask values")
    if attend.tobytes() == masked.tobytes():
        raise Rejected("its value does not depend on the mask")
    return KeyPaddingMask(cone, attend, masked, probed)


def _probe_sizes(mask: gs.Variable) -> list[tuple[int, int]]:
    """PROBE_SIZES, or the mask's own sizes on its static axes."""
    static = [d if isinstance(d, (int, np.integer)) else None for d in mask.shape]
    sizes = {(static[0] or b, static[1] or s) for b, s in PROBE_SIZES}
    return sorted(sizes, key=lambda size: (size[1], size[0]))


def _dims(mask: gs.Variable, batch: int, seq: int) -> dict[str, int]:
    dims = {}
    for dim, value in zip(mask.shape, (batch, seq)):
        if isinstance(dim, str) and dim:
            dims[dim] = value
    return dims


def _probe_mask(rng: np.random.Generator, mask: gs.Variable, batch: int, seq: int) -> np.ndarray:
    """Random values of the mask's kind; all rows but the last follow, in turn, a left-padded,
    right-padded, empty and full pattern of 0 and 1."""
    dtype = np.dtype(mask.dtype)
    values = np.array(PROBE_VALUES[dtype.kind], dtype)
    probe = values[rng.integers(0, len(values), size=(batch, seq))]
    one, zero = np.array(1, dtype), np.array(0, dtype)
    rows = [np.where(np.arange(seq) >= seq // 2, one, zero), np.where(np.arange(seq) < seq // 2 + 1, one, zero),
            np.full(seq, zero), np.full(seq, one)]
    for row, pattern in zip(range(batch - 1), rows[(batch + seq) % len(rows):] + rows):
        probe[row] = pattern
    return probe


def _check_probe(result: np.ndarray, mask: np.ndarray, constants: list, batch: int, seq: int) -> None:
    """Rejected unless ``result`` is where(mask != 0, a, c); fills in and checks ``constants`` = [a, c]."""
    where = f"at batch {batch}, sequence {seq}"
    if result.ndim != 4 or result.shape[0] != batch or result.shape[1] != 1 or result.shape[3] != seq \
            or result.shape[2] not in (1, seq):
        raise Rejected(f"its shape {list(result.shape)} {where} is not [B, 1, 1 or S, S]")
    attend = np.broadcast_to((mask != 0)[:, None, None, :], result.shape)
    for index, (selected, state) in enumerate(((result[attend], "set"), (result[~attend], "clear"))):
        if selected.size == 0:
            continue
        if len(np.unique(selected.view(np.dtype(f"u{selected.dtype.itemsize}")))) != 1:
            raise Rejected(f"{where} it is not one value where the mask is {state}")
        value = selected[:1].reshape(())
        if constants[index] is not None and constants[index].tobytes() != value.tobytes():
            raise Rejected(f"{where} its value where the mask is {state} differs from the other sizes'")
        constants[index] = value


def _check_broadcast(other: list[int], original: tuple, simplified: tuple, reader: gs.Tensor) -> None:
    if tuple(np.broadcast_shapes(tuple(other), original)) != tuple(np.broadcast_shapes(tuple(other), simplified)):
        raise Rejected(f"adding it to '{reader.name}' {other} would change shape")


def _other_operand(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    first, second = node.inputs
    return second if first is tensor else first


def _probe_session(cone: MaskCone, proto: onnx.ModelProto) -> "onnxruntime.InferenceSession":
    """An onnxruntime session of the cone alone, without optimizations (it computes as written)."""
    import onnxruntime as ort

    constants: dict[str, gs.Constant] = {}
    for node in cone.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                constants[tensor.name] = tensor
    inputs = [_value_info(cone.mask)] + [_value_info(t, rank_only=True) for t in cone.shape_sources]
    graph = helper.make_graph(
        [OnnxExporter.export_node(n) for n in cone.nodes],
        "mask_probe",
        inputs,
        [_value_info(cone.output, rank_only=True)],
        initializer=[OnnxExporter.export_tensor_proto(t) for t in constants.values()],
    )
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    try:
        return ort.InferenceSession(model.SerializeToString(), as_written_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise Rejected(f"onnxruntime cannot run the mask computation alone: {exc}") from exc


def _value_info(tensor: gs.Tensor, rank_only: bool = False) -> onnx.ValueInfoProto:
    shape = [None] * len(tensor.shape) if tensor.shape is not None else None
    if not rank_only and tensor.shape is not None:
        shape = [d if isinstance(d, (int, np.integer)) else None for d in tensor.shape]
    if tensor.dtype is None:
        raise Rejected(f"the type of '{tensor.name}' is unknown")
    return helper.make_tensor_value_info(tensor.name, elem_type(tensor), shape)


# ------------------------------------------------------------------ rewriting
def rewrite(found: KeyPaddingMask, graph: gs.Graph, opset: int, ctx: PassContext) -> None:
    """Add ``where(Unsqueeze(mask != 0, [1, 2]), attend, masked)`` and read it instead."""
    cone = found.cone
    base = _producer_name(cone.output)
    created = []

    def node(op: str, inputs: list, dtype, shape, **attrs) -> gs.Variable:
        out = gs.Variable(ctx.fresh_name(f"{base}/{NAME}_out"), dtype=dtype, shape=shape)
        made = gs.Node(op, name=ctx.fresh_name(f"{base}/{NAME}"), attrs=attrs, inputs=inputs, outputs=[out])
        set_provenance(made, NAME)
        created.append(made)
        return out

    batch, seq = cone.mask.shape
    flag = cone.mask
    if np.dtype(cone.mask.dtype) != np.bool_:
        flag = node("Cast", [cone.mask], np.bool_, [batch, seq], to=onnx.TensorProto.BOOL)
    axes = np.array([1, 2], np.int64)
    if opset >= 13:
        flag = node("Unsqueeze", [flag, make_constant(ctx.fresh_name(f"{base}/axes"), axes)], np.bool_, [batch, 1, 1, seq])
    else:
        flag = node("Unsqueeze", [flag], np.bool_, [batch, 1, 1, seq], axes=[1, 2])
    attend = make_constant(ctx.fresh_name(f"{base}/attend"), found.attend)
    masked = make_constant(ctx.fresh_name(f"{base}/masked"), found.masked)
    simplified = node("Where", [flag, attend, masked], found.attend.dtype, [batch, 1, 1, seq])
    graph.nodes.extend(created)
    replace_all_uses(cone.output, simplified)
    remove_nodes(graph, _dead(cone.nodes, graph))
    ctx.record(**{"pass": NAME, "node": base, "op": "mask",
                  "rule": f"{NAME}: key padding mask of '{cone.mask.name}' ({len(cone.nodes)} nodes -> "
                          f"{len(created)}), probed at (batch, sequence) {found.probed}"})


def _dead(nodes: list[gs.Node], graph: gs.Graph) -> list[gs.Node]:
    """The nodes of ``nodes`` whose outputs nothing outside the dead ones reads any more."""
    outputs = graph_output_ids(graph)
    dead: set[int] = set()
    for node in reversed(nodes):
        if all(id(t) not in outputs and all(id(c) in dead for c in consumers(t)) for t in node.outputs):
            dead.add(id(node))
    return [n for n in nodes if id(n) in dead]
