"""onnxruntime sessions per target (CPU, CUDA, TensorRT) and latency benchmarks.

``build_session`` builds the session a target wants from ``SessionSettings`` and the model
(``make_session`` returns just the session); ``provider_options`` is the pure part of it (which
providers, in which order, with which options), so it can be tested without a GPU; whether CUDA
graph capture is possible is ``onnxmp.placement``'s question; ``benchmark`` times a model on
random inputs. onnxruntime is imported lazily and the TensorRT
Python package is never imported: TensorRT is reached only through onnxruntime's provider.

Heuristics (all documented where they live):

* NHWC on CUDA (``is_conv_heavy``): ``prefer_nhwc`` is turned on when the caller does not decide
  and the model is convolution-heavy: at least ``CONV_FRACTION`` (25 %) of its compute nodes are
  convolutions, or it has at least ``CONV_COUNT`` (10) convolutions. A ResNet qualifies; a ViT,
  whose only convolution is the patch embedding, does not.
* Benchmark inputs (``make_inputs``): a symbolic or unknown first dimension becomes ``batch``;
  any symbolic dimension named in ``dims`` takes that value (this wins, also on the first axis);
  every other symbolic or unknown dimension is 1.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx

from onnxmp.errors import ModelLoadError, OnnxmpError
from onnxmp.ir import all_initializers, computes_float16, iter_proto_nodes

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

# What to install when a provider is missing from onnxruntime.get_available_providers().
_INSTALL_HINTS = {
    "cpu": "reinstall onnxruntime (pip install --force-reinstall onnxruntime)",
    "cuda": (
        "install onnxmp[gpu] (onnxruntime-gpu) for cuda, and uninstall the CPU-only "
        "onnxruntime package first, since both install the same module"
    ),
    "tensorrt": (
        "install onnxmp[gpu] (onnxruntime-gpu, whose build includes the TensorRT provider) and "
        "onnxmp[tensorrt] (tensorrt>=10) for tensorrt"
    ),
}

# Graph optimization levels by name.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# -------------------------------------------------------------- conv-heavy heuristic
CONV_FRACTION = 0.25
CONV_COUNT = 10

#: Convolutions, in every form a model we hand over may hold them.
CONV_OPS = frozenset(
    {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "NhwcFusedConv"}
)

#: Nodes that move, reshape, describe or (de)quantize data rather than compute on it. They are
#: left out of the denominator so that a QDQ model, or a PyTorch export with its Shape->Gather->
#: Concat->Reshape chains, is judged by its real compute. Control-flow nodes are left out too;
#: the nodes of their subgraphs are counted instead.
NON_COMPUTE_OPS = frozenset(
    {
        "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "DequantizeLinear", "Expand",
        "Flatten", "Gather", "Identity", "If", "Loop", "Pad", "QuantizeLinear", "Range", "Reshape",
        "Scan", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze",
    }
)


def as_written_options(log_severity: int = 3) -> "onnxruntime.SessionOptions":
    """Session options under which onnxruntime computes a graph exactly as written (graph
    optimizations off): for folding, verifying and probing, where a fused or
    rewritten kernel would be another computation than the one being checked or measured."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = log_severity
    return options


def conv_counts(model: str | os.PathLike | onnx.ModelProto) -> tuple[int, int]:
    """(convolution nodes, compute nodes) over the graph and its subgraphs (see NON_COMPUTE_OPS)."""
    proto = _graph_proto(model)
    convs = compute = 0
    for node in iter_proto_nodes(proto.graph):
        if node.op_type in NON_COMPUTE_OPS:
            continue
        compute += 1
        convs += node.op_type in CONV_OPS
    return convs, compute


def is_conv_heavy(model: str | os.PathLike | onnx.ModelProto) -> bool:
    """True when convolutions are >= CONV_FRACTION of compute nodes, or there are >= CONV_COUNT.

    This decides ``prefer_nhwc`` on CUDA when the caller does not: cuDNN's NHWC kernels (tensor
    cores, no layout transposes around each conv) pay off when convolutions dominate; in a model
    with a few convolutions among many MatMuls the Transposes that NHWC adds at the borders cost
    more than they save.
    """
    convs, compute = conv_counts(model)
    if compute == 0:
        return False
    return convs >= CONV_COUNT or convs / compute >= CONV_FRACTION


def _has_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in iter_proto_nodes(proto.graph))


# --------------------------------------------------------------------- model sources
def _graph_proto(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph for inspection; weights kept in external files are not read."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = _existing_path(model)
    try:
        return onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, ValueError, RuntimeError from protobuf/onnx
        raise ModelLoadError(
            f"input model '{path}' is not a valid ONNX file ({_first_line(exc)}); re-export it"
        ) from exc


def _existing_path(model: str | os.PathLike) -> Path:
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or an onnx.ModelProto, not {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"input model '{path}' does not exist; check the path")
    if path.is_dir():
        raise ModelLoadError(f"input model '{path}' is a folder; give the path of a .onnx file")
    return path


def _session_source(model: str | os.PathLike | onnx.ModelProto) -> str | bytes:
    """What onnxruntime loads: the path (so external data resolves next to it) or the bytes."""
    if not isinstance(model, onnx.ModelProto):
        return str(_existing_path(model))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_initializers(model.graph)):
        raise OnnxmpError(
            "the in-memory model refers to external data files that onnxruntime cannot locate "
            "from bytes; pass the model's path instead"
        )
    if model.ByteSize() >= 2**31:
        raise OnnxmpError(
            "the in-memory model is over 2 GB and cannot be serialized; save it with external "
            "data (onnxmp.ir.Model.save) and pass the path"
        )
    return model.SerializeToString()


def _model_label(model: str | os.PathLike | onnx.ModelProto) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return Path(model).name


def _model_digest(model: str | os.PathLike | onnx.ModelProto) -> str:
    """A short content hash: the .onnx bytes plus the size and mtime of its external data files."""
    digest = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        digest.update(model.SerializeToString())
        return digest.hexdigest()[:16]
    path = _existing_path(model)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    locations = set()
    for tensor in all_initializers(_graph_proto(path).graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    for location in sorted(locations):
        data = path.parent / location
        if data.exists():
            stat = data.stat()
            digest.update(f"{location}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ provider options
def default_trt_cache_root() -> Path:
    """$ONNXMP_TRT_CACHE, or ~/.cache/onnxmp/tensorrt."""
    env = os.environ.get("ONNXMP_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxmp" / "tensorrt"


def _flag(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class SessionSettings:
    """How to build a session, for every provider; a field that does not apply is ignored.

    ``cuda_graph``: True requires capture (an error names what prevents it), False never
    captures, None captures when the model allows it (see ``build_session``).
    """

    nhwc: bool | None = None  # CUDA prefer_nhwc; None: is_conv_heavy(model)
    # CUDA fuse_conv_bias (cuDNN's fused convolution + bias); None: as nhwc is decided. On an H100
    # it took ResNet-50 at batch 32 from 3.36 to 2.50 ms in FP16 and 5.00 to 3.64 ms in FP32.
    fuse_conv_bias: bool | None = None
    cuda_graph: bool | None = False
    optimization: str = "all"  # graph optimization level, one of OPTIMIZATION_LEVELS
    threads: int | None = None  # intra-op threads; None: onnxruntime's default
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_calibration_table: str | os.PathLike | None = None
    trt_cache_dir: str | os.PathLike | None = None
    device_id: int = 0


def _settings(settings: SessionSettings | None, overrides: dict[str, Any]) -> SessionSettings:
    try:
        return replace(settings or SessionSettings(), **overrides)
    except TypeError as exc:
        known = ", ".join(f.name for f in fields(SessionSettings))
        raise TypeError(f"{exc}; session settings are: {known}") from None


def provider_options(
    provider: str,
    model: str | os.PathLike | onnx.ModelProto | None = None,
    settings: SessionSettings | None = None,
    **overrides: Any,
) -> list[tuple[str, dict[str, str]]]:
    """The (provider, options) list onnxruntime gets for ``provider``, highest priority first.

    Pure: it checks nothing about the installed onnxruntime, so it can be tested anywhere.
    ``overrides`` are SessionSettings fields. Option values are strings, as onnxruntime's
    provider option parsers expect; ``cuda_graph`` must be decided (True or False) by now.

    - "cpu": CPU only (``nhwc`` and ``cuda_graph`` do not apply; the CPU provider chooses its
      own blocked layouts at optimization level "all").
    - "cuda": CUDA (``prefer_nhwc``: ``nhwc``, or ``is_conv_heavy(model)`` when None;
      ``fuse_conv_bias``: as set, or as ``prefer_nhwc`` when None; ``enable_cuda_graph``), then
      CPU for the nodes CUDA has no kernel for.
    - "tensorrt": TensorRT (``trt_fp16_enable``, ``trt_int8_enable``, an absolute
      ``trt_int8_calibration_table_name``, and ``trt_engine_cache_enable`` with
      ``trt_engine_cache_path`` = ``<cache root>/<model digest>-<precisions>``, so two models
      that share a file name, or one model built at two precisions, never share an engine;
      ``trt_cuda_graph_enable`` for ``cuda_graph``), then CUDA and CPU as fallbacks for the
      nodes TensorRT does not take.
    """
    s = _settings(settings, overrides)
    if provider not in PROVIDERS:
        raise OnnxmpError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return [(PROVIDERS["cpu"], {})]
    if s.cuda_graph is None:
        raise ValueError("provider_options needs cuda_graph decided (True or False); build_session decides None")

    nhwc = s.nhwc
    if nhwc is None:
        if model is None:
            raise ValueError("provider_options needs the model to decide nhwc=None for cuda/tensorrt")
        nhwc = is_conv_heavy(model)
    fuse_conv_bias = nhwc if s.fuse_conv_bias is None else s.fuse_conv_bias
    cuda = {"device_id": str(s.device_id), "prefer_nhwc": _flag(nhwc)}
    if provider == "cuda":
        cuda["fuse_conv_bias"] = _flag(fuse_conv_bias)
        cuda["enable_cuda_graph"] = _flag(s.cuda_graph)
        return [(PROVIDERS["cuda"], cuda), (PROVIDERS["cpu"], {})]

    # tensorrt
    if s.trt_calibration_table is not None and not s.trt_int8:
        raise OnnxmpError("a TensorRT calibration table is only used with trt_int8; add --trt-int8 or drop the table")
    trt = {
        "device_id": str(s.device_id),
        "trt_fp16_enable": _flag(s.trt_fp16),
        "trt_int8_enable": _flag(s.trt_int8),
    }
    if s.trt_int8:
        if s.trt_calibration_table is not None:
            table = Path(s.trt_calibration_table).expanduser().resolve()
            if not table.is_file():
                raise OnnxmpError(
                    f"TensorRT calibration table '{table}' does not exist; give the path of the table "
                    "that calibration wrote"
                )
            # Absolute, because onnxruntime joins a relative name onto trt_engine_cache_path.
            trt["trt_int8_calibration_table_name"] = str(table)
        elif model is not None and not _has_qdq(_graph_proto(model)):
            raise OnnxmpError(
                "trt_int8 needs a calibration table (trt_calibration_table) for a model without "
                "QuantizeLinear/DequantizeLinear nodes; quantize it to QDQ form or calibrate first"
            )
    if model is None:
        raise ValueError("provider_options needs the model to name the TensorRT engine cache")
    precisions = "-".join(p for p, on in (("fp16", s.trt_fp16), ("int8", s.trt_int8)) if on) or "fp32"
    root = Path(s.trt_cache_dir).expanduser() if s.trt_cache_dir is not None else default_trt_cache_root()
    trt["trt_engine_cache_enable"] = "1"
    trt["trt_engine_cache_path"] = str(root.resolve() / f"{_model_digest(model)}-{precisions}")
    if s.cuda_graph:
        # CUDA's own graph capture needs every node on CUDA, which a TensorRT session never has.
        trt["trt_cuda_graph_enable"] = "1"
    return [(PROVIDERS["tensorrt"], trt), (PROVIDERS["cuda"], cuda), (PROVIDERS["cpu"], {})]


# -------------------------------------------------------------------------- sessions
_preloaded = False


def _preload_cuda_libraries(ort) -> None:
    """onnxruntime.preload_dlls() once (onnxruntime >= 1.21): CUDA/cuDNN from pip's nvidia-* wheels.

    A failure is not fatal here: CUDA may be installed system-wide; if it is not, session
    creation fails and _check_active says so.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - best effort, see the docstring
        pass
    _preloaded = True


def _check_available(ort, provider: str) -> None:
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise OnnxmpError(
            f"{PROVIDERS[provider]} is not available in onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)}); {_INSTALL_HINTS[provider]}"
        )


def _check_active(session, provider: str) -> None:
    """Refuse a session where onnxruntime silently fell back from the requested provider."""
    active = session.get_providers()
    if PROVIDERS[provider] in active:
        return
    if provider == "tensorrt":
        hint = (
            "TensorRT's libraries (libnvinfer) could not be loaded: install onnxmp[tensorrt] "
            "(tensorrt>=10 matching onnxruntime-gpu's CUDA version) and put its lib folder on "
            "LD_LIBRARY_PATH"
        )
    else:
        hint = (
            "the CUDA/cuDNN libraries could not be loaded: install the CUDA and cuDNN versions "
            "your onnxruntime-gpu was built for (for example PyTorch's nvidia-* wheels, which "
            "onnxruntime.preload_dlls() finds)"
        )
    raise OnnxmpError(
        f"onnxruntime fell back to {', '.join(active)} instead of {PROVIDERS[provider]}; {hint}"
    )


def _session_options(ort, optimization: str, threads: int | None):
    if optimization not in OPTIMIZATION_LEVELS:
        raise OnnxmpError(
            f"unknown optimization level '{optimization}'; choose one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if threads is not None:
        if threads < 1:
            raise OnnxmpError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    return options


@dataclass
class BuiltSession:
    """A session and the choices made for it: the provider chain asked for, whether CUDA graph
    capture is on, and notes on why a choice went the way it did (for reports)."""

    session: "onnxruntime.InferenceSession"
    provider: str
    providers: list[tuple[str, dict[str, str]]]
    cuda_graph: bool
    notes: list[str] = field(default_factory=list)


def build_session(
    model: str | os.PathLike | onnx.ModelProto,
    provider: str = "cpu",
    settings: SessionSettings | None = None,
    **overrides: Any,
) -> BuiltSession:
    """The onnxruntime session ``provider`` ("cpu", "cuda" or "tensorrt") wants for ``model``.

    ``overrides`` are SessionSettings fields; see provider_options for the provider chain.
    CUDA graph capture (cuda only; tensorrt passes it to TensorRT): with ``cuda_graph=None``
    it is on when ``onnxmp.placement.cuda_graph_blockers`` finds nothing in the way (static
    input shapes, no control flow, a CUDA kernel for every node) and, should onnxruntime still
    refuse it, the session is built again without it; the notes say why it is off. With
    ``cuda_graph=True`` a blocker is an error that lists them. For cuda and tensorrt,
    ``onnxruntime.preload_dlls()`` runs first where it exists. Raises OnnxmpError when the
    provider is not installed (with what to install), when onnxruntime cannot create the
    session, or when it silently fell back to another provider.
    """
    import onnxruntime as ort

    s = _settings(settings, overrides)
    if provider not in PROVIDERS:
        raise OnnxmpError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    if s.cuda_graph and provider == "cpu":
        raise OnnxmpError("CUDA graphs need the cuda or tensorrt provider; drop cuda_graph for cpu")
    _check_available(ort, provider)
    source = _session_source(model)
    notes: list[str] = []
    optimization = s.optimization
    if provider == "cpu" and optimization == "all" and computes_float16(_graph_proto(model).graph):
        optimization = "extended"  # see onnxmp.ir.computes_float16
        notes.append("optimization level 'extended', not 'all': onnxruntime's CPU provider can crash on float16 graphs at 'all'")
    options = _session_options(ort, optimization, s.threads)
    auto_graph = s.cuda_graph is None
    s = replace(s, cuda_graph=_decide_cuda_graph(model, provider, s.cuda_graph, notes))
    if provider != "cpu":
        _preload_cuda_libraries(ort)
    providers = provider_options(provider, model, s)
    if provider == "tensorrt":
        Path(providers[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    try:
        session = _create(ort, source, options, providers)
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        if s.cuda_graph and auto_graph:
            notes.append(f"CUDA graph off: onnxruntime refused capture ({_first_line(exc)})")
            s = replace(s, cuda_graph=False)
            providers = provider_options(provider, model, s)
            session = _create_or_raise(ort, source, options, providers, provider, model, False)
        else:
            raise _session_error(exc, provider, model, bool(s.cuda_graph)) from exc
    _check_active(session, provider)
    return BuiltSession(session, provider, providers, bool(s.cuda_graph), notes)


def _decide_cuda_graph(model, provider: str, wanted: bool | None, notes: list[str]) -> bool:
    """True/False as asked, checked against the model's blockers for cuda; None: the model decides."""
    from onnxmp.placement import cuda_graph_blockers

    if provider == "cpu" or wanted is False:
        return False
    if provider == "tensorrt":
        if wanted is None:
            notes.append("CUDA graph off: not decided automatically for TensorRT; ask for it with cuda_graph=True")
        return bool(wanted)
    blockers = cuda_graph_blockers(_graph_proto(model))
    if not blockers:
        return True
    shown = "; ".join(blockers[:3]) + (f"; and {len(blockers) - 3} more" if len(blockers) > 3 else "")
    if wanted:
        raise OnnxmpError(
            f"CUDA graph capture is not possible for '{_model_label(model)}': {shown}. Fix the input shapes "
            "(onnxmp optimize --fix-dim NAME=VALUE runs specialize-shapes) or drop cuda_graph"
        )
    notes.append(f"CUDA graph off: {shown}")
    return False


def _create(ort, source, options, providers):
    return ort.InferenceSession(
        source,
        sess_options=options,
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )


def _create_or_raise(ort, source, options, providers, provider: str, model, cuda_graph: bool):
    try:
        return _create(ort, source, options, providers)
    except Exception as exc:  # onnxruntime's own exception types
        raise _session_error(exc, provider, model, cuda_graph) from exc


def _session_error(exc: BaseException, provider: str, model, cuda_graph: bool) -> OnnxmpError:
    hint = ""
    if cuda_graph:
        hint = (
            "; CUDA graphs need every compute node on the GPU provider and fixed shapes: "
            "retry without cuda_graph"
        )
    return OnnxmpError(
        f"onnxruntime could not create a {provider} session for '{_model_label(model)}': "
        f"{_first_line(exc)}{hint}"
    )


def make_session(
    model: str | os.PathLike | onnx.ModelProto,
    provider: str = "cpu",
    settings: SessionSettings | None = None,
    **overrides: Any,
) -> "onnxruntime.InferenceSession":
    """build_session's session alone."""
    return build_session(model, provider, settings, **overrides).session


# ---------------------------------------------------------------------------- inputs
_INT_TYPES = {
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
}
_FLOAT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_BFLOAT16 = "tensor(bfloat16)"


@dataclass
class _Input:
    name: str
    type: str  # onnxruntime's "tensor(float16)" spelling
    shape: list[int]
    array: np.ndarray  # bfloat16 is held as its uint16 bit pattern

    def ortvalue(self, ort, device: str = "cpu", device_id: int = 0):
        if self.type == _BFLOAT16:
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(self.array, onnx.TensorProto.BFLOAT16)
            if device != "cpu":
                raise OnnxmpError(
                    f"input '{self.name}' is bfloat16, which cannot be copied to {device} from numpy; "
                    "keep FP32 model inputs (keep_io_types=true) or benchmark without I/O binding"
                )
            return value
        return ort.OrtValue.ortvalue_from_numpy(self.array, device, device_id)


def _resolve_shapes(session, batch: int, dims: dict[str, int]) -> list[tuple[Any, list[int]]]:
    specs = session.get_inputs()
    symbolic = {d for spec in specs for d in (spec.shape or []) if isinstance(d, str)}
    unknown = sorted(set(dims) - symbolic)
    if unknown:
        known = ", ".join(sorted(symbolic)) or "none"
        raise OnnxmpError(
            f"dim {', '.join(repr(u) for u in unknown)} is not a symbolic dimension of any model input; "
            f"the model's symbolic dimensions are: {known}"
        )
    for name, value in dims.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise OnnxmpError(f"dim '{name}' must be a positive integer, got {value!r}")
    resolved = []
    for spec in specs:
        shape = []
        for axis, dim in enumerate(spec.shape or []):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in dims:
                shape.append(int(dims[dim]))
            else:
                shape.append(batch if axis == 0 else 1)
        resolved.append((spec, shape))
    return resolved


def _effective_batch(resolved: list[tuple[Any, list[int]]], batch: int) -> int:
    """The batch the run really has: axis 0 of the first input with a rank."""
    for spec, shape in resolved:
        if not shape:
            continue
        first = spec.shape[0]
        if isinstance(first, int) and first >= 0 and batch not in (1, first):
            raise OnnxmpError(
                f"input '{spec.name}' has a static batch of {first}, so batch {batch} cannot be run; "
                f"use batch {first} or re-export the model with a dynamic batch dimension"
            )
        return shape[0]
    return batch


def _random_inputs(session, batch: int, dims: dict[str, int] | None, seed: int) -> tuple[list[_Input], int]:
    if batch < 1:
        raise OnnxmpError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    resolved = _resolve_shapes(session, batch, dict(dims or {}))
    inputs = []
    for spec, shape in resolved:
        kind = spec.type
        if kind in _FLOAT_TYPES:
            array = rng.standard_normal(shape, dtype=np.float32).astype(_FLOAT_TYPES[kind])
        elif kind == _BFLOAT16:
            floats = rng.standard_normal(shape, dtype=np.float32)
            array = (floats.view(np.uint32) >> 16).astype(np.uint16)
        elif kind in _INT_TYPES:
            # Values in [0, 2): valid indices for any vocabulary, token-type or mask table.
            array = rng.integers(0, 2, size=shape).astype(_INT_TYPES[kind])
        elif kind == "tensor(bool)":
            array = rng.random(shape) < 0.5
        else:
            raise OnnxmpError(
                f"input '{spec.name}' has type {kind}, for which no random data can be made; "
                "benchmark a model whose inputs are numeric tensors"
            )
        inputs.append(_Input(spec.name, kind, list(shape), np.ascontiguousarray(array)))
    return inputs, _effective_batch(resolved, batch)


def make_inputs(
    session: "onnxruntime.InferenceSession",
    batch: int = 1,
    dims: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs for ``session``: N(0, 1) floats in the input's dtype, integers in [0, 2)
    (token ids), random bools; bfloat16 inputs come as their uint16 bit patterns.

    Shapes: a symbolic or unknown first dimension is ``batch``; a symbolic dimension named in
    ``dims`` takes that value (on any axis, the first included); every other symbolic or unknown
    dimension is 1. A name in ``dims`` that no input has is an error (it is most likely a typo).
    """
    inputs, _ = _random_inputs(session, batch, dims, seed)
    return {item.name: item.array for item in inputs}


# ------------------------------------------------------------------------- benchmark
@dataclass
class BenchResult:
    """Latency of one model on one provider. Times are milliseconds per run of ``batch`` items."""

    model: str
    provider: str
    providers: list[str]  # what the session runs on, highest priority first
    provider_options: dict[str, dict[str, str]]  # what onnxmp asked for
    onnxruntime: str
    batch: int
    inputs: dict[str, dict[str, Any]]  # name -> {"dtype": ..., "shape": [...]}
    warmup: int
    repeats: int
    io_binding: bool
    cuda_graph: bool
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # items per second: batch / median seconds
    times_ms: list[float] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)  # why a session choice went the way it did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark(
    model: str | os.PathLike | onnx.ModelProto,
    provider: str = "cpu",
    batch: int = 1,
    warmup: int = 10,
    repeats: int = 50,
    io_binding: bool | None = None,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    settings: SessionSettings | None = None,
    **overrides: Any,
) -> BenchResult:
    """Time ``model`` on ``provider`` with random inputs (see make_inputs for shapes and values).

    The session comes from build_session(model, provider, settings, **overrides) (nhwc,
    cuda_graph, optimization, threads, trt_*; cuda_graph=None captures when the model allows).
    With ``io_binding`` (default: on for cuda and tensorrt, off for cpu; CUDA graphs need it)
    the inputs are copied to the device once and the outputs are bound to device buffers that
    stay the same for every run (fixed addresses, as CUDA graphs need): allocated up front when
    the output shapes are static, else by onnxruntime in one untimed run; each timed run is ``run_with_iobinding`` plus ``synchronize_outputs``, so it measures
    the finished GPU work and no host copies. Without it each run is ``session.run`` with host
    inputs and outputs, copies included. ``warmup`` untimed runs come first, then ``repeats``
    runs timed one by one with time.perf_counter.

    ``batch`` is the run's batch; for a model whose batch is static, the default batch=1 takes
    the model's batch, and any other value must match it.
    """
    import onnxruntime as ort

    if repeats < 1:
        raise OnnxmpError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise OnnxmpError(f"warmup cannot be negative, got {warmup}")
    if io_binding is None:
        io_binding = provider != "cpu"
    built = build_session(model, provider, settings, **overrides)
    session = built.session
    if built.cuda_graph and not io_binding:
        raise OnnxmpError("CUDA graphs replay on fixed device buffers, so they need I/O binding; drop io_binding=False")
    inputs, effective_batch = _random_inputs(session, batch, dims, seed)
    device_id = _settings(settings, overrides).device_id
    device = "cpu" if provider == "cpu" else "cuda"
    label = _model_label(model)

    try:
        if io_binding:
            run = _bound_runner(ort, session, inputs, device, device_id)
        else:
            run = _plain_runner(ort, session, inputs)
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000.0)
    except OnnxmpError:
        raise
    except Exception as exc:  # onnxruntime's run-time errors
        hint = "; retry without cuda_graph" if built.cuda_graph else ""
        raise OnnxmpError(f"onnxruntime failed to run '{label}' on {provider}: {_first_line(exc)}{hint}") from exc

    median = statistics.median(times)
    return BenchResult(
        model=label,
        provider=provider,
        providers=list(session.get_providers()),
        provider_options={name: dict(opts) for name, opts in built.providers},
        onnxruntime=ort.__version__,
        batch=effective_batch,
        inputs={i.name: {"dtype": _dtype_label(i.type), "shape": i.shape} for i in inputs},
        warmup=warmup,
        repeats=repeats,
        io_binding=io_binding,
        cuda_graph=built.cuda_graph,
        median_ms=median,
        p90_ms=float(np.percentile(times, 90)),
        mean_ms=statistics.fmean(times),
        min_ms=min(times),
        max_ms=max(times),
        throughput=effective_batch / (median / 1000.0) if median > 0 else float("inf"),
        times_ms=times,
        notes=built.notes,
    )


def _plain_runner(ort, session, inputs: list[_Input]) -> Callable[[], None]:
    if any(i.type == _BFLOAT16 for i in inputs):
        values = {i.name: i.ortvalue(ort) for i in inputs}
        return lambda: session.run_with_ort_values(None, values)
    feeds = {i.name: i.array for i in inputs}
    return lambda: session.run(None, feeds)


def _bound_runner(ort, session, inputs: list[_Input], device: str, device_id: int) -> Callable[[], None]:
    binding = session.io_binding()
    values = [i.ortvalue(ort, device, device_id) for i in inputs]  # kept alive by the closure
    for item, value in zip(inputs, values):
        binding.bind_ortvalue_input(item.name, value)
    binding.synchronize_inputs()
    specs = session.get_outputs()
    names = [o.name for o in specs]
    outputs = _allocate_outputs(ort, specs, device, device_id)
    if outputs is None:
        for name in names:
            binding.bind_output(name, device, device_id)
        session.run_with_iobinding(binding)  # onnxruntime allocates the outputs on the device
        outputs = binding.get_outputs()
        binding.clear_binding_outputs()
    for name, value in zip(names, outputs):
        binding.bind_ortvalue_output(name, value)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.keep_alive = (values, outputs)  # type: ignore[attr-defined]
    return run


def _allocate_outputs(ort, specs, device: str, device_id: int) -> list | None:
    """Device buffers for outputs whose shapes and numpy types are all known, else None."""
    dtypes = {**_FLOAT_TYPES, **_INT_TYPES, "tensor(bool)": np.bool_}
    if not all(o.type in dtypes and o.shape is not None and all(isinstance(d, int) and d >= 0 for d in o.shape) for o in specs):
        return None
    return [ort.OrtValue.ortvalue_from_shape_and_type(list(o.shape), dtypes[o.type], device, device_id) for o in specs]


def _dtype_label(ort_type: str) -> str:
    """onnxruntime's "tensor(float)" as onnxmp spells dtypes: "float32"."""
    name = ort_type[len("tensor(") : -1] if ort_type.startswith("tensor(") else ort_type
    return {"float": "float32", "double": "float64"}.get(name, name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
