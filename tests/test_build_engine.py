"""`onnxmp build-engine`: TensorRT driven through a stand-in ``tensorrt`` module that records calls.

No machine of the project has TensorRT, so these tests check what onnxmp asks of TensorRT's
Python API (parser, builder flags, workspace, profiles, calibrator) and what it does with the
answers (parser errors, a failed build, the atomic write), not TensorRT itself.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from onnxmp.cli import main
from onnxmp.errors import OnnxmpError
from onnxmp.tensorrt_engine import EngineOptions, build_engine

CNN = MODELS / "cnn_bn_residual.onnx"  # input x: [N, 3, 32, 32]
QDQ = MODELS / "qdq_model.onnx"
ENGINE_BYTES = b"\x00serialized-engine\xff"


class _ParserError:
    def __init__(self, node: int, name: str, operator: str, desc: str):
        self._values = {"node": node, "node_name": name, "node_operator": operator, "desc": desc}

    def __getattr__(self, key):
        return lambda: self._values[key]


def fake_tensorrt(parse_errors=(), build_fails=False) -> types.ModuleType:
    """A ``tensorrt`` module with the API build_engine uses; ``calls`` records every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    calls: list[tuple] = []
    trt.calls = calls

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            calls.append(("Logger", level))

    class Tensor:
        def __init__(self, info):
            self.name = info.name
            self.shape = [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            proto = onnx.load(path, load_external_data=False)
            inits = {t.name for t in proto.graph.initializer}
            self.network.inputs = [Tensor(i) for i in proto.graph.input if i.name not in inits]
            return not parse_errors

        def get_error(self, index):
            return _ParserError(*parse_errors[index])

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls.append(("profile.set_shape", name, low, opt, high))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

        def __setattr__(self, key, value):
            calls.append(("config." + key, value))

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return None if build_fails else ENGINE_BYTES

    class IInt8EntropyCalibrator2:
        def __init__(self):
            calls.append(("calibrator.__init__", "EntropyCalibration2"))

    class IInt8MinMaxCalibrator:
        def __init__(self):
            calls.append(("calibrator.__init__", "MinMaxCalibration"))

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, OnnxParser, Builder
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.IInt8EntropyCalibrator2, trt.IInt8MinMaxCalibrator = IInt8EntropyCalibrator2, IInt8MinMaxCalibrator
    trt.IInt8EntropyCalibrator = trt.IInt8LegacyCalibrator = IInt8EntropyCalibrator2
    return trt


@pytest.fixture
def trt(monkeypatch):
    module = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def names(calls) -> list[str]:
    return [c[0] for c in calls]


def test_qdq_model_int8_fp16(trt, tmp_path):
    engine = tmp_path / "model.engine"
    result = build_engine(QDQ, engine, EngineOptions(fp16=True, int8=True, workspace_bytes=1 << 30, shapes={"x": [2, 4, 8, 8]}))
    assert engine.read_bytes() == ENGINE_BYTES and result.bytes == len(ENGINE_BYTES)
    assert result.precisions == ["fp32", "fp16", "int8"] and result.tensorrt == "10.99.0"
    assert result.inputs == {"x": [2, 4, 8, 8]}
    assert ("parse_from_file", str(QDQ)) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in trt.calls
    assert ("set_flag", "FP16") in trt.calls and ("set_flag", "INT8") in trt.calls
    assert ("profile.set_shape", "x", [2, 4, 8, 8], [2, 4, 8, 8], [2, 4, 8, 8]) in trt.calls
    assert not any(c[0] == "config.int8_calibrator" for c in trt.calls)  # explicit quantization: no calibrator
    assert names(trt.calls).index("add_optimization_profile") < names(trt.calls).index("build_serialized_network")
    assert [p.name for p in tmp_path.iterdir()] == ["model.engine"]  # no temporary file left


def test_float_model_with_calibration_cache(trt, tmp_path):
    cache = tmp_path / "calib.cache"
    cache.write_text("TRT-100300-MinMaxCalibration\nx: 3c010204\n")
    build_engine(CNN, tmp_path / "cnn.engine", EngineOptions(int8=True, calibration_cache=cache, shapes={"x": [1, 3, 32, 32]}))
    (calibrator,) = [c[1] for c in trt.calls if c[0] == "config.int8_calibrator"]
    assert ("calibrator.__init__", "MinMaxCalibration") in trt.calls
    assert calibrator.read_calibration_cache() == cache.read_bytes()
    assert calibrator.get_batch(["x"]) is None  # never calibrates, only reads the cache
    assert "set_memory_pool_limit" not in names(trt.calls)  # TensorRT's default workspace


def test_parser_errors_name_the_nodes(monkeypatch, tmp_path):
    errors = [(3, "conv1", "Conv", "Unsupported padding mode\n"), (7, "", "", "bad axis")]
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(parse_errors=errors))
    engine = tmp_path / "cnn.engine"
    with pytest.raises(OnnxmpError) as info:
        build_engine(CNN, engine, EngineOptions(shapes={"x": [1, 3, 32, 32]}))
    assert str(info.value) == (
        f"TensorRT's ONNX parser rejected '{CNN}': node 'conv1' (Conv): Unsupported padding mode; node #7: bad axis"
    )
    assert not engine.exists()


def test_failed_build_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(build_fails=True))
    engine = tmp_path / "cnn.engine"
    engine.write_bytes(b"old")
    with pytest.raises(OnnxmpError, match="could not build an engine"):
        build_engine(CNN, engine, EngineOptions(shapes={"x": [1, 3, 32, 32]}))
    assert engine.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (EngineOptions(), r"dynamic dimensions need a shape for the engine \(x: \[N,3,32,32\]\)"),
        (EngineOptions(shapes={"x": [1, 3, 32, 32], "y": [1]}), "--shape names y, not an input"),
        (EngineOptions(shapes={"x": [1, 3, 16, 16]}), r"--shape x=1x3x16x16 does not fit the input's shape \[-1, 3, 32, 32\]"),
        (EngineOptions(int8=True, shapes={"x": [1, 3, 32, 32]}), "--int8 needs a Q/DQ model"),
        (EngineOptions(calibration_cache=Path("c.cache"), shapes={"x": [1, 3, 32, 32]}), "only used with --int8"),
    ],
)
def test_bad_options(trt, tmp_path, options, message):
    with pytest.raises(OnnxmpError, match=message):
        build_engine(CNN, tmp_path / "cnn.engine", options)


def test_bad_calibration_caches(trt, tmp_path):
    cache = tmp_path / "calib.cache"
    cache.write_text("not a cache\n")
    with pytest.raises(OnnxmpError, match="is not a TensorRT calibration cache: its first line is 'not a cache'"):
        build_engine(CNN, tmp_path / "e", EngineOptions(int8=True, calibration_cache=cache, shapes={"x": [1, 3, 32, 32]}))
    with pytest.raises(OnnxmpError, match="already quantized"):
        build_engine(QDQ, tmp_path / "e", EngineOptions(int8=True, calibration_cache=cache, shapes={"x": [1, 4, 8, 8]}))


def test_missing_tensorrt_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(OnnxmpError, match=r"install onnxmp\[tensorrt\]"):
        build_engine(CNN, tmp_path / "e", EngineOptions(shapes={"x": [1, 3, 32, 32]}))


# ---------------------------------------------------------------------- CLI
def test_cli_build_engine(trt, tmp_path):
    engine = tmp_path / "qdq.engine"
    result = CliRunner().invoke(
        main, ["build-engine", str(QDQ), str(engine), "--int8", "--fp16", "--workspace", "2GiB", "--shape", "x=4x4x8x8"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {engine}" in result.output and "fp32+fp16+int8" in result.output
    assert ("set_memory_pool_limit", "WORKSPACE", 2 << 30) in trt.calls
    assert engine.read_bytes() == ENGINE_BYTES


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workspace", "lots"], "error: --workspace expects a size"),
        (["--shape", "x"], "error: --shape: 'x' is not INPUT=D0xD1x..."),
        ([], "error: input(s) with dynamic dimensions need a shape"),
    ],
)
def test_cli_build_engine_errors(trt, tmp_path, args, message):
    result = CliRunner().invoke(main, ["build-engine", str(CNN), str(tmp_path / "e.engine"), *args])
    assert result.exit_code == 1 and result.output.startswith(message) and result.output.count("\n") == 1
