"""Calibration and validation data: what the model's inputs are, and batches that match them.

Data on disk is either a folder with one ``.npz`` (or ``.npy``) file per batch, or one ``.npz``
file cut into batches of ``batch_size`` rows. Every file's array headers are checked against the
model's inputs when the source is opened, so a wrong name, dtype or shape fails before any
inference runs; array data is read only while iterating, one file at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxmp.errors import DataError
from onnxmp.ir import Model, elem_type

Batch = dict[str, np.ndarray]
Dim = Union[int, str, None]
RANDOM_INT_HIGH = 2  # integers in [0, 2): valid as indices into any table, masks and token types included
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and shape.

    A dimension is an int (static), a str (symbolic, such as ``"N"``) or None (unknown).
    ``shape`` is None when the model does not give the input's rank.
    """

    name: str
    dtype: np.dtype
    shape: list[Dim] | None

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype.name}{_format_shape(self.shape)}"


def input_specs(model: Model | onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers, in graph order."""
    if isinstance(model, onnx.ModelProto):
        return _proto_specs(model.graph)
    return [_gs_spec(t) for t in model.graph.inputs if isinstance(t, gs.Variable)]


def _proto_specs(graph: onnx.GraphProto) -> list[InputSpec]:
    initializers = {t.name for t in graph.initializer}
    return [_proto_spec(info) for info in graph.input if info.name not in initializers]


def _proto_spec(info: onnx.ValueInfoProto) -> InputSpec:
    if not info.type.HasField("tensor_type"):
        raise DataError(
            f"model input '{info.name}' is not a tensor (it is a {info.type.WhichOneof('value')}); "
            "onnxmp reads data for tensor inputs only"
        )
    tensor_type = info.type.tensor_type
    shape = [_proto_dim(d) for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else None
    return InputSpec(info.name, _np_dtype(info.name, tensor_type.elem_type), shape)


def _proto_dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def _gs_spec(tensor: gs.Variable) -> InputSpec:
    shape = None if tensor.shape is None else [_gs_dim(d) for d in tensor.shape]
    return InputSpec(tensor.name, _np_dtype(tensor.name, elem_type(tensor)), shape)


def _gs_dim(dim: object) -> Dim:
    if isinstance(dim, (int, np.integer)):
        return int(dim) if dim >= 0 else None
    return dim if isinstance(dim, str) and dim else None


def _np_dtype(name: str, onnx_type: int | None) -> np.dtype:
    if not onnx_type:
        raise DataError(f"model input '{name}' has no element type; re-export the model with typed inputs")
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def is_float(dtype: np.dtype) -> bool:
    """True for float16, float32, float64 and bfloat16 (an ml_dtypes type numpy files as 'V')."""
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def _format_shape(shape: list[Dim] | tuple[int, ...] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


# ------------------------------------------------------------------------------ sources
class BatchSource(ABC):
    """An iterable of batches (``{input name: array}``), produced lazily.

    ``digest`` identifies the data (for caches and provenance); ``description`` says in words
    where it comes from.
    """

    description: str

    @abstractmethod
    def labelled(self) -> Iterator[tuple[str, Batch]]:
        """Each batch with a label that names it in messages (a file name, rows, an index)."""

    @abstractmethod
    def __len__(self) -> int:
        """How many batches iteration yields."""

    @property
    @abstractmethod
    def digest(self) -> str:
        """``sha256:<hex>``, the same for the same data wherever it lies."""

    def __iter__(self) -> Iterator[Batch]:
        for _, batch in self.labelled():
            yield batch

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.description}>"


class FileBatches(BatchSource):
    """One batch per file: a folder's ``.npz``/``.npy`` files in name order, or one ``.npz``."""

    def __init__(self, files: list[Path], specs: list[InputSpec], description: str):
        self.files = files
        self.specs = specs
        self.description = description

    def labelled(self) -> Iterator[tuple[str, Batch]]:
        for path in self.files:
            yield path.name, _read_arrays(path, self.specs)

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def digest(self) -> str:
        return _files_digest(self.files, "files")


class SplitBatches(BatchSource):
    """One ``.npz`` whose arrays share a first (batch) axis, cut into ``batch_size`` rows each.

    The last batch holds the remaining rows and may be smaller.
    """

    def __init__(self, path: Path, specs: list[InputSpec], rows: int, batch_size: int):
        self.path = path
        self.specs = specs
        self.rows = rows
        self.batch_size = batch_size
        self.description = f"'{path}' cut into {len(self)} batches of up to {batch_size} rows"

    def labelled(self) -> Iterator[tuple[str, Batch]]:
        arrays = _read_arrays(self.path, self.specs)
        for start in range(0, self.rows, self.batch_size):
            stop = min(start + self.batch_size, self.rows)
            yield f"{self.path.name} rows {start}:{stop}", {k: v[start:stop] for k, v in arrays.items()}

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @cached_property
    def digest(self) -> str:
        return _files_digest([self.path], f"split:{self.batch_size}")


class RandomBatches(BatchSource):
    """Random inputs shaped like the model's, for smoke tests only.

    Statistics of random data say nothing about real activations, so calibrating on it gives
    meaningless scales. Floats are standard normal, integers uniform in [0, 2) (valid indices for any embedding, mask or token-type table), bools fair coins.
    A symbolic or unknown dimension is ``batch_size`` where it is the first axis of some input,
    otherwise 1. Every iteration yields the same batches.
    """

    def __init__(self, specs: list[InputSpec], count: int, batch_size: int, seed: int):
        self.specs = specs
        self.count = count
        self.batch_size = batch_size
        self.seed = seed
        self.shapes = _random_shapes(specs, batch_size)
        self.description = (
            f"random data, {count} batches of {batch_size} (seed {seed}): for smoke tests only, "
            "meaningless for calibration"
        )

    def labelled(self) -> Iterator[tuple[str, Batch]]:
        rng = np.random.default_rng(self.seed)
        for index in range(self.count):
            yield f"random batch {index}", {s.name: _random_array(rng, s, self.shapes[s.name]) for s in self.specs}

    def __len__(self) -> int:
        return self.count

    @property
    def digest(self) -> str:
        params = {
            "kind": "random",
            "specs": [[s.name, s.dtype.name, s.shape] for s in self.specs],
            "count": self.count,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "int_high": RANDOM_INT_HIGH,
        }
        text = json.dumps(params, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _files_digest(files: list[Path], kind: str) -> str:
    """Hash file names (not folders, so moving the data keeps the digest) and contents."""
    digest = hashlib.sha256(kind.encode() + b"\0")
    for path in files:
        digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------------------ loading
def load_batches(path: str | os.PathLike, specs: list[InputSpec], batch_size: int | None = None) -> BatchSource:
    """Open calibration or validation data at ``path`` and check it against ``specs``.

    ``path`` is a folder holding one batch per ``.npz`` file (one array per input name) or per
    ``.npy`` file (only for single-input models), taken in name order (zero-pad the numbers:
    ``batch_010`` sorts after ``batch_009``, ``batch_10`` does not); other files are ignored.
    Or ``path`` is one ``.npz`` file: it is ONE batch, unless ``batch_size`` is given, in which
    case every array's first axis is the batch axis and is cut into batches of that many rows.
    ``batch_size`` does not apply to folders.

    Names, dtypes (exactly: nothing is cast), ranks and static dimensions are checked now from the
    file headers; symbolic dimensions may take any value, the same within one batch.
    """
    path = Path(path)
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    if path.is_dir():
        return _load_folder(path, specs, batch_size)
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, specs, batch_size)
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist; check the path")
    raise DataError(f"data path '{path}' is neither a folder of .npz/.npy batch files nor a .npz file")


def _load_folder(folder: Path, specs: list[InputSpec], batch_size: int | None) -> FileBatches:
    if batch_size is not None:
        raise DataError(
            f"batch size {batch_size} given for folder '{folder}', whose files are one batch each; "
            "leave the batch size out, or give one .npz file to cut into batches"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
    if not files:
        raise DataError(
            f"data folder '{folder}' holds no .npz or .npy files; save one batch per file, "
            "e.g. numpy.savez(folder / 'batch_000.npz', **inputs)"
        )
    for path in files:
        _check_batch(f"'{path}'", _read_headers(path, specs), specs)
    return FileBatches(files, specs, f"folder '{folder}' ({len(files)} batch files)")


def _load_npz(path: Path, specs: list[InputSpec], batch_size: int | None) -> BatchSource:
    headers = _read_headers(path, specs)
    if batch_size is None:
        _check_batch(f"'{path}'", headers, specs)
        return FileBatches([path], specs, f"'{path}' (one batch)")
    _check_names(f"'{path}'", headers, specs)
    rows = _row_count(path, headers)
    for start in sorted({0, (rows - 1) // batch_size * batch_size}):  # the full and the last batch
        stop = min(start + batch_size, rows)
        sliced = {k: _ArrayHeader((stop - start,) + h.shape[1:], h.dtype) for k, h in headers.items()}
        _check_batch(f"'{path}' rows {start}:{stop}", sliced, specs)
    return SplitBatches(path, specs, rows, batch_size)


def _row_count(path: Path, headers: dict[str, _ArrayHeader]) -> int:
    scalars = [name for name, h in headers.items() if not h.shape]
    if scalars:
        raise DataError(
            f"'{path}': array '{scalars[0]}' is a scalar, so it has no batch axis to cut; "
            "save arrays with the batch axis first"
        )
    rows = {name: h.shape[0] for name, h in headers.items()}
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name}: {count}" for name, count in rows.items())
        raise DataError(
            f"'{path}': arrays have different numbers of rows ({counts}); "
            "to cut it into batches, every array needs the same first (batch) dimension"
        )
    count = next(iter(rows.values()))
    if count == 0:
        raise DataError(f"'{path}' holds 0 rows, so it gives no batches; save some data")
    return count


# ------------------------------------------------------------------------------ file reading
@dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def _read_headers(path: Path, specs: list[InputSpec]) -> dict[str, _ArrayHeader]:
    """Shape and dtype of each array in the file, read from the headers without the data."""
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as stream:
                return {_npy_name(path, specs): _read_header(stream)}
        with zipfile.ZipFile(path) as archive:
            return {_member_name(path, m): _read_member_header(archive, m) for m in archive.namelist()}
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _read_member_header(archive: zipfile.ZipFile, member: str) -> _ArrayHeader:
    with archive.open(member) as stream:
        return _read_header(stream)


def _read_header(stream) -> _ArrayHeader:
    major, _ = np.lib.format.read_magic(stream)
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(stream)
    return _ArrayHeader(tuple(shape), np.dtype(dtype))


def _member_name(path: Path, member: str) -> str:
    if not member.endswith(".npy"):
        raise DataError(f"'{path}' holds '{member}', which is not a numpy array; write the file with numpy.savez")
    return member[: -len(".npy")]


def _npy_name(path: Path, specs: list[InputSpec]) -> str:
    """A .npy file holds one unnamed array: it can only be the model's one input."""
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise DataError(
            f"'{path}' is a .npy file, which holds one array, but the model has {len(specs)} inputs "
            f"({names}); save each batch as .npz with one array per input name"
        )
    return specs[0].name


def _read_arrays(path: Path, specs: list[InputSpec]) -> Batch:
    try:
        if path.suffix == ".npy":
            return {_npy_name(path, specs): np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"'{path}' is not a readable .npz/.npy file ({type(exc).__name__}: {exc}); "
        "it may be truncated: write it again with numpy.savez or numpy.save"
    )


# ------------------------------------------------------------------------------ checks
def _check_batch(where: str, headers: dict[str, _ArrayHeader], specs: list[InputSpec]) -> None:
    """Raise DataError unless the arrays described by ``headers`` can feed the model."""
    _check_names(where, headers, specs)
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        header = headers[spec.name]
        _check_dtype(where, spec, header)
        _check_shape(where, spec, header)
        _bind_symbols(where, spec, header, bound)


def _check_names(where: str, headers: dict[str, _ArrayHeader], specs: list[InputSpec]) -> None:
    wanted = [s.name for s in specs]
    missing = [n for n in wanted if n not in headers]
    if missing:
        raise DataError(
            f"{where} has no array for input '{missing[0]}' (the model's inputs: {', '.join(wanted)}); "
            "save one array per input name, e.g. numpy.savez(path, **{name: array})"
        )
    extra = [n for n in headers if n not in wanted]
    if extra:
        raise DataError(
            f"{where} holds array '{extra[0]}', which is not an input of the model "
            f"(inputs: {', '.join(wanted)}); rename or remove it"
        )


def _check_dtype(where: str, spec: InputSpec, header: _ArrayHeader) -> None:
    if header.dtype != spec.dtype:
        raise DataError(
            f"{where}: input '{spec.name}' is {header.dtype.name} but the model wants "
            f"{spec.dtype.name}; convert it with .astype('{spec.dtype.name}') before saving"
        )


def _check_shape(where: str, spec: InputSpec, header: _ArrayHeader) -> None:
    if spec.shape is None:
        return
    got = _format_shape(header.shape)
    if len(header.shape) != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has {len(header.shape)} dimensions {got} but the model "
            f"wants {len(spec.shape)}: {_format_shape(spec.shape)}; reshape it"
        )
    for axis, (have, want) in enumerate(zip(header.shape, spec.shape)):
        if isinstance(want, int) and have != want:
            raise DataError(
                f"{where}: input '{spec.name}' has shape {got} but the model wants "
                f"{_format_shape(spec.shape)} (dimension {axis} must be {want})"
            )


def _bind_symbols(where: str, spec: InputSpec, header: _ArrayHeader, bound: dict[str, tuple[int, str]]) -> None:
    """A symbolic dimension named in several inputs must have one value within a batch."""
    for have, want in zip(header.shape, spec.shape or []):
        if not isinstance(want, str):
            continue
        value, first = bound.setdefault(want, (have, spec.name))
        if value != have:
            raise DataError(
                f"{where}: dimension '{want}' is {value} in input '{first}' but {have} in input "
                f"'{spec.name}'; the model needs the same value in both"
            )


# ------------------------------------------------------------------------------ random data
def random_batches(specs: list[InputSpec], count: int, batch_size: int = 1, seed: int = 0) -> BatchSource:
    """Random batches matching ``specs``: for smoke tests only, meaningless for calibration.

    See :class:`RandomBatches` for the values and how symbolic dimensions are sized.
    """
    if count < 1 or batch_size < 1:
        raise DataError(f"random data needs at least 1 batch of at least 1 row, not {count} of {batch_size}")
    return RandomBatches(specs, count, batch_size, seed)


def _random_shapes(specs: list[InputSpec], batch_size: int) -> dict[str, tuple[int, ...]]:
    for spec in specs:
        _check_randomizable(spec)
    batch_symbols = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    return {
        s.name: tuple(_random_dim(d, axis, batch_symbols, batch_size) for axis, d in enumerate(s.shape))
        for s in specs
    }


def _check_randomizable(spec: InputSpec) -> None:
    if spec.shape is None:
        raise DataError(
            f"model input '{spec.name}' has no shape, so random data cannot be made for it; give real data"
        )
    if not (is_float(spec.dtype) or spec.dtype.kind in "iub"):
        raise DataError(
            f"model input '{spec.name}' is {spec.dtype.name}; random data is made for numbers and bools only"
        )


def _random_dim(dim: Dim, axis: int, batch_symbols: set[str], batch_size: int) -> int:
    if isinstance(dim, int):
        return dim
    if (dim is None and axis == 0) or dim in batch_symbols:
        return batch_size
    return 1


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    if is_float(spec.dtype):
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, RANDOM_INT_HIGH, size=shape, dtype=spec.dtype)
