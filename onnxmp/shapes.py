"""Shape and type inference for the in-memory graph, without copying the weights.

onnx's shape inference works on a ModelProto. Exporting the whole model would copy every weight,
so the proto built here carries only small initializers (which hold shapes, axes and other values
that inference reads) and declares the large ones as typed graph inputs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxmp.ir import Model, elem_type

SMALL_INITIALIZER = 4096  # elements; larger initializers are declared by type only


def infer_shapes(model: Model) -> None:
    """Fill in missing dtypes and shapes of the main graph's tensors from onnx shape inference.

    Skipped when nothing changed the graph since the last inference (``model.shapes_current``).
    """
    if model.shapes_current:
        return
    model.shapes_current = True
    proto = lightweight_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return
    tensors = model.graph.tensors()
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = tensors.get(info.name)
        if isinstance(tensor, gs.Variable) and info.type.HasField("tensor_type"):
            _merge(tensor, info.type.tensor_type)


def infer_shapes_for(model: Model, tensors: Iterable[gs.Tensor]) -> None:
    """Run shape inference only if one of ``tensors`` lacks its dtype or shape.

    Tensors keep the types and shapes they were given (passes type what they create), so a
    pass that reads a few tensors need not re-infer the whole graph when those are known.
    """
    if any(t.dtype is None or t.shape is None for t in tensors):
        infer_shapes(model)


def _merge(tensor: gs.Variable, tensor_type: onnx.TypeProto.Tensor) -> None:
    if tensor.dtype is None and tensor_type.elem_type:
        onnx_type = tensor_type.elem_type
        try:
            tensor.dtype = helper.tensor_dtype_to_np_dtype(onnx_type)
        except (KeyError, TypeError):
            tensor.dtype = onnx_type
    if not tensor_type.HasField("shape"):
        return
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    ]
    if tensor.shape is None or _known(dims) > _known(tensor.shape):
        tensor.shape = dims


def _known(dims) -> int:
    if dims is None:
        return -1
    return sum(1 for d in dims if isinstance(d, (int, np.integer)))


def lightweight_proto(model: Model) -> onnx.ModelProto:
    """The model as a proto for shape inference: its nodes, small initializers, the rest typed inputs."""
    graph = model.graph
    initializers, declared = [], []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        if tensor.shape is not None and int(np.prod(tensor.shape)) <= SMALL_INITIALIZER:
            exported = OnnxExporter.export_tensor_proto(tensor)
            initializers.append(exported)
        else:
            declared.append(helper.make_tensor_value_info(tensor.name, elem_type(tensor), tensor.shape))
    graph_proto = helper.make_graph(
        [OnnxExporter.export_node(n) for n in graph.nodes],
        graph.name or "main",
        [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs] + declared,
        [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs],
        initializer=initializers,
    )
    return helper.make_model(
        graph_proto,
        opset_imports=[helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
        functions=[OnnxExporter.export_function(f) for f in graph.functions],
    )


def static_shapes_at(proto: onnx.ModelProto, dims: dict[str, int], names: Iterable[str]) -> dict[str, list[int] | None]:
    """The static shapes ``names`` take when the graph inputs' symbolic dimensions have ``dims``'
    values (None where inference cannot tell). ``proto`` comes from ``lightweight_proto`` and is
    not modified.

    onnx's inference runs first; names it leaves open go to onnxruntime's symbolic shape
    inference, which resolves more (onnx cannot broadcast an unknown dimension against a 1)."""
    names = list(names)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]
    found = _static_shapes(_onnx_inference(fixed))
    if any(name not in found for name in names):
        found = {**_static_shapes(_onnxruntime_inference(fixed)), **found}
    return {name: found.get(name) for name in names}


def _onnx_inference(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return None


def _onnxruntime_inference(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=False, guess_output_rank=False)
    except Exception:  # noqa: BLE001 - the tool asserts and raises freely on models it cannot follow
        return None


def _static_shapes(proto: onnx.ModelProto | None) -> dict[str, list[int]]:
    if proto is None:
        return {}
    found = {}
    for info in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            found[info.name] = [d.dim_value for d in dims]
    return found
