"""onnx's own node-test corpus as a source of small, trusted single-op models.

``onnx.backend.test.case.node.collect_testcases`` yields ~1,900 single-operator models with
inputs and reference outputs. :func:`iter_cases` turns each into either a :class:`CorpusCase`
(runnable on onnxruntime's CPU provider, with the original model's onnxruntime outputs, which
agree with onnx's reference outputs) or a :class:`Skip` with a reason category. Tests of a
precision (FP32 preservation, FP16, ...) optimize ``case.model``, run the result with
:func:`run_onnxruntime` on ``case.feeds`` and compare with ``case.expected`` using
:func:`compare_outputs`.

Re-stamping: onnx writes the newest IR version and opset, which onnxruntime may not load yet
(onnx 1.23 writes IR 14 / opset 28; onnxruntime 1.31 loads IR 13 / opset 26). When every ai.onnx
operator of a model exists at the newest opset onnxruntime supports with the same inputs, outputs
and attributes (opset 28 mostly widened type lists), the model is re-stamped to that opset and the
IR version lowered to what onnxruntime loads. The case is then still checked like any other: it
must load, pass onnx.checker and agree with onnx's reference outputs, so a re-stamp that changed
meaning would be skipped, not trusted. ``case.restamped`` says what was changed; the original and
any optimized model are both run at that stamp.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import numpy as np
import onnx
from onnx import helper

from onnxmp.ir import iter_proto_nodes

# Skip reason categories, in the order they are decided.
UNSUPPORTED_VALUES = (
    "inputs or outputs onnxruntime's Python API cannot hold (bfloat16, float8, 4-/2-bit types, optionals)"
)
NO_FLOAT_OUTPUTS = "no float outputs"
CANNOT_LOAD = "onnxruntime cannot load the original"
CANNOT_RUN = "onnxruntime fails running the original"
DISAGREES = "onnxruntime output disagrees with the reference outputs"
CHECKER_REJECTS = "onnx.checker rejects the original"

MAIN_DOMAINS = ("", "ai.onnx")

Value = Union[np.ndarray, list]  # a tensor, or a sequence of tensors (a Python list)


@dataclass
class CorpusCase:
    """A case that onnxruntime runs: the model to feed it and the original's outputs."""

    name: str
    model: onnx.ModelProto  # the original, re-stamped if onnxruntime needed it
    feeds: dict[str, Value]
    expected: list[Value]  # onnxruntime's outputs for the original model on ``feeds``
    reference: list[Value]  # onnx's reference outputs
    rtol: float
    atol: float
    restamped: str | None = None  # e.g. "ir 14->13, opset ai.onnx 28->26"

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]


@dataclass
class Skip:
    """A case that cannot serve as a test, and why."""

    name: str
    reason: str
    detail: str = ""


@dataclass
class Limits:
    """The newest IR version and ai.onnx opset the installed onnxruntime loads."""

    ir_version: int
    opset: int


# ---------------------------------------------------------------- onnxruntime
def session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def load_onnxruntime(model: onnx.ModelProto):
    """An onnxruntime CPU session for ``model`` with every graph optimization disabled."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, Value], session=None) -> list[Value]:
    """Run ``model`` on onnxruntime's CPU provider, optimizations disabled; outputs in graph order.

    Only the graph inputs the session asks for are fed (onnx test models list initializers as
    inputs at old IR versions). Sequence outputs come back as lists of arrays.
    """
    session = session or load_onnxruntime(model)
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return [[np.asarray(x) for x in v] if isinstance(v, list) else np.asarray(v) for v in outputs]


def copy_feeds(feeds: dict[str, Value]) -> dict[str, Value]:
    """A deep copy of ``feeds``, for a run that must not touch a case's shared inputs.

    onnxruntime can write into a fed array: a training-mode BatchNormalization whose running-mean
    input reaches it through a Cast(float->float16)->Cast(float16->float) pair, which the CPU
    provider removes, updates the caller's array in place.
    """
    return {k: [np.array(x, copy=True) for x in v] if isinstance(v, list) else np.array(v, copy=True) for k, v in feeds.items()}


def run_reference(model: onnx.ModelProto, feeds: dict[str, Value]) -> list[Value]:
    """Run ``model`` with onnx's reference evaluator, which computes each op in its declared type
    (float16 in float16, where onnxruntime's CPU provider often computes in float32); outputs in
    graph order. Raises what the evaluator raises (e.g. for an op it does not implement)."""
    from onnx.reference import ReferenceEvaluator

    wanted = {i.name for i in model.graph.input}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = ReferenceEvaluator(model).run(None, {k: v for k, v in copy_feeds(feeds).items() if k in wanted})
    return [[np.asarray(x) for x in v] if isinstance(v, list) else np.asarray(v) for v in outputs]


@functools.lru_cache(maxsize=None)
def onnxruntime_limits() -> Limits:
    """Probe the newest IR version and ai.onnx opset onnxruntime accepts (tiny Identity models)."""
    import onnxruntime as ort

    options = session_options()

    def loads(ir_version: int, opset: int) -> bool:
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    ir_version = next((v for v in range(onnx.IR_VERSION, 3, -1) if loads(v, 13)), 3)
    opset = next((v for v in range(onnx.defs.onnx_opset_version(), 6, -1) if loads(ir_version, v)), 7)
    return Limits(ir_version, opset)


# ---------------------------------------------------------------- re-stamping
def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    yield from iter_proto_nodes(model.graph)
    for function in model.functions:
        for node in function.node:
            yield node


def restamp(model: onnx.ModelProto, limits: Limits | None = None) -> tuple[onnx.ModelProto, str | None] | None:
    """``model`` stamped with an IR version and opset onnxruntime loads, without changing meaning.

    Returns ``(model, None)`` when nothing needs changing, ``(copy, note)`` when re-stamped, and
    None when an operator's definition at the lower opset differs (it cannot be re-stamped).
    """
    limits = limits or onnxruntime_limits()
    opsets = {o.domain: o.version for o in model.opset_import}
    main = next((d for d in MAIN_DOMAINS if d in opsets), None)
    opset = opsets.get(main, 0) if main is not None else 0
    if model.ir_version <= limits.ir_version and opset <= limits.opset:
        return model, None
    notes = []
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if opset > limits.opset:
        for node in _all_nodes(model):
            if node.domain not in MAIN_DOMAINS:
                continue
            try:
                newest = onnx.defs.get_schema(node.op_type, opset, node.domain)
                older = onnx.defs.get_schema(node.op_type, limits.opset, node.domain)
            except onnx.defs.SchemaError:
                return None  # an unknown op, or one newer than onnxruntime's opset
            if newest.since_version > limits.opset and _signature(newest) != _signature(older):
                return None  # the operator's inputs or attributes changed after that opset
        for imports in [copy.opset_import] + [f.opset_import for f in copy.functions]:
            for entry in imports:
                if entry.domain in MAIN_DOMAINS and entry.version > limits.opset:
                    entry.version = limits.opset
        notes.append(f"opset ai.onnx {opset}->{limits.opset}")
    if copy.ir_version > limits.ir_version:
        notes.insert(0, f"ir {copy.ir_version}->{limits.ir_version}")
        copy.ir_version = limits.ir_version
    return copy, ", ".join(notes)


def _signature(schema: onnx.defs.OpSchema) -> tuple:
    """What a model can write for an op: attribute names, and inputs and outputs by name."""
    return (
        tuple(sorted(schema.attributes)),
        tuple(i.name for i in schema.inputs),
        tuple(o.name for o in schema.outputs),
    )


# ---------------------------------------------------------------- comparing
def is_float(value: Any) -> bool:
    """A float tensor, or a sequence holding one."""
    if isinstance(value, list):
        return any(is_float(v) for v in value)
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def half_precision_tolerance(dtype: np.dtype, rtol: float, atol: float) -> tuple[float, float]:
    """Tolerances no tighter than one unit in the last place of a 16-bit float ``dtype``.

    onnxruntime's CPU provider has no float16 kernel for many ops: it computes them in float32
    between Cast nodes it inserts, and then removes Cast(float->float16)->Cast(float16->float)
    pairs as redundant even with every optimization off, so a float16 value it should round is
    sometimes used unrounded. A spec-exact rewrite (a folded constant stored in float16) then
    differs by one float16 ulp from onnxruntime's run of the original.
    """
    if dtype.itemsize >= 4:
        return rtol, atol
    eps = float(np.finfo(dtype).eps)
    return max(rtol, eps), max(atol, eps)


def compare_outputs(
    expected: Sequence[Value],
    actual: Sequence[Value],
    rtol: float = 1e-5,
    atol: float = 1e-6,
    scale_atol: bool = True,
    half_ulp: bool = True,
) -> str | None:
    """None when every output matches, else a one-line description of the first mismatch.

    Shapes and dtypes must be equal; floats must satisfy ``|a - e| <= atol' + rtol * |e|`` with
    NaN exactly where NaN is and infinities equal; ``atol' = atol * max(1, max |finite e|)`` when
    ``scale_atol``, so outputs of large magnitude are compared relatively. With ``half_ulp``,
    float16 outputs get at least one float16 ulp (see :func:`half_precision_tolerance`).
    Other element types must be equal. Sequences are compared element by element.
    """
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for index, (e, a) in enumerate(zip(expected, actual)):
        problem = _compare_value(e, a, rtol, atol, scale_atol, half_ulp)
        if problem is not None:
            return f"output {index}: {problem}"
    return None


def _compare_value(e: Value, a: Value, rtol: float, atol: float, scale_atol: bool, half_ulp: bool) -> str | None:
    if isinstance(e, list) or isinstance(a, list):
        if not (isinstance(e, list) and isinstance(a, list)):
            return f"{type(a).__name__}, expected {type(e).__name__}"
        if len(e) != len(a):
            return f"sequence of {len(a)}, expected {len(e)}"
        for position, (ei, ai) in enumerate(zip(e, a)):
            problem = _compare_value(ei, ai, rtol, atol, scale_atol, half_ulp)
            if problem is not None:
                return f"sequence item {position}: {problem}"
        return None
    e, a = np.asarray(e), np.asarray(a)
    if e.shape != a.shape:
        return f"shape {a.shape}, expected {e.shape}"
    if e.dtype != a.dtype:
        return f"dtype {a.dtype}, expected {e.dtype}"
    if e.dtype.kind != "f":
        return None if np.array_equal(e, a) else f"{e.dtype} values differ"
    if half_ulp:
        rtol, atol = half_precision_tolerance(e.dtype, rtol, atol)
    e64, a64 = e.astype(np.float64), a.astype(np.float64)
    finite = e64[np.isfinite(e64)]
    tol = atol * max(1.0, float(np.abs(finite).max())) if scale_atol and finite.size else atol
    bad = ~np.isclose(a64, e64, rtol=rtol, atol=tol, equal_nan=True)
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    with np.errstate(invalid="ignore"):
        err = np.abs(a64 - e64)[bad]
    largest = f"{np.nanmax(err):g}" if np.isfinite(err).any() else "nan/inf"
    return (
        f"{int(bad.sum())}/{e.size} values differ (rtol={rtol:g}, atol={tol:g}), first at {where}: "
        f"{float(a64[where])!r} vs {float(e64[where])!r} (largest abs error {largest})"
    )


def _agrees_with_reference(reference: Sequence[Value], actual: Sequence[Value], rtol: float, atol: float) -> str | None:
    """onnx's backend-test comparison: same count, values within the case's tolerances."""
    if len(reference) != len(actual):
        return f"{len(actual)} outputs, the reference has {len(reference)}"
    for index, (r, a) in enumerate(zip(reference, actual)):
        problem = _agrees(r, a, rtol, atol)
        if problem is not None:
            return f"output {index}: {problem}"
    return None


def _agrees(r: Value, a: Value, rtol: float, atol: float) -> str | None:
    if isinstance(r, list) or isinstance(a, list):
        if not (isinstance(r, list) and isinstance(a, list)) or len(r) != len(a):
            return "sequence differs from the reference in kind or length"
        for ri, ai in zip(r, a):
            problem = _agrees(ri, ai, rtol, atol)
            if problem is not None:
                return problem
        return None
    r, a = np.asarray(r), np.asarray(a)
    if r.shape != a.shape:
        return f"shape {a.shape}, reference {r.shape}"
    try:
        if r.dtype.kind in "fc" or a.dtype.kind in "fc":
            np.testing.assert_allclose(a.astype(np.float64), r.astype(np.float64), rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(a, r)
    except (AssertionError, TypeError, ValueError) as exc:
        text = str(exc).strip()
        return " ".join(text.split("\n")[:4]) if text else type(exc).__name__
    return None


# ---------------------------------------------------------------- structure
def graph_signature(model: onnx.ModelProto) -> str:
    """A digest of what a model computes, ignoring value_info, shapes, names of the graph and
    node order: the multiset of nodes (op, inputs, outputs, attributes), initializers by
    content, and graph inputs and outputs by name. Two protos with equal signatures differ only
    in bookkeeping."""

    def graph_items(graph: onnx.GraphProto) -> list[str]:
        items = [f"in:{i.name}" for i in graph.input] + [f"out:{o.name}" for o in graph.output]
        for init in graph.initializer:
            items.append(f"init:{init.name}:{_tensor_digest(init)}")
        for node in graph.node:
            attrs = []
            for attr in sorted(node.attribute, key=lambda a: a.name):
                if attr.type == onnx.AttributeProto.GRAPH:
                    attrs.append(f"{attr.name}=graph({';'.join(sorted(graph_items(attr.g)))})")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    subs = ["(" + ";".join(sorted(graph_items(g))) + ")" for g in attr.graphs]
                    attrs.append(f"{attr.name}=graphs{''.join(subs)}")
                elif attr.type == onnx.AttributeProto.TENSOR:
                    attrs.append(f"{attr.name}=tensor:{_tensor_digest(attr.t)}")
                else:
                    value = helper.get_attribute_value(attr)
                    attrs.append(f"{attr.name}={value!r}{attr.ref_attr_name}")
            items.append(
                f"node:{node.domain}.{node.op_type}({','.join(node.input)})->({','.join(node.output)})"
                f"{{{','.join(attrs)}}}"
            )
        return items

    text = "\n".join(sorted(graph_items(model.graph)))
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_digest(tensor: onnx.TensorProto) -> str:
    from onnx import numpy_helper

    try:
        array = numpy_helper.to_array(tensor)
        payload = f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes()
    except Exception:  # a type numpy cannot hold: the proto's bytes are good enough
        payload = tensor.SerializeToString()
    return hashlib.sha256(payload).hexdigest()[:16]


def count_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for _ in iter_proto_nodes(model.graph))


# ---------------------------------------------------------------- the corpus
def collect() -> list:
    """onnx's node test cases (quietly: some generators warn about overflowing casts)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect_testcases(None)


def _as_value(value: Any) -> Value | None:
    """A value onnxruntime's Python API can take: a numpy array of a numpy dtype, or a list of
    them (a sequence). None for optionals and for ml_dtypes types (bfloat16, float8, int4, ...)."""
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        return value if _numpy_native(value.dtype) else None
    if isinstance(value, list):
        items = [_as_value(v) for v in value]
        return items if all(isinstance(v, np.ndarray) for v in items) else None
    return None


def _numpy_native(dtype: np.dtype) -> bool:
    return dtype.kind in "biufcUSO" and dtype.type.__module__ == "numpy"  # not ml_dtypes


def _describe(value: Any) -> str:
    if isinstance(value, onnx.TensorProto):
        return f"TensorProto({onnx.helper.tensor_dtype_to_string(value.data_type)})"
    if isinstance(value, np.ndarray):
        return f"ndarray({value.dtype.name})"
    return type(value).__name__


def classify(testcase, require_float_outputs: bool = True, limits: Limits | None = None) -> CorpusCase | Skip:
    """Decide whether one onnx test case can serve as a test on onnxruntime, and prepare it."""
    name = testcase.name
    if len(testcase.data_sets) != 1:  # every node case has one; be explicit if that changes
        return Skip(name, UNSUPPORTED_VALUES, f"{len(testcase.data_sets)} data sets")
    raw_inputs, raw_outputs = testcase.data_sets[0]
    inputs = [_as_value(v) for v in raw_inputs]
    reference = [_as_value(v) for v in raw_outputs]
    if any(v is None for v in inputs + reference):
        kinds = sorted({_describe(v) for v in list(raw_inputs) + list(raw_outputs) if _as_value(v) is None})
        return Skip(name, UNSUPPORTED_VALUES, ", ".join(kinds))
    if require_float_outputs and not any(is_float(r) for r in reference):
        return Skip(name, NO_FLOAT_OUTPUTS, ", ".join(sorted({_describe(r) for r in reference})))

    model = testcase.model
    restamped = restamp(model, limits)
    note = None
    if restamped is not None:
        model, note = restamped
    try:
        session = load_onnxruntime(model)
    except Exception as exc:
        return Skip(name, CANNOT_LOAD, _first_line(exc))
    graph_inputs = [i.name for i in model.graph.input]
    if len(graph_inputs) != len(inputs):
        return Skip(name, UNSUPPORTED_VALUES, f"{len(inputs)} input values for {len(graph_inputs)} graph inputs")
    feeds = dict(zip(graph_inputs, inputs))
    try:
        expected = run_onnxruntime(model, feeds, session)
    except Exception as exc:
        return Skip(name, CANNOT_RUN, _first_line(exc))
    mismatch = _agrees_with_reference(reference, expected, testcase.rtol, testcase.atol)
    if mismatch is not None:
        return Skip(name, DISAGREES, mismatch)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return Skip(name, CHECKER_REJECTS, _first_line(exc))
    return CorpusCase(name, model, feeds, expected, reference, testcase.rtol, testcase.atol, note)


def iter_cases(
    require_float_outputs: bool = True, names: Sequence[str] | None = None
) -> Iterator[CorpusCase | Skip]:
    """Every node test case of the installed onnx, classified (see :func:`classify`)."""
    wanted = set(names) if names is not None else None
    limits = onnxruntime_limits()
    for testcase in collect():
        if wanted is not None and testcase.name not in wanted:
            continue
        yield classify(testcase, require_float_outputs, limits)


def runnable_cases(require_float_outputs: bool = True) -> Iterator[CorpusCase]:
    """Only the cases onnxruntime runs (see :func:`iter_cases`)."""
    for item in iter_cases(require_float_outputs):
        if isinstance(item, CorpusCase):
            yield item


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}"


# ---------------------------------------------------------------- optimizing a case
@dataclass
class Outcome:
    """What happened to one runnable case under a pipeline."""

    name: str
    passed: bool
    changed: bool = False
    error: str | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    restamped: str | None = None
    changed_by: list[str] = field(default_factory=list)  # passes that reported a change
    needed_half_ulp: bool = False  # passed only thanks to the one-ulp float16 tolerance


def optimize_and_compare(
    case: CorpusCase,
    policy: Any = "fp32",
    rtol: float = 1e-5,
    atol: float = 1e-6,
    half_ulp: bool = True,
    **optimize_options: Any,
) -> Outcome:
    """Optimize ``case.model`` with onnxmp, run the result, compare with the original's outputs.

    Any exception from onnxmp, from exporting its model, or from onnxruntime on the optimized
    model is a failure; so is an output that differs beyond ``rtol``/``atol`` (see
    :func:`compare_outputs`) or an output name that changed. ``optimize_options`` go to
    :func:`onnxmp.api.optimize_model` (``verify_each=True``, ``passes=...``).
    """
    from onnxmp.api import optimize_model

    outcome = Outcome(case.name, passed=False, nodes_before=count_nodes(case.model), restamped=case.restamped)
    original = onnx.ModelProto()
    original.CopyFrom(case.model)
    stage = "optimize_model"
    try:
        result = optimize_model(original, policy, **optimize_options)
        outcome.changed_by = [record["name"] for record in result.report.get("passes", []) if record.get("changed")]
        stage = "to_proto"
        optimized = result.model.to_proto()
        outcome.nodes_after = count_nodes(optimized)
        outcome.changed = outcome.nodes_after != outcome.nodes_before or graph_signature(optimized) != graph_signature(
            case.model
        )
        names = [o.name for o in optimized.graph.output]
        if names != case.output_names:
            outcome.error = f"output names changed: {case.output_names} -> {names}"
            return outcome
        stage = "onnxruntime on the optimized model"
        actual = run_onnxruntime(optimized, case.feeds)
    except Exception as exc:  # every exception is a failure of the pipeline under test
        outcome.error = f"{stage}: {type(exc).__name__}: {str(exc).strip()[:600]}"
        return outcome
    mismatch = compare_outputs(case.expected, actual, rtol=rtol, atol=atol, half_ulp=half_ulp)
    if mismatch is not None:
        outcome.error = f"outputs differ from the original's: {mismatch}"
        return outcome
    outcome.passed = True
    if half_ulp:
        strict = compare_outputs(case.expected, actual, rtol=rtol, atol=atol, half_ulp=False)
        outcome.needed_half_ulp = strict is not None
    return outcome
