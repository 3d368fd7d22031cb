"""Streaming statistics of the original (FP32) model's tensors on calibration data.

The requested tensors become extra outputs of a copy of the model, onnxruntime runs it on the CPU
with graph optimizations off (so every intermediate name still exists), one batch at a time, and
each batch's arrays are folded into fixed-size per-tensor counters and then dropped: memory does
not grow with the number of batches. Results are cached on disk, keyed by model, data and tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from onnxmp.data import Batch, BatchSource, input_specs
from onnxmp.errors import DataError, ModelLoadError
from onnxmp.ir import TWO_GB, all_initializers, save_proto

FP16_MAX = 65504.0
FP16_SMALLEST_NORMAL = 2.0**-14
FLOAT_TYPES = ("float32", "float16", "bfloat16")
_ORT_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
CACHE_VERSION = 1


@dataclass(frozen=True)
class TensorStats:
    """What calibration keeps of one tensor: a fixed set of numbers, whatever the data size.

    ``count`` counts every element; ``min``, ``max`` and ``absmax`` are over finite values only
    (inf/-inf/0 while there are none). ``underflow`` counts 0 < |v| < 2**-14 (float16 subnormal
    or zero), ``overflow`` counts finite |v| > 65504 (beyond float16's largest finite value),
    ``nonfinite`` counts NaN and +-Inf.
    """

    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    absmax: float = 0.0
    zeros: int = 0
    underflow: int = 0
    overflow: int = 0
    nonfinite: int = 0

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorStats":
        """Statistics of one array."""
        values = np.asarray(array, dtype=np.float32).ravel()
        finite_mask = np.isfinite(values)
        nonfinite = values.size - int(np.count_nonzero(finite_mask))
        finite = values[finite_mask] if nonfinite else values
        if finite.size == 0:
            return cls(count=values.size, nonfinite=nonfinite)
        magnitude = np.abs(finite)
        return cls(
            count=values.size,
            min=float(finite.min()),
            max=float(finite.max()),
            absmax=float(magnitude.max()),
            zeros=finite.size - int(np.count_nonzero(magnitude)),
            underflow=int(np.count_nonzero((magnitude > 0) & (magnitude < FP16_SMALLEST_NORMAL))),
            overflow=int(np.count_nonzero(magnitude > FP16_MAX)),
            nonfinite=nonfinite,
        )

    def merge(self, other: "TensorStats") -> "TensorStats":
        """The statistics of both arrays together."""
        return TensorStats(
            count=self.count + other.count,
            min=min(self.min, other.min),
            max=max(self.max, other.max),
            absmax=max(self.absmax, other.absmax),
            zeros=self.zeros + other.zeros,
            underflow=self.underflow + other.underflow,
            overflow=self.overflow + other.overflow,
            nonfinite=self.nonfinite + other.nonfinite,
        )

    @property
    def finite(self) -> int:
        return self.count - self.nonfinite

    @property
    def underflow_fraction(self) -> float:
        """Share of the finite non-zero values that float16 cannot hold as normal numbers."""
        nonzero = self.finite - self.zeros
        return self.underflow / nonzero if nonzero else 0.0

    @property
    def overflow_fraction(self) -> float:
        """Share of the finite values that exceed float16's range."""
        return self.overflow / self.finite if self.finite else 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorStats":
        return cls(**data)


# ------------------------------------------------------------------------------ collection
def collect_statistics(
    model: onnx.ModelProto,
    batches: BatchSource,
    tensors: list[str] | None = None,
    progress: bool = True,
) -> dict[str, TensorStats]:
    """Run ``model`` on every batch and return statistics per tensor name.

    ``tensors`` defaults to every float32/float16/bfloat16 graph input and node output of the
    main graph (tensors inside If/Loop bodies are not collected). ``model`` is not modified.
    Non-finite values in the data are refused (DataError naming the batch and input); NaN or Inf
    that the model computes are counted in ``nonfinite``.
    """
    specs = {s.name: s for s in input_specs(model)}
    float_inputs = [n for n, s in specs.items() if s.dtype.name in FLOAT_TYPES]
    node_outputs = _node_outputs(model.graph)
    wanted_inputs, wanted_outputs = _split_request(tensors, specs, node_outputs, float_inputs)
    with _session(_with_outputs(model, wanted_outputs)) as session:
        fetch = _fetched_outputs(session, wanted_outputs, tensors is not None)
        stats: dict[str, TensorStats] = {}
        for label, batch in _progress(batches, progress):
            _check_finite(label, batch, float_inputs)
            _update(stats, {n: batch[n] for n in wanted_inputs})
            _update(stats, _run(session, fetch, label, batch))
    return stats


def stream_tensors(
    model: onnx.ModelProto, batches: BatchSource, tensors: list[str], progress: bool = True
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Each batch's label and the arrays of ``tensors`` on it, one batch at a time.

    ``tensors`` are float graph inputs or node outputs of the main graph; only they become extra
    outputs, so onnxruntime hands back nothing else. Inputs are checked as in
    :func:`collect_statistics`. The session lives until the iteration ends. While the caller
    folds one batch's arrays, onnxruntime already runs the next batch in a worker thread (it
    releases the GIL), so at most two batches' arrays are alive at once; batches still come in
    order, and an error on a batch is raised when that batch is reached.
    """
    specs = {s.name: s for s in input_specs(model)}
    float_inputs = [n for n, s in specs.items() if s.dtype.name in FLOAT_TYPES]
    wanted_inputs, wanted_outputs = _split_request(tensors, specs, _node_outputs(model.graph), float_inputs)
    with _session(_with_outputs(model, wanted_outputs)) as session, ThreadPoolExecutor(1) as worker:
        fetch = _fetched_outputs(session, wanted_outputs, True)

        def compute(label: str, batch: Batch) -> tuple[str, dict[str, np.ndarray]]:
            _check_finite(label, batch, float_inputs)
            arrays = {n: batch[n] for n in wanted_inputs}
            arrays.update(_run(session, fetch, label, batch))
            return label, arrays

        pending: Future | None = None
        for label, batch in _progress(batches, progress):
            ahead = worker.submit(compute, label, batch)
            if pending is not None:
                yield pending.result()
            pending = ahead
        if pending is not None:
            yield pending.result()


def _node_outputs(graph: onnx.GraphProto) -> list[str]:
    names = dict.fromkeys(o for node in graph.node for o in node.output if o)
    return list(names)


def _split_request(
    tensors: list[str] | None, specs: dict[str, Any], node_outputs: list[str], float_inputs: list[str]
) -> tuple[list[str], list[str]]:
    """(graph inputs, node outputs) to collect; graph inputs are read from the batches."""
    if tensors is None:
        return float_inputs, node_outputs
    known = set(node_outputs)
    unknown = [t for t in tensors if t not in known and t not in specs]
    if unknown:
        raise DataError(
            f"cannot collect statistics of '{unknown[0]}': it is neither a graph input nor a node "
            "output of the model's main graph (initializers and subgraph tensors are not collected)"
        )
    not_float = [t for t in tensors if t in specs and t not in float_inputs]
    if not_float:
        _refuse_non_float(not_float[0], specs[not_float[0]].dtype.name)
    return [t for t in tensors if t in specs], [t for t in tensors if t in known]


def _refuse_non_float(name: str, dtype: str) -> None:
    raise DataError(
        f"cannot collect statistics of '{name}': it is {dtype}; statistics are kept for float tensors only"
    )


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names``; onnxruntime infers their types."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return copy


@contextmanager
def _session(model: onnx.ModelProto) -> Iterator[Any]:
    """An onnxruntime CPU session with optimizations off, so intermediate names survive.

    A model over 2 GB cannot be serialized in one piece: it is saved with external data to a
    temporary folder that lives as long as the session.
    """
    with ExitStack() as stack:
        if sum(t.ByteSize() for t in all_initializers(model.graph)) < TWO_GB:
            loadable: bytes | str = model.SerializeToString()
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxmp-calibration-"))
            loadable = str(Path(folder) / "model.onnx")
            save_proto(model, loadable, external_data=True)
        yield _create_session(loadable)


def _create_session(loadable: bytes | str) -> Any:
    """The session, with onnxruntime's graph optimizations on: the tensors asked for are graph
    outputs, which its fusions keep, and a fused kernel computes the same values up to float
    rounding, as the deployed model's session will (ResNet-18-like, 10 batches of 4: 1.97 ->
    1.35 s; the scales may move in the last bits). Its worker threads sleep between runs instead
    of spinning, since between two runs the caller folds the arrays into statistics and spinning
    threads would take its cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(loadable, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(
            f"onnxruntime cannot load the model for calibration: {str(exc).strip()[:500]}; "
            "check that the model runs in onnxruntime on the CPU"
        ) from exc


def _fetched_outputs(session: Any, wanted: list[str], explicit: bool) -> list[str]:
    """The wanted outputs that are float; asking for a non-float tensor by name is an error."""
    types = {o.name: o.type for o in session.get_outputs()}
    if explicit:
        for name in wanted:
            if types[name] not in _ORT_FLOAT_TYPES:
                _refuse_non_float(name, types[name])
    return [n for n in wanted if types[n] in _ORT_FLOAT_TYPES]


def _progress(batches: BatchSource, show: bool) -> Iterable[tuple[str, Batch]]:
    if not show:
        return batches.labelled()
    from rich.console import Console
    from rich.progress import track

    return track(
        batches.labelled(),
        total=len(batches),
        description="calibrating",
        console=Console(stderr=True),
        transient=True,
    )


def _check_finite(label: str, batch: Batch, float_inputs: list[str]) -> None:
    for name in float_inputs:
        finite = np.isfinite(np.asarray(batch[name], dtype=np.float32))
        if not finite.all():
            bad = finite.size - int(np.count_nonzero(finite))
            raise DataError(
                f"calibration batch '{label}': input '{name}' holds {bad} NaN or Inf values; "
                "clean the data (numpy.nan_to_num or drop those samples) before calibrating"
            )


def _run(session: Any, fetch: list[str], label: str, batch: Batch) -> dict[str, np.ndarray]:
    if not fetch:
        return {}
    try:
        return dict(zip(fetch, session.run(fetch, batch)))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise DataError(
            f"onnxruntime failed on calibration batch '{label}': {str(exc).strip()[:500]}; "
            "check that the data has the shapes and values the model expects"
        ) from exc


def _update(stats: dict[str, TensorStats], arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        batch_stats = TensorStats.of(array)
        stats[name] = stats[name].merge(batch_stats) if name in stats else batch_stats


# ------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    """``$ONNXMP_CACHE_DIR`` when set, else ``~/.cache/onnxmp/calibration``."""
    configured = os.environ.get("ONNXMP_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "onnxmp" / "calibration"


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the graph and opset imports, field by field so models over 2 GB hash too.

    Metadata and producer fields are left out: they do not change what the model computes.
    """
    digest = hashlib.sha256()
    for opset in model.opset_import:
        digest.update(f"opset {opset.domain}={opset.version}\0".encode())
    for field, value in model.graph.ListFields():
        digest.update(field.name.encode() + b"\0")
        for chunk in _field_chunks(value):
            digest.update(len(chunk).to_bytes(8, "little") + chunk)
    return "sha256:" + digest.hexdigest()


def _field_chunks(value: Any) -> Iterator[bytes]:
    """Bytes of a protobuf field value; a repeated field gives one chunk per item."""
    if isinstance(value, str):
        yield value.encode()
    elif hasattr(value, "SerializeToString"):
        yield value.SerializeToString(deterministic=True)
    else:
        for item in value:
            yield from _field_chunks(item)


def cache_key(model: onnx.ModelProto, data_digest: str, tensors: list[str] | None, digest: str | None = None) -> str:
    """The cache key of statistics of ``tensors`` (None: the default set) of ``model`` on data;
    ``digest``: the model's :func:`model_digest` when the caller has it (hashing a large model
    takes a while)."""
    text = json.dumps([CACHE_VERSION, digest or model_digest(model), data_digest, tensors], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class StatisticsCache:
    """Statistics stored as ``<folder>/<key>.json``, written atomically.

    A cache file that cannot be read counts as a miss; one that cannot be written is skipped with
    a warning, since the statistics themselves are still right.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, TensorStats] | None:
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
            if data.get("version") != CACHE_VERSION:
                return None
            return {name: TensorStats.from_json(s) for name, s in data["tensors"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def put(self, key: str, stats: dict[str, TensorStats]) -> None:
        text = json.dumps({"version": CACHE_VERSION, "tensors": {n: s.to_json() for n, s in stats.items()}})
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.path(key), text)
        except OSError as exc:
            warnings.warn(
                f"cannot write the calibration cache in '{self.folder}' ({exc.strerror or exc}); "
                "set ONNXMP_CACHE_DIR to a writable folder to reuse statistics",
                stacklevel=2,
            )


def _write_atomically(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class Calibrator:
    """Statistics of models on one data source, cached in ``cache_dir`` (None: no cache).

    ``digest`` identifies the data; the output model records it as ``onnxmp.calibration``.
    """

    def __init__(self, batches: BatchSource, cache_dir: str | os.PathLike | None = None, progress: bool = True):
        self.batches = batches
        self.cache = StatisticsCache(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self._histograms: dict[tuple[str, int, str], dict[str, Any]] = {}  # (model digest, bins, nonfinite) -> by tensor

    @property
    def digest(self) -> str:
        return self.batches.digest

    def statistics(self, model: onnx.ModelProto, tensors: list[str] | None = None) -> dict[str, TensorStats]:
        """Statistics of ``tensors`` (default: every float tensor) of ``model``, from the cache if there."""
        if self.cache is None:
            return collect_statistics(model, self.batches, tensors, self.progress)
        key = cache_key(model, self.digest, tensors)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        stats = collect_statistics(model, self.batches, tensors, self.progress)
        self.cache.put(key, stats)
        return stats

    def histograms(self, model: onnx.ModelProto, tensors: list[str], bins: int, nonfinite: str = "count") -> dict[str, Any]:
        """|x| histograms of ``tensors`` of ``model`` (see :func:`onnxmp.quant_calibration.collect_histograms`),
        cached next to the statistics, and kept in memory: a later call on the same model (the
        accuracy fallback reruns the pipeline) observes only the tensors not seen yet."""
        from onnxmp.quant_calibration import collect_histograms

        digest = model_digest(model)
        seen = self._histograms.setdefault((digest, bins, nonfinite), {})
        missing = [name for name in dict.fromkeys(tensors) if name not in seen]
        if missing:
            folder = self.cache.folder if self.cache is not None else None
            seen.update(collect_histograms(model, self.batches, missing, bins, self.progress, folder, nonfinite, digest))
        return {name: seen[name] for name in dict.fromkeys(tensors)}

