"""Runtime: sessions per provider, the conv-heavy heuristic, random inputs, benchmarks, `onnxmp bench`.

Everything runs on the CPU build of onnxruntime. The CUDA and TensorRT paths are tested through
``provider_options`` (pure) and through a stand-in InferenceSession that records what it was given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxmp import runtime
from onnxmp.cli import main
from onnxmp.errors import ModelLoadError, OnnxmpError
from onnxmp.api import optimize_model
from onnxmp.placement import cuda_graph_blockers
from onnxmp.runtime import (
    PROVIDERS,
    BenchResult,
    SessionSettings,
    benchmark,
    build_session,
    conv_counts,
    is_conv_heavy,
    make_inputs,
    make_session,
    provider_options,
)

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
CNN = MODELS / "cnn_bn_residual.onnx"
TRANSFORMER = MODELS / "transformer_block.onnx"
STATIC = MODELS / "transformer_block_static.onnx"
QDQ = MODELS / "qdq_model.onnx"

CUDA_AVAILABLE = "CUDAExecutionProvider" in ort.get_available_providers()
TRT_AVAILABLE = "TensorrtExecutionProvider" in ort.get_available_providers()


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _fp16_model() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", "seq", 4])],
    )


def _embedding_model() -> onnx.ModelProto:
    table = onnx.numpy_helper.from_array(np.arange(100 * 8, dtype=np.float32).reshape(100, 8), "table")
    return _model(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [table],
    )


def _op_model(op_counts: dict[str, int]) -> onnx.ModelProto:
    """A node list for the heuristic only (never run): op_type -> how many."""
    nodes = [
        helper.make_node(op, [f"t{op}{i}"], [f"u{op}{i}"], name=f"{op}{i}")
        for op, count in op_counts.items()
        for i in range(count)
    ]
    graph = helper.make_graph(nodes, "ops", [], [])
    return helper.make_model(graph)


# ------------------------------------------------------------------ heuristic
def test_fixture_conv_counts_and_heaviness():
    assert conv_counts(CNN) == (6, 22)  # 5 Conv + 1 ConvTranspose; Flatten is not compute
    assert is_conv_heavy(CNN)
    assert conv_counts(TRANSFORMER)[0] == 0
    assert not is_conv_heavy(TRANSFORMER)
    assert is_conv_heavy(QDQ)  # Q/DQ nodes do not dilute the one Conv


@pytest.mark.parametrize(
    "ops, heavy",
    [
        ({"Conv": 3, "Relu": 9}, True),  # exactly 25 %
        ({"Conv": 2, "Relu": 9}, False),  # 18 %
        ({"Conv": 1, "MatMul": 40, "Add": 40}, False),  # ViT-like: a patch-embedding Conv only
        ({"Conv": 10, "MatMul": 100}, True),  # 10 convolutions are enough on their own
        ({"Conv": 1, "Relu": 3, "Reshape": 20, "Shape": 20, "DequantizeLinear": 20}, True),
        ({"Reshape": 3}, False),  # no compute at all
    ],
)
def test_conv_heavy_rule(ops, heavy):
    assert is_conv_heavy(_op_model(ops)) is heavy


def test_conv_heavy_counts_subgraphs():
    branch = helper.make_graph(
        [helper.make_node("Conv", ["a"], ["b"], name=f"c{i}") for i in range(10)], "then", [], []
    )
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    assert conv_counts(model) == (20, 20)


# ------------------------------------------------------------ provider options
def test_cpu_provider_options():
    assert provider_options("cpu", CNN) == [("CPUExecutionProvider", {})]


def test_cuda_options_follow_the_heuristic_unless_told():
    conv = dict(provider_options("cuda", CNN))
    assert list(dict(provider_options("cuda", CNN))) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert conv["CUDAExecutionProvider"]["prefer_nhwc"] == "1"
    assert conv["CUDAExecutionProvider"]["fuse_conv_bias"] == "1"
    assert conv["CUDAExecutionProvider"]["enable_cuda_graph"] == "0"
    assert dict(provider_options("cuda", TRANSFORMER))["CUDAExecutionProvider"]["fuse_conv_bias"] == "0"
    assert dict(provider_options("cuda", CNN, fuse_conv_bias=False))["CUDAExecutionProvider"]["fuse_conv_bias"] == "0"
    assert dict(provider_options("cuda", TRANSFORMER))["CUDAExecutionProvider"]["prefer_nhwc"] == "0"
    assert dict(provider_options("cuda", TRANSFORMER, nhwc=True))["CUDAExecutionProvider"]["prefer_nhwc"] == "1"
    assert dict(provider_options("cuda", CNN, nhwc=False))["CUDAExecutionProvider"]["prefer_nhwc"] == "0"
    # an explicit choice needs no model
    graph = dict(provider_options("cuda", None, nhwc=False, cuda_graph=True))["CUDAExecutionProvider"]
    assert graph == {"device_id": "0", "prefer_nhwc": "0", "fuse_conv_bias": "0", "enable_cuda_graph": "1"}


def test_cuda_options_accept_an_in_memory_model():
    proto = onnx.load(str(CNN))
    assert dict(provider_options("cuda", proto))["CUDAExecutionProvider"]["prefer_nhwc"] == "1"


def test_tensorrt_options(tmp_path):
    table = tmp_path / "calib.table"
    table.write_text("TRT-8601-EntropyCalibration2\n")
    chain = provider_options(
        "tensorrt", CNN, trt_fp16=True, trt_int8=True, trt_calibration_table=table, trt_cache_dir=tmp_path / "c"
    )
    assert [name for name, _ in chain] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    trt = chain[0][1]
    assert trt["trt_fp16_enable"] == "1"
    assert trt["trt_int8_enable"] == "1"
    assert trt["trt_int8_calibration_table_name"] == str(table.resolve())
    assert trt["trt_engine_cache_enable"] == "1"
    cache = Path(trt["trt_engine_cache_path"])
    assert cache.parent == (tmp_path / "c").resolve() and cache.name.endswith("-fp16-int8")
    assert chain[1][1]["prefer_nhwc"] == "1"  # the CUDA fallback still gets the layout choice
    assert "trt_cuda_graph_enable" not in trt
    assert provider_options("tensorrt", CNN, cuda_graph=True, trt_cache_dir=tmp_path)[0][1]["trt_cuda_graph_enable"] == "1"


def test_tensorrt_cache_is_per_model_and_precision(tmp_path):
    def cache(model, **kw):
        return provider_options("tensorrt", model, trt_cache_dir=tmp_path, **kw)[0][1]["trt_engine_cache_path"]

    assert cache(CNN) == cache(CNN)
    assert cache(CNN) != cache(TRANSFORMER)
    assert cache(CNN) != cache(CNN, trt_fp16=True)
    assert cache(CNN).endswith("-fp32")


def test_tensorrt_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXMP_TRT_CACHE", str(tmp_path))
    path = Path(provider_options("tensorrt", CNN)[0][1]["trt_engine_cache_path"])
    assert path.parent == tmp_path.resolve()


def test_tensorrt_int8_needs_a_table_or_qdq(tmp_path):
    with pytest.raises(OnnxmpError, match="calibration table"):
        provider_options("tensorrt", CNN, trt_int8=True, trt_cache_dir=tmp_path)
    trt = provider_options("tensorrt", QDQ, trt_int8=True, trt_cache_dir=tmp_path)[0][1]
    assert trt["trt_int8_enable"] == "1" and "trt_int8_calibration_table_name" not in trt
    with pytest.raises(OnnxmpError, match="does not exist"):
        provider_options("tensorrt", CNN, trt_int8=True, trt_calibration_table=tmp_path / "missing.table")
    with pytest.raises(OnnxmpError, match="only used with trt_int8"):
        provider_options("tensorrt", CNN, trt_calibration_table=tmp_path / "x.table")


def test_unknown_provider():
    with pytest.raises(OnnxmpError, match="choose one of cpu, cuda, tensorrt"):
        provider_options("rocm", CNN)
    with pytest.raises(OnnxmpError, match="choose one of cpu, cuda, tensorrt"):
        make_session(CNN, "rocm")


# ---------------------------------------------------------------- sessions
def test_cpu_session():
    session = make_session(CNN, threads=1, optimization="basic")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1


def test_bad_session_arguments():
    with pytest.raises(OnnxmpError, match="optimization level"):
        make_session(CNN, optimization="max")
    with pytest.raises(OnnxmpError, match="cuda or tensorrt"):
        make_session(CNN, cuda_graph=True)
    with pytest.raises(ModelLoadError, match="does not exist"):
        make_session(MODELS / "missing.onnx")


def test_broken_model_file_is_one_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(OnnxmpError, match=r"'.*bad.onnx' is not a valid ONNX file .*; re-export it"):
        make_session(bad)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="this onnxruntime has CUDA")
def test_cuda_unavailable_says_what_to_install():
    with pytest.raises(OnnxmpError) as info:
        make_session(CNN, "cuda")
    message = str(info.value)
    assert "CUDAExecutionProvider is not available" in message
    assert "install onnxmp[gpu] (onnxruntime-gpu) for cuda" in message


@pytest.mark.skipif(TRT_AVAILABLE, reason="this onnxruntime has TensorRT")
def test_tensorrt_unavailable_says_what_to_install():
    with pytest.raises(OnnxmpError, match=r"onnxmp\[tensorrt\]"):
        benchmark(CNN, "tensorrt")


class _FakeSession:
    """Stands in for onnxruntime.InferenceSession: records its arguments, claims a provider list."""

    created: list[dict] = []
    active: list[str] = []

    def __init__(self, source, sess_options=None, providers=None, provider_options=None):
        _FakeSession.created.append(
            {"source": source, "options": sess_options, "providers": providers, "provider_options": provider_options}
        )

    def get_providers(self):
        return list(self.active)


@pytest.fixture
def fake_gpu(monkeypatch):
    """onnxruntime as a GPU build would look: CUDA and TensorRT listed, preload_dlls recorded."""
    calls = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(PROVIDERS.values()))
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append("preload"), raising=False)
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(runtime, "_preloaded", False)
    monkeypatch.setattr(_FakeSession, "created", [])
    monkeypatch.setattr(_FakeSession, "active", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return calls


def _static_cnn() -> onnx.ModelProto:
    return optimize_model(CNN, passes="specialize-shapes{dims=[N=2]}").model.to_proto()


def test_cuda_session_wiring(fake_gpu):
    static = _static_cnn()
    built = build_session(static, "cuda", cuda_graph=True)
    (made,) = _FakeSession.created
    assert fake_gpu == ["preload"]
    assert made["source"] == static.SerializeToString()
    assert made["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert made["provider_options"][0] == {"device_id": "0", "prefer_nhwc": "1", "fuse_conv_bias": "1", "enable_cuda_graph": "1"}
    assert built.cuda_graph and built.notes == []
    make_session(TRANSFORMER, "cuda")
    assert fake_gpu == ["preload"]  # once per process
    assert _FakeSession.created[1]["provider_options"][0]["prefer_nhwc"] == "0"


def test_cuda_graph_required_but_blocked(fake_gpu):
    with pytest.raises(OnnxmpError) as info:
        make_session(CNN, "cuda", cuda_graph=True)
    assert "input 'x' has shape [N,3,32,32], not static" in str(info.value)
    assert "--fix-dim" in str(info.value) and not _FakeSession.created


def test_cuda_graph_auto_follows_the_model(fake_gpu):
    dynamic = build_session(TRANSFORMER, "cuda", cuda_graph=None)
    assert not dynamic.cuda_graph
    assert dynamic.notes[0].startswith("CUDA graph off: input 'x' has shape [N,16,64], not static")
    assert "computes a shape on the CPU" in dynamic.notes[0]
    assert _FakeSession.created[0]["provider_options"][0]["enable_cuda_graph"] == "0"
    static = build_session(_static_cnn(), "cuda", SessionSettings(cuda_graph=None))
    assert static.cuda_graph and _FakeSession.created[1]["provider_options"][0]["enable_cuda_graph"] == "1"
    assert not build_session(_static_cnn(), "cuda").cuda_graph  # the default stays off


def test_cuda_graph_auto_falls_back_when_onnxruntime_refuses(fake_gpu, monkeypatch):
    class Refusing(_FakeSession):
        def __init__(self, source, sess_options=None, providers=None, provider_options=None):
            if provider_options[0].get("enable_cuda_graph") == "1":
                raise RuntimeError("This session cannot use the graph capture feature as requested by the user")
            super().__init__(source, sess_options, providers, provider_options)

    monkeypatch.setattr(ort, "InferenceSession", Refusing)
    built = build_session(_static_cnn(), "cuda", cuda_graph=None)
    assert not built.cuda_graph and "onnxruntime refused capture (This session cannot use" in built.notes[0]
    assert built.providers[0][1]["enable_cuda_graph"] == "0"
    with pytest.raises(OnnxmpError, match="retry without cuda_graph"):
        build_session(_static_cnn(), "cuda", cuda_graph=True)  # asked for: no silent fallback


def test_tensorrt_session_wiring(fake_gpu, tmp_path):
    _FakeSession.active = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    make_session(CNN, "tensorrt", trt_fp16=True, trt_cache_dir=tmp_path)
    (made,) = _FakeSession.created
    assert made["providers"] == list(PROVIDERS.values())[::-1]
    assert Path(made["provider_options"][0]["trt_engine_cache_path"]).is_dir()  # created for onnxruntime


def test_silent_fallback_is_refused(fake_gpu, tmp_path):
    _FakeSession.active = ["CPUExecutionProvider"]
    with pytest.raises(OnnxmpError, match="fell back to CPUExecutionProvider instead of CUDAExecutionProvider"):
        make_session(CNN, "cuda")
    _FakeSession.active = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(OnnxmpError, match="libnvinfer"):
        make_session(CNN, "tensorrt", trt_cache_dir=tmp_path)


def test_session_creation_failure_with_cuda_graph_hints(fake_gpu, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : graph capture failed\nmore detail")

    monkeypatch.setattr(ort, "InferenceSession", fail)
    with pytest.raises(OnnxmpError) as info:
        make_session(_static_cnn(), "cuda", cuda_graph=True)
    assert "graph capture failed" in str(info.value) and "retry without cuda_graph" in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ inputs
def test_float16_inputs():
    session = make_session(_fp16_model())
    feeds = make_inputs(session, batch=2, dims={"seq": 3})
    assert feeds["x"].dtype == np.float16 and feeds["x"].shape == (2, 3, 4)
    assert make_inputs(session)["x"].shape == (1, 1, 4)  # unknown symbolic dims default to 1


def test_token_id_inputs():
    session = make_session(_embedding_model())
    ids = make_inputs(session, batch=4, dims={"sequence": 128}, seed=3)["ids"]
    assert ids.dtype == np.int64 and ids.shape == (4, 128)
    assert ids.min() >= 0 and ids.max() < 2
    np.testing.assert_array_equal(ids, make_inputs(session, batch=4, dims={"sequence": 128}, seed=3)["ids"])


def test_dims_are_checked():
    session = make_session(TRANSFORMER)
    with pytest.raises(OnnxmpError, match="'sequence' is not a symbolic dimension.*: N"):
        make_inputs(session, dims={"sequence": 128})
    with pytest.raises(OnnxmpError, match="positive integer"):
        make_inputs(session, dims={"N": 0})
    assert make_inputs(session, batch=2, dims={"N": 5})["x"].shape == (5, 16, 64)  # dims win


# --------------------------------------------------------------- benchmark
@pytest.mark.parametrize("io_binding", [False, True])
def test_benchmark_cnn(io_binding):
    result = benchmark(CNN, batch=2, warmup=1, repeats=4, io_binding=io_binding)
    assert isinstance(result, BenchResult)
    assert result.providers == ["CPUExecutionProvider"]
    assert result.inputs == {"x": {"dtype": "float32", "shape": [2, 3, 32, 32]}}
    assert result.io_binding is io_binding and result.batch == 2
    assert len(result.times_ms) == 4
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms <= result.max_ms
    assert result.min_ms <= result.mean_ms <= result.max_ms
    assert result.throughput == pytest.approx(2 / (result.median_ms / 1000))
    data = result.to_dict()
    assert json.loads(json.dumps(data))["median_ms"] == result.median_ms


def test_benchmark_transformer_and_static_batch():
    result = benchmark(TRANSFORMER, batch=3, warmup=0, repeats=2, threads=1)
    assert result.inputs["x"]["shape"] == [3, 16, 64]
    static = benchmark(STATIC, warmup=0, repeats=2)  # batch=1 takes the model's static batch
    assert static.batch == 2 and static.inputs["x"]["shape"] == [2, 16, 64]
    with pytest.raises(OnnxmpError, match="static batch of 2"):
        benchmark(STATIC, batch=4, repeats=1)


@pytest.mark.parametrize("io_binding", [False, True])
def test_benchmark_float16_and_bfloat16_models(io_binding):
    result = benchmark(_fp16_model(), batch=2, dims={"seq": 5}, warmup=1, repeats=2, io_binding=io_binding)
    assert result.inputs == {"x": {"dtype": "float16", "shape": [2, 5, 4]}}
    bf16 = _model(
        [helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    result = benchmark(bf16, batch=3, warmup=1, repeats=2, io_binding=io_binding)
    assert result.inputs == {"x": {"dtype": "bfloat16", "shape": [3, 4]}}


def test_benchmark_token_ids():
    result = benchmark(_embedding_model(), batch=2, dims={"sequence": 16}, warmup=1, repeats=2)
    assert result.inputs == {"ids": {"dtype": "int64", "shape": [2, 16]}}


def test_benchmark_bad_counts():
    with pytest.raises(OnnxmpError, match="repeats"):
        benchmark(CNN, repeats=0)
    with pytest.raises(OnnxmpError, match="batch"):
        benchmark(CNN, batch=0)


# ---------------------------------------------------------------------- CLI
@pytest.fixture
def cli() -> CliRunner:
    return CliRunner(env={"COLUMNS": "250"})


def test_cli_bench(cli, tmp_path):
    report = tmp_path / "bench.json"
    result = cli.invoke(
        main, ["bench", str(TRANSFORMER), "--batch", "2", "--warmup", "1", "--repeats", "3", "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "median ms" in result.output and "x: float32[2,16,64]" in result.output
    data = json.loads(report.read_text())
    assert data["batch"] == 2 and data["repeats"] == 3 and len(data["times_ms"]) == 3


def test_cli_bench_dims_and_fp16(cli, tmp_path):
    path = tmp_path / "fp16.onnx"
    onnx.save(_fp16_model(), str(path))
    result = cli.invoke(main, ["bench", str(path), "--dim", "seq=7", "--repeats", "2", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert "x: float16[1,7,4]" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dim", "seq"], "--dim expects NAME=VALUE"),
        (["--dim", "seq=0"], "--dim expects NAME=VALUE"),
        (["--dim", "seq=4"], "'seq' is not a symbolic dimension"),
        (["--trt-fp16"], "need --provider tensorrt"),
        (["--cuda-graph"], "cuda or tensorrt"),
    ],
)
def test_cli_bench_errors(cli, args, message):
    result = cli.invoke(main, ["bench", str(CNN), "--repeats", "1", *args])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and message in result.output
    assert result.output.count("\n") == 1


@pytest.mark.skipif(CUDA_AVAILABLE, reason="this onnxruntime has CUDA")
def test_cli_bench_cuda_unavailable(cli):
    result = cli.invoke(main, ["bench", str(CNN), "--provider", "cuda"])
    assert result.exit_code == 1
    assert result.output.startswith("error: CUDAExecutionProvider is not available")
    assert "onnxmp[gpu]" in result.output and result.output.count("\n") == 1


def test_cli_bench_missing_model(cli):
    result = cli.invoke(main, ["bench", "no-such-model.onnx"])
    assert result.exit_code == 1 and "does not exist" in result.output


# ------------------------------------------------------------ CUDA graph placement
def test_cuda_graph_blockers():
    assert cuda_graph_blockers(_static_cnn()) == []
    dynamic = cuda_graph_blockers(onnx.load(str(TRANSFORMER)))
    assert dynamic[0] == "input 'x' has shape [N,16,64], not static"
    assert any(b.endswith("(Shape) computes a shape on the CPU") for b in dynamic)
    assert any("(If) is control flow" in b for b in cuda_graph_blockers(onnx.load(str(MODELS / "if_model.onnx"))))
    det = _model(
        [helper.make_node("Det", ["x"], ["y"], name="det")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    assert cuda_graph_blockers(det) == [
        "node 'det' (Det) has no CUDA kernel in onnxruntime's table (domain 'ai.onnx', opset 17)"
    ]
    int8_add = _model(  # CUDA's Add lists int8 from opset 14 only
        [helper.make_node("Add", ["a", "a"], ["b"], name="add")],
        [helper.make_tensor_value_info("a", TensorProto.INT8, [4])],
        [helper.make_tensor_value_info("b", TensorProto.INT8, [4])],
    )
    int8_add.opset_import[0].version = 13
    assert cuda_graph_blockers(int8_add) == ["node 'add' (Add) has no CUDA kernel for int8 ('a')"]


def test_session_settings():
    settings = SessionSettings(nhwc=False, cuda_graph=True)
    assert dict(provider_options("cuda", None, settings))["CUDAExecutionProvider"]["enable_cuda_graph"] == "1"
    assert dict(provider_options("cuda", None, settings, cuda_graph=False))["CUDAExecutionProvider"]["enable_cuda_graph"] == "0"
    with pytest.raises(TypeError, match="session settings are: nhwc, fuse_conv_bias, cuda_graph"):
        make_session(CNN, nhwcc=True)
    with pytest.raises(ValueError, match="cuda_graph decided"):
        provider_options("cuda", CNN, cuda_graph=None)


def test_benchmark_binds_preallocated_outputs_of_a_static_model():
    result = benchmark(_static_cnn(), warmup=1, repeats=2, io_binding=True)
    assert result.batch == 2 and result.io_binding and not result.cuda_graph and result.notes == []


def test_benchmark_cuda_graph_needs_io_binding(fake_gpu):
    with pytest.raises(OnnxmpError, match="need I/O binding"):
        benchmark(_static_cnn(), "cuda", io_binding=False, cuda_graph=True)
