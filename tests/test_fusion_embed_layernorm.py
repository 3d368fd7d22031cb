"""fuse-embed-layernorm: BERT's and DistilBERT's embeddings + LayerNorm become one
EmbedLayerNormalization with the same outputs; position lookups that are not 0 .. S-1 stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS
from helpers import session
from onnxmp.api import op_histogram, optimize_model
from onnxmp.ir import Model
from onnxmp.placement import cuda_graph_blockers

FUSED = "com.microsoft.EmbedLayerNormalization"
HIDDEN = 16


def fuse(model, passes="fuse-layernorm,fuse-embed-layernorm,cleanup", target="cpu") -> Model:
    return optimize_model(model, passes=passes, target=target, verify_each=True).model


def token_feeds(model, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session(model).get_inputs():
        if "mask" in spec.name:
            feeds[spec.name] = (rng.random((batch, sequence)) < 0.8).astype(np.int64)
        elif "type" in spec.name:
            feeds[spec.name] = rng.integers(0, 2, size=(batch, sequence)).astype(np.int64)
        else:
            feeds[spec.name] = rng.integers(0, 50, size=(batch, sequence)).astype(np.int64)
    return feeds


def assert_close(original, candidate: onnx.ModelProto, sizes=((1, 1), (3, 7), (2, 16))) -> None:
    for batch, sequence in sizes:
        feeds = token_feeds(original, batch, sequence)
        for want, got in zip(session(original).run(None, feeds), session(candidate).run(None, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the torch export
def test_tiny_bert_embeddings_fuse_with_the_same_outputs():
    model = fuse(MODELS / "tiny_bert.onnx")
    histogram = op_histogram(model)
    assert histogram[FUSED] == 1
    assert "Slice" not in histogram  # the position ids' slice went with the lookups
    node = next(n for n in model.graph.nodes if n.op == "EmbedLayerNormalization")
    assert [t.name for t in node.inputs[2:5]] == [
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    ]
    assert_close(str(MODELS / "tiny_bert.onnx"), model.to_proto())


def test_tiny_bert_static_shapes_fuse_too():
    """After specialize-shapes the position ids are a constant [1, S] range."""
    model = fuse(MODELS / "tiny_bert.onnx", "specialize-shapes{dims=[batch=2,sequence=9]},fuse-layernorm,fuse-embed-layernorm,cleanup")
    assert op_histogram(model)[FUSED] == 1
    assert_close(str(MODELS / "tiny_bert.onnx"), model.to_proto(), sizes=((2, 9),))


def test_tensorrt_target_is_left_alone():
    model = fuse(MODELS / "tiny_bert.onnx", target="tensorrt")
    assert FUSED not in op_histogram(model)


def test_fp16_preset_fuses_embeddings_and_stays_close():
    result = optimize_model(MODELS / "tiny_bert.onnx", policy="fp16")
    assert op_histogram(result.model)[FUSED] == 1
    feeds = token_feeds(str(MODELS / "tiny_bert.onnx"), 2, 12)
    want = session(str(MODELS / "tiny_bert.onnx")).run(None, feeds)
    got = session(result.model.to_proto()).run(None, feeds)
    for a, b in zip(want, got):
        assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-2


# ------------------------------------------------------------------ hand-built embeddings
def embeddings_model(position_start: int = 0, constant_positions: int | None = None,
                     fixed_end: int | None = None) -> onnx.ModelProto:
    """DistilBERT-style: LayerNorm(word[ids] + position[buffer[:, :S]]), buffer = start .. start+31."""
    rng = np.random.default_rng(0)
    inits = {
        "word": rng.standard_normal((50, HIDDEN)).astype(np.float32),
        "position": rng.standard_normal((40, HIDDEN)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32),
        "beta": rng.standard_normal(HIDDEN).astype(np.float32),
        "buffer": (np.arange(32, dtype=np.int64) + position_start)[None, :],
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64), "one_scalar": np.array(1, np.int64),
    }
    if fixed_end is not None:
        inits["fixed_end"] = np.array([fixed_end], np.int64)
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one_scalar"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["seq", "zero"], ["end"]),
        helper.make_node("Slice", ["buffer", "zero", "end" if fixed_end is None else "fixed_end", "one", "one"], ["positions"]),
    ]
    if constant_positions is not None:
        inits["positions"] = np.arange(constant_positions, dtype=np.int64)[None, :]
        nodes = []
    nodes += [
        helper.make_node("Gather", ["word", "input_ids"], ["w"]),
        helper.make_node("Gather", ["position", "positions"], ["p"]),
        helper.make_node("Add", ["p", "w"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], epsilon=1e-6),
    ]
    sequence = constant_positions if constant_positions is not None else "sequence"
    graph = helper.make_graph(
        nodes, "embeddings",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", sequence])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sequence, HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_two_lookups_fuse():
    original = embeddings_model()
    model = fuse(original)
    assert op_histogram(model)[FUSED] == 1
    assert_close(original, model.to_proto())


def test_constant_positions_fuse_when_they_span_the_sequence():
    original = embeddings_model(constant_positions=7)
    assert op_histogram(fuse(original))[FUSED] == 1
    assert_close(original, fuse(original).to_proto(), sizes=((3, 7),))


def test_positions_not_starting_at_zero_stay():
    """RoBERTa-like offsets (positions from 2) are not what the fused kernel computes."""
    original = embeddings_model(position_start=2)
    assert FUSED not in op_histogram(fuse(original))


def test_positions_of_a_fixed_length_stay():
    """Positions sliced to a fixed 5 rather than to the ids' sequence length do not fuse."""
    original = embeddings_model(fixed_end=5)
    assert FUSED not in op_histogram(fuse(original))


def test_static_fused_model_can_be_captured_as_a_cuda_graph():
    """The fused node's int32 ids and mask_index are fixed by its schema, not a kernel choice:
    they do not block CUDA graph capture."""
    model = fuse(MODELS / "tiny_bert.onnx", "specialize-shapes{dims=[batch=2,sequence=9]},fuse-layernorm,fuse-embed-layernorm,cleanup",
                 target="cuda")
    assert op_histogram(model)[FUSED] == 1
    assert cuda_graph_blockers(model.to_proto()) == []
