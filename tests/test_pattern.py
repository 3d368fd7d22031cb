"""The pattern matcher and rewriter: what matches, what does not and why, and all-or-nothing rewrites."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxmp.dump import dump_model
from onnxmp.ir import Model, provenance
from onnxmp.pass_manager import PassContext
from onnxmp.pattern import Const, Rule, explain, literal, rewrite_all

SQRT2 = math.sqrt(2.0)


def erf_gelu(op, x):
    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, SQRT2)), 1.0)), 0.5)


def gelu(op, x):
    return op.Gelu(x)


GELU = Rule("fuse-gelu", erf_gelu, gelu)


def build(nodes_fn, opset=20) -> Model:
    """A model from a function that wires nodes over input ``x`` and returns the output tensor."""
    x = gs.Variable("x", dtype=np.float32, shape=["N", 4])
    nodes: list[gs.Node] = []

    def node(op, *inputs, name=None, **attrs):
        out = gs.Variable(f"{name or op}_out_{len(nodes)}", dtype=np.float32)
        nodes.append(gs.Node(op, name or f"{op}_{len(nodes)}", attrs, list(inputs), [out]))
        return out

    def const(value, name=None):
        return gs.Constant(name or f"c{len(nodes)}_{np.asarray(value).sum()}", np.asarray(value, dtype=np.float32))

    outputs = nodes_fn(node, const, x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    for tensor in outputs:
        tensor.dtype = np.float32
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=opset)
    return Model(graph=graph, ir_version=10, opset_imports={"": opset})


def gelu_graph(node, const, x, half=0.5, swap=False):
    div = node("Div", x, const(SQRT2, "sqrt2"))
    erf = node("Erf", div)
    add = node("Add", const(1.0, "one"), erf) if swap else node("Add", erf, const(1.0, "one"))
    mul = node("Mul", x, add)
    return node("Mul", mul, const(half, "half"), name="root")


def run(model: Model, rules) -> bool:
    ctx = PassContext()
    from onnxmp.ir import NameGenerator

    ctx.names = NameGenerator(model.graph)
    return rewrite_all(model, rules, ctx)


def test_match_and_rewrite_with_commuted_inputs():
    model = build(lambda n, c, x: gelu_graph(n, c, x, swap=True))
    assert run(model, GELU)
    assert [n.op for n in model.graph.nodes] == ["Gelu"]
    assert model.graph.outputs[0].name.startswith("root_out")  # the output keeps its name
    assert provenance(model.graph.nodes[0]) == "fuse-gelu"


def test_constant_compared_with_tolerance():
    model = build(lambda n, c, x: gelu_graph(n, c, x, half=0.5 + 1e-9))
    assert run(model, GELU)
    model = build(lambda n, c, x: gelu_graph(n, c, x, half=0.6))
    assert not run(model, GELU)
    assert "not the constant" in str(explain(model, GELU))


def test_shared_intermediate_blocks_the_match():
    def graph_with_extra_use(n, c, x):
        div = n("Div", x, c(SQRT2, "sqrt2"))
        erf = n("Erf", div)
        add = n("Add", erf, c(1.0, "one"))
        mul = n("Mul", x, add)
        root = n("Mul", mul, c(0.5, "half"), name="root")
        return [root, n("Neg", erf, name="other_user")]

    model = build(graph_with_extra_use)
    before = dump_model(model)
    assert not run(model, GELU)
    assert dump_model(model) == before
    assert "consumers outside the pattern" in str(explain(model, GELU))


def test_intermediate_graph_output_blocks_the_match():
    def graph(n, c, x):
        div = n("Div", x, c(SQRT2, "sqrt2"))
        erf = n("Erf", div)
        add = n("Add", erf, c(1.0, "one"))
        mul = n("Mul", x, add)
        return [n("Mul", mul, c(0.5, "half"), name="root"), erf]

    model = build(graph)
    assert not run(model, GELU)
    assert "graph output" in str(explain(model, GELU))


def test_same_variable_must_bind_the_same_tensor():
    def graph(n, c, x):
        other = n("Neg", x)
        div = n("Div", other, c(SQRT2, "sqrt2"))  # erf reads Neg(x), the outer Mul reads x
        erf = n("Erf", div)
        add = n("Add", erf, c(1.0, "one"))
        mul = n("Mul", x, add)
        return n("Mul", mul, c(0.5, "half"), name="root")

    model = build(graph)
    assert not run(model, GELU)
    assert "would bind two tensors" in str(explain(model, GELU)) or "is not produced" in str(explain(model, GELU))


def test_attribute_predicates_and_const_variables():
    def target(op, x, w: Const):
        return op.Softmax(op.MatMul(x, w), axis=lambda a: a in (None, -1, 1))

    def replacement(op, x, w):
        return op.Softmax(op.MatMul(x, op.const(np.asarray(w.values) * 2.0, "w2")), axis=-1)

    rule = Rule("double-w", target, replacement)
    ok = build(lambda n, c, x: n("Softmax", n("MatMul", x, c(np.eye(4), "w")), axis=-1))
    assert run(ok, rule)
    wrong_axis = build(lambda n, c, x: n("Softmax", n("MatMul", x, c(np.eye(4), "w")), axis=0))
    assert not run(wrong_axis, rule)
    assert "attribute axis=0" in str(explain(wrong_axis, rule))
    not_const = build(lambda n, c, x: n("Softmax", n("MatMul", x, n("Neg", x)), axis=-1))
    assert not run(not_const, rule)


def test_declined_replacement_changes_nothing():
    def refuse(op, x):
        op.Gelu(x)  # created, then the replacement changes its mind
        return None

    rule = Rule("refuse", erf_gelu, refuse)
    model = build(gelu_graph)
    before = dump_model(model)
    assert not run(model, rule)
    assert dump_model(model) == before
    assert all(len(t.outputs) <= 2 for t in model.graph.tensors().values())


def test_condition_can_reject():
    rule = Rule("never", erf_gelu, gelu, when=lambda match: False)
    model = build(gelu_graph)
    assert not run(model, rule)
    assert "condition rejected" in str(explain(model, rule))


def test_literal_with_explicit_tolerance():
    def target(op, x):
        return op.Mul(x, literal(0.5, rtol=0.0, atol=1e-3))

    rule = Rule("half", target, lambda op, x: op.Neg(x))
    assert run(build(lambda n, c, x: n("Mul", x, c(0.5004))), rule)
    assert not run(build(lambda n, c, x: n("Mul", x, c(0.51))), rule)


def test_explain_reports_matches():
    model = build(gelu_graph)
    text = str(explain(model, GELU))
    assert "1 match(es)" in text and "matches at root" in text


def test_rule_target_must_be_an_op():
    with pytest.raises(TypeError):
        Rule("bad", lambda op, x: x, gelu)


# ---------------------------------------------------------------- DAG patterns and extra outputs
def centered_square(op, x):
    d = op.Sub(x, op.ReduceMean(x))  # one pattern node, read twice
    return op.Div(d, op.Mul(d, d))


def dag_graph(node, const, x, separate=False):
    mean = node("ReduceMean", x)
    d = node("Sub", x, mean)
    other = node("Sub", x, mean) if separate else d
    return node("Div", d, node("Mul", other, d), name="root")


def test_shared_pattern_node_matches_one_graph_node():
    rule = Rule("dag", centered_square, lambda op, x: op.Neg(x))
    model = build(dag_graph)
    assert run(model, rule)
    assert [n.op for n in model.graph.nodes] == ["Neg"]


def test_shared_pattern_node_refuses_two_graph_nodes():
    rule = Rule("dag", centered_square, lambda op, x: op.Neg(x))
    model = build(lambda n, c, x: dag_graph(n, c, x, separate=True))
    before = dump_model(model)
    assert not run(model, rule)
    assert dump_model(model) == before
    assert "read elsewhere in the pattern" in str(explain(model, rule))


def residual_norm(op, x, skip):
    total = op.Add(x, skip)
    return op.Softmax(total), total


def residual_graph(node, const, x, extra_use=True):
    total = node("Add", x, node("Neg", x, name="skip"), name="sum")
    out = node("Softmax", total, name="root")
    return [out, node("Relu", total, name="reader")] if extra_use else out


def fused_both(op, x, skip):
    outputs = op.FusedSoftmax(x, skip, _domain="test", _outputs=2)
    return outputs[0], outputs[1]


def test_extra_output_takes_the_place_of_the_intermediate():
    rule = Rule("fuse", residual_norm, fused_both)
    model = build(residual_graph)
    assert run(model, rule)
    fused = next(n for n in model.graph.nodes if n.op == "FusedSoftmax")
    reader = next(n for n in model.graph.nodes if n.op == "Relu")
    assert reader.inputs[0] is fused.outputs[1]
    assert fused.outputs[1].name.startswith("sum_out")  # the intermediate keeps its name
    assert not any(n.op in ("Add", "Softmax") for n in model.graph.nodes)


def test_extra_output_left_out_while_read_elsewhere_declines():
    rule = Rule("fuse", residual_norm, lambda op, x, skip: (op.FusedSoftmax(x, skip, _domain="test"), None))
    model = build(residual_graph)
    before = dump_model(model)
    assert not run(model, rule)
    assert dump_model(model) == before
    assert run(build(lambda n, c, x: residual_graph(n, c, x, extra_use=False)), rule)


def test_extra_output_must_be_inside_the_pattern():
    with pytest.raises(TypeError):
        Rule("bad", lambda op, x: (op.Relu(x), op.Neg(x)), gelu)


def test_condition_reason_is_explained():
    from onnxmp.pattern import Rejected

    def refuse(match):
        raise Rejected("epsilon is a vector")

    model = build(gelu_graph)
    rule = Rule("never", erf_gelu, gelu, when=refuse)
    assert not run(model, rule)
    assert "epsilon is a vector" in str(explain(model, rule))


def test_builder_omits_optional_inputs_and_outputs():
    def replacement(op, x):
        outputs = op.Norm(x, None, x, None, _domain="test", _outputs=[True, False, True])
        assert outputs[1] is None
        return outputs[0]

    model = build(gelu_graph)
    assert run(model, Rule("omit", erf_gelu, replacement))
    node = model.graph.nodes[0]
    assert [t.name for t in node.inputs][1] == "" and len(node.inputs) == 3  # trailing None dropped
    assert node.outputs[1].name == "" and node.outputs[2].name != ""
