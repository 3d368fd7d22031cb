"""Model load/save: IR version and opsets kept, external data, atomic writes, clear load errors."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import MODELS
from onnxmp.errors import ModelLoadError, ModelSaveError
from onnxmp.ir import Model, NameGenerator, provenance, set_provenance, toposort


def test_load_keeps_ir_version_opsets_and_metadata(tmp_path):
    proto = onnx.load(MODELS / "cnn_bn_residual.onnx")
    proto.metadata_props.add(key="origin", value="test")
    model = Model.load(proto)
    assert model.ir_version == 10 and model.opset() == 17
    model.save(tmp_path / "out.onnx")
    saved = onnx.load(tmp_path / "out.onnx")
    assert saved.ir_version == 10  # onnx 1.23 would write 14, which onnxruntime 1.31 cannot load
    assert [(o.domain, o.version) for o in saved.opset_import] == [(o.domain, o.version) for o in proto.opset_import]
    assert {p.key: p.value for p in saved.metadata_props} == {"origin": "test"}


def test_external_data_round_trip(tmp_path):
    model = Model.load(MODELS / "external_data.onnx")
    assert model.external_data
    model.save(tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx.data").is_file()
    assert (tmp_path / "copy.onnx").stat().st_size < (tmp_path / "copy.onnx.data").stat().st_size
    onnx.checker.check_model(str(tmp_path / "copy.onnx"), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "copy.onnx.data"]


def test_external_data_can_be_turned_off_and_on(tmp_path):
    model = Model.load(MODELS / "cnn_bn_residual.onnx")
    model.save(tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    again = Model.load(tmp_path / "ext.onnx")
    again.save(tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()


def test_save_works_when_cwd_has_a_file_of_the_data_name(tmp_path, monkeypatch):
    # onnx.save_model's own conversion checks the data name against the current folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.onnx.data").write_bytes(b"stale")
    (tmp_path / "sub").mkdir()
    Model.load(MODELS / "external_data.onnx").save(tmp_path / "sub" / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "sub" / "out.onnx"), full_check=True)


def test_save_into_missing_folder_fails_cleanly(tmp_path):
    model = Model.load(MODELS / "dead_code.onnx")
    with pytest.raises(ModelSaveError, match="does not exist"):
        model.save(tmp_path / "nope" / "out.onnx")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = Model.load(MODELS / "dead_code.onnx")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(ModelSaveError, match="No space left"):
        model.save(tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"hello, I am a text file\n", "not a valid ONNX file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "not a valid ONNX file"),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        Model.load(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_rejected(tmp_path):
    data = (MODELS / "cnn_bn_residual.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX file"):
        Model.load(path)


def test_missing_external_data_is_explained(tmp_path):
    for name in ("external_data.onnx",):
        (tmp_path / name).write_bytes((MODELS / name).read_bytes())
    with pytest.raises(ModelLoadError, match="external data"):
        Model.load(tmp_path / "external_data.onnx")


def test_provenance_survives_save_and_load(tmp_path):
    model = Model.load(MODELS / "dead_code.onnx")
    set_provenance(model.graph.nodes[0], "some-rule")
    model.save(tmp_path / "p.onnx")
    proto = onnx.load(tmp_path / "p.onnx")
    assert any(p.key == "onnxmp.rule" and p.value == "some-rule" for n in proto.graph.node for p in n.metadata_props)
    reloaded = Model.load(tmp_path / "p.onnx")
    assert [provenance(n) for n in reloaded.graph.nodes].count("some-rule") == 1


def test_toposort_is_stable_and_fixes_order():
    x = gs.Variable("x", dtype="float32", shape=[1])
    a, b = gs.Variable("a"), gs.Variable("b")
    first = gs.Node("Relu", "first", inputs=[x], outputs=[a])
    second = gs.Node("Neg", "second", inputs=[a], outputs=[b])
    independent = gs.Node("Abs", "independent", inputs=[x], outputs=[gs.Variable("c")])
    graph = gs.Graph(nodes=[second, independent, first], inputs=[x], outputs=[b])
    toposort(graph)
    assert [n.name for n in graph.nodes] == ["independent", "first", "second"]
    toposort(graph)
    assert [n.name for n in graph.nodes] == ["independent", "first", "second"]


def test_name_generator_avoids_existing_names():
    model = Model.load(MODELS / "dead_code.onnx")
    names = NameGenerator(model.graph)
    taken = model.graph.nodes[0].name
    assert names.fresh(taken) == f"{taken}_1"
    assert names.fresh(taken) == f"{taken}_2"
    assert names.fresh("brand-new") == "brand-new"


def test_subgraph_outer_scope_reads_order_the_if_node():
    proto = onnx.load(MODELS / "if_model.onnx")
    model = Model.load(proto)
    model.graph.nodes.reverse()
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["If"]
