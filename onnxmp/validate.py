"""Original vs candidate: run both on the same data, measure how far each output moved, gate it.

Both models run in onnxruntime on the same batches. Every output is compared in float64 and the
comparison streams: an :class:`OutputMetrics` keeps running sums, so memory does not grow with
the number of batches. :class:`Gates` say how far an output may move; a
:class:`ValidationReport` lists each output's metrics and every gate it failed.

Metrics, per output name (all over the whole data set, not averaged per batch):

* ``count``: elements compared (the sum of the output's sizes over all batches).
* ``nonfinite_count``: elements that are NaN or +-Inf in the candidate where the original is
  finite. Any is a failure, whatever the gates say.
* ``original_nonfinite_count``: elements that are already NaN/Inf in the original. They are
  left out of every metric (informational).
* ``max_abs_error``: ``max |c - o|`` over elements finite in both models.
* ``rel_l2_error``: ``||c - o||_2 / max(||o||_2, 1e-30)`` over elements finite in both, with the
  norms taken over all batches together (not a mean of per-batch ratios).
* ``cosine_similarity``: ``<o, c> / (||o||_2 ||c||_2)`` of the flattened outputs over elements
  finite in both; 1.0 when both are all zeros, 0.0 when exactly one is.
* ``top1_agreement``: for classifier-shaped outputs only, the fraction of rows whose argmax over
  the last axis is the same in both models. Classifier-shaped means a floating-point output of
  rank 2 (``[N, C]``) whose last dimension is greater than 1; each row is one prediction, and
  rows where the original has a NaN/Inf are skipped. Rank 3 is excluded by default because
  ``[N, T, H]`` is far more often a hidden state (BERT's ``last_hidden_state``, where an argmax
  over 768 features means nothing) than per-token logits; rank 4 and above because the class axis
  is usually axis 1 (NCHW). ``None`` for other outputs. Per-token logits need
  ``validation.top1.<output>: {"class_axis": -1}``. Detector outputs such as
  ``[N, 4 + classes, anchors]`` (YOLOv8) or ``[N, anchors, 5 + classes]`` (YOLOv5) need a
  :class:`Top1Spec` (policy ``validation.top1.<output>``): the class axis, the slice of it that
  holds class scores (leaving box coordinates out), and a ``min_score`` below which an anchor is
  background and not counted; or ``class_axis: null`` to leave an output out of top-1.

Sessions use onnxruntime's default graph optimization level (``ORT_ENABLE_ALL``) for both
models, which is how they are deployed; both see exactly the same feeds. A candidate whose
inputs are float16 receives the float32 data cast to float16; bfloat16 inputs and outputs (which
onnxruntime's Python API cannot exchange with numpy) are widened with a Cast to or from float32
inside a copy of the candidate used only for validation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxmp.errors import DataError, ModelLoadError, PolicyError, ValidationError, VerificationError
from onnxmp.fallback import FALLBACK_SCHEMA
from onnxmp.ir import computes_float16

TINY = 1e-30  # floor of ||original||_2 in the relative L2 error
GATE_NAMES = ("max_abs_error", "max_rel_l2_error", "min_cosine_similarity", "min_top1_agreement")
_WIDE_IN = "::onnxmp_in_f32"
_WIDE_OUT = "::onnxmp_out_f32"

# ---------------------------------------------------------------- the policy section
_GATE_PROPERTIES: dict[str, Any] = {
    "max_abs_error": {
        "type": ["number", "null"],
        "minimum": 0,
        "description": "largest allowed |candidate - original| of any element",
    },
    "max_rel_l2_error": {
        "type": ["number", "null"],
        "minimum": 0,
        "description": "largest allowed ||candidate - original||_2 / ||original||_2",
    },
    "min_cosine_similarity": {
        "type": ["number", "null"],
        "minimum": -1,
        "maximum": 1,
        "description": "smallest allowed cosine similarity of the flattened outputs",
    },
    "min_top1_agreement": {
        "type": ["number", "null"],
        "minimum": 0,
        "maximum": 1,
        "description": "smallest allowed fraction of rows with the same argmax (classifier outputs: [N, C] or [N, T, C])",
    },
}

_TOP1_PROPERTIES: dict[str, Any] = {
    "class_axis": {
        "type": ["integer", "null"],
        "description": "axis of the class scores (negative counts from the end); null: no top-1 for this output",
    },
    "classes": {
        "type": "array",
        "items": {"type": ["integer", "null"]},
        "minItems": 2,
        "maxItems": 2,
        "description": "[start, stop] of the class scores along class_axis (stop null: to the end), e.g. [4, null] after 4 box coordinates",
    },
    "min_score": {
        "type": ["number", "null"],
        "description": "count only rows whose largest original class score is at least this (detectors: confident anchors)",
    },
}

VALIDATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "accuracy gates checked by comparing the candidate with the original on data",
    "additionalProperties": False,
    "properties": {
        "data": {
            "type": "string",
            "description": "validation data path; relative paths are resolved against the policy file's folder",
        },
        "batches": {"type": "integer", "minimum": 1, "description": "use at most this many batches"},
        "runtime": {
            "enum": ["auto", "onnxruntime", "reference"],
            "default": "auto",
            "description": (
                "auto: onnxruntime on the policy's target when available, else its CPU provider; "
                "reference: onnx's reference evaluator, which computes every op in the model's own types "
                "(slow; faithful float16/bfloat16 numerics where onnxruntime's CPU provider computes in float32)"
            ),
        },
        "fallback": FALLBACK_SCHEMA,
        "top1": {
            "type": "object",
            "description": "per output: where its class scores are, for top-1 agreement (default: the last axis of [N, C] and [N, T, C] outputs)",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["class_axis"],
                "properties": _TOP1_PROPERTIES,
            },
        },
        "gates": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **_GATE_PROPERTIES,
                "outputs": {
                    "type": "object",
                    "description": "per-output gates; a key set here replaces the model-wide value for that output",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": _GATE_PROPERTIES,
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------- top-1 of one output
@dataclass(frozen=True)
class Top1Spec:
    """Where an output's class scores are: ``class_axis`` (None: no top-1 for it), the slice
    ``[start, stop)`` of that axis holding them, and ``min_score``: rows whose largest original
    score in the slice is below it are left out. Every other axis indexes predictions."""

    class_axis: int | None
    start: int = 0
    stop: int | None = None
    min_score: float | None = None

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "Top1Spec":
        start, stop = data.get("classes") or (0, None)
        if start is None:
            start = 0
        if start < 0 or (stop is not None and stop <= start):
            raise PolicyError(f"validation.top1.{name}.classes: [{start}, {stop}] is not a slice [start, stop) with 0 <= start < stop")
        return cls(data["class_axis"], int(start), None if stop is None else int(stop), data.get("min_score"))

    def rows(self, array: np.ndarray) -> np.ndarray:
        """The scores as [predictions, classes]."""
        scores = np.moveaxis(array, self.class_axis, -1)[..., self.start : self.stop]
        return scores.reshape(-1, scores.shape[-1])


def top1_specs(section: Mapping[str, Any] | None) -> dict[str, Top1Spec]:
    """Top-1 specs per output from a validation section's ``top1`` object."""
    return {name: Top1Spec.from_dict(name, data) for name, data in dict((section or {}).get("top1") or {}).items()}


# ---------------------------------------------------------------- gates
@dataclass
class Gates:
    """How far each output may move; ``None`` turns a gate off.

    ``outputs`` holds per-output gates: a value set there replaces the model-wide value for that
    output, a ``None`` there inherits it (to turn a gate off for one output, give it a bound that
    always passes, e.g. ``min_top1_agreement=0``). NaN/Inf in the candidate where the original is
    finite always fails, whatever the gates.
    """

    max_abs_error: float | None = None
    max_rel_l2_error: float | None = None
    min_cosine_similarity: float | None = None
    min_top1_agreement: float | None = None
    outputs: dict[str, "Gates"] = field(default_factory=dict)

    def __post_init__(self) -> None:
        limits = {
            "max_abs_error": (0.0, math.inf),
            "max_rel_l2_error": (0.0, math.inf),
            "min_cosine_similarity": (-1.0, 1.0),
            "min_top1_agreement": (0.0, 1.0),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise PolicyError(f"gate {name} must be a number or null, got {value!r}")
            if not low <= value <= high:
                raise PolicyError(f"gate {name} must be between {low:g} and {high:g}, got {value:g}")
            setattr(self, name, float(value))
        for name, gates in self.outputs.items():
            if not isinstance(gates, Gates):
                raise PolicyError(f"gates for output '{name}' must be Gates, got {type(gates).__name__}")
            if gates.outputs:
                raise PolicyError(f"gates for output '{name}' cannot have per-output gates of their own")

    def for_output(self, name: str) -> "Gates":
        """The gates that apply to output ``name``: the model-wide ones, with its own on top."""
        own = self.outputs.get(name)
        values = {key: getattr(self, key) for key in GATE_NAMES}
        if own is not None:
            values.update({key: getattr(own, key) for key in GATE_NAMES if getattr(own, key) is not None})
        return Gates(**values)

    def overridden(self, **values: float | None) -> "Gates":
        """These gates with some model-wide values replaced for every output (CLI flags).

        A value given here also replaces that gate in the per-output gates, so it is what every
        output is checked against. Keys whose value is ``None`` are left alone.
        """
        unknown = sorted(set(values) - set(GATE_NAMES))
        if unknown:
            raise PolicyError(f"unknown gate(s) {', '.join(unknown)}; gates are {', '.join(GATE_NAMES)}")
        given = {key: value for key, value in values.items() if value is not None}
        outputs = {name: dataclasses.replace(g, **{k: None for k in given}) for name, g in self.outputs.items()}
        return dataclasses.replace(self, **given, outputs=outputs)

    def check_output_names(self, names: Iterable[str]) -> None:
        """Refuse per-output gates for outputs the model does not have."""
        names = list(names)
        unknown = [name for name in self.outputs if name not in names]
        if unknown:
            raise PolicyError(
                f"gates are given for output(s) {', '.join(repr(n) for n in unknown)} that the model does not "
                f"have; its outputs are {', '.join(repr(n) for n in names)} (fix validation.gates.outputs)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The policy form: ``{"max_abs_error": ..., ..., "outputs": {name: {...}}}``."""
        data: dict[str, Any] = {key: getattr(self, key) for key in GATE_NAMES}
        if self.outputs:
            data["outputs"] = {
                name: {key: getattr(g, key) for key in GATE_NAMES if getattr(g, key) is not None}
                for name, g in self.outputs.items()
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Gates":
        """Gates from the policy form (the ``gates`` object of the validation section)."""
        data = dict(data or {})
        outputs = data.pop("outputs", None) or {}
        for where, values in [("gates", data)] + [(f"gates.outputs.{n}", g or {}) for n, g in outputs.items()]:
            unknown = sorted(set(values) - set(GATE_NAMES))
            if unknown:
                raise PolicyError(f"{where}: unknown gate(s) {', '.join(unknown)}; gates are {', '.join(GATE_NAMES)}")
        return cls(**data, outputs={name: cls(**(g or {})) for name, g in outputs.items()})


def check_validation_section(section: Any, source: str = "policy") -> None:
    """Raise PolicyError naming the JSON path of the first bad field of a validation section."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(VALIDATION_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(section))
    if error is None:
        return
    path = "$.validation" + error.json_path[1:]
    message = error.message
    if error.validator == "additionalProperties":
        message += f"; allowed: {', '.join(sorted(error.schema.get('properties', {})))}"
    raise PolicyError(f"{source}: {path}: {message}")


def gates_from_policy(section: Mapping[str, Any] | None) -> Gates:
    """Gates from a policy's ``validation`` section (``{"data": ..., "batches": ..., "gates": {...}}``)."""
    section = {} if section is None else section
    check_validation_section(section)
    return Gates.from_dict(section.get("gates"))


# ---------------------------------------------------------------- metrics
@dataclass
class OutputMetrics:
    """Streaming comparison of one output; feed it batch after batch with :meth:`update`."""

    name: str
    count: int = 0
    nonfinite_count: int = 0
    original_nonfinite_count: int = 0
    max_abs_error: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_original: float = 0.0
    sum_sq_candidate: float = 0.0
    dot: float = 0.0
    top1_applies: bool | None = None  # decided on the first batch
    top1_rows: int = 0
    top1_agree: int = 0
    original_dtype: str | None = None
    candidate_dtype: str | None = None
    shape_mismatch: str | None = None  # the first batch whose shapes differ; always a failure
    note: str | None = None  # why the output was not compared, if it was not
    top1_spec: Top1Spec | None = None  # where the class scores are; None: the default rule

    @property
    def rel_l2_error(self) -> float:
        return math.sqrt(self.sum_sq_diff) / max(math.sqrt(self.sum_sq_original), TINY)

    @property
    def cosine_similarity(self) -> float:
        norms = math.sqrt(self.sum_sq_original) * math.sqrt(self.sum_sq_candidate)
        if self.sum_sq_original == 0.0 and self.sum_sq_candidate == 0.0:
            return 1.0
        if norms == 0.0:
            return 0.0
        return max(-1.0, min(1.0, self.dot / norms))

    @property
    def top1_agreement(self) -> float | None:
        if not self.top1_applies:
            return None
        return self.top1_agree / self.top1_rows if self.top1_rows else 1.0

    def update(self, original: Any, candidate: Any, batch: int = 0) -> None:
        """Add one batch of this output from both models."""
        if self.note is not None:
            return
        if not isinstance(original, np.ndarray) or not isinstance(candidate, np.ndarray):
            kind = type(original if not isinstance(original, np.ndarray) else candidate).__name__
            self.note = f"not compared: the output is a {kind}, not a tensor"
            return
        if original.dtype.kind in "OSUV" or candidate.dtype.kind in "OSUV":
            self.note = f"not compared: {original.dtype} / {candidate.dtype} output is not numeric"
            return
        self.original_dtype = self.original_dtype or str(original.dtype)
        self.candidate_dtype = self.candidate_dtype or str(candidate.dtype)
        if self.top1_applies is None:
            self.top1_applies = self._top1_applies(original)
        if original.shape != candidate.shape:
            if self.shape_mismatch is None:
                self.shape_mismatch = (
                    f"shape {list(candidate.shape)} differs from the original's {list(original.shape)} "
                    f"(batch {batch})"
                )
            return
        o = original.astype(np.float64, copy=False).ravel()
        c = candidate.astype(np.float64, copy=False).ravel()
        self.count += o.size
        o_finite, c_finite = np.isfinite(o), np.isfinite(c)
        if not (o_finite.all() and c_finite.all()):
            self.original_nonfinite_count += int(o.size - np.count_nonzero(o_finite))
            self.nonfinite_count += int(np.count_nonzero(o_finite & ~c_finite))
            both = o_finite & c_finite
            o_cmp, c_cmp = o[both], c[both]
        else:
            o_cmp, c_cmp = o, c
        if o_cmp.size:
            diff = c_cmp - o_cmp
            self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(diff))))
            self.sum_sq_diff += float(np.dot(diff, diff))
            self.sum_sq_original += float(np.dot(o_cmp, o_cmp))
            self.sum_sq_candidate += float(np.dot(c_cmp, c_cmp))
            self.dot += float(np.dot(o_cmp, c_cmp))
        if self.top1_applies and original.ndim >= 2 and original.size:
            spec = self.top1_spec or Top1Spec(-1)
            rows_o, rows_c = spec.rows(original), spec.rows(candidate)
            valid = np.isfinite(rows_o).all(axis=1)
            if spec.min_score is not None:
                valid &= rows_o.max(axis=1, initial=-np.inf) >= spec.min_score
            if not valid.all():
                rows_o, rows_c = rows_o[valid], rows_c[valid]
            # np.argmax treats NaN as the largest value, so a NaN row in the candidate mostly disagrees.
            self.top1_rows += int(rows_o.shape[0])
            self.top1_agree += int(np.count_nonzero(np.argmax(rows_o, axis=1) == np.argmax(rows_c, axis=1)))

    def _top1_applies(self, original: np.ndarray) -> bool:
        """The default rule, or the spec (checked against the output's rank here)."""
        spec = self.top1_spec
        if spec is None:
            return bool(original.dtype.kind == "f" and original.ndim == 2 and original.shape[-1] > 1)
        if spec.class_axis is None:
            return False
        if not -original.ndim <= spec.class_axis < original.ndim or original.ndim < 2:
            raise PolicyError(
                f"validation.top1.{self.name}.class_axis is {spec.class_axis}, but output '{self.name}' has rank "
                f"{original.ndim}; give an axis of its shape {list(original.shape)}"
            )
        classes = len(range(original.shape[spec.class_axis])[spec.start : spec.stop])
        if classes < 2:
            raise PolicyError(
                f"validation.top1.{self.name}: classes [{spec.start}, {spec.stop}] leave {classes} class score(s) "
                f"on axis {spec.class_axis} of shape {list(original.shape)}; top-1 needs at least 2"
            )
        return original.dtype.kind == "f"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "count": self.count,
            "max_abs_error": _json_float(self.max_abs_error),
            "rel_l2_error": _json_float(self.rel_l2_error),
            "cosine_similarity": _json_float(self.cosine_similarity),
            "top1_agreement": _json_float(self.top1_agreement),
            "top1_rows": self.top1_rows if self.top1_applies else None,
            "nonfinite_count": self.nonfinite_count,
            "original_nonfinite_count": self.original_nonfinite_count,
            "original_dtype": self.original_dtype,
            "candidate_dtype": self.candidate_dtype,
        }
        if self.shape_mismatch:
            data["shape_mismatch"] = self.shape_mismatch
        if self.note:
            data["note"] = self.note
        return data


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


# ---------------------------------------------------------------- the report
@dataclass
class ValidationReport:
    """Per-output metrics, the gates they were held to, and every failure as a readable line."""

    outputs: dict[str, OutputMetrics]
    gates: Gates
    failures: list[str]
    batches: int
    output_failures: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    data: dict[str, Any] | None = None  # description/digest of the data source, when it has them

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failed_outputs(self) -> list[str]:
        return [name for name, lines in self.output_failures.items() if lines]

    def output_passed(self, name: str) -> bool:
        return not self.output_failures.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "batches": self.batches,
            "providers": list(self.providers),
            "data": self.data,
            "gates": self.gates.to_dict(),
            "outputs": {
                name: {
                    **metrics.to_dict(),
                    "gates": self.gates.for_output(name).to_dict(),
                    "passed": self.output_passed(name),
                }
                for name, metrics in self.outputs.items()
            },
            "failures": list(self.failures),
            "notes": list(self.notes),
        }

    def raise_if_failed(self) -> None:
        """Raise ValidationError listing every failure and what to do about it."""
        if self.passed:
            return
        lines = "\n".join([f"  {line}" for line in self.failures] + [f"note: {note}" for note in self.notes])
        raise ValidationError(
            f"the candidate failed {len(self.failures)} accuracy check(s) on {self.batches} batch(es):\n"
            f"{lines}\n{failure_hint(self)}"
        )


def failure_hint(report: ValidationReport) -> str:
    """What to do about a failed validation, in one paragraph."""
    hint = (
        "To accept the difference, loosen the gate in the policy's \"validation\" section "
        "(validation.gates, or per output under validation.gates.outputs.<name>); to make the candidate "
        "more accurate, keep more ops in float with the keep_op_types / keep_node_patterns options of the precision "
        "or qdq-insertion pass, or, for a quantized model, let validation.fallback find the nodes to keep."
    )
    if any(m.nonfinite_count for m in report.outputs.values()):
        hint += (
            " NaN/Inf outputs fail whatever the gates: keep the ops that overflow in reduced precision "
            "(often Softmax, Exp, Pow, ReduceSum/ReduceMean, LayerNormalization) in FP32."
        )
    if any(m.shape_mismatch for m in report.outputs.values()):
        hint += " A changed output shape is a bug in the pipeline, not a precision loss: report it."
    return hint


def _fmt(value: float, gate: float) -> tuple[str, str]:
    """The gate as written, and the value with just enough digits to read as on its side of it."""
    above = value > gate
    for digits in range(3, 17):
        shown = f"{value:.{digits}g}"
        if (float(shown) > gate) if above else (float(shown) < gate):
            return shown, f"{gate:.12g}"
    return repr(value), repr(gate)


def check_gates(outputs: Mapping[str, OutputMetrics], gates: Gates) -> tuple[dict[str, list[str]], list[str]]:
    """Failure lines per output, and notes, for ``outputs`` held to ``gates``."""
    failures: dict[str, list[str]] = {}
    notes: list[str] = []
    for name, m in outputs.items():
        g = gates.for_output(name)
        lines: list[str] = []
        failures[name] = lines
        if m.note:
            notes.append(f"output '{name}': {m.note}")
            continue
        if m.shape_mismatch:
            lines.append(f"output '{name}': {m.shape_mismatch}")
        if m.nonfinite_count:
            lines.append(
                f"output '{name}': {m.nonfinite_count} of {m.count} values are NaN/Inf in the candidate "
                "where the original is finite"
            )
        if g.max_abs_error is not None and m.max_abs_error > g.max_abs_error:
            value, gate = _fmt(m.max_abs_error, g.max_abs_error)
            lines.append(f"output '{name}': max abs error {value} > gate {gate}")
        if g.max_rel_l2_error is not None and m.rel_l2_error > g.max_rel_l2_error:
            value, gate = _fmt(m.rel_l2_error, g.max_rel_l2_error)
            lines.append(f"output '{name}': relative L2 error {value} > gate {gate}")
        if g.min_cosine_similarity is not None and m.cosine_similarity < g.min_cosine_similarity:
            value, gate = _fmt(m.cosine_similarity, g.min_cosine_similarity)
            lines.append(f"output '{name}': cosine similarity {value} < gate {gate}")
        if g.min_top1_agreement is not None:
            top1 = m.top1_agreement
            own = gates.outputs.get(name)
            if top1 is None and own is not None and own.min_top1_agreement is not None:
                raise PolicyError(
                    f"validation.gates.outputs.{name}.min_top1_agreement is set, but top-1 agreement does not "
                    f"apply to output '{name}' (it is not a floating-point [N, C] or [N, T, C] output with C > 1); "
                    f"remove that gate, or say where its class scores are in validation.top1.{name}"
                )
            if top1 is not None and top1 < g.min_top1_agreement:
                value, gate = _fmt(top1, g.min_top1_agreement)
                lines.append(
                    f"output '{name}': top-1 agreement {value} < gate {gate} "
                    f"({m.top1_rows - m.top1_agree} of {m.top1_rows} rows changed their argmax)"
                )
    if gates.min_top1_agreement is not None and outputs and not any(m.top1_applies for m in outputs.values()):
        notes.append(
            "min_top1_agreement applies to no output: none is a floating-point [N, C] or [N, T, C] output with C > 1"
        )
    return failures, notes


# ---------------------------------------------------------------- running models
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


class _Runner:
    """One onnxruntime session plus the feed casts and name mapping it needs."""

    def __init__(self, model: Any, role: str, providers: tuple[str, ...] | list[str]):
        import onnxruntime as ort

        self.role = role
        source, header = _model_source(model, role)
        proto = header
        self.input_alias: dict[str, str] = {}
        self.output_alias: dict[str, str] = {}
        if _has_bfloat16_io(header.graph):
            if isinstance(source, str):  # the header came without its weights; load them now
                proto = onnx.load_model(source)
            proto, self.input_alias, self.output_alias = _widen_bfloat16_io(proto)
            source = proto.SerializeToString()
        self.note = ""
        if REFERENCE in providers:
            self.session = _ReferenceSession(source)
            self._describe_io()
            return
        options = ort.SessionOptions()
        options.log_severity_level = 3  # graph optimizations stay at the default level (ORT_ENABLE_ALL)
        if tuple(providers) == ("CPUExecutionProvider",) and computes_float16(header.graph):
            # see onnxmp.ir.computes_float16: level "all" can crash the CPU provider here
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            self.session = ort.InferenceSession(source, options, providers=list(providers))
        except Exception as exc:
            if role == "candidate" and "NOT_IMPLEMENTED" in str(exc) and tuple(providers) == ("CPUExecutionProvider",):
                # e.g. bfloat16: the CPU provider has no kernels; the reference evaluator runs it exactly.
                self.session = _ReferenceSession(source)
                self.note = f"the candidate ran on onnx's reference evaluator: {_first_line(exc)}"
                self._describe_io()
                return
            error = ModelLoadError if role == "original" else VerificationError
            hint = ""
            if "NOT_IMPLEMENTED" in str(exc):
                hint = (
                    f"; {', '.join(providers)} has no kernel for it: validate on the provider the model targets "
                    "(e.g. providers=('CUDAExecutionProvider', 'CPUExecutionProvider'), CLI --provider cuda)"
                )
            raise error(f"onnxruntime cannot load the {role} model: {_first_line(exc)}{hint}") from exc
        self._describe_io()

    def _describe_io(self) -> None:
        back = {wide: name for name, wide in self.input_alias.items()}
        self.inputs = {back.get(i.name, i.name): (i.name, _ORT_TYPES.get(i.type)) for i in self.session.get_inputs()}
        self.session_outputs = [o.name for o in self.session.get_outputs()]
        self.output_names = [self.output_alias.get(name, name) for name in self.session_outputs]

    def run(self, batch: Mapping[str, Any], index: int) -> dict[str, Any]:
        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise DataError(
                f"batch {index} has no value for input(s) {', '.join(repr(n) for n in missing)} of the {self.role} "
                f"model; it has {', '.join(repr(n) for n in batch) or 'nothing'}"
            )
        feeds = {
            feed_name: _conform(batch[name], dtype, name, self.role) for name, (feed_name, dtype) in self.inputs.items()
        }
        try:
            values = self.session.run(self.session_outputs, feeds)
        except Exception as exc:
            if self.role == "original":
                raise DataError(f"the original model failed on batch {index}: {_first_line(exc)}") from exc
            raise ValidationError(
                f"the candidate failed on batch {index}, where the original ran: {_first_line(exc)}"
            ) from exc
        return dict(zip(self.output_names, values))


class RecordedOutputs:
    """The original model's outputs on every batch, run once and kept in memory, to validate
    many candidates against one original (the accuracy fallback does). Pass it to
    :func:`validate` as ``original`` with the same batches."""

    role = "original"

    def __init__(self, original: Any, batches: Iterable[Mapping[str, Any]], providers: tuple[str, ...] | list[str],
                 max_batches: int | None = None):  # fmt: skip
        runner = _Runner(original, "original", providers)
        self.inputs, self.output_names, self.note = runner.inputs, runner.output_names, runner.note
        self.values = [runner.run(batch, index) for index, batch in enumerate(itertools.islice(batches, max_batches))]

    def run(self, batch: Mapping[str, Any], index: int) -> dict[str, Any]:
        return self.values[index]


REFERENCE = "reference"  # a provider name meaning onnx's reference evaluator


class _ReferenceSession:
    """The part of an onnxruntime session the validator uses, run by onnx's reference evaluator.

    The reference evaluator computes each op in its declared types (float16 stays float16), so it
    shows what a low-precision model does on hardware with native kernels. It is slow: for small
    models and as a fallback where onnxruntime has no kernel.
    """

    def __init__(self, model: str | bytes | onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator

        proto = model if isinstance(model, onnx.ModelProto) else (
            onnx.load_model(model) if isinstance(model, str) else onnx.load_model_from_string(model)
        )
        self.graph = proto.graph
        self.evaluator = ReferenceEvaluator(proto)

    def get_inputs(self) -> list[Any]:
        return [_Port(vi) for vi in _graph_inputs(self.graph)]

    def get_outputs(self) -> list[Any]:
        return [_Port(vi) for vi in self.graph.output]

    def run(self, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        return [np.asarray(v) for v in self.evaluator.run(names, feeds)]


class _Port:
    """Name and onnxruntime-style type string of a graph input or output."""

    def __init__(self, info: onnx.ValueInfoProto):
        self.name = info.name
        numpy_name = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name
        self.type = f"tensor({ {'float32': 'float', 'float64': 'double'}.get(numpy_name, numpy_name) })"


def _model_source(model: Any, role: str) -> tuple[str | bytes, onnx.ModelProto]:
    """What onnxruntime loads (a path keeps external data working) and a proto to read I/O from."""
    from onnxmp.ir import Model

    if isinstance(model, Model):
        model = model.to_proto()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{role} model '{path}' does not exist or is not a file; check the path")
        try:
            header = onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:
            raise ModelLoadError(f"{role} model '{path}' is not a valid ONNX file: {_first_line(exc)}") from exc
        return str(path), header
    raise TypeError(f"the {role} model must be an onnx.ModelProto, an onnxmp Model or a path, got {type(model).__name__}")


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in initializers]


def _has_bfloat16_io(graph: onnx.GraphProto) -> bool:
    return any(
        vi.type.tensor_type.elem_type == TensorProto.BFLOAT16 for vi in list(_graph_inputs(graph)) + list(graph.output)
    )


def _widen_bfloat16_io(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str]]:
    """A copy whose bfloat16 inputs and outputs are float32, with Casts inside the graph.

    Returns the copy, ``{input name: float32 feed name}`` and ``{float32 output name: output name}``.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    head: list[onnx.NodeProto] = []
    tail: list[onnx.NodeProto] = []
    for vi in _graph_inputs(graph):
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            wide = vi.name + _WIDE_IN
            head.append(helper.make_node("Cast", [wide], [vi.name], name=wide + "/cast", to=TensorProto.BFLOAT16))
            inputs[vi.name] = wide
            vi.name = wide
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for vi in graph.output:
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            wide = vi.name + _WIDE_OUT
            tail.append(helper.make_node("Cast", [vi.name], [wide], name=wide + "/cast", to=TensorProto.FLOAT))
            outputs[wide] = vi.name
            vi.name = wide
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return model, inputs, outputs


def _conform(value: Any, dtype: type | None, name: str, role: str) -> np.ndarray:
    """``value`` in the element type the model takes, where that is a safe conversion."""
    array = np.asarray(value)
    if dtype is None or array.dtype == dtype:
        return array
    target = np.dtype(dtype)
    if target.kind == "f" and array.dtype.kind == "f":
        return array.astype(target)
    if target.kind in "iu" and array.dtype.kind in "iu":
        converted = array.astype(target)
        if np.array_equal(converted, array):
            return converted
        raise DataError(f"input '{name}' holds {array.dtype} values that do not fit the {role} model's {target}")
    return array  # onnxruntime reports anything else with the types involved


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _same_outputs(original: list[str], candidate: list[str]) -> None:
    missing = [n for n in original if n not in candidate]
    extra = [n for n in candidate if n not in original]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the candidate lacks output(s) {', '.join(repr(n) for n in missing)}")
        if extra:
            parts.append(f"it has output(s) {', '.join(repr(n) for n in extra)} that the original does not")
        raise ValidationError(
            "; ".join(parts) + "; a candidate must keep the original's output names so that they can be compared"
        )


# ---------------------------------------------------------------- entry points
def validate(
    original: Any,
    candidate: Any,
    batches: Iterable[Mapping[str, Any]],
    gates: Gates | None = None,
    providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
    *,
    max_batches: int | None = None,
    top1: Mapping[str, Top1Spec] | None = None,
) -> ValidationReport:
    """Run both models on every batch (at most ``max_batches``) and hold each output to ``gates``.

    ``top1`` says per output where its class scores are (:class:`Top1Spec`, e.g. from
    :func:`top1_specs` of a policy's validation section); other outputs follow the default rule.

    ``original`` and ``candidate`` are ModelProtos, onnxmp Models or paths (``original`` may also be
    :class:`RecordedOutputs` of the same batches); ``batches`` is any
    iterable of ``{input name: array}`` dicts (e.g. an ``onnxmp.data`` BatchSource). Returns the
    report; call :meth:`ValidationReport.raise_if_failed` to turn failures into an error.
    """
    gates = gates if gates is not None else Gates()
    providers = tuple(providers)
    first = original if isinstance(original, RecordedOutputs) else _Runner(original, "original", providers)
    second = _Runner(candidate, "candidate", providers)
    _same_outputs(first.output_names, second.output_names)
    extra_inputs = [n for n in second.inputs if n not in first.inputs]
    if extra_inputs:
        raise ValidationError(
            f"the candidate takes input(s) {', '.join(repr(n) for n in extra_inputs)} that the original does not; "
            "a candidate must take the original's inputs"
        )
    gates.check_output_names(first.output_names)
    top1 = dict(top1 or {})
    unknown = [name for name in top1 if name not in first.output_names]
    if unknown:
        raise PolicyError(
            f"validation.top1 names output(s) {', '.join(repr(n) for n in unknown)} that the model does not have; "
            f"its outputs are {', '.join(repr(n) for n in first.output_names)}"
        )
    metrics = {name: OutputMetrics(name, top1_spec=top1.get(name)) for name in first.output_names}
    count = 0
    for index, batch in enumerate(itertools.islice(batches, max_batches)):
        if not isinstance(batch, Mapping):
            raise DataError(f"batch {index} is a {type(batch).__name__}; expected a dict of input name to array")
        want = first.run(batch, index)
        got = second.run(batch, index)
        for name, metric in metrics.items():
            metric.update(want[name], got[name], index)
        count += 1
    if count == 0:
        raise DataError("the validation data has no batches; give at least one")
    per_output, notes = check_gates(metrics, gates)
    notes = [runner.note for runner in (first, second) if runner.note] + notes
    data = {
        key: getattr(batches, key) for key in ("description", "digest") if isinstance(getattr(batches, key, None), str)
    }
    return ValidationReport(
        outputs=metrics,
        gates=gates,
        failures=[line for lines in per_output.values() for line in lines],
        batches=count,
        output_failures=per_output,
        notes=notes,
        providers=providers,
        data=data or None,
    )


def validate_files(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    data: str | os.PathLike | None = None,
    policy: Any = None,
    *,
    gate_overrides: Mapping[str, float | None] | None = None,
    max_batches: int | None = None,
    providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
) -> ValidationReport:
    """What ``onnxmp validate`` does: gates from the policy's ``validation`` section (when a policy
    is given) with ``gate_overrides`` on top, data from ``data`` or the section's ``data``, batches
    read by :func:`onnxmp.data.load_batches` against the original's inputs."""
    from onnxmp.data import input_specs, load_batches

    section: Mapping[str, Any] = {}
    base = Path.cwd()
    if policy is not None:
        from onnxmp.policy import load_policy

        loaded = load_policy(policy)
        section = loaded.data.get("validation", {}) or {}
        check_validation_section(section, f"policy '{loaded.name}'")
        if Path(loaded.name).is_file():
            base = Path(loaded.name).resolve().parent
    gates = gates_from_policy(section).overridden(**dict(gate_overrides or {}))
    if data is None:
        if "data" not in section:
            raise DataError("no validation data: give a data path (--data) or set validation.data in the policy")
        data = base / section["data"]
    if max_batches is None:
        max_batches = section.get("batches")
    _, header = _model_source(original, "original")  # the graph's I/O without loading the weights
    source = load_batches(data, input_specs(header))
    return validate(original, candidate, source, gates, providers, max_batches=max_batches, top1=top1_specs(section))
