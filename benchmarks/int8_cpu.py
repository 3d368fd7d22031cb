#!/usr/bin/env python3
"""INT8 on onnxruntime's CPU provider: onnxmp's ``int8-cpu`` preset against FP32 and
``onnxruntime.quantization.quantize_static``.

Usage::

    python benchmarks/int8_cpu.py                                  # every model and the calibration table (~15 min on 2 cores)
    python benchmarks/int8_cpu.py --models digits_cnn,resnet18 --json int8.json
    python benchmarks/int8_cpu.py --models resnet18 --dump-fused   # op counts after onnxruntime's fusion

Models (built here with onnx.helper, random weights from ``numpy.random.default_rng(seed)``,
opset 17, symbolic batch, latency at batch 1):

- ``digits_cnn``, ``tiny_transformer``: the trained fixtures; calibration from
  ``fixtures/data/*_calib``, agreement and accuracy on the held-out files.
- ``digits_detector``: the trained YOLO-style digit detector of ``fixtures/train_detector.py``
  (3x160x160, output [N, 14, 500]: 4 box + 10 class channels per anchor); calibration and
  evaluation images from ``fixtures/data/digits_detector_*``.
- ``digits_detector_320``: its YOLOv8n-sized sibling (3x320x320, three heads, [N, 14, 2100]),
  trained to F1 0.98; 256 held-out scenes (``fixtures/data/digits_detector_320_*``).
- ``cnn_bn_residual``, ``transformer_block``: fixtures with random weights.
- ``resnet18``, ``resnet50``: torchvision's layouts (basic / bottleneck blocks, BatchNorm already
  folded into the convolutions), input [N,3,224,224], 1000 logits. He-normal weights; the last
  convolution of each residual branch is scaled by 0.2 so that activations stay bounded.
- ``yolo_like``: a YOLOv8-style detector at 320x320: Conv+SiLU (x * Sigmoid(x)) stages with
  C2f-like split/concat blocks, SPPF (three MaxPools), an upsampling (Resize) neck and two
  detection heads; output [N, 84, 2000] (4 box + 80 class channels per anchor).
- ``bert_like``: a BERT-base-like encoder (hidden 768, 12 heads, FFN 3072, 2 layers, sequence
  128) on float embeddings [N,128,768], mean-pooled, 10 logits.

Calibration for the random-weight models is 16 samples (4 batches of 4) and agreement is measured
on 64 other samples of the same distribution: image-like inputs for the image models (blocky
low-frequency patterns with per-sample contrast and per-channel offsets: on white noise a
random-weight classifier sees near ties between its top classes on every input), N(0, 1)
elsewhere. Random weights make small logit margins: judge INT8 accuracy by the trained fixtures
(``acc``) and by ``rel_l2``; ``top1`` on the random models is a lower bound. The same calibration batches feed every quantizer.

Variants, each from the same FP32 model after onnxmp's ``fp32`` preset (BatchNorm folded), so
every quantizer sees the same graph:

- ``fp32``: that model.
- ``onnxmp``: the ``int8-cpu`` preset's pipeline (placement for the CPU provider, MSE
  calibration, the cost model on: when INT8 is not estimated 1.2x faster, the pass keeps the
  float model and the row says ``kept fp32``); its validation gates are not applied here, the
  table shows the numbers instead. Calibrated afresh for every row (no cache), so ``convert_s``
  is the whole pipeline's time including calibration.
- ``onnxmp-int8``: the same pipeline with the cost model off: the INT8 model whatever its speed
  (shows what INT8 does to accuracy where ``onnxmp`` kept FP32).
- ``ort-default``: ``quantize_static`` with its defaults (QDQ, int8 activations and weights,
  per-tensor, MinMax).
- ``ort-minmax`` / ``ort-entropy`` / ``ort-percentile``: ``quantize_static`` QDQ, per-channel,
  uint8 activations, int8 weights, MinMax / Entropy / Percentile calibration.

Then (``--calibration-model``, ``--calibration-batches``) the calibration cost: ``onnxmp-int8`` and
the three calibrators on 10 and 200 batches (the case's batches cycled), each in a fresh process,
``--calibration-repeats`` times with the tools taking turns: median time, highest peak resident
memory (``VmHWM``), and Entropy's time over onnxmp's.

Columns: ``speedup`` = FP32 median latency / variant median latency, timed in pairs: the two
sessions (``onnxmp.runtime.make_session``, CPU provider, all graph optimizations, batch 1, random
inputs from ``make_inputs``) run alternately, ``--repeats`` times after ``--warmup`` (more for fast
models, so that at least a second is timed); ``fp32`` against itself shows the noise;
``top1`` = fraction of rows whose argmax is the FP32 model's (logits: over the classes; the
detector: over the 80 class channels of each anchor; the json also has ``top1_decided``, the same
over anchors whose FP32 top-2 class logits differ by at least ``DECIDED_MARGIN``, and their
``decided_share``; a trained detector, ``digits_detector*``: over the anchors where FP32 detects an
object, a class sigmoid at least the fixture's ``score_threshold``, as detectors are judged, with
``top1_all_anchors`` and ``detected_share`` in the json); ``acc`` = held-out accuracy where labels
exist; ``rel_l2`` = ||int8 - fp32|| / ||fp32|| of the first output; ``qlinear`` = integer kernels
onnxruntime runs after its fusion (QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat, ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
OPSET = 17
CALIB_SAMPLES, CALIB_BATCH, EVAL_SAMPLES, EVAL_BATCH = 16, 4, 64, 8
INTEGER_KERNELS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")
DECIDED_MARGIN = 1.0  # detector: anchors whose FP32 top-2 class logits differ by at least this are "decided"


# ----------------------------------------------------------------------------- model builders
class Builder:
    """Small onnx.helper graph builder with deterministic weights and unique names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = collections.Counter()

    def name(self, base: str) -> str:
        self.count[base] += 1
        return f"{base}_{self.count[base]}"

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, **attrs: Any) -> str:
        name = self.name(base or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name + "_out"], name=name, **attrs))
        return name + "_out"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, gain: float = 1.0, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * np.float32(gain * np.sqrt(2.0 / fan_in))
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        return self.op("Conv", [x, self.init("conv.w", w), self.init("conv.b", b)], "conv",
                       kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)  # fmt: skip

    def linear(self, x: str, cin: int, cout: int, gemm: bool = False) -> str:
        w = (self.rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.02).astype(np.float32)
        if gemm:
            return self.op("Gemm", [x, self.init("fc.w", w.T.copy()), self.init("fc.b", b)], "fc", transB=1)
        return self.op("Add", [self.op("MatMul", [x, self.init("linear.w", w)], "matmul"), self.init("linear.b", b)], "bias")

    def model(self, graph_name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
        onnx.checker.check_model(model, full_check=True)
        return model


def build_resnet(depth: int, seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.op("Relu", [b.conv("x", 3, 64, 7, 2)], "relu")
    x = b.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    bottleneck = depth >= 50
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    cin = 64
    for stage, (count, width) in enumerate(zip(blocks, [64, 128, 256, 512])):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            cout = width * 4 if bottleneck else width
            if bottleneck:
                y = b.op("Relu", [b.conv(x, cin, width, 1)], "relu")
                y = b.op("Relu", [b.conv(y, width, width, 3, stride)], "relu")
                y = b.conv(y, width, cout, 1, gain=0.2)
            else:
                y = b.op("Relu", [b.conv(x, cin, width, 3, stride)], "relu")
                y = b.conv(y, width, cout, 3, gain=0.2)
            shortcut = b.conv(x, cin, cout, 1, stride) if (stride != 1 or cin != cout) else x
            x = b.op("Relu", [b.op("Add", [y, shortcut], "add")], "relu")
            cin = cout
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    b.linear(x, cin, 1000, gemm=True)
    b.nodes[-1].output[0] = "logits"
    return b.model(f"resnet{depth}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])])  # fmt: skip


def build_yolo_like(seed: int = 0, size: int = 320) -> onnx.ModelProto:
    b = Builder(seed)

    def cbs(x: str, cin: int, cout: int, k: int = 1, stride: int = 1) -> str:  # Conv + SiLU
        y = b.conv(x, cin, cout, k, stride)
        return b.op("Mul", [y, b.op("Sigmoid", [y], "sigmoid")], "silu")

    def c2f(x: str, cin: int, cout: int, shortcut: bool = True) -> str:
        half = cout // 2
        a, y = cbs(x, cin, half), cbs(x, cin, half)
        z = cbs(cbs(y, half, half, 3), half, half, 3)
        z = b.op("Add", [y, z], "add") if shortcut else z
        return cbs(b.op("Concat", [a, y, z], "concat", axis=1), 3 * half, cout)

    x = cbs("x", 3, 16, 3, 2)
    x = c2f(cbs(x, 16, 32, 3, 2), 32, 32)
    p3 = c2f(cbs(x, 32, 64, 3, 2), 64, 64)
    p4 = c2f(cbs(p3, 64, 128, 3, 2), 128, 128)
    p5 = c2f(cbs(p4, 128, 256, 3, 2), 256, 256)
    s = cbs(p5, 256, 128)  # SPPF
    pools = [s]
    for _ in range(3):
        pools.append(b.op("MaxPool", [pools[-1]], "maxpool", kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]))
    p5 = cbs(b.op("Concat", pools, "concat", axis=1), 512, 256)
    scales = b.init("resize.scales", np.array([1, 1, 2, 2], np.float32))
    up = b.op("Resize", [p5, "", scales], "resize", mode="nearest")
    n4 = c2f(b.op("Concat", [up, p4], "concat", axis=1), 384, 128, shortcut=False)
    outputs = []
    for feature, channels in ((n4, 128), (p5, 256)):
        h = cbs(cbs(feature, channels, 64, 3), 64, 64, 3)
        h = b.conv(h, 64, 84, 1)
        outputs.append(b.op("Reshape", [h, b.init("shape", np.array([0, 84, -1], np.int64))], "reshape"))
    b.op("Concat", outputs, "concat", axis=2)
    b.nodes[-1].output[0] = "detections"
    anchors = (size // 16) ** 2 + (size // 32) ** 2
    return b.model("yolo_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                   [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 84, anchors])])  # fmt: skip


def build_bert_like(seed: int = 0, hidden: int = 768, heads: int = 12, layers: int = 2, seq: int = 128) -> onnx.ModelProto:
    b = Builder(seed)
    head_dim = hidden // heads
    split = b.init("shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = b.init("shape", np.array([0, 0, hidden], np.int64))
    scale = b.init("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))

    def layer_norm(x: str) -> str:
        gamma = b.init("ln.gamma", (1 + 0.05 * b.rng.standard_normal(hidden)).astype(np.float32))
        beta = b.init("ln.beta", (0.05 * b.rng.standard_normal(hidden)).astype(np.float32))
        return b.op("LayerNormalization", [x, gamma, beta], "layernorm", axis=-1, epsilon=1e-5)

    x = "x"
    for _ in range(layers):
        q, k, v = (b.op("Reshape", [b.linear(x, hidden, hidden), split], "reshape") for _ in range(3))
        q = b.op("Transpose", [q], "transpose", perm=[0, 2, 1, 3])
        k = b.op("Transpose", [k], "transpose", perm=[0, 2, 3, 1])
        v = b.op("Transpose", [v], "transpose", perm=[0, 2, 1, 3])
        scores = b.op("Mul", [b.op("MatMul", [q, k], "scores"), scale], "scale")
        context = b.op("MatMul", [b.op("Softmax", [scores], "softmax", axis=-1), v], "context")
        context = b.op("Reshape", [b.op("Transpose", [context], "transpose", perm=[0, 2, 1, 3]), merge], "reshape")
        x = layer_norm(b.op("Add", [x, b.linear(context, hidden, hidden)], "residual"))
        h = b.linear(x, hidden, 4 * hidden)
        erf = b.op("Erf", [b.op("Mul", [h, b.init("c", np.array(1 / np.sqrt(2), np.float32))], "mul")], "erf")
        gelu = b.op("Mul", [b.op("Mul", [h, b.op("Add", [erf, b.init("one", np.array(1, np.float32))], "add")], "mul"),
                            b.init("half", np.array(0.5, np.float32))], "gelu")  # fmt: skip
        x = layer_norm(b.op("Add", [x, b.linear(gelu, 4 * hidden, hidden)], "residual"))
    pooled = b.op("ReduceMean", [x], "pool", axes=[1], keepdims=0)
    b.linear(pooled, hidden, 10, gemm=True)
    b.nodes[-1].output[0] = "logits"
    return b.model("bert_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])])  # fmt: skip


# ----------------------------------------------------------------------------- cases
class Case:
    """A model, its calibration batches, evaluation inputs (and labels when they exist)."""

    def __init__(self, name: str, model: onnx.ModelProto, calib: list[dict], evaluation: np.ndarray,
                 labels: np.ndarray | None = None, classes_axis: int = -1, note: str = "",
                 score_threshold: float | None = None):  # fmt: skip
        self.name, self.model, self.calib, self.evaluation, self.labels = name, model, calib, evaluation, labels
        self.classes_axis, self.note = classes_axis, note
        self.score_threshold = score_threshold  # detector: a class sigmoid above this is a detection


def _images(rng: np.random.Generator, count: int, shape: list[int]) -> np.ndarray:
    """Image-like inputs: a blocky low-frequency pattern (7x7 cells), per-sample contrast and
    per-channel offsets, plus a little pixel noise. White noise would give every image nearly the
    same pooled features, so a random-weight classifier would see near ties on every input."""
    channels, height, width = shape
    low = rng.standard_normal((count, channels, 7, 7)).astype(np.float32)
    up = np.repeat(np.repeat(low, -(-height // 7), 2), -(-width // 7), 3)[:, :, :height, :width]
    contrast = rng.uniform(0.5, 2.0, (count, 1, 1, 1))
    offsets = rng.standard_normal((count, channels, 1, 1))
    return (up * contrast + offsets + 0.3 * rng.standard_normal((count, channels, height, width))).astype(np.float32)


def _random_case(name: str, model: onnx.ModelProto, shape: list[int], classes_axis: int = -1) -> Case:
    """Calibration and evaluation inputs from the same distribution, different seeds."""

    def draw(rng: np.random.Generator, count: int) -> np.ndarray:
        return _images(rng, count, shape) if len(shape) == 3 and shape[0] == 3 else rng.standard_normal([count] + shape).astype(np.float32)

    rng = np.random.default_rng(1)
    calib = [{"x": draw(rng, CALIB_BATCH)} for _ in range(CALIB_SAMPLES // CALIB_BATCH)]
    return Case(name, model, calib, draw(np.random.default_rng(2), EVAL_SAMPLES), classes_axis=classes_axis)


def _fixture_case(name: str) -> Case:
    model = onnx.load(str(FIXTURES / "models" / f"{name}.onnx"))
    trained = json.loads((FIXTURES / "models" / "trained.json").read_text()).get(name)
    if trained is None:
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        return _random_case(name, model, shape)
    calib = [dict(np.load(p)) for p in sorted((FIXTURES / trained["calibration"]).glob("*.npz"))]
    held = np.load(FIXTURES / trained["heldout"])
    evaluation = held["x"] if held["x"].dtype == np.float32 else (held["x"] / 255).astype(np.float32)  # uint8: 255 * pixel
    if "score_threshold" in trained:  # a detector: judged per anchor, its labels are boxes
        return Case(name, model, calib, evaluation, classes_axis=1, score_threshold=trained["score_threshold"])
    return Case(name, model, calib, evaluation, held["labels"])


CASES: dict[str, Callable[[], Case]] = {
    "digits_cnn": lambda: _fixture_case("digits_cnn"),
    "cnn_bn_residual": lambda: _fixture_case("cnn_bn_residual"),
    "tiny_transformer": lambda: _fixture_case("tiny_transformer"),
    "transformer_block": lambda: _fixture_case("transformer_block"),
    "resnet18": lambda: _random_case("resnet18", build_resnet(18), [3, 224, 224]),
    "resnet50": lambda: _random_case("resnet50", build_resnet(50), [3, 224, 224]),
    "yolo_like": lambda: _random_case("yolo_like", build_yolo_like(), [3, 320, 320], classes_axis=1),
    "digits_detector": lambda: _fixture_case("digits_detector"),
    "digits_detector_320": lambda: _fixture_case("digits_detector_320"),
    "bert_like": lambda: _random_case("bert_like", build_bert_like(), [128, 768]),
}
VARIANTS = ("fp32", "onnxmp", "onnxmp-int8", "ort-default", "ort-minmax", "ort-entropy", "ort-percentile")


# ----------------------------------------------------------------------------- variants
def _write_batches(folder: Path, batches: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, batch in enumerate(batches):
        np.savez(folder / f"batch_{index:03d}.npz", **batch)
    return folder


def prepare_fp32(case: Case) -> onnx.ModelProto:
    from onnxmp.api import optimize_model

    return optimize_model(case.model, "fp32").model.to_proto()


def make_onnxmp(fp32: onnx.ModelProto, calib_dir: Path, forced: bool = False, cache: Path | None = None) -> tuple[onnx.ModelProto, str]:
    """The ``int8-cpu`` preset's pipeline; ``forced``: with its cost model off (INT8 whatever the
    estimate). ``cache``: a fresh folder, so that calibration is timed, not read back."""
    from onnxmp.api import optimize_model
    from onnxmp.policy import load_policy

    pipeline = str(load_policy("int8-cpu").pipeline())
    if forced:
        pipeline = pipeline.replace("cost_model=true", "cost_model=false")
    with tempfile.TemporaryDirectory(prefix="onnxmp-cache-") as fresh:
        result = optimize_model(fp32, "fp32", passes=pipeline, calibration_data=calib_dir, calibration_cache=cache or fresh)
    verdicts = [d for d in result.report["decisions"] if d.get("pass") == "qdq-insertion" and "kept" in d]
    status = "int8"
    if verdicts and not verdicts[0]["kept"]:
        status = f"kept fp32 (int8 estimated {verdicts[0]['estimated_speedup']:.2f}x)"
    elif verdicts:
        status = f"int8 (estimated {verdicts[0]['estimated_speedup']:.2f}x)"
    if not any(d.get("precision") == "int8" for d in result.report["decisions"]) and not status.startswith("kept"):
        status = "kept fp32 (nothing to quantize)"
    return result.model.to_proto(), status


class _Reader:
    def __init__(self, batches: list[dict]):
        self.items = iter(batches)

    def get_next(self):
        return next(self.items, None)


def make_ort(fp32: onnx.ModelProto, batches: Iterable[dict], variant: str, folder: Path) -> tuple[onnx.ModelProto, str]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source, target = folder / f"{variant}.in.onnx", folder / f"{variant}.onnx"
    onnx.save(fp32, str(source))
    options: dict[str, Any] = {"quant_format": QuantFormat.QDQ}
    if variant != "ort-default":
        options.update(per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        methods = {"ort-entropy": CalibrationMethod.Entropy, "ort-percentile": CalibrationMethod.Percentile}
        options["calibrate_method"] = methods.get(variant, CalibrationMethod.MinMax)
    quantize_static(str(source), str(target), _Reader(batches), **options)
    return onnx.load(str(target)), "int8"


# ----------------------------------------------------------------------------- measuring
def paired_latency(fp32: onnx.ModelProto, model: onnx.ModelProto, warmup: int, repeats: int,
                   min_seconds: float = 1.0) -> tuple[float, float]:  # fmt: skip
    """Median latency of FP32 and the variant, their runs alternating on the same inputs (so that
    frequency scaling and neighbours on a shared machine hit both alike); fast models get more
    runs, so that at least ``min_seconds`` are timed per model."""
    from onnxmp.runtime import make_inputs, make_session

    sessions = [make_session(fp32, "cpu"), make_session(model, "cpu")]
    feeds = make_inputs(sessions[0], batch=1)
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    start = time.perf_counter()
    sessions[0].run(None, feeds)
    first = time.perf_counter() - start
    repeats = max(repeats, min(int(min_seconds / max(first, 1e-6)), 5000))
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for session, bucket in zip(sessions, times):
            start = time.perf_counter()
            session.run(None, feeds)
            bucket.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times[0])), float(np.median(times[1]))


def outputs(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: inputs[i : i + EVAL_BATCH]})[0] for i in range(0, len(inputs), EVAL_BATCH)]
    return np.concatenate(parts)


def fused_ops(model: onnx.ModelProto) -> collections.Counter:
    """Op counts of the graph onnxruntime runs (CPU provider, all optimizations)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return collections.Counter(n.op_type for n in optimized.graph.node)


def agreement(case: Case, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | None]:
    ref64, cand64 = reference.astype(np.float64), candidate.astype(np.float64)
    rel_l2 = float(np.linalg.norm(cand64 - ref64) / max(np.linalg.norm(ref64), 1e-30))
    top1, extra = None, {}
    if reference.ndim >= 2:
        if case.classes_axis == 1 and reference.ndim == 3:  # detector: 4 box channels, then classes
            same = reference[:, 4:, :].argmax(1) == candidate[:, 4:, :].argmax(1)
            top1 = float(np.mean(same))
            ranked = np.sort(reference[:, 4:, :], axis=1)
            decided = ranked[:, -1, :] - ranked[:, -2, :] >= DECIDED_MARGIN
            extra = {"top1_decided": float(np.mean(same[decided])), "decided_share": float(np.mean(decided))}
            if case.score_threshold is not None:  # judged as detectors are: where FP32 detects an object
                detected = _sigmoid(reference[:, 4:, :].max(1)) >= case.score_threshold
                top1 = float(np.mean(same[detected]))
                extra.update(top1_all_anchors=float(np.mean(same)), detected_share=float(np.mean(detected)))
        elif reference.ndim == 2 or case.name != "transformer_block":
            top1 = float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))
    accuracy = float(np.mean(candidate.argmax(-1) == case.labels)) if case.labels is not None else None
    return {"top1": top1, "rel_l2": rel_l2, "acc": accuracy, **extra}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def run_case(case: Case, variants: list[str], warmup: int, repeats: int, dump_fused: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxmp-int8-") as tmp:
        folder = Path(tmp)
        calib_dir = _write_batches(folder / "calib", case.calib)
        fp32 = prepare_fp32(case)
        reference = outputs(fp32, case.evaluation)
        for variant in variants:
            row: dict[str, Any] = {"model": case.name, "variant": variant}
            start = time.perf_counter()
            try:
                if variant == "fp32":
                    model, status = fp32, "fp32"
                elif variant in ("onnxmp", "onnxmp-int8"):
                    model, status = make_onnxmp(fp32, calib_dir, forced=variant == "onnxmp-int8")
                else:
                    model, status = make_ort(fp32, case.calib, variant, folder)
                row["convert_s"] = round(time.perf_counter() - start, 2)
                fp32_ms, ms = paired_latency(fp32, model, warmup, repeats)
                ops = fused_ops(model)
                row.update(status=status, ms=round(ms, 3), fp32_ms=round(fp32_ms, 3), speedup=round(fp32_ms / ms, 3),
                           qlinear=sum(c for op, c in ops.items() if op.startswith(INTEGER_KERNELS)),
                           **agreement(case, reference, outputs(model, case.evaluation)))  # fmt: skip
                if dump_fused:
                    row["fused_ops"] = dict(sorted(ops.items()))
            except Exception as exc:  # a failing peer becomes its row's status
                row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- calibration cost
CALIBRATION_TOOLS = ("onnxmp", "ort-entropy", "ort-percentile", "ort-minmax")


def calibrate_once(name: str, tool: str, count: int) -> dict[str, Any]:
    """In this process: quantize model ``name`` with ``tool`` on ``count`` calibration batches
    (the case's batches, cycled) and return the seconds it took and the process's peak RSS
    (``VmHWM``: unlike ``ru_maxrss``, it starts afresh at exec, not at the parent's peak)."""
    case = CASES[name]()
    fp32 = prepare_fp32(case)
    with tempfile.TemporaryDirectory(prefix="onnxmp-calib-") as tmp:
        folder = Path(tmp)
        batches = [case.calib[i % len(case.calib)] for i in range(count)]
        calib_dir = _write_batches(folder / "calib", batches)
        before_mb = _status_mb("VmRSS")
        start = time.perf_counter()
        if tool == "onnxmp":
            make_onnxmp(fp32, calib_dir, forced=True, cache=folder / "cache")
        else:
            make_ort(fp32, (dict(np.load(p)) for p in sorted(calib_dir.glob("*.npz"))), tool, folder)
        seconds = time.perf_counter() - start
    peak_mb = _status_mb("VmHWM")
    return {"model": name, "tool": tool, "batches": count, "seconds": round(seconds, 4), "peak_mb": round(peak_mb, 1),
            "before_mb": round(before_mb, 1)}  # fmt: skip


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (kB) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def calibration_table(name: str, counts: list[int], repeats: int) -> list[dict]:
    """:func:`calibrate_once` ``repeats`` times for every tool and batch count, each in a fresh
    process (its peak is its own), the tools taking turns in every round so that a slow spell of
    the machine hits them alike; per tool and count the median time and the highest peak, then
    Entropy's median time over onnxmp's."""
    import subprocess

    runs: dict[tuple[str, int], list[dict]] = {(tool, count): [] for count in counts for tool in CALIBRATION_TOOLS}
    for _ in range(repeats):
        for key in runs:
            tool, count = key
            command = [sys.executable, __file__, "--calibrate-once", f"{name},{tool},{count}"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            try:
                runs[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                runs[key].append({"status": f"failed: {done.stderr.strip()[-200:]}"})
    rows = []
    for (tool, count), done_runs in runs.items():
        seconds = [r["seconds"] for r in done_runs if "seconds" in r]
        row: dict[str, Any] = {"model": name, "tool": tool, "batches": count, "runs": seconds}
        if seconds:
            row.update(seconds=round(statistics.median(seconds), 4), peak_mb=max(r["peak_mb"] for r in done_runs if "peak_mb" in r),
                       before_mb=max(r["before_mb"] for r in done_runs if "before_mb" in r))  # fmt: skip
        failures = [r["status"] for r in done_runs if "status" in r]
        if failures:
            row["status"] = failures[0]
        rows.append(row)
        print(f"{name:<18} {tool:<15} {count:>5} batches {_fmt(row.get('seconds'), '8.3f')} s (median of {len(seconds)}) "
              f"{_fmt(row.get('peak_mb'), '9.1f')} MB peak ({_fmt(row.get('before_mb'), '7.1f')} MB before)  "
              f"{row.get('status', '')}", flush=True)  # fmt: skip
    medians = {(r["tool"], r["batches"]): r.get("seconds") for r in rows}
    for count in counts:
        ours, entropy = medians[("onnxmp", count)], medians[("ort-entropy", count)]
        if ours and entropy:
            print(f"{count:>5} batches: Entropy / onnxmp = {entropy / ours:.2f}x")
    return rows


# ----------------------------------------------------------------------------- table
HEADER = f"{'model':<18} {'variant':<12} {'ms':>9} {'speedup':>8} {'top1':>7} {'acc':>7} {'rel_l2':>8} {'qlinear':>7}  status"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _format_row(row: dict) -> str:
    return (f"{row['model']:<18} {row['variant']:<12} {_fmt(row.get('ms'), '9.2f')} {_fmt(row.get('speedup'), '7.2f')}x "
            f"{_fmt(row.get('top1'), '7.4f')} {_fmt(row.get('acc'), '7.4f')} {_fmt(row.get('rel_l2'), '8.4f')} "
            f"{_fmt(row.get('qlinear'), '7d')}  {row.get('status', '')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dump-fused", action="store_true", help="record the op counts after onnxruntime's fusion")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--calibration-model", default="cnn_bn_residual", help="model of the calibration time/memory table ('' to skip)")
    parser.add_argument("--calibration-batches", default="10,200", help="batch counts of that table (4 samples each)")
    parser.add_argument("--calibration-repeats", type=int, default=5, help="fresh-process runs per tool and count (median)")
    parser.add_argument("--calibrate-once", metavar="MODEL,TOOL,BATCHES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    if args.calibrate_once:
        name, tool, count = args.calibrate_once.split(",")
        print(json.dumps(calibrate_once(name, tool, int(count))))
        return 0
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, batch 1, median of {args.repeats}")
    print(HEADER, flush=True)
    rows = []
    for name in args.models.split(","):
        rows += run_case(CASES[name](), args.variants.split(","), args.warmup, args.repeats, args.dump_fused)
    print("\n" + HEADER)
    for row in rows:
        print(_format_row(row))
    calibration = []
    if args.calibration_model:
        print(f"\ncalibration time and peak memory ({args.calibration_model}, 4 samples per batch):")
        counts = [int(c) for c in args.calibration_batches.split(",")]
        calibration = calibration_table(args.calibration_model, counts, args.calibration_repeats)
    if args.json:
        document = {"onnxruntime": ort.__version__, "cpus": os.cpu_count(), "rows": rows, "calibration": calibration}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
