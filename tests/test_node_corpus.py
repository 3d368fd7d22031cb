"""The fp32 preset keeps the meaning of every model in onnx's node-test corpus.

Each runnable case (see ``node_corpus``) is optimized with ``optimize_model(model, "fp32",
verify_each=True)``; the optimized model runs on onnxruntime (CPU, optimizations off) on the
case's inputs and every output must match the original model's onnxruntime outputs within
rtol=1e-5 (atol=1e-6 scaled by the output's largest finite magnitude; NaN where NaN; one ulp
for float16 outputs, see ``node_corpus.half_precision_tolerance``). Any exception from onnxmp
is a failure. Cases that cannot serve as a test are counted per reason in the printed summary.

Set ONNXMP_CORPUS_REPORT=path to also write the summary as JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

import onnx
import onnxruntime
import pytest

import node_corpus
from node_corpus import CorpusCase, Skip, iter_cases, onnxruntime_limits, optimize_and_compare

REPORT_ENV = "ONNXMP_CORPUS_REPORT"
POLICY = "fp32"
RTOL, ATOL = 1e-5, 1e-6
MIN_RUN_FRACTION = 0.4  # fewer runnable cases than this means the harness, not onnxmp, broke


def run_corpus() -> dict:
    """Classify and run the whole corpus; the summary as a JSON-ready dict."""
    start = time.perf_counter()
    skipped: dict[str, list[str]] = defaultdict(list)
    outcomes = []
    for item in iter_cases(require_float_outputs=True):
        if isinstance(item, Skip):
            skipped[item.reason].append(item.name)
            continue
        assert isinstance(item, CorpusCase)
        outcomes.append(optimize_and_compare(item, POLICY, rtol=RTOL, atol=ATOL, verify_each=True))
    failed = [o for o in outcomes if not o.passed]
    changed = [o for o in outcomes if o.changed]
    limits = onnxruntime_limits()
    return {
        "policy": POLICY,
        "verify_each": True,
        "tolerance": {"rtol": RTOL, "atol": ATOL, "atol_scaled_by_max_abs": True, "float16_one_ulp": True},
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "onnxruntime_limits": {"ir_version": limits.ir_version, "opset": limits.opset},
        "total": len(outcomes) + sum(len(v) for v in skipped.values()),
        "ran": len(outcomes),
        "passed": len(outcomes) - len(failed),
        "failed": len(failed),
        "skipped": {reason: len(names) for reason, names in sorted(skipped.items(), key=lambda kv: -len(kv[1]))},
        "changed": len(changed),
        "changed_by_pass": dict(Counter(name for o in outcomes for name in set(o.changed_by)).most_common()),
        "restamped": sorted(f"{o.name} ({o.restamped})" for o in outcomes if o.restamped),
        "passed_only_with_float16_ulp": sorted(o.name for o in outcomes if o.passed and o.needed_half_ulp),
        "failures": [{"name": o.name, "error": o.error} for o in failed],
        "skipped_cases": {reason: sorted(names) for reason, names in sorted(skipped.items())},
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"onnx node-test corpus, policy {summary['policy']} (verify_each), "
        f"onnx {summary['versions']['onnx']}, onnxruntime {summary['versions']['onnxruntime']}: "
        f"{summary['seconds']} s",
        f"  total cases        {summary['total']}",
        f"  ran                {summary['ran']}  ({len(summary['restamped'])} re-stamped to IR "
        f"{summary['onnxruntime_limits']['ir_version']} / opset {summary['onnxruntime_limits']['opset']})",
        f"  passed (unchanged in meaning)  {summary['passed']}",
        f"  failed             {summary['failed']}",
        f"  changed by the pipeline  {summary['changed']}  {summary['changed_by_pass']}",
        f"  passed only with one float16 ulp  {len(summary['passed_only_with_float16_ulp'])}",
        "  skipped:",
    ]
    lines += [f"    {count:5d}  {reason}" for reason, count in summary["skipped"].items()]
    return "\n".join(lines)


def failure_message(summary: dict) -> str:
    lines = [f"{summary['failed']} of {summary['ran']} corpus cases changed meaning or crashed onnxmp:"]
    lines += [f"  {f['name']}: {f['error']}" for f in summary["failures"]]
    return "\n".join(lines)


def test_fp32_preset_preserves_node_corpus(capsys):
    summary = run_corpus()
    with capsys.disabled():
        print("\n" + format_summary(summary))
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    assert summary["ran"] >= MIN_RUN_FRACTION * summary["total"], (
        f"only {summary['ran']} of {summary['total']} cases ran; skipped: {summary['skipped']}"
    )
    assert summary["failed"] == 0, failure_message(summary)


@pytest.mark.parametrize(
    "expected, actual, ok",
    [
        ([[1.0, float("nan")]], [[1.0, float("nan")]], True),
        ([[1.0, float("nan")]], [[float("nan"), 1.0]], False),
        ([[1000.0, 0.0]], [[1000.005, 0.0]], True),
        ([[1000.0, 0.0]], [[1000.05, 0.0]], False),
        ([[float("inf")]], [[float("inf")]], True),
        ([[float("inf")]], [[-float("inf")]], False),
    ],
)
def test_compare_outputs(expected, actual, ok):
    import numpy as np

    e = [np.array(v, dtype=np.float32) for v in expected]
    a = [np.array(v, dtype=np.float32) for v in actual]
    assert (node_corpus.compare_outputs(e, a) is None) is ok
