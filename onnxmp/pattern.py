"""Declarative subgraph patterns and rewrites.

A rule is the math it matches plus what replaces it::

    def erf_gelu(op, x):                      # 0.5 * x * (1 + erf(x / sqrt(2)))
        return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, SQRT2)), 1.0)), 0.5)

    def gelu(op, x):
        return op.Gelu(x)

    GELU = Rule("fuse-gelu", erf_gelu, gelu)

The target function is called once with a pattern builder: its parameters become pattern
variables (annotate one with ``Const`` to match only constants), Python numbers become constant
literals compared with a tolerance, and keyword arguments become attribute predicates (a value,
or a callable taking the attribute value, None when absent). ``_name="conv"`` tags a pattern
node so that conditions and replacements can read the matched node as ``match.nodes["conv"]``.

A match checks op types, domains, edges, attributes and constants, and that every intermediate
tensor is used only inside the match (and is no graph output). The replacement function is called
with a builder that creates real nodes and with the bound variables it names (plus ``match`` if it
asks for it); it returns the tensor that takes the place of the matched root's output, or None to
decline. The rewrite then happens in one step, or not at all. Every created node records the
rule's name as its provenance.

Patterns are DAGs: a pattern node used twice (``d = op.Sub(x, op.ReduceMean(x))`` read by both
the variance and the division of a LayerNorm) matches one graph node. A target may return a tuple
of ops: the first is the root, the others are intermediate values of the match that may be used
outside it (a residual sum that both a fused norm and the next block read); the replacement then
returns one tensor per output, None for an extra output that nothing outside the match reads.
A condition may raise ``Rejected(reason)`` so that ``explain`` says why it rejected a match.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxmp.ir import (
    Model,
    constant_value,
    is_constant,
    graph_output_ids,
    iter_graphs,
    make_constant,
    producer,
    remove_nodes,
    replace_all_uses,
    set_provenance,
    toposort,
)
from onnxmp.pass_manager import PassContext

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"}


# ---------------------------------------------------------------- pattern values
class Const:
    """Annotation for a pattern variable that matches constant tensors only."""


@dataclass(eq=False)
class PVar:
    name: str
    constant: bool = False


@dataclass(eq=False)
class PLiteral:
    value: np.ndarray
    rtol: float = 1e-6
    atol: float = 1e-6


@dataclass(eq=False)
class POp:
    op_type: str
    inputs: list[Any]
    attrs: dict[str, Any]
    domain: str = ""
    tag: str | None = None
    output_index: int = 0


class _PatternBuilder:
    """``op.Conv(x, w)`` in a target function builds a pattern node."""

    def __getattr__(self, op_type: str) -> Callable[..., POp]:
        def build(*inputs: Any, _domain: str = "", _name: str | None = None, **attrs: Any) -> POp:
            return POp(op_type, [_as_pattern(v) for v in inputs], attrs, _domain, _name)

        return build


def _as_pattern(value: Any) -> Any:
    if isinstance(value, (PVar, PLiteral, POp)):
        return value
    return PLiteral(np.asarray(value))


def literal(value: Any, rtol: float = 1e-6, atol: float = 1e-6) -> PLiteral:
    """A constant in a pattern with an explicit tolerance."""
    return PLiteral(np.asarray(value), rtol, atol)


# ---------------------------------------------------------------- matches
@dataclass
class Match:
    """A successful match: bound variables, tagged nodes, every matched node, and the root."""

    rule: "Rule"
    graph: gs.Graph
    root: gs.Node
    bindings: dict[str, gs.Tensor] = field(default_factory=dict)
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    matched: list[gs.Node] = field(default_factory=list)
    outputs: list[gs.Tensor] = field(default_factory=list)  # the root's output, then the extra outputs

    def value(self, name: str) -> np.ndarray | None:
        """The constant value bound to variable ``name`` (None if it is not constant)."""
        return constant_value(self.bindings[name])

    @property
    def output(self) -> gs.Tensor:
        return self.root.outputs[self.rule.pattern.output_index]

    def used_outside(self, index: int) -> bool:
        """Whether output ``index`` (0: the root's) is read outside the match or is a graph output."""
        tensor = self.outputs[index]
        inside = {id(n) for n in self.matched}
        return id(tensor) in graph_output_ids(self.graph) or any(id(u) not in inside for u in tensor.outputs)


class Rejected(Exception):
    """Raised by a rule's condition to reject a match with a reason that ``explain`` reports."""


class _Failure(Exception):
    """Raised inside the matcher; carries why and how far the match got."""

    def __init__(self, reason: str, depth: int):
        super().__init__(reason)
        self.reason = reason
        self.depth = depth


class _Attempt:
    """State of one match attempt; copied at each commutative branch point."""

    def __init__(self, graph_nodes: set[int]):
        self.graph_nodes = graph_nodes
        self.bindings: dict[str, gs.Tensor] = {}
        self.tags: dict[str, gs.Node] = {}
        self.nodes: list[gs.Node] = []
        self.by_pattern: dict[int, gs.Node] = {}  # id(POp) -> the graph node it matched

    def copy(self) -> "_Attempt":
        clone = _Attempt(self.graph_nodes)
        clone.bindings = dict(self.bindings)
        clone.tags = dict(self.tags)
        clone.nodes = list(self.nodes)
        clone.by_pattern = dict(self.by_pattern)
        return clone

    def adopt(self, other: "_Attempt") -> None:
        self.bindings, self.tags, self.nodes = other.bindings, other.tags, other.nodes
        self.by_pattern = other.by_pattern


def _match_value(pattern: Any, tensor: gs.Tensor, state: _Attempt) -> None:
    depth = len(state.nodes)
    if isinstance(pattern, PVar):
        bound = state.bindings.get(pattern.name)
        if bound is not None and bound is not tensor:
            raise _Failure(f"variable '{pattern.name}' would bind two tensors", depth)
        if pattern.constant and not is_constant(tensor):  # metadata only: weights stay unloaded
            raise _Failure(f"'{tensor.name}' is not a constant (for '{pattern.name}')", depth)
        state.bindings[pattern.name] = tensor
        return
    if isinstance(pattern, PLiteral):
        value = constant_value(tensor)
        if value is None:
            raise _Failure(f"'{tensor.name}' is not a constant", depth)
        if not _literal_equal(pattern, value):
            raise _Failure(f"'{tensor.name}' is not the constant {pattern.value.tolist()}", depth)
        return
    node = producer(tensor)
    if node is None or id(node) not in state.graph_nodes:
        raise _Failure(f"'{tensor.name}' is not produced by a {pattern.op_type} node", depth)
    if len(node.outputs) <= pattern.output_index or node.outputs[pattern.output_index] is not tensor:
        raise _Failure(f"'{tensor.name}' is not output {pattern.output_index} of '{node.name}'", depth)
    seen = state.by_pattern.get(id(pattern))
    if seen is not None:  # a shared pattern node (a DAG): it must meet the node it matched before
        if seen is not node:
            raise _Failure(f"'{tensor.name}' should be the output of '{seen.name}' read elsewhere in the pattern", depth)
        return
    _match_node(pattern, node, state)


def _literal_equal(pattern: PLiteral, value: np.ndarray) -> bool:
    if value.dtype.kind not in "fiub" or pattern.value.dtype.kind not in "fiub":
        return False
    if value.size != 1 and value.shape != pattern.value.shape:
        return False
    if pattern.value.size != 1 and value.shape != pattern.value.shape:
        return False
    return bool(np.allclose(value.astype(np.float64), pattern.value.astype(np.float64), pattern.rtol, pattern.atol))


def _match_node(pattern: POp, node: gs.Node, state: _Attempt) -> None:
    depth = len(state.nodes)
    if node.op != pattern.op_type or _domain(node.domain) != _domain(pattern.domain):
        raise _Failure(f"'{node.name}' is {node.op}, not {pattern.op_type}", depth)
    if any(n is node for n in state.nodes):
        raise _Failure(f"'{node.name}' would be matched twice", depth)
    for key, expected in pattern.attrs.items():
        actual = node.attrs.get(key)
        ok = expected(actual) if callable(expected) else _attr_equal(actual, expected)
        if not ok:
            raise _Failure(f"'{node.name}' attribute {key}={actual!r} does not fit", depth)
    inputs = _present_inputs(node)
    if len(inputs) != len(pattern.inputs):
        raise _Failure(
            f"'{node.name}' has {len(inputs)} inputs, the pattern wants {len(pattern.inputs)}", depth
        )
    state.nodes.append(node)
    state.by_pattern[id(pattern)] = node
    if pattern.tag:
        state.tags[pattern.tag] = node
    orders = [pattern.inputs]
    if pattern.op_type in COMMUTATIVE and len(pattern.inputs) == 2:
        orders.append(pattern.inputs[::-1])
    failure: _Failure | None = None
    for order in orders:
        trial = state.copy()
        try:
            for sub, tensor in zip(order, inputs):
                _match_value(sub, tensor, trial)
        except _Failure as exc:
            if failure is None or exc.depth > failure.depth:
                failure = exc
            continue
        state.adopt(trial)
        return
    assert failure is not None
    raise failure


def _domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def _present_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Inputs without trailing omitted optionals."""
    inputs = list(node.inputs)
    while inputs and isinstance(inputs[-1], gs.Variable) and inputs[-1].name == "":
        inputs.pop()
    return inputs


def _attr_equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, (list, tuple)):
        return actual is not None and list(actual) == list(expected)
    return actual == expected


def _check_boundaries(match_nodes: list[gs.Node], exposed: list[gs.Tensor], graph: gs.Graph) -> None:
    """Intermediate tensors must be used only inside the match and must not be graph outputs;
    the ``exposed`` ones (the root's output and a rule's extra outputs) may be."""
    inside = {id(n) for n in match_nodes}
    outputs = graph_output_ids(graph)
    allowed = {id(t) for t in exposed}
    for node in match_nodes:
        for tensor in node.outputs:
            if id(tensor) in allowed:
                continue
            if id(tensor) in outputs:
                raise _Failure(f"'{tensor.name}' is a graph output", len(match_nodes))
            if any(id(user) not in inside for user in tensor.outputs):
                raise _Failure(f"'{tensor.name}' has consumers outside the pattern", len(match_nodes))


# ---------------------------------------------------------------- rules
class Rule:
    """A named rewrite: target pattern function, replacement function, optional condition."""

    def __init__(
        self,
        name: str,
        target: Callable[..., Any],
        replacement: Callable[..., Any],
        when: Callable[[Match], bool] | None = None,
    ):
        self.name = name
        self.replacement = replacement
        self.when = when
        self.variables = _pattern_variables(target)
        built = target(_PatternBuilder(), *self.variables)
        outputs = list(built) if isinstance(built, tuple) else [built]
        if not outputs or not all(isinstance(o, POp) for o in outputs):
            raise TypeError(f"rule {name}: the target pattern must return an op or a tuple of ops, got {built!r}")
        self.pattern: POp = outputs[0]
        self.extra_outputs: list[POp] = outputs[1:]
        reachable = _pattern_nodes(self.pattern)
        for extra in self.extra_outputs:
            if not any(extra is p for p in reachable):
                raise TypeError(f"rule {name}: extra output {extra.op_type} is not part of the root's pattern")
        self._wants = list(inspect.signature(replacement).parameters)[1:]

    def match(self, node: gs.Node, graph: gs.Graph, graph_nodes: set[int] | None = None) -> Match:
        """Match with ``node`` as the root; raises _Failure with the reason otherwise."""
        state = _Attempt(graph_nodes if graph_nodes is not None else {id(n) for n in graph.nodes})
        _match_node(self.pattern, node, state)
        outputs = [node.outputs[self.pattern.output_index]]
        outputs += [state.by_pattern[id(p)].outputs[p.output_index] for p in self.extra_outputs]
        _check_boundaries(state.nodes, outputs, graph)
        found = Match(self, graph, node, state.bindings, state.tags, state.nodes, outputs)
        if self.when is not None:
            try:
                accepted = self.when(found)
            except Rejected as exc:
                raise _Failure(f"the rule's condition rejected the match: {exc}", len(state.nodes)) from None
            if not accepted:
                raise _Failure("the rule's condition rejected the match", len(state.nodes))
        return found

    def replace(self, match: Match, ctx: PassContext, pending: list[gs.Node]) -> list[gs.Node] | None:
        """Apply the replacement for ``match``, all of it or nothing; the created nodes, or None.

        Matched nodes are disconnected and appended to ``pending`` rather than dropped from
        ``graph.nodes``: the caller removes them all in one sweep.
        """
        builder = RewriteBuilder(self.name, match, ctx)
        arguments = {}
        for name in self._wants:
            arguments[name] = match if name == "match" else match.bindings.get(name)
        try:
            result = self.replacement(builder, **arguments)
        except _Decline:
            result = None
        results = self._results(result, match)
        if results is None:
            builder.discard()
            return None
        builder.commit(results, pending)
        return builder.created

    def _results(self, result: Any, match: Match) -> list[gs.Tensor | None] | None:
        """One replacement per output, or None when the replacement declined or left out an
        extra output that is still read outside the match."""
        if result is None:
            return None
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(results) != len(match.outputs):
            raise TypeError(f"rule {self.name}: the replacement returned {len(results)} tensors for {len(match.outputs)} outputs")
        if results[0] is None:
            return None
        inside = {id(n) for n in match.matched}
        graph_outputs = graph_output_ids(match.graph)
        for old, new in zip(match.outputs[1:], results[1:]):
            if new is None and (id(old) in graph_outputs or any(id(u) not in inside for u in old.outputs)):
                return None
        return results


def _pattern_nodes(root: POp) -> list[POp]:
    """Every op of a pattern, each once."""
    found: list[POp] = []
    stack = [root]
    while stack:
        current = stack.pop()
        if any(current is f for f in found):
            continue
        found.append(current)
        stack.extend(v for v in current.inputs if isinstance(v, POp))
    return found


def _pattern_variables(target: Callable[..., Any]) -> list[PVar]:
    params = list(inspect.signature(target).parameters.values())[1:]
    return [PVar(p.name, constant=p.annotation in (Const, "Const")) for p in params]


class _Decline(Exception):
    """A replacement may raise this (via ``op.decline()``) to leave the match alone."""


class RewriteBuilder:
    """``op`` in a replacement: creates real nodes and constants, staged until commit."""

    def __init__(self, rule: str, match: Match, ctx: PassContext):
        self.rule = rule
        self.match = match
        self.ctx = ctx
        self.created: list[gs.Node] = []
        self._base = match.root.name or match.root.op

    def __getattr__(self, op_type: str) -> Callable[..., gs.Variable]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def build(*inputs: Any, _domain: str = "", _outputs: int | Sequence[bool] = 1, **attrs: Any):
            """``_outputs``: how many outputs, or one flag per output (False: an omitted optional
            output). None among the inputs is an omitted optional input."""
            present = [True] * _outputs if isinstance(_outputs, int) else list(_outputs)
            written = len(present) - present[::-1].index(True) if True in present else 0  # trailing omitted ones dropped
            fresh = f"{self._base}/{self.rule}_out"
            node = gs.Node(
                op_type,
                name=self.ctx.fresh_name(f"{self._base}/{self.rule}"),
                attrs={k: v for k, v in attrs.items() if v is not None},
                inputs=[self._as_tensor(v) for v in _without_trailing_none(inputs)],
                outputs=[gs.Variable(self.ctx.fresh_name(fresh)) if keep else gs.Variable.empty() for keep in present[:written]],
                domain=_domain or None,
            )
            set_provenance(node, self.rule)
            self.created.append(node)
            if isinstance(_outputs, int) and _outputs == 1:
                return node.outputs[0]
            return [node.outputs[i] if keep else None for i, keep in enumerate(present)]

        return build

    def const(self, values: np.ndarray, hint: str = "const") -> gs.Constant:
        """A new initializer with a fresh name derived from the matched root."""
        return make_constant(self.ctx.fresh_name(f"{self._base}/{hint}"), np.asarray(values))

    def _as_tensor(self, value: Any) -> gs.Tensor:
        if value is None:
            return gs.Variable.empty()
        if isinstance(value, gs.Tensor):
            return value
        return self.const(np.asarray(value))

    def decline(self) -> None:
        raise _Decline()

    def discard(self) -> None:
        for node in self.created:
            node.inputs.clear()
            node.outputs.clear()
        self.created.clear()

    def commit(self, results: list[gs.Tensor | None], pending: list[gs.Node]) -> None:
        """Wire each result in place of the matching output; disconnect the matched nodes into ``pending``."""
        for (old, slot), result in zip(self._output_slots(), results):
            if result is not None:
                self._wire(old, slot, result)
        # Removed by the caller in one sweep: one sweep of graph.nodes per match is quadratic.
        for node in self.match.matched:
            node.inputs.clear()
            node.outputs.clear()
        pending.extend(self.match.matched)
        self.match.graph.nodes.extend(self.created)

    def _output_slots(self) -> list[tuple[gs.Tensor, tuple[gs.Node, int]]]:
        """Each output of the match with the matched node and output position that produce it."""
        slots = []
        for tensor in self.match.outputs:
            node = producer(tensor)
            assert node is not None
            slots.append((tensor, (node, [id(t) for t in node.outputs].index(id(tensor)))))
        return slots

    def _wire(self, old: gs.Tensor, slot: tuple[gs.Node, int], result: gs.Tensor) -> None:
        """Make ``result`` take the place of ``old``; ``old`` keeps its name (and graph output)."""
        node, index = slot
        made_here = producer(result)
        if made_here is not None and any(made_here is n for n in self.created):
            if old.dtype is None:
                old.dtype = result.dtype
            position = [id(t) for t in made_here.outputs].index(id(result))
            node.outputs[index] = gs.Variable(self.ctx.fresh_name(f"{old.name}/replaced"))
            made_here.outputs[position] = old
        elif id(old) in graph_output_ids(self.match.graph):
            identity = gs.Node(
                "Identity",
                name=self.ctx.fresh_name(f"{self._base}/{self.rule}"),
                inputs=[result],
                outputs=[old],
            )
            node.outputs[index] = gs.Variable(self.ctx.fresh_name(f"{old.name}/replaced"))
            set_provenance(identity, self.rule)
            self.created.append(identity)
        else:
            replace_all_uses(old, result)


def _without_trailing_none(inputs: Sequence[Any]) -> list[Any]:
    values = list(inputs)
    while values and values[-1] is None:
        values.pop()
    return values


# ---------------------------------------------------------------- driving
def rewrite_all(model: Model, rules: Sequence[Rule] | Rule, ctx: PassContext) -> bool:
    """Apply each rule wherever it matches, in every graph; True if anything changed."""
    rules = [rules] if isinstance(rules, Rule) else list(rules)
    changed = False
    for graph in list(iter_graphs(model.graph)):
        if _rewrite_graph(graph, rules, ctx):
            toposort(graph)
            changed = True
    return changed


def _rewrite_graph(graph: gs.Graph, rules: list[Rule], ctx: PassContext) -> bool:
    changed = False
    for rule in rules:
        graph_nodes = {id(n) for n in graph.nodes}
        removed: set[int] = set()
        pending: list[gs.Node] = []
        for node in list(graph.nodes):
            if node.op != rule.pattern.op_type or id(node) in removed:
                continue
            try:
                found = rule.match(node, graph, graph_nodes)
            except _Failure:
                continue
            created = rule.replace(found, ctx, pending)
            if created is not None:
                removed.update(id(n) for n in found.matched)
                graph_nodes.difference_update(id(n) for n in found.matched)
                graph_nodes.update(id(n) for n in created)
                changed = True
        remove_nodes(graph, pending)
    return changed


@dataclass
class Explanation:
    """Why a rule matched or did not, per candidate root node."""

    rule: str
    root_op: str
    matched: list[str]
    failures: list[tuple[str, str]]

    def __str__(self) -> str:
        lines = [f"rule {self.rule}: {len(self.matched)} match(es)"]
        lines += [f"  matches at {name}" for name in self.matched]
        lines += [f"  no match at {name}: {reason}" for name, reason in self.failures]
        if not self.matched and not self.failures:
            lines.append(f"  no {self.root_op} node to start from")
        return "\n".join(lines)


def explain(model: Model, rule: Rule) -> Explanation:
    """A tracer: for each candidate root node, whether the rule matches and if not, why."""
    matched, failures = [], []
    for graph in iter_graphs(model.graph):
        nodes = {id(n) for n in graph.nodes}
        for node in graph.nodes:
            if node.op != rule.pattern.op_type:
                continue
            try:
                rule.match(node, graph, nodes)
                matched.append(node.name)
            except _Failure as exc:
                failures.append((node.name, exc.reason))
    return Explanation(rule.name, rule.pattern.op_type, matched, failures)
