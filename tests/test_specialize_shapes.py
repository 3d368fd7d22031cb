"""specialize-shapes: fixed input shapes, folded shape computations, exact outputs, clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from helpers import session
from onnxmp.api import op_histogram, optimize_model
from onnxmp.cli import main
from onnxmp.dump import dump_model
from onnxmp.errors import PolicyError
from onnxmp.ir import Model
from onnxmp.passes.specialize_shapes import specialized_passes, specialized_pipeline, specialized_policy
from onnxmp.placement import cuda_graph_blockers
from onnxmp.policy import load_policy

SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Range", "Concat", "Unsqueeze", "Slice", "Equal"}


def specialize(fixture: str, options: str = "") -> Model:
    passes = "specialize-shapes" + (f"{{{options}}}" if options else "")
    return optimize_model(MODELS / f"{fixture}.onnx", passes=passes, verify_each=True).model


def feeds_for(model: onnx.ModelProto | str, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic inputs: N(0, 1) floats; token ids in [0, 100), masks all ones, token types zeros."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session(model).get_inputs():
        shape = [d if isinstance(d, int) else (batch if axis == 0 else sequence) for axis, d in enumerate(spec.shape)]
        if spec.type == "tensor(float)":
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in spec.name:
            feeds[spec.name] = np.ones(shape, dtype=np.int64)
        elif "type" in spec.name:
            feeds[spec.name] = np.zeros(shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.integers(0, 100, size=shape).astype(np.int64)
    return feeds


def assert_exact(original: str, candidate: onnx.ModelProto, batch: int, sequence: int = 1) -> None:
    first, second = session(original), session(candidate)
    for seed in (0, 1):
        feeds = feeds_for(original, batch, sequence, seed)
        for want, got in zip(first.run(None, feeds), second.run(None, feeds)):
            assert want.shape == got.shape
            np.testing.assert_array_equal(want, got)


# ------------------------------------------------------------------ goldens and numerics
@pytest.mark.parametrize("fixture", ["constant_subgraph", "transformer_block_static"])
def test_golden_static_models(fixture, golden):
    """Without options the pass specializes to the shapes the model already fixes."""
    golden.check(f"specialize-shapes/{fixture}.txt", dump_model(specialize(fixture)))


def test_golden_fixed_batch(golden):
    model = specialize("transformer_block", "dims=[N=2]")
    golden.check("specialize-shapes/transformer_block-N2.txt", dump_model(model))
    assert [t.shape for t in model.graph.inputs] == [[2, 16, 64]]
    assert [t.shape for t in model.graph.outputs] == [[2, 16, 64]]
    assert "Shape" not in op_histogram(model)
    assert_exact(str(MODELS / "transformer_block.onnx"), model.to_proto(), batch=2)


@pytest.mark.parametrize(
    "fixture, options, batch, sequence",
    [
        ("tiny_bert", "dims=[batch=3,sequence=8]", 3, 8),
        ("tiny_bert", "shapes=[input_ids=2x5,attention_mask=2x5,token_type_ids=2x5]", 2, 5),
        ("tiny_vit", "dims=[batch=3]", 3, 1),
    ],
)
def test_torch_exports_lose_every_shape_computation(fixture, options, batch, sequence):
    path = MODELS / f"{fixture}.onnx"
    before = op_histogram(Model.load(path))
    model = specialize(fixture, options)
    after = op_histogram(model)
    assert before.get("Shape", 0) > 0 and "Shape" not in after
    assert sum(after.get(op, 0) for op in SHAPE_OPS) < sum(before.get(op, 0) for op in SHAPE_OPS) / 4
    proto = model.to_proto()
    assert cuda_graph_blockers(proto) == []  # every node has a CUDA kernel: capture can be tried
    assert_exact(str(path), proto, batch, sequence)


def test_remaining_shape_nodes_are_reported():
    """Fixing nothing of a dynamic model keeps its Shape node, and the report says why."""
    result = optimize_model(MODELS / "transformer_block.onnx", passes="specialize-shapes")
    assert op_histogram(result.model).get("Shape") == 1
    (kept,) = [d for d in result.report["decisions"] if d.get("op") == "Shape"]
    assert "is not static" in kept["rule"] and "'N'" in kept["rule"]
    assert [t.shape for t in result.model.graph.inputs] == [["N", 16, 64]]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "options, message",
    [
        ("dims=[batch=2]", "dims: 'batch' is not a symbolic dimension of any graph input; the inputs' symbolic dimensions are: N"),
        ("shapes=[y=2x16x64]", "shapes: 'y' is not a graph input; the inputs are: x"),
        ("shapes=[x=2x16x32]", "shapes: input 'x': dimension 2 is fixed to 64 in the model, the policy says 32"),
        ("shapes=[x=2x16]", "shapes: input 'x' has rank 3 (Nx16x64), the policy gives rank 2 (2x16)"),
        ("dims=[N=4],shapes=[x=2x16x64]", "shapes: input 'x': dimension 0 ('N') is 2, but dims gives N=4"),
    ],
)
def test_contradictions_name_the_option(options, message):
    with pytest.raises(PolicyError) as info:
        specialize("transformer_block", options)
    assert str(info.value) == f"specialize-shapes: {message}"


def test_two_inputs_that_disagree_on_a_dimension():
    with pytest.raises(PolicyError, match=r"input 'x3d': dimension 0 \('N'\) is 3, but another input has N=2"):
        specialize("matmul_add", "shapes=[x=2x16,x3d=3x4x16]")


@pytest.mark.parametrize(
    "options, message",
    [
        ("dims=[N]", "options.dims: 'N' is not NAME=VALUE with a positive integer VALUE"),
        ("dims=[N=0]", "options.dims: 'N=0' is not NAME=VALUE"),
        ("dims=[N=2,N=3]", "options.dims: dimension 'N' is given twice, as 2 and 3"),
        ("shapes=[x=2xAx3]", "options.shapes: 'x=2xAx3' is not INPUT=D0xD1x..."),
    ],
)
def test_bad_option_text_is_a_policy_error(options, message):
    with pytest.raises(PolicyError, match=f"pipeline 'specialize-shapes{{.*}}': \\$.passes\\[0\\].{message}"):
        specialize("transformer_block", options)


# ------------------------------------------------------------------ adding the pass to pipelines
def test_the_pass_goes_after_the_leading_cleanups():
    specs = specialized_passes(load_policy("fp16").data["passes"], {"batch": 8}, {"x": [8, 3]})
    assert [s["name"] for s in specs[:4]] == ["cleanup", "remove-identity", "specialize-shapes", "fold-constants"]
    assert specs[2]["options"] == {"dims": ["batch=8"], "shapes": ["x=8x3"]}
    again = specialized_passes(specs, {"batch": 16, "sequence": 4}, {})
    assert [s["name"] for s in again].count("specialize-shapes") == 1
    assert again[2]["options"]["dims"] == ["batch=16", "sequence=4"]  # the new value wins
    policy = specialized_policy(load_policy("fp32"), {"N": 2}, {})
    assert policy.name == "fp32+specialize-shapes" and "specialize-shapes{dims=[N=2]}" in str(policy.pipeline())
    assert specialized_pipeline("fold-constants,cleanup", {"N": 2}, {}) == "specialize-shapes{dims=[N=2]},fold-constants,cleanup"


def test_cli_fix_dim(tmp_path):
    out = tmp_path / "static.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["optimize", str(MODELS / "transformer_block.onnx"), str(out), "--fix-dim", "N=2", "-q"])
    assert result.exit_code == 0, result.output
    model = Model.load(out)
    assert [t.shape for t in model.graph.inputs] == [[2, 16, 64]] and "Shape" not in op_histogram(model)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["pipeline"].startswith("cleanup,remove-identity,specialize-shapes{dims=[N=2]},fold-constants")
    assert report["policy"]["name"] == "fp32+specialize-shapes"
    text = runner.invoke(main, ["optimize", str(MODELS / "transformer_block.onnx"), str(tmp_path / "t.onnx"),
                                "--passes", "cleanup", "--fix-shape", "x=2x16x64", "-q"])
    assert text.exit_code == 0, text.output
    assert json.loads((tmp_path / "t.report.json").read_text())["pipeline"] == "cleanup,specialize-shapes{shapes=[x=2x16x64]}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fix-dim", "N"], "error: --fix-dim: 'N' is not NAME=VALUE"),
        (["--fix-dim", "batch=2"], "error: specialize-shapes: dims: 'batch' is not a symbolic dimension"),
        (["--fix-shape", "x=2x16x65"], "error: specialize-shapes: shapes: input 'x': dimension 2 is fixed to 64"),
    ],
)
def test_cli_fix_dim_errors(tmp_path, args, message):
    out = tmp_path / "static.onnx"
    result = CliRunner().invoke(main, ["optimize", str(MODELS / "transformer_block.onnx"), str(out), *args, "-q"])
    assert result.exit_code == 1 and result.output.startswith(message) and result.output.count("\n") == 1
    assert not out.exists()
