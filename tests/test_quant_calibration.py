"""Quantization calibration: histograms against numpy, range methods against brute force,
parameters against onnxruntime's formulas, and the export formats read back by their readers."""

from __future__ import annotations

import base64
import json
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxmp.calibration as calibration
import onnxmp.quant_calibration as qc
from conftest import MODELS, REPO
from onnxmp.data import input_specs, load_batches
from onnxmp.errors import DataError, OnnxmpError
from onnxmp.quant_calibration import (
    METHODS,
    TensorHistogram,
    collect_histograms,
    entropy_threshold,
    minmax_threshold,
    mse_threshold,
    percentile_threshold,
    quantization_params,
    read_ort_quant_overrides,
    write_ort_quant_overrides,
    write_ort_trt_calibration_table,
    write_tensorrt_calibration_cache,
)

DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "fixtures" / "data" / "digits_calib"
DIGITS_RELU = "/block1/block1.2/Relu_output_0"


def histogram_of(*arrays: np.ndarray, bins: int = 2048) -> TensorHistogram:
    histogram = TensorHistogram("t", bins)
    for index, array in enumerate(arrays):
        histogram.update(array, f"batch {index}")
    return histogram


def gaussian_with_outliers(size: int = 1_000_000, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    values[:20] = np.linspace(-30.0, 40.0, 20)
    return values


def uniform(size: int = 1_000_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-3.0, 3.0, size).astype(np.float32)


def probe_model() -> onnx.ModelProto:
    """x: f32[N,4] -> relu, root (Sqrt: NaN for x < 0), scaled (x*3) -> y = relu + scaled."""
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"], name="relu"),
        helper.make_node("Sqrt", ["x"], ["root"], name="root"),
        helper.make_node("Mul", ["x", "three"], ["scaled"], name="scaled"),
        helper.make_node("Add", ["relu", "scaled"], ["y"], name="y"),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def save_probe_batches(folder, count: int = 3, scale: float = 1.0) -> list[np.ndarray]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = [(rng.standard_normal((5, 4)) * scale * (index + 1)).astype(np.float32) for index in range(count)]
    for index, x in enumerate(arrays):
        np.savez(folder / f"batch_{index:03d}.npz", x=x)
    return arrays


def digits_batches():
    return load_batches(DIGITS_CALIB, input_specs(onnx.load(DIGITS)))


# ------------------------------------------------------------------------------ TensorHistogram
def test_merging_batches_equals_one_histogram_of_all_the_data():
    rng = np.random.default_rng(0)
    scales = (1e-3, 1.0, 0.5, 7e2)
    parts = [np.zeros(100, np.float32)] + [rng.standard_normal(10_000).astype(np.float32) * s for s in scales]
    merged = histogram_of(*parts)
    whole = np.concatenate(parts)
    assert np.array_equal(merged.counts, histogram_of(whole).counts)
    assert np.array_equal(merged.counts, histogram_of(*parts[::-1]).counts)  # order does not matter
    reference, _ = np.histogram(np.abs(whole.astype(np.float64)), bins=2048, range=(0.0, merged.range))
    assert np.array_equal(merged.counts, reference)
    assert merged.range / 2 <= merged.absmax < merged.range and np.log2(merged.range).is_integer()
    assert (merged.count, merged.zeros) == (whole.size, 100)
    assert (merged.min, merged.max) == (float(whole.min()), float(whole.max()))


def test_values_that_are_never_negative_bin_as_their_magnitudes():
    rng = np.random.default_rng(2)
    relu = np.maximum(rng.standard_normal(150_000), 0).astype(np.float32)  # more than two chunks
    relu[:7] = -0.0  # Relu can give -0.0: it is a zero, in bin 0
    signed = relu.copy()
    signed[7] = -1e-30  # one negative value: the magnitude pass runs
    for values in (relu, signed):
        histogram = histogram_of(values)
        reference, _ = np.histogram(np.abs(values.astype(np.float64)), bins=2048, range=(0.0, histogram.range))
        assert np.array_equal(histogram.counts, reference)
        assert histogram.zeros == int(np.count_nonzero(values == 0))
    assert np.array_equal(histogram_of(relu).counts, histogram_of(np.abs(relu)).counts)


def test_histogram_size_does_not_grow_with_the_number_of_batches():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(20_000).astype(np.float32) * (1 + index) for index in range(64)]

    def peak(count: int) -> int:
        histogram = TensorHistogram("t")
        tracemalloc.start()
        for batch in batches[:count]:
            histogram.update(batch, "b")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert histogram.counts.shape == (2048,)
        return top

    assert peak(64) < peak(4) + 64 * 1024


def test_all_zero_and_empty_arrays():
    histogram = histogram_of(np.zeros(10, np.float32), np.zeros(0, np.float32))
    assert (histogram.range, histogram.count, histogram.zeros, histogram.counts[0]) == (0.0, 10, 10, 10)
    assert histogram.absmax == 0.0 and histogram.clip_fraction(0.0) == 0.0
    histogram.update(np.array([0.0, 3.0], np.float32), "b")  # zeros stay in bin 0 when a range appears
    assert (histogram.range, histogram.counts[0], histogram.counts[1536]) == (4.0, 11, 1)


def test_extreme_magnitudes_bin_exactly():
    tiny = np.array([1e-40, -3e-39, 0.0], np.float32)  # subnormal: bins / range overflows float32
    histogram = histogram_of(tiny)
    reference, _ = np.histogram(np.abs(tiny.astype(np.float64)), bins=2048, range=(0.0, histogram.range))
    assert np.array_equal(histogram.counts, reference)
    histogram.update(np.array([3e38], np.float32), "b")
    assert histogram.range == 2.0**128 and histogram.counts[0] == 3 and histogram.counts.sum() == 4


def test_nan_or_inf_in_a_tensor_names_it_and_the_batch():
    histogram = TensorHistogram("conv/out")
    for bad in (np.nan, np.inf):
        with pytest.raises(DataError, match=r"tensor 'conv/out' holds 1 NaN or Inf values on calibration batch 'b7'"):
            histogram.update(np.array([1.0, bad], np.float32), "b7")
    assert histogram.count == 0


@pytest.mark.parametrize("bins", [100, 256, 3000])
def test_bins_must_be_a_large_power_of_two(bins):
    with pytest.raises(OnnxmpError, match="power of two of at least 512 bins"):
        TensorHistogram("t", bins)


def test_binning_ten_million_values_counts_every_value():
    values = np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)
    histogram = TensorHistogram("t")
    histogram.update(values, "b")
    assert histogram.counts.sum() == values.size


def test_binning_across_chunks_matches_numpy():
    values = np.random.default_rng(2).laplace(size=3 * qc._CHUNK + 17).astype(np.float32)
    values[:: qc._CHUNK // 3] = 0.0  # zeros in every chunk, the last one short
    histogram = histogram_of(values)
    reference, _ = np.histogram(np.abs(values.astype(np.float64)), bins=2048, range=(0.0, histogram.range))
    assert np.array_equal(histogram.counts, reference)
    assert histogram.zeros == int(np.count_nonzero(values == 0))


def test_clip_fraction_reads_the_histogram():
    values = gaussian_with_outliers()
    histogram = histogram_of(values)
    for threshold in (0.5, 2.0, 3.3, 10.0):
        expected = np.mean(np.abs(values) > threshold)
        assert histogram.clip_fraction(threshold) == pytest.approx(expected, rel=0.01, abs=2e-6)
    assert histogram.clip_fraction(histogram.absmax) == 0.0


# ------------------------------------------------------------------------------ collection
def test_collect_histograms_matches_histograms_of_the_arrays(tmp_path):
    arrays = save_probe_batches(tmp_path)
    model = probe_model()
    batches = load_batches(tmp_path, input_specs(model))
    histograms = collect_histograms(model, batches, ["relu", "x", "y"], progress=False)
    assert list(histograms) == ["relu", "x", "y"]
    x = np.concatenate(arrays)
    expected = {"x": x, "relu": np.maximum(x, 0), "y": np.maximum(x, 0) + x * np.float32(3)}
    for name, values in expected.items():
        assert np.array_equal(histograms[name].counts, histogram_of(values).counts), name
        assert (histograms[name].min, histograms[name].max) == pytest.approx((values.min(), values.max()))


def test_only_the_requested_tensors_are_fetched(tmp_path, monkeypatch):
    save_probe_batches(tmp_path)
    model = probe_model()
    exposed = []
    original = calibration._with_outputs
    monkeypatch.setattr(calibration, "_with_outputs", lambda m, names: exposed.extend(names) or original(m, names))
    collect_histograms(model, load_batches(tmp_path, input_specs(model)), ["relu"], progress=False)
    assert exposed == ["relu"]


def test_nan_computed_by_the_model_names_tensor_and_batch(tmp_path):
    save_probe_batches(tmp_path)
    model = probe_model()
    message = r"tensor 'root' holds \d+ NaN or Inf values on calibration batch 'batch_000.npz'"
    with pytest.raises(DataError, match=message):
        collect_histograms(model, load_batches(tmp_path, input_specs(model)), ["root"], progress=False)


def test_nan_computed_by_the_model_can_be_counted_instead(tmp_path):
    arrays = save_probe_batches(tmp_path)
    model = probe_model()
    histograms = collect_histograms(model, load_batches(tmp_path, input_specs(model)), ["root"], progress=False, nonfinite="count")
    x = np.concatenate(arrays)
    root = histograms["root"]
    assert root.nonfinite == np.count_nonzero(x < 0) and root.nonfinite_batch == "batch_000.npz"
    assert root.count == np.count_nonzero(x >= 0) and root.max == pytest.approx(np.sqrt(x.max()))
    assert TensorHistogram.from_json(root.to_json()).to_json() == root.to_json()
    with pytest.raises(OnnxmpError, match="nonfinite"):
        collect_histograms(model, load_batches(tmp_path, input_specs(model)), ["root"], progress=False, nonfinite="skip")


def test_zero_batches_are_a_data_error():
    from onnxmp.data import FileBatches

    with pytest.raises(DataError, match="nothing here gives no calibration batches"):
        collect_histograms(probe_model(), FileBatches([], [], "nothing here"), ["relu"], progress=False)


def test_export_calibration_writes_every_format_or_nothing(tmp_path):
    from onnxmp.quant_calibration import export_calibration

    paths = {"tensorrt_cache": tmp_path / "model.cache", "ort_trt_table": tmp_path / "table.flatbuffers", "ort_overrides": tmp_path / "overrides.json"}
    params = export_calibration(DIGITS, DIGITS_CALIB, **paths)
    assert "x" in params and DIGITS_RELU in params and "logits" in params and len(params) == 15
    lines = paths["tensorrt_cache"].read_text().splitlines()
    assert lines[0].startswith("TRT-") and len(lines) == 1 + len(params)
    assert set(read_ort_quant_overrides(paths["ort_overrides"])) == set(params)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "batch_000.npz", x=np.full((2, 1, 8, 8), np.inf, np.float32))
    others = {key: tmp_path / f"again_{path.name}" for key, path in paths.items()}
    with pytest.raises(DataError, match="input 'x' holds 128 NaN or Inf"):
        export_calibration(DIGITS, bad, **others)
    assert not any(path.exists() for path in others.values())


def test_cli_calibrate_exports(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnxmp.cli import main

    monkeypatch.setenv("ONNXMP_CACHE_DIR", str(tmp_path / "cache"))
    cache, overrides = tmp_path / "digits.cache", tmp_path / "digits.json"
    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "--calibration-data", str(DIGITS_CALIB), "--method", "percentile",
                                       "--tensorrt-cache", str(cache), "--ort-overrides", str(overrides)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert cache.read_text().startswith("TRT-") and json.loads(overrides.read_text())["x"][0]["quant_type"] == "QUInt8"
    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "--calibration-data", str(DIGITS_CALIB)])
    assert result.exit_code != 0 and "at least one of" in result.output


def test_nan_in_the_data_names_input_and_batch(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    np.savez(tmp_path / "batch_000.npz", x=np.array([[1.0, np.nan, 0.0, 2.0]], np.float32))
    model = probe_model()
    with pytest.raises(DataError, match="batch 'batch_000.npz': input 'x' holds 1 NaN"):
        collect_histograms(model, load_batches(tmp_path, input_specs(model)), ["relu"], progress=False)


def test_histograms_are_cached_and_reused(tmp_path, monkeypatch):
    model, batches = onnx.load(DIGITS), digits_batches()
    first = collect_histograms(model, batches, ["x", DIGITS_RELU], progress=False, cache_dir=tmp_path)
    [cache_file] = tmp_path.glob("histograms-2048-*.json")

    def no_inference(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(qc, "stream_tensors", no_inference)
    again = collect_histograms(model, batches, [DIGITS_RELU, "x"], progress=False, cache_dir=tmp_path)
    for name in first:
        assert np.array_equal(again[name].counts, first[name].counts)
        assert again[name].to_json() == first[name].to_json()
    cache_file.write_text("{broken", encoding="utf-8")
    monkeypatch.undo()
    assert collect_histograms(model, batches, ["x"], progress=False, cache_dir=tmp_path)["x"].count == first["x"].count



def test_the_histogram_cache_holds_counts_as_base64(tmp_path):
    histograms = collect_histograms(onnx.load(DIGITS), digits_batches(), [DIGITS_RELU], progress=False, cache_dir=tmp_path)
    [cache_file] = tmp_path.glob("histograms-2048-*.json")
    data = json.loads(cache_file.read_text(encoding="utf-8"))
    assert data["version"] == qc.HISTOGRAM_CACHE_VERSION
    [entry] = data["tensors"]
    assert np.array_equal(np.frombuffer(base64.b64decode(entry["counts"]), "<i8"), histograms[DIGITS_RELU].counts)
    data["version"] -= 1  # a file of another version is a miss
    cache_file.write_text(json.dumps(data), encoding="utf-8")
    assert qc._read_cache(cache_file) is None

# ------------------------------------------------------------------------------ range methods
def test_methods_clip_outliers_of_a_gaussian():
    histogram = histogram_of(gaussian_with_outliers())
    assert minmax_threshold(histogram) == 40.0
    assert percentile_threshold(histogram, 99.99) == pytest.approx(3.89, abs=0.05)
    assert percentile_threshold(histogram, 99.0) == pytest.approx(2.576, abs=0.02)
    assert percentile_threshold(histogram, 100.0) == 40.0
    assert 2.5 < entropy_threshold(histogram) < 20.0
    assert 2.5 < mse_threshold(histogram) < 20.0
    assert mse_threshold(histogram, "float8e4m3fn") > mse_threshold(histogram)  # relative precision: range is cheap


def test_methods_keep_nearly_the_whole_range_of_a_uniform_distribution():
    histogram = histogram_of(uniform())
    assert minmax_threshold(histogram) == pytest.approx(3.0, abs=1e-4)
    assert percentile_threshold(histogram) == pytest.approx(3.0, rel=1e-3)
    assert entropy_threshold(histogram) == pytest.approx(3.0, rel=0.03)
    assert mse_threshold(histogram) == pytest.approx(3.0, rel=0.02)


def test_exact_zeros_do_not_pull_thresholds_down():
    values = np.maximum(gaussian_with_outliers(), 0)  # half the values are exact zeros
    with_zeros, without = histogram_of(values), histogram_of(values[values > 0])
    unsigned = {"dtype": "uint8", "symmetric": False}
    assert entropy_threshold(with_zeros, **unsigned) == entropy_threshold(without, **unsigned)
    assert mse_threshold(with_zeros) == mse_threshold(without)
    assert percentile_threshold(with_zeros, 40.0) == 0.0


def quantize_int8(values: np.ndarray, threshold: float) -> np.ndarray:
    scale = threshold / 127
    return np.clip(np.rint(values / scale), -127, 127) * scale


def quantize_fp8(values: np.ndarray, threshold: float) -> np.ndarray:
    scale = threshold / 448
    return np.clip(values / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale


@pytest.mark.parametrize("dtype, quantize", [("int8", quantize_int8), ("float8e4m3fn", quantize_fp8)])
def test_mse_threshold_matches_a_brute_force_search(dtype, quantize):
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.laplace(size=300_000), rng.uniform(-40, 40, 100)]).astype(np.float32)
    histogram = histogram_of(values)

    def error(threshold: float) -> float:
        return float(np.mean((quantize(values.astype(np.float64), threshold) - values) ** 2))

    sweep = np.linspace(0.5, histogram.absmax, 300)
    best = min(error(t) for t in sweep)
    assert error(mse_threshold(histogram, dtype)) <= best * 1.005


def exhaustive_rounding_errors(counts: np.ndarray, candidates: np.ndarray, grid: qc._Grid) -> np.ndarray:
    """Every candidate's rounding error, block after block."""
    block = qc._rounding_errors(counts, candidates, grid)
    return np.concatenate([block(start) for start in range(0, candidates.size, qc._CANDIDATE_ROWS)])


@pytest.mark.parametrize("step", [2 / 254, 1 / 255, 2 / 255])
def test_uniform_rounding_errors_equal_the_integral_form(step):
    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.exponential(40, 700) * (rng.random(700) > 0.3)).astype(np.float64)
    counts[-1] = 5.0
    candidates = np.arange(1, counts.size + 1)
    grid = qc._Grid.uniform(step)
    edges = np.minimum(np.arange(counts.size + 1)[None, :] / candidates[:, None], 1.0)
    reference = candidates**3.0 * (np.diff(grid.rounding_integral(edges), axis=1) @ counts)
    assert np.allclose(exhaustive_rounding_errors(counts, candidates, grid), reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("step", [2 / 254, 1 / 255, 2 / 255])
def test_uniform_rounding_blocks_are_the_plain_formula_bit_for_bit(step):
    """einsum's products and np.square are the broadcast multiply's and r * r's, bit for bit."""
    rng = np.random.default_rng(4)
    counts = rng.poisson(rng.exponential(300, 900)).astype(np.float64)
    candidates = np.arange(1, counts.size + 1)
    block, top = qc._uniform_rounding_errors(counts, candidates, step), 1.0 / step
    below = np.concatenate(([0.0], np.cumsum(counts)))
    for start in range(0, candidates.size, qc._CANDIDATE_ROWS):
        rows = candidates[start : start + qc._CANDIDATE_ROWS]
        width = int(rows[-1])
        u = np.minimum((top / rows)[:, None] * np.arange(1, width + 1, dtype=np.float64), top)
        r = u - np.rint(u)
        weights = np.append(counts[: width - 1] - counts[1:width], counts[width - 1])
        edges = rows.astype(np.float64)
        plain = step**3 * edges**3 * (top * below[rows] / (12 * edges) + (((r * r) - 0.25) * r) @ weights / 3)
        assert np.array_equal(block(start), plain)


def adversarial_counts() -> dict[str, np.ndarray]:
    """Histograms (counts of |x| per bin, the exact zeros taken out) on which a bound could slip."""
    rng = np.random.default_rng(11)
    smooth = np.exp(-np.arange(1500) / 200.0) * 1e6
    cases = {
        "smooth": np.rint(smooth),
        "poisson": rng.poisson(smooth / 1e4).astype(np.float64),
        "alternating": np.tile([1000.0, 0.0], 600),  # the largest variation: the widest bounds
        "grid-aligned": np.where(np.arange(1270) % 10 == 0, 5000.0, 0.0),  # values on the grid of one edge
        "one-bin": np.concatenate((np.zeros(900), [7.0])),
        "two-spikes": np.concatenate(([3.0e6], np.zeros(1400), [1.0])),
        "flat": np.full(2048, 1e4),
        "huge-counts": np.rint(smooth * 1e7),
        "sparse": np.where(rng.random(2000) < 0.005, rng.integers(1, 4, 2000), 0).astype(np.float64),
        "first-bin": np.array([42.0]),
    }
    cases["sparse"][-1] = 1.0
    for seed in range(6):
        draw = np.random.default_rng(seed)
        size = int(draw.integers(64, 2049))
        cases[f"random-{seed}"] = draw.poisson(draw.exponential(draw.uniform(0.1, 500), size)).astype(np.float64)
        cases[f"random-{seed}"][-1] += 1
    return cases


GRIDS = {"int8": qc._Grid.uniform(2 / 254), "uint8 signed": qc._Grid.uniform(2 / 255),
         "uint8 unsigned": qc._Grid.uniform(1 / 255), "float8": qc._fp8_e4m3fn_grid()}  # fmt: skip


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("name, counts", adversarial_counts().items())
def test_pruned_mse_search_equals_the_exhaustive_one(name, counts, grid):
    candidates = np.arange(1, counts.size + 1)
    exhaustive = qc._clipping_errors(counts, candidates) + exhaustive_rounding_errors(counts, candidates, grid)
    errors = qc._mse_errors(counts, candidates, grid)
    computed = np.isfinite(errors)
    assert np.array_equal(errors[computed], exhaustive[computed])  # bit for bit
    assert (exhaustive[~computed] > exhaustive.min()).all()
    assert np.argmin(errors) == np.argmin(exhaustive)


@pytest.mark.parametrize("grid", [g for g in GRIDS.values() if g.starts.size == 1], ids=[k for k, g in GRIDS.items() if g.starts.size == 1])
@pytest.mark.parametrize("name, counts", adversarial_counts().items())
def test_rounding_error_bounds_hold(name, counts, grid):
    candidates = np.arange(1, counts.size + 1)
    exact = exhaustive_rounding_errors(counts, candidates, grid)
    estimate, spread = qc._rounding_error_bounds(counts, candidates, grid)
    slack = 1e-12 * (estimate + spread)
    assert (estimate - spread <= exact + slack).all()
    assert (exact <= estimate + spread + slack).all()


def test_pruned_mse_search_computes_a_few_blocks_of_a_smooth_histogram():
    counts = np.random.default_rng(5).poisson(np.exp(-np.arange(2048) / 300.0) * 2000).astype(np.float64)
    counts[-1] = 3.0
    candidates = np.arange(1, counts.size + 1)
    computed = np.isfinite(qc._mse_errors(counts, candidates, GRIDS["uint8 unsigned"]))
    assert computed.sum() <= 4 * qc._CANDIDATE_ROWS


def naive_kl(counts: np.ndarray, edge: int, levels: int) -> float:
    """TensorRT's recipe written out bin by bin."""
    reference = counts[:edge].copy()
    reference[-1] += counts[edge:].sum()
    group = np.arange(edge) * levels // edge
    candidate = np.zeros(edge)
    for k in range(levels):
        members, nonempty = group == k, (group == k) & (counts[:edge] > 0)
        if nonempty.any():
            candidate[nonempty] = counts[:edge][members].sum() / nonempty.sum()
    p, q = reference / reference.sum(), candidate / candidate.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(p > 0, p * np.log(p / q), 0.0).sum())


def test_vectorized_kl_divergence_equals_the_bin_by_bin_recipe():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.exponential(50, 600) * (rng.random(600) > 0.2)).astype(np.float64)
    edges = np.arange(128, 601)
    fast = qc._kl_divergences(counts, edges, 128)
    slow = np.array([naive_kl(counts, edge, 128) for edge in edges])
    assert np.array_equal(np.isinf(fast), np.isinf(slow))
    finite = np.isfinite(slow)
    assert np.allclose(fast[finite], slow[finite], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ parameters
def ort_scale_zero_point(low: float, high: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), np.int32(qmin), np.int32(qmax), symmetric)
    return float(scale), int(zero_point)


@pytest.mark.parametrize("dtype, symmetric, qrange", [
    ("int8", True, (-127, 127)), ("int8", False, (-128, 127)), ("uint8", False, (0, 255)), ("uint8", True, (0, 255)),
])
@pytest.mark.parametrize("values", [gaussian_with_outliers(10_000) + 1.5, np.maximum(uniform(10_000), 0)])
def test_minmax_parameters_follow_onnxruntime(dtype, symmetric, qrange, values):
    params = quantization_params({"t": histogram_of(values)}, "minmax", symmetric=symmetric, dtype=dtype)["t"]
    scale, zero_point = ort_scale_zero_point(values.min(), values.max(), *qrange, symmetric)
    assert params.scale == pytest.approx(scale, rel=1e-6)
    assert params.zero_point == zero_point
    assert params.clip_fraction == 0.0 and params.method == "minmax" and params.dtype == dtype


def test_asymmetric_clipped_range():
    values = gaussian_with_outliers()
    histograms = {"t": histogram_of(values)}
    params = quantization_params(histograms, "percentile", symmetric=False, dtype="uint8", percentile=99.9)["t"]
    assert (params.low, params.high) == (-params.threshold, params.threshold)
    assert params.scale == pytest.approx(2 * params.threshold / 255, rel=1e-6)
    assert params.zero_point == round(-params.low / params.scale)
    assert params.clip_fraction == pytest.approx(0.001, rel=0.02)
    relu_histograms = {"t": histogram_of(np.maximum(values, 0))}
    relu = quantization_params(relu_histograms, "minmax", symmetric=False, dtype="uint8")["t"]
    assert (relu.low, relu.zero_point, relu.scale) == (0.0, 0, pytest.approx(40.0 / 255))


def test_float8_scale_and_symmetry():
    histogram = histogram_of(gaussian_with_outliers())
    params = quantization_params({"t": histogram}, "minmax", dtype="float8e4m3fn")["t"]
    assert (params.scale, params.zero_point) == (pytest.approx(40.0 / 448), 0)
    with pytest.raises(OnnxmpError, match="symmetric only"):
        quantization_params({"t": histogram}, "minmax", symmetric=False, dtype="float8e4m3fn")
    with pytest.raises(OnnxmpError, match="entropy calibration compares against evenly spaced levels"):
        quantization_params({"t": histogram}, "entropy", dtype="float8e4m3fn")


@pytest.mark.parametrize("values", [np.zeros(100, np.float32), np.zeros(0, np.float32), np.full(5, 1e-44, np.float32)])
@pytest.mark.parametrize("dtype, symmetric", [("int8", True), ("uint8", False), ("float8e4m3fn", True)])
def test_zero_range_gets_scale_one(values, dtype, symmetric):
    for method in METHODS if dtype != "float8e4m3fn" else ("minmax", "percentile", "mse"):
        params = quantization_params({"t": histogram_of(values)}, method, symmetric=symmetric, dtype=dtype)["t"]
        assert (params.scale, params.zero_point, params.clip_fraction) == (1.0, 0, 0.0)


def test_unknown_options_are_refused():
    histogram = histogram_of(uniform(100))
    with pytest.raises(OnnxmpError, match="unknown calibration method 'kl'"):
        quantization_params({"t": histogram}, "kl")
    with pytest.raises(OnnxmpError, match="unknown quantization type 'int4'"):
        quantization_params({"t": histogram}, "minmax", dtype="int4")
    with pytest.raises(OnnxmpError, match=r"percentile must be in \(0, 100\]"):
        quantization_params({"t": histogram}, "percentile", percentile=100.5)


# ------------------------------------------------------------------------------ exports
@pytest.fixture(scope="module")
def digits_params():
    tensors = ["x", DIGITS_RELU, "/Add_output_0"]
    histograms = collect_histograms(onnx.load(DIGITS), digits_batches(), tensors, progress=False)
    params = quantization_params(histograms, "entropy")
    params["zero"] = quantization_params({"zero": histogram_of(np.zeros(3, np.float32))}, "minmax")["zero"]
    return params


def test_tensorrt_calibration_cache_round_trip(tmp_path, digits_params):
    path = tmp_path / "calibration.cache"
    write_tensorrt_calibration_cache(digits_params, path, tensorrt_version="10.3.0")
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    assert header == "TRT-100300-EntropyCalibration2"
    scales = {}
    for line in lines:  # as onnxruntime's TensorRT provider reads it: up to ':', then hex bits
        name, digits = line.split(":")
        scales[name] = struct.unpack(">f", bytes.fromhex(digits.strip()))[0]
    assert list(scales) == list(digits_params)
    for name, params in digits_params.items():
        expected = np.float32(params.threshold / 127) if params.threshold else 1.0
        assert scales[name] == expected
    assert scales[DIGITS_RELU] == np.float32(digits_params[DIGITS_RELU].scale)


@pytest.mark.parametrize("version, code", [("8.6.1", 8601), ("7.1.3.4", 7103), ("10.3.0", 100300), ("10", 100000)])
def test_tensorrt_cache_header_versions(tmp_path, version, code):
    write_tensorrt_calibration_cache({}, tmp_path / "c", tensorrt_version=version, algorithm="MinMaxCalibration")
    assert (tmp_path / "c").read_text(encoding="utf-8") == f"TRT-{code}-MinMaxCalibration\n"


def test_tensorrt_cache_refuses_line_breaks_in_names(tmp_path, digits_params):
    with pytest.raises(DataError, match=r"tensor 'a\\nb' has a line break"):
        write_tensorrt_calibration_cache({"a\nb": digits_params["x"]}, tmp_path / "c", tensorrt_version="10.0.0")
    assert not (tmp_path / "c").exists()


def test_writing_into_a_missing_folder_names_the_file(tmp_path, digits_params):
    for write in (write_tensorrt_calibration_cache, write_ort_trt_calibration_table, write_ort_quant_overrides):
        with pytest.raises(OnnxmpError, match="cannot write '.*missing/out'"):
            write(digits_params, tmp_path / "missing" / "out")


def test_ort_flatbuffers_table_round_trip(tmp_path, digits_params):
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    path = tmp_path / "calibration.flatbuffers"
    write_ort_trt_calibration_table(digits_params, path)
    table = TrtTable.GetRootAs(path.read_bytes(), 0)
    ranges = {table.Dict(i).Key().decode(): float(table.Dict(i).Value()) for i in range(table.DictLength())}
    assert list(ranges) == list(digits_params)
    for name, params in digits_params.items():
        assert ranges[name] == pytest.approx(params.threshold if params.threshold else 127.0, rel=1e-6)


def test_ort_quant_overrides_round_trip_through_quantize_static(tmp_path, digits_params):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

    path = tmp_path / "overrides.json"
    write_ort_quant_overrides(digits_params, path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw[DIGITS_RELU] == [{"scale": digits_params[DIGITS_RELU].scale, "zero_point": 0, "quant_type": "QInt8"}]
    overrides = read_ort_quant_overrides(path)
    assert overrides["x"][0]["quant_type"] is QuantType.QInt8
    assert overrides["x"][0]["zero_point"].dtype == np.int8

    del overrides["zero"]  # not a tensor of the model
    model = onnx.load(DIGITS)
    helper_ = TensorQuantOverridesHelper(overrides)
    activations = {o for node in model.graph.node for o in node.output} | {"x"}
    initializers = {t.name: t for t in model.graph.initializer}
    assert helper_.is_valid(initializers, activations, QuantType.QInt8) == (True, None)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(digits_batches())

        def get_next(self):
            return next(self.batches, None)

    output = tmp_path / "q.onnx"
    quantize_static(DIGITS, output, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"TensorQuantOverrides": overrides})
    values = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(output).graph.initializer}
    for name in ("x", DIGITS_RELU):
        assert values[f"{name}_scale"] == np.float32(digits_params[name].scale)
        assert values[f"{name}_zero_point"] == digits_params[name].zero_point


def test_unreadable_overrides_name_the_file(tmp_path):
    path = tmp_path / "o.json"
    path.write_text('{"x": [{"scale": 1.0, "zero_point": 0, "quant_type": "QInt3"}]}', encoding="utf-8")
    with pytest.raises(DataError, match="'.*o.json' is not a quantization overrides file"):
        read_ort_quant_overrides(path)
