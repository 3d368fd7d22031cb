"""Validation: streaming metrics, gates, reports, reduced-precision I/O and the CLI command."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmp.errors import DataError, PolicyError, ValidationError
from onnxmp.validate import (
    VALIDATION_SCHEMA,
    Gates,
    OutputMetrics,
    Top1Spec,
    check_validation_section,
    gates_from_policy,
    top1_specs,
    validate,
)

RNG_SEED = 0
IN, OUT = 4, 3


# ---------------------------------------------------------------- models
def linear(w: np.ndarray, b: np.ndarray, *, in_type=TensorProto.FLOAT, out_type=TensorProto.FLOAT, out_name="logits", opset=17):
    """y = x @ w + b, with Casts when the graph's input or output type is not float32."""
    nodes, x = [], "x"
    if in_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        x = "x32"
    y = out_name if out_type == TensorProto.FLOAT else "y32"
    nodes += [helper.make_node("MatMul", [x, "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], [y])]
    if out_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [y], [out_name], to=out_type))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", in_type, ["N", w.shape[0]])],
        [helper.make_tensor_value_info(out_name, out_type, ["N", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def identity(shape, name="y"):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [name])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def add_constant(shape, constant: np.ndarray, name="y"):
    """y = x + constant."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], [name])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(constant.astype(np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def weights():
    rng = np.random.default_rng(RNG_SEED)
    return rng.standard_normal((IN, OUT)).astype(np.float32), rng.standard_normal(OUT).astype(np.float32)


def batches(count=4, rows=8, seed=1, width=IN):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, width)).astype(np.float32)} for _ in range(count)]


STRICT = Gates(max_abs_error=1e-6, max_rel_l2_error=1e-6, min_cosine_similarity=0.999999, min_top1_agreement=1.0)


# ---------------------------------------------------------------- pass and fail
def test_identical_models_pass(weights):
    model = linear(*weights)
    report = validate(model, model, batches(), STRICT)
    assert report.passed and report.failures == [] and report.batches == 4
    m = report.outputs["logits"]
    assert m.count == 4 * 8 * OUT
    assert m.max_abs_error == 0.0 and m.rel_l2_error == 0.0
    assert m.cosine_similarity == pytest.approx(1.0, abs=1e-12)
    assert m.top1_agreement == 1.0 and m.top1_rows == 32
    assert m.nonfinite_count == 0
    report.raise_if_failed()  # no error


def test_paths_are_accepted(tmp_path, weights):
    path = tmp_path / "m.onnx"
    onnx.save(linear(*weights), str(path))
    assert validate(str(path), path, batches(1), STRICT).passed


def test_perturbed_weight_fails_rel_l2_naming_the_output(weights):
    w, b = weights
    candidate = linear(w * 1.05, b)
    report = validate(linear(w, b), candidate, batches(), Gates(max_rel_l2_error=0.01))
    assert not report.passed
    assert report.failed_outputs == ["logits"]
    [line] = report.failures
    assert line.startswith("output 'logits': relative L2 error ") and "> gate 0.01" in line
    assert report.outputs["logits"].rel_l2_error > 0.01
    with pytest.raises(ValidationError) as caught:
        report.raise_if_failed()
    message = str(caught.value)
    assert "output 'logits': relative L2 error" in message
    assert "validation" in message and "keep_op_types" in message and "keep_node_patterns" in message


def test_each_gate_fails_with_its_own_line(weights):
    w, b = weights
    report = validate(linear(w, b), linear(w, b + 0.5), batches(), Gates(max_abs_error=0.1, min_cosine_similarity=0.99999))
    lines = report.failures
    assert any("max abs error 0.5 > gate 0.1" in line for line in lines)
    assert any("cosine similarity" in line and "< gate 0.99999" in line for line in lines)


def test_nan_in_candidate_fails_without_any_gate():
    shape = ["N", 5]
    constant = np.zeros(5, np.float32)
    constant[2] = np.nan
    report = validate(identity(shape), add_constant(shape, constant), batches(3, 4, width=5), Gates())
    m = report.outputs["y"]
    assert m.nonfinite_count == 3 * 4  # one column of every row
    assert not report.passed
    assert report.failures == ["output 'y': 12 of 60 values are NaN/Inf in the candidate where the original is finite"]
    # the other elements are still measured, and are exact
    assert m.max_abs_error == 0.0 and m.rel_l2_error == 0.0
    with pytest.raises(ValidationError, match="NaN/Inf outputs fail whatever the gates"):
        report.raise_if_failed()


def test_nan_already_in_original_is_left_out_and_not_a_failure():
    shape = ["N", 5]
    constant = np.zeros(5, np.float32)
    constant[0] = np.inf
    model = add_constant(shape, constant)
    report = validate(model, model, batches(2, 3, width=5), STRICT)
    m = report.outputs["y"]
    assert report.passed and m.nonfinite_count == 0 and m.original_nonfinite_count == 6
    assert m.max_abs_error == 0.0
    assert m.top1_rows == 0  # every row of the original has an Inf


# ---------------------------------------------------------------- top-1
def test_top1_agreement_on_a_crafted_classifier():
    # The candidate adds 0.5 to class 1: rows whose class 1 is within 0.5 of the top flip to it.
    x = np.array(
        [
            [2.0, 1.0, 0.0],  # 1 + .5 < 2: keeps class 0
            [2.0, 1.8, 0.0],  # 2.3 > 2: flips to class 1
            [0.0, 0.0, 3.0],  # keeps class 2
            [0.0, 2.9, 3.0],  # flips to class 1
            [0.0, 5.0, 1.0],  # already class 1
        ],
        np.float32,
    )
    shape = ["N", 3]
    candidate = add_constant(shape, np.array([0.0, 0.5, 0.0], np.float32))
    report = validate(identity(shape), candidate, [{"x": x[:2]}, {"x": x[2:]}], Gates(min_top1_agreement=0.7))
    m = report.outputs["y"]
    assert (m.top1_agree, m.top1_rows) == (3, 5)
    assert m.top1_agreement == pytest.approx(0.6)
    assert report.failures == ["output 'y': top-1 agreement 0.6 < gate 0.7 (2 of 5 rows changed their argmax)"]


def test_top1_of_rank3_outputs_needs_a_spec_and_other_shapes_are_skipped():
    original = np.zeros((2, 3, 4))
    original[..., 1] = 1.0  # argmax 1 everywhere
    candidate = original.copy()
    candidate[0, 0, 3] = 2.0  # one of the 6 [N, T] rows flips
    hidden = OutputMetrics("last_hidden_state")  # by default [N, T, H] is a hidden state: no top-1
    hidden.update(original, candidate)
    assert hidden.top1_agreement is None
    tokens = OutputMetrics("tokens", top1_spec=Top1Spec(class_axis=-1))  # per-token logits, as a policy names them
    tokens.update(original, candidate)
    assert (tokens.top1_agree, tokens.top1_rows) == (5, 6)
    for shape in [(8,), (8, 1), (2, 3, 4), (2, 3, 4, 5)]:
        other = OutputMetrics("other")
        other.update(np.ones(shape, np.float32), np.ones(shape, np.float32))
        assert other.top1_agreement is None, shape
    integers = OutputMetrics("labels")
    integers.update(np.ones((4, 3), np.int64), np.ones((4, 3), np.int64))
    assert integers.top1_agreement is None


def detections(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[N, 4 + classes, anchors], as YOLOv8 writes it."""
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def test_top1_of_a_detector_output_reads_the_class_channels_of_confident_anchors():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 320, (2, 4, 6))  # pixel coordinates: they would win every argmax over axis 1
    scores = rng.uniform(0, 0.2, (2, 3, 6))
    scores[:, 1, :3] = 0.9  # anchors 0-2 confidently class 1; anchors 3-5 background
    original = detections(boxes, scores)
    moved = detections(boxes + 1.0, scores)  # boxes moved: class decisions unchanged
    flipped_background = scores.copy()
    flipped_background[0, 2, 4] = 0.5  # a background anchor changes its argmax
    flipped_confident = scores.copy()
    flipped_confident[0, 0, 0] = 0.95  # a confident anchor changes class
    spec = Top1Spec(class_axis=1, start=4, min_score=0.25)
    default = OutputMetrics("detections")
    default.update(original, moved)
    assert default.top1_agreement is None  # rank 3: no default class axis
    cases = [(moved, 1.0), (detections(boxes, flipped_background), 1.0), (detections(boxes, flipped_confident), 5 / 6)]
    for candidate, expected in cases:
        metrics = OutputMetrics("detections", top1_spec=spec)
        metrics.update(original, candidate)
        assert metrics.top1_rows == 6 and metrics.top1_agreement == pytest.approx(expected)
    everything = OutputMetrics("detections", top1_spec=Top1Spec(class_axis=1, start=4))
    everything.update(original, detections(boxes, flipped_background))
    assert (everything.top1_rows, everything.top1_agree) == (12, 11)


def test_top1_specs_from_the_policy_section_and_their_errors():
    section = {"top1": {"detections": {"class_axis": 1, "classes": [4, None], "min_score": 0.25}, "boxes": {"class_axis": None}}}
    check_validation_section(section)
    specs = top1_specs(section)
    assert specs == {"detections": Top1Spec(1, 4, None, 0.25), "boxes": Top1Spec(None)}
    off = OutputMetrics("boxes", top1_spec=specs["boxes"])
    off.update(np.ones((2, 5), np.float32), np.ones((2, 5), np.float32))
    assert off.top1_agreement is None
    with pytest.raises(PolicyError, match=r"validation.top1.y.class_axis is 3, but output 'y' has rank 2"):
        OutputMetrics("y", top1_spec=Top1Spec(3)).update(np.ones((2, 5)), np.ones((2, 5)))
    with pytest.raises(PolicyError, match="leave 1 class score"):
        OutputMetrics("y", top1_spec=Top1Spec(1, 4)).update(np.ones((2, 5)), np.ones((2, 5)))
    with pytest.raises(PolicyError, match="classes"):
        top1_specs({"top1": {"y": {"class_axis": 1, "classes": [4, 2]}}})
    with pytest.raises(PolicyError, match=r"\$.validation.top1.y"):
        check_validation_section({"top1": {"y": {"axis": 1}}})


def test_validate_applies_top1_specs_and_refuses_unknown_outputs(weights):
    model = linear(*weights)
    data = list(batches(2))
    report = validate(model, model, data, Gates(min_top1_agreement=1.0), top1={"logits": Top1Spec(1, 1)})
    assert report.passed and report.outputs["logits"].top1_rows == 16
    with pytest.raises(PolicyError, match="validation.top1 names output"):
        validate(model, model, data, top1={"scores": Top1Spec(1)})


def test_top1_gate_on_a_non_classifier_output_is_a_policy_error():
    shape = ["N"]
    with pytest.raises(PolicyError, match="outputs.y.min_top1_agreement"):
        validate(identity(shape), identity(shape), [{"x": np.ones(3, np.float32)}], Gates(outputs={"y": Gates(min_top1_agreement=0.9)}))
    # a model-wide top-1 gate just does not apply, and the report says so
    report = validate(identity(shape), identity(shape), [{"x": np.ones(3, np.float32)}], Gates(min_top1_agreement=0.9))
    assert report.passed and any("applies to no output" in note for note in report.notes)


# ---------------------------------------------------------------- streaming
def test_streaming_over_many_batches_equals_one_big_batch(weights):
    w, b = weights
    original, candidate = linear(w, b), linear(w + 0.03, b - 0.02)
    many = batches(count=40, rows=5, seed=7)
    one = [{"x": np.concatenate([batch["x"] for batch in many])}]
    streamed = validate(original, candidate, many).outputs["logits"]
    whole = validate(original, candidate, one).outputs["logits"]
    assert streamed.count == whole.count == 40 * 5 * OUT
    assert streamed.max_abs_error == whole.max_abs_error
    assert (streamed.top1_agree, streamed.top1_rows) == (whole.top1_agree, whole.top1_rows)
    for key in ("rel_l2_error", "cosine_similarity", "top1_agreement"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key), rel=1e-12), key
    # and the streamed numbers are the textbook definitions over all the data
    x = one[0]["x"].astype(np.float64)
    o, c = x @ w.astype(np.float64) + b, x @ (w + 0.03).astype(np.float64) + (b - 0.02)
    assert streamed.rel_l2_error == pytest.approx(np.linalg.norm(c - o) / np.linalg.norm(o), rel=1e-5)
    cosine = np.dot(o.ravel(), c.ravel()) / (np.linalg.norm(o) * np.linalg.norm(c))
    assert streamed.cosine_similarity == pytest.approx(cosine, rel=1e-6)


def test_streaming_accepts_a_generator_and_max_batches(weights):
    model = linear(*weights)
    produced = []

    def generate():
        for batch in batches(10):
            produced.append(1)
            yield batch

    report = validate(model, model, generate(), max_batches=3)
    assert report.batches == 3 and len(produced) == 3


def test_cosine_of_zero_outputs():
    both_zero = OutputMetrics("z")
    both_zero.update(np.zeros((2, 3)), np.zeros((2, 3)))
    assert both_zero.cosine_similarity == 1.0 and both_zero.rel_l2_error == 0.0
    one_zero = OutputMetrics("z")
    one_zero.update(np.zeros((2, 3)), np.ones((2, 3)))
    assert one_zero.cosine_similarity == 0.0 and one_zero.rel_l2_error > 1e20


# ---------------------------------------------------------------- reduced-precision I/O
def test_float16_input_and_output_candidate(weights):
    w, b = weights
    candidate = linear(w, b, in_type=TensorProto.FLOAT16, out_type=TensorProto.FLOAT16)
    report = validate(linear(w, b), candidate, batches(), Gates(max_rel_l2_error=1e-2, min_top1_agreement=0.9))
    m = report.outputs["logits"]
    assert report.passed, report.failures
    assert (m.original_dtype, m.candidate_dtype) == ("float32", "float16")
    assert 0.0 < m.rel_l2_error < 1e-2  # float16 rounding is measured, not hidden


def test_bfloat16_input_and_output_candidate(weights):
    w, b = weights
    candidate = linear(w, b, in_type=TensorProto.BFLOAT16, out_type=TensorProto.BFLOAT16)
    report = validate(linear(w, b), candidate, batches(), Gates(max_rel_l2_error=5e-2))
    m = report.outputs["logits"]
    assert report.passed, report.failures
    assert m.candidate_dtype == "float32"  # widened inside the validation copy
    assert 0.0 < m.rel_l2_error < 5e-2


# ---------------------------------------------------------------- errors
def test_mismatched_output_names_are_an_error(weights):
    with pytest.raises(ValidationError, match="lacks output\\(s\\) 'logits'.*'probs'"):
        validate(linear(*weights), linear(*weights, out_name="probs"), batches(1))


def test_per_output_gate_for_an_unknown_output_names_it(weights):
    gates = Gates(max_rel_l2_error=0.1, outputs={"nope": Gates(max_rel_l2_error=0.5)})
    with pytest.raises(PolicyError, match="'nope'.*its outputs are 'logits'"):
        validate(linear(*weights), linear(*weights), batches(1), gates)


def test_missing_input_and_empty_data_are_data_errors(weights):
    model = linear(*weights)
    with pytest.raises(DataError, match="no value for input\\(s\\) 'x'.*'y'"):
        validate(model, model, [{"y": np.zeros((1, IN), np.float32)}])
    with pytest.raises(DataError, match="no batches"):
        validate(model, model, [])


def test_changed_output_shape_is_a_failure():
    x = [{"x": np.ones((2, 4), np.float32)}]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["y"], axis=0)],
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    flattened = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    flattened.ir_version = 8
    report = validate(identity(["N", 4]), flattened, x)
    assert report.failures == ["output 'y': shape [1, 8] differs from the original's [2, 4] (batch 0)"]


# ---------------------------------------------------------------- gates and the policy section
def test_per_output_gates_override_model_wide_ones():
    gates = Gates(max_rel_l2_error=0.01, min_cosine_similarity=0.999, outputs={"logits": Gates(max_rel_l2_error=0.05)})
    resolved = gates.for_output("logits")
    assert (resolved.max_rel_l2_error, resolved.min_cosine_similarity) == (0.05, 0.999)
    assert gates.for_output("other").max_rel_l2_error == 0.01
    flagged = gates.overridden(max_rel_l2_error=0.2, min_top1_agreement=None)
    assert flagged.for_output("logits").max_rel_l2_error == 0.2 and flagged.min_top1_agreement is None


def test_gates_from_policy_section():
    section = {
        "data": "val/",
        "batches": 4,
        "gates": {
            "max_abs_error": None,
            "max_rel_l2_error": 0.01,
            "min_cosine_similarity": 0.999,
            "min_top1_agreement": 0.99,
            "outputs": {"logits": {"max_rel_l2_error": 0.02}},
        },
    }
    gates = gates_from_policy(section)
    assert gates == Gates(None, 0.01, 0.999, 0.99, {"logits": Gates(max_rel_l2_error=0.02)})
    assert gates_from_policy({"gates": gates.to_dict()}) == gates
    assert gates_from_policy({}) == Gates() == gates_from_policy(None)
    assert VALIDATION_SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize(
    "section,where",
    [
        ({"gates": {"max_rel_l2": 0.01}}, "$.validation.gates"),
        ({"gates": {"outputs": {"logits": {"min_cosine_similarity": 2}}}}, "$.validation.gates.outputs.logits.min_cosine_similarity"),
        ({"batches": 0}, "$.validation.batches"),
        ({"data": 3}, "$.validation.data"),
        ({"extra": 1}, "$.validation"),
    ],
)
def test_bad_policy_sections_name_the_field(section, where):
    with pytest.raises(PolicyError, match=f"{where.replace('$', '[$]')}: "):
        gates_from_policy(section)


def test_bad_gate_values_are_refused():
    with pytest.raises(PolicyError, match="min_top1_agreement must be between 0 and 1"):
        Gates(min_top1_agreement=1.5)
    with pytest.raises(PolicyError, match="max_abs_error must be a number"):
        Gates(max_abs_error="big")


def test_report_to_dict_is_json(weights):
    w, b = weights
    report = validate(linear(w, b), linear(w * 1.05, b), batches(), Gates(max_rel_l2_error=0.01))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["batches"] == 4
    out = data["outputs"]["logits"]
    assert out["passed"] is False and out["gates"]["max_rel_l2_error"] == 0.01
    assert math.isclose(out["rel_l2_error"], report.outputs["logits"].rel_l2_error)
    assert data["failures"] == report.failures


# ---------------------------------------------------------------- the CLI


def test_cli_validate(tmp_path, weights):
    from click.testing import CliRunner

    from onnxmp.cli import main

    w, b = weights
    original, good, bad = tmp_path / "o.onnx", tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(linear(w, b), str(original))
    onnx.save(linear(w, b, in_type=TensorProto.FLOAT16, out_type=TensorProto.FLOAT16), str(good))
    onnx.save(linear(w * 1.05, b), str(bad))
    data = tmp_path / "data"
    data.mkdir()
    for index, batch in enumerate(batches(3)):
        np.savez(data / f"batch_{index:03d}.npz", **batch)
    runner = CliRunner()

    result = runner.invoke(main, ["validate", str(original), str(good), "--data", str(data), "--max-rel-l2", "0.01", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "logits" in result.stdout and "pass" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True

    result = runner.invoke(main, ["validate", str(original), str(bad), "--data", str(data), "--max-rel-l2", "0.01"])
    assert result.exit_code == 1
    assert "error: output 'logits': relative L2 error" in result.stderr
    assert "FAIL" in result.stdout

    result = runner.invoke(main, ["validate", str(original), str(good)])
    assert result.exit_code == 1 and "error: no validation data" in result.stderr


def test_validate_files_takes_data_batches_and_gates_from_the_policy(tmp_path, weights):
    from onnxmp.policy import Policy
    from onnxmp.validate import validate_files

    w, b = weights
    original, bad = tmp_path / "o.onnx", tmp_path / "bad.onnx"
    onnx.save(linear(w, b), str(original))
    onnx.save(linear(w * 1.05, b), str(bad))
    (tmp_path / "data").mkdir()
    for index, batch in enumerate(batches(3)):
        np.savez(tmp_path / "data" / f"batch_{index:03d}.npz", **batch)
    policy_path = tmp_path / "policy.json"
    data = {
        "version": 1,
        "passes": [{"name": "cleanup"}],
        "validation": {"data": "data", "batches": 2, "gates": {"max_rel_l2_error": 0.01, "outputs": {"logits": {"max_rel_l2_error": 0.02}}}},
    }
    policy_path.write_text(json.dumps(data))
    policy = Policy(str(policy_path), data)  # the data path is relative to the policy file's folder
    report = validate_files(original, bad, policy=policy)
    assert report.batches == 2 and report.data["description"].startswith("folder")
    assert report.failures and "> gate 0.02" in report.failures[0]
    # a flag-style override replaces the gate for every output, per-output gates included
    assert validate_files(original, bad, policy=policy, gate_overrides={"max_rel_l2_error": 0.5}).passed
    with pytest.raises(DataError, match="no validation data"):
        validate_files(original, bad)


def test_cli_validate_gates_from_policy(tmp_path, weights):
    from click.testing import CliRunner

    from onnxmp.cli import main

    w, b = weights
    original, bad = tmp_path / "o.onnx", tmp_path / "bad.onnx"
    onnx.save(linear(w, b), str(original))
    onnx.save(linear(w * 1.05, b), str(bad))
    (tmp_path / "data").mkdir()
    for index, batch in enumerate(batches(3)):
        np.savez(tmp_path / "data" / f"batch_{index:03d}.npz", **batch)
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "version": 1,
                "passes": [{"name": "cleanup"}],
                "validation": {"data": "data", "batches": 2, "gates": {"max_rel_l2_error": 0.01}},
            }
        )
    )
    runner = CliRunner()
    # data comes from the policy, relative to its folder; so do the gates; a flag loosens one of them
    result = runner.invoke(main, ["validate", str(original), str(bad), "--policy", str(policy), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and "relative L2 error" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["batches"] == 2
    result = runner.invoke(main, ["validate", str(original), str(bad), "--policy", str(policy)])
    assert result.exit_code == 1 and "relative L2 error" in result.stderr
    result = runner.invoke(main, ["validate", str(original), str(bad), "--policy", str(policy), "--max-rel-l2", "0.5"])
    assert result.exit_code == 0, result.output


def _transposed_matmul(dtype: int) -> onnx.ModelProto:
    """x [64, N, 192] -> Transpose(1, 0, 2) -> MatMul(W): float16 inside when ``dtype`` says so."""
    weight = np.random.default_rng(0).standard_normal((192, 40)).astype(helper.tensor_dtype_to_np_dtype(dtype))
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("MatMul", ["t", "w"], ["y"])]
    if dtype == TensorProto.FLOAT16:
        nodes = [
            helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
            helper.make_node("Transpose", ["x16"], ["t"], perm=[1, 0, 2]),
            helper.make_node("MatMul", ["t", "w"], ["y16"]),
            helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
        ]
    graph = helper.make_graph(
        nodes, "transposed_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, "N", 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 40])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_float16_candidates_that_crash_onnxruntime_cpu_at_level_all_still_validate(tmp_path):
    """onnxruntime's CPU provider segfaults creating a session for this float16 graph at its default
    optimization level (1.31, 1.32); validation must not take the process down with it."""
    import subprocess
    import sys

    onnx.save(_transposed_matmul(TensorProto.FLOAT), tmp_path / "original.onnx")
    onnx.save(_transposed_matmul(TensorProto.FLOAT16), tmp_path / "candidate.onnx")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(1).standard_normal((64, 2, 192)).astype(np.float32))
    command = [sys.executable, "-m", "onnxmp.cli", "validate", str(tmp_path / "original.onnx"),
               str(tmp_path / "candidate.onnx"), "--data", str(tmp_path / "data.npz"), "--max-rel-l2", "0.01"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout[-500:], done.stderr[-500:])
