"""The Python API: everything the CLI does is one call of these functions."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx

from onnxmp.errors import ModelSaveError
from onnxmp.fallback import Attempt, FallbackSettings, accuracy_fallback, quantized_nodes
from onnxmp.ir import Model, iter_graphs, write_text_atomic
from onnxmp.pass_manager import PassContext, PassRecord, Pipeline
from onnxmp.policy import Policy, load_policy, preset_names


@dataclass
class OptimizeResult:
    """The optimized model and the report of how it was made."""

    model: Model
    report: dict[str, Any]


def optimize_model(
    model: Model | onnx.ModelProto | str | os.PathLike,
    policy: str | Path | dict | Policy | None = None,
    *,
    target: str | None = None,
    passes: str | None = None,
    calibration_data: str | os.PathLike | None = None,
    calibration_cache: str | os.PathLike | None = None,
    validation_data: str | os.PathLike | None = None,
    verify_each: bool = False,
    dump_after: tuple[str, ...] | list[str] = (),
    dump_dir: str | Path | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Run a policy's pipeline (or the textual ``passes``) over a model, then validate it.

    A given ``Model`` is changed in place. Calibration data (argument or the policy's
    ``calibration`` section) feeds range statistics to the passes. When the policy has a
    ``validation`` section or ``validation_data`` is given, the result is compared with the
    original and a failed gate raises ValidationError. With ``validation.fallback`` a quantized
    model that fails is tried again with its costliest nodes float (``onnxmp.fallback``); the
    result's model is then the one that passed, a new Model.
    """
    from onnxmp import __version__

    if not isinstance(model, Model):
        model = Model.load(model)
    policy = load_policy(policy).with_target(target)
    settings = dict(verify_each=verify_each, dump_after=dump_after, dump_dir=dump_dir, on_pass=on_pass)
    pipeline = Pipeline.from_text(passes, **settings) if passes else policy.pipeline(**settings)
    gates = _validation_gates(policy, validation_data)
    original = (model.source or model.to_proto()) if gates is not None else None
    ops_before = op_histogram(model)
    calibration = _calibrator(model, policy, calibration_data, calibration_cache, progress)
    ctx = PassContext(target=policy.target)
    ctx.calibration = calibration
    records = pipeline.run(model, ctx)
    validation, fallback = None, None
    if gates is not None:
        check = _Validation(original, model, policy, gates, validation_data, calibration)
        validation = check.run(model)
        wanted = FallbackSettings.from_section(policy.data.get("validation"))
        quantized = quantized_nodes(ctx.decisions)
        if not validation.passed and wanted is not None and check.real_data and quantized:
            first = Attempt((), validation, quantized, (model, ctx, records, pipeline))
            rerun = functools.partial(_attempt, original, pipeline, policy.target, calibration, check)
            best, fallback = accuracy_fallback(first, rerun, wanted, progress)
            (model, ctx, records, pipeline), validation = best.result, best.validation
    policy_id = policy.name if policy.name in preset_names() else f"sha256:{policy.digest}"
    model.metadata["onnxmp.version"] = __version__
    model.metadata["onnxmp.policy"] = policy_id
    model.metadata["onnxmp.pipeline"] = str(pipeline)
    if calibration is not None:
        model.metadata["onnxmp.calibration"] = calibration.digest
    report = {
        "onnxmp_version": __version__,
        "policy": {"name": policy.name, "id": policy_id, "target": policy.target},
        "pipeline": str(pipeline),
        "passes": [asdict(r) for r in records],
        "nodes": {"before": sum(ops_before.values()), "after": model.node_count()},
        "ops_before": ops_before,
        "ops_after": op_histogram(model),
        "casts": {"before": ops_before.get("Cast", 0), "after": op_histogram(model).get("Cast", 0)},
        "calibration": None if calibration is None else {"data": calibration.batches.description, "digest": calibration.digest},
        "decisions": ctx.decisions,
    }
    if fallback is not None:
        report["fallback"] = fallback
    if validation is not None:
        report["validation"] = validation.to_dict()
        validation.raise_if_failed()
    return OptimizeResult(model, report)


def _attempt(original: Any, pipeline: Pipeline, target: str, calibration: Any, check: "_Validation",
             kept: tuple[str, ...]) -> Attempt:  # fmt: skip
    """The pipeline rerun from the original with the ``kept`` nodes float in qdq-insertion, validated."""
    model = Model.load(original)
    ctx = PassContext(target=target)
    ctx.calibration = calibration
    rerun = Pipeline([_keeping(p, kept) for p in pipeline.passes], verify_each=pipeline.verify_each, verifier=pipeline.verifier)
    records = rerun.run(model, ctx)
    return Attempt(kept, check.run(model), quantized_nodes(ctx.decisions), (model, ctx, records, rerun))


def _keeping(pass_: Any, kept: tuple[str, ...]) -> Any:
    """``pass_``, or for qdq-insertion a copy that also keeps the ``kept`` nodes float (they were
    quantized, so none of them is in its keep_node_names already)."""
    if pass_.name != "qdq-insertion":
        return pass_
    return type(pass_)(dataclasses.replace(pass_.options, keep_node_names=[*pass_.options.keep_node_names, *kept]))


def _calibrator(model: Model, policy: Policy, data: Any, cache: Any, progress: bool):
    """A Calibrator over the given data or the policy's calibration section, or None."""
    from onnxmp.calibration import Calibrator, default_cache_dir
    from onnxmp.data import input_specs, load_batches

    section = policy.data.get("calibration", {})
    path = Path(data) if data is not None else policy.section_path("calibration")
    if path is None:
        return None
    batches = load_batches(path, input_specs(model))
    if cache is None:
        cache = section.get("cache_dir", default_cache_dir())
    return Calibrator(batches, cache, progress)


def _validation_gates(policy: Policy, data: Any):
    """The gates to hold the result to, or None when nothing asks for validation."""
    from onnxmp.validate import gates_from_policy

    section = policy.data.get("validation")
    if section is None and data is None:
        return None
    return gates_from_policy(section or {})


class _Validation:
    """Validation of candidates against the original on validation data (or, failing that,
    calibration data; or, failing both, random inputs, which the report says). The original's
    outputs are computed once, however many candidates are checked."""

    def __init__(self, original: Any, model: Model, policy: Policy, gates: Any, data: Any, calibration: Any):
        from onnxmp.data import input_specs, load_batches, random_batches
        from onnxmp.runtime import PROVIDERS
        from onnxmp.validate import top1_specs

        section = policy.data.get("validation", {})
        path = Path(data) if data is not None else policy.section_path("validation")
        specs = input_specs(model)
        if path is not None:
            self.batches = load_batches(path, specs)
        elif calibration is not None:
            self.batches = calibration.batches
        else:
            self.batches = random_batches(specs, count=4, batch_size=2)
        self.real_data = path is not None or calibration is not None
        runtime = section.get("runtime", "auto")
        self.providers = ("reference",) if runtime == "reference" else _validation_providers(policy.target, PROVIDERS)
        self.gates, self.max_batches, self.top1 = gates, section.get("batches"), top1_specs(section)
        self.original = original
        self.notes = []
        if not self.real_data:
            self.notes.append("validated on random inputs (no validation or calibration data): a smoke test only")
        if runtime == "auto" and self.providers == (PROVIDERS["cpu"],) and policy.target != "cpu":
            self.notes.append(
                f"validated on onnxruntime's CPU provider, not on the {policy.target} target: it computes float16 "
                "ops in float32, so overflow in float16 would not show; validate on the target, or set "
                "validation.runtime to 'reference' for exact float16 arithmetic"
            )
        self._recorded = None

    def run(self, model: Model) -> Any:
        from onnxmp.validate import RecordedOutputs, validate

        if self._recorded is None:
            self._recorded = RecordedOutputs(self.original, self.batches, self.providers, self.max_batches)
        report = validate(self._recorded, model.to_proto(), self.batches, self.gates, self.providers,
                          max_batches=self.max_batches, top1=self.top1)  # fmt: skip
        report.notes.extend(self.notes)
        return report


def _validation_providers(target: str, names: dict[str, str]) -> tuple[str, ...]:
    import onnxruntime as ort

    wanted = names.get(target, names["cpu"])
    if target != "cpu" and wanted in ort.get_available_providers():
        return (wanted, names["cpu"])
    return (names["cpu"],)


def optimize(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    policy: str | Path | dict | Policy | None = None,
    *,
    report_path: str | os.PathLike | None = None,
    **options: Any,
) -> OptimizeResult:
    """Load ``source``, optimize it, and write ``destination`` (and the report) atomically.

    ``options`` are those of :func:`optimize_model`. Nothing is written unless every step worked.
    """
    with _collector_paused():
        model = Model.load(source)
        inputs = [Path(source), *model.data_files]
        check_output_path(inputs, destination)
        if report_path is not None:
            check_output_path(inputs, report_path)
        result = optimize_model(model, policy, **options)
        result.report["input"], result.report["output"] = str(source), str(destination)
        result.model.save(destination)
    if report_path is not None:
        write_text_atomic(report_path, json.dumps(result.report, indent=2) + "\n")
    return result


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector.

    A graph is millions of small objects; the collector kept walking all of them (a fifth of the
    time on a 100k-node model). Passes disconnect what they remove, so reference counting frees
    it; the collector runs once at the end.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


def check_output_path(inputs: list[Path], destination: str | os.PathLike) -> None:
    """Refuse, before any pass runs, an output that would overwrite an input file (the model or
    its external data) or cannot be written."""
    src, dst = inputs[0], Path(destination)
    if dst.is_dir():
        raise ModelSaveError(f"output '{dst}' is a folder; give a file name such as {dst / 'model.onnx'}")
    if src.exists() and (dst.resolve() == src.resolve() or (dst.exists() and dst.samefile(src))):
        raise ModelSaveError(f"output '{dst}' is the input model; choose another output path (the input is never modified)")
    # The output's weights may go to '<OUT>.data': neither it nor OUT may be a file of the input.
    for written in (dst, dst.with_name(dst.name + ".data")):
        for existing in inputs:
            if written.resolve() == existing.resolve() or (written.exists() and written.samefile(existing)):
                raise ModelSaveError(
                    f"output '{dst}' would overwrite '{existing}', a file of the input model; "
                    "choose another output path (the input is never modified)"
                )
    parent = dst.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise ModelSaveError(f"cannot write '{dst}': '{parent}' is a file, not a folder; choose an output in a folder")
    if not parent.is_dir():
        raise ModelSaveError(f"cannot write '{dst}': folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ModelSaveError(f"cannot write '{dst}': folder '{parent}' is not writable")


def op_histogram(model: Model) -> dict[str, int]:
    """Node count per op type (``domain.Op`` outside ai.onnx), subgraphs included."""
    counts: Counter[str] = Counter()
    for graph in iter_graphs(model.graph):
        for node in graph.nodes:
            domain = node.domain if node.domain not in (None, "", "ai.onnx") else ""
            counts[f"{domain}.{node.op}" if domain else node.op] += 1
    return dict(sorted(counts.items()))
