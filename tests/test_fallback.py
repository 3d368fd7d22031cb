"""The accuracy fallback (``validation.fallback``): a quantized model that fails its gates gets its
costliest nodes, measured one by one, kept float until it passes; histograms and quantization
parameters are reused across the reruns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import MODELS
from helpers import calibration_folder
from onnxmp.api import optimize, optimize_model
from onnxmp.calibration import Calibrator
from onnxmp.data import input_specs, load_batches
from onnxmp.errors import PolicyError, ValidationError
from onnxmp.fallback import Attempt, FallbackSettings, accuracy_fallback, gate_score
from onnxmp.ir import Model
from onnxmp.quant_calibration import TensorHistogram, quantization_params
from onnxmp.validate import Gates, OutputMetrics, ValidationReport

MODEL = MODELS / "cnn_bn_residual.onnx"
PASSES = ["cleanup", "fold-constants", "fold-batchnorm", "fuse-matmul-add", "qdq-insertion", "scale-folding", "cleanup"]


def policy(gates: dict, fallback=True) -> dict:
    validation = {"gates": gates}
    if fallback is not None:
        validation["fallback"] = fallback
    return {"version": 1, "target": "cpu", "passes": [{"name": n} for n in PASSES], "validation": validation}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return calibration_folder(tmp_path_factory.mktemp("fallback"), MODEL)


@pytest.fixture(scope="module")
def baseline_error(data) -> float:
    """The relative L2 error of the model with every eligible node quantized."""
    result = optimize_model(MODEL, policy({"max_rel_l2_error": 1.0}, fallback=None), calibration_data=data)
    return result.report["validation"]["outputs"]["logits"]["rel_l2_error"]


def qdq_rules(result) -> dict[str, str]:
    return {d["node"]: d["rule"] for d in result.report["decisions"] if d.get("pass") == "qdq-insertion" and "node" in d}


def test_without_the_fallback_a_tight_gate_fails(data, baseline_error):
    with pytest.raises(ValidationError, match="relative L2 error") as failure:
        optimize_model(MODEL, policy({"max_rel_l2_error": 0.8 * baseline_error}, fallback=None), calibration_data=data)
    assert "validation.fallback" in str(failure.value)  # the hint names the way out


def test_the_costliest_node_goes_float_and_the_gate_passes(data, baseline_error):
    result = optimize_model(MODEL, policy({"max_rel_l2_error": 0.8 * baseline_error}), calibration_data=data)
    fallback = result.report["fallback"]
    assert fallback["passed"] and result.report["validation"]["passed"]
    assert fallback["baseline"]["worst_gate_fraction"] == pytest.approx(1.25, rel=1e-6)
    ranking = fallback["ranking"]
    assert [r["worst_gate_fraction"] for r in ranking] == sorted(r["worst_gate_fraction"] for r in ranking)
    assert fallback["kept_float"] == [ranking[0]["node"]]
    rules = qdq_rules(result)
    assert rules[ranking[0]["node"]] == "keep-node-name"
    assert sum(rule == "quantized" for rule in rules.values()) == fallback["steps"][-1]["quantized_nodes"] > 0
    error = result.report["validation"]["outputs"]["logits"]["rel_l2_error"]
    assert error <= 0.8 * baseline_error
    kept = f"keep_node_names=[{ranking[0]['node']}]"  # the pipeline recorded is the one that made the model
    assert kept in result.report["pipeline"] and kept in result.model.metadata["onnxmp.pipeline"]


def test_nodes_go_float_in_ranked_order_one_more_per_step(data, baseline_error):
    result = optimize_model(MODEL, policy({"max_rel_l2_error": 0.3 * baseline_error}), calibration_data=data)
    fallback = result.report["fallback"]
    order = [r["node"] for r in fallback["ranking"]]
    for count, step in enumerate(fallback["steps"], start=1):
        assert step["kept_float"] == order[:count]
    assert len(fallback["steps"]) >= 2
    assert fallback["passed"] == result.report["validation"]["passed"] is True


def test_the_fallback_gives_up_after_max_layers_and_writes_nothing(data, tmp_path):
    out = tmp_path / "out.onnx"
    strict = policy({"max_abs_error": 1e-9}, fallback={"max_layers": 2})
    with pytest.raises(ValidationError, match=r"accuracy fallback kept 2 of \d+ quantized nodes float"):
        optimize(MODEL, out, strict, calibration_data=data, report_path=tmp_path / "r.json")
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_a_passing_model_does_not_run_the_fallback(data):
    result = optimize_model(MODEL, policy({"max_rel_l2_error": 1.0}), calibration_data=data)
    assert "fallback" not in result.report


def test_the_fallback_is_deterministic(data, baseline_error):
    gates = {"max_rel_l2_error": 0.5 * baseline_error}
    first = optimize_model(MODEL, policy(gates), calibration_data=data).model.to_proto().SerializeToString()
    second = optimize_model(MODEL, policy(gates), calibration_data=data).model.to_proto().SerializeToString()
    assert first == second


@pytest.mark.parametrize(
    "value, message",
    [({"max_layers": 0}, r"\$\.validation\.fallback"), ("yes", r"\$\.validation\.fallback"), ({"layers": 3}, "fallback")],
)
def test_bad_fallback_settings_are_policy_errors(data, value, message):
    with pytest.raises(PolicyError, match=message):
        optimize_model(MODEL, policy({"max_rel_l2_error": 1.0}, fallback=value), calibration_data=data)


# ------------------------------------------------------------------ scoring
def _report(gates: Gates, **values) -> ValidationReport:
    metrics = OutputMetrics("y")
    for key, value in values.items():
        setattr(metrics, key, value)
    return ValidationReport(outputs={"y": metrics}, gates=gates, failures=[], batches=1)


def test_gate_score_is_the_error_as_a_fraction_of_each_gate():
    gates = Gates(max_abs_error=0.5, min_cosine_similarity=0.99)
    report = _report(gates, max_abs_error=0.25, sum_sq_original=1.0, sum_sq_candidate=1.0, dot=0.98)
    worst, total = gate_score(report)
    assert worst == pytest.approx(2.0) and total == pytest.approx(2.5)  # cosine 0.98: 0.02 of an allowed 0.01
    assert gate_score(_report(gates, nonfinite_count=1)) == (math.inf, math.inf)
    assert gate_score(_report(Gates())) == (0.0, 0.0)


# ------------------------------------------------------------------ reuse across reruns
def test_histograms_are_observed_once_per_tensor(data, monkeypatch):
    import onnxmp.quant_calibration as quant_calibration

    observed: list[list[str]] = []
    real = quant_calibration.collect_histograms

    def recording(model, batches, tensors, *args):
        observed.append(list(tensors))
        return real(model, batches, tensors, *args)

    monkeypatch.setattr(quant_calibration, "collect_histograms", recording)
    proto = Model.load(MODEL).to_proto()
    calibrator = Calibrator(load_batches(data, input_specs(proto)), cache_dir=None, progress=False)
    names = [node.output[0] for node in proto.graph.node[:3]]
    first = calibrator.histograms(proto, names[:2], 512)
    again = calibrator.histograms(Model.load(MODEL).to_proto(), names, 512)  # an equal model, one more tensor
    assert observed == [names[:2], names[2:]]
    assert all(again[name] is first[name] for name in names[:2])


def test_parameters_are_computed_once_per_histogram_until_it_changes():
    histogram = TensorHistogram("x", 512)
    histogram.update(np.linspace(-1, 1, 1000, dtype=np.float32), "b0")
    first = quantization_params({"x": histogram}, "mse")["x"]
    assert quantization_params({"x": histogram}, "mse")["x"] is first
    histogram.update(np.array([4.0], np.float32), "b1")
    assert quantization_params({"x": histogram}, "mse")["x"].threshold > first.threshold


def _attempt(kept: tuple[str, ...], error: float, quantized: list[str]) -> Attempt:
    gates = Gates(max_abs_error=1.0)
    report = _report(gates, max_abs_error=error)
    if error > 1.0:
        report.failures.append(f"max abs error {error}")
    return Attempt(kept, report, quantized, result=kept)


def test_a_trial_that_leaves_nothing_quantized_is_not_ranked_and_nodes_accumulate():
    first = _attempt((), 2.0, ["a", "b", "c"])
    errors = {("a",): 0.1, ("b",): 1.5, ("c",): 1.2, ("c", "b"): 0.9}
    calls = []

    def attempt(kept):
        calls.append(kept)
        quantized = [] if kept == ("a",) else [n for n in first.quantized if n not in kept]  # without a: float
        return _attempt(kept, errors[kept], quantized)

    best, report = accuracy_fallback(first, attempt, FallbackSettings(max_layers=3))
    assert [r["node"] for r in report["ranking"]] == ["c", "b"] and report["not_ranked"] == ["a"]
    assert calls == [("a",), ("b",), ("c",), ("c",), ("c", "b")]
    assert best.kept == ("c", "b") and best.result == ("c", "b") and report["passed"]
    assert [step["kept_float"] for step in report["steps"]] == [["c"], ["c", "b"]]


def test_the_search_stops_at_max_layers_with_the_last_attempt():
    first = _attempt((), 2.0, ["a", "b"])
    best, report = accuracy_fallback(first, lambda kept: _attempt(kept, 1.5, ["x"]), FallbackSettings(max_layers=1))
    assert best.kept == ("a",) and not report["passed"]
    assert "kept 1 of 2 quantized nodes float" in report["note"]
    assert report["note"] in best.validation.notes
