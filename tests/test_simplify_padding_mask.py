"""simplify-padding-mask: transformers' vmapped padding mask becomes one Where, exactly; masks
that are not key-padding masks (causal, sliding window, arithmetic on the mask's values) stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import MODELS
from helpers import session
from onnxmp.api import op_histogram, optimize_model
from onnxmp.dump import dump_model
from onnxmp.ir import Model

FLOAT_MIN = float(np.finfo(np.float32).min)


def simplify(model) -> tuple:
    result = optimize_model(model, passes="simplify-padding-mask", verify_each=True)
    return result.model, [d for d in result.report["decisions"] if d.get("op") == "mask"]


def padding_masks(rng: np.random.Generator, batch: int, sequence: int) -> np.ndarray:
    """Random masks with a left-padded, a right-padded and a fully masked row."""
    masks = rng.integers(0, 2, size=(batch, sequence)).astype(np.int64)
    masks[0] = np.arange(sequence) >= sequence // 3
    if batch > 1:
        masks[1] = np.arange(sequence) < sequence - 1
    if batch > 2:
        masks[2] = 0
    return masks


def assert_same_outputs(original, candidate: onnx.ModelProto, feeds_for) -> None:
    first, second = session(original), session(candidate)
    rng = np.random.default_rng(0)
    for batch, sequence in [(1, 1), (3, 7), (4, 33)]:
        feeds = feeds_for(rng, batch, sequence)
        for want, got in zip(first.run(None, feeds), second.run(None, feeds)):
            assert want.shape == got.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the torch export
def bert_feeds(rng: np.random.Generator, batch: int, sequence: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(0, 100, size=(batch, sequence)).astype(np.int64),
        "attention_mask": padding_masks(rng, batch, sequence),
        "token_type_ids": rng.integers(0, 2, size=(batch, sequence)).astype(np.int64),
    }


def test_tiny_bert_mask_becomes_one_where_with_the_same_outputs():
    model, decisions = simplify(MODELS / "tiny_bert.onnx")
    before, after = op_histogram(Model.load(MODELS / "tiny_bert.onnx")), op_histogram(model)
    assert before["Range"] == 3 and "Range" not in after
    assert sum(before.values()) - sum(after.values()) >= 70
    assert len(decisions) == 1 and "key padding mask of 'attention_mask'" in decisions[0]["rule"]
    assert_same_outputs(str(MODELS / "tiny_bert.onnx"), model.to_proto(), bert_feeds)


def test_tiny_bert_fully_masked_rows_are_exact():
    """A row with no key to attend to gives the same (uniform) attention as the original."""
    model, _ = simplify(MODELS / "tiny_bert.onnx")
    feeds = bert_feeds(np.random.default_rng(3), 2, 6)
    feeds["attention_mask"][:] = 0
    for want, got in zip(session(str(MODELS / "tiny_bert.onnx")).run(None, feeds), session(model.to_proto()).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fp16_preset_runs_it_before_fusing_attention():
    result = optimize_model(MODELS / "tiny_bert.onnx", policy="fp16")
    passes = [record["name"] for record in result.report["passes"]]
    assert passes.index("simplify-padding-mask") < passes.index("fuse-attention")
    histogram = op_histogram(result.model)
    assert "Range" not in histogram and histogram["com.microsoft.Attention"] == 2


# ------------------------------------------------------------------ hand-built masks
def mask_model(kind: str, opset: int = 17) -> onnx.ModelProto:
    """scores = x @ x^T per batch, plus an additive mask built from ``attention_mask`` like
    transformers' vmapped functions (Range over the keys, Gather of the flattened mask, And):

    - ``padding``: where(mask[b, j], 0, min);
    - ``causal``: also j <= i;
    - ``window``: also |i - j| < 100 (a bidirectional sliding window);
    - ``arithmetic``: (1 - mask[b, j]) * min, through a Range-indexed Gather (mask values of 2 differ);
    - ``data``: the padding mask, but the masked value is min(x): it depends on two inputs.
    """
    nodes, inits = [], []

    def const(name, value):
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    shape = node("Shape", ["attention_mask"], "shape")
    batch = node("Gather", [shape, const("zero", np.array(0, np.int64))], "batch", axis=0)
    seq = node("Gather", [shape, const("one", np.array(1, np.int64))], "seq", axis=0)
    keys = node("Range", [const("start", np.array(0, np.int64)), seq, const("step", np.array(1, np.int64))], "keys")
    batches = node("Range", ["start", batch, "step"], "batches")
    offsets = node("Mul", [node("Unsqueeze", [batches, const("ax1", np.array([1], np.int64))], "b_col"), seq], "offsets")
    index = node("Add", [offsets, node("Unsqueeze", [keys, const("ax0", np.array([0], np.int64))], "k_row")], "index")
    flat = node("Reshape", ["attention_mask", const("flat_shape", np.array([-1], np.int64))], "flat")
    gathered = node("Gather", [flat, index], "gathered", axis=0)  # [B, S] = mask
    queries_col = node("Unsqueeze", [keys, "ax1"], "queries_col")  # [S, 1] query index
    if kind == "arithmetic":
        as_float = node("Cast", [gathered], "as_float", to=TensorProto.FLOAT)
        inverted = node("Sub", [const("f_one", np.array(1.0, np.float32)), as_float], "inverted")
        bias = node("Mul", [inverted, const("f_min", np.array(FLOAT_MIN, np.float32))], "bias")
        mask = node("Unsqueeze", [bias, const("ax12", np.array([1, 2], np.int64))], "mask")
    else:
        allowed = node("Unsqueeze", [node("Cast", [gathered], "as_bool", to=TensorProto.BOOL),
                                     const("ax12", np.array([1, 2], np.int64))], "allowed")  # [B, 1, 1, S]
        if kind in ("causal", "window"):
            keys_row = node("Unsqueeze", [keys, "ax0"], "keys_row")  # [1, S] key index
        if kind == "causal":
            extra = node("LessOrEqual", [keys_row, queries_col], "causal")
            allowed = node("And", [allowed, extra], "allowed_and")
        elif kind == "window":
            distance = node("Abs", [node("Sub", [keys_row, queries_col], "diff")], "distance")
            extra = node("Less", [distance, const("width", np.array(100, np.int64))], "near")
            allowed = node("And", [allowed, extra], "allowed_and")
        else:
            always = node("GreaterOrEqual", [queries_col, "start"], "always")  # vacuous, as transformers writes it
            allowed = node("And", [allowed, always], "allowed_and")
        masked = const("f_min", np.array(FLOAT_MIN, np.float32))
        if kind == "data":
            masked = node("ReduceMin", ["x"], "x_min", keepdims=0)
        mask = node("Where", [allowed, const("f_zero", np.array(0.0, np.float32)), masked], "mask")
    scores = node("MatMul", ["x", node("Transpose", ["x"], "x_t", perm=[0, 2, 1])], "scores")
    scores = node("Unsqueeze", [scores, "ax1"], "scores4")
    node("Softmax", [node("Add", [scores, mask], "masked")], "probs", axis=-1)
    graph = helper.make_graph(
        nodes, kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 1, "sequence", "sequence"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def hand_feeds(rng: np.random.Generator, batch: int, sequence: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((batch, sequence, 8)).astype(np.float32),
            "attention_mask": padding_masks(rng, batch, sequence)}


@pytest.mark.parametrize("opset", [13, 17])
def test_padding_mask_is_simplified_exactly(opset):
    original = mask_model("padding", opset)
    model, decisions = simplify(original)
    assert "Range" not in op_histogram(model) and op_histogram(model)["Where"] == 1
    assert "key padding mask" in decisions[0]["rule"]
    assert_same_outputs(original, model.to_proto(), hand_feeds)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("causal", "it is not one value where the mask is set"),
        ("window", "sequence 300 it is not one value where the mask is set"),
        ("arithmetic", "it is not one value where the mask is set"),
    ],
)
def test_other_masks_are_kept_with_the_reason(kind, reason):
    original = mask_model(kind)
    model, decisions = simplify(original)
    assert [n.name for n in model.graph.nodes] == [n.name for n in original.graph.node]
    assert len(decisions) == 1 and decisions[0]["rule"].startswith("simplify-padding-mask: kept")
    assert reason in decisions[0]["rule"]


def test_mask_reading_other_values_is_not_a_candidate():
    """A mask that depends on the values of a second input is no padding mask: no decision, no change."""
    original = mask_model("data")
    model, decisions = simplify(original)
    assert decisions == []
    assert [n.name for n in model.graph.nodes] == [n.name for n in original.graph.node]
