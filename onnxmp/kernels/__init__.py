"""Which element types onnxruntime has kernels for, per execution provider, op and opset.

The data is ``onnxruntime.json`` beside this module, made by ``tools/gen_kernel_tables.py``
(see its ``sources`` key for where each provider's table came from). Domains kept: ``ai.onnx``
and ``com.microsoft``; providers: ``cpu`` and ``cuda``. A precision pass asks
``kernel_supports(target, op, domain, opset, "float16")`` and keeps a node in float32 when the
answer is ``False``. ``None`` means the table does not know: an op or opset it does not list, a
domain it does not keep, or a provider it has no table for (TensorRT builds its own engines
and is not in onnxruntime's kernel registry), so callers should not treat it as "no kernel".
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

__all__ = ["kernel_supports", "float_types_supported", "kernel_types", "table_info"]

DATA_FILE = "onnxruntime.json"

# Names a caller may use for a provider -> key in the table (None: known, but no table).
_PROVIDERS: dict[str, str | None] = {
    "cpu": "cpu",
    "cpuexecutionprovider": "cpu",
    "cuda": "cuda",
    "gpu": "cuda",
    "cudaexecutionprovider": "cuda",
    "tensorrt": None,
    "trt": None,
    "tensorrtexecutionprovider": None,
}

_ELEM_ALIASES = {
    "fp32": "float",
    "float32": "float",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "double",
    "float64": "double",
}

_FLOAT_TYPES = ("float", "double", "float16", "bfloat16")


@cache
def _table() -> dict:
    text = resources.files(__name__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def table_info() -> dict:
    """Where the table came from: ``{"onnxruntime_version": ..., "sources": {...}}``."""
    data = _table()
    return {"onnxruntime_version": data.get("onnxruntime_version"), "sources": data.get("sources", {})}


def _provider_key(provider: str) -> str | None:
    return _PROVIDERS.get(provider.strip().lower().replace("_", ""), None)


def _domain_key(domain: str | None) -> str:
    return "ai.onnx" if domain in (None, "", "ai.onnx") else domain


def _elem_name(elem_type: str) -> str:
    name = elem_type.strip()
    if name.startswith("tensor(") and name.endswith(")"):
        name = name[len("tensor("):-1]
    return _ELEM_ALIASES.get(name.lower(), name.lower())


def kernel_types(provider: str, op_type: str, domain: str, opset: int) -> dict[str, list[str]] | None:
    """The type constraints of the kernel that serves ``op_type`` at ``opset``, or None if unknown.

    When several listed ranges contain ``opset`` (onnxruntime lists a few ops, such as CUDA's
    ThresholdedRelu, with two open-ended ranges), the one with the latest start wins, as the
    runtime's registry resolves it.
    """
    key = _provider_key(provider)
    if key is None:
        return None
    entries = _table()["providers"].get(key, {}).get(_domain_key(domain), {}).get(op_type)
    if not entries:
        return None
    best = None
    for entry in entries:
        until = entry["until"]
        if entry["since"] <= opset and (until is None or opset <= until):
            if best is None or entry["since"] > best["since"]:
                best = entry
    return None if best is None else best["types"]


def kernel_supports(provider: str, op_type: str, domain: str, opset: int, elem_type: str) -> bool | None:
    """True when some type constraint of the op's kernel at ``opset`` lists ``tensor(elem_type)``.

    ``elem_type`` is an onnx type name such as ``"float16"``, ``"bfloat16"`` or ``"float"``
    (``"tensor(float16)"`` and the aliases fp16/bf16/fp32 work too). False when the op is listed
    for that provider and opset but no constraint allows the type; None when the table does not
    know (op, opset range, domain or provider not in it).
    """
    types = kernel_types(provider, op_type, domain, opset)
    if types is None:
        return None
    wanted = f"tensor({_elem_name(elem_type)})"
    return any(wanted in allowed for allowed in types.values())


def float_types_supported(provider: str, op_type: str, domain: str, opset: int) -> set[str] | None:
    """The floating-point element types (of float, double, float16, bfloat16) any constraint lists."""
    types = kernel_types(provider, op_type, domain, opset)
    if types is None:
        return None
    listed = {t for allowed in types.values() for t in allowed}
    return {name for name in _FLOAT_TYPES if f"tensor({name})" in listed}
