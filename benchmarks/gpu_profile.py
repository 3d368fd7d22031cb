#!/usr/bin/env python3
"""Where the GPU time of a model goes: onnxruntime's profiler, summed per op type and per kernel.

Usage (on the device, after benchmarks/gpu_fp16.py has written its models to the same folder)::

    python3 benchmarks/gpu_profile.py /tmp/gpu_fp16/resnet50.onnxmp.onnx /tmp/gpu_fp16/vit.fp32.onnx \
        --batch 32 --sequence 128 [--sweep] [--torch-resnet50]

For each model: the CUDA provider as ``onnxmp.runtime`` builds it (NHWC for convolution-heavy
models), a few warm-up runs, then profiled runs; the table shows, per op type, the share of node
time and where the nodes ran, then the kernels that took the most GPU time. ``--torch-resnet50``
adds PyTorch's eager ResNet-50 (cuDNN autotuning, channels-last) in FP32 (TF32) and FP16 as a
yardstick for what the convolutions alone can reach on this GPU; ``--sweep`` times each model
under a few CUDA provider option sets (SWEEP) to see which of cuDNN's choices matter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxmp import runtime as rt  # noqa: E402

WARMUP = 5


def feeds_for(path: Path, batch: int, sequence: int) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        tensor = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else sequence)
                for axis, d in enumerate(tensor.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype.kind in "iu":
            feeds[info.name] = (np.ones(dims) if "mask" in info.name else rng.integers(0, 2, dims)).astype(dtype)
        else:
            feeds[info.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def profile(path: Path, batch: int, sequence: int, runs: int, provider: str) -> dict:
    import onnxruntime as ort

    built = rt.build_session(str(path), provider, cuda_graph=False)  # the profiler needs node-by-node runs
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path("/tmp") / (path.stem + ".profile"))
    session = ort.InferenceSession(str(path), so, providers=built.providers)
    options = dict(built.providers)
    feeds = feeds_for(path, batch, sequence)
    for _ in range(WARMUP):
        session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    wall_ms = (time.perf_counter() - start) * 1e3 / runs
    trace = json.loads(Path(session.end_profiling()).read_text())
    # The warm-up runs (cuDNN's algorithm search, allocations) are in the trace too: count only
    # the events from the first timed run on.
    starts = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_timed = starts[WARMUP] if len(starts) > WARMUP else 0
    per_op: dict[tuple[str, str], float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("ts", 0) < first_timed:
            continue
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[(args.get("op_name", "?"), args.get("provider", "?"))] += event["dur"]
            per_node[f"{event['name'][:-len('_kernel_time')]} ({args.get('op_name', '?')})"] += event["dur"]
        elif event.get("cat") == "Kernel":
            kernels[event["name"][:90]] += event["dur"]
    total_runs = runs
    return {
        "model": path.name, "wall_ms": wall_ms, "providers": [name for name, _ in built.providers],
        "options": {k: v for k, v in options.get("CUDAExecutionProvider", {}).items() if k in ("prefer_nhwc", "use_tf32")},
        "per_op_ms": {f"{op} [{prov}]": us / 1e3 / total_runs for (op, prov), us in sorted(per_op.items(), key=lambda kv: -kv[1])},
        "nodes_ms": {name: us / 1e3 / total_runs for name, us in sorted(per_node.items(), key=lambda kv: -kv[1])[:10]},
        "kernels_ms": {name: us / 1e3 / total_runs for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]},
    }


SWEEP = {  # CUDA provider options tried on top of prefer_nhwc=1 (cuDNN's choices for convolutions)
    "default": {},
    "nhwc off": {"prefer_nhwc": "0"},
    "fuse_conv_bias": {"fuse_conv_bias": "1"},
    "algo heuristic": {"cudnn_conv_algo_search": "HEURISTIC"},
    "cuda graph": {"enable_cuda_graph": "1"},
    "cuda graph + fuse_conv_bias": {"enable_cuda_graph": "1", "fuse_conv_bias": "1"},
}


def sweep(path: Path, batch: int, sequence: int, runs: int) -> dict[str, float]:
    """Median ms per run under each option set, inputs and outputs bound on the GPU."""
    import onnxruntime as ort

    feeds = feeds_for(path, batch, sequence)
    results = {}
    for name, extra in SWEEP.items():
        options = {"device_id": "0", "prefer_nhwc": "1", **extra}
        try:
            session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
            binding = session.io_binding()
            for key, value in feeds.items():
                binding.bind_ortvalue_input(key, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda")
            session.run_with_iobinding(binding)  # outputs allocated; CUDA graph captured
            for _ in range(10):
                session.run_with_iobinding(binding)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()
                times.append((time.perf_counter() - start) * 1e3)
            results[name] = float(np.median(times))
        except Exception as exc:  # noqa: BLE001 - report the option set that failed, go on
            results[name] = f"failed: {str(exc).splitlines()[0][:120]}"
    return results


def torch_resnet50(batch: int) -> dict:
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = torchvision.models.resnet50(weights=None).eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    out = {}
    for name, dtype in (("fp32_tf32", torch.float32), ("fp16", torch.float16)):
        m, inp = model.to(dtype), x.to(dtype)
        with torch.inference_mode():
            for _ in range(10):
                m(inp)
            torch.cuda.synchronize()
            times = []
            for _ in range(30):
                start = time.perf_counter()
                m(inp)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
        out[name] = float(np.median(times))
    out["fp16_speedup"] = out["fp32_tf32"] / out["fp16"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--torch-resnet50", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time each model under the CUDA option sets of SWEEP")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for path in args.models:
        result = profile(path, args.batch, args.sequence, args.runs, args.provider)
        results.append(result)
        print(f"\n== {result['model']}: {result['wall_ms']:.3f} ms/run (profiled), {result['options']}")
        total = sum(result["per_op_ms"].values())
        for name, ms in list(result["per_op_ms"].items())[:15]:
            print(f"  {name:55s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
        print("  top nodes:")
        for name, ms in result["nodes_ms"].items():
            print(f"    {ms:8.3f} ms  {name}")
        print("  top kernels:")
        for name, ms in result["kernels_ms"].items():
            print(f"    {ms:8.3f} ms  {name}")
        if args.sweep:
            result["sweep_ms"] = sweep(path, args.batch, args.sequence, args.runs)
            print("  CUDA option sweep (median ms):", result["sweep_ms"])
    if args.torch_resnet50:
        ref = torch_resnet50(args.batch)
        results.append({"torch_resnet50": ref})
        print(f"\n== torch eager resnet50 b{args.batch} channels_last: {ref}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
