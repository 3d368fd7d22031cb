"""Policies: presets, JSON Schema validation with the path of the bad field, textual pipelines."""

from __future__ import annotations

import json

import jsonschema
import pytest

import onnxmp.policy as policies
from onnxmp.errors import PolicyError
from onnxmp.pass_manager import registered_passes
from onnxmp.policy import (
    DEFAULT_PRESET,
    load_policy,
    passes_from_text,
    policy_schema,
    preset_names,
    preset_text,
)


def test_presets_load_and_default_is_fp32():
    assert "fp32" in preset_names()
    assert load_policy(None).name == DEFAULT_PRESET == "fp32"
    for name in preset_names():
        policy = load_policy(name)
        assert policy.build_passes()
        assert json.loads(preset_text(name)) == policy.data


def test_fp32_preset_runs_only_fp32_preserving_passes():
    assert all(p.preserves_fp32 for p in load_policy("fp32").build_passes())


def test_schema_has_every_pass_and_its_options():
    schema = policy_schema()
    item = schema["properties"]["passes"]["items"]
    assert set(item["properties"]["name"]["enum"]) == set(registered_passes())
    fold = next(rule for rule in item["allOf"] if rule["if"]["properties"]["name"]["const"] == "fold-constants")
    options = fold["then"]["properties"]["options"]["properties"]
    assert options["max_output_elements"]["type"] == "integer"
    assert options["fold_shapes"]["default"] is True


def write(tmp_path, data) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize(
    "data,where,what",
    [
        ({"version": 1, "passes": [{"name": "nope"}]}, "$.passes[0].name", "is not one of"),
        (
            {"version": 1, "passes": [{"name": "cleanup"}, {"name": "fold-constants", "options": {"max_output_elements": "big"}}]},
            "$.passes[1].options.max_output_elements",
            "not of type 'integer'",
        ),
        (
            {"version": 1, "passes": [{"name": "fold-constants", "options": {"bogus": 1}}]},
            "$.passes[0].options",
            "allowed: fold_shapes, max_output_elements",
        ),
        ({"version": 2, "passes": []}, "$.version", "1 was expected"),
        ({"version": 1, "passes": [], "target": "tpu"}, "$.target", "is not one of"),
        ({"version": 1}, "$", "'passes' is a required property"),
        ({"version": 1, "passes": [], "extra": 1}, "$", "allowed:"),
    ],
)
def test_invalid_policies_name_the_field(tmp_path, data, where, what):
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, data))
    message = str(info.value)
    assert f"{where}:" in message and what in message and "policy.json" in message


def policy_variants() -> list:
    """Every preset, and each with one pass option or one top-level field made wrong."""
    variants = []
    for name in preset_names():
        data = json.loads(preset_text(name))
        variants += [data, {**data, "version": 2}, {**data, "target": "tpu"}, {**data, "extra": 1}]
        variants.append({**data, "passes": [*data["passes"], {"name": "nope"}]})
        variants.append({**data, "passes": [*data["passes"], {"name": "cleanup", "extra": 1}]})
        variants.append({**data, "passes": [*data["passes"], {"name": "cleanup", "options": []}]})
        for index, item in enumerate(data["passes"]):
            for option, value in item.get("options", {}).items():
                wrong = {"bogus": 1} if isinstance(value, (list, str, bool, type(None))) else "x"
                changed = {**item, "options": {**item["options"], option: wrong}}
                variants.append({**data, "passes": [*data["passes"][:index], changed, *data["passes"][index + 1 :]]})
            unknown = {**item, "options": {**item.get("options", {}), "bogus": 1}}
            variants.append({**data, "passes": [*data["passes"][:index], unknown, *data["passes"][index + 1 :]]})
    return variants


def test_split_validation_accepts_what_the_whole_schema_accepts():
    whole = jsonschema.Draft202012Validator(policy_schema())
    variants = policy_variants()
    assert sum(whole.is_valid(data) for data in variants) == len(preset_names())
    for data in variants:
        assert policies._is_valid(data) == whole.is_valid(data)


def test_invalid_json_and_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="not valid JSON.*line 1"):
        load_policy(write(tmp_path, "{not json"))
    with pytest.raises(PolicyError, match="neither a preset .*fp32.* nor an existing file"):
        load_policy(str(tmp_path / "missing.json"))


def test_policy_file_round_trip_and_digest(tmp_path):
    policy = load_policy(write(tmp_path, json.loads(preset_text("fp32"))))
    assert policy.data == load_policy("fp32").data
    assert policy.digest == load_policy("fp32").digest
    assert policy.with_target("cuda").target == "cuda"
    with pytest.raises(PolicyError, match="target 'tpu' is unknown"):
        policy.with_target("tpu")


def test_textual_pipeline():
    passes = passes_from_text("cleanup, fold-constants{max_output_elements=64,fold_shapes=false},cast-elimination")
    assert [p.name for p in passes] == ["cleanup", "fold-constants", "cast-elimination"]
    assert passes[1].options.max_output_elements == 64 and passes[1].options.fold_shapes is False
    assert str(passes[1]) == "fold-constants{fold_shapes=false,max_output_elements=64}"


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "pipeline is empty"),
        ("cleanup,unknown-pass", "is not one of"),
        ("fold-constants{max_output_elements=lots}", "max_output_elements"),
        ("fold-constants{max_output_elements=1", "unclosed"),
        ("fold-constants{fold_shapes}", "needs key=value"),
    ],
)
def test_textual_pipeline_errors(text, message):
    with pytest.raises(PolicyError, match=message):
        passes_from_text(text)
