"""The package layout trap: ``passes/`` at the top of the repository is installed as ``onnxmp.passes``.

One regular (non-editable) install of a copy of the repository into a temporary target folder, then:
(a) Python in a neutral folder imports ``onnxmp`` and ``onnxmp.passes`` from that folder;
(b) Python in the repository root imports ``onnxmp`` from the source tree, and ``onnxmp.passes`` still
    works, from the source tree's ``passes/`` (what ``onnxmp/_source_passes.py`` is for);
(c) no top-level ``passes`` package is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onnxmp.pass_manager import registered_passes

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks")

PROBE = """
import json, sys
import onnxmp, onnxmp.passes
from onnxmp.pass_manager import registered_passes
from onnxmp.cli import main
print(json.dumps({
    "onnxmp": onnxmp.__file__,
    "passes": onnxmp.passes.__file__,
    "pass_modules": sorted(
        m.__file__ for name, m in sys.modules.items() if name.startswith("onnxmp.passes.")
    ),
    "registered": sorted(registered_passes()),
    "top_level_passes": "passes" in sys.modules,
}))
main(["passes"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(copy of the repository, target folder of a regular install of it)."""
    root = tmp_path_factory.mktemp("layout")
    repo, target = root / "repo", root / "site"
    shutil.copytree(REPO, repo, ignore=IGNORED, symlinks=True)
    checkout_before = _build_artifacts(REPO)
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install",
            "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check", "--quiet",
            "--target", str(target), str(repo),  # an absolute path: never a name looked up on an index
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The build happened in the copy: no build/ or *.egg-info appeared in the checkout.
    assert _build_artifacts(REPO) == checkout_before
    return repo, target


def _build_artifacts(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name in ("build", "dist") or p.name.endswith(".egg-info")}


def probe(cwd: Path, target: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), COLUMNS="250", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    first, _, table = proc.stdout.partition("\n")
    return json.loads(first), table


def _under(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def test_regular_install_layout(installed):
    repo, target = installed
    assert (target / "onnxmp" / "__init__.py").is_file()
    assert (target / "onnxmp" / "passes" / "__init__.py").is_file()
    assert (target / "onnxmp" / "presets" / "fp32.json").is_file()
    modules = {p.stem for p in (target / "onnxmp" / "passes").glob("*.py")}
    assert modules == {p.stem for p in (repo / "passes").glob("*.py")}


def test_neutral_folder_imports_the_installed_package(installed, tmp_path):
    repo, target = installed
    found, table = probe(tmp_path, target)
    assert _under(found["onnxmp"], target), found
    assert _under(found["passes"], target / "onnxmp" / "passes"), found
    assert found["pass_modules"] and all(_under(m, target / "onnxmp" / "passes") for m in found["pass_modules"])
    assert found["registered"] == sorted(registered_passes())
    for name in found["registered"]:
        assert name in table
    assert not found["top_level_passes"]


def test_source_tree_imports_its_own_passes(installed):
    """The trap: in the repository root, `onnxmp` is the source folder, which has no passes/ inside."""
    repo, target = installed
    assert not (repo / "onnxmp" / "passes").exists()
    found, table = probe(repo, target)
    assert _under(found["onnxmp"], repo / "onnxmp"), found
    # The source tree's own passes: not the installed copy, nor another checkout's (editable install).
    assert _under(found["passes"], repo / "passes"), found
    assert all(_under(m, repo / "passes") for m in found["pass_modules"]), found
    assert found["registered"] == sorted(registered_passes())
    for name in found["registered"]:
        assert name in table
    assert not found["top_level_passes"]


def test_no_top_level_passes_package_is_installed(installed):
    repo, target = installed
    assert not (target / "passes").exists()
    top_level = [p for p in target.glob("*.dist-info/top_level.txt")]
    assert top_level, list(target.iterdir())
    for path in top_level:
        assert "passes" not in path.read_text().split()
    records = [line.split(",")[0] for p in target.glob("*.dist-info/RECORD") for line in p.read_text().splitlines()]
    assert records and not any(r.startswith("passes/") for r in records)
    assert any(r.startswith("onnxmp/passes/") for r in records)
