"""qdq-insertion for target tensorrt: INT8 and FP8 (E4M3FN) placement goldens, TensorRT's placement
rules, the opset upgrade FP8 needs, accuracy on the trained digits CNN, the presets, mixed INT8/FP8 +
FP16, and unusual nodes. TensorRT is not installed here: models run on onnxruntime's CPU provider
and on onnx's reference evaluator."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from conftest import MODELS, REPO
from helpers import calibration_folder, session
from onnxmp.api import optimize, optimize_model
from onnxmp.dump import dump_model
from onnxmp.errors import PassError
from onnxmp.ir import Model
from onnxmp.passes.qdq_tensorrt import upgrade_opset
from onnxmp.policy import load_policy, preset_names

DATA = REPO / "fixtures" / "data"
FLOAT8 = TensorProto.FLOAT8E4M3FN
QDQ = ("qdq-insertion{{activation_dtype={dtype},activation_symmetric=true,per_channel={per_channel},"
       "calibration_method=minmax{extra}}}")
GOLDEN_FIXTURES = ["digits_cnn", "cnn_bn_residual", "transformer_block", "matmul_add"]


def pipeline(dtype: str = "int8", extra: str = "", tail: str = "scale-folding,cleanup") -> str:
    qdq = QDQ.format(dtype=dtype, per_channel="true" if dtype == "int8" else "false", extra=extra)
    return f"cleanup,fold-constants,fold-batchnorm,fuse-matmul-add,{qdq},{tail}"


def quantize(model, tmp_path, dtype: str = "int8", passes: str | None = None, **kwargs):
    proto = onnx.load(str(MODELS / f"{model}.onnx")) if isinstance(model, str) else model
    data = DATA / "digits_calib" if model == "digits_cnn" else calibration_folder(tmp_path, proto)
    source = MODELS / f"{model}.onnx" if isinstance(model, str) else model
    return optimize_model(source, passes=passes or pipeline(dtype), calibration_data=data, calibration_cache=None,
                          verify_each=True, target="tensorrt", **kwargs)  # fmt: skip


def decisions(result) -> dict[str, dict]:
    return {d["node"]: d for d in result.report["decisions"] if d.get("pass") == "qdq-insertion" and "node" in d}


def basic_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime 1.31's CPU provider fuses float8 Q/DQ into QLinear* kernels it has no float8 type
    for (the session fails at ORT_ENABLE_EXTENDED and above): FP8 models run at the basic level."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def digits_top1(predict) -> tuple[float, np.ndarray]:
    held = np.load(DATA / "digits_heldout.npz")
    predicted = predict({"x": held["x"]})[0].argmax(1)
    return float(np.mean(predicted == held["labels"])), predicted


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


# ------------------------------------------------------------------ placement goldens
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("fixture", GOLDEN_FIXTURES)
def test_tensorrt_placement_golden(fixture, dtype, tmp_path, golden):
    folder = "qdq-insertion-tensorrt" if dtype == "int8" else "qdq-insertion-tensorrt-fp8"
    golden.check(f"{folder}/{fixture}.txt", dump_model(quantize(fixture, tmp_path, dtype).model))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("fixture", sorted(p.stem for p in MODELS.glob("*.onnx")))
def test_every_fixture_gives_a_valid_model(fixture, dtype, tmp_path):
    proto = quantize(fixture, tmp_path, dtype).model.to_proto()  # verify_each: checker full check + onnxruntime load
    onnx.checker.check_model(proto, full_check=True)
    basic_session(proto)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_weighted_inputs_quantized_symmetric_outputs_not(dtype, tmp_path):
    model = quantize("cnn_bn_residual", tmp_path, dtype).model
    want = np.int8 if dtype == "int8" else helper.tensor_dtype_to_np_dtype(FLOAT8)
    weighted = [n for n in model.graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm")]
    assert len(weighted) == 7
    for node in weighted:
        data_dq, weight_dq = producer(node.inputs[0]), producer(node.inputs[1])
        assert data_dq.op == weight_dq.op == "DequantizeLinear"
        assert producer(data_dq.inputs[0]).op == "QuantizeLinear"
        assert isinstance(weight_dq.inputs[0], gs.Constant) and weight_dq.inputs[0].values.dtype == want  # stored quantized
        for dq in (data_dq, weight_dq):
            assert not np.asarray(dq.inputs[2].values, np.float32).any()  # symmetric: zero point 0
        if len(node.inputs) > 2:
            assert isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.dtype == np.float32  # bias float
        assert all(user.op != "QuantizeLinear" for user in node.outputs[0].outputs)  # no output quantization
    axes = {n.name: producer(n.inputs[1]).attrs.get("axis") for n in weighted}
    if dtype == "int8":  # per output channel; ConvTranspose [C_in, C_out, kh, kw]: axis 1
        assert axes["up/bn/fold-batchnorm-convtranspose"] == 1 and axes["head/fc"] == 0
        assert {axes[n.name] for n in weighted if n.op == "Conv"} == {0}
    else:  # FP8 weights per tensor
        assert set(axes.values()) == {None}
        assert all(producer(n.inputs[1]).inputs[1].values.shape == () for n in weighted)
    ops = {n.op for n in model.graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")}
    assert ops == {"QuantizeLinear", "DequantizeLinear"}
    for node in model.graph.nodes:  # nothing TensorRT propagates through carries a Q/DQ of its own
        if node.op in ("Relu", "GlobalAveragePool", "Flatten", "MaxPool"):
            assert producer(node.inputs[0]).op != "DequantizeLinear"


def test_residual_add_quantizes_the_skip_input_only(tmp_path):
    result = quantize("cnn_bn_residual", tmp_path)
    graph = result.model.graph
    adds = [n for n in graph.nodes if n.op == "Add"]
    assert len(adds) == 2
    for add in adds:
        main, skip = (producer(t) for t in add.inputs)
        assert main.op == "Conv"  # the convolution branch stays float: TensorRT fuses the add into it
        assert skip.op == "DequantizeLinear"
        rule = decisions(result)[add.name]["rule"]
        assert rule.startswith("residual-add") and main.name in rule
    # the skip tensor's single Q/DQ pair is shared with the convolution that also reads it
    stem_dq = producer(adds[0].inputs[1])
    assert sorted(u.op for u in stem_dq.outputs[0].outputs) == ["Add", "Conv"]


def test_matmul_with_two_activations_quantizes_both(tmp_path):
    result = quantize("transformer_block", tmp_path)
    qk = next(n for n in result.model.graph.nodes if n.name == "attn/qk_matmul")
    assert [producer(t).op for t in qk.inputs] == ["DequantizeLinear", "DequantizeLinear"]
    assert all(producer(producer(t).inputs[0]).op == "QuantizeLinear" for t in qk.inputs)
    kept = quantize("transformer_block", tmp_path, passes=pipeline(extra=",quantize_activation_matmul=false"))
    assert decisions(kept)["attn/qk_matmul"]["rule"].startswith("activation-matmul")
    qk = next(n for n in kept.model.graph.nodes if n.name == "attn/qk_matmul")
    assert all(producer(t).op != "DequantizeLinear" for t in qk.inputs)


def _unusual_model() -> onnx.ModelProto:
    """A Conv whose weight is computed (w * 1 at run time), a grouped ConvTranspose, and a MatMul
    whose weight is 3-D."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 2, 2)).astype(np.float32), "wt"),  # [C_in, C_out/group, kh, kw]
        numpy_helper.from_array(rng.standard_normal((1, 12, 5)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Identity", ["w"], ["w_live"], name="weight_at_runtime"),
        helper.make_node("Conv", ["x", "w_live"], ["c"], name="dynamic_conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], name="grouped_deconv", group=2, strides=[2, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["r"], name="to_rows"),
        helper.make_node("MatMul", ["r", "w3"], ["y"], name="batched_weight"),
    ]
    inits.append(numpy_helper.from_array(np.array([0, -1, 12], np.int64), "shape"))
    graph = helper.make_graph(nodes, "unusual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 5])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_unusual_nodes(tmp_path):
    model = _unusual_model()
    result = quantize(model, tmp_path, passes=QDQ.format(dtype="int8", per_channel="true", extra=""))
    found = decisions(result)
    assert found["dynamic_conv"]["precision"] == "float32" and found["dynamic_conv"]["rule"].startswith("dynamic-weight")
    assert found["grouped_deconv"]["precision"] == found["batched_weight"]["precision"] == "int8"
    nodes = {n.name: n for n in result.model.graph.nodes}
    assert producer(nodes["dynamic_conv"].inputs[0]) is None  # its input stays the graph input, unquantized
    for name in ("grouped_deconv", "batched_weight"):  # axis 1 is not the whole output-channel axis: per tensor
        weight_dq = producer(nodes[name].inputs[1])
        assert "axis" not in weight_dq.attrs and weight_dq.inputs[1].values.shape == ()
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 2, 4, 4)).astype(np.float32)}
    want, got = session(model).run(None, feeds)[0], session(result.model.to_proto()).run(None, feeds)[0]
    assert np.abs(want - got).max() <= 0.05 * np.abs(want).max()


def test_keep_rules_apply(tmp_path):
    result = quantize("cnn_bn_residual", tmp_path, passes=pipeline(extra=",keep_op_types=[Gemm],keep_node_patterns=[block2]"))
    found = decisions(result)
    assert found["head/fc"] == {**found["head/fc"], "precision": "float32", "rule": "keep-op-type"}
    block2 = [d for name, d in found.items() if name.startswith("block2/")]
    assert block2 and all(d["precision"] == "float32" and d["rule"].startswith("keep-node-pattern") for d in block2)
    assert found["block1/add"]["precision"] == "int8"


def test_tensorrt_needs_symmetric_signed_and_fp8_needs_tensorrt(tmp_path):
    with pytest.raises(PassError, match="activation_dtype=int8"):
        quantize("digits_cnn", tmp_path, passes="qdq-insertion")
    with pytest.raises(PassError, match="fp8 is for target tensorrt"):
        optimize_model(MODELS / "digits_cnn.onnx", passes="qdq-insertion{activation_dtype=fp8}",
                       calibration_data=DATA / "digits_calib", calibration_cache=None)  # fmt: skip


# ------------------------------------------------------------------ FP8 and the opset it needs
def test_fp8_model_is_valid_and_runs_on_both_runtimes(tmp_path):
    result = quantize("digits_cnn", tmp_path, "fp8")
    proto = result.model.to_proto()
    assert proto.opset_import[0].version == 19 and proto.ir_version >= 9  # digits_cnn: opset 17, IR 8
    onnx.checker.check_model(proto, full_check=True)
    weights = [t for t in proto.graph.initializer if t.name.endswith("/quantized")]
    assert weights and all(t.data_type == FLOAT8 for t in weights)
    feeds = {"x": np.load(DATA / "digits_heldout.npz")["x"][:64]}
    reference = ReferenceEvaluator(proto).run(None, feeds)[0]
    onnxruntime = basic_session(proto).run(None, feeds)[0]
    # summation order differs, so a value on a rounding boundary of a later Q may move by one FP8 step
    assert np.array_equal(reference.argmax(1), onnxruntime.argmax(1))
    assert np.abs(reference - onnxruntime).max() <= 0.02 * np.abs(reference).max()


def test_opset_upgrade_is_exact_when_no_op_changed():
    model = Model.load(MODELS / "digits_cnn.onnx")
    before = dump_model(model).splitlines()
    upgrade_opset(model, 19)
    after = dump_model(model).splitlines()
    assert after[0] == "model ir=9 opset ai.onnx=19" and after[1:] == before[1:]


def test_opset_upgrade_by_the_version_converter_keeps_outputs():
    path = MODELS / "transformer_block.onnx"  # ReduceMean, Reshape, Shape, Constant changed by opset 19
    model = Model.load(path)
    upgrade_opset(model, 19)
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 19
    assert any(n.op_type == "ReduceMean" and len(n.input) == 2 for n in proto.graph.node)  # axes became an input
    original = onnx.load(str(path))
    feeds = {}
    for info in original.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in info.type.tensor_type.shape.dim]
        feeds[info.name] = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    for want, got in zip(session(original).run(None, feeds), session(proto).run(None, feeds)):
        assert np.array_equal(want, got)


# ------------------------------------------------------------------ accuracy and presets
def test_digits_int8_and_fp8_keep_top1_within_half_a_point(tmp_path):
    fp32, want = digits_top1(lambda feeds: session(onnx.load(str(MODELS / "digits_cnn.onnx"))).run(None, feeds))
    int8_proto = quantize("digits_cnn", tmp_path).model.to_proto()
    int8, got = digits_top1(lambda feeds: session(int8_proto).run(None, feeds))
    assert abs(fp32 - int8) <= 0.005 and np.mean(want == got) >= 0.99
    fp8_proto = quantize("digits_cnn", tmp_path, "fp8").model.to_proto()
    fp8, got = digits_top1(lambda feeds: ReferenceEvaluator(fp8_proto).run(None, feeds))
    assert abs(fp32 - fp8) <= 0.005 and np.mean(want == got) >= 0.99


@pytest.mark.parametrize("preset", ["int8-tensorrt", "fp8-tensorrt"])
def test_presets_are_listed_validate_and_run(preset, tmp_path):
    assert preset in preset_names()
    policy = load_policy(preset)  # JSON Schema validation of the preset
    assert policy.target == "tensorrt"
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    optimize(MODELS / "digits_cnn.onnx", out, preset, report_path=report, calibration_data=DATA / "digits_calib",
             calibration_cache=None)  # fmt: skip
    data = json.loads(report.read_text())
    assert data["validation"]["passed"]
    quantized = [d for d in data["decisions"] if d.get("pass") == "qdq-insertion" and d.get("rule") == "quantized"]
    assert len(quantized) == 4  # three Conv and the Gemm
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


# ------------------------------------------------------------------ mixed with FP16
def test_int8_with_fp16_elsewhere_is_valid_and_accurate(tmp_path):
    passes = pipeline(tail="scale-folding,precision{dtype=fp16},cast-elimination,cleanup")
    model = quantize("digits_cnn", tmp_path, passes=passes).model
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    convs = [n for n in model.graph.nodes if n.op in ("Conv", "Gemm")]
    assert all(n.outputs[0].dtype == np.float16 for n in convs)  # the rest of the graph is FP16
    for node in model.graph.nodes:  # opset 17: Q/DQ stay float32, scale and data of one type
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            assert node.inputs[1].values.dtype == np.float32
    fp32, want = digits_top1(lambda feeds: session(onnx.load(str(MODELS / "digits_cnn.onnx"))).run(None, feeds))
    mixed, got = digits_top1(lambda feeds: session(proto).run(None, feeds))
    assert abs(fp32 - mixed) <= 0.005 and np.mean(want == got) >= 0.99


def test_fp8_with_fp16_elsewhere_is_valid_and_accurate(tmp_path):
    """At opset 19 the precision pass types DequantizeLinear's scale float16, so the DQ feeds the
    FP16 convolution directly. onnxruntime 1.31's CPU provider computes this graph wrongly even at
    the basic optimization level; onnx's reference evaluator runs it."""
    passes = pipeline("fp8", tail="scale-folding,precision{dtype=fp16},cast-elimination,cleanup")
    model = quantize("digits_cnn", tmp_path, "fp8", passes=passes).model
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    for node in model.graph.nodes:
        if node.op == "DequantizeLinear":
            assert node.inputs[1].values.dtype == node.outputs[0].dtype  # scale typed as the output
    fp32, want = digits_top1(lambda feeds: session(onnx.load(str(MODELS / "digits_cnn.onnx"))).run(None, feeds))
    mixed, got = digits_top1(lambda feeds: ReferenceEvaluator(proto).run(None, feeds))
    assert abs(fp32 - mixed) <= 0.005 and np.mean(want == got) >= 0.99
