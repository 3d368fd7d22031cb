"""Passes, their registry, and the pipeline that runs them with instrumentation.

A pass changes the model in place and says whether it changed anything. The pipeline, not the
pass, does timing, node counting, verification (onnx.checker full check plus an onnxruntime load)
and text dumps after chosen passes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from onnxmp.errors import OnnxmpError, PassError, VerificationError
from onnxmp.ir import TWO_GB, Model, NameGenerator, save_proto, weight_bytes
from onnxmp.runtime import as_written_options

TARGETS = ("cpu", "cuda", "tensorrt")


@dataclass
class NoOptions:
    """A pass that takes no options."""


@dataclass
class PassContext:
    """What passes share during one pipeline run: the target, fresh names, and decisions."""

    target: str = "cpu"
    decisions: list[dict[str, Any]] = field(default_factory=list)
    calibration: Any = None
    names: NameGenerator | None = None

    def fresh_name(self, base: str) -> str:
        assert self.names is not None, "the pipeline sets names before running a pass"
        return self.names.fresh(base)

    def record(self, **decision: Any) -> None:
        """Note a per-node decision (what, why) for the report."""
        self.decisions.append(decision)


class Pass(abc.ABC):
    """Base of every pass. Subclasses set ``name``, ``preserves_fp32``, ``Options`` and ``run``."""

    name: ClassVar[str] = ""
    preserves_fp32: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def description(cls) -> str:
        """The first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @abc.abstractmethod
    def run(self, model: Model, ctx: PassContext) -> bool:
        """Transform ``model`` in place; return True if anything changed."""

    def __str__(self) -> str:
        values = dataclasses.asdict(self.options)
        defaults = dataclasses.asdict(self.Options())
        changed = {k: v for k, v in values.items() if v != defaults.get(k)}
        if not changed:
            return self.name
        text = ",".join(f"{k}={_format_option(v)}" for k, v in sorted(changed.items()))
        return f"{self.name}{{{text}}}"


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_option(v) for v in value) + "]"
    return str(value)


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name to policies and pipelines."""
    if not cls.name:
        raise PassError(f"pass class {cls.__name__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise PassError(f"two passes are named '{cls.name}': {existing.__name__} and {cls.__name__}")
    if not dataclasses.is_dataclass(cls.Options):
        raise PassError(f"pass '{cls.name}': Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, the built-in ones loaded first."""
    importlib.import_module("onnxmp.passes")
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise PassError(f"unknown pass '{name}'; known passes: {', '.join(passes)}")
    return passes[name]


@dataclass
class PassRecord:
    """What one pass did: for the report and the summary table."""

    name: str
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    verified: bool = False


Verifier = Callable[[Model], None]


class Pipeline:
    """An ordered list of passes plus how to instrument them."""

    def __init__(
        self,
        passes: list[Pass],
        *,
        verify_each: bool = False,
        dump_after: tuple[str, ...] | list[str] = (),
        dump_dir: str | Path | None = None,
        verifier: Verifier | None = None,
        on_pass: Callable[[PassRecord], None] | None = None,
    ):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.dump_after = set(dump_after)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.verifier = verifier
        self.on_pass = on_pass
        unknown = self.dump_after - {p.name for p in self.passes}
        if unknown:
            raise PassError(
                f"--dump-after names {sorted(unknown)}, which the pipeline does not run; "
                f"it runs: {', '.join(p.name for p in self.passes)}"
            )
        if self.dump_after and self.dump_dir is None:
            raise PassError("dumping after passes needs a dump folder")

    @classmethod
    def from_text(cls, text: str, **kwargs: Any) -> "Pipeline":
        """Build from the textual form ``"cleanup,precision{dtype=fp16,keep_io_types=true}"``."""
        from onnxmp.policy import passes_from_text

        return cls(passes_from_text(text), **kwargs)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def run(self, model: Model, ctx: PassContext | None = None) -> list[PassRecord]:
        """Run every pass in order on ``model``; returns one record per pass."""
        ctx = ctx or PassContext()
        verify = self.verifier or verify_model
        if self.verify_each:
            _check_precondition(model, verify)
        records = []
        model.shapes_current = False  # edits made before this run are unknown to it
        after = model.node_count()
        for index, pass_ in enumerate(self.passes):
            ctx.names = NameGenerator(model.graph)
            before = after
            start = time.perf_counter()
            try:
                changed = bool(pass_.run(model, ctx))
                if changed:
                    model.shapes_current = False
            except OnnxmpError:  # already says what is wrong (bad data, a failed check, ...)
                raise
            except Exception as exc:
                raise PassError(
                    f"pass '{pass_.name}' failed: {type(exc).__name__}: {exc}. "
                    "This is a bug in onnxmp; rerun without this pass (--passes) to get a model"
                ) from exc
            after = model.node_count() if changed else before
            record = PassRecord(pass_.name, changed, time.perf_counter() - start, before, after)
            if self.verify_each:
                _verify_after(pass_.name, model, verify)
                record.verified = True
            if pass_.name in self.dump_after:
                self._dump(index, pass_.name, model)
            records.append(record)
            if self.on_pass:
                self.on_pass(record)
        return records

    def _dump(self, index: int, name: str, model: Model) -> None:
        from onnxmp.dump import dump_model

        assert self.dump_dir is not None
        try:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{index:02d}-{name}.txt").write_text(dump_model(model), encoding="utf-8")
        except OSError as exc:
            raise PassError(
                f"cannot write the dump after '{name}' into '{self.dump_dir}': {exc.strerror or exc}; "
                "choose another --dump-dir"
            ) from exc


def _check_precondition(model: Model, verify: Verifier) -> None:
    try:
        verify(model)
    except VerificationError as exc:
        raise VerificationError(f"the input model is already invalid before any pass: {exc}") from exc


def _verify_after(name: str, model: Model, verify: Verifier) -> None:
    try:
        verify(model)
    except VerificationError as exc:
        raise VerificationError(
            f"pass '{name}' left an invalid model: {exc}. This is a bug in onnxmp; "
            f"rerun with --dump-after {name} to see the graph"
        ) from exc


def verify_model(model: Model) -> None:
    """Full onnx.checker check and an onnxruntime CPU session load; raises VerificationError."""
    proto = model.to_proto()
    if weight_bytes(model.graph) < TWO_GB:
        _verify(proto, proto.SerializeToString())
        return
    with tempfile.TemporaryDirectory(prefix="onnxmp-verify-") as folder:
        path = str(Path(folder) / "model.onnx")
        save_proto(proto, path, external_data=True)
        _verify(path, path)


def _verify(checkable: Any, loadable: Any) -> None:
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(checkable, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"onnx.checker: {str(exc).strip().splitlines()[0]}") from exc
    try:
        ort.InferenceSession(loadable, as_written_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime refuses to load it: {str(exc).strip()[:500]}") from exc
