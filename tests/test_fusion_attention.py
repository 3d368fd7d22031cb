"""fuse-attention: goldens on a hand-built BERT-style block, numerics on the torch exports, and
attentions that match only partly staying exactly as they were."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS
from helpers import max_relative_error, session
from onnxmp.api import op_histogram, optimize_model
from onnxmp.dump import dump_model
from onnxmp.ir import Model, provenance
from onnxmp.passes.fusion_attention import explain_attention
from onnxmp.shapes import infer_shapes

HIDDEN, HEADS, HEAD_DIM = 16, 2, 8
ATTENTION = "com.microsoft.Attention"


def bert_block(
    batch="batch",
    mask_batch="batch",
    softmax_axis=-1,
    perm=(0, 2, 1, 3),
    probs_output=False,
    scale=1.0 / math.sqrt(HEAD_DIM),
    torch_sdpa=False,
    mask_heads=False,
) -> onnx.ModelProto:
    """A BERT-style self-attention: Q/K/V Linear, Reshape [0, 0, N, D] + Transpose, K^T as a second
    Transpose, scores / sqrt(D) (as Div), the (1 - mask) * -10000 [B, 1, 1, S] padding mask,
    Softmax, probs @ V, Transpose + Reshape [0, 0, hidden]. The keywords make variants.

    ``torch_sdpa`` writes what torch 2.13 exports for scaled_dot_product_attention with a boolean
    mask: Where(mask, 0, -inf), the Where(IsNaN(P), 0, P) guard after the softmax, and a merge
    Reshape whose batch size is read off the query heads with Shape. ``mask_heads`` expands the
    mask over the heads first."""
    rng = np.random.default_rng(7)
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(prefix):
        w = init(f"{prefix}.weight", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.3)
        b = init(f"{prefix}.bias", rng.standard_normal(HIDDEN).astype(np.float32) * 0.1)
        return node("Add", [node("MatMul", ["x", w], f"{prefix}/matmul"), b], f"{prefix}/add")

    split = init("split_shape", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    merge = init("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    heads = {}
    for role in ("q", "k", "v"):
        reshaped = node("Reshape", [linear(role), split], f"{role}/reshape")
        heads[role] = node("Transpose", [reshaped], f"{role}/transpose", perm=list(perm))
    k_t = node("Transpose", [heads["k"]], "k/transpose_t", perm=[0, 1, 3, 2])
    scores = node("MatMul", [heads["q"], k_t], "qk")
    scores = node("Div", [scores, init("sqrt_d", np.array(1.0 / scale, np.float32))], "scale")
    mask = node("Unsqueeze", ["mask", init("axis1", np.array([1], np.int64))], "mask/unsqueeze1")
    mask = node("Unsqueeze", [mask, init("axis2", np.array([2], np.int64))], "mask/unsqueeze2")
    if torch_sdpa:
        mask = node("Cast", [mask], "mask/cast", to=TensorProto.BOOL)
        zero = init("zero", np.array([0.0], np.float32))
        mask = node("Where", [mask, zero, init("neg_inf", np.array([-np.inf], np.float32))], "mask/where")
    else:
        mask = node("Cast", [mask], "mask/cast", to=TensorProto.FLOAT)
        mask = node("Sub", [init("one", np.array(1.0, np.float32)), mask], "mask/invert")
        mask = node("Mul", [mask, init("neg", np.array(-10000.0, np.float32))], "mask/scale")
    if mask_heads:
        mask = node("Expand", [mask, init("over_heads", np.array([1, HEADS, 1, 1], np.int64))], "mask/expand")
    scores = node("Add", [scores, mask], "mask/add")
    probs = node("Softmax", [scores], "softmax", axis=softmax_axis)
    if torch_sdpa:
        probs = node("Where", [node("IsNaN", [probs], "guard/isnan"), zero, probs], "guard/where")
        batch_size = node("Gather", [node("Shape", [heads["q"]], "q/shape"), init("first", np.array([0], np.int64))],
                          "q/batch", axis=0)
        merge = node("Concat", [batch_size, init("rest", np.array([-1, HIDDEN], np.int64))], "merge_shape/concat", axis=0)
    context = node("MatMul", [probs, heads["v"]], "pv")
    context = node("Transpose", [context], "context/transpose", perm=list(perm))
    node("Reshape", [context, merge], "y")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, HIDDEN])]
    if probs_output:
        outputs.append(helper.make_tensor_value_info("softmax", TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(
        nodes,
        "bert_block",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "seq", HIDDEN]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [mask_batch, "seq"]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def fuse(source, target: str = "cpu") -> Model:
    return optimize_model(source, passes="fuse-attention", target=target, verify_each=True).model


def with_shapes(source) -> Model:
    """The model as loaded, with the shapes inference adds (the pass infers them before matching)."""
    model = Model.load(source)
    infer_shapes(model)
    return model


def padded_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 3:] = 0  # right padding
    mask[-1, :2] = 0  # left padding
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32), "mask": mask}


def assert_close(original, fused: Model, feeds: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    want, got = session(original).run(None, feeds), session(fused.to_proto()).run(None, feeds)
    for expected, actual in zip(want, got):
        assert expected.shape == actual.shape
        assert max_relative_error(expected, actual) <= rtol


# ------------------------------------------------------------------ what fuses
def test_bert_block_golden(golden):
    fused = fuse(bert_block())
    golden.check("fuse-attention/bert_block.txt", dump_model(fused))
    assert op_histogram(fused) == {ATTENTION: 1, "Shape": 1, "Gather": 1, "Concat": 1, "Expand": 1,
                                   "Unsqueeze": 2, "Cast": 1, "Sub": 1, "Mul": 1}
    assert all(n.provenance == "fuse-attention" for n in fused.graph.nodes if n.op in ("Attention", "Expand"))


def test_transformer_block_golden(golden):
    fused = fuse(MODELS / "transformer_block.onnx")
    golden.check("fuse-attention/transformer_block.txt", dump_model(fused))
    assert op_histogram(fused)[ATTENTION] == 1


@pytest.mark.parametrize("batch,seq", [(2, 7), (3, 12)])
def test_bert_block_numerics_with_padding(batch, seq):
    original = bert_block()
    assert_close(original, fuse(original), padded_feeds(batch, seq))


def test_static_shapes_and_a_non_default_scale():
    original = bert_block(batch=3, mask_batch=3, scale=0.2)
    fused = fuse(original)
    attention = next(n for n in fused.graph.nodes if n.op == "Attention")
    assert attention.attrs["scale"] == pytest.approx(0.2)
    assert_close(original, fused, padded_feeds(3, 5))


@pytest.mark.parametrize("fixture,blocks", [("tiny_bert", 2), ("tiny_vit", 2), ("tiny_transformer", 2)])
def test_torch_exports_fuse_and_keep_outputs(fixture, blocks):
    path = MODELS / f"{fixture}.onnx"
    fused = fuse(path)
    histogram = op_histogram(fused)
    assert histogram.get(ATTENTION) == blocks and "Softmax" not in histogram
    proto = fused.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    reference = session(str(path))
    rng = np.random.default_rng(3)
    for batch, seq in ((2, 9), (1, 16)):
        feeds = {}
        for spec in reference.get_inputs():
            if spec.name == "attention_mask":
                feeds[spec.name] = padded_feeds(batch, seq)["mask"]
            elif spec.name == "input_ids":
                feeds[spec.name] = rng.integers(0, 100, (batch, seq))
            elif "int" in spec.type:
                feeds[spec.name] = np.zeros((batch, seq), np.int64)
            else:
                shape = [d if isinstance(d, int) else batch for d in spec.shape]
                feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
        assert_close(str(path), fused, feeds)


def test_torch_sdpa_with_a_boolean_mask_fuses_and_keeps_fully_masked_rows_at_zero():
    original = bert_block(torch_sdpa=True)
    fused = fuse(original)
    histogram = op_histogram(fused)
    assert histogram[ATTENTION] == 1 and "IsNaN" not in histogram and "Transpose" not in histogram
    assert "Softmax" not in histogram and histogram["Mul"] == 1  # Attention's output times keep
    feeds = padded_feeds(3, 6)
    feeds["mask"][1] = 0  # a batch item with no token: the guard's rows of zeros
    want = session(original).run(None, feeds)[0]
    assert np.all(want[1] == 0) and np.isfinite(want).all()
    assert_close(original, fused, feeds)


# ------------------------------------------------------------------ what stays as it was
@pytest.mark.parametrize(
    "variant,reason",
    [
        (dict(batch=1, mask_batch=2), "does not broadcast"),  # the mask would broadcast the batch up
        (dict(probs_output=True), "graph output"),  # an intermediate is read outside
        (dict(softmax_axis=2), "axis 2"),
        (dict(perm=(2, 1, 0, 3)), "not [batch, heads, seq, head_dim]"),  # attention across the batch
        (dict(torch_sdpa=True, mask_heads=True), "may differ between heads"),  # keep is per query row
    ],
)
def test_partial_matches_leave_the_graph_untouched(variant, reason):
    original = bert_block(**variant)
    (name, why), = explain_attention(Model.load(original))
    assert why is not None and reason in why
    result = optimize_model(original, passes="fuse-attention", target="cpu")
    assert [d["rule"] for d in result.report["decisions"]] == [f"fuse-attention: not fused, {why}"]
    assert dump_model(fuse(original)) == dump_model(with_shapes(original))


def test_tensorrt_target_keeps_standard_ops():
    fused = fuse(MODELS / "tiny_bert.onnx", target="tensorrt")
    assert dump_model(fused) == dump_model(Model.load(MODELS / "tiny_bert.onnx"))


def test_layers_reading_one_mask_share_one_expanded_bias():
    fused = fuse(MODELS / "tiny_bert.onnx")
    attentions = [n for n in fused.graph.nodes if n.op == "Attention"]
    assert len(attentions) == 2 and attentions[0].inputs[5] is attentions[1].inputs[5]
    made_expands = [n for n in fused.graph.nodes if n.op == "Expand" and provenance(n) == "fuse-attention"]
    assert len(made_expands) == 1
