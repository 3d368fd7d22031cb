"""Which logical axes each physical axis of a tensor holds, through the layout ops exporters write
around attention (Transpose, Reshape, Unsqueeze, Squeeze, Gather, Identity).

Exporters split heads in many ways: BERT's ``Reshape [B, S, N, D] + Transpose``, torch's
nn.MultiheadAttention ``Transpose [S, B, E] + packed in-projection + Reshape [S, B, 3, E] +
Gather + Reshape [S, B*N, D] + Transpose + Reshape [B, N, S, D]``. Instead of one pattern per
exporter, a tensor's layout is followed exactly: every axis is a tuple of *atoms* (the logical
factors of its size, row-major), a Reshape regroups the row-major sequence of atoms (splitting a
static atom where the target needs it), a Transpose permutes axes, a Gather with a constant index
fixes one atom. Two axes hold the same data exactly when they hold the same atoms, so "Q heads
are [batch, heads, sequence, head_dim] of the projection of X" becomes an identity check.

Reshape targets are usually computed at run time from Shape nodes; ``Analysis.value`` evaluates
such shape subgraphs to sizes that may be symbolic (``batch * 4``). Anything it cannot follow
raises ``Rejected``: the caller then leaves the graph alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxmp.ir import constant_value, is_omitted, producer
from onnxmp.pattern import Rejected

INT64_MAX = 2**63 - 1


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """``ir.constant_value``, also through Identity (torch exports alias equal weights so) and for
    Constant nodes without a domain: onnx-graphsurgeon imports torch exports' Constant nodes with
    domain None, which ``constant_value`` does not accept."""
    value = constant_value(tensor)
    node = producer(tensor)
    if value is None and node is not None and node.op == "Identity":
        return constant(node.inputs[0])
    if value is None and node is not None and node.op == "Constant" and node.domain is None:
        attr = node.attrs.get("value")
        value = attr.values if isinstance(attr, gs.Constant) else None
    return value


# ------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Size:
    """coef * product(symbols): a dimension size, static when ``symbols`` is empty."""

    coef: int
    symbols: tuple[str, ...] = ()

    @property
    def static(self) -> bool:
        return not self.symbols

    def __mul__(self, other: "Size") -> "Size":
        return Size(self.coef * other.coef, tuple(sorted(self.symbols + other.symbols)))

    def divides(self, other: "Size") -> bool:
        """Whether ``other / self`` is a Size (exact division)."""
        if self.coef == 0 or other.coef % self.coef:
            return False
        rest = list(other.symbols)
        for symbol in self.symbols:
            if symbol not in rest:
                return False
            rest.remove(symbol)
        return True

    def __truediv__(self, other: "Size") -> "Size":
        if not other.divides(self):
            raise Rejected(f"{self} is not a multiple of {other}")
        rest = list(self.symbols)
        for symbol in other.symbols:
            rest.remove(symbol)
        return Size(self.coef // other.coef, tuple(rest))

    def __str__(self) -> str:
        return "*".join([str(self.coef)] * (self.coef != 1 or not self.symbols) + list(self.symbols))


ONE = Size(1)


def product(sizes) -> Size:
    total = ONE
    for size in sizes:
        total = total * size
    return total


def dim_size(tensor: gs.Tensor, index: int) -> Size:
    """Axis ``index`` of ``tensor``: static, its dim_param (equal names mean equal sizes), or a
    symbol of its own."""
    dim = tensor.shape[index] if tensor.shape is not None else None
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return Size(int(dim))
    if isinstance(dim, str) and dim:
        return Size(1, (dim,))
    return Size(1, (f"{tensor.name}#{index}",))


# ------------------------------------------------------------------ atoms and layouts
@dataclass(eq=False)
class Atom:
    """A logical factor of an axis. Splitting a static atom makes children; ``after`` is the
    product of the later siblings' sizes, so a child's stride within its root is known."""

    size: Size
    parent: "Atom | None" = None
    after: int = 1

    def root(self) -> "Atom":
        atom = self
        while atom.parent is not None:
            atom = atom.parent
        return atom

    def stride(self) -> int:
        """Row-major stride of this atom's index inside its root atom."""
        stride, atom = 1, self
        while atom.parent is not None:
            stride *= atom.after
            atom = atom.parent
        return stride

    def descends_from(self, other: "Atom") -> bool:
        atom = self
        while atom is not None:
            if atom is other:
                return True
            atom = atom.parent
        return False


Axis = tuple  # tuple[Atom, ...]


@dataclass
class Layout:
    """Axes as tuples of atoms, and the atoms a Gather fixed to one index."""

    axes: list
    fixed: dict = field(default_factory=dict)  # id(atom) -> (atom, index)

    def sizes(self) -> list[Size]:
        return [product(a.size for a in axis) for axis in self.axes]

    def atoms(self) -> list[Atom]:
        return [atom for axis in self.axes for atom in axis]


def split(atom: Atom, first: Size) -> tuple[Atom, Atom]:
    """Split a static atom into [first, rest] (row-major)."""
    rest = atom.size / first
    return Atom(first, atom, rest.coef), Atom(rest, atom, 1)


def regroup(layout: Layout, targets: list[Size]) -> Layout:
    """The layout after a Reshape to ``targets`` (no 0 or -1 left): the row-major atom sequence
    is cut into the target sizes, splitting a static atom where a cut falls inside it."""
    queue = layout.atoms()
    axes = []
    for target in targets:
        if target == ONE:  # keeps a size-1 atom (a batch of 1) where it stays in place
            axes.append((queue.pop(0),) if queue and queue[0].size == ONE else (Atom(ONE),))
            continue
        group, need = [], target
        while need != ONE:
            while queue and queue[0].size == ONE:
                queue.pop(0)
            if not queue:
                raise Rejected(f"reshape to {[str(t) for t in targets]} does not regroup the axes")
            atom = queue[0]
            if atom.size.divides(need):
                group.append(queue.pop(0))
                need = need / atom.size
            elif atom.size.static and need.static and need.divides(atom.size):
                head, queue[0] = split(atom, need)
                group.append(head)
                need = ONE
            else:
                raise Rejected(f"reshape to {[str(t) for t in targets]} cuts an axis of size {atom.size}")
        axes.append(tuple(group))
    if any(a.size != ONE for a in queue):
        raise Rejected("reshape leaves atoms over")
    return Layout(axes, dict(layout.fixed))


# ------------------------------------------------------------------ analysis
@dataclass
class Projection:
    """``x @ weight (+ bias)`` with constant 2-D weight: its output's last axis is one new atom."""

    matmul: gs.Node
    add: gs.Node | None
    weight: gs.Tensor
    bias: gs.Tensor | None
    input: gs.Tensor  # the MatMul's data input
    feature: Atom


LAYOUT_OPS = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Identity")


class Analysis:
    """Layouts and shape values of tensors in one graph, memoized for one match attempt."""

    def __init__(self, opset: int):
        self.opset = opset
        self.layouts: dict[int, Layout] = {}
        self.values: dict[int, tuple[int, list]] = {}
        self.projections: dict[int, Projection] = {}  # id(feature atom) -> projection
        self.bases: dict[int, gs.Tensor] = {}  # id(atom) -> the tensor it is an axis of

    # ---------------------------------------------------------- layouts
    def base(self, tensor: gs.Tensor) -> Layout:
        """A tensor taken as it is: one fresh atom per axis."""
        key = id(tensor)
        if key not in self.layouts:
            if tensor.shape is None:
                raise Rejected(f"the rank of '{tensor.name}' is unknown")
            axes = []
            for index in range(len(tensor.shape)):
                atom = Atom(dim_size(tensor, index))
                self.bases[id(atom)] = tensor
                axes.append((atom,))
            self.layouts[key] = Layout(axes)
        return self.layouts[key]

    def input_layout(self, tensor: gs.Tensor) -> Layout:
        """Layout of a projection's input: through Transposes down to the first other tensor."""
        node = producer(tensor)
        if node is not None and node.op == "Transpose":
            if id(tensor) not in self.layouts:
                self.layouts[id(tensor)] = self.transpose(node, self.input_layout(node.inputs[0]))
            return self.layouts[id(tensor)]
        return self.base(tensor)

    def layout(self, tensor: gs.Tensor) -> Layout:
        if id(tensor) in self.layouts:
            return self.layouts[id(tensor)]
        node = producer(tensor)
        projection = self.projection(tensor)
        if projection is not None:
            before = self.input_layout(projection.input)
            if len(before.axes[-1]) != 1:
                raise Rejected(f"the input of '{projection.matmul.name}' has a composite last axis")
            result = Layout(before.axes[:-1] + [(projection.feature,)], dict(before.fixed))
        elif node is not None and node.op in LAYOUT_OPS and node.outputs[0] is tensor:
            result = self.apply(node, self.layout(node.inputs[0]))
        else:
            result = self.base(tensor)
        self.layouts[id(tensor)] = result
        return result

    def projection(self, tensor: gs.Tensor) -> Projection | None:
        """``tensor`` as MatMul(x, W) or Add(MatMul(x, W), b), W a constant [K, F], b constant [F]."""
        node = producer(tensor)
        add = bias = None
        if node is not None and node.op == "Add":
            for out, other in ((0, 1), (1, 0)):
                inner = producer(node.inputs[out])
                if inner is not None and inner.op == "MatMul" and constant(node.inputs[other]) is not None:
                    add, bias, node = node, node.inputs[other], inner
                    break
            else:
                return None
        if node is None or node.op != "MatMul" or constant(node.inputs[1]) is None:
            return None
        weight = node.inputs[1]
        shape = np.shape(constant(weight))
        if len(shape) != 2:
            return None
        if bias is not None and np.shape(constant(bias)) != (shape[1],):
            return None
        feature = Atom(Size(int(shape[1])))
        found = Projection(node, add, weight, bias, node.inputs[0], feature)
        self.projections[id(feature)] = found
        return found

    def apply(self, node: gs.Node, layout: Layout) -> Layout:
        op = node.op
        if op == "Identity":
            return layout
        if op == "Transpose":
            return self.transpose(node, layout)
        if op == "Reshape":
            if node.attrs.get("allowzero", 0):
                raise Rejected(f"'{node.name}' uses allowzero")
            return regroup(layout, self.reshape_targets(node, layout))
        if op == "Unsqueeze":
            axes = self.axes_of(node, len(layout.axes) + len(self.raw_axes(node)))
            result = list(layout.axes)
            for axis in sorted(axes):
                result.insert(axis, (Atom(ONE),))
            return Layout(result, dict(layout.fixed))
        if op == "Squeeze":
            axes = self.axes_of(node, len(layout.axes))
            if any(layout.sizes()[a] != ONE for a in axes):
                raise Rejected(f"'{node.name}' squeezes an axis that is not known to be 1")
            return Layout([ax for i, ax in enumerate(layout.axes) if i not in axes], dict(layout.fixed))
        return self.gather(node, layout)

    def transpose(self, node: gs.Node, layout: Layout) -> Layout:
        rank = len(layout.axes)
        perm = list(node.attrs.get("perm") or range(rank - 1, -1, -1))
        if sorted(perm) != list(range(rank)):
            raise Rejected(f"'{node.name}' has perm {perm} for rank {rank}")
        return Layout([layout.axes[p] for p in perm], dict(layout.fixed))

    def gather(self, node: gs.Node, layout: Layout) -> Layout:
        index = constant(node.inputs[1])
        axis = node.attrs.get("axis", 0) % len(layout.axes)
        if index is None or index.ndim != 0 or len(layout.axes[axis]) != 1:
            raise Rejected(f"'{node.name}' is not a Gather of one constant index along a plain axis")
        atom = layout.axes[axis][0]
        if not atom.size.static:
            raise Rejected(f"'{node.name}' gathers along a dynamic axis")
        fixed = dict(layout.fixed)
        fixed[id(atom)] = (atom, int(index) % atom.size.coef)
        return Layout([ax for i, ax in enumerate(layout.axes) if i != axis], fixed)

    def raw_axes(self, node: gs.Node) -> list[int]:
        if len(node.inputs) > 1 and not is_omitted(node.inputs[1]):
            value = constant(node.inputs[1])
            if value is None:
                raise Rejected(f"the axes of '{node.name}' are not constant")
            return [int(a) for a in value.reshape(-1)]
        if "axes" not in node.attrs:
            raise Rejected(f"'{node.name}' has no explicit axes")
        return [int(a) for a in node.attrs["axes"]]

    def axes_of(self, node: gs.Node, rank: int) -> list[int]:
        return [a % rank for a in self.raw_axes(node)]

    def reshape_targets(self, node: gs.Node, layout: Layout) -> list[Size]:
        rank, elements = self.value(node.inputs[1])
        if rank != 1 or any(isinstance(e, float) for e in elements):
            raise Rejected(f"the shape of '{node.name}' is not an integer vector")
        sizes = layout.sizes()
        targets: list[Size | None] = []
        for index, element in enumerate(elements):
            if element == Size(0):
                if index >= len(sizes):
                    raise Rejected(f"'{node.name}' copies a dimension its input does not have")
                targets.append(sizes[index])
            elif element == Size(-1):
                targets.append(None)
            elif element.coef > 0:
                targets.append(element)
            else:
                raise Rejected(f"'{node.name}' has a negative target dimension")
        unknown = [i for i, t in enumerate(targets) if t is None]
        if len(unknown) > 1:
            raise Rejected(f"'{node.name}' has more than one -1")
        if unknown:
            targets[unknown[0]] = product(sizes) / product(t for t in targets if t is not None)
        return targets  # type: ignore[return-value]

    # ---------------------------------------------------------- shape values
    def value(self, tensor: gs.Tensor) -> tuple[int, list]:
        """(rank 0 or 1, elements) of a small shape or scale tensor; elements are Size or float."""
        key = id(tensor)
        if key not in self.values:
            self.values[key] = self._evaluate(tensor)
        return self.values[key]

    def _evaluate(self, tensor: gs.Tensor) -> tuple[int, list]:
        known = constant(tensor)
        if known is not None:
            if known.ndim > 1 or known.size > 64:
                raise Rejected(f"'{tensor.name}' is not a small vector")
            kind = known.dtype.kind
            elements = [Size(int(v)) if kind in "iu" else float(v) for v in known.reshape(-1)]
            if kind not in "iuf":
                raise Rejected(f"'{tensor.name}' is not numeric")
            return known.ndim, elements
        node = producer(tensor)
        if node is None:
            raise Rejected(f"'{tensor.name}' is not computed from shapes and constants")
        op = node.op
        if op == "Shape":
            sizes = self.layout(node.inputs[0]).sizes()
            start, end = node.attrs.get("start", 0), node.attrs.get("end", len(sizes))
            return 1, sizes[slice(*_clamp(start, end, len(sizes)))]
        if op == "Identity":
            return self.value(node.inputs[0])
        if op == "Cast":
            return self._cast(node)
        if op == "Gather":
            return self._gather(node)
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            rank, elements = self.value(node.inputs[0])
            if op == "Squeeze" and len(elements) != 1:
                raise Rejected(f"'{node.name}' squeezes more than one element")
            out_rank = 1 if op == "Unsqueeze" else 0 if op == "Squeeze" else self._reshape_rank(node, elements)
            return out_rank, elements
        if op == "Concat":
            parts = [self.value(t) for t in node.inputs]
            if any(rank != 1 for rank, _ in parts):
                raise Rejected(f"'{node.name}' concatenates non-vectors")
            return 1, [e for _, elements in parts for e in elements]
        if op == "Slice":
            return self._slice(node)
        if op in ("Mul", "Div", "Add", "Sub", "Mod"):
            return self._binary(node)
        if op == "Sqrt":
            rank, elements = self.value(node.inputs[0])
            if not all(isinstance(e, float) for e in elements):
                raise Rejected(f"'{node.name}' takes the root of an integer")
            return rank, [math.sqrt(e) for e in elements]
        raise Rejected(f"'{tensor.name}' comes from {op}, which the shape analysis does not follow")

    def _cast(self, node: gs.Node) -> tuple[int, list]:
        rank, elements = self.value(node.inputs[0])
        target = helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
        if target.kind == "f":
            if not all(isinstance(e, float) or e.static for e in elements):
                raise Rejected(f"'{node.name}' casts a dynamic size to float")
            return rank, [float(e if isinstance(e, float) else e.coef) for e in elements]
        if target.kind not in "iu":
            raise Rejected(f"'{node.name}' casts to {target}")
        out = []
        for e in elements:
            if isinstance(e, float):
                if e != int(e):
                    raise Rejected(f"'{node.name}' truncates {e}")
                e = Size(int(e))
            out.append(e)
        return rank, out

    def _gather(self, node: gs.Node) -> tuple[int, list]:
        rank, elements = self.value(node.inputs[0])
        index_rank, indices = self.value(node.inputs[1])
        if rank != 1 or node.attrs.get("axis", 0) != 0 or not all(isinstance(i, Size) and i.static for i in indices):
            raise Rejected(f"'{node.name}' is not a Gather of constant indices from a vector")
        try:
            picked = [elements[i.coef] for i in indices]
        except IndexError:
            raise Rejected(f"'{node.name}' gathers outside its input") from None
        return index_rank, picked

    def _reshape_rank(self, node: gs.Node, elements: list) -> int:
        rank, shape = self.value(node.inputs[1])
        if len(shape) == 0 and len(elements) == 1:
            return 0
        if len(shape) == 1:
            return 1
        raise Rejected(f"'{node.name}' reshapes a shape vector to rank {len(shape)}")

    def _slice(self, node: gs.Node) -> tuple[int, list]:
        rank, elements = self.value(node.inputs[0])
        params = [self.value(t)[1] if len(node.inputs) > i and not is_omitted(t) else None
                  for i, t in enumerate(node.inputs[1:5], start=1)]
        params += [None] * (4 - len(params))
        starts, ends, axes, steps = params
        if rank != 1 or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
            raise Rejected(f"'{node.name}' is not a one-axis slice of a vector")
        numbers = [x for x in (starts + ends + (axes or []) + (steps or [])) if not (isinstance(x, Size) and x.static)]
        if numbers or (axes and axes[0].coef not in (0, -1)) or (steps and steps[0].coef != 1):
            raise Rejected(f"'{node.name}' has dynamic or strided slice parameters")
        begin, stop = _clamp(starts[0].coef, ends[0].coef, len(elements))
        return 1, elements[begin:stop]

    def _binary(self, node: gs.Node) -> tuple[int, list]:
        (rank_a, a), (rank_b, b) = self.value(node.inputs[0]), self.value(node.inputs[1])
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            raise Rejected(f"'{node.name}' has operands of lengths {len(a)} and {len(b)}")
        count = max(len(a), len(b))
        a, b = (a * count if len(a) == 1 else a), (b * count if len(b) == 1 else b)
        return max(rank_a, rank_b), [_arith(node, x, y) for x, y in zip(a, b)]


def _clamp(start: int, end: int, length: int) -> tuple[int, int]:
    start = max(0, start + length) if start < 0 else min(start, length)
    end = max(0, end + length) if end < 0 else min(end, length)
    return start, end


def _arith(node: gs.Node, x, y):
    op = node.op
    if isinstance(x, float) or isinstance(y, float):
        if not isinstance(x, float) or not isinstance(y, float):
            raise Rejected(f"'{node.name}' mixes integer and float operands")
        if op == "Div" and y == 0.0:
            raise Rejected(f"'{node.name}' divides by zero")
        if op == "Mul":
            return x * y
        if op == "Div":
            return x / y
        if op in ("Add", "Sub"):
            return x + y if op == "Add" else x - y
        raise Rejected(f"'{node.name}' computes {op} of floats")
    if op == "Mul":
        return x * y
    if op == "Div" and y.divides(x):
        return x / y
    if x.static and y.static and y.coef:
        a, b = x.coef, y.coef
        results = {"Add": a + b, "Sub": a - b, "Mod": a % b, "Div": int(a / b)}
        return Size(results[op])
    raise Rejected(f"'{node.name}' computes {op} of {x} and {y}, which the shape analysis does not follow")
