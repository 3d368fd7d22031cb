"""The in-memory model: onnx-graphsurgeon graph plus what the ONNX file carries around it.

``Model`` loads from a path or a ``ModelProto`` (external data included), keeps the IR version,
opset imports and metadata, and saves atomically. The graph helpers below are the one way passes
read the graph: producers, consumers, constant values, element types and rewiring.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper

from onnxmp.errors import ModelLoadError, ModelSaveError

from onnx_graphsurgeon.logger import G_LOGGER  # noqa: E402

G_LOGGER.severity = G_LOGGER.ERROR

from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter  # noqa: E402

_gs_export_value_info = OnnxExporter.export_value_info_proto


def _export_value_info(tensor: gs.Tensor, do_type_check: bool) -> onnx.ValueInfoProto:
    """onnx-graphsurgeon imports an optional-typed value (its dtype is then the element's
    TypeProto) but its exporter fails on it with UnboundLocalError; export it as optional here."""
    if getattr(tensor, "type", None) == "optional_type" and isinstance(tensor.dtype, onnx.TypeProto):
        return helper.make_value_info(tensor.name, helper.make_optional_type_proto(tensor.dtype))
    return _gs_export_value_info(tensor, do_type_check)


OnnxExporter.export_value_info_proto = staticmethod(_export_value_info)

from onnx_graphsurgeon.importers import onnx_importer as _gs_importer  # noqa: E402

# onnx-graphsurgeon's importer drops attributes of these types (Optional's `type`, Constant's
# `sparse_value`) with a warning silenced above; keep them as their protos instead:
# onnx.helper.make_attribute, which its exporter calls, writes them back unchanged.
_gs_importer.ONNX_PYTHON_ATTR_MAPPING.setdefault("TYPE_PROTO", "tp")
_gs_importer.ONNX_PYTHON_ATTR_MAPPING.setdefault("SPARSE_TENSOR", "sparse_tensor")

TWO_GB = 2**31
PROVENANCE_KEY = "onnxmp.rule"
EXTERNAL_DATA_THRESHOLD = 1024  # bytes; smaller tensors stay inside the model file


@dataclass
class Model:
    """An ONNX model held as an onnx-graphsurgeon graph plus its model-level fields."""

    graph: gs.Graph
    ir_version: int
    opset_imports: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    source: Path | None = None
    data_files: list[Path] = field(default_factory=list)  # external data files the source refers to
    # True while the dtypes and shapes from the last shape inference still hold: the pipeline
    # clears it whenever a pass changes the graph (code that edits a Model by hand should too).
    shapes_current: bool = False

    @property
    def external_data(self) -> bool:
        return bool(self.data_files)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str | os.PathLike | onnx.ModelProto) -> "Model":
        """Load from a file (external data resolved beside it) or from a ModelProto."""
        if isinstance(source, onnx.ModelProto):
            return cls.from_proto(source)
        path = Path(source)
        proto, data_files = _read_model_file(path)
        model = cls.from_proto(proto, source=path)
        model.data_files = data_files
        return model

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: Path | None = None) -> "Model":
        where = f"'{source}'" if source else "the model"
        if proto.ir_version <= 0 or not proto.HasField("graph"):
            raise ModelLoadError(f"{where} is not an ONNX model: it has no graph or no IR version")
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:  # graphsurgeon raises bare exceptions on malformed graphs
            raise ModelLoadError(f"{where} could not be imported: {exc}") from exc
        _read_provenance(proto.graph, graph)
        return cls(
            graph=graph,
            ir_version=proto.ir_version,
            opset_imports={op.domain: op.version for op in proto.opset_import},
            metadata={p.key: p.value for p in proto.metadata_props},
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            source=source,
        )

    # ---------------------------------------------------------------- exporting
    def opset(self, domain: str = "") -> int:
        """The imported version of ``domain`` (``""`` is ai.onnx), 0 when not imported."""
        if domain in ("", "ai.onnx"):
            return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 0))
        return self.opset_imports.get(domain, 0)

    def require_opset(self, domain: str, version: int) -> None:
        """Import ``domain`` at least at ``version`` (for passes that emit newer ops)."""
        key = "" if domain == "ai.onnx" else domain
        if self.opset_imports.get(key, 0) < version:
            self.opset_imports[key] = version
        if key == "":
            self.graph.opset = self.opset_imports[key]

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto with the original IR version and opset imports."""
        toposort(self.graph)
        proto = gs.export_onnx(
            self.graph,
            do_type_check=False,
            opset_imports=[helper.make_opsetid(d, v) for d, v in self.opset_imports.items()],
        )
        proto.ir_version = self.ir_version
        proto.producer_name = self.producer_name
        proto.producer_version = self.producer_version
        proto.domain = self.domain
        proto.model_version = self.model_version
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for key, value in self.metadata.items():
            proto.metadata_props.add(key=key, value=value)
        _write_provenance(self.graph, proto.graph, self.ir_version)
        return proto

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> None:
        """Write atomically: the model (and its data file) go to a temporary folder, then rename.

        External data is used when asked, when the loaded model had it, or when the weights
        exceed the 2 GB protobuf limit.
        """
        save_proto(self.to_proto(), path, self.wants_external_data(external_data))

    def wants_external_data(self, requested: bool | None = None) -> bool:
        if requested is not None:
            return requested
        return self.external_data or weight_bytes(self.graph) >= TWO_GB

    def adopt(self, proto: onnx.ModelProto, provenance_by_name: dict[str, str | None]) -> None:
        """Take the graph and opsets of ``proto`` (this model as saved earlier, or converted),
        giving its nodes back the provenance they had by name: to_proto writes provenance only
        from IR version 10, so a round trip of an older model would drop it."""
        adopted = Model.from_proto(proto)
        self.graph, self.opset_imports = adopted.graph, adopted.opset_imports
        for node in self.graph.nodes:
            if provenance_by_name.get(node.name):
                set_provenance(node, provenance_by_name[node.name])
        self.shapes_current = False

    def node_count(self) -> int:
        return sum(len(g.nodes) for g in iter_graphs(self.graph))


# -------------------------------------------------------------------- file I/O
def _read_model_file(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """The model with its external data loaded, and the external data files (read once)."""
    if not path.exists():
        raise ModelLoadError(f"input model '{path}' does not exist; check the path")
    if path.is_dir():
        raise ModelLoadError(f"input model '{path}' is a folder; give the path of a .onnx file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"input model '{path}' is empty (0 bytes); re-export the model")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"input model '{path}' is not a valid ONNX file ({_first_line(exc)}); "
            "it may be truncated or another format: re-export or re-download it"
        ) from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(
            f"input model '{path}' is not a valid ONNX file (no IR version, graph or opset); "
            "it may be truncated or another format"
        )
    data_files = external_data_files(proto, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(
            f"input model '{path}' refers to external data that cannot be read ({_first_line(exc)}); "
            "keep the data file next to the model under the name the model records"
        ) from exc
    return proto, data_files


def external_data_files(proto: onnx.ModelProto, folder: Path) -> list[Path]:
    """The files in ``folder`` that ``proto``'s external initializers point to, sorted."""
    locations = {
        entry.value
        for tensor in all_initializers(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [folder / location for location in sorted(locations)]


def proto_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The If/Loop/Scan bodies held by a NodeProto's attributes."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def iter_proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every NodeProto of ``graph`` and of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for sub in proto_subgraphs(node):
            yield from iter_proto_nodes(sub)


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for sub in proto_subgraphs(node):
            yield from all_initializers(sub)


def computes_float16(graph: onnx.GraphProto) -> bool:
    """Whether a graph holds float16 weights, values or casts (subgraphs not searched).

    onnxruntime's CPU provider (1.31, 1.32) segfaults creating a session at optimization level
    "all" for some float16 graphs (its layout transformations; a float16 Transpose(1,0,2) ->
    MatMul is enough), so sessions on the CPU provider use level "extended" for such graphs: the
    same computation without those transformations.
    """
    if any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer):
        return True
    infos = list(graph.input) + list(graph.output) + list(graph.value_info)
    if any(vi.type.tensor_type.elem_type == TensorProto.FLOAT16 for vi in infos):
        return True
    return any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute)
        for node in graph.node
    )


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike, external_data: bool) -> None:
    """Write ``proto`` to ``path`` atomically, its weights in ``<name>.data`` if asked."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ModelSaveError(f"cannot write '{path}': folder '{parent}' does not exist")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as exc:
        raise ModelSaveError(f"cannot write '{path}': {exc.strerror}; choose a writable folder") from exc
    try:
        staged = tmpdir / path.name
        data_name = path.name + ".data"
        if external_data:
            _move_weights_out(proto, tmpdir, data_name)
        onnx.save_model(proto, str(staged))
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(staged, path)
    except OSError as exc:
        raise ModelSaveError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _move_weights_out(proto: onnx.ModelProto, folder: Path, data_name: str) -> None:
    """Store large initializers in ``folder/data_name``.

    onnx.save_model's own conversion refuses when a file of that name exists in the *current*
    directory, so the conversion is done here against ``folder`` only.
    """
    for tensor in all_initializers(proto.graph):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_THRESHOLD:
            external_data_helper.set_external_data(tensor, data_name)
    external_data_helper.write_external_data_tensors(proto, str(folder))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ------------------------------------------------------------------ provenance
def set_provenance(node: gs.Node, rule: str) -> None:
    """Record which rule or pass created ``node``; it is written into the saved model."""
    node.provenance = rule  # type: ignore[attr-defined]


def provenance(node: gs.Node) -> str | None:
    return getattr(node, "provenance", None)


def _read_provenance(graph_proto: onnx.GraphProto, graph: gs.Graph) -> None:
    if len(graph_proto.node) != len(graph.nodes):
        return
    for proto_node, node in zip(graph_proto.node, graph.nodes):
        for prop in proto_node.metadata_props:
            if prop.key == PROVENANCE_KEY:
                set_provenance(node, prop.value)


def _write_provenance(graph: gs.Graph, graph_proto: onnx.GraphProto, ir_version: int) -> None:
    # NodeProto.metadata_props exists from IR version 10; older models keep no provenance.
    if ir_version < 10:
        return
    for node, proto_node in zip(graph.nodes, graph_proto.node):
        rule = provenance(node)
        if rule:
            proto_node.metadata_props.add(key=PROVENANCE_KEY, value=rule)


# -------------------------------------------------------------- graph helpers
def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that produces ``tensor``, or None for inputs, initializers and outer scope."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_omitted(tensor: gs.Tensor) -> bool:
    """True for an omitted optional input (an empty name in ONNX)."""
    return isinstance(tensor, gs.Variable) and tensor.name == ""


def present_outputs(node: gs.Node) -> list[gs.Tensor]:
    """``node``'s outputs less the omitted optional ones (empty names)."""
    return [t for t in node.outputs if not is_omitted(t)]


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    node = producer(tensor)
    if node is None or node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
        return None  # onnx-graphsurgeon leaves the domain of a node read from a file as None
    return _constant_node_value(node)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return attrs["value"].values
    scalar_kinds = {
        "value_float": np.float32,
        "value_int": np.int64,
        "value_floats": np.float32,
        "value_ints": np.int64,
    }
    for key, dtype in scalar_kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def constant_layout(tensor: gs.Tensor) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and numpy dtype of a constant, from its metadata when it is an initializer, so that
    checking a weight's layout does not load the weight."""
    if isinstance(tensor, gs.Constant) and tensor.shape is not None and not isinstance(tensor.dtype, int):
        return tuple(int(d) for d in tensor.shape), np.dtype(tensor.dtype)
    value = constant_value(tensor)
    return value.shape, value.dtype


def is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or (
        producer(tensor) is not None and producer(tensor).op == "Constant"
    )


def elem_type(tensor: gs.Tensor) -> int | None:
    """The ONNX element type (TensorProto enum) of ``tensor``, None when unknown."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError):
        return None


def dtype_name(onnx_type: int | None) -> str:
    """numpy-style name of an ONNX element type: float32, float16, bfloat16, int8, bool, ..."""
    if onnx_type is None:
        return "?"
    if onnx_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return helper.tensor_dtype_to_np_dtype(onnx_type).name
    except (KeyError, TypeError, ValueError):
        return helper.tensor_dtype_to_string(onnx_type).replace("TensorProto.", "").lower()


def shape_of(tensor: gs.Tensor) -> list | None:
    shape = tensor.shape
    return None if shape is None else list(shape)


def static_shape(tensor: gs.Tensor) -> list[int] | None:
    """The shape when every dimension is a known integer, else None."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return [int(d) for d in shape]


def graph_output_ids(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.outputs}


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` (subgraphs included) read ``new``; graph outputs stay."""
    # Subgraph nodes share tensor objects with their outer graph, so consumers() finds them too.
    for node in consumers(old):
        for index, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[index] = new


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> int:
    """Disconnect ``nodes`` and drop them from ``graph`` in one sweep. Returns how many."""
    doomed = {id(n) for n in nodes}
    if not doomed:
        return 0
    kept = []
    for node in graph.nodes:
        if id(node) in doomed:
            node.inputs.clear()
            node.outputs.clear()
        else:
            kept.append(node)
    removed = len(graph.nodes) - len(kept)
    graph.nodes = kept
    return removed


def make_constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, order="C"))


def weight_bytes(graph: gs.Graph) -> int:
    """Bytes of all initializers, read from their metadata without loading lazy values."""
    total = 0
    for g in iter_graphs(graph):
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant):
                total += tensor_nbytes(tensor)
    return total


def tensor_nbytes(tensor: gs.Constant) -> int:
    size = int(np.prod(tensor.shape)) if tensor.shape is not None else 0
    onnx_type = elem_type(tensor)
    if onnx_type is None:
        return size * 4
    itemsize = helper.tensor_dtype_to_np_dtype(onnx_type).itemsize
    return size * itemsize


def outer_scope_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors a node's subgraphs read from enclosing scopes (implicit inputs)."""
    found: dict[int, gs.Tensor] = {}
    for sub in subgraphs(node):
        _collect_outer_inputs(sub, found)
    return list(found.values())


def _collect_outer_inputs(graph: gs.Graph, found: dict[int, gs.Tensor]) -> None:
    local = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        local.update(id(t) for t in node.outputs)
    for node in graph.nodes:
        for tensor in list(node.inputs) + outer_scope_inputs(node):
            if id(tensor) not in local and not isinstance(tensor, gs.Constant) and tensor.name:
                found[id(tensor)] = tensor
    for tensor in graph.outputs:
        if id(tensor) not in local and not isinstance(tensor, gs.Constant):
            found[id(tensor)] = tensor


def toposort(graph: gs.Graph) -> None:
    """Sort nodes topologically, keeping the current order wherever it is already valid.

    Subgraphs are sorted too; a node that owns subgraphs waits for the outer tensors they read.
    """
    nodes = graph.nodes
    producer_index: dict[int, int] = {}
    for index, node in enumerate(nodes):
        for tensor in node.outputs:
            producer_index[id(tensor)] = index
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for index, node in enumerate(nodes):
        reads = list(node.inputs)
        if subgraphs(node):
            reads += outer_scope_inputs(node)
            for sub in subgraphs(node):
                toposort(sub)
        needs = {producer_index[id(t)] for t in reads if id(t) in producer_index}
        needs.discard(index)
        deps.append(needs)
        for dep in needs:
            users[dep].append(index)
    remaining = [len(d) for d in deps]
    ready = [i for i, count in enumerate(remaining) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            remaining[user] -= 1
            if remaining[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op for i, c in enumerate(remaining) if c > 0][:5]
        raise ModelLoadError(f"graph '{graph.name}' has a cycle through nodes {stuck}")
    if order != list(range(len(nodes))):
        graph.nodes = [nodes[i] for i in order]


class NameGenerator:
    """Hands out names not yet used in a model: ``base``, then ``base_1``, ``base_2``, ..."""

    def __init__(self, graph: gs.Graph):
        self._graph = graph
        self._taken: set[str] | None = None  # read on first use: most passes create no names

    def fresh(self, base: str) -> str:
        if self._taken is None:
            self._taken = set()
            for g in iter_graphs(self._graph):
                self._taken.update(g.tensors().keys())
                self._taken.update(n.name for n in g.nodes)
        name, counter = base, 0
        while name in self._taken:
            counter += 1
            name = f"{base}_{counter}"
        self._taken.add(name)
        return name


def bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Disconnect a node whose single output equals its single input (Identity, a no-op Cast).

    Readers of the output read the input instead. When the output is a graph output, the input's
    producer writes that name instead, so graph output names never change; where that is not
    possible (the input is a graph input, initializer or another output) the node stays.
    The caller removes the disconnected node from ``graph.nodes``.
    """
    source, result = node.inputs[0], node.outputs[0]
    outputs = graph_output_ids(graph)
    if id(result) not in outputs:
        node.inputs.clear()
        node.outputs.clear()
        replace_all_uses(result, source)
        return True
    maker = producer(source)
    if maker is None or not any(n is maker for n in graph.nodes) or id(source) in outputs:
        return False
    index = list(maker.outputs).index(source)
    node.inputs.clear()
    node.outputs.clear()
    replace_all_uses(source, result)
    maker.outputs[index] = result
    return True
