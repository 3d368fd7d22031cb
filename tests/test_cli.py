"""The ``onnxmp`` command: optimize, inspect, passes, policies; one-line errors that leave nothing
behind; byte-identical outputs across processes; provenance in the output model.

Most runs go through click's CliRunner (in process, fast); a few go through real processes
(``python -m onnxmp.cli`` and the ``onnxmp`` console script) so that the entry points, exit codes and
hash randomisation are those a user gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import onnxmp
from conftest import MODELS
from helpers import assert_same_outputs, session
from onnxmp.api import op_histogram
from onnxmp.cli import main
from onnxmp.dump import dump_model
from onnxmp.ir import Model
from onnxmp.pass_manager import registered_passes
from onnxmp.policy import load_policy, preset_names

REPO = Path(__file__).resolve().parents[1]
CNN = MODELS / "cnn_bn_residual.onnx"
IF_MODEL = MODELS / "if_model.onnx"
EXTERNAL = MODELS / "external_data.onnx"
FP32_PIPELINE = str(load_policy("fp32").pipeline())
DETERMINISM_MODELS = ("cnn_bn_residual", "transformer_block_static", "if_model", "external_data")


# ---------------------------------------------------------------- helpers
@pytest.fixture
def runner() -> CliRunner:
    # Wide enough that rich never shortens a pass name or a path in a table.
    return CliRunner(env={"COLUMNS": "250"})


def invoke(runner: CliRunner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones included) with its content hash ('dir' for folders)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() and not p.is_symlink() else digest(p) if p.is_file() else "link"
        for p in sorted(folder.rglob("*"))
    }


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def expect_failure(runner, args, *, says, watch=(), inputs=()):
    """The command fails with one 'error:' line containing ``says`` and changes nothing on disk."""
    before = {Path(f): listing(f) for f in watch}
    hashes = {Path(p): digest(p) for p in inputs}
    result = invoke(runner, *args)
    assert result.exit_code == 1, (result.exit_code, result.output)
    line = one_error_line(result.stderr)
    for fragment in [says] if isinstance(says, str) else says:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert result.stdout == ""
    for folder, entries in before.items():
        assert listing(folder) == entries, f"{folder} changed: {listing(folder)} != {entries}"
    for path, value in hashes.items():
        assert digest(path) == value, f"input {path} was modified"
    return line


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def header(path: Path) -> tuple[int, list[tuple[str, int]]]:
    proto = onnx.load(str(path), load_external_data=False)
    return proto.ir_version, sorted((o.domain, o.version) for o in proto.opset_import)


def run_python(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "250", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- optimize: the happy paths
def test_optimize_writes_model_and_report(runner, tmp_path):
    out = tmp_path / "cnn.onnx"
    before = digest(CNN)
    result = invoke(runner, "optimize", CNN, out, "--verify-each")
    assert result.exit_code == 0, result.output
    assert digest(CNN) == before
    # Exactly the model and its report: no temporary files, no data file for a small model.
    assert sorted(listing(tmp_path)) == ["cnn.onnx", "cnn.report.json"]

    report = json.loads((tmp_path / "cnn.report.json").read_text())
    assert report["pipeline"] == FP32_PIPELINE
    assert report["policy"] == {"name": "fp32", "id": "fp32", "target": "cpu"}
    assert report["input"] == str(CNN) and report["output"] == str(out)
    assert [r["name"] for r in report["passes"]] == FP32_PIPELINE.split(",")
    assert all(r["verified"] for r in report["passes"])
    assert any(r["name"] == "fold-batchnorm" and r["changed"] for r in report["passes"])
    assert report["nodes"]["after"] < report["nodes"]["before"]
    assert report["ops_after"] == op_histogram(Model.load(out))
    assert "BatchNormalization" in report["ops_before"] and "BatchNormalization" not in report["ops_after"]
    assert "wrote" in result.stderr  # the summary table and the last line go to stderr

    # Provenance, and the input's IR version and opsets (not onnx's newest IR, which ort refuses).
    meta = metadata(out)
    assert meta["onnxmp.version"] == onnxmp.__version__
    assert meta["onnxmp.policy"] == "fp32"
    assert meta["onnxmp.pipeline"] == FP32_PIPELINE
    assert header(out) == header(CNN) == (10, [("", 17)])
    assert_same_outputs(str(CNN), str(out), rtol=1e-4)


@pytest.mark.parametrize("target", ["cuda", "tensorrt", "cpu"])
def test_target_overrides_the_policy(runner, tmp_path, target):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({**load_policy("fp32").data, "target": "cuda" if target == "cpu" else "cpu"}))
    out = tmp_path / "m.onnx"
    result = invoke(runner, "optimize", IF_MODEL, out, "--policy", policy, "--target", target, "-q")
    assert result.exit_code == 0, result.output
    assert result.output == ""  # -q: nothing but errors
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["policy"]["target"] == target


def test_dump_after_writes_text_dumps(runner, tmp_path):
    out = tmp_path / "cnn.onnx"
    args = ["--dump-after", "fold-constants", "--dump-after", "fold-batchnorm", "-q"]
    result = invoke(runner, "optimize", CNN, out, *args)
    assert result.exit_code == 0, result.output
    dumps = tmp_path / "cnn.onnx.dump"
    names = FP32_PIPELINE.split(",")
    expected = [f"{i:02d}-{n}.txt" for i, n in enumerate(names) if n in ("fold-constants", "fold-batchnorm")]
    assert sorted(p.name for p in dumps.iterdir()) == expected
    for path in dumps.iterdir():
        text = path.read_text()
        assert text.startswith("model ir=10 opset ai.onnx=17\ngraph main\n")
    # After fold-batchnorm there is no BatchNormalization left; before it (first fold) there is.
    assert ": BatchNormalization(" in (dumps / expected[0]).read_text()
    assert ": BatchNormalization(" not in (dumps / expected[1]).read_text()
    # The last dump is the final model (the passes after it change nothing on this fixture).
    assert (dumps / expected[-1]).read_text() == dump_model(Model.load(out))


def test_textual_pipeline(runner, tmp_path):
    text = "cleanup,fold-constants{max_output_elements=10}"
    out = tmp_path / "m.onnx"
    source = MODELS / "constant_subgraph.onnx"
    result = invoke(runner, "optimize", source, out, "--passes", text, "--verify-each", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["pipeline"] == text
    assert [r["name"] for r in report["passes"]] == ["cleanup", "fold-constants"]
    assert metadata(out)["onnxmp.pipeline"] == text
    assert_same_outputs(str(source), str(out), skip=("noisy",))  # noisy: RandomNormal, differs run to run


def test_report_path_option(runner, tmp_path):
    report = tmp_path / "reports" / "r.json"
    report.parent.mkdir()
    result = invoke(runner, "optimize", IF_MODEL, tmp_path / "m.onnx", "--report", report, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["pipeline"] == FP32_PIPELINE
    assert sorted(listing(tmp_path)) == ["m.onnx", "reports", "reports/r.json"]


def test_external_data_through_python_m(tmp_path):
    """A real process: `python -m onnxmp.cli`; the output gets its own OUT.data file and loads."""
    data = EXTERNAL.with_name(EXTERNAL.name + ".data")
    hashes = (digest(EXTERNAL), digest(data))
    out = tmp_path / "ext.onnx"
    proc = run_python("-m", "onnxmp.cli", "optimize", str(EXTERNAL), str(out), "--verify-each", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (digest(EXTERNAL), digest(data)) == hashes
    assert sorted(listing(tmp_path)) == ["ext.onnx", "ext.onnx.data", "ext.report.json"]
    proto = onnx.load(str(out), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"ext.onnx.data"}  # its own file, not the input's
    assert header(out) == header(EXTERNAL)
    session(str(out))  # onnxruntime loads it (IR version it accepts, data found beside it)
    assert_same_outputs(str(EXTERNAL), str(out))
    # Moving the output away from the input's folder still works: it needs nothing of the input.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(out), moved / out.name)
    shutil.move(str(tmp_path / "ext.onnx.data"), moved / "ext.onnx.data")
    assert_same_outputs(str(EXTERNAL), str(moved / out.name))


# ---------------------------------------------------------------- inspect, passes, policies
def test_inspect_summary_and_histograms(runner):
    result = invoke(runner, "inspect", CNN)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for fragment in ("IR version", "ai.onnx=17", "x: float32[N,3,32,32]", "logits: float32[N,10]", "float32"):
        assert fragment in text, fragment
    assert re.search(r"external data\s*│\s*no", text)
    for op, count in op_histogram(Model.load(CNN)).items():
        assert re.search(rf"│ {op}\s+│\s+{count} │", text), (op, count)
    assert "dtype" in text


def test_inspect_external_data_and_metadata(runner, tmp_path):
    out = tmp_path / "ext.onnx"
    assert invoke(runner, "optimize", EXTERNAL, out, "-q").exit_code == 0
    text = invoke(runner, "inspect", out).stdout
    assert re.search(r"external data\s*│\s*yes", text)
    assert re.search(r"meta onnxmp.policy\s*│\s*fp32", text)


def test_inspect_dump_is_the_canonical_text(runner):
    result = invoke(runner, "inspect", "--dump", IF_MODEL)
    assert result.exit_code == 0
    assert result.stdout == dump_model(Model.load(IF_MODEL))
    assert "graph then_branch" in result.stdout and "graph else_branch" in result.stdout


def test_inspect_bad_input_is_one_line(runner, tmp_path):
    expect_failure(runner, ["inspect", tmp_path / "nothing.onnx"], says="does not exist")
    (tmp_path / "notes.onnx").write_text("not a model\n")
    expect_failure(runner, ["inspect", "--dump", tmp_path / "notes.onnx"], says="not a valid ONNX file")


def test_passes_lists_every_pass_with_options(runner):
    result = invoke(runner, "passes")
    assert result.exit_code == 0
    text = result.stdout
    passes = registered_passes()
    assert len(passes) >= 6
    for name, cls in passes.items():
        assert re.search(rf"│ {re.escape(name)}\s", text), name
        for item in dataclasses.fields(cls.Options):
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            assert f"{item.name}: " in text and repr(default) in text, (name, item.name)
    assert "max_output_elements: int = 1048576" in text


def test_policies_lists_presets_with_the_default_marked(runner):
    result = invoke(runner, "policies")
    assert result.exit_code == 0
    assert "fp32 (default)" in result.stdout
    for name in preset_names():
        assert name in result.stdout
        assert load_policy(name).description[:30] in result.stdout


def test_policies_show_prints_a_usable_policy_file(runner, tmp_path):
    result = invoke(runner, "policies", "show", "fp32")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data == load_policy("fp32").data
    policy = tmp_path / "mine.json"
    policy.write_text(result.stdout)
    out = tmp_path / "m.onnx"
    assert invoke(runner, "optimize", IF_MODEL, out, "--policy", policy, "-q").exit_code == 0
    meta = metadata(out)
    assert meta["onnxmp.policy"] == f"sha256:{load_policy(policy).digest}"
    assert re.fullmatch(r"sha256:[0-9a-f]{16,64}", meta["onnxmp.policy"])
    assert meta["onnxmp.pipeline"] == FP32_PIPELINE
    # The preset by name is recorded by name.
    out2 = tmp_path / "m2.onnx"
    assert invoke(runner, "optimize", IF_MODEL, out2, "--policy", "fp32", "-q").exit_code == 0
    assert metadata(out2)["onnxmp.policy"] == "fp32"
    expect_failure(runner, ["policies", "show", "nope"], says=["nope", "fp32"])


# ---------------------------------------------------------------- bad input models
def _truncated(fraction: float):
    def make(folder: Path) -> Path:
        data = CNN.read_bytes()
        path = folder / "cut.onnx"
        path.write_bytes(data[: max(1, int(len(data) * fraction))])
        return path

    return make


def _write(name: str, content: bytes):
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path

    return make


def _missing(folder: Path) -> Path:
    return folder / "missing.onnx"


def _folder(folder: Path) -> Path:
    (folder / "model.onnx").mkdir()
    return folder / "model.onnx"


def _missing_data(folder: Path) -> Path:
    shutil.copy(EXTERNAL, folder / EXTERNAL.name)  # without its .data file
    return folder / EXTERNAL.name


def _short_data(folder: Path) -> Path:
    shutil.copy(EXTERNAL, folder / EXTERNAL.name)
    data = EXTERNAL.with_name(EXTERNAL.name + ".data").read_bytes()
    (folder / (EXTERNAL.name + ".data")).write_bytes(data[: len(data) // 3])
    return folder / EXTERNAL.name


BAD_INPUTS = {
    "missing": (_missing, "does not exist"),
    "empty": (_write("empty.onnx", b""), "empty"),
    "folder": (_folder, "is a folder"),
    "truncated-1pct": (_truncated(0.01), "truncated"),
    "truncated-half": (_truncated(0.5), "truncated"),
    "truncated-99pct": (_truncated(0.99), "truncated"),
    "truncated-last-byte": (_truncated(1 - 1e-9), "not a valid ONNX file"),
    "text": (_write("notes.onnx", b"this is a text file, not a model\n"), "not a valid ONNX file"),
    "json": (_write("model.onnx", b'{"graph": {"node": []}}\n'), "not a valid ONNX file"),
    "png": (_write("image.onnx", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"), "not a valid ONNX file"),
    "random": (_write("random.onnx", random.Random(7).randbytes(4096)), "not a valid ONNX file"),
    "missing-external-data": (_missing_data, "external data"),
    "short-external-data": (_short_data, "external data"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(runner, tmp_path, case):
    make, says = BAD_INPUTS[case]
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    source = make(inputs)
    files = [p for p in inputs.iterdir() if p.is_file()]
    line = expect_failure(
        runner,
        ["optimize", source, outputs / "m.onnx", "--verify-each", "--dump-after", "cleanup"],
        says=says,
        watch=[inputs, outputs],
        inputs=files,
    )
    assert str(source) in line  # names the file
    assert listing(outputs) == {}


# ---------------------------------------------------------------- bad policies
GOOD = {"name": "cleanup"}
BAD_POLICIES = {
    "wrong-type": (
        {"version": 1, "passes": [GOOD, {"name": "fold-constants", "options": {"max_output_elements": "ten"}}]},
        ["$.passes[1].options.max_output_elements", "integer"],
    ),
    "wrong-type-bool": (
        {"version": 1, "passes": [{"name": "fold-constants", "options": {"fold_shapes": "yes"}}]},
        ["$.passes[0].options.fold_shapes", "boolean"],
    ),
    "below-minimum": (
        {"version": 1, "passes": [{"name": "fold-constants", "options": {"max_output_elements": -1}}]},
        ["$.passes[0].options.max_output_elements", "minimum of 0"],
    ),
    "unknown-pass": (
        {"version": 1, "passes": [GOOD, {"name": "fold-everything"}]},
        ["$.passes[1].name", "fold-everything", "fold-constants", "cleanup"],
    ),
    "unknown-option": (
        {"version": 1, "passes": [GOOD, {"name": "fold-constants", "options": {"max_elements": 3}}]},
        ["$.passes[1].options", "max_elements", "allowed: fold_shapes, max_output_elements"],
    ),
    "option-for-optionless-pass": (
        {"version": 1, "passes": [{"name": "cleanup", "options": {"deep": True}}]},
        ["$.passes[0].options", "deep", "allowed: none"],
    ),
    "version-2": ({"version": 2, "passes": [GOOD]}, ["$.version", "1"]),
    "unknown-target": ({"version": 1, "target": "gpu", "passes": [GOOD]}, ["$.target", "cpu", "cuda", "tensorrt"]),
    "unknown-key": (
        {"version": 1, "passes": [GOOD], "passses": []},
        ["$: ", "passses", "allowed: calibration, description, passes, target, validation, version"],
    ),
    "missing-passes": ({"version": 1}, ["$: ", "'passes' is a required property"]),
    "passes-not-a-list": ({"version": 1, "passes": {"name": "cleanup"}}, ["$.passes", "array"]),
    "pass-without-name": ({"version": 1, "passes": [{"options": {}}]}, ["$.passes[0]: ", "'name' is a required"]),
    "not-an-object": ([GOOD], ["$: ", "object"]),
    "invalid-json": ('{"version": 1, "passes": [', ["not valid JSON", "line 1"]),
    "binary": (b"\xff\xfe\x00\x01garbage", ["not UTF-8"]),
    "missing-file": (None, ["neither a preset", "fp32", "existing file"]),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_bad_policy_fails_cleanly(runner, tmp_path, case):
    content, says = BAD_POLICIES[case]
    policy = tmp_path / "policy.json"
    if isinstance(content, bytes):
        policy.write_bytes(content)
    elif isinstance(content, str):
        policy.write_text(content)
    elif content is not None:
        policy.write_text(json.dumps(content))
    outputs = tmp_path / "out"
    outputs.mkdir()
    line = expect_failure(
        runner,
        ["optimize", IF_MODEL, outputs / "m.onnx", "--policy", policy],
        says=[f"policy '{policy}'", *says],
        watch=[outputs],
        inputs=[IF_MODEL],
    )
    assert listing(outputs) == {}, line


BAD_PIPELINES = {
    "wrong-type": (
        "cleanup,fold-constants{max_output_elements=ten}",
        ["$.passes[1].options.max_output_elements", "integer"],
    ),
    "unknown-option": (
        "fold-constants{bogus=1}",
        ["$.passes[0].options", "bogus", "allowed: fold_shapes, max_output_elements"],
    ),
    "unknown-pass": ("cleanup,nope", ["$.passes[1].name", "nope", "fold-constants"]),
    "unclosed-brace": ("fold-constants{max_output_elements=10", ["unclosed", "name{key=value"]),
    "no-value": ("fold-constants{max_output_elements}", ["max_output_elements", "key=value"]),
    "empty-items": (",,", ["empty", "onnxmp passes"]),
}


@pytest.mark.parametrize("case", list(BAD_PIPELINES))
def test_bad_textual_pipeline_fails_cleanly(runner, tmp_path, case):
    text, says = BAD_PIPELINES[case]
    expect_failure(runner, ["optimize", IF_MODEL, tmp_path / "m.onnx", "--passes", text], says=says, watch=[tmp_path])


def test_dump_after_a_pass_that_does_not_run(runner, tmp_path):
    expect_failure(
        runner,
        ["optimize", IF_MODEL, tmp_path / "m.onnx", "--dump-after", "fold-everything"],
        says=["fold-everything", "fold-constants"],
        watch=[tmp_path],
    )


# ---------------------------------------------------------------- bad output paths
@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp/in/m.onnx (a copy of a fixture) with relative paths from tmp; returns tmp."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "sub").mkdir()
    shutil.copy(IF_MODEL, tmp_path / "in" / "m.onnx")
    (tmp_path / "afile").write_text("a regular file\n")
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


BAD_OUTPUTS = {
    "folder-missing": ("nodir/o.onnx", "does not exist"),
    "folder-is-a-file": ("afile/o.onnx", "is a file, not a folder"),
    "output-is-a-folder": ("adir", "is a folder"),
    "output-is-a-folder-slash": ("adir/", "is a folder"),
    "same-as-input": ("in/m.onnx", "is the input model"),
    "same-via-dotdot": ("./in/sub/../m.onnx", "is the input model"),
    "same-via-dotdot-2": ("./in/../in/m.onnx", "is the input model"),
    "same-absolute": ("{tmp}/in/m.onnx", "is the input model"),
    "same-via-symlink": ("in/link.onnx", "is the input model"),
    "same-via-hardlink": ("in/hard.onnx", "is the input model"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_bad_output_path_fails_cleanly(runner, work, case):
    target, says = BAD_OUTPUTS[case]
    os.symlink("m.onnx", work / "in" / "link.onnx")
    os.link(work / "in" / "m.onnx", work / "in" / "hard.onnx")
    expect_failure(
        runner,
        ["optimize", "in/m.onnx", target.format(tmp=work), "--dump-after", "cleanup"],
        says=says,
        watch=[work],
        inputs=[work / "in" / "m.onnx"],
    )
    assert not (work / "nodir").exists()
    assert (work / "afile").read_text() == "a regular file\n"


def test_output_symlink_given_as_input(runner, work):
    """The input named through a symlink and the output through the real path are the same file."""
    os.symlink("m.onnx", work / "in" / "link.onnx")
    expect_failure(runner, ["optimize", "in/link.onnx", "in/m.onnx"], says="is the input model", watch=[work])


def test_unwritable_folder_is_refused(runner, work, monkeypatch):
    """Tests run as root, for whom chmod does not stop writes: emulate a read-only folder."""
    real_access = os.access
    readonly = (work / "adir").resolve()

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == readonly and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    expect_failure(runner, ["optimize", "in/m.onnx", "adir/o.onnx"], says=["not writable", "adir"], watch=[work])


@pytest.mark.parametrize(
    "name, output",
    [
        # OUT would be the input's external data file.
        ("external_data.onnx", "in/external_data.onnx.data"),
        # OUT's own data file (OUT.data) would be the input model itself.
        ("weights.data", "in/weights"),
    ],
)
def test_output_that_would_overwrite_an_input_file(runner, work, name, output):
    shutil.copy(EXTERNAL, work / "in" / name)
    shutil.copy(EXTERNAL.with_name(EXTERNAL.name + ".data"), work / "in" / "external_data.onnx.data")
    expect_failure(
        runner,
        ["optimize", f"in/{name}", output],
        says=["would overwrite", "a file of the input model"],
        watch=[work],
        inputs=[work / "in" / name, work / "in" / "external_data.onnx.data"],
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--report", "nodir/r.json"], "does not exist"),
        (["--report", "adir"], "is a folder"),
        (["--report", "in/m.onnx"], "is the input model"),
        (["--dump-after", "cleanup", "--dump-dir", "afile"], "cannot write the dump"),
    ],
)
def test_bad_report_or_dump_path_leaves_no_model(runner, work, args, says):
    expect_failure(
        runner, ["optimize", "in/m.onnx", "o.onnx", *args], says=says, watch=[work], inputs=[work / "in" / "m.onnx"]
    )
    assert not (work / "o.onnx").exists()


def test_existing_output_is_replaced(runner, work):
    (work / "o.onnx").write_text("old\n")
    assert invoke(runner, "optimize", "in/m.onnx", "o.onnx", "-q").exit_code == 0
    assert header(work / "o.onnx") == header(IF_MODEL)
    assert sorted(listing(work)) == sorted(["adir", "afile", "in", "in/m.onnx", "in/sub", "o.onnx", "o.report.json"])


def test_console_script_error_exit_code(tmp_path):
    """The installed `onnxmp` console script: exit 1, one line on stderr, nothing written."""
    script = Path(sysconfig.get_path("scripts")) / "onnxmp"
    assert script.is_file(), f"no console script at {script}; install onnxmp (pip install -e .)"
    (tmp_path / "bad.onnx").write_bytes(CNN.read_bytes()[:1000])
    proc = subprocess.run(
        [str(script), "optimize", "bad.onnx", "out.onnx"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert one_error_line(proc.stderr).startswith("error: input model 'bad.onnx' is not a valid ONNX file")
    assert proc.stdout == ""
    assert sorted(listing(tmp_path)) == ["bad.onnx"]


# ---------------------------------------------------------------- determinism
_RUN_ALL = """
import sys
from onnxmp.cli import main
for name in sys.argv[2:]:
    try:
        main(["optimize", "-q", sys.argv[1] + "/" + name + ".onnx", name + ".onnx"], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
"""


def test_outputs_are_byte_identical_across_processes(tmp_path):
    runs = []
    for seed in ("1", "2"):
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        proc = run_python("-c", _RUN_ALL, str(MODELS), *DETERMINISM_MODELS, cwd=folder, env={"PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
        runs.append(folder)
    first, second = (listing(f) for f in runs)
    expected = {f"{n}.onnx" for n in DETERMINISM_MODELS} | {f"{n}.report.json" for n in DETERMINISM_MODELS}
    assert set(first) == expected | {"external_data.onnx.data"}
    for name in sorted(first):
        if name.endswith(".report.json"):
            # Reports differ only by timings.
            a, b = (json.loads((f / name).read_text()) for f in runs)
            for report in (a, b):
                for record in report["passes"]:
                    record.pop("seconds")
            assert a == b, name
        else:
            assert first[name] == second[name], f"{name} differs between two runs"
    for name in DETERMINISM_MODELS:
        out = runs[0] / f"{name}.onnx"
        assert header(out) == header(MODELS / f"{name}.onnx")
        assert header(out)[0] <= 13  # onnxruntime 1.31 loads at most IR 13
        session(str(out))
        assert metadata(out)["onnxmp.policy"] == "fp32"
