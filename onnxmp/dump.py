"""Canonical text form of a model: stable, diff-friendly, used by golden tests and ``inspect``.

One line per input, initializer, node and output. Nodes come in topological order, initializers
sorted by name and shown by dtype, shape and a short content hash, attributes sorted by name.
Subgraphs are printed indented under the node that owns them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from onnxmp.ir import Model, dtype_name, elem_type, provenance, toposort

INDENT = "  "
DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")  # attributes that hold an element type


def dump_model(model: Model) -> str:
    """The canonical text form of ``model``; ends with a newline."""
    opsets = ", ".join(
        f"{domain or 'ai.onnx'}={version}" for domain, version in sorted(model.opset_imports.items())
    )
    lines = [f"model ir={model.ir_version} opset {opsets}"]
    _dump_graph(model.graph, lines, depth=0, label="main")
    return "\n".join(lines) + "\n"


def _dump_graph(graph: gs.Graph, lines: list[str], depth: int, label: str) -> None:
    toposort(graph)
    pad = INDENT * depth
    lines.append(f"{pad}graph {label}")
    inner = pad + INDENT
    for tensor in graph.inputs:
        lines.append(f"{inner}input  {tensor.name}: {format_type(tensor)}")
    for tensor in sorted(_initializers(graph), key=lambda t: t.name):
        lines.append(f"{inner}init   {tensor.name}: {format_type(tensor)} #{content_hash(tensor.values)}")
    for node in graph.nodes:
        lines.append(f"{inner}node   {format_node(node)}")
        for key in sorted(node.attrs):
            value = node.attrs[key]
            for index, sub in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(sub, gs.Graph):
                    name = key if not isinstance(value, list) else f"{key}[{index}]"
                    _dump_graph(sub, lines, depth + 2, name)
    for tensor in graph.outputs:
        lines.append(f"{inner}output {tensor.name}: {format_type(tensor)}")


def _initializers(graph: gs.Graph) -> list[gs.Constant]:
    seen: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                seen[tensor.name] = tensor
    for tensor in graph.outputs:
        if isinstance(tensor, gs.Constant):
            seen[tensor.name] = tensor
    return list(seen.values())


def format_node(node: gs.Node) -> str:
    op = f"{node.domain}.{node.op}" if node.domain not in ("", "ai.onnx", None) else node.op
    args = ", ".join(t.name if t.name else "_" for t in node.inputs)
    attrs = ", ".join(f"{k}={format_attr(node, k, node.attrs[k])}" for k in sorted(node.attrs))
    outs = ", ".join(f"{t.name}: {format_type(t)}" for t in node.outputs)
    text = f"{node.name or '_'}: {op}({args})"
    if attrs:
        text += f" {{{attrs}}}"
    text += f" -> {outs}"
    rule = provenance(node)
    if rule:
        text += f"  [{rule}]"
    return text


def format_type(tensor: gs.Tensor) -> str:
    dtype = dtype_name(elem_type(tensor))
    if tensor.shape is None:
        return dtype
    dims = ",".join("?" if d is None else str(d) for d in tensor.shape)
    return f"{dtype}[{dims}]"


def format_attr(node: gs.Node, key: str, value) -> str:
    if isinstance(value, gs.Graph):
        return "@graph"
    if isinstance(value, gs.Constant):
        return f"tensor {format_type(value)} #{content_hash(value.values)}"
    if key in DTYPE_ATTRIBUTES and isinstance(value, int):
        return dtype_name(value)
    if isinstance(value, float):
        return format(value, ".8g")
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, gs.Graph) for v in value):
            return "@graphs"
        return "[" + ",".join(format_attr(node, key, v) if isinstance(v, float) else str(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace"))
    if isinstance(value, gs.Node.AttributeRef):
        return f"@{value.name}"
    return str(value)


def content_hash(values: np.ndarray) -> str:
    """First 8 hex digits of a SHA-256 over dtype, shape and bytes."""
    array = np.asarray(values, order="C")
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:8]
