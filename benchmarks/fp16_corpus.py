#!/usr/bin/env python3
"""FP16 conversion of onnx's node-test corpus: onnxmp's fp16 preset against onnxconverter-common.

Usage::

    python benchmarks/fp16_corpus.py                         # both tools, every runnable case
    python benchmarks/fp16_corpus.py --json fp16_corpus.json # also write the summary as JSON
    python benchmarks/fp16_corpus.py --tools onnxmp --limit 200
    python benchmarks/fp16_corpus.py --force-lower           # onnxmp with placement forced

Cases are those of ``tests/test_node_corpus.py`` (``node_corpus.iter_cases``: onnxruntime runs
the original FP32 model on its CPU provider and at least one output is a float). Each tool
converts a copy of the case's model:

- ``onnxconverter-common``: ``float16.convert_float_to_float16(model, keep_io_types=True)``
  (its default op block list, min_positive_val and max_finite_val);
- ``onnxmp``: ``onnxmp.api.optimize_model(model, policy)`` with the ``fp16`` preset (target
  cuda, keep_io_types) minus its ``validation`` section, whose gates would run on random data;
  this script compares on the case's data instead. ``--force-lower`` patches the pass's placement
  so that every convertible node that no rule keeps is lowered (a stress test of the retyping,
  not a policy anyone ships).

Then both are judged alike. A result is ``right`` when onnxruntime (CPU provider, graph
optimizations off) loads it, runs it on the case's inputs, and every output keeps its name,
dtype and shape and lies within the FP16 tolerance of ``tests/test_node_corpus_fp16.py``
(|a - e| <= 1e-2 |e| + 3e-3 max|e| + 1e-6, NaN/inf where the original has them, integers
equal) of the original's FP32 outputs. Otherwise, the first that applies: ``crashed`` (the
converter raised), ``refused to load``, ``failed at run time``, ``off tolerance`` (including a
changed output name, dtype or shape, counted apart too). Also counted, outside those categories: ``checker
rejects`` (onnx.checker's full check fails; onnxruntime may still run the model), and for
``right`` results that hold float16 tensors, onnx's reference evaluator (which computes float16
ops in float16, where onnxruntime's CPU provider mostly computes them in float32): ``agrees``,
``differs`` (outside the same tolerance) or ``n/a`` (it cannot run the model, or already
disagrees with onnxruntime on the original). For onnxmp, a ``right`` result is either
``lowered`` (some node runs in float16) or ``kept by rule`` (every node stayed float32, each
with the rule the report names); for onnxconverter-common ``has float16`` says whether anything
was converted at all.

Seconds are the converters' own time (the conversion call), summed over cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import onnx  # noqa: E402

import node_corpus  # noqa: E402
import test_node_corpus_fp16 as fp16  # noqa: E402

TOOLS = ("onnxconverter-common", "onnxmp")
CATEGORIES = ("right", "refused to load", "failed at run time", "crashed", "off tolerance")


# ---------------------------------------------------------------- converters
def onnxconverter_common_converter() -> Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict]]:
    from onnxconverter_common import float16

    def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float16.convert_float_to_float16(model, keep_io_types=True), {}

    return convert


def onnxmp_converter(force: bool) -> Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict]]:
    from onnxmp.api import optimize_model

    policy = fp16.fp16_policy()

    def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
        with fp16.forced_lowering() if force else contextlib.nullcontext():
            result = optimize_model(model, policy)
        rules = Counter(fp16.rule_category(d["rule"]) for d in fp16.precision_decisions(result.report["decisions"]))
        return result.model.to_proto(), {"rules": dict(rules)}

    return convert


# ---------------------------------------------------------------- judging one result
def judge(case: node_corpus.CorpusCase, convert: Callable) -> dict[str, Any]:
    """What became of one case under one converter (see the module doc)."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    row: dict[str, Any] = {"name": case.name}
    start = time.perf_counter()
    try:
        candidate, extra = convert(model)
    except Exception as exc:  # the converter's own failure
        row.update(category="crashed", detail=node_corpus._first_line(exc), seconds=time.perf_counter() - start)
        return row
    row["seconds"] = time.perf_counter() - start
    row.update(extra)
    row["has_float16"] = fp16._has_float16(candidate)
    row["introduced_float16"] = row["has_float16"] and not fp16._has_float16(case.model)
    try:
        onnx.checker.check_model(candidate, full_check=True)
        row["checker"] = True
    except Exception as exc:
        row["checker"], row["checker_error"] = False, node_corpus._first_line(exc)
    try:
        session = node_corpus.load_onnxruntime(candidate)
    except Exception as exc:
        row.update(category="refused to load", detail=node_corpus._first_line(exc))
        return row
    try:
        actual = node_corpus.run_onnxruntime(candidate, node_corpus.copy_feeds(case.feeds), session)
    except Exception as exc:
        row.update(category="failed at run time", detail=node_corpus._first_line(exc))
        return row
    names = [o.name for o in candidate.graph.output]
    problem = None if names == case.output_names else f"output names changed: {case.output_names} -> {names}"
    if problem is None:
        problem, _ = fp16.fp16_mismatch(case.expected, actual)
    if problem is not None:
        row.update(category="off tolerance", detail=problem)
        row["changed_output"] = problem.startswith("output names") or ": dtype " in problem or ": shape " in problem
        return row
    row["category"] = "right"
    if row["has_float16"]:
        row["reference"], row["reference_detail"] = reference_check(case, candidate)
    return row


def reference_check(case: node_corpus.CorpusCase, candidate: onnx.ModelProto) -> tuple[str, str]:
    try:
        values = node_corpus.run_reference(candidate, case.feeds)
    except Exception as exc:
        return "n/a", f"the evaluator cannot run it: {node_corpus._first_line(exc)[:160]}"
    problem, _ = fp16.fp16_mismatch(case.expected, fp16._in_declared_types(values, candidate, case.expected))
    if problem is None:
        return "agrees", ""
    try:
        baseline = node_corpus.run_reference(case.model, case.feeds)
        off = node_corpus.compare_outputs(case.expected, baseline, rtol=fp16.FP32_RTOL, atol=fp16.FP32_ATOL)
    except Exception as exc:
        off = node_corpus._first_line(exc)
    if off is not None:
        return "n/a", f"the evaluator disagrees with onnxruntime on the original: {off[:160]}"
    return "differs", problem


# ---------------------------------------------------------------- the run
def run(tools: list[str], limit: int | None, force: bool, names: list[str] | None) -> dict:
    start = time.perf_counter()
    cases, skips = fp16.corpus()
    if names:
        cases = [c for c in cases if c.name in set(names)]
    if limit:
        cases = cases[:limit]
    converters = {
        "onnxconverter-common": onnxconverter_common_converter,
        "onnxmp": lambda: onnxmp_converter(force),
    }
    results: dict[str, Any] = {}
    for tool in tools:
        convert = converters[tool]()
        rows = [judge(case, convert) for case in cases]
        results[tool] = summarize(tool, rows)
    import onnxruntime

    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import onnxconverter_common

        versions["onnxconverter-common"] = onnxconverter_common.__version__
    with contextlib.suppress(ImportError):
        import onnxmp

        versions["onnxmp"] = onnxmp.__version__
    return {
        "corpus": {"runnable": len(cases), "skipped": dict(Counter(s.reason for s in skips).most_common())},
        "tolerance": {"rtol": fp16.RTOL, "atol_scale_of_max_abs": fp16.ATOL_SCALE, "atol_floor": fp16.ATOL_FLOOR},
        "onnxmp_policy": "fp16 preset without validation" + (", placement forced to float16" if force else ""),
        "versions": versions,
        "tools": results,
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarize(tool: str, rows: list[dict]) -> dict:
    counts = Counter(row["category"] for row in rows)
    right = [row for row in rows if row["category"] == "right"]
    summary: dict[str, Any] = {
        "cases": len(rows),
        **{category: counts.get(category, 0) for category in CATEGORIES},
        "checker_rejects": sum(1 for row in rows if row.get("checker") is False),
        "checker_rejects_among_right": sum(1 for row in right if row.get("checker") is False),
        "right_with_float16": sum(1 for row in right if row.get("introduced_float16")),
        "off_tolerance_changed_output": sum(1 for row in rows if row.get("changed_output")),
        "crashed_already_float16": sum(1 for row in rows if row["category"] == "crashed" and "already converted" in row.get("detail", "")),
        "reference": dict(Counter(row["reference"] for row in right if "reference" in row)),
        "convert_seconds": round(sum(row.get("seconds", 0.0) for row in rows), 1),
    }
    if tool == "onnxmp":
        lowered = [row for row in right if row.get("rules", {}).get("lowered")]
        kept = [row for row in right if not row.get("rules", {}).get("lowered")]
        summary["right_lowered"] = len(lowered)
        summary["right_kept_by_rule"] = len(kept)
        summary["kept_by"] = dict(Counter(_kept_by(row.get("rules", {})) for row in kept).most_common())
    summary["problems"] = {
        category: [{"name": row["name"], "detail": row.get("detail", "")} for row in rows if row["category"] == category]
        for category in CATEGORIES[1:]
    }
    summary["reference_differs"] = [
        {"name": row["name"], "detail": row.get("reference_detail", "")} for row in right if row.get("reference") == "differs"
    ]
    summary["reference_na"] = [
        {"name": row["name"], "detail": row.get("reference_detail", "")} for row in right if row.get("reference") == "n/a"
    ]
    return summary


def _kept_by(rules: dict) -> str:
    kept = [r for r in fp16.RULE_ORDER if r in rules]
    return kept[0] if kept else fp16.NO_FLOAT32


def format_table(summary: dict) -> str:
    tools = list(summary["tools"])
    rows = [
        ("cases", "cases"),
        ("right (loads, runs, within FP16 tolerance)", "right"),
        ("  of which compute in float16 (float16 added)", "right_with_float16"),
        ("  onnxmp: lowered", "right_lowered"),
        ("  onnxmp: kept float32 by a named rule", "right_kept_by_rule"),
        ("refused to load", "refused to load"),
        ("failed at run time", "failed at run time"),
        ("converter crashed", "crashed"),
        ("  of which 'already converted to float16'", "crashed_already_float16"),
        ("off tolerance", "off tolerance"),
        ("  of which an output changed dtype/shape/name", "off_tolerance_changed_output"),
        ("onnx.checker rejects (any category)", "checker_rejects"),
        ("onnx.checker rejects, among right", "checker_rejects_among_right"),
        ("reference evaluator agrees (right, float16)", ("reference", "agrees")),
        ("reference evaluator differs", ("reference", "differs")),
        ("reference evaluator n/a", ("reference", "n/a")),
        ("conversion seconds (sum)", "convert_seconds"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [
        f"onnx node-test corpus, FP16 with keep_io_types: onnx {summary['versions']['onnx']}, onnxruntime "
        f"{summary['versions']['onnxruntime']}, {summary['corpus']['runnable']} runnable cases, "
        f"onnxmp: {summary['onnxmp_policy']}; {summary['seconds']} s",
        "".ljust(width) + "".join(f"{tool:>22}" for tool in tools),
    ]
    for label, key in rows:
        cells = []
        for tool in tools:
            data = summary["tools"][tool]
            value = data.get(key[0], {}).get(key[1], 0) if isinstance(key, tuple) else data.get(key, "-")
            cells.append(f"{value:>22}")
        lines.append(label.ljust(width) + "".join(cells))
    if "onnxmp" in summary["tools"]:
        lines.append(f"onnxmp kept by: {summary['tools']['onnxmp'].get('kept_by', {})}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    parser.add_argument("--json", dest="json_path", help="write the summary (with per-case problems) here")
    parser.add_argument("--limit", type=int, help="only the first N runnable cases")
    parser.add_argument("--names", help="comma-separated case names")
    parser.add_argument("--force-lower", action="store_true", help="onnxmp: placement always picks float16")
    parser.add_argument("--problems", action="store_true", help="print every problem case")
    args = parser.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    summary = run(tools, args.limit, args.force_lower, args.names.split(",") if args.names else None)
    print(format_table(summary))
    if args.problems:
        for tool, data in summary["tools"].items():
            for category, items in list(data["problems"].items()) + [("reference differs", data["reference_differs"])]:
                for item in items:
                    print(f"{tool}: {category}: {item['name']}: {item['detail'][:200]}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
