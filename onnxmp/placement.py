"""Will onnxruntime's CUDA provider run every node of a model, so that it can capture a CUDA graph?

onnxruntime refuses ``enable_cuda_graph`` when any node is placed on the CPU provider or the
model has control flow, and capture replays fixed kernels on fixed buffers, so the input shapes
must be static. This module answers from the model alone, before a session exists:
``cuda_graph_blockers`` lists every reason capture would fail (an empty list: it can be tried).

A node is expected on the CPU when
- it is Shape or Size: onnxruntime computes shapes on the host and places the integer
  arithmetic that reads them (Gather, Concat, Unsqueeze, ...) there too; ``specialize-shapes``
  folds them away;
- onnxruntime's CUDA kernel table (``onnxmp.kernels``) has no kernel for its op at the model's
  opset, or none whose type constraints list the element type of one of its tensors.
The table cannot see every placement decision the runtime makes, so a session may still refuse
capture; the session builder (``onnxmp.runtime``) then falls back and says why.
"""

from __future__ import annotations

from typing import Iterator

import onnx

from onnxmp.kernels import kernel_supports, kernel_types
from onnxmp.type_constraints import op_schema

CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
HOST_SHAPE_OPS = frozenset({"Shape", "Size"})


def cuda_graph_blockers(proto: onnx.ModelProto) -> list[str]:
    """Why the CUDA provider could not capture ``proto`` as one CUDA graph; [] when it may."""
    graph = proto.graph
    blockers = [f"input '{name}' has shape {shape}, not static" for name, shape in _dynamic_inputs(graph)]
    opsets = {entry.domain or "": entry.version for entry in proto.opset_import}
    types = _element_types(proto)
    for node in graph.node:
        if node.op_type == "Constant":
            continue  # onnxruntime turns Constant nodes into initializers
        label = f"node '{node.name or node.output[0]}' ({node.op_type})"
        if node.op_type in CONTROL_FLOW:
            blockers.append(f"{label} is control flow")
        elif node.op_type in HOST_SHAPE_OPS and node.domain in ("", "ai.onnx"):
            blockers.append(f"{label} computes a shape on the CPU")
        else:
            reason = _no_cuda_kernel(node, opsets, types)
            if reason:
                blockers.append(f"{label} {reason}")
    return blockers


def _dynamic_inputs(graph: onnx.GraphProto) -> Iterator[tuple[str, str]]:
    initializers = {t.name for t in graph.initializer}
    for info in graph.input:
        if info.name in initializers or not info.type.HasField("tensor_type"):
            continue
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            yield info.name, "unknown"
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in tensor.shape.dim]
        if any(isinstance(d, str) for d in dims):
            yield info.name, "[" + ",".join(str(d) for d in dims) + "]"


def _element_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type the model declares or onnx can infer."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement (a >2 GB model, a custom op)
        inferred = proto
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _no_cuda_kernel(node: onnx.NodeProto, opsets: dict[str, int], types: dict[str, int]) -> str | None:
    domain = node.domain or ""
    opset = opsets.get(domain, opsets.get("ai.onnx", 0) if domain == "" else 0)
    registered = kernel_types("cuda", node.op_type, domain, opset)
    if registered is None:
        return f"has no CUDA kernel in onnxruntime's table (domain '{domain or 'ai.onnx'}', opset {opset})"
    for name, constraint in _formal_types(node, domain, opset):
        elem = types.get(name) if name else None
        if elem is None or (constraint is not None and constraint not in registered):
            continue  # a formal of a fixed type (EmbedLayerNormalization's int32 ids) is not a kernel choice
        type_name = onnx.helper.tensor_dtype_to_string(elem).replace("TensorProto.", "").lower()
        if kernel_supports("cuda", node.op_type, domain, opset, type_name) is False:
            return f"has no CUDA kernel for {type_name} ('{name}')"
    return None


def _formal_types(node: onnx.NodeProto, domain: str, opset: int) -> list[tuple[str, str | None]]:
    """(tensor name, its formal's type constraint or None when the schema is unknown) for the
    node's inputs and outputs."""
    schema = op_schema(node.op_type, domain, opset)
    named = []
    for formals, actuals in ((getattr(schema, "inputs", None), node.input), (getattr(schema, "outputs", None), node.output)):
        for position, name in enumerate(actuals):
            formal = formals[min(position, len(formals) - 1)] if formals else None
            named.append((name, formal.type_str if formal is not None else None))
    return named
