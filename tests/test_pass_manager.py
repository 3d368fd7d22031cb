"""The pass manager: registry, instrumentation, verification after each pass, dumps."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from conftest import MODELS
from onnxmp.errors import PassError, VerificationError
from onnxmp.ir import Model
from onnxmp.pass_manager import Pass, PassContext, Pipeline, get_pass, register, registered_passes


class BreaksTheGraph(Pass):
    """Points a node at a tensor nothing produces (a bug on purpose)."""

    name = "test-breaks-the-graph"

    def run(self, model: Model, ctx: PassContext) -> bool:
        model.graph.nodes[0].inputs[0] = gs.Variable("nowhere", dtype="float32")
        return True


class Crashes(Pass):
    """Raises while running."""

    name = "test-crashes"

    def run(self, model: Model, ctx: PassContext) -> bool:
        raise ZeroDivisionError("oops")


def test_registry_lists_builtin_passes_with_descriptions():
    passes = registered_passes()
    for name in ("cleanup", "remove-identity", "fold-constants", "fold-batchnorm", "fuse-matmul-add", "cast-elimination"):
        assert name in passes and passes[name].description()
    with pytest.raises(PassError, match="unknown pass 'nope'"):
        get_pass("nope")


def test_register_rejects_duplicate_names():
    class Duplicate(Pass):
        name = "cleanup"

    with pytest.raises(PassError, match="two passes are named 'cleanup'"):
        register(Duplicate)


def test_records_time_node_counts_and_verification():
    model = Model.load(MODELS / "dead_code.onnx")
    records = Pipeline.from_text("cleanup,remove-identity", verify_each=True).run(model)
    assert [r.name for r in records] == ["cleanup", "remove-identity"]
    assert records[0].changed and records[0].nodes_after < records[0].nodes_before
    assert all(r.verified and r.seconds >= 0 for r in records)


def test_verify_each_catches_a_broken_pass():
    model = Model.load(MODELS / "dead_code.onnx")
    with pytest.raises(VerificationError, match="pass 'test-breaks-the-graph' left an invalid model"):
        Pipeline([BreaksTheGraph()], verify_each=True).run(model)


def test_invalid_input_is_reported_as_precondition():
    model = Model.load(MODELS / "dead_code.onnx")
    BreaksTheGraph().run(model, PassContext())
    with pytest.raises(VerificationError, match="already invalid before any pass"):
        Pipeline([get_pass("cleanup")()], verify_each=True).run(model)


def test_crash_in_a_pass_names_it():
    with pytest.raises(PassError, match="pass 'test-crashes' failed: ZeroDivisionError"):
        Pipeline([Crashes()]).run(Model.load(MODELS / "dead_code.onnx"))


def test_dump_after_writes_text(tmp_path):
    model = Model.load(MODELS / "identity_chain.onnx")
    Pipeline.from_text("cleanup,remove-identity", dump_after=["remove-identity"], dump_dir=tmp_path).run(model)
    assert [p.name for p in tmp_path.iterdir()] == ["01-remove-identity.txt"]
    assert (tmp_path / "01-remove-identity.txt").read_text().startswith("model ir=10")


def test_dump_after_unknown_pass_is_an_error(tmp_path):
    with pytest.raises(PassError, match="does not run"):
        Pipeline.from_text("cleanup", dump_after=["fold-constants"], dump_dir=tmp_path)


def test_pipeline_text_round_trip():
    text = "cleanup,fold-constants{max_output_elements=8},cast-elimination"
    assert str(Pipeline.from_text(text)) == text
