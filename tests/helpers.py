"""Helpers for numerics tests: run models on onnxruntime and compare outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

BATCH = 2


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """A CPU session with graph optimizations off, so the graph runs as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs matching the session's input specs; symbolic dims become BATCH."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in sess.get_inputs():
        shape = [d if isinstance(d, int) else BATCH for d in spec.shape]
        if spec.type == "tensor(bool)":
            feeds[spec.name] = np.array(rng.random() < 0.5).reshape(shape)
        elif "int" in spec.type:
            dtype = np.int64 if "int64" in spec.type else np.int32
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)  # valid ids, masks and token types
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def max_relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |a - e| / max(|e|), with a floor so all-zero outputs compare absolutely."""
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-6)
    return float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale if expected.size else 0.0


def assert_same_outputs(
    original: onnx.ModelProto | str,
    candidate: onnx.ModelProto | str,
    rtol: float = 1e-5,
    seeds: tuple[int, ...] = (0, 1),
    skip: tuple[str, ...] = (),
) -> None:
    """Both models give the same outputs (within ``rtol`` of the largest value) on random inputs."""
    first, second = session(original), session(candidate)
    names = [o.name for o in first.get_outputs()]
    assert names == [o.name for o in second.get_outputs()], "output names changed"
    for seed in seeds:
        feeds = random_feeds(first, seed)
        for name, want, got in zip(names, first.run(None, feeds), second.run(None, feeds)):
            if name in skip:
                continue
            assert want.shape == got.shape and want.dtype == got.dtype, f"{name}: shape or dtype changed"
            error = max_relative_error(want, got)
            assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol}"


def calibration_folder(tmp_path, model: onnx.ModelProto | str, batches: int = 3, seed: int = 0):
    """Deterministic N(0, 1) calibration batches for every input (symbolic dimensions: 2)."""
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    rng = np.random.default_rng(seed)
    folder = tmp_path / f"calib_{seed}"
    if folder.exists():
        return folder
    folder.mkdir()
    for index in range(batches):
        arrays = {}
        for info in proto.graph.input:
            shape = [d.dim_value if d.HasField("dim_value") else 2 for d in info.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
            arrays[info.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        np.savez(folder / f"batch_{index:03d}.npz", **arrays)
    return folder
