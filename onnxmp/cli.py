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
from onnxmp.pass_manager import TARGETS, PassRecord, registered_passes
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
@click.option("--verify-each", is_flag=True, help="Check the model (onnx.checker full, onnxruntime load) after every pass.")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Write the text form after PASS (repeatable).")
@click.option("--dump-dir", type=click.Path(path_type=Path), default=None, help="Folder for --dump-after (default: OUT.dump/).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Report JSON path (default: OUT with .report.json).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@_friendly_errors
def optimize_command(input_model, output_model, policy, target, passes, verify_each, dump_after, dump_dir, report_path, quiet):
    """Optimize IN into OUT as the policy says."""
    report_path = report_path or output_model.with_suffix(".report.json")
    if dump_after and dump_dir is None:
        dump_dir = output_model.with_name(output_model.name + ".dump")
    status = console.status("loading", spinner="dots") if not quiet else None

    def on_pass(record: PassRecord) -> None:
        if status is not None:
            status.update(f"ran {record.name}")

    if status is not None:
        status.start()
    try:
        result = optimize(
            input_model,
            output_model,
            policy,
            target=target,
            passes=passes,
            verify_each=verify_each,
            dump_after=dump_after,
            dump_dir=dump_dir,
            report_path=report_path,
            on_pass=on_pass,
        )
    finally:
        if status is not None:
            status.stop()
    if not quiet:
        _print_pass_table(result.report)
        console.print(f"wrote {output_model} and {report_path}")


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


if __name__ == "__main__":
    main()
