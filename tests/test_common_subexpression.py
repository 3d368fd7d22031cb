"""eliminate-common-subexpressions: what merges, what never does, and that outputs stay exact."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import session
from onnxmp.api import op_histogram, optimize_model
from onnxmp.ir import Model

PASS = "eliminate-common-subexpressions"
FLOAT = TensorProto.FLOAT


def _model(nodes: list, outputs: list, inits: list = (), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(o, FLOAT, ["n", "m"]) for o in outputs], list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _run(proto: onnx.ModelProto) -> Model:
    return optimize_model(Model.from_proto(proto), passes=PASS, verify_each=True).model


def _outputs(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(proto).run(None, {"x": x})


def test_repeats_merge_and_equal_small_constants_count_as_one():
    inits = [numpy_helper.from_array(np.float32(2.0), "two_a"), numpy_helper.from_array(np.float32(2.0), "two_b")]
    proto = _model([
        helper.make_node("Relu", ["x"], ["r1"]),
        helper.make_node("Relu", ["x"], ["r2"]),
        helper.make_node("Mul", ["r1", "two_a"], ["m1"]),
        helper.make_node("Mul", ["r2", "two_b"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["y"]),
    ], ["y"], inits)
    after = _run(proto)
    assert op_histogram(after) == {"Relu": 1, "Mul": 1, "Add": 1}
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(after.to_proto(), x)[0], _outputs(proto, x)[0])


def test_different_attributes_shapes_or_inputs_stay_apart():
    inits = [numpy_helper.from_array(np.array(4, np.int64), "scalar"), numpy_helper.from_array(np.array([4], np.int64), "vector")]
    proto = _model([
        helper.make_node("Softmax", ["x"], ["s0"], axis=0),
        helper.make_node("Softmax", ["x"], ["s1"], axis=1),
        helper.make_node("Cast", ["scalar"], ["c0"], to=FLOAT),  # same bytes, rank 0 ...
        helper.make_node("Cast", ["vector"], ["c1"], to=FLOAT),  # ... and rank 1
        helper.make_node("Add", ["s0", "c0"], ["y0"]),
        helper.make_node("Add", ["s1", "c1"], ["y1"]),
    ], ["y0", "y1"], inits)
    after = _run(proto)
    assert op_histogram(after) == {"Softmax": 2, "Cast": 2, "Add": 2}


def test_random_ops_and_graph_outputs_are_never_merged():
    proto = _model([
        helper.make_node("RandomNormalLike", ["x"], ["n1"], seed=1.0),
        helper.make_node("RandomNormalLike", ["x"], ["n2"], seed=1.0),
        helper.make_node("Add", ["n1", "n2"], ["noise"]),
        helper.make_node("Neg", ["x"], ["y0"]),
        helper.make_node("Neg", ["x"], ["y1"]),
    ], ["noise", "y0", "y1"])
    after = _run(proto)
    assert op_histogram(after) == {"RandomNormalLike": 2, "Add": 1, "Neg": 2}
    assert [t.name for t in after.graph.outputs] == ["noise", "y0", "y1"]


def test_subgraph_bodies_are_merged_inside_and_their_owners_left_alone():
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Abs", ["x"], [f"{name}_a"]), helper.make_node("Abs", ["x"], [f"{name}_b"]),
             helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", FLOAT, ["n", 4])],
        )

    cond = numpy_helper.from_array(np.array(True), "cond")
    proto = _model([
        helper.make_node("If", ["cond"], ["i1"], then_branch=branch("t1"), else_branch=branch("e1")),
        helper.make_node("If", ["cond"], ["i2"], then_branch=branch("t2"), else_branch=branch("e2")),
        helper.make_node("Add", ["i1", "i2"], ["y"]),
    ], ["y"], [cond])
    after = _run(proto)
    histogram = op_histogram(after)
    assert histogram["If"] == 2
    assert histogram["Abs"] == 4  # one per branch body instead of two
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(after.to_proto(), x)[0], _outputs(proto, x)[0])


def test_a_merge_lets_later_repeats_merge_too():
    """Shape -> Gather -> Unsqueeze written twice, as torch exports each use of a dimension."""
    index = numpy_helper.from_array(np.array(0, np.int64), "zero")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = []
    for k in (1, 2):
        nodes += [helper.make_node("Shape", ["x"], [f"s{k}"]), helper.make_node("Gather", [f"s{k}", "zero"], [f"g{k}"]),
                  helper.make_node("Unsqueeze", [f"g{k}", "axes"], [f"u{k}"])]
    nodes += [helper.make_node("Concat", ["u1", "u2"], ["shape"], axis=0), helper.make_node("Reshape", ["x", "shape"], ["r"]),
              helper.make_node("Identity", ["r"], ["y"])]
    proto = _model(nodes, ["y"], [index, axes])
    after = _run(proto)
    assert op_histogram(after) == {"Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Reshape": 1, "Identity": 1}
