"""Every FP32-preserving pass: golden text dumps on its fixtures, and outputs kept within 1e-5."""

from __future__ import annotations

import pytest

from conftest import MODELS
from helpers import assert_same_outputs
from onnxmp.api import op_histogram, optimize_model
from onnxmp.dump import dump_model
from onnxmp.ir import Model
from onnxmp.pass_manager import registered_passes

FIXTURES = sorted(p.stem for p in MODELS.glob("*.onnx"))
FP32_PASSES = sorted(name for name, cls in registered_passes().items() if cls.preserves_fp32)

# The fixtures each pass is meant for; their dumps after that pass alone are golden files.
GOLDEN_CASES = {
    "cleanup": ["dead_code", "if_model"],
    "remove-identity": ["identity_chain", "if_model"],
    "eliminate-common-subexpressions": ["tiny_bert", "rowwise_gemm"],
    "fold-constants": ["constant_subgraph", "transformer_block", "transformer_block_static", "qdq_model"],
    "cast-elimination": ["cast_chain", "if_model"],
    "fold-batchnorm": ["cnn_bn_residual", "batchnorm_gemm"],
    "fuse-matmul-add": ["matmul_add", "transformer_block"],
    "fuse-attention": ["transformer_block"],
    "fuse-embed-layernorm": ["tiny_bert"],
    "fuse-layernorm": ["transformer_block"],
    "fuse-rowwise-gemm": ["rowwise_gemm"],
    "fuse-gelu": ["transformer_block", "tiny_vit"],
    "fuse-skip-layernorm": ["tiny_transformer"],
    "specialize-shapes": ["constant_subgraph", "transformer_block_static"],
    "simplify-padding-mask": ["tiny_bert"],
}
RANDOM_OUTPUTS = ("noisy",)  # outputs of RandomNormal nodes differ run to run


def run_pass(name: str, fixture: str) -> Model:
    return optimize_model(MODELS / f"{fixture}.onnx", passes=name, verify_each=True).model


def test_every_fp32_pass_has_golden_cases():
    assert set(GOLDEN_CASES) == set(FP32_PASSES)


@pytest.mark.parametrize(
    "pass_name,fixture", [(p, f) for p, fixtures in GOLDEN_CASES.items() for f in fixtures]
)
def test_pass_golden(pass_name, fixture, golden):
    golden.check(f"{pass_name}/{fixture}.txt", dump_model(run_pass(pass_name, fixture)))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fp32_preset_golden(fixture, golden):
    model = optimize_model(MODELS / f"{fixture}.onnx", "fp32", verify_each=True).model
    golden.check(f"fp32/{fixture}.txt", dump_model(model))


@pytest.mark.parametrize("pass_name", FP32_PASSES + ["fp32"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_outputs_preserved(pass_name, fixture):
    path = MODELS / f"{fixture}.onnx"
    if pass_name == "fp32":
        model = optimize_model(path, "fp32", verify_each=True).model
    else:
        model = run_pass(pass_name, fixture)
    assert_same_outputs(str(path), model.to_proto(), rtol=1e-5, skip=RANDOM_OUTPUTS)


# ------------------------------------------------------------- what each pass must do
def ops(model: Model) -> dict[str, int]:
    return op_histogram(model)


def test_cleanup_removes_dead_nodes_and_unused_initializers():
    before = Model.load(MODELS / "dead_code.onnx")
    after = run_pass("cleanup", "dead_code")
    assert after.node_count() < before.node_count()
    assert "unused/weight" not in dump_model(after)


def test_identity_removal_keeps_output_names():
    after = run_pass("remove-identity", "identity_chain")
    assert [t.name for t in after.graph.outputs] == ["y"]
    assert ops(after).get("Identity", 0) <= 1  # only one between an input and an initializer may stay


def test_constant_folding_keeps_random_and_folds_shapes():
    after = run_pass("fold-constants", "constant_subgraph")
    histogram = ops(after)
    assert histogram.get("RandomNormal") == 1
    assert "Shape" not in histogram and "ConstantOfShape" not in histogram


def test_constant_folding_keeps_quantized_weights_quantized():
    after = run_pass("fold-constants", "qdq_model")
    histogram = ops(after)
    before = ops(Model.load(MODELS / "qdq_model.onnx"))
    assert histogram["DequantizeLinear"] == before["DequantizeLinear"]
    assert histogram["QuantizeLinear"] == before["QuantizeLinear"]
    int8_weights = [
        t for t in after.graph.tensors().values() if t.__class__.__name__ == "Constant" and str(t.dtype) == "int8"
    ]
    assert len(int8_weights) >= 2


def test_dynamic_shape_chain_is_not_folded():
    after = run_pass("fold-constants", "transformer_block")
    assert ops(after).get("Shape") == 1  # the batch dimension is only known at run time


def test_static_shape_chain_is_folded():
    after = run_pass("fold-constants", "transformer_block_static")
    histogram = ops(after)
    assert "Shape" not in histogram and "Concat" not in histogram and "Gather" not in histogram


def test_cast_elimination():
    after = run_pass("cast-elimination", "cast_chain")
    casts = [n for n in after.graph.nodes if n.op == "Cast"]
    targets = sorted(int(n.attrs["to"]) for n in casts)
    # Kept: the lossy f32->f16->f32 round trip (2 casts) and the collapsed i32->f32 cast.
    assert targets == [1, 1, 10]


def test_fold_batchnorm_leaves_shared_conv_alone():
    after = run_pass("fold-batchnorm", "batchnorm_gemm")
    assert ops(after).get("BatchNormalization") == 1  # the Conv with two consumers keeps its BN
    assert "BatchNormalization" not in ops(run_pass("fold-batchnorm", "cnn_bn_residual"))


def test_fuse_matmul_add_only_where_gemm_is_valid():
    after = run_pass("fuse-matmul-add", "matmul_add")
    histogram = ops(after)
    assert histogram.get("Gemm") == 2  # the 2-D one and the one with the bias on the left
    assert histogram.get("MatMul") == 2  # rank 3, and the MatMul with a second consumer
    assert all(n.provenance == "fuse-matmul-add" for n in after.graph.nodes if n.op == "Gemm")
