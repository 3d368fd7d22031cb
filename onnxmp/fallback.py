"""Accuracy-guided fallback: keep the quantized nodes that cost the most accuracy in float.

With ``validation.fallback`` in the policy, a quantized model that fails the validation gates is
not the end of ``optimize``. The nodes that ``qdq-insertion`` quantized are ranked by how much
each one alone costs, measured, and the worst are kept float until the gates pass:

1. **Rank.** For each quantized node, the pipeline reruns with that node alone in the pass's
   ``keep_node_names`` (calibration histograms come from memory, so no data is run again), and
   the candidate is validated against the original on the validation data. Its score is how far
   it is from the gates (:func:`gate_score`). Nodes are ranked by the score of their trial,
   best first.
2. **Fall back.** The best-ranked nodes are kept float together, one more per step, until a
   candidate passes or ``max_layers`` nodes are float. The first candidate that passes is the
   result; when none does, the validation error is raised as without the fallback, with the
   steps in the report.

Ranking by measuring each node is what accuracy-driven quantization tuners do (op-wise
fallback): a node's effect on the outputs depends on what follows it, which no local error
measure sees. It costs one pipeline run and one validation per quantized node, paid only when
the gates fail. The validation data then chooses the nodes as well as judging the result: give
enough of it (the report says how many batches were used).

A trial that quantizes nothing (removing one node can make ``cost_model`` keep the whole model
float: INT8 no longer pays) is left out of the ranking, since a float model always passes and
would end the search with no INT8 at all. Reached in the fall-back steps, the same verdict ends
the search with the float model, as the cost model would have decided on that placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:  # onnxmp.validate reads this module's schema
    from onnxmp.validate import ValidationReport

QUANTIZED = ("int8", "fp8")  # the precisions qdq-insertion records for a quantized node


@dataclass(frozen=True)
class FallbackSettings:
    """The policy's ``validation.fallback``: ``true`` or ``{"max_layers": N}``."""

    max_layers: int = 16

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> "FallbackSettings | None":
        """The settings of a validation section, or None when the fallback is off."""
        value = (section or {}).get("fallback", False)
        if value is False:
            return None
        return cls() if value is True else cls(**value)


FALLBACK_SCHEMA: dict[str, Any] = {
    "description": (
        "when the quantized model fails the gates: keep the quantized nodes that cost the most accuracy "
        "(each measured alone) in float, one more at a time, until the gates pass; true for the defaults"
    ),
    "oneOf": [
        {"type": "boolean"},
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_layers": {
                    "type": "integer",
                    "minimum": 1,
                    "default": FallbackSettings.max_layers,
                    "description": "most quantized nodes kept float before giving up",
                }
            },
        },
    ],
}


@dataclass
class Attempt:
    """One run of the pipeline with ``kept`` nodes float, and its validation."""

    kept: tuple[str, ...]
    validation: "ValidationReport"
    quantized: list[str]  # the nodes qdq-insertion quantized in it
    result: Any = None  # what the caller needs to finish with this attempt (model, context, records)
    score: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.score = gate_score(self.validation)


def quantized_nodes(decisions: list[Mapping[str, Any]]) -> list[str]:
    """Names of the nodes that qdq-insertion quantized, in graph order."""
    return [
        d["node"]
        for d in decisions
        if d.get("pass") == "qdq-insertion" and d.get("rule") == "quantized" and d.get("precision") in QUANTIZED
    ]


def gate_score(report: "ValidationReport") -> tuple[float, float]:
    """(worst, total) of each gated metric's error as a fraction of what its gate allows.

    The error of a metric is rel. L2 or max abs error, 1 - cosine similarity or 1 - top-1
    agreement; its gate allows up to the gate's value of it. A report passes when the worst
    fraction is at most 1. NaN/Inf or a changed shape count as infinite.
    """
    fractions = []
    for name, m in report.outputs.items():
        if m.note:
            continue
        if m.nonfinite_count or m.shape_mismatch:
            return math.inf, math.inf
        g = report.gates.for_output(name)
        pairs = [
            (m.max_abs_error, g.max_abs_error),
            (m.rel_l2_error, g.max_rel_l2_error),
            (1.0 - m.cosine_similarity, None if g.min_cosine_similarity is None else 1.0 - g.min_cosine_similarity),
        ]
        if m.top1_agreement is not None and g.min_top1_agreement is not None:
            pairs.append((1.0 - m.top1_agreement, 1.0 - g.min_top1_agreement))
        for error, allowed in pairs:
            if allowed is not None:
                fractions.append(_fraction(error, allowed))
    return (max(fractions, default=0.0), sum(fractions))


def _fraction(error: float, allowed: float) -> float:
    if allowed > 0:
        return error / allowed
    return 0.0 if error <= 0 else math.inf


def accuracy_fallback(
    first: Attempt,
    attempt: Callable[[tuple[str, ...]], Attempt],
    settings: FallbackSettings,
    progress: bool = False,
) -> tuple[Attempt, dict[str, Any]]:
    """The first attempt that passes (or the last one tried) and the report of the search.

    ``first`` is the failed attempt; ``attempt(kept)`` reruns the pipeline with ``kept`` float.
    ``progress``: a progress bar while ranking and a line per step, on stderr.
    """
    say = _printer() if progress else (lambda message: None)
    trials = []
    for node in _track(first.quantized, progress):
        trial = attempt((node,))
        trial.result = None  # only its score is needed: do not hold a model per node
        trials.append((node, trial))
    ranked = sorted((t for t in trials if t[1].quantized), key=lambda t: t[1].score)  # stable: graph order on ties
    report: dict[str, Any] = {
        "max_layers": settings.max_layers,
        "baseline": _summary(first),
        "ranking": [{"node": node, **_summary(trial)} for node, trial in ranked],
        "not_ranked": [node for node, trial in trials if not trial.quantized],  # float alone, INT8 no longer pays
        "steps": [],
        "kept_float": [],
        "passed": False,
    }
    best = first
    for count in range(1, min(settings.max_layers, len(ranked)) + 1):
        kept = tuple(node for node, _ in ranked[:count])
        current = attempt(kept)
        say(f"accuracy fallback: {count} node(s) float: {'passed' if current.validation.passed else 'failed'}")
        report["steps"].append({"kept_float": list(kept), **_summary(current)})
        best = current
        if current.validation.passed:
            break
    report["kept_float"] = list(best.kept)
    report["passed"] = best.validation.passed
    if best.validation.passed and not best.quantized:
        report["note"] = "with these nodes float, INT8 was no longer estimated to pay: the model stays float"
    elif not best.validation.passed:
        report["note"] = (
            f"the accuracy fallback kept {len(best.kept)} of {len(first.quantized)} quantized nodes float "
            f"(validation.fallback.max_layers is {settings.max_layers}) and the gates still fail"
        )
        best.validation.notes.append(report["note"])
    return best, report


def _track(nodes: list[str], show: bool) -> Iterable[str]:
    if not show:
        return nodes
    from rich.console import Console
    from rich.progress import track

    description = "accuracy fallback: each quantized node float in turn"
    return track(nodes, description=description, console=Console(stderr=True), transient=True)


def _printer() -> Callable[[str], None]:
    from rich.console import Console

    return Console(stderr=True).print


def _summary(attempt: Attempt) -> dict[str, Any]:
    worst, total = attempt.score
    return {
        "passed": attempt.validation.passed,
        "worst_gate_fraction": _finite(worst),
        "total_gate_fraction": _finite(total),
        "quantized_nodes": len(attempt.quantized),
    }


def _finite(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else round(value, 6)
