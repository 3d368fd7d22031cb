"""fixtures/build.py is deterministic and every model it builds is valid and runnable."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "fixtures" / "build.py"
COMMITTED = REPO / "fixtures" / "models"
BATCH = 2


def _load_build_module():
    spec = importlib.util.spec_from_file_location("onnxmp_fixtures_build", BUILD_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


build_mod = _load_build_module()
MODEL_FILES = list(build_mod.MODELS)
ALL_FILES = build_mod.expected_files()


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixtures_models")
    subprocess.run([sys.executable, str(BUILD_SCRIPT), str(out)], check=True, cwd=str(REPO))
    return out


@pytest.mark.parametrize("fname", ALL_FILES)
def test_byte_identical_to_committed(built_dir: Path, fname: str) -> None:
    committed = COMMITTED / fname
    assert committed.is_file(), f"{committed} missing: run `python fixtures/build.py`"
    assert (built_dir / fname).read_bytes() == committed.read_bytes(), (
        f"{fname} differs from the committed file: rebuild with `python fixtures/build.py`"
    )


def test_rebuild_same_dir_is_idempotent(built_dir: Path) -> None:
    """Re-running into a folder that already holds the files must not change them
    (onnx appends to an existing external data file unless it is removed first)."""
    before = {f: (built_dir / f).read_bytes() for f in ALL_FILES}
    subprocess.run([sys.executable, str(BUILD_SCRIPT), str(built_dir)], check=True, cwd=str(REPO))
    after = {f: (built_dir / f).read_bytes() for f in ALL_FILES}
    assert before == after


def _node_names(graph: onnx.GraphProto):
    for n in graph.node:
        yield n.name
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _node_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _node_names(g)


def _random_feed(sess: ort.InferenceSession, rng: np.random.Generator) -> dict:
    feed = {}
    for inp in sess.get_inputs():
        shape = [BATCH if not isinstance(d, int) else d for d in inp.shape]
        if inp.type == "tensor(float)":
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        elif inp.type == "tensor(int32)":
            feed[inp.name] = rng.integers(-1000, 1000, size=shape).astype(np.int32)
        elif inp.type == "tensor(bool)":
            feed[inp.name] = np.array(rng.integers(0, 2, size=shape), dtype=bool)
        else:  # pragma: no cover - no fixture uses other input types
            raise AssertionError(f"unexpected input type {inp.type}")
    return feed


def _declared_shape(vi: onnx.ValueInfoProto):
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else d.dim_param)
    return dims


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_model_is_valid_and_runs(built_dir: Path, fname: str) -> None:
    path = built_dir / fname
    assert path.stat().st_size < 1_000_000

    # full checker on the path, so external data is resolved relative to the model
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert model.ir_version == 10
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17

    names = list(_node_names(model.graph))
    assert all(names), "every node needs a non-empty name"
    assert len(names) == len(set(names)), "node names must be unique"

    for vi in list(model.graph.input) + list(model.graph.output):
        assert vi.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED, vi.name
        assert vi.type.tensor_type.HasField("shape"), vi.name
        assert all(d.HasField("dim_value") or d.dim_param for d in vi.type.tensor_type.shape.dim)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = [_random_feed(sess, rng)]
    if any(i.type == "tensor(bool)" for i in sess.get_inputs()):
        # exercise both branches of the If model
        feeds = []
        for flag in (True, False):
            f = _random_feed(sess, rng)
            for i in sess.get_inputs():
                if i.type == "tensor(bool)":
                    f[i.name] = np.array(flag)
            feeds.append(f)

    for feed in feeds:
        results = sess.run(None, feed)
        for vi, res in zip(model.graph.output, results):
            want = [BATCH if isinstance(d, str) else d for d in _declared_shape(vi)]
            assert list(res.shape) == want, (vi.name, res.shape, want)
            assert res.dtype == helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            assert np.all(np.isfinite(res)), vi.name


def test_external_data_really_external(built_dir: Path) -> None:
    model = onnx.load(str(built_dir / "external_data.onnx"), load_external_data=False)
    assert model.graph.initializer
    for t in model.graph.initializer:
        assert t.data_location == onnx.TensorProto.EXTERNAL
        loc = {e.key: e.value for e in t.external_data}["location"]
        assert loc == "external_data.onnx.data"


def test_if_branches_use_outer_scope(built_dir: Path) -> None:
    model = onnx.load(str(built_dir / "if_model.onnx"))
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    assert list(if_node.input) == ["cond"]
    branches = {a.name: a.g for a in if_node.attribute}
    for g in branches.values():
        assert len(g.input) == 0 and len(g.initializer) == 0
        assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    then_ops = [n.op_type for n in branches["then_branch"].node]
    assert "Identity" in then_ops and "Cast" in then_ops
