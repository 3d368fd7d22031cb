"""The precision pass: which nodes are lowered and why, where casts go, and accuracy on trained models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, REPO
from helpers import max_relative_error, random_feeds, session
from onnxmp.api import optimize, optimize_model
from onnxmp.dump import dump_model
from onnxmp.errors import PolicyError, ValidationError
from onnxmp.ir import elem_type, provenance

FP16 = TensorProto.FLOAT16
GOLDEN_FIXTURES = ["cnn_bn_residual", "transformer_block", "matmul_add", "if_model", "qdq_model"]
TRAINED = json.loads((MODELS / "trained.json").read_text())
CLASSIFIERS = sorted(name for name, entry in TRAINED.items() if "heldout_accuracy" in entry)  # not the detector


def lower(fixture_or_model, options: str = "", target: str = "cuda", **kwargs):
    passes = f"cleanup,fold-constants,precision{{{options}}},cast-elimination,cleanup" if options else (
        "cleanup,fold-constants,precision,cast-elimination,cleanup"
    )
    source = MODELS / f"{fixture_or_model}.onnx" if isinstance(fixture_or_model, str) else fixture_or_model
    return optimize_model(source, passes=passes, target=target, verify_each=True, **kwargs)


def decisions(result) -> dict[str, dict]:
    return {d["node"]: d for d in result.report["decisions"]}


@pytest.mark.parametrize("fixture", GOLDEN_FIXTURES)
def test_precision_golden(fixture, golden):
    golden.check(f"precision/{fixture}.txt", dump_model(lower(fixture).model))


@pytest.mark.parametrize("fixture", sorted(p.stem for p in MODELS.glob("*.onnx")))
def test_fp16_outputs_close_and_casts_only_at_region_borders(fixture):
    result = lower(fixture)
    model = result.model
    original = session(str(MODELS / f"{fixture}.onnx"))
    candidate = session(model.to_proto())
    feeds = random_feeds(original, 0)
    for spec, want, got in zip(original.get_outputs(), original.run(None, feeds), candidate.run(None, feeds)):
        if spec.name == "noisy":
            continue
        assert got.dtype == want.dtype, "keep_io_types keeps float32 outputs"
        assert np.isfinite(got).all()
        assert max_relative_error(want, got) < 1e-2, spec.name
    for node in model.graph.nodes:
        if node.op == "Cast" and provenance(node) == "precision":
            source, target = elem_type(node.inputs[0]), node.attrs["to"]
            assert source != target
            users = node.outputs[0].outputs
            assert not (users and all(u.op == "Cast" for u in users)), f"{node.name}: a cast feeding only casts"


def test_every_convertible_node_has_a_named_decision():
    result = lower("transformer_block")
    rules = {d["rule"].split(":")[0] for d in result.report["decisions"]}
    assert "lowered" in rules and "keep-op-type" in rules  # the decomposed LayerNorm's Pow stays float32
    pow_nodes = [d for d in result.report["decisions"] if d["op"] == "Pow"]
    assert pow_nodes and all(d["precision"] == "float32" and d["rule"] == "keep-op-type" for d in pow_nodes)
    matmuls = [d for d in result.report["decisions"] if d["op"] == "MatMul"]
    assert matmuls and all(d["precision"] == "float16" for d in matmuls)


def test_keep_op_types_and_node_patterns():
    result = lower("transformer_block", "keep_op_types=[Softmax],keep_node_patterns=[^attn/q_proj]")
    by_name = decisions(result)
    softmax = [d for d in by_name.values() if d["op"] == "Softmax"]
    assert softmax and all(d["rule"] == "keep-op-type" for d in softmax)
    q_proj = [d for name, d in by_name.items() if name.startswith("attn/q_proj")]
    assert q_proj and all(d["rule"].startswith("keep-node-pattern") for d in q_proj)


def test_cpu_target_keeps_ops_without_fp16_kernels():
    result = lower("cnn_bn_residual", target="cpu")
    conv = [d for d in result.report["decisions"] if d["op"] == "Conv"]
    assert conv and all(d["rule"].startswith("no-kernel") for d in conv)


def test_subgraph_owner_stays_float32_and_model_stays_valid():
    result = lower("if_model")
    assert decisions(result)["if/select_branch"]["rule"] == "subgraph"


def test_keep_io_types_false_lowers_inputs_and_outputs():
    model = lower("cnn_bn_residual", "keep_io_types=false").model
    assert elem_type(model.graph.inputs[0]) == FP16
    assert elem_type(model.graph.outputs[0]) == FP16
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float16)}
    assert session(model.to_proto()).run(None, feeds)[0].dtype == np.float16


def _scaled_model(scale: float, constant: float = 1.0) -> onnx.ModelProto:
    """y = Relu(x * scale) * constant - x / 2: lowering overflows float16 when scale is big."""
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["big"], name="scale_up"),
        helper.make_node("Relu", ["big"], ["act"], name="relu"),
        helper.make_node("Mul", ["act", "constant"], ["scaled"], name="times_constant"),
        helper.make_node("Mul", ["x", "half"], ["scaled_copy"], name="half_x"),
        helper.make_node("Sub", ["scaled", "scaled_copy"], ["y"], name="subtract"),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("constant", TensorProto.FLOAT, [], [constant]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _calibration(tmp_path, count=4):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        np.savez(folder / f"batch_{index:03d}.npz", x=(rng.standard_normal((8, 64)) * 10).astype(np.float32))
    return folder


def test_range_rule_keeps_overflowing_nodes_float32(tmp_path):
    model = _scaled_model(scale=1e4)  # |x * 1e4| reaches ~3e5, beyond float16's 65504
    result = lower(model, calibration_data=_calibration(tmp_path), calibration_cache=tmp_path / "cache")
    rule = decisions(result)["scale_up"]["rule"]
    assert rule.startswith("range-overflow") and "big" in rule
    feeds = {"x": (np.random.default_rng(1).standard_normal((2, 64)) * 10).astype(np.float32)}
    got = session(result.model.to_proto()).run(None, feeds)[0]
    assert np.isfinite(got).all()
    assert result.model.metadata["onnxmp.calibration"].startswith("sha256:")


def test_without_calibration_the_overflow_is_caught_by_validation(tmp_path):
    source = tmp_path / "scaled.onnx"
    onnx.save(_scaled_model(scale=1e4), source)
    data = _calibration(tmp_path)
    policy = {
        "version": 1,
        "target": "cuda",
        "passes": [{"name": "precision"}],
        "validation": {"runtime": "reference", "gates": {"max_rel_l2_error": 0.01}},
    }
    with pytest.raises(ValidationError, match="output 'y'"):
        optimize(source, tmp_path / "out.onnx", policy, validation_data=data)
    assert not (tmp_path / "out.onnx").exists()


def test_out_of_range_initializer_keeps_its_node_float32():
    result = lower(_scaled_model(scale=1.0, constant=1e6))
    assert decisions(result)["times_constant"]["rule"].startswith("initializer-range")


def test_long_reductions_stay_float32():
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["long"], name="long_sum", keepdims=1),
            helper.make_node("ReduceSum", ["x", "short_axes"], ["short"], name="short_sum", keepdims=1),
            helper.make_node("Add", ["long", "short"], ["y"], name="add"),
        ],
        "reductions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 8192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8192])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2]), helper.make_tensor("short_axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    by_name = decisions(lower(model))
    assert by_name["long_sum"]["rule"].startswith("long-reduction: 8192")
    assert not by_name["short_sum"]["rule"].startswith("long-reduction")


@pytest.mark.parametrize(
    "options,message",
    [
        ("keep_op_types=[NotAnOp]", r"\$.passes\[2\].options.keep_op_types: unknown op type"),
        ("keep_node_patterns=[(unclosed]", r"keep_node_patterns: '\(unclosed' is not a valid regular expression"),
        ("dtype=fp8", "is not one of"),
    ],
)
def test_bad_precision_options(options, message):
    with pytest.raises(PolicyError, match=message):
        lower("cnn_bn_residual", options)


# ------------------------------------------------------------- accuracy with trained weights
def heldout(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    entry = TRAINED[name]
    data = np.load(REPO / "fixtures" / entry["heldout"])
    return data[entry["input"]], data["labels"], entry["input"]


def top1(run, inputs: np.ndarray, labels: np.ndarray, name: str) -> float:
    return float(np.mean(np.argmax(run({name: inputs}), axis=-1) == labels))


def reference_top1(model, inputs: np.ndarray, labels: np.ndarray, input_name: str) -> float:
    """Top-1 with onnx's reference evaluator, which computes every op in its declared type.

    onnxruntime's CPU provider runs float16 ops in float32 (it inserts casts) and has no bfloat16
    kernels, so only the reference evaluator shows here what the low-precision model does on
    hardware with native kernels (it even accumulates in the low type: a stricter test).
    """
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model.to_proto())
    return top1(lambda f: np.asarray(evaluator.run(None, f)[0], dtype=np.float32), inputs, labels, input_name)


def without_fusions(preset: str) -> dict:
    """The preset with its fusion passes dropped: the same precision rules on standard ONNX ops,
    which onnx's reference evaluator can run (it has no com.microsoft kernels)."""
    policy = json.loads((REPO / "onnxmp" / "presets" / f"{preset}.json").read_text())
    policy["passes"] = [p for p in policy["passes"] if not p["name"].startswith("fuse-") or p["name"] == "fuse-matmul-add"]
    return policy


@pytest.mark.parametrize("preset,budget", [("fp16", 0.001), ("bf16", 0.005)])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_low_precision_keeps_trained_accuracy(name, preset, budget):
    inputs, labels, input_name = heldout(name)
    fp32 = top1(lambda f: session(str(MODELS / f"{name}.onnx")).run(None, f)[0], inputs, labels, input_name)
    assert fp32 == pytest.approx(TRAINED[name]["heldout_accuracy"])
    result = optimize_model(MODELS / f"{name}.onnx", without_fusions(preset))
    model = result.model
    low = FP16 if preset == "fp16" else TensorProto.BFLOAT16
    lowered = sum(1 for d in result.report["decisions"] if d["rule"] == "lowered")
    # Conv, MaxPool and GlobalAveragePool allow bfloat16 only from opset 22: digits_cnn (opset 17)
    # lowers its head alone in bf16; everything else lowers most of the model.
    assert lowered >= (1 if (name, preset) == ("digits_cnn", "bf16") else len(model.graph.nodes) // 2)
    assert any(elem_type(t) == low for t in model.graph.tensors().values())
    accuracy = reference_top1(model, inputs, labels, input_name)
    assert abs(accuracy - fp32) <= budget, f"{name}: FP32 {fp32:.4f}, {preset} {accuracy:.4f}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_fused_fp16_preset_keeps_trained_accuracy_on_onnxruntime(name):
    """The whole fp16 preset, fusions included (contrib ops: onnxruntime only)."""
    inputs, labels, input_name = heldout(name)
    fp32 = top1(lambda f: session(str(MODELS / f"{name}.onnx")).run(None, f)[0], inputs, labels, input_name)
    model = optimize_model(MODELS / f"{name}.onnx", "fp16").model
    fused = session(model.to_proto())
    accuracy = top1(lambda f: fused.run(None, f)[0], inputs, labels, input_name)
    assert abs(accuracy - fp32) <= 0.001, f"{name}: FP32 {fp32:.4f}, fused fp16 {accuracy:.4f}"


def test_unnamed_constant_of_shape_values_keep_their_own_values():
    """torch exports ConstantOfShape values as unnamed tensors: each must be converted on its own
    (a cache by name once gave every one the first one's value, 0 for 1, in torchvision's Swin)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")

    def filled(name, value):
        return helper.make_node("ConstantOfShape", ["shape"], [name], name=name,
                                value=helper.make_tensor("", TensorProto.FLOAT, [1], [value]))

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        filled("zeros", 0.0), filled("ones", 1.0), filled("threes", 3.0),
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "zeros"], ["h2"], name="add"),
        helper.make_node("Mul", ["h2", "ones"], ["h3"], name="mul"),
        helper.make_node("Add", ["h3", "threes"], ["h4"], name="add3"),
        helper.make_node("MatMul", ["h4", "w"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    lowered = lower(model).model
    values = {n.name: n.attrs["value"].values for n in lowered.graph.nodes if n.op == "ConstantOfShape"}
    assert {name: v.dtype for name, v in values.items()} == dict.fromkeys(("zeros", "ones", "threes"), np.float16)
    assert {name: float(v.reshape(-1)[0]) for name, v in values.items()} == {"zeros": 0.0, "ones": 1.0, "threes": 3.0}
    x = rng.standard_normal((64, 16)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    got = session(lowered.to_proto()).run(None, {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_infinity_stand_ins_saturate_so_a_fully_masked_softmax_stays_finite():
    """transformers fills masked scores with float32's min: as float16 -inf it would turn a fully
    masked row into NaN (float32 gives a uniform row); saturated to -65504 it does not."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"], name="scores"),
            helper.make_node("Where", ["keep", "zero", "fill"], ["bias"], name="mask_fill"),
            helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
            helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1),
        ],
        "masked_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w"),
            onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            onnx.numpy_helper.from_array(np.array(np.finfo(np.float32).min, dtype=np.float32), "fill"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = lower(model)
    assert decisions(result)["mask_fill"]["precision"] == "float16"
    from onnx.reference import ReferenceEvaluator

    keep = np.array([[True] * 4 + [False] * 4, [False] * 8])
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    y = ReferenceEvaluator(result.model.to_proto()).run(None, {"x": x, "keep": keep})[0]
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, session(model).run(None, {"x": x, "keep": keep})[0], atol=2e-3)


def test_tiny_addends_do_not_keep_a_node_float32_but_tiny_factors_do():
    tiny = np.full(64, 1e-6, dtype=np.float32)  # below float16's smallest normal 6.1e-5
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
            helper.make_node("Add", ["mm", "bias"], ["biased"], name="add_bias"),
            helper.make_node("Mul", ["biased", "scale"], ["y"], name="scale_down"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [
            onnx.numpy_helper.from_array(np.eye(64, dtype=np.float32), "w"),
            onnx.numpy_helper.from_array(tiny, "bias"),
            onnx.numpy_helper.from_array(tiny, "scale"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    by_name = decisions(lower(model))
    assert by_name["add_bias"]["precision"] == "float16"
    assert by_name["scale_down"]["rule"].startswith("initializer-range") and "mostly below" in by_name["scale_down"]["rule"]


def test_tiny_biases_of_fused_and_standard_ops_do_not_keep_them_float32():
    """torchvision's ViT initializes MLP biases with std 1e-6: a bias input underflowing float16
    is added, not multiplied, so Gemm (input C) and the fused BiasGelu stay lowered."""
    tiny = np.full(16, 1e-6, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "bias"], ["h"], name="gemm"),
            helper.make_node("BiasGelu", ["h", "bias"], ["y"], name="bias_gelu", domain="com.microsoft"),
        ],
        "tiny_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [onnx.numpy_helper.from_array(np.eye(16, dtype=np.float32), "w"), onnx.numpy_helper.from_array(tiny, "bias")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    by_name = decisions(lower(model))
    assert by_name["gemm"]["precision"] == "float16" and by_name["bias_gelu"]["precision"] == "float16"
