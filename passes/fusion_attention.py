"""fuse-attention: Q/K/V projections + scaled dot-product attention -> onnxruntime's Attention.

Matched per Softmax, for the onnxruntime targets (``cpu``, ``cuda``)::

    Q, K, V  = heads(X @ Wq + bq), heads(X @ Wk + bk), heads(X @ Wv + bv)  # [B, N, S, D]
    scores   = (Q * cq) @ (K^T * ck) * c   (each scale optional; Mul or Div)
    probs    = Softmax(scores [+ mask], axis=-1)
    probs    = Where(IsNaN(probs), 0, probs)                               # optional guard
    Y        = merge_heads(probs @ V)                                      # e.g. [B, S, N*D]

``heads``/``merge_heads`` are whatever Transpose/Reshape/Unsqueeze/Squeeze/Gather chain the
exporter wrote (BERT's Reshape + Transpose, nn.MultiheadAttention's packed in-projection with its
seq-first transposes, ...): ``onnxmp.head_layout`` follows each tensor's axes exactly and the
match requires Q = [batch, heads, seq, head_dim] of a projection of X, K^T = [batch, heads,
head_dim, seq], V like Q, all three from the same X. Reshape targets computed from Shape nodes
are evaluated symbolically, so dynamic batch and sequence work. Scales multiply to the Attention
op's ``scale`` (left out when it is 1/sqrt(head_dim)).

What replaces it: com.microsoft ``Attention(X, [Wq|Wk|Wv], [bq|bk|bv], attention_bias=mask)``,
which runs the three projections as one GEMM; then the layout ops that turn its [B, S, N*D]
output into Y's layout when Y is not already that (nn.MultiheadAttention's [S*B, E]).

The additive mask goes to ``attention_bias`` ([B or 1, N or 1, S, S]; an ``Expand`` to
[1, 1, S, S] in front when its shape is not statically that, e.g. BERT's [B, 1, 1, S]). It is
not folded into ``mask_index``/key_padding_mask: a 2-D key padding mask sends onnxruntime's CUDA
kernels to the unfused path, an attention bias keeps the memory-efficient one, and the 1-D
"sequence length" mask onnxruntime's own optimizer uses assumes right padding.

torch exports scaled_dot_product_attention with a boolean mask as an additive mask of 0 and -inf
plus the NaN guard above: a query row that masks every key (a batch item with an all-zero
padding mask) gives 0 instead of NaN. Attention's kernels do not promise either, so the fused
form makes that explicit: the bias has -inf raised to the type's lowest finite value (no row is
all -inf any more), and Attention's output is multiplied by ``keep``, 0 on the rows whose mask
was -inf everywhere and 1 elsewhere. Both are computed once per mask, so a layer pays one Mul.
Such a mask must be the same for all heads. Without a mask the guard can only fire on NaN or
infinite scores, which the fused op propagates instead.

Anything that does not fit leaves the whole attention alone: a mask of another shape or type, a
softmax on another axis, other perms, an intermediate tensor used outside the match (except Shape
nodes reading a Transpose of X, which are rewired to X), differing head counts. The pass does
nothing for ``tensorrt``, which recognizes attention in standard ONNX ops itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxmp.fusion import MS_DOMAIN, for_onnxruntime, use_ms_domain
from onnxmp.head_layout import LAYOUT_OPS, ONE, Analysis, Atom, Layout, Projection, Size, constant, dim_size, product
from onnxmp.ir import (
    Model,
    constant_value,
    consumers,
    graph_output_ids,
    iter_graphs,
    make_constant,
    producer,
    remove_nodes,
    set_provenance,
    toposort,
)
from onnxmp.pass_manager import Pass, PassContext, register
from onnxmp.pattern import Rejected
from onnxmp.shapes import infer_shapes

RULE = "fuse-attention"
SCALE_RTOL = 1e-5
FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))
AXES_INPUT_SINCE = {"Unsqueeze": 13, "Squeeze": 13, "ReduceMax": 18}
ROLES = {"query": ("b", "h", "s", "d"), "key": ("b", "h", "d", "s"), "value": ("b", "h", "s", "d")}


# ---------------------------------------------------------------- the match
@dataclass
class Branch:
    """Q heads, K^T heads or V heads: the projection they come from and their atoms."""

    tensor: gs.Tensor
    projection: Projection
    heads: tuple
    dim: tuple
    fixed: list  # (atom, index) pairs inside the projection's output features
    chain: list[gs.Node]

    @property
    def num_heads(self) -> int:
        return product(a.size for a in self.heads).coef

    @property
    def head_size(self) -> int:
        return product(a.size for a in self.dim).coef

    def columns(self) -> np.ndarray:
        """The projection's output columns that hold [heads, head_dim] of this branch, row-major."""
        index = np.array(sum(idx * atom.stride() for atom, idx in self.fixed))
        for atom in self.heads + self.dim:
            index = index[..., None] + np.arange(atom.size.coef) * atom.stride()
        return index.reshape(-1)


@dataclass
class AttentionMatch:
    softmax: gs.Node
    x: gs.Tensor
    branches: dict[str, Branch]
    scale: float
    mask: gs.Tensor | None
    output: gs.Tensor
    output_layout: Layout
    batch: Atom
    seq: Atom
    guarded: bool = False  # the probabilities went through Where(IsNaN(P), 0, P)
    output_steps: list = field(default_factory=list)  # Transpose/Reshape from Attention's output to Y
    nodes: list[gs.Node] = field(default_factory=list)  # removed: the matched nodes and their private feeders
    shape_rewires: list[tuple[gs.Node, list]] = field(default_factory=list)  # (Shape node, _shape_plan of what it read)


def match_attention(softmax: gs.Node, graph: gs.Graph, opset: int) -> AttentionMatch:
    """The attention around ``softmax``; raises Rejected with the reason when it does not fit."""
    analysis = Analysis(opset)
    axis = softmax.attrs.get("axis", -1 if opset >= 13 else 1)
    if axis not in (-1, 3):
        raise Rejected(f"'{softmax.name}' normalizes over axis {axis}, not the last of four")
    probs, guard = _nan_guard(softmax)
    users = consumers(probs)
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not probs:
        raise Rejected(f"the probabilities of '{softmax.name}' are not read by exactly one MatMul")
    pv = users[0]
    core = [softmax, *guard, pv]
    scores, mask = _split_mask(softmax.inputs[0], analysis, core)
    scale, qk = _peel_scale(scores, analysis, core)
    if qk is None:
        raise Rejected(f"the scores of '{softmax.name}' are not a MatMul (times a constant)")
    core.append(qk)
    q_scale, q_heads = _peel_scale_to(qk.inputs[0], analysis, core)
    k_scale, k_heads = _peel_scale_to(qk.inputs[1], analysis, core)
    branches = {
        "query": _branch(q_heads, analysis),
        "key": _branch(k_heads, analysis),
        "value": _branch(pv.inputs[1], analysis),
    }
    x, batch, seq = _common_input(branches, analysis)
    for role, branch in branches.items():
        _check_axes(role, branch, analysis.layout(branch.tensor), batch, seq)
    shapes = {(b.num_heads, b.head_size) for b in branches.values()}
    if len(shapes) != 1:
        raise Rejected(f"query, key and value have different head layouts {sorted(shapes)}")
    if x.dtype is None or np.dtype(x.dtype) not in FLOAT_TYPES:
        raise Rejected(f"'{x.name}' is not known to be float32 or float16")
    output, output_layout, tail = _output_chain(pv, branches["value"], x, batch, seq, analysis, graph)
    if mask is not None:
        _check_mask(mask, x, branches["query"].num_heads, seq, analysis)
        if guard:
            _check_guarded_mask(mask)
    nodes = core + tail + [n for b in branches.values() for n in b.chain]
    found = AttentionMatch(softmax, x, branches, scale * q_scale * k_scale, mask, output, output_layout, batch, seq,
                           guarded=bool(guard))
    found.output_steps = _output_plan(output_layout, batch, seq, branches["value"])
    found.nodes, found.shape_rewires = _removable(_unique(nodes), found, graph, analysis)
    return found


def _nan_guard(softmax: gs.Node) -> tuple[gs.Tensor, list[gs.Node]]:
    """(the probabilities the attention uses, the nodes of ``Where(IsNaN(P), 0, P)`` if P has it)."""
    probs = softmax.outputs[0]
    users = consumers(probs)
    isnan = [u for u in users if u.op == "IsNaN"]
    where = [u for u in users if u.op == "Where"]
    if len(users) != 2 or len(isnan) != 1 or len(where) != 1:
        return probs, []
    check, select = isnan[0], where[0]
    if select.inputs[0] is not check.outputs[0] or select.inputs[2] is not probs or len(consumers(check.outputs[0])) != 1:
        return probs, []
    zero = constant_value(select.inputs[1])
    if zero is None or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
        return probs, []
    return select.outputs[0], [check, select]


def _split_mask(tensor: gs.Tensor, analysis: Analysis, core: list) -> tuple[gs.Tensor, gs.Tensor | None]:
    """(scaled scores, additive mask or None) for the Softmax input."""
    node = producer(tensor)
    if node is None or node.op != "Add":
        return tensor, None
    for scores, mask in ((0, 1), (1, 0)):
        _, qk = _peel_scale(node.inputs[scores], analysis, [])
        if qk is not None:
            core.append(node)
            return node.inputs[scores], node.inputs[mask]
    raise Rejected(f"'{node.name}' adds two tensors neither of which is Q @ K^T")


def _scalar(tensor: gs.Tensor, analysis: Analysis) -> float | None:
    try:
        _, elements = analysis.value(tensor)
    except Rejected:
        return None
    if len(elements) != 1:
        return None
    element = elements[0]
    if isinstance(element, Size):
        return float(element.coef) if element.static else None
    return element


def _peel_scale(tensor: gs.Tensor, analysis: Analysis, nodes: list) -> tuple[float, gs.Node | None]:
    """Follow Mul/Div by constant scalars up from ``tensor``: (product of factors, the MatMul or None)."""
    scale, node = 1.0, producer(tensor)
    while node is not None and node.op in ("Mul", "Div"):
        sides = ((0, 1), (1, 0)) if node.op == "Mul" else ((0, 1),)
        for data, factor in sides:
            value = _scalar(node.inputs[factor], analysis)
            if value is not None and value != 0.0:
                scale *= value if node.op == "Mul" else 1.0 / value
                nodes.append(node)
                node = producer(node.inputs[data])
                break
        else:
            return scale, None
    return scale, node if node is not None and node.op == "MatMul" else None


def _peel_scale_to(tensor: gs.Tensor, analysis: Analysis, nodes: list) -> tuple[float, gs.Tensor]:
    """Follow Mul/Div by constant scalars up from an operand of Q @ K^T: (factor, head tensor)."""
    scale = 1.0
    node = producer(tensor)
    while node is not None and node.op in ("Mul", "Div"):
        value = _scalar(node.inputs[1], analysis)
        if value is None and node.op == "Mul":
            value, data = _scalar(node.inputs[0], analysis), node.inputs[1]
        else:
            data = node.inputs[0]
        if value is None or value == 0.0:
            break
        scale *= value if node.op == "Mul" else 1.0 / value
        nodes.append(node)
        tensor, node = data, producer(data)
    return scale, tensor


def _branch(tensor: gs.Tensor, analysis: Analysis) -> Branch:
    layout = analysis.layout(tensor)
    if len(layout.axes) != 4:
        raise Rejected(f"'{tensor.name}' does not have rank 4")
    roots = {id(a.root()) for axis in layout.axes for a in axis if a.size != ONE}
    projections = [analysis.projections[r] for r in roots if r in analysis.projections]
    if len(projections) != 1:
        raise Rejected(f"'{tensor.name}' is not the heads of one projection with a constant weight")
    projection = projections[0]
    chain = _chain(tensor, projection)
    return Branch(tensor, projection, (), (), [], chain)


def _chain(tensor: gs.Tensor, projection: Projection) -> list[gs.Node]:
    """The layout ops from the projection to ``tensor``, the projection, and the Transposes before it."""
    nodes, node = [], producer(tensor)
    stop = projection.add or projection.matmul
    while node is not stop:
        if node is None or node.op not in LAYOUT_OPS:
            raise Rejected(f"'{tensor.name}' is not reached from the projection through layout ops only")
        nodes.append(node)
        node = producer(node.inputs[0])
    nodes += [n for n in (projection.add, projection.matmul) if n is not None]
    node = producer(projection.input)
    while node is not None and node.op == "Transpose":
        nodes.append(node)
        node = producer(node.inputs[0])
    return nodes


def _input_base(projection: Projection) -> gs.Tensor:
    tensor = projection.input
    while producer(tensor) is not None and producer(tensor).op == "Transpose":
        tensor = producer(tensor).inputs[0]
    return tensor


def _common_input(branches: dict[str, Branch], analysis: Analysis) -> tuple[gs.Tensor, Atom, Atom]:
    """X, read by all three projections (a self-attention), and its batch and sequence atoms."""
    bases = {id(_input_base(b.projection)): _input_base(b.projection) for b in branches.values()}
    if len(bases) != 1:
        raise Rejected("query, key and value are projections of different tensors")
    x = next(iter(bases.values()))
    axes = analysis.base(x).axes
    if len(axes) != 3:
        raise Rejected(f"'{x.name}' does not have rank 3")
    for branch in branches.values():
        if analysis.input_layout(branch.projection.input).axes[-1] != axes[2]:
            raise Rejected(f"'{branch.projection.matmul.name}' does not contract the hidden axis of '{x.name}'")
    return x, axes[0][0], axes[1][0]


def _check_axes(role: str, branch: Branch, layout: Layout, batch: Atom, seq: Atom) -> None:
    """The axes are [batch, heads, seq, head_dim] (K: [batch, heads, head_dim, seq]), heads and
    head_dim partition the projection's features together with the Gather-fixed atoms."""
    named = dict(zip(ROLES[role], layout.axes))
    if named["b"] != (batch,) or named["s"] != (seq,):
        raise Rejected(f"the {role} heads '{branch.tensor.name}' are not [batch, heads, seq, head_dim] of the input")
    feature = branch.projection.feature
    heads = tuple(a for a in named["h"] if a.size != ONE)
    dim = tuple(a for a in named["d"] if a.size != ONE)
    fixed = [(atom, idx) for atom, idx in layout.fixed.values()]
    used = list(heads + dim) + [atom for atom, _ in fixed]
    if not heads or not dim or not all(a.descends_from(feature) and a.size.static for a in used):
        raise Rejected(f"the {role} heads '{branch.tensor.name}' mix the projection's features with other axes")
    if any(a is not b and a.descends_from(b) for a in used for b in used):
        raise Rejected(f"the {role} heads '{branch.tensor.name}' read overlapping parts of the features")
    if product(a.size for a in used) != feature.size:
        raise Rejected(f"the {role} heads '{branch.tensor.name}' do not read every projected feature")
    branch.heads, branch.dim, branch.fixed = heads, dim, fixed


def _output_chain(pv: gs.Node, value: Branch, x: gs.Tensor, batch: Atom, seq: Atom, analysis: Analysis,
                  graph: gs.Graph) -> tuple[gs.Tensor, Layout, list[gs.Node]]:
    """Y: where the layout ops after probs @ V end, and its layout."""
    tensor = pv.outputs[0]
    layout = Layout([(batch,), value.heads, (seq,), value.dim])
    analysis.layouts[id(tensor)] = layout
    nodes, outputs = [], graph_output_ids(graph)
    while id(tensor) not in outputs:
        # Shape readers (torch reads the batch size off the attention's output) are rewired by _removable.
        users = [u for u in consumers(tensor) if not _reads_shape_of_input(u, tensor, x, analysis)]
        follows = len(users) == 1 and users[0].op in LAYOUT_OPS and users[0].op != "Gather"
        if not follows or users[0].inputs[0] is not tensor:
            break
        try:
            after = analysis.apply(users[0], layout)
        except Rejected:
            break
        nodes.append(users[0])
        tensor, layout = users[0].outputs[0], after
        analysis.layouts[id(tensor)] = layout
    return tensor, layout, nodes


def _check_mask(mask: gs.Tensor, x: gs.Tensor, num_heads: int, seq: Atom, analysis: Analysis) -> None:
    """An additive mask must broadcast to [B or 1, N or 1, S, S] as far as its shape is known."""
    if mask.dtype is None or np.dtype(mask.dtype) != np.dtype(x.dtype):
        raise Rejected(f"the mask '{mask.name}' is not of the input's type {np.dtype(x.dtype)}")
    if mask.shape is None or len(mask.shape) > 4:
        raise Rejected(f"the mask '{mask.name}' has an unknown rank or more than four axes")
    batch = analysis.base(x).axes[0][0].size
    allowed = [(ONE, batch), (ONE, Size(num_heads)), (ONE, seq.size), (ONE, seq.size)]
    for options, index in zip(allowed[4 - len(mask.shape):], range(len(mask.shape))):
        size = dim_size(mask, index)
        if size.static and all(o.static for o in options) and size not in options:
            raise Rejected(
                f"the mask '{mask.name}' of shape {list(mask.shape)} does not broadcast to [B, {num_heads}, S, S]"
            )


def _check_guarded_mask(mask: gs.Tensor) -> None:
    """A NaN-guarded attention's mask must not vary over heads: keep is applied per query row."""
    rank = len(mask.shape)
    if rank >= 3 and dim_size(mask, rank - 3) != ONE:
        raise Rejected(f"the mask '{mask.name}' of a NaN-guarded softmax may differ between heads")


def _mask_is_full(mask: gs.Tensor, seq: Atom) -> bool:
    """Whether the mask is statically [*, *, S, S], as Attention's attention_bias must be."""
    if mask.shape is None or len(mask.shape) != 4:
        return False
    return dim_size(mask, 2) == seq.size and dim_size(mask, 3) == seq.size


def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    seen, out = set(), []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def _removable(core: list[gs.Node], match: AttentionMatch, graph: gs.Graph, analysis: Analysis) -> tuple[list, list]:
    """The matched nodes plus the feeders only they use (shape subgraphs, scale constants).

    Rejects when a matched tensor other than Y is a graph output or has a reader outside, except a
    Shape node whose every axis is static or an axis of X (a Transpose of X, the heads [B, N, S, D]
    that torch reads the batch size from): it is rewired to read X and gather those axes.
    """
    inside = {id(n) for n in core}
    keep = {id(match.x)} | ({id(match.mask)} if match.mask is not None else set())
    candidates: dict[int, gs.Node] = {}
    stack = [t for n in core for t in n.inputs]
    while stack:
        tensor = stack.pop()
        node = producer(tensor)
        if id(tensor) in keep or node is None or id(node) in inside or id(node) in candidates:
            continue
        candidates[id(node)] = node
        stack.extend(node.inputs)
    outputs = graph_output_ids(graph)
    if match.mask is not None and _depends_on(match.mask, inside):
        raise Rejected(f"the mask '{match.mask.name}' is computed from the attention itself")
    changed = True
    while changed:
        changed = False
        for key, node in list(candidates.items()):
            for tensor in node.outputs:
                outside = any(id(u) not in inside and id(u) not in candidates for u in tensor.outputs)
                if id(tensor) in outputs or outside:
                    del candidates[key]
                    changed = True
                    break
    dead = inside | set(candidates)
    rewires = []
    for node in core:
        for tensor in node.outputs:
            if tensor is match.output:
                continue
            if id(tensor) in outputs:
                raise Rejected(f"'{tensor.name}' inside the attention is a graph output")
            for user in tensor.outputs:
                if id(user) in dead:
                    continue
                plan = _shape_plan(tensor, match.x, analysis) if user.op == "Shape" and not user.attrs else None
                if plan is not None:
                    rewires.append((user, plan))
                    continue
                raise Rejected(f"'{tensor.name}' inside the attention is also read by '{user.name}'")
    return core + list(candidates.values()), rewires


def _reads_shape_of_input(node: gs.Node, tensor: gs.Tensor, x: gs.Tensor, analysis: Analysis) -> bool:
    """Whether ``node`` is Shape(tensor) and could read X's shape instead (see _shape_plan)."""
    return node.op == "Shape" and not node.attrs and _shape_plan(tensor, x, analysis) is not None


def _shape_plan(tensor: gs.Tensor, x: gs.Tensor, analysis: Analysis) -> list[tuple[str, int]] | None:
    """Each axis of ``tensor`` as ("axis", index into X's shape) or ("static", size); None if some
    axis is neither (or the tensor's layout is unknown)."""
    layout = analysis.layouts.get(id(tensor))
    if layout is None or layout.fixed:
        return None
    x_axes = analysis.base(x).axes
    plan = []
    for axis in layout.axes:
        size = product(a.size for a in axis)
        atoms = tuple(a for a in axis if a.size != ONE)
        index = next((i for i, x_axis in enumerate(x_axes) if len(x_axis) == len(atoms) == 1 and x_axis[0] is atoms[0]), None)
        if index is not None:
            plan.append(("axis", index))
        elif size.static:
            plan.append(("static", size.coef))
        else:
            return None
    return plan


def _depends_on(tensor: gs.Tensor, nodes: set[int]) -> bool:
    stack, seen = [tensor], set()
    while stack:
        node = producer(stack.pop())
        if node is None or id(node) in seen:
            continue
        if id(node) in nodes:
            return True
        seen.add(id(node))
        stack.extend(node.inputs)
    return False


# ---------------------------------------------------------------- the rewrite
class _Emitter:
    """Creates the replacement's nodes with fresh names and the rule's provenance."""

    def __init__(self, ctx: PassContext, base: str):
        self.ctx, self.base, self.created = ctx, base, []

    def node(self, op: str, inputs: list, outputs: list | None = None, domain: str | None = None, **attrs) -> gs.Tensor:
        outputs = outputs or [gs.Variable(self.ctx.fresh_name(f"{self.base}/{RULE}_out"))]
        made = gs.Node(op, name=self.ctx.fresh_name(f"{self.base}/{RULE}"), attrs=attrs, inputs=inputs,
                       outputs=outputs, domain=domain)
        set_provenance(made, RULE)
        self.created.append(made)
        return outputs[0]

    def const(self, values: np.ndarray, hint: str) -> gs.Constant:
        return make_constant(self.ctx.fresh_name(f"{self.base}/{hint}"), values)

    def axes_node(self, op: str, tensor: gs.Tensor, axes: list[int], opset: int, **attrs) -> gs.Tensor:
        """Unsqueeze, Squeeze or ReduceMax over ``axes``: an input from the opset that made it one."""
        if opset >= AXES_INPUT_SINCE[op]:
            return self.node(op, [tensor, self.const(np.array(axes, np.int64), "axes")], **attrs)
        return self.node(op, [tensor], axes=axes, **attrs)


def rewrite_attention(match: AttentionMatch, graph: gs.Graph, ctx: PassContext, opset: int,
                      biases: dict | None = None) -> None:
    """Replace the matched nodes by one Attention node (plus mask and output layout ops).

    ``biases`` maps (mask, sequence length) to its expanded attention bias, so that the layers of
    one model that read the same mask share one Expand instead of making one each."""
    emit = _Emitter(ctx, match.softmax.name or "attention")
    query = match.branches["query"]
    num_heads, head_size = query.num_heads, query.head_size
    weight, bias = _packed_weights(match)
    attrs = {"num_heads": num_heads}
    if not math.isclose(match.scale, 1.0 / math.sqrt(head_size), rel_tol=SCALE_RTOL):
        attrs["scale"] = float(match.scale)
    inputs = [match.x, emit.const(weight, "qkv_weight"), emit.const(bias, "qkv_bias")]
    steps = list(match.output_steps)
    if match.mask is not None:
        key = (id(match.mask), str(match.seq.size), match.guarded)
        cache = biases if biases is not None else {}
        if key not in cache:
            cache[key] = _mask_inputs(match, emit, opset)
        attention_bias, keep = cache[key]
        inputs += [gs.Variable.empty(), gs.Variable.empty(), attention_bias]
        if keep is not None:
            steps.insert(0, ("Mul", keep))
    for shape_node, plan in match.shape_rewires:
        _rewire_shape(shape_node, plan, match.x, emit)
    output = match.output
    for node in match.nodes:
        node.inputs.clear()
        node.outputs.clear()
    remove_nodes(graph, match.nodes)
    dtype = np.dtype(match.x.dtype)
    # Attention's output is [batch, sequence, v_hidden]: typed here because onnx's shape inference
    # knows no contrib op, and the layout ops after it (and later passes) need the shape.
    shape = list(match.x.shape[:-1]) + [weight.shape[1] // 3] if match.x.shape is not None else None
    first = [output] if not steps else [gs.Variable(ctx.fresh_name(f"{emit.base}/{RULE}_out"), dtype=dtype, shape=shape)]
    result = emit.node("Attention", inputs, first, domain=MS_DOMAIN, **attrs)
    for index, (op, operand) in enumerate(steps):
        last = index == len(steps) - 1
        if op == "Mul":  # first, on Attention's own layout: typed like it
            typed = [output] if last else [gs.Variable(ctx.fresh_name(f"{emit.base}/{RULE}_out"), dtype=dtype, shape=shape)]
            result = emit.node("Mul", [result, operand], typed)
        elif op == "Transpose":
            result = emit.node("Transpose", [result], [output] if last else None, perm=operand)
        else:
            result = emit.node("Reshape", [result, emit.const(np.array(operand, np.int64), "shape")],
                               [output] if last else None)
    graph.nodes.extend(emit.created)


def _packed_weights(match: AttentionMatch) -> tuple[np.ndarray, np.ndarray]:
    """[Wq | Wk | Wv] and [bq | bk | bv] with each part's columns in [heads, head_dim] order."""
    weights, biases = [], []
    for role in ("query", "key", "value"):
        branch = match.branches[role]
        columns = branch.columns()
        weight = constant(branch.projection.weight)
        bias = branch.projection.bias
        weights.append(weight[:, columns])
        biases.append(constant(bias)[columns] if bias is not None else np.zeros(len(columns), weight.dtype))
    dtype = np.dtype(match.x.dtype)
    return np.concatenate(weights, axis=1).astype(dtype), np.concatenate(biases).astype(dtype)


def _mask_inputs(match: AttentionMatch, emit: _Emitter, opset: int) -> tuple[gs.Tensor, gs.Tensor | None]:
    """(attention_bias, keep): keep is None unless the softmax was NaN-guarded (see the module doc)."""
    if not match.guarded:
        return _attention_bias(match.mask, match, emit), None
    mask, dtype = match.mask, np.dtype(match.x.dtype)
    rank = len(mask.shape)
    full = mask if rank == 4 else emit.axes_node("Unsqueeze", mask, list(range(4 - rank)), opset)
    top = emit.axes_node("ReduceMax", full, [3], opset, keepdims=1)  # [B|1, 1, S|1, 1]
    every_key_masked = emit.node("IsInf", [top], detect_positive=0)
    keep = emit.node("Cast", [emit.node("Not", [every_key_masked])], to=int(helper.np_dtype_to_tensor_dtype(dtype)))
    keep = emit.axes_node("Squeeze", keep, [1], opset)  # [B|1, S|1, 1], against Attention's [B, S, N*D]
    finite = emit.node("Max", [mask, emit.const(np.array(np.finfo(dtype).min, dtype), "lowest")])
    return _attention_bias(finite, match, emit), keep


def _attention_bias(mask: gs.Tensor, match: AttentionMatch, emit: _Emitter) -> gs.Tensor:
    """The mask, expanded to [.., .., S, S] unless its shape already is that."""
    if _mask_is_full(match.mask, match.seq):
        return mask
    shape = emit.node("Shape", [match.x])
    seq = emit.node("Gather", [shape, emit.const(np.array([1, 1], np.int64), "seq_index")], axis=0)
    target = emit.node("Concat", [emit.const(np.array([1, 1], np.int64), "ones"), seq], axis=0)
    return emit.node("Expand", [mask, target])


def _rewire_shape(shape_node: gs.Node, plan: list[tuple[str, int]], x: gs.Tensor, emit: _Emitter) -> None:
    """Shape(T) -> Gather(Shape(X) [+ T's static sizes], plan): T is going away."""
    old = shape_node.outputs[0]
    fresh = gs.Variable(emit.ctx.fresh_name(f"{old.name}/of_input"), dtype=np.int64)
    shape_node.inputs[0] = x
    shape_node.outputs[0] = fresh
    statics = [value for kind, value in plan if kind == "static"]
    source = fresh
    if statics:
        source = emit.node("Concat", [fresh, emit.const(np.array(statics, np.int64), "sizes")], axis=0)
    appended = iter(range(len(x.shape), len(x.shape) + len(statics)))  # the statics' positions in source
    indices = [value if kind == "axis" else next(appended) for kind, value in plan]
    emit.node("Gather", [source, emit.const(np.array(indices, np.int64), "axes")], [old], axis=0)


def _output_plan(layout: Layout, batch: Atom, seq: Atom, value: Branch) -> list[tuple[str, list]]:
    """Transpose/Reshape steps that turn Attention's [B, S, N*D] output into ``layout`` (Y's)."""
    flat = [a for a in layout.atoms() if a.size != ONE or a is batch or a is seq]
    features = list(value.heads + value.dim)
    steps: list[tuple[str, list]] = []
    if _find(flat, features) is not None:
        units = [[batch], [seq], features]
    else:
        units = [[batch], [seq], list(value.heads), list(value.dim)]
        steps.append(("Reshape", [0, 0, value.num_heads, value.head_size]))
    positions = [_find(flat, unit) for unit in units]
    if None in positions:
        raise Rejected("the attention output's layout splits the heads or the head_dim")
    order = sorted(range(len(units)), key=lambda u: positions[u])
    covered = 0
    for u in order:
        if positions[u] != covered:
            raise Rejected("the attention output's layout mixes other axes into it")
        covered += len(units[u])
    if covered != len(flat):
        raise Rejected("the attention output's layout mixes other axes into it")
    if order != list(range(len(units))):
        steps.append(("Transpose", order))
    final, cursor = [], 0
    for axis in layout.axes:
        atoms, taken = [a for a in axis if a.size != ONE or a is batch or a is seq], 0
        first = cursor
        while taken < len(atoms):
            taken += len(units[order[cursor]])
            cursor += 1
        if taken != len(atoms):
            raise Rejected("the attention output's layout cuts across the batch, sequence or features")
        size = product(a.size for a in atoms)
        if cursor - first == 1 and first == len(final):
            final.append(0)
        elif size.static:
            final.append(size.coef)
        else:
            final.append(-1)
    if final.count(-1) > 1:
        raise Rejected("the attention output's layout has more than one dynamic merged axis")
    if final != [0] * len(units):
        steps.append(("Reshape", final))
    return steps


def _find(flat: list[Atom], run: list[Atom]) -> int | None:
    for start in range(len(flat) - len(run) + 1):
        if all(flat[start + i] is run[i] for i in range(len(run))):
            return start
    return None


# ---------------------------------------------------------------- the pass
def explain_attention(model: Model) -> list[tuple[str, str | None]]:
    """(Softmax name, None if the attention around it would fuse, else why not), in graph order."""
    infer_shapes(model)
    results = []
    for graph in iter_graphs(model.graph):
        for node in graph.nodes:
            if node.op != "Softmax":
                continue
            try:
                match_attention(node, graph, model.opset())
                results.append((node.name, None))
            except Rejected as exc:
                results.append((node.name, str(exc)))
    return results


@register
class FuseAttention(Pass):
    """Fuse Q/K/V projections and scaled dot-product attention into onnxruntime's Attention."""

    name = "fuse-attention"
    preserves_fp32 = True

    def run(self, model: Model, ctx: PassContext) -> bool:
        if not for_onnxruntime(ctx.target):
            return False
        infer_shapes(model)
        changed = False
        for graph in list(iter_graphs(model.graph)):
            biases: dict = {}
            for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
                if not softmax.outputs:  # removed by an earlier rewrite
                    continue
                try:
                    found = match_attention(softmax, graph, model.opset())
                    verdict = "fused into Attention"
                except Rejected as exc:
                    found, verdict = None, f"not fused, {exc}"
                label = softmax.name or softmax.outputs[0].name
                ctx.record(**{"pass": RULE, "node": label, "op": "Softmax", "rule": f"{RULE}: {verdict}"})
                if found is not None:
                    rewrite_attention(found, graph, ctx, model.opset(), biases)
                    changed = True
            if changed:
                toposort(graph)
        if changed:
            use_ms_domain(model)
        return changed
