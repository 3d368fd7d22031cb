"""onnxmp.kernels: onnxruntime kernel type tables, and the generator that builds them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from onnxmp.kernels import float_types_supported, kernel_supports, kernel_types, table_info

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "onnxmp" / "kernels" / "onnxruntime.json"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_kernel_tables", REPO / "tools" / "gen_kernel_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Facts read in onnxruntime's docs/OperatorKernels.md (CUDA section) and the 1.31.1 CPU registry.
@pytest.mark.parametrize(
    "provider, op, domain, opset, elem, expected",
    [
        ("cuda", "MatMul", "", 17, "float16", True),
        ("cuda", "Conv", "ai.onnx", 17, "float16", True),
        ("cuda", "LayerNormalization", "", 17, "float16", True),
        ("cuda", "LayerNormalization", "", 17, "bfloat16", True),
        ("cuda", "Conv", "", 21, "bfloat16", False),  # [11, 21]: double, float, float16
        ("cuda", "Conv", "", 22, "bfloat16", True),  # 22+ adds bfloat16
        ("cuda", "Add", "", 12, "bfloat16", False),  # [7, 12]
        ("cuda", "Add", "", 13, "bfloat16", True),  # 13
        ("cuda", "Resize", "", 19, "bfloat16", False),
        ("cuda", "GridSample", "", 20, "float16", False),  # float only
        ("cuda", "SkipLayerNormalization", "com.microsoft", 1, "float16", True),
        ("cuda", "FusedConv", "com.microsoft", 1, "float16", False),
        ("cpu", "Conv", "", 17, "bfloat16", False),
        ("cpu", "Conv", "", 17, "float16", False),
        ("cpu", "Conv", "", 17, "float", True),
        ("cpu", "Gelu", "", 20, "float16", False),
        ("cpu", "LayerNormalization", "", 17, "float16", True),
        ("cpu", "Gelu", "", 17, "float", None),  # Gelu kernels start at opset 20
        ("cpu", "NoSuchOp", "", 17, "float16", None),
        ("cpu", "Conv", "ai.onnx.ml", 3, "float16", None),  # domain not kept
        ("tensorrt", "Conv", "", 17, "float16", None),  # not in onnxruntime's kernel registry
        ("CUDAExecutionProvider", "MatMul", "", 17, "fp16", True),  # provider and type aliases
        ("cuda", "MatMul", "", 17, "tensor(float16)", True),
    ],
)
def test_kernel_supports(provider, op, domain, opset, elem, expected):
    assert kernel_supports(provider, op, domain, opset, elem) is expected


def test_float_types_supported():
    assert float_types_supported("cuda", "Conv", "", 21) == {"double", "float", "float16"}
    assert float_types_supported("cuda", "Conv", "", 22) == {"bfloat16", "double", "float", "float16"}
    assert float_types_supported("cpu", "MatMul", "", 13) >= {"float"}
    assert float_types_supported("cuda", "NoSuchOp", "", 13) is None


def test_overlapping_open_ranges_take_latest_start():
    # CUDA lists ThresholdedRelu as both "10+" and "1+": opset 12 is served by the 10+ kernel.
    assert kernel_types("cuda", "ThresholdedRelu", "", 12) is not None
    assert kernel_supports("cuda", "ThresholdedRelu", "", 5, "float16") is True


def test_table_says_where_it_came_from():
    info = table_info()
    assert set(info["sources"]) == {"cpu", "cuda"}
    assert info["onnxruntime_version"]


def test_shipped_json_is_in_generator_form():
    gen = _generator()
    text = DATA.read_text(encoding="utf-8")
    data = json.loads(text)
    assert gen.dumps(data) == text
    assert set(data["providers"]) == {"cpu", "cuda"}
    for doms in data["providers"].values():
        assert set(doms) <= {"ai.onnx", "com.microsoft"}
        for ops in doms.values():
            for entries in ops.values():
                starts = [e["since"] for e in entries]
                assert starts == sorted(starts)
                for e in entries:
                    assert e["until"] is None or e["until"] >= e["since"]


SNIPPET = """\
## Supported Operators and Data Types

<a name="cpuexecutionprovider"/>

## Operators implemented by CPUExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Add|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|14+|**T** = tensor(double), tensor(float), tensor(int32)|
|||13|**T** = tensor(double), tensor(float)|
|||[7, 12]|**T** = tensor(float)|
|Identity|*in* input:**V**<br> *out* output:**V**|19+|**V** = seq(tensor(float)), seq(tensor(int64)), tensor(float), tensor(float16)|
| |
| |
|**Operator Domain:** *ai.onnx.ml*||||
|ArrayFeatureExtractor|*in* X:**T**<br> *in* Y:**tensor(int64)**<br> *out* Z:**T**|1+|**T** = tensor(double), tensor(float)|
| |
| |
|**Operator Domain:** *com.microsoft*||||
|Gelu|*in* X:**T**<br> *out* Y:**T**|1+|**T** = tensor(float)|
| |
| |


<a name="cudaexecutionprovider"/>

## Operators implemented by CUDAExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|LayerNormalization||17+|**T** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16)<br/> **U** = tensor(float)|
|||[1, 16]|**T** = tensor(double), tensor(float), tensor(float16)<br/> **U** = tensor(double), tensor(float)|
| |
| |


<a name="dmlexecutionprovider"/>

## Operators implemented by DmlExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Abs|*in* X:**T**<br> *out* Y:**T**|13+|**T** = tensor(float), tensor(float16)|
"""


def test_generator_parses_snippet():
    gen = _generator()
    table = gen.build(SNIPPET, commit="0" * 40)
    providers = table["providers"]
    assert set(providers) == {"cpu", "cuda"}  # DML ignored
    assert set(providers["cpu"]) == {"ai.onnx", "com.microsoft"}  # ai.onnx.ml dropped
    assert providers["cpu"]["ai.onnx"]["Add"] == [
        {"since": 7, "until": 12, "types": {"T": ["tensor(float)"]}},
        {"since": 13, "until": 13, "types": {"T": ["tensor(double)", "tensor(float)"]}},
        {"since": 14, "until": None, "types": {"T": ["tensor(double)", "tensor(float)", "tensor(int32)"]}},
    ]
    assert providers["cpu"]["ai.onnx"]["Identity"][0]["types"]["V"] == [
        "seq(tensor(float))", "seq(tensor(int64))", "tensor(float)", "tensor(float16)",
    ]
    assert providers["cpu"]["com.microsoft"]["Gelu"] == [{"since": 1, "until": None, "types": {"T": ["tensor(float)"]}}]
    ln = providers["cuda"]["ai.onnx"]["LayerNormalization"]
    assert [(e["since"], e["until"]) for e in ln] == [(1, 16), (17, None)]
    assert ln[1]["types"]["U"] == ["tensor(float)"]
    assert table["sources"]["cuda"]["commit"] == "0" * 40
    assert "cuda: docs at commit 000" in table["onnxruntime_version"]


def test_generator_output_is_deterministic(tmp_path):
    gen = _generator()
    src = tmp_path / "OperatorKernels.md"
    src.write_text(SNIPPET, encoding="utf-8")
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        assert gen.main([str(src), "--commit", "abc", "-o", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    data = json.loads(outs[0])
    assert gen.dumps(data).encode() == outs[0]
    # Order of rows in the markdown does not change the output.
    lines = SNIPPET.splitlines()
    i = lines.index("|||13|**T** = tensor(double), tensor(float)|")
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    assert gen.dumps(gen.build("\n".join(lines), commit="abc")).encode() == outs[0]


@pytest.mark.parametrize(
    "cell, expected",
    [("[7, 12]", (7, 12)), ("13", (13, 13)), ("13+", (13, None)), (" 1+ ", (1, None))],
)
def test_parse_version(cell, expected):
    assert _generator().parse_version(cell) == expected


def test_parse_rejects_garbage():
    gen = _generator()
    with pytest.raises(gen.ParseError):
        gen.parse_version("13-")
    bad = SNIPPET.replace("|||13|", "|||thirteen|")
    with pytest.raises(gen.ParseError, match="line"):
        gen.build(bad)


def test_cpu_table_matches_installed_runtime_of_same_version():
    """Regenerating from the installed onnxruntime gives the shipped CPU table (same version only)."""
    ort = pytest.importorskip("onnxruntime")
    source = table_info()["sources"]["cpu"]
    if source.get("kind") != "runtime" or source.get("onnxruntime") != ort.__version__:
        pytest.skip(f"shipped CPU table is from {source}, installed onnxruntime is {ort.__version__}")
    gen = _generator()
    fresh = gen.build(None, use_runtime=True)
    shipped = json.loads(DATA.read_text(encoding="utf-8"))
    assert fresh["providers"]["cpu"] == shipped["providers"]["cpu"]
