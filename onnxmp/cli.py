"""The ``onnxmp`` command: parse, call the API, print. Errors become one line and exit code 1."""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from onnxmp.api import op_histogram, optimize
from onnxmp.dump import dump_model
from onnxmp.errors import OnnxmpError
from onnxmp.ir import Model, dtype_name, elem_type, iter_graphs, weight_bytes
from onnxmp.pass_manager import TARGETS, registered_passes
from onnxmp.policy import DEFAULT_PRESET, load_policy, preset_names, preset_text

console = Console(stderr=True)
out = Console()


def _friendly_errors(command):
    """Turn onnxmp's own errors into one actionable line and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OnnxmpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
@click.version_option(package_name="onnxmp")
def main() -> None:
    """Turn an FP32 ONNX model into a faster mixed-precision one inside an accuracy budget."""


@main.command("optimize")
@click.argument("input_model", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_model", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--policy", "-p", default=None, help=f"Preset name or policy JSON file (default: {DEFAULT_PRESET}).")
@click.option("--target", type=click.Choice(TARGETS), default=None, help="Override the policy's target.")
@click.option("--passes", default=None, help='Textual pipeline instead of the policy\'s, e.g. "cleanup,fold-constants".')
@click.option("--calibration-data", type=click.Path(path_type=Path), default=None, help="Folder of .npz/.npy batches or one .npz for range statistics (overrides the policy's).")
@click.option("--calibration-cache", type=click.Path(path_type=Path), default=None, help="Statistics cache folder (default: $ONNXMP_CACHE_DIR or ~/.cache/onnxmp/calibration).")
@click.option("--validation-data", type=click.Path(path_type=Path), default=None, help="Data to validate the result on before writing it (overrides the policy's).")
@click.option("--verify-each", is_flag=True, help="Check the model (onnx.checker full, onnxruntime load) after every pass.")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Write the text form after PASS (repeatable).")
@click.option("--dump-dir", type=click.Path(path_type=Path), default=None, help="Folder for --dump-after (default: OUT.dump/).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Report JSON path (default: OUT with .report.json).")
@click.option("--fix-dim", "fix_dims", multiple=True, metavar="NAME=VALUE", help="Fix a symbolic input dimension, e.g. batch=32 (repeatable): specialize-shapes runs with it.")
@click.option("--fix-shape", "fix_shapes", multiple=True, metavar="INPUT=D0xD1x...", help="Fix an input's whole shape, e.g. input_ids=32x128 (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@_friendly_errors
def optimize_command(input_model, output_model, policy, target, passes, calibration_data, calibration_cache, validation_data, verify_each, dump_after, dump_dir, report_path, fix_dims, fix_shapes, quiet):
    """Optimize IN into OUT as the policy says."""
    if fix_dims or fix_shapes:
        policy, passes = _with_fixed_shapes(policy, passes, fix_dims, fix_shapes)
    report_path = report_path or output_model.with_suffix(".report.json")
    if dump_after and dump_dir is None:
        dump_dir = output_model.with_name(output_model.name + ".dump")
    result = optimize(
        input_model,
        output_model,
        policy,
        target=target,
        passes=passes,
        calibration_data=calibration_data,
        calibration_cache=calibration_cache,
        validation_data=validation_data,
        verify_each=verify_each,
        progress=not quiet,
        dump_after=dump_after,
        dump_dir=dump_dir,
        report_path=report_path,
    )
    if not quiet:
        _print_pass_table(result.report)
        if "fallback" in result.report:
            kept = result.report["fallback"]["kept_float"]
            console.print(f"accuracy fallback: kept {len(kept)} quantized node(s) float: {', '.join(kept)}")
        if "validation" in result.report:
            _print_validation(result.report["validation"])
        console.print(f"wrote {output_model} and {report_path}")


def _with_fixed_shapes(policy, passes, fix_dims, fix_shapes):
    """The policy (or textual pipeline) with specialize-shapes configured by --fix-dim/--fix-shape."""
    from onnxmp.passes.specialize_shapes import parse_dims, parse_shapes, specialized_pipeline, specialized_policy

    dims, shapes = parse_dims(list(fix_dims), "--fix-dim"), parse_shapes(list(fix_shapes), "--fix-shape")
    if passes:
        return policy, specialized_pipeline(passes, dims, shapes)
    return specialized_policy(load_policy(policy), dims, shapes), None


def _print_validation(validation: dict) -> None:
    table = Table(title=f"validation on {validation.get('batches')} batches")
    for column in ("output", "max abs", "rel L2", "cosine", "top-1"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for name, metrics in validation["outputs"].items():
        top1 = metrics.get("top1_agreement")
        table.add_row(
            name,
            f"{metrics['max_abs_error']:.3g}",
            f"{metrics['rel_l2_error']:.3g}",
            f"{metrics['cosine_similarity']:.6f}",
            "-" if top1 is None else f"{top1:.4f}",
        )
    console.print(table)
    for note in validation.get("notes", []):
        console.print(f"note: {note}")


def _print_pass_table(report: dict) -> None:
    table = Table(title=f"{report['pipeline']}  (target {report['policy']['target']})")
    for column in ("pass", "changed", "nodes", "seconds", "verified"):
        table.add_column(column, justify="left" if column == "pass" else "right")
    for row in report["passes"]:
        nodes = f"{row['nodes_before']} -> {row['nodes_after']}"
        verified = "yes" if row["verified"] else "-"
        table.add_row(row["name"], "yes" if row["changed"] else "no", nodes, f"{row['seconds']:.3f}", verified)
    console.print(table)


@main.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--dump", is_flag=True, help="Print the canonical text form of the graph instead.")
@_friendly_errors
def inspect_command(model_path, dump):
    """Summarize MODEL: I/O, sizes, op and dtype histograms."""
    model = Model.load(model_path)
    if dump:
        click.echo(dump_model(model), nl=False)
        return
    summary = Table(title=str(model_path), show_header=False)
    summary.add_row("IR version", str(model.ir_version))
    summary.add_row("opsets", ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(model.opset_imports.items())))
    summary.add_row("producer", f"{model.producer_name} {model.producer_version}".strip() or "-")
    summary.add_row("nodes", str(model.node_count()))
    summary.add_row("weights", f"{weight_bytes(model.graph) / 1e6:.2f} MB")
    summary.add_row("external data", "yes" if model.external_data else "no")
    for tensor in model.graph.inputs:
        summary.add_row("input", _describe(tensor))
    for tensor in model.graph.outputs:
        summary.add_row("output", _describe(tensor))
    for key, value in model.metadata.items():
        summary.add_row(f"meta {key}", value)
    out.print(summary)
    out.print(_histogram_table("op", op_histogram(model)))
    out.print(_histogram_table("dtype (node outputs and initializers)", _dtype_histogram(model)))


def _describe(tensor) -> str:
    shape = "?" if tensor.shape is None else "[" + ",".join(str(d) for d in tensor.shape) + "]"
    return f"{tensor.name}: {dtype_name(elem_type(tensor))}{shape}"


def _dtype_histogram(model: Model) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for graph in iter_graphs(model.graph):
        for tensor in graph.tensors().values():
            if tensor.name:
                counts[dtype_name(elem_type(tensor))] += 1
    return dict(sorted(counts.items()))


def _histogram_table(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title)
    table.add_column("name")
    table.add_column("count", justify="right")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(name, str(count))
    return table


@main.command("passes")
@_friendly_errors
def passes_command():
    """List the registered passes and their options."""
    table = Table()
    for column in ("pass", "fp32-exact", "description", "options"):
        table.add_column(column)
    for name, cls in registered_passes().items():
        table.add_row(name, "yes" if cls.preserves_fp32 else "no", cls.description(), _options_text(cls.Options))
    out.print(table)


def _options_text(options_cls) -> str:
    hints = typing.get_type_hints(options_cls)
    lines = []
    for item in dataclasses.fields(options_cls):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        hint = getattr(hints[item.name], "__name__", str(hints[item.name]))
        lines.append(f"{item.name}: {hint} = {default!r}")
    return "\n".join(lines) or "-"


@main.group("policies", invoke_without_command=True)
@click.pass_context
@_friendly_errors
def policies_command(ctx):
    """List the built-in policy presets (`onnxmp policies show NAME` prints one)."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table()
    table.add_column("preset")
    table.add_column("target")
    table.add_column("description")
    for name in preset_names():
        policy = load_policy(name)
        label = f"{name} (default)" if name == DEFAULT_PRESET else name
        table.add_row(label, policy.target, policy.description)
    out.print(table)


@policies_command.command("show")
@click.argument("name")
@_friendly_errors
def policies_show_command(name):
    """Print preset NAME as JSON, a starting point for a custom policy."""
    click.echo(preset_text(name), nl=False)


@main.command("bench")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True, help="onnxruntime execution provider.")
@click.option("--batch", type=int, default=1, show_default=True, help="Value of the first (batch) dimension when it is symbolic.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs first.")
@click.option("--repeats", type=int, default=50, show_default=True, help="Timed runs.")
@click.option("--dim", "dim_values", multiple=True, metavar="NAME=VALUE", help="Value of a symbolic dimension, e.g. sequence=128 (repeatable; others are 1).")
@click.option("--nhwc/--no-nhwc", default=None, help="CUDA prefer_nhwc (default: on for convolution-heavy models).")
@click.option("--cuda-graph", is_flag=True, help="Capture and replay a CUDA graph (cuda, tensorrt).")
@click.option("--io-binding/--no-io-binding", default=None, help="Inputs and outputs on the device (default: on for cuda and tensorrt).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: onnxruntime's).")
@click.option("--trt-fp16", is_flag=True, help="TensorRT: allow FP16 kernels.")
@click.option("--trt-int8", is_flag=True, help="TensorRT: allow INT8 kernels (QDQ model, or --trt-calibration-table).")
@click.option("--trt-calibration-table", type=click.Path(path_type=Path), default=None, help="TensorRT INT8 calibration table.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the full result (every run's time) as JSON.")
@_friendly_errors
def bench_command(model_path, provider, batch, warmup, repeats, dim_values, nhwc, cuda_graph, io_binding, threads, trt_fp16, trt_int8, trt_calibration_table, json_path):
    """Time MODEL on random inputs with onnxruntime: median, p90, mean, min and throughput."""
    import json

    from onnxmp.ir import write_text_atomic
    from onnxmp.runtime import benchmark

    dims = {}
    for item in dim_values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise OnnxmpError(f"--dim expects NAME=VALUE with a positive integer VALUE, got '{item}'")
        dims[name.strip()] = int(value)
    options = {"nhwc": nhwc, "cuda_graph": cuda_graph, "threads": threads}
    if provider == "tensorrt":
        options.update(trt_fp16=trt_fp16, trt_int8=trt_int8, trt_calibration_table=trt_calibration_table)
    elif trt_fp16 or trt_int8 or trt_calibration_table is not None:
        raise OnnxmpError("--trt-fp16, --trt-int8 and --trt-calibration-table need --provider tensorrt")
    status = console.status(f"benchmarking {model_path.name} on {provider}", spinner="dots")
    with status:
        result = benchmark(model_path, provider, batch=batch, warmup=warmup, repeats=repeats, io_binding=io_binding, dims=dims, **options)
    shapes = ", ".join(f"{name}: {spec['dtype']}[{','.join(map(str, spec['shape']))}]" for name, spec in result.inputs.items())
    table = Table(title=f"{result.model} on {', '.join(result.providers)}", caption=f"batch {result.batch}; {shapes}; io binding {'on' if result.io_binding else 'off'}; {result.repeats} runs after {result.warmup} warm-up")
    for column in ("median ms", "p90 ms", "mean ms", "min ms", "items/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.median_ms:.3f}", f"{result.p90_ms:.3f}", f"{result.mean_ms:.3f}", f"{result.min_ms:.3f}", f"{result.throughput:,.1f}")
    out.print(table)
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_path}")


@main.command("build-engine")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("engine_path", metavar="ENGINE", type=click.Path(path_type=Path))
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels.")
@click.option("--int8", is_flag=True, help="Allow INT8 kernels: a Q/DQ model, or a float model with --calibration-cache.")
@click.option("--calibration-cache", type=click.Path(path_type=Path), default=None, help="TensorRT calibration cache (TRT-<version>-<algorithm> text) for a float model with --int8.")
@click.option("--workspace", default=None, metavar="SIZE", help="Builder workspace limit, e.g. 4GiB, 512MiB or bytes (default: TensorRT's).")
@click.option("--shape", "shape_values", multiple=True, metavar="INPUT=D0xD1x...", help="Shape of an input with dynamic dimensions (repeatable; every such input needs one).")
@_friendly_errors
def build_engine_command(model_path, engine_path, fp16, int8, calibration_cache, workspace, shape_values):
    """Build a TensorRT engine from MODEL (e.g. a Q/DQ model) into ENGINE; needs onnxmp[tensorrt]."""
    from onnxmp.passes.specialize_shapes import parse_shapes
    from onnxmp.tensorrt_engine import EngineOptions, build_engine

    options = EngineOptions(
        fp16=fp16,
        int8=int8,
        calibration_cache=calibration_cache,
        workspace_bytes=None if workspace is None else _size_bytes(workspace),
        shapes=parse_shapes(list(shape_values), "--shape"),
    )
    with console.status(f"building a TensorRT engine from {model_path.name}", spinner="dots"):
        result = build_engine(model_path, engine_path, options)
    shapes = ", ".join(f"{name}: [{','.join(map(str, dims))}]" for name, dims in result.inputs.items())
    console.print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB; TensorRT {result.tensorrt}; {'+'.join(result.precisions)}; {shapes})")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}


def _size_bytes(text: str) -> int:
    """'4GiB', '512M', '1000000' -> bytes (K/M/G alone are binary, as TensorRT's tools read them)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise OnnxmpError(f"--workspace expects a size such as 4GiB, 512MiB or a number of bytes, got '{text}'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@main.command("validate")
@click.argument("original_model", metavar="ORIGINAL", type=click.Path(path_type=Path))
@click.argument("candidate_model", metavar="CANDIDATE", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None, help="Validation data: a folder of .npz batches or one .npz (default: the policy's validation.data).")
@click.option("--policy", "-p", default=None, help="Preset or policy file whose 'validation' section gives the gates.")
@click.option("--batches", "max_batches", type=click.IntRange(min=1), default=None, help="Use at most this many batches.")
@click.option("--max-abs", type=click.FloatRange(min=0), default=None, help="Gate: largest |candidate - original|.")
@click.option("--max-rel-l2", type=click.FloatRange(min=0), default=None, help="Gate: largest ||candidate - original|| / ||original||.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None, help="Gate: smallest cosine similarity.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None, help="Gate: smallest top-1 agreement ([N, C] / [N, T, C] outputs).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="onnxruntime execution provider for both models.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the validation report as JSON here.")
@_friendly_errors
def validate_command(original_model, candidate_model, data_path, policy, max_batches, max_abs, max_rel_l2, min_cosine, min_top1, provider, report_path):
    """Compare CANDIDATE with ORIGINAL on data; exit 1 if any accuracy gate fails.

    A gate flag replaces that gate from the policy for every output (per-output gates included).
    NaN/Inf in the candidate where the original is finite always fails.
    """
    import json

    from onnxmp.ir import write_text_atomic
    from onnxmp.validate import failure_hint, validate_files

    flags = dict(max_abs_error=max_abs, max_rel_l2_error=max_rel_l2, min_cosine_similarity=min_cosine, min_top1_agreement=min_top1)
    with console.status("validating", spinner="dots"):
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if provider == "cuda" else ("CPUExecutionProvider",)
        report = validate_files(original_model, candidate_model, data_path, policy, gate_overrides=flags, max_batches=max_batches, providers=providers)
    table = Table(title=f"{candidate_model} vs {original_model}  ({report.batches} batches)")
    for column in ("output", "elements", "max abs", "rel L2", "cosine", "top-1", "NaN/Inf", "result"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for name, m in report.outputs.items():
        top1 = "-" if m.top1_agreement is None else f"{m.top1_agreement:.4f}"
        result = "skipped" if m.note else ("pass" if report.output_passed(name) else "[red]FAIL[/red]")
        table.add_row(name, str(m.count), f"{m.max_abs_error:.3g}", f"{m.rel_l2_error:.3g}", f"{m.cosine_similarity:.6f}", top1, str(m.nonfinite_count), result)
    out.print(table)
    if report_path is not None:
        write_text_atomic(report_path, json.dumps(report.to_dict(), indent=2) + "\n")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if not report.passed:
        for line in report.failures:
            click.echo(f"error: {line}", err=True)
        click.echo(failure_hint(report), err=True)
        sys.exit(1)


@main.command("calibrate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--calibration-data", type=click.Path(path_type=Path), required=True, help="Folder of .npz/.npy batches or one .npz.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="mse", show_default=True, help="Range method.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="With --method percentile: the percentile of |x| kept.")
@click.option("--tensorrt-cache", type=click.Path(path_type=Path), default=None, help="Write TensorRT's calibration cache (symmetric int8) here.")
@click.option("--ort-trt-table", type=click.Path(path_type=Path), default=None, help="Write onnxruntime's TensorRT calibration table (flatbuffers) here.")
@click.option("--ort-overrides", type=click.Path(path_type=Path), default=None, help="Write onnxruntime TensorQuantOverrides JSON (uint8 asymmetric activations) here.")
@_friendly_errors
def calibrate_command(model_path, calibration_data, method, percentile, tensorrt_cache, ort_trt_table, ort_overrides):
    """Calibrate MODEL's float tensors and export the scales for TensorRT and onnxruntime."""
    from onnxmp.calibration import default_cache_dir
    from onnxmp.quant_calibration import export_calibration

    if not (tensorrt_cache or ort_trt_table or ort_overrides):
        raise click.UsageError("give at least one of --tensorrt-cache, --ort-trt-table, --ort-overrides")
    common = dict(method=method, percentile=percentile, progress=True, cache_dir=default_cache_dir())
    if tensorrt_cache or ort_trt_table:
        params = export_calibration(model_path, calibration_data, tensorrt_cache=tensorrt_cache, ort_trt_table=ort_trt_table, **common)
        console.print(f"calibrated {len(params)} tensors ({method}) for TensorRT")
    if ort_overrides:
        params = export_calibration(model_path, calibration_data, dtype="uint8", symmetric=False, ort_overrides=ort_overrides, **common)
        console.print(f"calibrated {len(params)} tensors ({method}) for onnxruntime")


if __name__ == "__main__":
    main()
