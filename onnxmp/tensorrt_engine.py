"""Build a serialized TensorRT engine from an ONNX model (``onnxmp build-engine``).

TensorRT's own Python API does the work: its ONNX parser reads the model (a Q/DQ model carries
its INT8 scales in the graph: explicit quantization), a builder config carries the precision
flags, the workspace limit, an optimization profile for inputs with dynamic dimensions and,
for a float model built with INT8, a calibrator that hands TensorRT a calibration cache (no data
is calibrated here). ``tensorrt`` is imported when a build starts, never at import time; the
``onnxmp[tensorrt]`` extra installs it.

This module has not been run against a real TensorRT on the project's machines (none has one);
its tests drive it through a stand-in ``tensorrt`` module that records the calls.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxmp.errors import ModelLoadError, ModelSaveError, OnnxmpError

# Calibration cache header "TRT-<version>-<algorithm>" -> TensorRT's calibrator base class.
CALIBRATORS = {
    "EntropyCalibration2": "IInt8EntropyCalibrator2",
    "EntropyCalibration": "IInt8EntropyCalibrator",
    "MinMaxCalibration": "IInt8MinMaxCalibrator",
    "LegacyCalibration": "IInt8LegacyCalibrator",
}
MAX_PARSER_ERRORS = 5  # shown in the error message; the rest are counted


@dataclass(frozen=True)
class EngineOptions:
    """What the engine is built with. ``shapes`` fixes inputs whose dimensions are dynamic
    (one profile with min = opt = max); every dynamic input needs one."""

    fp16: bool = False
    int8: bool = False
    calibration_cache: Path | None = None
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)
    shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class EngineResult:
    path: Path
    bytes: int
    tensorrt: str
    precisions: list[str]
    inputs: dict[str, list[int]]  # the profile's shape of every input


def build_engine(model: str | os.PathLike, engine: str | os.PathLike, options: EngineOptions | None = None) -> EngineResult:
    """Parse ``model`` with TensorRT's ONNX parser, build the engine, write it to ``engine``
    atomically (a temporary file beside it, then a rename). Raises OnnxmpError with the parser's
    errors (node and description), or when the options do not fit the model."""
    options = options or EngineOptions()
    source, target = Path(model), Path(engine)
    proto = _read_graph(source)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    cache = _check_precision(options, quantized)
    _check_target(source, target)
    dynamic = _dynamic_inputs(proto)
    missing = sorted(set(dynamic) - set(options.shapes))
    if missing:
        listing = ", ".join(f"{n}: {dynamic[n]}" for n in missing)
        raise OnnxmpError(f"input(s) with dynamic dimensions need a shape for the engine ({listing}); give --shape INPUT=D0xD1x...")
    unknown = sorted(set(options.shapes) - set(_input_names(proto)))
    if unknown:
        raise OnnxmpError(f"--shape names {', '.join(unknown)}, not an input of '{source}'; its inputs: {', '.join(_input_names(proto))}")

    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        raise OnnxmpError(f"TensorRT's ONNX parser rejected '{source}': {_parser_errors(parser)}")
    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.int8:
        config.set_flag(trt.BuilderFlag.INT8)
        if cache is not None:
            config.int8_calibrator = _cache_calibrator(trt, cache)
    shapes = _profile(builder, network, config, options.shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OnnxmpError(
            f"TensorRT could not build an engine from '{source}' (its log above says why); try a larger "
            "--workspace or fewer precision flags"
        )
    data = memoryview(serialized).tobytes()
    _write_atomic(target, data)
    precisions = ["fp32"] + [p for p, on in (("fp16", options.fp16), ("int8", options.int8)) if on]
    return EngineResult(target, len(data), str(getattr(trt, "__version__", "?")), precisions, shapes)


# ------------------------------------------------------------------ checks before TensorRT
def _read_graph(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelLoadError(f"input model '{path}' does not exist or is not a file; check the path")
    try:
        return onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, ValueError from protobuf/onnx
        raise ModelLoadError(f"input model '{path}' is not a valid ONNX file ({str(exc).strip().splitlines()[0]})") from exc


def _check_precision(options: EngineOptions, quantized: bool) -> bytes | None:
    """The calibration cache's bytes when one is to be used; errors for combinations that cannot work."""
    if options.calibration_cache is None:
        if options.int8 and not quantized:
            raise OnnxmpError(
                "--int8 needs a Q/DQ model (quantize it to Q/DQ form first) or a TensorRT "
                "calibration cache (--calibration-cache) for a float model"
            )
        return None
    if not options.int8:
        raise OnnxmpError("--calibration-cache is only used with --int8; add --int8 or drop the cache")
    if quantized:
        raise OnnxmpError(
            "the model is already quantized (Q/DQ nodes carry its scales), so TensorRT would ignore "
            "--calibration-cache; drop it"
        )
    path = Path(options.calibration_cache)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxmpError(f"cannot read the calibration cache '{path}': {exc.strerror or exc}") from exc
    _calibrator_kind(data, path)
    return data


def _calibrator_kind(cache: bytes, path: Path | str = "the calibration cache") -> str:
    header = cache.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    parts = header.split("-", 2)
    if len(parts) != 3 or parts[0] != "TRT" or parts[2] not in CALIBRATORS:
        raise OnnxmpError(
            f"'{path}' is not a TensorRT calibration cache: its first line is '{header[:60]}', not "
            f"TRT-<version>-<{'|'.join(CALIBRATORS)}>"
        )
    return CALIBRATORS[parts[2]]


def _check_target(source: Path, target: Path) -> None:
    if target.exists() and target.resolve() == source.resolve():
        raise ModelSaveError(f"the engine '{target}' would overwrite the input model; choose another path")
    if target.is_dir():
        raise ModelSaveError(f"engine path '{target}' is a folder; give a file name such as {target / 'model.engine'}")
    if not target.resolve().parent.is_dir():
        raise ModelSaveError(f"cannot write '{target}': folder '{target.resolve().parent}' does not exist; create it first")


def _input_names(proto: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def _dynamic_inputs(proto: onnx.ModelProto) -> dict[str, str]:
    names = set(_input_names(proto))
    found = {}
    for info in proto.graph.input:
        if info.name not in names:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in info.type.tensor_type.shape.dim]
        if any(isinstance(d, str) for d in dims):
            found[info.name] = "[" + ",".join(str(d) for d in dims) + "]"
    return found


# ------------------------------------------------------------------ TensorRT
def _import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise OnnxmpError(
            f"building a TensorRT engine needs the tensorrt package ({exc}); install onnxmp[tensorrt] "
            "(tensorrt>=10, on a machine with an NVIDIA GPU and driver)"
        ) from exc


def _parser_errors(parser: Any) -> str:
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node_name = _call(error, "node_name")
        operator = _call(error, "node_operator")
        where = f"node '{node_name}'" if node_name else f"node #{_call(error, 'node')}"
        if operator:
            where += f" ({operator})"
        errors.append(f"{where}: {str(_call(error, 'desc')).strip()}")
    if not errors:
        return "no error was reported (is it an ONNX file TensorRT's parser supports?)"
    shown = "; ".join(errors[:MAX_PARSER_ERRORS])
    more = len(errors) - MAX_PARSER_ERRORS
    return shown + (f"; and {more} more" if more > 0 else "")


def _call(error: Any, method: str) -> Any:
    """An IParserError field; node_name/node_operator exist from TensorRT 8.6 on."""
    getter = getattr(error, method, None)
    return getter() if callable(getter) else None


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """A calibrator of the cache's algorithm that only reads the cache: TensorRT takes the
    scales from it and never asks for a batch."""
    base = getattr(trt, _calibrator_kind(cache))

    class CacheCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: bytes) -> None:
            return None

    return CacheCalibrator()


def _profile(builder: Any, network: Any, config: Any, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """One optimization profile fixing the dynamic inputs to ``shapes``; every input's shape."""
    resolved = {}
    profile = None
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = [int(d) for d in tensor.shape]
        if tensor.name in shapes:
            wanted = list(shapes[tensor.name])
            if len(wanted) != len(dims) or any(d >= 0 and d != w for d, w in zip(dims, wanted)):
                raise OnnxmpError(f"--shape {tensor.name}={'x'.join(map(str, wanted))} does not fit the input's shape {dims}")
            if any(d < 0 for d in dims):
                profile = profile or builder.create_optimization_profile()
                profile.set_shape(tensor.name, wanted, wanted, wanted)
            dims = wanted
        resolved[tensor.name] = dims
    if profile is not None:
        config.add_optimization_profile(profile)
    return resolved


def _write_atomic(target: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ModelSaveError(f"cannot write the engine '{target}': {exc.strerror or exc}") from exc
