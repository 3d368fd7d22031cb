"""fuse-layernorm, fuse-gelu, fuse-skip-layernorm: what fuses for which target, what is left alone,
numerics against onnxruntime on the original, goldens, and the precision pass on fused models."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS
from helpers import assert_same_outputs, max_relative_error, random_feeds, session
from onnxmp.api import op_histogram, optimize_model
from onnxmp.ir import Model, provenance

H = 8
RTOL = 1e-4
rng = np.random.default_rng(7)


def make(nodes, inits, opset=17, x_shape=("N", 4, H), inputs=(), out_shape=None) -> onnx.ModelProto:
    """A model over float input ``x`` (plus ``inputs``) whose last node writes ``y``."""
    values = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    values += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in inputs]
    initializers = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape or x_shape))
    graph = helper.make_graph(nodes, "g", values, [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11 if opset >= 23 else 10
    return model


def fuse(proto, passes, target="cpu") -> Model:
    return optimize_model(proto, passes=passes, target=target, verify_each=True).model


def fused_ops(model: Model) -> list[str]:
    return [n.op for n in model.graph.nodes if provenance(n) and provenance(n).startswith("fuse-")]


def structure(model: Model) -> list:
    return [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs], dict(n.attrs)) for n in model.graph.nodes]


def assert_untouched(proto, passes, target="cpu") -> None:
    after = fuse(proto, passes, target)
    assert not fused_ops(after)
    assert structure(after) == structure(Model.load(proto))


def node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


# ---------------------------------------------------------------- LayerNorm
def layernorm_nodes(opset=17, square="pow", divide="div", beta=True, axes=(-1,), mean_of="x", eps="eps"):
    axes_attr = {} if opset >= 18 else {"axes": list(axes)}
    axes_in = ["axes"] if opset >= 18 else []
    nodes = [
        node("ReduceMean", [mean_of] + axes_in, "mean", **axes_attr),
        node("Sub", ["x", "mean"], "d"),
        node("Pow", ["d", "two"], "sq") if square == "pow" else node("Mul", ["d", "d"], "sq"),
        node("ReduceMean", ["sq"] + axes_in, "var", **axes_attr),
        node("Add", ["var", eps], "ve"),
        node("Sqrt", ["ve"], "std"),
    ]
    if divide == "div":
        nodes.append(node("Div", ["d", "std"], "n"))
    else:
        nodes += [node("Reciprocal", ["std"], "inv"), node("Mul", ["inv", "d"], "n")]
    nodes.append(node("Mul", ["gamma", "n"], "y" if not beta else "scaled"))
    if beta:
        nodes.append(node("Add", ["scaled", "beta"], "y"))
    return nodes


def layernorm_inits(opset=17, axes=(-1,)):
    inits = {"two": 2.0, "eps": 1e-5, "gamma": rng.uniform(0.5, 1.5, H), "beta": rng.standard_normal(H)}
    if opset >= 18:
        inits["axes"] = np.asarray(axes, dtype=np.int64)
    return inits


def make_layernorm(opset=17, inputs=(), **kw):
    inits = layernorm_inits(opset, kw.get("axes", (-1,)))
    model = make(layernorm_nodes(opset, **kw), {k: v for k, v in inits.items() if k != "axes"}, opset, inputs=inputs)
    if "axes" in inits:
        model.graph.initializer.append(numpy_helper.from_array(inits["axes"], "axes"))
    return model


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square,divide,beta", [("pow", "div", True), ("mul", "reciprocal", True), ("pow", "reciprocal", False)])
def test_layernorm_variants_fuse(opset, square, divide, beta):
    proto = make_layernorm(opset, square=square, divide=divide, beta=beta)
    model = fuse(proto, "fuse-layernorm")
    assert [n.op for n in model.graph.nodes] == ["LayerNormalization"]
    assert len(model.graph.nodes[0].inputs) == (3 if beta else 2)
    assert model.graph.nodes[0].attrs["epsilon"] == pytest.approx(1e-5)
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


def test_layernorm_needs_opset_17():
    assert_untouched(make_layernorm(16), "fuse-layernorm")


@pytest.mark.parametrize(
    "case,kw",
    [
        ("epsilon per channel", {"eps": "gamma"}),
        ("mean over the middle axis", {"axes": (1,)}),
        ("mean over two axes", {"axes": (-2, -1)}),
        ("mean of another tensor", {"mean_of": "other"}),
    ],
)
@pytest.mark.parametrize("opset", [17, 18])
def test_partial_layernorm_left_alone(case, kw, opset):
    inputs = [("other", ("N", 4, H))] if kw.get("mean_of") else []
    proto = make_layernorm(opset, inputs=inputs, **kw)
    assert_untouched(proto, "fuse-layernorm")


def test_layernorm_with_intermediate_read_elsewhere_left_alone():
    proto = make_layernorm()
    proto.graph.node.append(node("Neg", ["std"], "std_neg"))
    proto.graph.output.append(helper.make_tensor_value_info("std_neg", TensorProto.FLOAT, ["N", 4, 1]))
    assert_untouched(proto, "fuse-layernorm")


# ---------------------------------------------------------------- RMSNorm
def make_rmsnorm(opset, form="div", skip=False):
    axes_attr = {} if opset >= 18 else {"axes": [-1]}
    axes_in = ["axes"] if opset >= 18 else []
    nodes = [node("Add", ["a", "b"], "x")] if skip else []
    nodes += [node("Pow", ["x", "two"], "sq"), node("ReduceMean", ["sq"] + axes_in, "ms", **axes_attr), node("Add", ["ms", "eps"], "mse")]
    if form == "pow":
        nodes += [node("Pow", ["mse", "minus_half"], "inv"), node("Mul", ["x", "inv"], "n")]
    elif form == "reciprocal":
        nodes += [node("Sqrt", ["mse"], "rms"), node("Reciprocal", ["rms"], "inv"), node("Mul", ["x", "inv"], "n")]
    else:
        nodes += [node("Sqrt", ["mse"], "rms"), node("Div", ["x", "rms"], "n")]
    nodes.append(node("Mul", ["n", "gamma"], "y"))
    inits = {"two": 2.0, "eps": 1e-6, "minus_half": -0.5, "gamma": rng.uniform(0.5, 1.5, H)}
    model = make(nodes, inits, opset)
    if skip:  # x becomes the sum of two inputs
        model.graph.input[0].name = "a"
        model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, H]))
    if opset >= 18:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray([-1], dtype=np.int64), "axes"))
    return model


@pytest.mark.parametrize("form", ["div", "reciprocal", "pow"])
def test_rmsnorm_fuses_at_opset_23(form):
    proto = make_rmsnorm(23, form)
    model = fuse(proto, "fuse-layernorm")
    assert [n.op for n in model.graph.nodes] == ["RMSNormalization"]
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


def test_rmsnorm_below_opset_23_left_alone():
    assert_untouched(make_rmsnorm(17), "fuse-layernorm", target="cuda")


@pytest.mark.parametrize("opset", [17, 23])
def test_residual_rmsnorm_becomes_skip_simplified(opset):
    proto = make_rmsnorm(opset, "reciprocal", skip=True)
    model = fuse(proto, "fuse-layernorm,fuse-skip-layernorm")
    assert fused_ops(model) == ["SkipSimplifiedLayerNormalization"]
    assert model.opset("com.microsoft") == 1
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


# ---------------------------------------------------------------- GELU
def gelu_nodes(form="erf", arrangement="x_then_half", scale="div", x="x"):
    if form == "erf":
        inner = [node("Div", [x, "sqrt2"], "s") if scale == "div" else node("Mul", ["inv_sqrt2", x], "s"), node("Erf", ["s"], "g")]
    else:
        cube = [node("Pow", [x, "three"], "cube")] if scale == "pow" else [node("Mul", [x, x], "x2"), node("Mul", [x, "x2"], "cube")]
        inner = cube + [
            node("Mul", ["kappa", "cube"], "kc"),
            node("Add", [x, "kc"], "inner"),
            node("Mul", ["beta_c", "inner"], "scaled"),
            node("Tanh", ["scaled"], "g"),
        ]
    one_plus = [node("Add", ["one", "g"], "p")]
    if arrangement == "x_then_half":
        outer = [node("Mul", [x, "p"], "xp"), node("Mul", ["xp", "half"], "y")]
    elif arrangement == "half_x_first":
        outer = [node("Mul", ["half", x], "hx"), node("Mul", ["hx", "p"], "y")]
    else:
        outer = [node("Mul", ["p", "half"], "hp"), node("Mul", [x, "hp"], "y")]
    return inner + one_plus + outer


GELU_INITS = {
    "sqrt2": math.sqrt(2.0), "inv_sqrt2": 1 / math.sqrt(2.0), "one": 1.0, "half": 0.5, "three": 3.0,
    "kappa": 0.044715, "beta_c": math.sqrt(2 / math.pi),
}  # fmt: skip


def make_gelu(form="erf", arrangement="x_then_half", scale="div", opset=17, bias=None):
    nodes = gelu_nodes(form, arrangement, scale, x="xb" if bias is not None else "x")
    inits = dict(GELU_INITS)
    if bias is not None:
        nodes.insert(0, node("Add", ["x", "bias"], "xb"))
        inits["bias"] = bias
    return make(nodes, inits, opset)


@pytest.mark.parametrize("arrangement", ["x_then_half", "half_x_first", "half_inside"])
@pytest.mark.parametrize("form,scale,op", [("erf", "div", "Gelu"), ("erf", "mul", "Gelu"), ("tanh", "pow", "FastGelu"), ("tanh", "mul", "FastGelu")])
def test_gelu_for_onnxruntime(form, scale, op, arrangement):
    proto = make_gelu(form, arrangement, scale)
    model = fuse(proto, "fuse-gelu", target="cuda")
    assert [(n.op, n.domain) for n in model.graph.nodes] == [(op, "com.microsoft")]
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


@pytest.mark.parametrize("form,approximate", [("erf", None), ("tanh", "tanh")])
def test_gelu_for_tensorrt_needs_opset_20(form, approximate):
    scale = "div" if form == "erf" else "mul"
    assert_untouched(make_gelu(form, scale=scale), "fuse-gelu", target="tensorrt")
    proto = make_gelu(form, scale=scale, opset=20)
    model = fuse(proto, "fuse-gelu", target="tensorrt")
    assert [n.op for n in model.graph.nodes] == ["Gelu"] and model.graph.nodes[0].attrs.get("approximate") == approximate
    assert "com.microsoft" not in model.opset_imports
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


@pytest.mark.parametrize("form,op", [("erf", "BiasGelu"), ("tanh", "FastGelu")])
def test_gelu_absorbs_a_constant_bias(form, op):
    proto = make_gelu(form, scale="div" if form == "erf" else "pow", bias=rng.standard_normal(H))
    model = fuse(proto, "fuse-gelu")
    assert [n.op for n in model.graph.nodes] == [op] and len(model.graph.nodes[0].inputs) == 2
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


def test_gelu_keeps_a_bias_that_is_not_along_the_last_axis():
    proto = make_gelu(bias=rng.standard_normal((4, 1)))
    model = fuse(proto, "fuse-gelu")
    assert sorted(n.op for n in model.graph.nodes) == ["Add", "Gelu"]
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


def test_gelu_with_a_wrong_constant_left_alone():
    proto = make_gelu()
    next(t for t in proto.graph.initializer if t.name == "half").CopyFrom(numpy_helper.from_array(np.float32(0.45), "half"))
    assert_untouched(proto, "fuse-gelu")


# ---------------------------------------------------------------- SkipLayerNormalization
def make_skip(shape=("N", 4, H), skip_shape=None, bias=False, sum_read=False):
    nodes = [node("Add", ["x", "bias"], "xb")] if bias else []
    nodes += [node("Add", ["xb" if bias else "x", "skip"], "sum"), node("LayerNormalization", ["sum", "gamma", "beta"], "y", axis=-1, epsilon=1e-6)]
    if sum_read:
        nodes.append(node("Relu", ["sum"], "z"))
    inits = {"gamma": rng.uniform(0.5, 1.5, H), "beta": rng.standard_normal(H), "bias": rng.standard_normal(H)}
    model = make(nodes, inits, 17, x_shape=shape, inputs=[("skip", skip_shape or shape)])
    if sum_read:
        model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, list(shape)))
    return model


@pytest.mark.parametrize("bias,sum_read", [(False, False), (True, False), (True, True)])
def test_residual_layernorm_becomes_skip_layernorm(bias, sum_read):
    proto = make_skip(bias=bias, sum_read=sum_read)
    model = fuse(proto, "fuse-skip-layernorm")
    fused = next(n for n in model.graph.nodes if n.op == "SkipLayerNormalization")
    assert len(fused.inputs) == (5 if bias else 4)
    assert [t.name for t in fused.outputs][3:] == (["sum"] if sum_read else [])
    assert not any(n.op in ("Add", "LayerNormalization") for n in model.graph.nodes)
    assert_same_outputs(proto, model.to_proto(), rtol=RTOL)


@pytest.mark.parametrize(
    "case,kw",
    [
        ("broadcast skip", {"skip_shape": (1, 4, H)}),
        ("rank 4", {"shape": ("N", 2, 4, H)}),
    ],
)
def test_skip_layernorm_layouts_the_kernel_refuses_left_alone(case, kw):
    assert_untouched(make_skip(**kw), "fuse-skip-layernorm")


def test_skip_layernorm_only_for_onnxruntime():
    assert_untouched(make_skip(), "fuse-skip-layernorm", target="tensorrt")


# ---------------------------------------------------------------- fixtures: goldens, counts, numerics
FUSIONS = "fuse-layernorm,fuse-gelu,fuse-skip-layernorm"
# Goldens of each pass alone are in tests/test_passes.py's GOLDEN_CASES.


def bert_feeds(sess, seed=0):
    feeds = random_feeds(sess, seed)
    feeds["token_type_ids"] = np.zeros_like(feeds["token_type_ids"])
    feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
    return feeds


@pytest.mark.parametrize(
    "fixture,target,expected",
    [
        ("transformer_block", "cuda", {"LayerNormalization": 1, "SkipLayerNormalization": 1, "BiasGelu": 1}),
        ("transformer_block", "tensorrt", {"LayerNormalization": 2}),
        ("tiny_bert", "cuda", {"SkipLayerNormalization": 4, "BiasGelu": 2}),
        ("tiny_vit", "cuda", {"SkipLayerNormalization": 4, "BiasGelu": 2}),
        ("tiny_vit", "tensorrt", {}),
    ],
)
def test_fusions_on_fixtures(fixture, target, expected):
    path = MODELS / f"{fixture}.onnx"
    model = fuse(path, f"cleanup,remove-identity,fold-constants,{FUSIONS}", target)
    assert dict(Counter(fused_ops(model))) == expected
    original, candidate = session(str(path)), session(model.to_proto())
    feeds = bert_feeds(original) if fixture == "tiny_bert" else random_feeds(original)
    for want, got in zip(original.run(None, feeds), candidate.run(None, feeds)):
        assert max_relative_error(want, got) <= RTOL


def test_precision_lowers_fused_contrib_ops():
    path = MODELS / "transformer_block.onnx"
    model = optimize_model(path, passes=f"{FUSIONS},precision{{dtype=fp16}},cast-elimination", target="cuda", verify_each=True).model
    fused = {n.op: n for n in model.graph.nodes if n.domain == "com.microsoft"}
    assert set(fused) == {"SkipLayerNormalization", "BiasGelu"}
    for n in fused.values():
        assert {t.dtype for t in list(n.inputs) + list(n.outputs) if t.name} == {np.dtype(np.float16)}
    original, candidate = session(str(path)), session(model.to_proto())  # onnxruntime CPU runs them
    feeds = random_feeds(original)
    assert max_relative_error(original.run(None, feeds)[0], candidate.run(None, feeds)[0]) < 1e-2


def test_precision_keeps_fused_ops_without_cpu_kernels_in_float32():
    model = optimize_model(MODELS / "transformer_block.onnx", passes=f"{FUSIONS},precision{{dtype=fp16}}", target="cpu").model
    gelu = next(n for n in model.graph.nodes if n.op == "BiasGelu")
    assert gelu.outputs[0].dtype == np.float32  # onnxruntime's CPU BiasGelu is float32 only


# ---------------------------------------------------------------- fuse-rowwise-gemm
def test_rowwise_gemm_folds_only_the_exact_round_trip():
    model = optimize_model(MODELS / "rowwise_gemm.onnx", passes="fuse-rowwise-gemm", verify_each=True).model
    producers = {t.name: n for n in model.graph.nodes for t in n.outputs}
    assert producers["y_round_trip"].op == "Add" and producers["y_not_inverse"].op == "Transpose"
    assert producers["y_regrouped"].op == "Transpose"
    assert sum(n.op == "Gemm" for n in model.graph.nodes) == 2


def test_rowwise_gemm_removes_the_out_projection_transposes_of_a_specialized_vit():
    passes = ("cleanup,remove-identity,specialize-shapes{dims=[batch=3]},fold-constants,fuse-attention,"
              "fuse-rowwise-gemm,fold-constants,cleanup")
    model = optimize_model(MODELS / "tiny_vit.onnx", passes=passes, target="cuda", verify_each=True).model
    ops = op_histogram(model)
    assert ops.get("Gemm") == 1 and ops.get("Transpose") == 1  # the head's Gemm and the patch embedding's Transpose
    feeds = {"input": np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    want = session(str(MODELS / "tiny_vit.onnx")).run(None, feeds)[0]
    assert max_relative_error(want, session(model.to_proto()).run(None, feeds)[0]) <= 1e-4
