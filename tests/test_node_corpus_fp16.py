"""The fp16 preset on onnx's node-test corpus: each case is lowered within an FP16 tolerance, or
kept float32 by a rule that the report names; never an invalid model or a crash.

Cases are those of the FP32 corpus test (``node_corpus.iter_cases``: onnxruntime runs the
original on its CPU provider and at least one output is a float). Each is optimized with
``optimize_model(model, POLICY, verify_each=True)``, where POLICY is the ``fp16`` preset (target
cuda, keep_io_types) without its ``validation`` section: that section would validate on random
data inside optimize_model, and this test does its own, stricter comparison on the case's data.
Every case ends in one of:

- LOWERED: some node's decision is ``lowered`` (the model really computes in float16), the
  result passes onnx.checker's full check, loads and runs in onnxruntime with the original's
  output names, dtypes and shapes, and its outputs are within the FP16 tolerance below of the
  original's FP32 outputs, on onnxruntime AND on onnx's reference evaluator;
- KEPT: no node lowered; every convertible node's decision names the rule that kept it
  (keep-op-type, schema, no-kernel, range rules, long-reduction, subgraph, placement). The model
  must still be valid and match the original at the FP32 corpus test's tolerance. Cases with no
  float32 node at all (float64 or float16 models, cases folded to constants) count here too,
  as "no float32 node";
- FAILURE: an exception, a checker or load or run failure, a changed output name, dtype or
  shape, an output outside the tolerance. The test asserts there is none.

The FP16 tolerance, per float output element::

    |actual - expected| <= RTOL * |expected| + ATOL_SCALE * max|expected| + ATOL_FLOOR

float16 keeps 11 significant bits (unit roundoff u = 2**-11, about 4.9e-4). With keep_io_types
every float32 input is rounded to float16 on the way in (up to u), each lowered op rounds its
result (u), and the corpus's models are one op or an expanded function of a few; reductions are
lowered up to ``max_reduction_elements`` (4096) elements, whose rounding error grows about like
sqrt(n) u. RTOL = 1e-2 (about 20 u) covers that compounding and no more: one wrong ulp in the
exponent, a value rounded through the wrong type or a lost term is far outside it.
Relative error alone is unfair near zero: an output element that is the difference of values
of the output's magnitude M (Sub, Gemm or Conv with mixed signs, a normalization's centring)
carries an absolute error of a few float16 ulps of M, and one computed through intermediates
larger than the output (gates and activations squash their pre-activations; a recurrence
re-rounds its state each step) a few more, hence ATOL_SCALE = 3e-3: three float16 ulps
(2**-10, about 9.8e-4 relative) of the output's largest finite magnitude. One ulp (1e-3) was
the first choice; GRU cases (test_gru_bidirectional: inputs up to 6, weights up to 2, output
below 0.2, three recurrent steps) came out at 2.2 times it on the reference evaluator, whose
float16 arithmetic rounds every partial sum, with input rounding alone already at 0.7 times it
in test_gru_seq_length: float16 storage, not a lowering error and not a numerically sensitive
op (GRU is one of the compute-bound ops float16 exists for). ATOL_FLOOR = 1e-6 keeps all-zero
outputs from demanding exact zeros; it is small next to float16's smallest normal (6.1e-5), so
values above it that float16 loses to zero (a kernel that flushes subnormals, or values below
2**-25) fail, which only a range rule (with calibration data) may excuse. NaN must be NaN where
the original has NaN, infinities equal, and an overflow to inf where the original is finite
fails. Integer and bool outputs must be equal.

onnxruntime's CPU provider has few float16 kernels: it runs most float16 nodes in float32
between casts of its own and then removes Cast(float->float16)->Cast(float16->float) pairs, so
a float16 model can look more accurate on it than on a GPU. That is why each LOWERED candidate
also runs on onnx's reference evaluator, which computes float16 ops in float16, with the same
tolerance. Where the evaluator cannot run the candidate (an op it lacks), or already disagrees
with onnxruntime on the original FP32 model, the case counts as "reference n/a". Where the
evaluator returns a dtype other than the one the candidate declares for an output
(LayerNormalization's Mean and InvStdDev are float32 by stash_type, the evaluator returns the
input's type), the value is compared in the declared type; onnxruntime checks the dtype itself.

Set ONNXMP_FP16_CORPUS_REPORT=path to write the summary as JSON. ``test_forced_lowering_*`` run
cases with placement forced to the low type (every convertible node not kept by another rule is
lowered, as inside a large float16 region of a real model), which exercises the retyping of
every op that the preset's placement would keep float32 when it stands alone;
``benchmarks/fp16_corpus.py --force-lower`` runs the whole corpus that way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence
from unittest import mock

import numpy as np
import onnx
import onnxruntime
import pytest

import node_corpus
from node_corpus import CorpusCase, Skip, Value

REPORT_ENV = "ONNXMP_FP16_CORPUS_REPORT"
PRESET = "fp16"
RTOL, ATOL_SCALE, ATOL_FLOOR = 1e-2, 3e-3, 1e-6
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6  # KEPT models: the FP32 corpus test's tolerance
MIN_RUN_FRACTION = 0.4  # fewer runnable cases than this means the harness, not onnxmp, broke
MIN_LOWERED = 200  # far fewer lowered cases means the precision pass stopped lowering

LOWERED, KEPT, FAILURE = "lowered", "kept", "failure"
NO_FLOAT32 = "no float32 node"
# A KEPT case is counted under the first rule of this list that kept one of its nodes: the
# others (placement above all) are usually consequences of it.
RULE_ORDER = (
    "subgraph", "schema", "keep-op-type", "keep-node-pattern", "no-kernel", "initializer-range",
    "range-overflow", "range-underflow", "long-reduction", "placement",
)  # fmt: skip
DECISION_KEYS = {"node", "op", "precision", "rule"}


def fp16_policy() -> dict:
    """The fp16 preset as a policy dict, without its validation section (see the module doc)."""
    from onnxmp.policy import load_policy

    data = json.loads(json.dumps(load_policy(PRESET).data))
    data.pop("validation", None)
    return data


@contextlib.contextmanager
def forced_lowering() -> Iterator[None]:
    """Placement always picks the low type: every convertible node that no other rule keeps is
    lowered, as it would be inside a large float16 region of a real model."""
    import onnxmp.passes.precision as precision_pass

    with mock.patch.object(precision_pass, "TRAFFIC_GAIN", 1e12):
        yield


# ---------------------------------------------------------------- tolerance
def fp16_mismatch(expected: Sequence[Value], actual: Sequence[Value]) -> tuple[str | None, float]:
    """(None, worst) when every output is within the FP16 tolerance, else (what differs, worst);
    ``worst`` is the largest ``|actual - expected| / tolerance`` over float elements (<= 1 passes)."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}", float("inf")
    worst = 0.0
    for index, (e, a) in enumerate(zip(expected, actual)):
        problem, ratio = _fp16_value(e, a)
        worst = max(worst, ratio)
        if problem is not None:
            return f"output {index}: {problem}", worst
    return None, worst


def _fp16_value(e: Value, a: Value) -> tuple[str | None, float]:
    if isinstance(e, list) or isinstance(a, list):
        if not (isinstance(e, list) and isinstance(a, list)) or len(e) != len(a):
            return "sequence differs in kind or length", float("inf")
        worst = 0.0
        for position, (ei, ai) in enumerate(zip(e, a)):
            problem, ratio = _fp16_value(ei, ai)
            worst = max(worst, ratio)
            if problem is not None:
                return f"sequence item {position}: {problem}", worst
        return None, worst
    e, a = np.asarray(e), np.asarray(a)
    if e.shape != a.shape:
        return f"shape {a.shape}, expected {e.shape}", float("inf")
    if e.dtype != a.dtype:
        return f"dtype {a.dtype}, expected {e.dtype}", float("inf")
    if e.dtype.kind != "f":
        return (None, 0.0) if np.array_equal(e, a) else (f"{e.dtype} values differ", float("inf"))
    e64, a64 = e.astype(np.float64), a.astype(np.float64)
    nan_e, nan_a = np.isnan(e64), np.isnan(a64)
    if not np.array_equal(nan_e, nan_a):
        return f"NaN at {int((nan_e != nan_a).sum())} positions where the original has none, or the reverse", float("inf")
    inf_e = np.isinf(e64)
    if not np.array_equal(e64[inf_e], a64[inf_e]):
        return "an infinity of the original differs", float("inf")
    finite = np.isfinite(e64)
    if not np.isfinite(a64[finite]).all():
        return f"{int((~np.isfinite(a64[finite])).sum())} values overflow to inf/NaN where the original is finite", float("inf")
    if not finite.any():
        return None, 0.0
    ef, af = e64[finite], a64[finite]
    tol = RTOL * np.abs(ef) + ATOL_SCALE * float(np.abs(ef).max()) + ATOL_FLOOR
    ratios = np.abs(af - ef) / tol
    worst = float(ratios.max())
    if worst <= 1.0:
        return None, worst
    at = int(np.argmax(ratios))
    return (
        f"{int((ratios > 1).sum())}/{e.size} values outside the FP16 tolerance; worst {af[at]!r} vs {ef[at]!r} "
        f"(error {abs(af[at] - ef[at]):.3g}, tolerance {tol[at]:.3g})"
    ), worst


def _in_declared_types(values: list[Value], model: onnx.ModelProto, expected: Sequence[Value]) -> list[Value]:
    """Reference-evaluator outputs cast to the candidate's declared output type where that type is
    the expected one and the evaluator returned another (its LayerNormalization ignores stash_type)."""
    fixed = []
    for value, info, want in zip(values, model.graph.output, expected):
        declared = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        if isinstance(value, np.ndarray) and isinstance(want, np.ndarray) and value.dtype != want.dtype and declared:
            if onnx.helper.tensor_dtype_to_np_dtype(declared) == want.dtype:
                value = value.astype(want.dtype)
        fixed.append(value)
    return fixed + list(values[len(fixed):])


# ---------------------------------------------------------------- one case
@dataclass
class Fp16Outcome:
    """What the fp16 preset did to one runnable case."""

    name: str
    status: str  # LOWERED, KEPT or FAILURE
    kept_by: str = ""  # KEPT: the rule category it is counted under (RULE_ORDER, or NO_FLOAT32)
    rules: dict[str, int] = field(default_factory=dict)  # rule category -> number of nodes
    error: str | None = None
    reference: str = ""  # LOWERED: "agrees" or "n/a: why"
    worst_ratio: float = 0.0  # LOWERED: largest error / tolerance on onnxruntime
    worst_ratio_reference: float | None = None  # the same on the reference evaluator


def rule_category(rule: str) -> str:
    return rule.split(":", 1)[0].strip()


def precision_decisions(decisions: list[dict]) -> list[dict]:
    """The precision pass's decisions; those with a "pass" are fusions' notes (fused or why not)."""
    return [d for d in decisions if d.get("pass") is None]


def _has_float16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    f16 = onnx.TensorProto.FLOAT16
    if any(i.data_type == f16 for i in graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type == f16 for v in [*graph.input, *graph.value_info, *graph.output]):
        return True
    return any(a.name == "to" and a.i == f16 for n in graph.node if n.op_type == "Cast" for a in n.attribute)


def evaluate_case(case: CorpusCase, policy: Any = None, reference: bool = True, **options: Any) -> Fp16Outcome:
    """Optimize ``case.model`` with the fp16 policy and classify the result (see the module doc)."""
    from onnxmp.api import optimize_model

    outcome = Fp16Outcome(case.name, FAILURE)
    original = onnx.ModelProto()
    original.CopyFrom(case.model)
    stage = "optimize_model"
    try:
        result = optimize_model(original, policy if policy is not None else fp16_policy(), verify_each=True, **options)
        decisions = result.report["decisions"]
        stage = "to_proto"
        candidate = result.model.to_proto()
        stage = "onnx.checker"
        onnx.checker.check_model(candidate, full_check=True)
        stage = "onnxruntime load"
        session = node_corpus.load_onnxruntime(candidate)
        stage = "onnxruntime run"
        actual = node_corpus.run_onnxruntime(candidate, node_corpus.copy_feeds(case.feeds), session)
    except Exception as exc:  # every exception is a failure of the pipeline under test
        outcome.error = f"{stage}: {type(exc).__name__}: {str(exc).strip()[:600]}"
        return outcome
    names = [o.name for o in candidate.graph.output]
    if names != case.output_names:
        outcome.error = f"output names changed: {case.output_names} -> {names}"
        return outcome
    decisions = precision_decisions(decisions)
    for decision in decisions:
        if not DECISION_KEYS <= set(decision) or not decision["rule"] or decision["precision"] not in ("float16", "float32"):
            outcome.error = f"a decision without a node, op, precision and rule: {decision}"
            return outcome
        if (decision["precision"] == "float16") != (decision["rule"] == "lowered"):
            outcome.error = f"a decision whose precision and rule disagree: {decision}"
            return outcome
    outcome.rules = dict(Counter(rule_category(d["rule"]) for d in decisions))
    if not outcome.rules.get("lowered"):
        problem = node_corpus.compare_outputs(case.expected, actual, rtol=FP32_RTOL, atol=FP32_ATOL)
        if problem is not None:
            outcome.error = f"kept float32, yet outputs differ from the original's: {problem}"
            return outcome
        kept = [r for r in RULE_ORDER if r in outcome.rules]
        unknown = sorted(set(outcome.rules) - set(RULE_ORDER))
        if unknown:
            outcome.error = f"decisions with unknown rules {unknown}"
            return outcome
        outcome.status, outcome.kept_by = KEPT, (kept[0] if kept else NO_FLOAT32)
        return outcome
    if not _has_float16(candidate):
        outcome.error = "a decision says 'lowered' but the model has no float16 tensor"
        return outcome
    problem, outcome.worst_ratio = fp16_mismatch(case.expected, actual)
    if problem is not None:
        outcome.error = f"lowered, onnxruntime: {problem}"
        return outcome
    if reference:
        outcome.reference, problem = _reference_check(case, candidate, outcome)
        if problem is not None:
            outcome.error = f"lowered, reference evaluator (float16 arithmetic): {problem}"
            return outcome
    outcome.status = LOWERED
    return outcome


def _reference_check(case: CorpusCase, candidate: onnx.ModelProto, outcome: Fp16Outcome) -> tuple[str, str | None]:
    """("agrees", None), ("n/a: why", None), or (_, the mismatch)."""
    try:
        values = node_corpus.run_reference(candidate, case.feeds)
    except Exception as exc:  # an op the evaluator does not implement, for one
        return f"n/a: the evaluator cannot run the candidate ({node_corpus._first_line(exc)[:160]})", None
    problem, outcome.worst_ratio_reference = fp16_mismatch(case.expected, _in_declared_types(values, candidate, case.expected))
    if problem is None:
        return "agrees", None
    try:  # does the evaluator agree with onnxruntime on the original at all?
        baseline = node_corpus.run_reference(case.model, case.feeds)
        off = node_corpus.compare_outputs(case.expected, baseline, rtol=FP32_RTOL, atol=FP32_ATOL)
    except Exception as exc:
        off = node_corpus._first_line(exc)
    if off is not None:
        outcome.worst_ratio_reference = None
        return f"n/a: the evaluator disagrees with onnxruntime on the original ({off[:160]})", None
    return "differs", problem


# ---------------------------------------------------------------- the corpus
@functools.lru_cache(maxsize=1)
def corpus() -> tuple[list[CorpusCase], list[Skip]]:
    """The runnable cases and the skipped ones, classified once per session."""
    cases, skips = [], []
    for item in node_corpus.iter_cases(require_float_outputs=True):
        (cases if isinstance(item, CorpusCase) else skips).append(item)
    return cases, skips


def run_corpus(force: bool = False, reference: bool = True) -> dict:
    """Every runnable case through the fp16 policy; the summary as a JSON-ready dict."""
    start = time.perf_counter()
    cases, skips = corpus()
    policy = fp16_policy()
    with forced_lowering() if force else contextlib.nullcontext():
        outcomes = [evaluate_case(case, policy, reference=reference) for case in cases]
    return summarize(outcomes, skips, force, time.perf_counter() - start)


def summarize(outcomes: list[Fp16Outcome], skips: list[Skip], force: bool, seconds: float) -> dict:
    lowered = [o for o in outcomes if o.status == LOWERED]
    kept = [o for o in outcomes if o.status == KEPT]
    failed = [o for o in outcomes if o.status == FAILURE]
    skipped: dict[str, list[str]] = defaultdict(list)
    for skip in skips:
        skipped[skip.reason].append(skip.name)
    reference = Counter("agrees" if o.reference == "agrees" else "n/a" for o in lowered)
    nodes_kept_by = Counter()
    for o in outcomes:
        for rule, count in o.rules.items():
            if rule != "lowered":
                nodes_kept_by[rule] += count
    ratios = sorted((o.worst_ratio, o.name) for o in lowered)
    reference_ratios = sorted((o.worst_ratio_reference, o.name) for o in lowered if o.worst_ratio_reference is not None)
    return {
        "policy": f"{PRESET} preset without validation" + (", placement forced to float16" if force else ""),
        "verify_each": True,
        "tolerance": {"rtol": RTOL, "atol_scale_of_max_abs": ATOL_SCALE, "atol_floor": ATOL_FLOOR},
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "total": len(outcomes) + len(skips),
        "ran": len(outcomes),
        "lowered_within_tolerance": len(lowered),
        "lowered_reference_agrees": reference["agrees"],
        "lowered_reference_na": reference["n/a"],
        "kept_by_rule": len(kept),
        "kept_by": dict(Counter(o.kept_by for o in kept).most_common()),
        "cases_with_a_node_kept_by": dict(
            Counter(r for o in outcomes if o.status != FAILURE for r in o.rules if r != "lowered").most_common()
        ),
        "nodes_kept_by": dict(nodes_kept_by.most_common()),
        "failures": len(failed),
        "skipped": {reason: len(names) for reason, names in sorted(skipped.items(), key=lambda kv: -len(kv[1]))},
        "worst_error_ratio_lowered": [{"name": n, "ratio": round(r, 3)} for r, n in ratios[-5:][::-1]],
        "worst_error_ratio_lowered_reference": [{"name": n, "ratio": round(r, 3)} for r, n in reference_ratios[-5:][::-1]],
        "failure_cases": [{"name": o.name, "error": o.error} for o in failed],
        "reference_na_cases": {o.name: o.reference for o in lowered if o.reference != "agrees"},
        "outcomes": {o.name: asdict(o) for o in outcomes},
        "seconds": round(seconds, 1),
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"onnx node-test corpus, {summary['policy']} (verify_each), onnx {summary['versions']['onnx']}, "
        f"onnxruntime {summary['versions']['onnxruntime']}: {summary['seconds']} s",
        f"  total cases                      {summary['total']}",
        f"  ran                              {summary['ran']}",
        f"  lowered, within FP16 tolerance   {summary['lowered_within_tolerance']}  "
        f"(reference evaluator in float16: {summary['lowered_reference_agrees']} agree, "
        f"{summary['lowered_reference_na']} n/a)",
        f"  kept float32 by a named rule     {summary['kept_by_rule']}",
    ]
    lines += [f"    {count:5d}  {rule}" for rule, count in summary["kept_by"].items()]
    lines += [
        f"  failures                         {summary['failures']}",
        f"  cases with a node kept by        {summary['cases_with_a_node_kept_by']}",
        "  worst error/tolerance, lowered, onnxruntime: "
        + ", ".join(f"{w['name']} {w['ratio']}" for w in summary["worst_error_ratio_lowered"]),
        "  worst error/tolerance, lowered, reference:   "
        + ", ".join(f"{w['name']} {w['ratio']}" for w in summary["worst_error_ratio_lowered_reference"]),
        "  skipped:",
    ]
    lines += [f"    {count:5d}  {reason}" for reason, count in summary["skipped"].items()]
    return "\n".join(lines)


def failure_message(summary: dict) -> str:
    lines = [f"{summary['failures']} of {summary['ran']} corpus cases failed under the fp16 preset:"]
    lines += [f"  {f['name']}: {f['error']}" for f in summary["failure_cases"]]
    return "\n".join(lines)


def _write_report(summary: dict) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")


# ---------------------------------------------------------------- tests
def test_fp16_preset_on_node_corpus(capsys):
    summary = run_corpus()
    with capsys.disabled():
        print("\n" + format_summary(summary))
    _write_report(summary)
    assert summary["ran"] >= MIN_RUN_FRACTION * summary["total"], (
        f"only {summary['ran']} of {summary['total']} cases ran; skipped: {summary['skipped']}"
    )
    assert summary["failures"] == 0, failure_message(summary)
    assert summary["lowered_within_tolerance"] >= MIN_LOWERED, "the precision pass lowers far fewer cases than it did"
    assert summary["lowered_reference_agrees"] >= 0.9 * summary["lowered_within_tolerance"], summary["reference_na_cases"]


def test_fp16_keep_list_of_the_preset_is_the_default():
    from onnxmp.passes.precision import DEFAULT_KEEP

    precision = next(p for p in fp16_policy()["passes"] if p["name"] == "precision")
    assert precision["options"]["keep_op_types"] == DEFAULT_KEEP["fp16"]


def _case(name: str) -> CorpusCase:
    cases, skips = corpus()
    found = [c for c in cases if c.name == name]
    if not found:
        reasons = [s.reason for s in skips if s.name == name]
        pytest.skip(f"{name} is not runnable here: {reasons[0] if reasons else 'not in the installed onnx'}")
    return found[0]


# (case, target, expected outcome, a rule the report must name for its main node)
FORCED_CASES = [
    # sequences and optionals: their element type is tied to tensors of other type variables
    ("test_identity_sequence", "cuda", KEPT, "schema: it reads or writes sequences or optionals"),
    ("test_split_to_sequence_1", "cuda", KEPT, "schema: it reads or writes sequences or optionals"),
    ("test_optional_get_element_optional_tensor", "cuda", KEPT, "schema: it reads or writes sequences or optionals"),
    # an attribute fixes the output type; BitCast reinterprets bits
    ("test_bitcast_int32_to_float32", "cuda", KEPT, "schema: BitCast reinterprets the bits of its input"),
    ("test_blackmanwindow", "cuda", KEPT, "schema: its attribute 'output_datatype' fixes its output type to float32"),
    ("test_melweightmatrix", "cuda", KEPT, "schema: its attribute 'output_datatype' fixes its output type to float32"),
    # CastLike to another type must not round to float16 first
    ("test_castlike_FLOAT_to_DOUBLE", "cuda", KEPT, "schema: casts a float32 value to another type"),
    ("test_castlike_DOUBLE_to_FLOAT", "cuda", LOWERED, "lowered"),
    # onnxruntime's CPU ScatterElements/ScatterND have no float16 path with a reduction
    ("test_scatter_elements_with_duplicate_indices", "cpu", KEPT, "no-kernel"),
    ("test_scatternd_add", "cpu", KEPT, "no-kernel"),
    ("test_scatternd", "cuda", LOWERED, "lowered"),
    # onnxruntime writes the running mean into the fed array of this lowered model (copy_feeds)
    ("test_batchnorm_example_training_mode", "cuda", LOWERED, "lowered"),
    ("test_layer_normalization_2d_axis0", "cuda", LOWERED, "lowered"),
    ("test_dequantizelinear", "cuda", LOWERED, "lowered"),
]


@pytest.mark.parametrize("name, target, status, rule", FORCED_CASES, ids=[c[0] for c in FORCED_CASES])
def test_forced_lowering_cases(name, target, status, rule):
    case = _case(name)
    with forced_lowering():
        outcome = evaluate_case(case, target=target)
    assert outcome.status != FAILURE, outcome.error
    assert outcome.status == status, outcome
    from onnxmp.api import optimize_model

    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    with forced_lowering():
        decisions = optimize_model(model, fp16_policy(), target=target).report["decisions"]
    assert any(d["rule"].startswith(rule) for d in decisions), decisions


def test_float16_model_keeps_its_float16_outputs():
    """A float16 model has nothing to lower; its float16 outputs must not become float32."""
    outcome = evaluate_case(_case("test_celu_float16_expanded"))
    assert outcome.status == KEPT, outcome.error


@pytest.mark.parametrize(
    "expected, actual, ok",
    [
        ([[100.0, 0.0]], [[101.29, 0.0]], True),  # 1e-2 relative + 3e-3 of the largest magnitude
        ([[100.0, 0.0]], [[101.31, 0.0]], False),
        ([[100.0, 0.0]], [[100.0, 0.29]], True),  # 3e-3 of the largest magnitude
        ([[100.0, 0.0]], [[100.0, 0.31]], False),
        ([[0.0, 0.0]], [[0.0, 5e-7]], True),  # the floor
        ([[1e-4, 1e-4]], [[0.0, 0.0]], False),  # float16 flushing a small output to zero
        ([[1.0, float("nan")]], [[1.0, float("nan")]], True),
        ([[1.0, float("nan")]], [[1.0, 1.0]], False),
        ([[1.0, 7e4]], [[1.0, float("inf")]], False),  # float16 overflow
        ([[float("inf")]], [[float("inf")]], True),
    ],
)
def test_fp16_tolerance(expected, actual, ok):
    e = [np.array(v, dtype=np.float32) for v in expected]
    a = [np.array(v, dtype=np.float32) for v in actual]
    assert (fp16_mismatch(e, a)[0] is None) is ok
