"""Quantization calibration: fixed-size histograms, clipping thresholds, scales, and exports.

:func:`collect_histograms` runs the float32 model once over the calibration data and folds each
batch of every tensor to be quantized into a :class:`TensorHistogram` of ``|x|`` whose size is
fixed, so memory does not grow with the number of batches. A range method turns a histogram into
a clipping threshold ``t`` (values with ``|x| > t`` saturate):

============  ==================================================================================
method        threshold
============  ==================================================================================
minmax        the largest ``|x|`` seen: nothing clips.
percentile    the given percentile of ``|x|`` (default 99.99), interpolated linearly in a bin.
entropy       TensorRT's entropy calibration: for every bin edge from ``levels`` bins upward, the
              distribution below it (values beyond folded into its last bin) is compared with the
              same distribution quantized to ``levels`` levels (128 for int8), by KL divergence;
              the edge with the smallest divergence wins (the larger one on a tie).
mse           the bin edge that minimizes the expected squared error of quantizing every value:
              rounding error for values inside the range, distance to ``t`` for values beyond it,
              computed exactly for values spread evenly within each bin.
============  ==================================================================================

Exact zeros (ReLU outputs, padding) are quantized without error at any threshold, so entropy and
mse leave them out; otherwise a spike at zero drags the threshold down. :func:`quantization_params`
turns thresholds into scales and zero points, and the writers hand them to TensorRT and to
onnxruntime (see each writer for the format and where it was taken from).
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from onnxmp.calibration import cache_key, stream_tensors
from onnxmp.data import BatchSource
from onnxmp.errors import DataError, OnnxmpError
from onnxmp.ir import write_text_atomic

DEFAULT_BINS = 2048
MIN_BINS = 512
METHODS = ("minmax", "percentile", "entropy", "mse")
DTYPES = ("int8", "uint8", "float8e4m3fn")
ORT_QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8", "float8e4m3fn": "QFLOAT8E4M3FN"}
FP8_E4M3FN_MAX = 448.0
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
HISTOGRAM_CACHE_VERSION = 3
DEFAULT_TENSORRT_VERSION = "10.0.0"
_CHUNK = 1 << 16  # values binned per numpy pass: its buffers (768 kB) stay in a core's cache between passes
_CANDIDATE_ROWS = 64  # mse thresholds evaluated per pass: bounds its (rows x bins) temporaries
_BOUND_MARGIN = 1e-9  # of an mse lower bound's terms: floating-point error is some 1e-13 of them


# ------------------------------------------------------------------------------ histogram
class TensorHistogram:
    """A histogram of ``|x|`` of one tensor: ``bins`` equal bins over ``[0, range)``.

    ``range`` is the smallest power of two above every ``|x|`` seen (0 while all were 0). When a
    batch exceeds it, the range doubles and neighbouring bins merge in pairs, as often as needed,
    so the histogram keeps ``bins`` counts however many batches come. Since the range depends only
    on the largest ``|x|`` and the bin edges are exact binary fractions of it, the counts equal
    those of one histogram of all the data, whatever the batches and their order; the observed
    values fill between half and all of the bins.

    ``count`` counts every finite value, ``zeros`` the exact zeros; ``min`` and ``max`` are exact
    (inf and -inf while nothing was seen). ``nonfinite`` counts NaN/Inf values that
    :meth:`update` dropped when told to (``nonfinite="count"``), ``nonfinite_batch`` names the
    first batch that held one.
    """

    def __init__(self, name: str, bins: int = DEFAULT_BINS):
        _check_bins(bins)
        self.name = name
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.range = 0.0
        self.count = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0
        self.nonfinite_batch: str | None = None
        self.params: dict[tuple, "QuantParams"] = {}  # by (method, symmetric, dtype, percentile); update() clears it

    @property
    def width(self) -> float:
        return self.range / self.bins

    @property
    def absmax(self) -> float:
        return max(-self.min, self.max) if self.count else 0.0

    def update(self, values: np.ndarray, batch: str, nonfinite: str = "raise") -> None:
        """Add one array's values. NaN or Inf is a DataError naming the tensor and ``batch``, or
        with ``nonfinite="count"`` is dropped and counted in ``nonfinite``."""
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        self.params.clear()
        low, high = float(flat.min()), float(flat.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            if nonfinite != "count":
                raise self._nonfinite(flat, batch)
            finite = np.isfinite(flat)
            self.nonfinite += flat.size - int(np.count_nonzero(finite))
            self.nonfinite_batch = self.nonfinite_batch or batch
            flat = flat[finite]
            if flat.size == 0:
                return
            low, high = float(flat.min()), float(flat.max())
        self._cover(max(-low, high))
        self._add(flat, low >= 0)
        self.count += flat.size
        self.min, self.max = min(self.min, low), max(self.max, high)

    def _nonfinite(self, flat: np.ndarray, batch: str) -> DataError:
        bad = flat.size - int(np.count_nonzero(np.isfinite(flat)))
        return DataError(
            f"tensor '{self.name}' holds {bad} NaN or Inf values on calibration batch '{batch}', "
            "so it has no quantization range; check that the data is preprocessed as the model "
            "expects, or leave this tensor out of quantization"
        )

    def _cover(self, absmax: float) -> None:
        """Grow ``range`` to the smallest power of two above ``absmax``, merging bins."""
        if absmax == 0 or absmax < self.range:
            return
        new_range = math.ldexp(1.0, math.frexp(absmax)[1])
        if self.range:  # while the range is 0 every count sits in bin 0, right at any range
            self.counts = _merge_bins(self.counts, round(new_range / self.range))
        self.range = new_range

    def _add(self, flat: np.ndarray, nonnegative: bool) -> None:
        """Bin finite values that the range covers, a chunk at a time through two buffers made
        once per call: each pass then reads and writes memory that is still in the cache.
        ``nonnegative``: no value is below 0 (Relu outputs), so the values are their own
        magnitudes (-0.0 lands in bin 0 too) and need no pass of ``abs``."""
        if not self.range:  # the range stays 0 only while every value is 0
            self.zeros += flat.size
            self.counts[0] += flat.size
            return
        size = min(flat.size, _CHUNK)
        magnitude_buffer, index_buffer = np.empty(size, np.float32), np.empty(size, np.intp)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            index = index_buffer[: chunk.size]
            magnitude = chunk if nonnegative else np.abs(chunk, out=magnitude_buffer[: chunk.size])
            self.zeros += int(np.count_nonzero(magnitude == 0))  # faster than counting nonzero floats
            _bin_index(magnitude, self.bins, self.range, index)
            self.counts += np.bincount(index, minlength=self.bins)

    def nonzero_counts(self) -> np.ndarray:
        """The counts as float64 with the exact zeros taken out of bin 0."""
        counts = self.counts.astype(np.float64)
        counts[0] -= self.zeros
        return counts

    def clip_fraction(self, threshold: float) -> float:
        """Share of the values with ``|x| > threshold``; values spread evenly within a bin."""
        if not self.count or threshold >= self.absmax:
            return 0.0
        position = threshold / self.width
        whole = int(position)
        counts = self.nonzero_counts()
        above = counts[whole + 1 :].sum() + counts[whole] * (1.0 - (position - whole))
        return float(above) / self.count

    def to_json(self) -> dict[str, Any]:
        """The histogram as JSON values; the counts as base64 of little-endian int64 (writing them
        as a list of numbers took 2 ms per 11 tensors)."""
        return {
            "name": self.name, "bins": self.bins, "range": self.range, "count": self.count,
            "zeros": self.zeros, "min": self.min, "max": self.max,
            "counts": base64.b64encode(self.counts.astype("<i8").tobytes()).decode("ascii"),
            "nonfinite": self.nonfinite, "nonfinite_batch": self.nonfinite_batch,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorHistogram":
        histogram = cls(data["name"], data["bins"])
        counts = np.frombuffer(base64.b64decode(data["counts"], validate=True), dtype="<i8").astype(np.int64)
        if counts.shape != (histogram.bins,):
            raise ValueError(f"{counts.size} counts for {histogram.bins} bins")
        histogram.counts = counts
        histogram.range, histogram.min, histogram.max = float(data["range"]), float(data["min"]), float(data["max"])
        histogram.count, histogram.zeros = int(data["count"]), int(data["zeros"])
        histogram.nonfinite, histogram.nonfinite_batch = int(data["nonfinite"]), data["nonfinite_batch"]
        return histogram


def _check_bins(bins: int) -> None:
    if bins < MIN_BINS or bins & (bins - 1):
        raise OnnxmpError(
            f"a calibration histogram needs a power of two of at least {MIN_BINS} bins, not {bins}; "
            f"the default is {DEFAULT_BINS}"
        )


def _bin_index(magnitude: np.ndarray, bins: int, value_range: float, index: np.ndarray) -> None:
    """Write ``floor(|x| * bins / range)`` into ``index``, exactly: the factor is a power of two.
    The product is cast as it is written, and ``index`` is of the type that ``np.bincount``
    counts (intp), so neither needs a pass of its own."""
    shift = bins.bit_length() - math.frexp(value_range)[1]  # bins / range == 2**shift
    if -126 <= shift <= 127:  # 2**shift is a normal float32
        np.multiply(magnitude, np.float32(math.ldexp(1.0, shift)), out=index, casting="unsafe")
    else:
        np.ldexp(magnitude, shift, out=index, casting="unsafe")


def _merge_bins(counts: np.ndarray, factor: int) -> np.ndarray:
    """Counts of bins ``factor`` times as wide, over a range ``factor`` times as large."""
    merged = np.zeros_like(counts)
    if factor >= counts.size:
        merged[0] = counts.sum()
    else:
        merged[: counts.size // factor] = counts.reshape(-1, factor).sum(axis=1)
    return merged


# ------------------------------------------------------------------------------ collection
def collect_histograms(
    model: onnx.ModelProto,
    batches: BatchSource,
    tensors: list[str],
    bins: int = DEFAULT_BINS,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    nonfinite: str = "raise",
    digest: str | None = None,
) -> dict[str, TensorHistogram]:
    """Histograms of ``tensors`` (graph inputs or node outputs) of ``model`` over every batch.

    One pass over the data; only ``tensors`` are fetched from onnxruntime. NaN/Inf in the data
    itself is always a DataError naming the batch file and input; NaN/Inf that the model
    computes is a DataError naming the tensor and batch, or with ``nonfinite="count"`` is
    counted in the histogram's ``nonfinite`` (the quantizer then keeps that tensor float). With
    ``cache_dir`` the histograms are read from, or written to,
    ``histograms-<bins>-<key>.json`` there, keyed by the model's graph, the data, the tensors and
    ``nonfinite``, as :class:`onnxmp.calibration.Calibrator` keys its statistics. The range
    method is not part of the key: it is applied to the histograms afterwards, so every method
    reuses the same cached histograms. ``digest``: the model's ``model_digest``, when known.
    """
    names = list(dict.fromkeys(tensors))
    _check_bins(bins)
    if nonfinite not in ("raise", "count"):
        raise OnnxmpError(f"nonfinite must be 'raise' or 'count', not {nonfinite!r}")
    path = None
    if cache_dir is not None:
        key = cache_key(model, f"{batches.digest};nonfinite={nonfinite}", sorted(names), digest)
        path = Path(cache_dir) / f"histograms-{bins}-{key}.json"
        cached = _read_cache(path)
        if cached is not None:
            return cached
    histograms = {name: TensorHistogram(name, bins) for name in names}
    seen = 0
    for label, arrays in stream_tensors(model, batches, names, progress):
        seen += 1
        for name, array in arrays.items():
            histograms[name].update(array, label, nonfinite)
    if not seen:
        source = getattr(batches, "description", "the calibration data")
        raise DataError(f"{source} gives no calibration batches; give at least one")
    if path is not None:
        _write_cache(path, histograms)
    return histograms


def _read_cache(path: Path) -> dict[str, TensorHistogram] | None:
    """The cached histograms, or None when the file is missing, unreadable or of another version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != HISTOGRAM_CACHE_VERSION:
            return None
        return {h["name"]: TensorHistogram.from_json(h) for h in data["tensors"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OnnxmpError):
        return None


def _write_cache(path: Path, histograms: dict[str, TensorHistogram]) -> None:
    text = json.dumps({"version": HISTOGRAM_CACHE_VERSION, "tensors": [h.to_json() for h in histograms.values()]})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as exc:
        warnings.warn(
            f"cannot write the histogram cache '{path}' ({exc.strerror or exc}); "
            "give a writable cache folder to reuse histograms",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------ grids
@dataclass(frozen=True)
class _Grid:
    """Where a quantizer puts ``|x| / threshold`` in [0, 1]: from ``starts[i]`` on, a grid point
    every ``steps[i]``. Integer types have one segment; float8 doubles its step every binade.
    Every segment start is a grid point, which makes the rounding error integral exact."""

    starts: np.ndarray
    steps: np.ndarray

    @classmethod
    def uniform(cls, step: float) -> "_Grid":
        return cls(np.array([0.0]), np.array([step]))

    @property
    def levels(self) -> int | None:
        """Grid points in [0, 1] of a uniform grid (128 for int8); None for float8."""
        return int(1.0 / self.steps[0] + 1e-9) + 1 if self.starts.size == 1 else None

    def rounding_integral(self, v: np.ndarray) -> np.ndarray:
        """``∫_0^v (u - q(u))² du`` where ``q`` rounds to the nearest grid point.

        Whole segments before ``v`` add ``length * step² / 12`` each. (Uniform grids take
        :func:`_uniform_rounding_errors` instead, which needs no integral.)
        """
        lengths = np.diff(self.starts, append=1.0)
        before = np.concatenate(([0.0], np.cumsum(lengths * self.steps**2 / 12)[:-1]))
        segment = np.searchsorted(self.starts, v, side="right") - 1
        step = self.steps[segment]
        return before[segment] + step**3 * _sawtooth_integral((v - self.starts[segment]) / step)


def _sawtooth_integral(q: np.ndarray) -> np.ndarray:
    """``∫_0^q (u - round(u))² du = round(q) / 12 + (q - round(q))³ / 3`` for ``q >= 0``;
    overwrites ``q``."""
    whole = np.rint(q)
    q -= whole
    cube = q * q
    cube *= q
    cube /= 3
    whole /= 12
    whole += cube
    return whole


def _fp8_e4m3fn_grid() -> _Grid:
    """E4M3FN magnitudes over 448: subnormals every 2**-9 below 2**-6, then 8 steps per binade."""
    exponents = np.arange(-6, 9)
    starts = np.concatenate(([0.0], 2.0**exponents)) / FP8_E4M3FN_MAX
    steps = np.concatenate(([2.0**-9], 2.0 ** (exponents - 3))) / FP8_E4M3FN_MAX
    return _Grid(starts, steps)


def _int_range(dtype: str, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) as onnxruntime and TensorRT use them: symmetric int8 leaves -128 out."""
    if dtype == "int8":
        return (-127, 127) if symmetric else (-128, 127)
    return 0, 255


def _grid(histogram: TensorHistogram, dtype: str, symmetric: bool) -> _Grid:
    """The grid ``|x|`` lands on. A symmetric grid spans [-t, t]; an asymmetric one [0, t] for
    data that is never negative, else (approximately: its zero point depends on the data) [-t, t]."""
    if dtype == "float8e4m3fn":
        return _fp8_e4m3fn_grid()
    qmin, qmax = _int_range(dtype, symmetric)
    span = 2.0 if symmetric or histogram.min < 0 else 1.0
    return _Grid.uniform(span / (qmax - qmin))


# ------------------------------------------------------------------------------ range methods
def minmax_threshold(histogram: TensorHistogram) -> float:
    """The largest ``|x|`` seen."""
    return histogram.absmax


def percentile_threshold(histogram: TensorHistogram, percentile: float = 99.99) -> float:
    """The ``percentile``-th percentile of ``|x|``, exact zeros counted at 0, linear within a bin."""
    _check_percentile(percentile)
    target = histogram.count * percentile / 100.0
    if target <= histogram.zeros:
        return 0.0
    counts = histogram.nonzero_counts()
    below = histogram.zeros + np.cumsum(counts)
    index = min(int(np.searchsorted(below, target)), histogram.bins - 1)
    before = below[index] - counts[index]
    within = (target - before) / counts[index] if counts[index] else 1.0
    return float(min((index + within) * histogram.width, histogram.absmax))


def _check_percentile(percentile: float) -> None:
    if not 0 < percentile <= 100:
        raise OnnxmpError(f"percentile must be in (0, 100], not {percentile}; 99.99 is usual")


def entropy_threshold(histogram: TensorHistogram, dtype: str = "int8", symmetric: bool = True) -> float:
    """TensorRT's entropy (KL divergence) threshold, for the integer grid of ``dtype``.

    The reference ``P`` is the histogram below a candidate edge ``i``, with the values beyond added
    to its last bin; ``Q`` merges those ``i`` bins into ``levels`` groups (bin ``j`` in group
    ``floor(j * levels / i)``) and spreads each group's count evenly over its non-empty bins.
    ``levels`` is 128 for int8 (256 for an asymmetric type on data that is never negative).
    """
    levels = _grid(histogram, dtype, symmetric).levels
    if levels is None:
        raise OnnxmpError(
            f"entropy calibration compares against evenly spaced levels, which {dtype} does not "
            "have; use mse, percentile or minmax for it"
        )
    if histogram.bins < 2 * levels:
        raise OnnxmpError(
            f"entropy calibration with {levels} levels needs at least {2 * levels} bins, not {histogram.bins}"
        )
    counts = histogram.nonzero_counts()
    top = _top(counts)
    if top == 0:
        return 0.0
    candidates = np.arange(levels, top + 1)  # top > bins / 2 >= levels: the largest |x| is in the upper half
    divergence = _kl_divergences(counts, candidates, levels)
    best = candidates[np.flatnonzero(divergence == divergence.min())[-1]]
    return float(min(best * histogram.width, histogram.absmax))


def _top(counts: np.ndarray) -> int:
    """One past the last non-empty bin (0 when all are empty)."""
    nonempty = np.flatnonzero(counts)
    return int(nonempty[-1]) + 1 if nonempty.size else 0


def _kl_divergences(counts: np.ndarray, candidates: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for every candidate edge at once, from prefix sums: O(levels) per candidate.

    Within a group ``Q`` is constant, so ``sum P log Q`` needs only the group's count ``S``, its
    non-empty bins ``n`` and the mass ``W`` of ``P`` on them: ``sum_k W_k log(S_k / (n_k M))``
    with ``M`` the count below the edge. ``sum P log P`` comes from a prefix sum of ``c log c``.
    """
    total = counts.sum()
    below = np.concatenate(([0.0], np.cumsum(counts)))
    nonempty = np.concatenate(([0.0], np.cumsum(counts > 0)))
    plogp = np.concatenate(([0.0], np.cumsum(_xlogx(counts))))
    bounds = _group_bounds(levels, counts.size)[: candidates.size]
    sums = np.diff(below[bounds], axis=1)
    tail = total - below[candidates]
    mass = sums.copy()
    mass[:, -1] += tail
    ratio = sums / np.maximum(np.diff(nonempty[bounds], axis=1), 1.0)
    ratio /= np.maximum(below[candidates], 1.0)[:, None]  # nothing below: infinite anyway (see the end)
    np.maximum(ratio, FLOAT32_TINY, out=ratio)  # an empty group has no mass: any finite log will do
    cross = (mass * np.log(ratio)).sum(axis=1)
    last = counts[candidates - 1]
    divergence = (plogp[candidates - 1] + _xlogx(last + tail) - cross) / total - np.log(total)
    divergence[(tail > 0) & (last == 0)] = np.inf  # P has mass where Q has none
    return divergence


@lru_cache(maxsize=4)
def _group_bounds(levels: int, bins: int) -> np.ndarray:
    """Row ``i - levels``: where bins ``[0, i)`` split into ``levels`` groups (bin ``j`` in group
    ``floor(j * levels / i)``), as ``levels + 1`` bounds ``ceil(k * i / levels)``."""
    edge = np.arange(levels, bins + 1)[:, None]
    return -((-np.arange(levels + 1)[None, :] * edge) // levels)


def _xlogx(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, values * np.log(values), 0.0)


def mse_threshold(histogram: TensorHistogram, dtype: str = "int8", symmetric: bool = True) -> float:
    """The bin edge ``t`` minimizing the expected squared quantization error on the grid of ``dtype``.

    Values are taken as spread evenly within their bin. A value inside ``[0, t]`` costs its
    rounding error, integrated exactly over the bin (for float8 too: its grid is uniform between
    powers of two); one beyond ``t`` costs its squared distance to ``t``. Every edge is a
    candidate; :func:`_mse_errors` skips those that provably cannot win.
    """
    grid = _grid(histogram, dtype, symmetric)
    counts = histogram.nonzero_counts()
    top = _top(counts)
    if top == 0:
        return 0.0
    counts = counts[:top]
    candidates = np.arange(1, top + 1)
    errors = _mse_errors(counts, candidates, grid)
    return float(min(candidates[int(np.argmin(errors))] * histogram.width, histogram.absmax))


def _mse_errors(counts: np.ndarray, candidates: np.ndarray, grid: _Grid) -> np.ndarray:
    """The error of each candidate edge, or inf for an edge whose error is sure to exceed the least.

    A branch and bound over the blocks of :data:`_CANDIDATE_ROWS` edges that
    :func:`_rounding_errors` works in: blocks are computed in the order of their lower bound
    (:func:`_rounding_error_bounds` plus the clipping error, which is cheap and exact), until the
    next bound exceeds the least error found. A block is computed as the exhaustive search
    computes it, so the errors found are bit for bit the same and every skipped edge's error
    exceeds the least: ``argmin`` picks the same edge. The bounds leave a margin of
    :data:`_BOUND_MARGIN` of the magnitudes involved, far above floating-point error.
    """
    clipping = _clipping_errors(counts, candidates)
    estimate, spread = _rounding_error_bounds(counts, candidates, grid)
    bounds = clipping + estimate - spread - _BOUND_MARGIN * (clipping + estimate + spread)
    starts = np.arange(0, candidates.size, _CANDIDATE_ROWS)
    block_bounds = np.minimum.reduceat(bounds, starts)
    rounding = _rounding_errors(counts, candidates, grid)
    errors = np.full(candidates.size, np.inf)
    least = np.inf
    for block in np.argsort(block_bounds, kind="stable"):
        if block_bounds[block] > least:
            break
        rows = slice(starts[block], starts[block] + _CANDIDATE_ROWS)
        errors[rows] = clipping[rows] + rounding(int(starts[block]))
        least = min(least, float(errors[rows].min()))
    return errors


def _clipping_errors(counts: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``sum_{j >= k} c_j ((j + 1/2 - k)² + 1/12)`` per candidate edge ``k``, in bin widths squared."""
    centers = np.arange(counts.size) + 0.5
    suffix = [np.concatenate((np.cumsum((counts * centers**p)[::-1])[::-1], [0.0])) for p in range(3)]
    s0, s1, s2 = (s[candidates] for s in suffix)
    return s2 - 2 * candidates * s1 + candidates**2 * s0 + s0 / 12


def _rounding_error_bounds(counts: np.ndarray, candidates: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """``(estimate, spread)``: each candidate's rounding error lies within ``estimate ± spread``.

    On a uniform grid whose step is ``d = k * step`` bins at edge ``k``, the error is ``d² M / 12
    + d³ P / 3`` (:func:`_uniform_rounding_errors`), ``M`` being the count below the edge and
    ``P = sum_{1<=j<k} 3 g(u_j) (c_{j-1} - c_j) + 3 g(1 / step) c_{k-1}``. Since ``|g| <= 1 /
    (36 sqrt 3)``, ``|P| / 3`` is at most that times ``sum |c_{j-1} - c_j| + c_{k-1}``: the
    spread is small where the histogram is smooth. Other grids get no bound (an infinite spread).
    """
    if grid.starts.size != 1:
        return np.zeros(candidates.size), np.full(candidates.size, np.inf)
    steps = candidates * float(grid.steps[0])
    below = np.concatenate(([0.0], np.cumsum(counts)))[candidates]
    variation = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(counts)))))[candidates - 1] + counts[candidates - 1]
    return steps**2 * below / 12, steps**3 * variation / (36 * math.sqrt(3))


def _rounding_errors(counts: np.ndarray, candidates: np.ndarray, grid: _Grid) -> Callable[[int], np.ndarray]:
    """The rounding errors of the values below each candidate edge ``k``, in bin widths squared,
    as a function of a block's first index: it returns those of ``candidates[start : start +
    _CANDIDATE_ROWS]``, ``start`` a multiple of :data:`_CANDIDATE_ROWS`.

    With ``t = k w``, bin ``j`` spans ``[j/k, (j+1)/k]`` in units of ``t``; its values cost
    ``(t³ / w) (I((j+1)/k) - I(j/k))`` each on average, ``I`` the grid's rounding integral.
    Bins at or beyond the edge are clamped to ``v = 1``, so they add nothing here: a block of
    rows (increasing edges) stops at its last edge, which halves the work of the full square.
    """
    if grid.starts.size == 1:
        return _uniform_rounding_errors(counts, candidates, float(grid.steps[0]))
    edges = np.arange(counts.size + 1, dtype=np.float64)

    def block(start: int) -> np.ndarray:
        rows = candidates[start : start + _CANDIDATE_ROWS]
        width = int(rows[-1])
        v = np.minimum(np.multiply.outer(1.0 / rows, edges[: width + 1]), 1.0)
        return rows**3.0 * (np.diff(grid.rounding_integral(v), axis=1) @ counts[:width])

    return block


def _uniform_rounding_errors(counts: np.ndarray, candidates: np.ndarray, step: float) -> Callable[[int], np.ndarray]:
    """:func:`_rounding_errors` on a uniform grid, in half the passes over each block and
    without subtracting nearly equal integrals.

    In grid steps (``u = v / step``) the rounding integral is ``step³ (u / 12 + g(u))``, where
    ``g(u) = r (r² - 1/4) / 3`` with ``r = u - round(u)`` is periodic. Below edge ``k`` the
    linear part adds ``1 / (12 k step)`` per value. Summed by parts, ``sum_j c_j (g(u_{j+1}) -
    g(u_j))`` is ``sum_{j>=1} g(u_j) (c_{j-1} - c_j)`` (``g(0) = 0``); ``u_j`` is clamped to
    ``1 / step`` from ``j = k`` on, as ``v`` is clamped to 1 there, and a block's last weight is
    its last count, so that the clamped terms add ``g(1 / step) c_{k-1}``.
    """
    top = 1.0 / step
    below = np.concatenate(([0.0], np.cumsum(counts)))[candidates]
    columns = np.arange(1, int(candidates[-1]) + 1, dtype=np.float64)  # j >= 1
    r_buffer = np.empty(min(candidates.size, _CANDIDATE_ROWS) * columns.size)  # made once: a block's arrays are views
    g_buffer = np.empty_like(r_buffer)
    weights_buffer = np.empty(columns.size)

    def block(start: int) -> np.ndarray:
        rows = candidates[start : start + _CANDIDATE_ROWS]
        width = int(rows[-1])
        r = r_buffer[: rows.size * width].reshape(rows.size, width)
        g = g_buffer[: rows.size * width].reshape(rows.size, width)
        np.einsum("i,j->ij", top / rows, columns[:width], out=r)  # u_j; twice as fast as the broadcast multiply
        clamped = r[:, int(rows[0]) - 1 :]  # below its edge k a row stays under 1 / step: only j >= k can reach it
        np.minimum(clamped, top, out=clamped)
        np.rint(r, out=g)
        r -= g
        np.square(r, out=g)  # r * r, twice as fast as np.multiply(r, r)
        g -= 0.25
        g *= r  # 3 g(u_j)
        weights = weights_buffer[:width]
        weights[:] = counts[:width]
        weights[:-1] -= counts[1:width]
        periodic = g @ weights
        edges = rows.astype(np.float64)
        return step**3 * edges**3 * (top * below[start : start + _CANDIDATE_ROWS] / (12 * edges) + periodic / 3)

    return block


# ------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class QuantParams:
    """Quantization parameters of one tensor: ``x ≈ scale * (q - zero_point)``.

    ``threshold`` is the method's clipping threshold on ``|x|``; ``low`` and ``high`` the real
    interval the scale was computed from (``[-threshold, threshold]`` when symmetric);
    ``clip_fraction`` the share of the observed values beyond it.
    """

    scale: float
    zero_point: int
    threshold: float
    clip_fraction: float
    method: str
    dtype: str
    low: float
    high: float


def quantization_params(
    histograms: dict[str, TensorHistogram],
    method: str,
    symmetric: bool = True,
    dtype: str = "int8",
    percentile: float = 99.99,
) -> dict[str, QuantParams]:
    """Parameters per tensor from its histogram by ``method`` (one of :data:`METHODS`).

    Integer types follow onnxruntime's ``compute_scale_zp``: the interval is widened to hold 0;
    symmetric int8 uses [-127, 127] with zero point 0 (as TensorRT does), symmetric uint8 zero
    point 128; asymmetric types map ``[low, high]`` onto the whole type, the zero point rounded
    and clamped. ``float8e4m3fn`` is symmetric only: ``scale = threshold / 448``, zero point 0.
    Asymmetric methods other than minmax clip ``[min, max]`` to ``[-threshold, threshold]``.
    A tensor whose range is 0 (every value 0, or nothing seen) or whose scale would fall below
    float32's smallest normal number gets scale 1.0 and zero point 0, as in onnxruntime: any scale
    represents 0 exactly, and 1.0 keeps ``1 / scale`` finite in kernels.
    """
    _check_options(method, dtype, symmetric, percentile)
    return {name: _tensor_params(h, method, symmetric, dtype, percentile) for name, h in histograms.items()}


def _check_options(method: str, dtype: str, symmetric: bool, percentile: float) -> None:
    if method not in METHODS:
        raise OnnxmpError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise OnnxmpError(f"unknown quantization type '{dtype}'; choose one of {', '.join(DTYPES)}")
    if dtype == "float8e4m3fn" and not symmetric:
        raise OnnxmpError("float8e4m3fn quantization is symmetric only (its zero point is 0); drop symmetric=False")
    _check_percentile(percentile)


def _tensor_params(
    histogram: TensorHistogram, method: str, symmetric: bool, dtype: str, percentile: float
) -> QuantParams:
    """The parameters, computed once per histogram and options: placement asks for a tensor's
    several times, and the accuracy fallback reruns placement on the same histograms."""
    key = (method, symmetric, dtype, percentile)
    if key not in histogram.params:
        histogram.params[key] = _compute_params(histogram, method, symmetric, dtype, percentile)
    return histogram.params[key]


def _compute_params(
    histogram: TensorHistogram, method: str, symmetric: bool, dtype: str, percentile: float
) -> QuantParams:
    threshold = _threshold(histogram, method, dtype, symmetric, percentile)
    if symmetric:
        low, high = -threshold, threshold
    elif histogram.count:
        low, high = max(histogram.min, -threshold), min(histogram.max, threshold)
    else:
        low = high = 0.0
    scale, zero_point = _scale_zero_point(low, high, dtype, symmetric)
    return QuantParams(scale, zero_point, threshold, histogram.clip_fraction(threshold), method, dtype, low, high)


def _threshold(histogram: TensorHistogram, method: str, dtype: str, symmetric: bool, percentile: float) -> float:
    if method == "minmax":
        return minmax_threshold(histogram)
    if method == "percentile":
        return percentile_threshold(histogram, percentile)
    if method == "entropy":
        return entropy_threshold(histogram, dtype, symmetric)
    return mse_threshold(histogram, dtype, symmetric)


def _scale_zero_point(low: float, high: float, dtype: str, symmetric: bool) -> tuple[float, int]:
    if dtype == "float8e4m3fn":
        return _normal_float32(max(-low, high) / FP8_E4M3FN_MAX) or 1.0, 0
    qmin, qmax = _int_range(dtype, symmetric)
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        low, high = -max(-low, high), max(-low, high)
    scale = _normal_float32((high - low) / (qmax - qmin))
    if scale is None:
        return 1.0, 0
    zero_point = round((qmin + qmax) / 2) if symmetric else round(qmin - low / scale)
    return scale, min(max(zero_point, qmin), qmax)


def _normal_float32(value: float) -> float | None:
    """``value`` rounded to float32, or None when that is not a normal positive number."""
    rounded = float(np.float32(value))
    return rounded if rounded >= FLOAT32_TINY else None


# ------------------------------------------------------------------------------ exports
def write_tensorrt_calibration_cache(
    params: dict[str, QuantParams],
    path: str | os.PathLike,
    tensorrt_version: str | None = None,
    algorithm: str = "EntropyCalibration2",
) -> None:
    """Write TensorRT's text calibration cache: what ``trtexec --calib`` and a calibrator's
    ``readCalibrationCache`` take, and what onnxruntime's TensorRT provider reads with
    ``trt_int8_use_native_calibration_table=1``.

    The first line is ``TRT-<version>-<algorithm>``, ``<version>`` being TensorRT's
    ``NV_TENSORRT_VERSION`` (``major*10000 + minor*100 + patch`` from TensorRT 10, e.g.
    ``TRT-100300-EntropyCalibration2``; ``major*1000 + ...`` before, e.g. ``TRT-8601-...``).
    TensorRT may refuse a cache written for another version or calibrator (TensorRT 10 has been
    seen rejecting a ``TRT-8600`` header), so ``tensorrt_version`` defaults to the installed
    ``tensorrt`` package's, else :data:`DEFAULT_TENSORRT_VERSION`; onnxruntime only checks the
    ``TRT-`` prefix. Then one line per tensor, ``<name>: <hex>``, the hex digits being the
    big-endian bits of the float32 int8 scale ``threshold / 127`` (onnxruntime takes the dynamic
    range as ``scale * 127``). TensorRT's int8 is symmetric, so whatever type the parameters were
    computed for, the cache carries ``threshold``; a zero threshold is written as scale 1.0.
    onnxruntime reads a name up to its first ``:``, so tensors whose names hold one need the
    flatbuffers table (:func:`write_ort_trt_calibration_table`) there.
    """
    version = tensorrt_version or _installed_tensorrt_version()
    lines = [f"TRT-{_tensorrt_version_code(version)}-{algorithm}"]
    lines += [f"{_line_safe(name, path)}: {struct.pack('>f', _int8_scale(p)).hex()}" for name, p in params.items()]
    _write_text(path, "\n".join(lines) + "\n")


def _installed_tensorrt_version() -> str:
    try:
        return metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        return DEFAULT_TENSORRT_VERSION


def _tensorrt_version_code(version: str) -> int:
    try:
        major, minor, patch = ([int(part) for part in version.split(".")[:3]] + [0, 0])[:3]
    except ValueError:
        raise OnnxmpError(f"TensorRT version '{version}' is not like 10.3.0") from None
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def _int8_scale(params: QuantParams) -> float:
    """The symmetric int8 scale of ``params.threshold``: what TensorRT's dynamic ranges mean."""
    return _normal_float32(params.threshold / 127.0) or 1.0


def _line_safe(name: str, path: str | os.PathLike) -> str:
    if "\n" in name or "\r" in name:
        raise DataError(
            f"tensor {name!r} has a line break in its name, which '{path}' cannot hold; rename the tensor"
        )
    return name


def write_ort_trt_calibration_table(params: dict[str, QuantParams], path: str | os.PathLike) -> None:
    """Write onnxruntime's flatbuffers calibration table: what its TensorRT provider reads from
    ``trt_int8_calibration_table_name`` by default (``trt_int8_use_native_calibration_table=0``).

    The schema is ``CalTableFlatBuffers.TrtTable`` (a vector of ``KeyValue``), as
    ``onnxruntime.quantization.quant_utils.write_calibration_table`` writes it; each key is a
    tensor name, each value the dynamic range (``127 * scale``, see
    :func:`write_tensorrt_calibration_cache`) as decimal text, which the provider parses with
    ``std::stof``.
    """
    import flatbuffers
    from onnxruntime.quantization.CalTableFlatBuffers import KeyValue, TrtTable

    builder = flatbuffers.Builder(1024)
    entries = []
    for name, p in params.items():
        key, value = builder.CreateString(name), builder.CreateString(repr(127.0 * _int8_scale(p)))
        KeyValue.KeyValueStart(builder)
        KeyValue.KeyValueAddKey(builder, key)
        KeyValue.KeyValueAddValue(builder, value)
        entries.append(KeyValue.KeyValueEnd(builder))
    TrtTable.TrtTableStartDictVector(builder, len(entries))
    for entry in reversed(entries):  # prepending: the vector reads in the order of ``params``
        builder.PrependUOffsetTRelative(entry)
    vector = builder.EndVector()
    TrtTable.TrtTableStart(builder)
    TrtTable.TrtTableAddDict(builder, vector)
    builder.Finish(TrtTable.TrtTableEnd(builder))
    _write_bytes(path, bytes(builder.Output()))


def write_ort_quant_overrides(params: dict[str, QuantParams], path: str | os.PathLike) -> None:
    """Write the parameters as JSON in the shape of onnxruntime's ``TensorQuantOverrides``:
    ``{tensor: [{"scale": float, "zero_point": int, "quant_type": "QInt8"}]}``, the quant type
    by its ``onnxruntime.quantization.QuantType`` name. JSON cannot hold the numpy values and
    enum members that ``quantize_static`` expects; :func:`read_ort_quant_overrides` makes them.
    """
    overrides = {
        name: [{"scale": p.scale, "zero_point": p.zero_point, "quant_type": ORT_QUANT_TYPES[p.dtype]}]
        for name, p in params.items()
    }
    _write_text(path, json.dumps(overrides, indent=1) + "\n")


def read_ort_quant_overrides(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Overrides written by :func:`write_ort_quant_overrides`, ready for
    ``quantize_static(..., extra_options={"TensorQuantOverrides": overrides})``: scales as float32
    numpy scalars, zero points in the quant type's numpy dtype, quant types as ``QuantType``."""
    from onnxruntime.quantization import QuantType

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {name: [_ort_override(entry, QuantType) for entry in entries] for name, entries in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"'{path}' is not a quantization overrides file ({type(exc).__name__}: {exc}); "
            "write it with write_ort_quant_overrides"
        ) from exc


def _ort_override(entry: dict[str, Any], quant_type_enum: Any) -> dict[str, Any]:
    quant_type = quant_type_enum[entry["quant_type"]]
    zero_point_dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type.tensor_type)
    return {
        "scale": np.array(entry["scale"], dtype=np.float32),
        "zero_point": np.array(entry["zero_point"], dtype=zero_point_dtype),
        "quant_type": quant_type,
    }


def _write_text(path: str | os.PathLike, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise _unwritable(path, exc) from exc


def _write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file and a rename, as :func:`onnxmp.ir.write_text_atomic` does."""
    path = Path(path)
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise _unwritable(path, exc) from exc


def _unwritable(path: str | os.PathLike, exc: OSError) -> OnnxmpError:
    return OnnxmpError(f"cannot write '{path}': {exc.strerror or exc}; check that its folder exists and is writable")


# ------------------------------------------------------------------------------ one call
def export_calibration(
    model: str | os.PathLike | onnx.ModelProto,
    calibration_data: str | os.PathLike | BatchSource,
    *,
    method: str = "mse",
    dtype: str = "int8",
    symmetric: bool = True,
    percentile: float = 99.99,
    bins: int = DEFAULT_BINS,
    tensors: list[str] | None = None,
    tensorrt_cache: str | os.PathLike | None = None,
    ort_trt_table: str | os.PathLike | None = None,
    ort_overrides: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, QuantParams]:
    """Calibrate ``model`` on ``calibration_data`` and write the exports asked for.

    ``tensors`` defaults to every float graph input and node output of the main graph (the
    types from onnx's shape inference). Returns the parameters per tensor; writes
    :func:`write_tensorrt_calibration_cache` to ``tensorrt_cache``,
    :func:`write_ort_trt_calibration_table` to ``ort_trt_table`` and
    :func:`write_ort_quant_overrides` to ``ort_overrides``. NaN or Inf in the data or computed by
    the model is a DataError naming the batch (and input or tensor); the files are written only
    after every tensor was calibrated, so a failure writes none of them. The defaults (symmetric
    int8) are what TensorRT uses; for onnxruntime's CPU provider pass ``dtype="uint8",
    symmetric=False``.
    """
    from onnxmp.data import input_specs, load_batches

    _check_options(method, dtype, symmetric, percentile)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    batches = calibration_data if isinstance(calibration_data, BatchSource) else load_batches(calibration_data, input_specs(proto))
    names = tensors if tensors is not None else _float_tensors(proto)
    histograms = collect_histograms(proto, batches, names, bins, progress, cache_dir)
    params = quantization_params(histograms, method, symmetric, dtype, percentile)
    if tensorrt_cache is not None:
        write_tensorrt_calibration_cache(params, tensorrt_cache)
    if ort_trt_table is not None:
        write_ort_trt_calibration_table(params, ort_trt_table)
    if ort_overrides is not None:
        write_ort_quant_overrides(params, ort_overrides)
    return params


def _float_tensors(model: onnx.ModelProto) -> list[str]:
    """Float32 graph inputs and node outputs of the main graph, in graph order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    initializers = {t.name for t in graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    names = [vi.name for vi in graph.input if vi.name not in initializers]
    names += [o for node in graph.node for o in node.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) == onnx.TensorProto.FLOAT]
