"""Policies: versioned JSON that says which passes run with which options, for which target.

The JSON Schema is generated from the registered passes' option dataclasses, so a pass's options
have one source of truth. Built-in presets ship in ``onnxmp/presets`` and are named instead of a
path (``--policy fp32``). Textual pipelines (``"cleanup,fold-constants{max_output_elements=64}"``)
are checked against the same schema.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from onnxmp.errors import PolicyError
from onnxmp.pass_manager import TARGETS, Pass, Pipeline, registered_passes
from onnxmp.validate import VALIDATION_SCHEMA

POLICY_VERSION = 1
CALIBRATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "data for range statistics (the precision pass's range rules, INT8 scales)",
    "properties": {
        "data": {"type": "string", "description": "folder of .npz/.npy batches or one .npz, relative to the policy file"},
        "cache_dir": {"type": ["string", "null"], "description": "statistics cache folder (null: no cache)"},
    },
}
DEFAULT_PRESET = "fp32"
PRESET_DIR = Path(__file__).resolve().parent / "presets"


# ---------------------------------------------------------------- the schema
def options_schema(options_cls: type) -> dict[str, Any]:
    """JSON Schema of a pass's options dataclass."""
    hints = typing.get_type_hints(options_cls)
    properties = {}
    for item in dataclasses.fields(options_cls):
        schema = _type_schema(hints[item.name])
        if item.metadata.get("help"):
            schema["description"] = item.metadata["help"]
        default = _field_default(item)
        if default is not dataclasses.MISSING:
            schema["default"] = default
        if "minimum" in item.metadata:
            schema["minimum"] = item.metadata["minimum"]
        properties[item.name] = schema
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _field_default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return item.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _type_schema(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0])}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) if a is not type(None) else {"type": "null"} for a in args]}
    raise TypeError(f"option type {hint!r} has no JSON Schema mapping")


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of a policy, with every registered pass and its options."""
    return _schema_of(registered_passes())


def _schema_of(passes: dict[str, type[Pass]]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "onnxmp policy",
        "type": "object",
        "required": ["version", "passes"],
        "additionalProperties": False,
        "properties": {
            "version": {"const": POLICY_VERSION, "description": "policy format version"},
            "description": {"type": "string"},
            "target": {"enum": list(TARGETS), "default": "cpu"},
            "passes": {"type": "array", "items": _pass_item_schema(passes)},
            "calibration": CALIBRATION_SCHEMA,
            "validation": VALIDATION_SCHEMA,
        },
    }


def _pass_item_schema(passes: dict[str, type[Pass]]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {"name": {"enum": list(passes)}, "options": {"type": "object"}},
        "allOf": [
            {
                "if": {"properties": {"name": {"const": name}}, "required": ["name"]},
                "then": {"properties": {"options": options_schema(cls.Options)}},
            }
            for name, cls in passes.items()
        ],
    }


def compile_patterns(texts: list[str], option: str) -> list[re.Pattern]:
    """Regular expressions of a pass option; PolicyError naming the option for an invalid one."""
    compiled = []
    for text in texts:
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise PolicyError(f"{option}: '{text}' is not a valid regular expression ({exc})") from exc
    return compiled


def validate_policy_data(data: Any, source: str) -> None:
    """Raise PolicyError naming the JSON path of the first bad field and what is allowed.

    A valid policy is let through by :func:`_is_valid`; only an invalid one goes through the
    whole schema, whose ``best_match`` names the field.
    """
    if _is_valid(data):
        return
    validator = jsonschema.Draft202012Validator(policy_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise PolicyError(f"policy {source}: {error.json_path}: {_explain(error)}")


def _is_valid(data: Any) -> bool:
    """Whether ``data`` satisfies the policy schema, checked in two parts (:func:`_split_validators`)."""
    outline, options = _split_validators(tuple(registered_passes().items()))
    return outline.is_valid(data) and all(options[p["name"]].is_valid(p["options"]) for p in data["passes"] if "options" in p)


@functools.lru_cache(maxsize=4)
def _split_validators(passes: tuple[tuple[str, type[Pass]], ...]) -> tuple[Any, dict[str, Any]]:
    """The policy schema split in two: without its per-pass option rules, and each pass's rules.

    A policy is valid when the first accepts it and each pass item's options satisfy the rules
    of its pass. The whole schema would try every pass's rule (an if/then) on every pass item:
    some 4 ms per policy, and the CLI and API check two or three policies per run.
    """
    schema = _schema_of(dict(passes))
    rules = schema["properties"]["passes"]["items"].pop("allOf")
    options = {
        rule["if"]["properties"]["name"]["const"]: jsonschema.Draft202012Validator(rule["then"]["properties"]["options"])
        for rule in rules
    }
    return jsonschema.Draft202012Validator(schema), options


def _explain(error: jsonschema.ValidationError) -> str:
    message = error.message
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        message += f"; allowed: {', '.join(allowed) if allowed else 'none'}"
    elif error.validator == "type":
        message += f" (expected {error.validator_value})"
    return message


# ---------------------------------------------------------------- policies
@dataclass
class Policy:
    """A validated policy and where it came from (a preset name or a file)."""

    name: str
    data: dict[str, Any]
    folder: Path | None = None  # where the policy file is: relative data paths start there

    @property
    def target(self) -> str:
        return self.data.get("target", "cpu")

    @property
    def description(self) -> str:
        return self.data.get("description", "")

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_target(self, target: str | None) -> "Policy":
        if target is None or target == self.target:
            return self
        if target not in TARGETS:
            raise PolicyError(f"target '{target}' is unknown; choose one of {', '.join(TARGETS)}")
        return Policy(self.name, {**self.data, "target": target}, self.folder)

    def section_path(self, section: str) -> Path | None:
        """The ``data`` path of a policy section, resolved against the policy file's folder."""
        value = self.data.get(section, {}).get("data")
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() or self.folder is None else self.folder / path

    def build_passes(self) -> list[Pass]:
        return _instantiate_all(self.data["passes"], f"policy '{self.name}'")

    def pipeline(self, **kwargs: Any) -> Pipeline:
        return Pipeline(self.build_passes(), **kwargs)


def _instantiate_all(specs: list[dict[str, Any]], source: str) -> list[Pass]:
    """Passes for ``specs``; an option a pass rejects is reported at its JSON path."""
    passes = []
    for index, spec in enumerate(specs):
        try:
            passes.append(_instantiate(spec))
        except PolicyError as exc:
            raise PolicyError(f"{source}: $.passes[{index}].options.{exc}") from exc
    return passes


def _instantiate(spec: dict[str, Any]) -> Pass:
    cls = registered_passes()[spec["name"]]
    return cls(cls.Options(**spec.get("options", {})))


def load_policy(spec: str | Path | dict | Policy | None = None) -> Policy:
    """A policy from a preset name, a JSON file, a dict, or the default preset for None."""
    if isinstance(spec, Policy):
        return spec
    if spec is None:
        spec = DEFAULT_PRESET
    if isinstance(spec, dict):
        validate_policy_data(spec, "(given as a dict)")
        return Policy("custom", spec)
    text = str(spec)
    if text in preset_names():
        return _load_file(PRESET_DIR / f"{text}.json", name=text)
    path = Path(text)
    if not path.is_file():
        raise PolicyError(
            f"policy '{text}' is neither a preset ({', '.join(preset_names())}) nor an existing file"
        )
    return _load_file(path, name=str(path))


def _load_file(path: Path, name: str) -> Policy:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PolicyError(
            f"policy '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy '{path}' is not UTF-8 text (is it a JSON policy file?): {exc.reason}") from exc
    except OSError as exc:
        raise PolicyError(f"policy '{path}' cannot be read: {exc.strerror}") from exc
    validate_policy_data(data, f"'{path}'")
    return Policy(name, data, None if path.parent == PRESET_DIR else path.resolve().parent)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise PolicyError(f"no preset named '{name}'; presets: {', '.join(preset_names())}")
    return (PRESET_DIR / f"{name}.json").read_text(encoding="utf-8")


# ---------------------------------------------------------------- textual pipelines
def passes_from_text(text: str) -> list[Pass]:
    """Parse ``"a,b{key=value,key2=[x,y]}"`` into passes, validated like a policy."""
    specs = [_parse_pass(item) for item in _split_top(text, ",") if item.strip()]
    if not specs:
        raise PolicyError("the pass pipeline is empty; name at least one pass (see `onnxmp passes`)")
    data = {"version": POLICY_VERSION, "passes": specs}
    validate_policy_data(data, f"pipeline '{text}'")
    return _instantiate_all(specs, f"pipeline '{text}'")


def _parse_pass(item: str) -> dict[str, Any]:
    item = item.strip()
    if "{" not in item:
        return {"name": item}
    if not item.endswith("}"):
        raise PolicyError(f"pipeline item '{item}' has an unclosed '{{'; write name{{key=value,...}}")
    name, body = item[:-1].split("{", 1)
    options = {}
    for pair in _split_top(body, ","):
        if not pair.strip():
            continue
        if "=" not in pair:
            raise PolicyError(f"pipeline option '{pair.strip()}' of '{name.strip()}' needs key=value")
        key, value = pair.split("=", 1)
        options[key.strip()] = _parse_value(value.strip())
    return {"name": name.strip(), "options": options}


def _parse_value(text: str) -> Any:
    if text.startswith("[") and text.endswith("]"):
        return [_parse_value(v.strip()) for v in _split_top(text[1:-1], ",") if v.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside braces and brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts
