#!/usr/bin/env python3
"""Scaling benchmark: time and peak memory of onnxmp's ``fp32`` preset against peers and the floor.

Usage::

    python benchmarks/scale.py                           # 1k, 10k and 100k nodes
    python benchmarks/scale.py --sizes 1000,10000 --out /tmp/scale --json scale.json
    python benchmarks/scale.py --tools floor,onnxmp --repeat 1

For each size a deterministic synthetic transformer-like model is generated (see
:func:`build_model`), then every tool runs on it in a fresh Python process, so that the peak
memory reported is that process's own ``ru_maxrss``:

- ``floor``     onnx.load + onnx.save: the least any tool that reads and writes the file pays;
- ``gs``        onnx-graphsurgeon round trip: import_onnx, cleanup, toposort, export_onnx, save;
- ``onnxmp``    ``onnxmp.optimize(src, dst, "fp32")`` (the default policy, via the Python API);
- ``onnxslim``  ``onnxslim.slim(src, dst)`` (skipped with a message when not installed).

Time is wall-clock time of the work itself, imports (and onnxmp's one-off loading of its pass
registry and policy schema) excluded; peak is the whole process's
resident-set high-water mark (imports included). The table shows the ratios of onnxmp to each
other tool, then the exponent ``k`` of ``time ~ nodes**k`` fitted by least squares in log-log
space over the sizes (1.0 is linear; a pass that is quadratic in node count pushes it towards 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 1
IR_VERSION = 10
OPSET = 17

# Hidden size 93 with 3 heads puts ~105k float32 weights in each 63-node layer, so the
# 100k-node model carries ~670 MB of weights and every size has ~6.7 KB of weights per node.
HIDDEN = 93
HEADS = 3
SEQ = 128
VOCAB = 512
NODES_PER_LAYER = 63
FIXED_NODES = 16  # embeddings, mask computation, final LayerNorm, output Identity

TOOLS = ("floor", "gs", "onnxmp", "onnxslim")
TARGET_RATIO = 1.5  # the target: fp32 within 1.5x of the graphsurgeon round trip


# =============================================================================== generator
class _Builder:
    """Collects nodes and initializers of one graph with unique, deterministic names."""

    def __init__(self, seed: int):
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.02):
        from onnx import numpy_helper

        values = (self.rng.standard_normal(shape, dtype=self.np.float32) * self.np.float32(scale)).astype(
            self.np.float32
        )
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def const(self, name: str, values, dtype=None):
        from onnx import numpy_helper

        array = self.np.asarray(values, dtype=dtype or self.np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, name: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        from onnx import helper

        outputs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def layernorm(self, p: str, x: str) -> str:
        """Decomposed LayerNorm as exporters write it: 9 nodes."""
        h = HIDDEN
        mean = self.node("ReduceMean", p + "mean", [x], axes=[-1], keepdims=1)
        centered = self.node("Sub", p + "sub", [x, mean])
        squared = self.node("Pow", p + "pow", [centered, self.const(p + "two", 2.0)])
        var = self.node("ReduceMean", p + "var", [squared], axes=[-1], keepdims=1)
        var_eps = self.node("Add", p + "add_eps", [var, self.const(p + "eps", 1e-5)])
        std = self.node("Sqrt", p + "sqrt", [var_eps])
        normed = self.node("Div", p + "div", [centered, std])
        gamma = self.const(p + "gamma", self.np.ones(h) + self.rng.standard_normal(h) * 0.01)
        beta = self.const(p + "beta", self.rng.standard_normal(h) * 0.01)
        scaled = self.node("Mul", p + "mul_gamma", [normed, gamma])
        return self.node("Add", p + "add_beta", [scaled, beta])

    def linear(self, p: str, x: str, n_in: int, n_out: int, transposed_weight: bool = False) -> str:
        """MatMul + Add; with ``transposed_weight`` the weight is stored [out, in] behind a Transpose."""
        if transposed_weight:
            stored = self.weight(p + "weight_t", (n_out, n_in))
            weight = self.node("Transpose", p + "weight_transpose", [stored], perm=[1, 0])
        else:
            weight = self.weight(p + "weight", (n_in, n_out))
        product = self.node("MatMul", p + "matmul", [x, weight])
        bias = self.weight(p + "bias", (n_out,))
        return self.node("Add", p + "bias_add", [product, bias])

    def encoder_layer(self, i: int, x: str, mask: str) -> str:
        """One post-embedding encoder layer (pre-LayerNorm): 63 nodes."""
        from onnx import numpy_helper

        h, nh = HIDDEN, HEADS
        hd = h // nh
        p = f"layer{i}/"
        ln1 = self.layernorm(p + "ln1/", x)
        # the batch size is dynamic: exporters compute the reshape targets from Shape
        shape = self.node("Shape", p + "shape", [x])
        batch = self.node("Gather", p + "batch", [shape, self.const(p + "zero", 0, self.np.int64)], axis=0)
        batch1 = self.node("Unsqueeze", p + "batch_1d", [batch, self.const(p + "axis0", [0], self.np.int64)])
        heads_shape = self.node(
            "Concat", p + "heads_shape", [batch1, self.const(p + "heads_dims", [SEQ, nh, hd], self.np.int64)], axis=0
        )
        heads = {}
        for which, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            projected = self.linear(p + which + "/", ln1, h, h)
            split = self.node("Reshape", p + which + "/split_heads", [projected, heads_shape])
            heads[which] = self.node("Transpose", p + which + "/transpose", [split], perm=perm)
        # constant subgraph: sqrt(head_dim) computed at run time from a Constant node
        head_dim_value = numpy_helper.from_array(self.np.array(float(hd), dtype=self.np.float32), p + "head_dim_value")
        head_dim = self.node("Constant", p + "head_dim", [], value=head_dim_value)
        scale = self.node("Sqrt", p + "scale", [head_dim])
        scores = self.node("MatMul", p + "scores", [heads["q"], heads["k"]])
        scores = self.node("Div", p + "scaled", [scores, scale])
        scores = self.node("Add", p + "masked", [scores, mask])
        probs = self.node("Softmax", p + "softmax", [scores], axis=-1)
        probs = self.node("Cast", p + "probs_cast", [probs], to=1)  # float -> float: a no-op cast
        context = self.node("MatMul", p + "context", [probs, heads["v"]])
        context = self.node("Transpose", p + "merge_transpose", [context], perm=[0, 2, 1, 3])
        merged_shape = self.node(
            "Concat", p + "merged_shape", [batch1, self.const(p + "merged_dims", [SEQ, h], self.np.int64)], axis=0
        )
        context = self.node("Reshape", p + "merge_heads", [context, merged_shape])
        attn = self.linear(p + "o/", context, h, h, transposed_weight=True)
        attn = self.node("Identity", p + "attn_dropout", [attn])
        x = self.node("Add", p + "residual1", [x, attn])
        ln2 = self.layernorm(p + "ln2/", x)
        # the feed-forward block runs on 2-D tokens [batch*seq, hidden], as many exporters write it
        flat = self.node("Reshape", p + "flatten", [ln2, self.const(p + "flat_dims", [-1, h], self.np.int64)])
        up = self.linear(p + "ffn_up/", flat, h, 4 * h)
        # erf GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
        scaled_up = self.node("Div", p + "gelu/div", [up, self.const(p + "gelu/sqrt2", math.sqrt(2.0))])
        erf = self.node("Erf", p + "gelu/erf", [scaled_up])
        erf1 = self.node("Add", p + "gelu/add", [erf, self.const(p + "gelu/one", 1.0)])
        gated = self.node("Mul", p + "gelu/mul", [up, erf1])
        gelu = self.node("Mul", p + "gelu/half", [gated, self.const(p + "gelu/half_value", 0.5)])
        down = self.linear(p + "ffn_down/", gelu, 4 * h, h)
        down = self.node("Reshape", p + "unflatten", [down, merged_shape])
        down = self.node("Identity", p + "ffn_dropout", [down])
        return self.node("Add", p + "residual2", [x, down])


def layers_for(nodes: int) -> int:
    """Encoder layers that bring a model closest to ``nodes`` nodes."""
    return max(1, round((nodes - FIXED_NODES) / NODES_PER_LAYER))


def build_model(nodes: int, seed: int = 0):
    """A deterministic transformer-like encoder of about ``nodes`` nodes (IR 10, opset 17).

    Inputs ``input_ids`` int64[batch, 128] and ``attention_mask`` int64[batch, 128] (batch is
    dynamic); output ``hidden`` float32[batch, 128, 93]. Each layer has MatMul+Add projections,
    Reshape/Transpose into heads with shapes computed from ``Shape`` (dynamic batch), scaled
    dot-product attention with Softmax, two decomposed LayerNorms (ReduceMean/Sub/Pow/Sqrt/Div),
    an erf GELU feed-forward block on 2-D tokens, residual Adds, two Identity (dropout) nodes, a
    no-op Cast, and two constant subgraphs (Sqrt of a Constant, Transpose of a weight).
    """
    from onnx import TensorProto, helper

    b = _Builder(seed)
    h = HIDDEN
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])
    mask_in = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", SEQ])
    # embeddings and the additive attention mask, shared by every layer
    tokens = b.node("Gather", "embed/tokens", [b.weight("embed/token_table", (VOCAB, h)), "input_ids"], axis=0)
    x = b.node("Add", "embed/positions", [tokens, b.weight("embed/position_table", (SEQ, h))])
    mask = b.node("Unsqueeze", "mask/unsqueeze", ["attention_mask", b.const("mask/axes", [1, 2], b.np.int64)])
    mask = b.node("Cast", "mask/cast", [mask], to=TensorProto.FLOAT)
    mask = b.node("Sub", "mask/invert", [b.const("mask/one", 1.0), mask])
    mask = b.node("Mul", "mask/bias", [mask, b.const("mask/min", -10000.0)])
    for i in range(layers_for(nodes)):
        x = b.encoder_layer(i, x, mask)
    x = b.layernorm("final_ln/", x)
    b.nodes.append(helper.make_node("Identity", [x], ["hidden"], name="output"))
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", SEQ, h])
    graph = helper.make_graph(b.nodes, "synthetic_transformer", [ids, mask_in], [out], initializer=b.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxmp-benchmarks-scale",
        producer_version=str(GENERATOR_VERSION),
    )
    model.ir_version = IR_VERSION
    return model


def model_path(folder: Path, nodes: int, seed: int = 0) -> Path:
    return folder / f"transformer_{nodes}n_h{HIDDEN}_s{seed}_v{GENERATOR_VERSION}.onnx"


def ensure_model(folder: Path, nodes: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Generate (or reuse) the model for ``nodes``; returns its path and facts about it."""
    import onnx

    path = model_path(folder, nodes, seed)
    facts_path = path.with_suffix(".json")
    if path.exists() and facts_path.exists():
        return path, json.loads(facts_path.read_text())
    start = time.perf_counter()
    model = build_model(nodes, seed)
    facts = {
        "nodes": len(model.graph.node),
        "layers": layers_for(nodes),
        "initializers": len(model.graph.initializer),
        "weights_mb": sum(len(t.raw_data) for t in model.graph.initializer) / 1e6,
    }
    onnx.save(model, str(path))
    facts["file_mb"] = path.stat().st_size / 1e6
    facts["generate_s"] = time.perf_counter() - start
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    return path, facts


# =============================================================================== workers
def _work_floor(src: str, dst: str) -> dict:
    import onnx

    start = time.perf_counter()
    onnx.save(onnx.load(src), dst)
    return {"seconds": time.perf_counter() - start}


def _work_gs(src: str, dst: str) -> dict:
    import onnx
    import onnx_graphsurgeon as gs

    start = time.perf_counter()
    graph = gs.import_onnx(onnx.load(src))
    graph.cleanup().toposort()
    onnx.save(gs.export_onnx(graph), dst)
    return {"seconds": time.perf_counter() - start}


def _work_onnxmp(src: str, dst: str) -> dict:
    import onnxmp

    onnxmp.load_policy("fp32")  # imports the passes and builds the policy schema: ~0.2 s once per process
    start = time.perf_counter()
    result = onnxmp.optimize(src, dst, "fp32")
    seconds = time.perf_counter() - start
    passes = [(p["name"], round(p["seconds"], 3)) for p in result.report["passes"]]
    return {
        "seconds": seconds,
        "passes": passes,
        "load_save_s": seconds - sum(s for _, s in passes),
        "nodes_after": result.report["nodes"]["after"],
    }


def _work_onnxslim(src: str, dst: str) -> dict:
    try:
        import onnxslim
    except ImportError:
        return {"skipped": "onnxslim is not installed (pip install onnxslim, or pip install -e .[bench])"}
    import contextlib

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # slim prints a summary table
        onnxslim.slim(src, dst)
    return {"seconds": time.perf_counter() - start}


WORKERS = {"floor": _work_floor, "gs": _work_gs, "onnxmp": _work_onnxmp, "onnxslim": _work_onnxslim}


def _worker_main(tool: str, src: str, dst: str, result_path: str) -> None:
    import resource

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = WORKERS[tool](src, dst)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result["peak_mb"] = peak / 1024
    result["start_mb"] = baseline / 1024
    Path(result_path).write_text(json.dumps(result))


def measure(tool: str, src: Path, dst: Path, timeout: float) -> dict:
    """Run one tool on one model in a fresh interpreter; its time and peak resident memory."""
    with tempfile.TemporaryDirectory(prefix="onnxmp-scale-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(src), str(dst), str(result_path)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        result = json.loads(result_path.read_text())
        result["process_s"] = wall
        if dst.exists():
            result["output_mb"] = dst.stat().st_size / 1e6
        return result


def measure_best(tool: str, src: Path, dst: Path, repeat: int, timeout: float) -> dict:
    """Fastest time and smallest peak over ``repeat`` fresh-process runs."""
    runs = []
    for _ in range(repeat):
        result = measure(tool, src, dst, timeout)
        if "seconds" not in result:
            return result
        runs.append(result)
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["peak_mb"] = min(r["peak_mb"] for r in runs)
    best["runs"] = len(runs)
    return best


# =============================================================================== report
def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log(y) against log(x) by least squares; None with fewer than two points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def render(rows: list[dict], tools: list[str]) -> str:
    lines = []
    head = f"{'nodes':>7} {'weights':>8}"
    for tool in tools:
        head += f" | {tool + ' s':>11} {'peak MB':>8}"
    lines.append(head)
    lines.append("-" * len(head))
    for row in rows:
        line = f"{row['nodes']:>7} {row['weights_mb']:>6.1f}MB"
        for tool in tools:
            r = row["tools"].get(tool, {})
            line += f" | {_fmt(r.get('seconds'), 2):>11} {_fmt(r.get('peak_mb'), 0):>8}"
        lines.append(line)
    peers = [t for t in tools if t != "onnxmp"]
    if "onnxmp" in tools and peers:
        lines.append("")
        head = f"{'nodes':>7}"
        for peer in peers:
            head += f" | {'onnxmp/' + peer + ' time':>22} {'mem':>6}"
        lines.append(head)
        lines.append("-" * len(head))
        for row in rows:
            line = f"{row['nodes']:>7}"
            for peer in peers:
                t, m = row["ratios"].get(peer, (None, None))
                line += f" | {_fmt(t, 2) + 'x' if t else '-':>22} {_fmt(m, 2) + 'x' if m else '-':>6}"
            lines.append(line)
    for row in rows:
        for tool in tools:
            r = row["tools"].get(tool, {})
            if "error" in r or "skipped" in r:
                lines.append(f"note: {tool} at {row['nodes']} nodes: {r.get('error') or r.get('skipped')}")
    return "\n".join(lines)


def summarize(rows: list[dict], tools: list[str]) -> dict:
    """Ratios per row, fitted exponents per tool, and the issue's target check."""
    for row in rows:
        mine = row["tools"].get("onnxmp", {})
        row["ratios"] = {
            peer: (
                _ratio(mine.get("seconds"), row["tools"][peer].get("seconds")),
                _ratio(mine.get("peak_mb"), row["tools"][peer].get("peak_mb")),
            )
            for peer in tools
            if peer != "onnxmp" and peer in row["tools"]
        }
    exponents = {}
    for tool in tools:
        timed = [(row["nodes"], row["tools"].get(tool, {}).get("seconds")) for row in rows]
        timed = [(n, s) for n, s in timed if s]
        # against the floor: the machine's own super-linearity (allocation, page faults) cancels
        relative = [(row["nodes"], _ratio(row["tools"].get(tool, {}).get("seconds"), row["tools"].get("floor", {}).get("seconds"))) for row in rows]
        relative = [(n, r) for n, r in relative if r]
        peaks = [(row["nodes"], row["tools"].get(tool, {}).get("peak_mb")) for row in rows]
        peaks = [(n, m) for n, m in peaks if m]
        exponents[tool] = {
            "time": fit_exponent([n for n, _ in timed], [s for _, s in timed]),
            "time_last_two": fit_exponent([n for n, _ in timed[-2:]], [s for _, s in timed[-2:]]),
            "time_over_floor": fit_exponent([n for n, _ in relative], [r for _, r in relative]) if tool != "floor" else None,
            "peak": fit_exponent([n for n, _ in peaks], [m for _, m in peaks]),
        }
    return exponents


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker_main(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="node counts, comma-separated (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the generated models (default: a temporary folder); models found there are reused")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument("--tools", default=",".join(TOOLS), help="tools to run (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=None, help="fresh-process runs per measurement, best kept (default: 3 below 50k nodes, else 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for one measurement (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnxmp-scale-")
        folder = Path(tmp.name)
    else:
        folder = args.out
        folder.mkdir(parents=True, exist_ok=True)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; models in {folder}", file=sys.stderr)
    rows = []
    try:
        for size in sizes:
            src, facts = ensure_model(folder, size, args.seed)
            print(
                f"[{size}] model: {facts['nodes']} nodes, {facts['layers']} layers, {facts['weights_mb']:.1f} MB of weights",
                file=sys.stderr,
            )
            repeat = args.repeat or (3 if size < 50_000 else 1)
            row = {"size": size, **facts, "tools": {}}
            for tool in tools:
                dst = folder / f"{src.stem}.{tool}.onnx"
                result = measure_best(tool, src, dst, repeat, args.timeout)
                dst.unlink(missing_ok=True)
                row["tools"][tool] = result
                if "seconds" in result:
                    print(f"[{size}] {tool}: {result['seconds']:.2f} s, peak {result['peak_mb']:.0f} MB", file=sys.stderr)
                else:
                    print(f"[{size}] {tool}: {result.get('error') or result.get('skipped')}", file=sys.stderr)
                if tool == "onnxmp" and "passes" in result:
                    detail = ", ".join(f"{n} {s:.2f}" for n, s in result["passes"])
                    print(f"[{size}]   load+save {result['load_save_s']:.2f} s; passes: {detail}", file=sys.stderr)
            rows.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()

    exponents = summarize(rows, tools)
    print(render(rows, tools))
    print()
    for tool in tools:
        e = exponents[tool]
        if e["time"] is not None:
            line = (
                f"{tool:>8}: time ~ nodes^{e['time']:.2f} (log-log least squares over {len(rows)} sizes; "
                f"{e['time_last_two']:.2f} between the two largest)"
            )
            if e["time_over_floor"] is not None:
                line += f"; time/floor ~ nodes^{e['time_over_floor']:+.2f}"
            print(line)
    verdict = None
    if "onnxmp" in tools and "gs" in tools and rows:
        t, m = rows[-1]["ratios"].get("gs", (None, None))
        if t and m:
            verdict = t <= TARGET_RATIO and m <= TARGET_RATIO
            print(
                f"target (fp32 within {TARGET_RATIO}x of the graphsurgeon round trip at {rows[-1]['nodes']} nodes): "
                f"time {t:.2f}x, memory {m:.2f}x -> {'met' if verdict else 'NOT met'}"
            )
    if args.json:
        report = {
            "generator_version": GENERATOR_VERSION,
            "hidden": HIDDEN,
            "heads": HEADS,
            "seq": SEQ,
            "seed": args.seed,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "rows": rows,
            "exponents": exponents,
            "target_met": verdict,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
