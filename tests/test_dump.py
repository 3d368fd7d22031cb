"""The canonical text form: stable, complete, and showing subgraphs."""

from __future__ import annotations

from conftest import MODELS
from onnxmp.dump import dump_model
from onnxmp.ir import Model


def test_dump_is_stable_across_loads():
    assert dump_model(Model.load(MODELS / "transformer_block.onnx")) == dump_model(
        Model.load(MODELS / "transformer_block.onnx")
    )


def test_dump_lines():
    text = dump_model(Model.load(MODELS / "cnn_bn_residual.onnx"))
    lines = text.splitlines()
    assert lines[0] == "model ir=10 opset ai.onnx=17"
    assert "  input  x: float32[N,3,32,32]" in lines
    assert any(line.startswith("  init   ") and " #" in line for line in lines)
    assert any(line.startswith("  node   ") and ": Conv(x, " in line and "pads=[1,1,1,1]" in line for line in lines)
    assert lines[-1] == "  output logits: float32[N,10]"


def test_dump_shows_subgraphs_indented():
    text = dump_model(Model.load(MODELS / "if_model.onnx"))
    assert "@graph" in text
    assert "\n    graph then_branch\n" in text and "\n    graph else_branch\n" in text
    assert "\n      node   if/then/relu: Relu(" in text


def test_cast_targets_are_named():
    assert "{to=float64}" in dump_model(Model.load(MODELS / "cast_chain.onnx"))
