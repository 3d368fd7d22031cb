"""Calibration statistics: the counters against numpy, streaming, errors, and the cache."""

from __future__ import annotations

import math
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxmp.calibration as calibration
from conftest import MODELS, REPO
from onnxmp.calibration import (
    Calibrator,
    StatisticsCache,
    TensorStats,
    cache_key,
    collect_statistics,
    default_cache_dir,
    model_digest,
    stream_tensors,
)
from onnxmp.data import InputSpec, input_specs, load_batches, random_batches
from onnxmp.errors import DataError
from onnxmp.ir import save_proto

DIGITS_CALIB = REPO / "fixtures" / "data" / "digits_calib"


def probe_model() -> onnx.ModelProto:
    """x: f32[N,6] -> big (x*1e5, overflows fp16), tiny (x*1e-6, underflows), root (Sqrt: NaN for x<0),
    relu (zeros), count (int64 Cast, not a float) -> y."""
    nodes = [
        helper.make_node("Mul", ["x", "big_scale"], ["big"], name="big"),
        helper.make_node("Mul", ["x", "tiny_scale"], ["tiny"], name="tiny"),
        helper.make_node("Sqrt", ["x"], ["root"], name="root"),
        helper.make_node("Relu", ["x"], ["relu"], name="relu"),
        helper.make_node("Cast", ["relu"], ["count"], name="count", to=TensorProto.INT64),
        helper.make_node("Add", ["big", "tiny"], ["y"], name="y"),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6]),
         helper.make_tensor_value_info("count", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor("big_scale", TensorProto.FLOAT, [], [1e5]),
         helper.make_tensor("tiny_scale", TensorProto.FLOAT, [], [1e-6])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def probe_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore"):
        root = np.sqrt(x)
    big, tiny = x * np.float32(1e5), x * np.float32(1e-6)
    return {"x": x, "big": big, "tiny": tiny, "root": root, "relu": np.maximum(x, 0), "y": big + tiny}


def save_probe_batches(folder, count: int = 3) -> list[np.ndarray]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for index in range(count):
        x = rng.standard_normal((4, 6)).astype(np.float32)
        x[0, :3] = [0.0, 1e-3, -2.0]
        arrays.append(x)
        np.savez(folder / f"batch_{index:03d}.npz", x=x)
    return arrays


def expected_stats(values: np.ndarray) -> TensorStats:
    """The counters written out with numpy, independently of TensorStats.of."""
    values = values.astype(np.float64).ravel()
    finite = values[np.isfinite(values)]
    magnitude = np.abs(finite)
    return TensorStats(
        count=values.size,
        min=float(finite.min()),
        max=float(finite.max()),
        absmax=float(magnitude.max()),
        zeros=int((finite == 0).sum()),
        underflow=int(((magnitude > 0) & (magnitude < 2.0**-14)).sum()),
        overflow=int((magnitude > 65504).sum()),
        nonfinite=int((~np.isfinite(values)).sum()),
    )


def assert_stats_equal(got: TensorStats, want: TensorStats) -> None:
    for field in ("count", "zeros", "underflow", "overflow", "nonfinite"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("min", "max", "absmax"):
        assert math.isclose(getattr(got, field), getattr(want, field), rel_tol=1e-6), field


# ------------------------------------------------------------------------------ TensorStats
def test_tensor_stats_of_an_array():
    values = np.array([0.0, 0.0, 1e-6, -3e-5, 2.0, -70000.0, 65504.0, np.nan, np.inf, -np.inf], np.float32)
    stats = TensorStats.of(values)
    assert stats == TensorStats(count=10, min=-70000.0, max=65504.0, absmax=70000.0, zeros=2,
                                underflow=2, overflow=1, nonfinite=3)
    assert stats.finite == 7
    assert stats.underflow_fraction == pytest.approx(2 / 5)
    assert stats.overflow_fraction == pytest.approx(1 / 7)


def test_tensor_stats_of_non_finite_only_and_empty():
    assert TensorStats.of(np.array([np.nan, np.inf], np.float32)) == TensorStats(count=2, nonfinite=2)
    empty = TensorStats()
    assert empty.underflow_fraction == 0.0 and empty.overflow_fraction == 0.0


def test_tensor_stats_of_float16():
    stats = TensorStats.of(np.array([6e-5, -1.0, 0.0], np.float16))  # 6e-5 is subnormal in float16
    assert (stats.underflow, stats.zeros, stats.min) == (1, 1, -1.0)


def test_merge_equals_stats_of_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(50).astype(np.float32) * scale for scale in (1e-6, 1.0, 1e5)]
    parts[1][:4] = [0.0, np.nan, np.inf, 0.0]
    merged = TensorStats()
    for part in parts:
        merged = merged.merge(TensorStats.of(part))
    assert merged == TensorStats.of(np.concatenate(parts))
    assert_stats_equal(merged, expected_stats(np.concatenate(parts)))


# ------------------------------------------------------------------------------ collection
def test_statistics_match_numpy_on_the_same_data(tmp_path):
    arrays = save_probe_batches(tmp_path)
    model = probe_model()
    stats = collect_statistics(model, load_batches(tmp_path, input_specs(model)), progress=False)
    reference = probe_reference(np.concatenate(arrays))
    assert set(stats) == set(reference)  # the int64 'count' is left out
    for name, values in reference.items():
        assert_stats_equal(stats[name], expected_stats(values))
    assert stats["root"].nonfinite > 0 and stats["big"].overflow > 0 and stats["tiny"].underflow > 0


def test_the_callers_model_is_not_modified():
    model = probe_model()
    before = model.SerializeToString()
    collect_statistics(model, random_batches(input_specs(model), 1, 2), progress=False)
    assert model.SerializeToString() == before


def test_digits_default_tensors_are_every_float_tensor():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    stats = collect_statistics(model, load_batches(DIGITS_CALIB, input_specs(model)), progress=False)
    outputs = [o for node in model.graph.node for o in node.output]
    assert list(stats) == ["x"] + outputs
    data = np.concatenate([np.load(p)["x"] for p in sorted(DIGITS_CALIB.glob("*.npz"))])
    assert_stats_equal(stats["x"], expected_stats(data))
    assert stats["logits"].count == data.shape[0] * 10


def test_requested_tensors_only(tmp_path):
    model = probe_model()
    batches = random_batches(input_specs(model), 2, 3)
    stats = collect_statistics(model, batches, tensors=["relu", "x"], progress=False)
    assert set(stats) == {"relu", "x"} and stats["relu"].count == 2 * 3 * 6


def test_requesting_unknown_or_non_float_tensors_fails():
    model = probe_model()
    batches = random_batches(input_specs(model), 1)
    with pytest.raises(DataError, match="'big_scale': it is neither a graph input nor a node output"):
        collect_statistics(model, batches, tensors=["big_scale"], progress=False)
    with pytest.raises(DataError, match="'count': it is tensor\\(int64\\); statistics are kept for float tensors only"):
        collect_statistics(model, batches, tensors=["count"], progress=False)


def test_requesting_a_non_float_input_fails():
    model = probe_model()
    model.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
    batches = random_batches(input_specs(model), 1)
    with pytest.raises(DataError, match="'ids': it is int64"):
        collect_statistics(model, batches, tensors=["ids"], progress=False)


def test_non_finite_calibration_data_is_refused(tmp_path):
    save_probe_batches(tmp_path)
    x = np.ones((4, 6), np.float32)
    x[1, 2] = np.nan
    np.savez(tmp_path / "batch_001.npz", x=x)
    model = probe_model()
    with pytest.raises(DataError, match="calibration batch 'batch_001.npz': input 'x' holds 1 NaN or Inf values"):
        collect_statistics(model, load_batches(tmp_path, input_specs(model)), progress=False)


def test_streamed_batches_come_in_order_and_an_error_when_its_batch_is_reached(tmp_path):
    arrays = save_probe_batches(tmp_path, count=4)
    x = np.ones((4, 6), np.float32)
    x[1, 2] = np.nan
    np.savez(tmp_path / "batch_002.npz", x=x)
    model = probe_model()
    seen = []
    with pytest.raises(DataError, match="calibration batch 'batch_002.npz': input 'x' holds 1 NaN"):
        for label, streamed in stream_tensors(model, load_batches(tmp_path, input_specs(model)), ["x", "relu"], progress=False):
            seen.append(label)
            want = probe_reference(arrays[len(seen) - 1])
            assert all(np.array_equal(streamed[n], want[n]) for n in ("x", "relu"))
    assert seen == ["batch_000.npz", "batch_001.npz"]


def test_onnxruntime_failure_names_the_batch():
    model = probe_model()
    wrong = random_batches([InputSpec("x", np.dtype(np.float32), ["N", 5])], 1)
    with pytest.raises(DataError, match="onnxruntime failed on calibration batch 'random batch 0'"):
        collect_statistics(model, wrong, progress=False)


def test_large_model_path_goes_through_external_data(monkeypatch, tmp_path):
    model = probe_model()
    save_probe_batches(tmp_path)
    batches = load_batches(tmp_path, input_specs(model))
    in_memory = collect_statistics(model, batches, progress=False)
    saved = []
    monkeypatch.setattr(calibration, "TWO_GB", 0)  # every model counts as "over 2 GB"
    monkeypatch.setattr(calibration, "save_proto", lambda proto, path, external_data: saved.append(path)
                        or save_proto(proto, path, external_data))
    assert collect_statistics(model, batches, progress=False) == in_memory
    assert len(saved) == 1 and not Path(saved[0]).parent.exists()  # the temporary folder is gone


def test_progress_bar_does_not_change_the_result():
    model = probe_model()
    batches = random_batches(input_specs(model), 2, 2)
    assert collect_statistics(model, batches, progress=True) == collect_statistics(model, batches, progress=False)


def test_memory_does_not_grow_with_the_number_of_batches():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    specs = input_specs(model)

    def peak(count: int) -> int:
        tracemalloc.start()
        stats = collect_statistics(model, random_batches(specs, count, batch_size=16), progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert all(type(s) is TensorStats for s in stats.values())
        return top

    peak(2)  # warm up imports and onnxruntime's first-use allocations
    few, many = peak(5), peak(50)
    assert many < few * 1.1 + 64 * 1024, (few, many)


def test_arrays_are_dropped_batch_by_batch(monkeypatch):
    """onnxruntime's output buffers escape tracemalloc, so count the arrays still alive instead."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    specs = input_specs(model)
    measure = TensorStats.of.__func__

    def most_alive(count: int) -> int:
        refs: list[weakref.ref] = []
        most = 0

        def watched(cls, array):
            nonlocal most
            refs.append(weakref.ref(array))
            most = max(most, sum(ref() is not None for ref in refs))
            return measure(cls, array)

        monkeypatch.setattr(TensorStats, "of", classmethod(watched))
        collect_statistics(model, random_batches(specs, count, batch_size=4), progress=False)
        return most

    per_batch = 1 + len([o for node in model.graph.node for o in node.output])
    assert most_alive(3) == most_alive(12) <= 2 * per_batch


# ------------------------------------------------------------------------------ cache
def test_cache_round_trip_is_atomic_and_exact(tmp_path):
    cache = StatisticsCache(tmp_path / "cache")
    stats = {"a": TensorStats.of(np.array([1.0, np.nan, 1e-7], np.float32)), "empty": TensorStats()}
    assert cache.get("k") is None
    cache.put("k", stats)
    assert cache.get("k") == stats
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.json"]


def test_unreadable_cache_files_are_misses(tmp_path):
    cache = StatisticsCache(tmp_path)
    cache.path("k").write_text("{not json")
    assert cache.get("k") is None
    cache.path("k").write_text('{"version": 999, "tensors": {}}')
    assert cache.get("k") is None


def test_unwritable_cache_warns(tmp_path):
    (tmp_path / "file").write_text("")
    cache = StatisticsCache(tmp_path / "file" / "cache")
    with pytest.warns(UserWarning, match="cannot write the calibration cache .*ONNXMP_CACHE_DIR"):
        cache.put("k", {"a": TensorStats()})


def test_calibrator_reuses_the_cache(tmp_path, monkeypatch):
    model = probe_model()
    save_probe_batches(tmp_path / "data")
    batches = load_batches(tmp_path / "data", input_specs(model))
    first = Calibrator(batches, tmp_path / "cache", progress=False).statistics(model)

    def no_run(*args, **kwargs):
        raise AssertionError("onnxruntime should not run on a cache hit")

    monkeypatch.setattr(calibration, "collect_statistics", no_run)
    calibrator = Calibrator(load_batches(tmp_path / "data", input_specs(model)), tmp_path / "cache")
    assert calibrator.statistics(model) == first
    assert calibrator.digest == batches.digest
    with pytest.raises(AssertionError):
        calibrator.statistics(model, tensors=["relu"])  # another tensor list is another key


def test_calibrator_without_cache_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ONNXMP_CACHE_DIR", str(tmp_path / "cache"))
    model = probe_model()
    stats = Calibrator(random_batches(input_specs(model), 1), None, progress=False).statistics(model)
    assert "y" in stats and list(tmp_path.iterdir()) == []


def test_cache_key_tracks_model_data_and_tensors():
    model = probe_model()
    key = cache_key(model, "sha256:data", None)
    assert cache_key(model, "sha256:other", None) != key
    assert cache_key(model, "sha256:data", ["x"]) != key
    changed = probe_model()
    changed.graph.initializer[0].CopyFrom(helper.make_tensor("big_scale", TensorProto.FLOAT, [], [1e4]))
    assert cache_key(changed, "sha256:data", None) != key


def test_model_digest_ignores_metadata():
    model = probe_model()
    tagged = probe_model()
    tagged.metadata_props.add(key="onnxmp.calibration", value="sha256:x")
    tagged.producer_name = "someone"
    assert model_digest(tagged) == model_digest(model)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXMP_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ONNXMP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "onnxmp" / "calibration"
