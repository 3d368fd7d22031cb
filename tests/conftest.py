"""Shared test fixtures: golden files (``pytest --update-goldens`` rewrites them) and models."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "fixtures" / "models"
GOLDEN = REPO / "fixtures" / "golden"


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite fixtures/golden/ from the current output instead of comparing",
    )


class Golden:
    """Compares text with ``fixtures/golden/<name>``, or rewrites it with --update-goldens."""

    def __init__(self, update: bool):
        self.update = update

    def check(self, name: str, text: str) -> None:
        path = GOLDEN / name
        if self.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        assert path.is_file(), f"no golden file {path}; run `pytest --update-goldens` and review the diff"
        expected = path.read_text(encoding="utf-8")
        assert text == expected, f"output differs from {path}; if intended, run `pytest --update-goldens`"


@pytest.fixture
def golden(request) -> Golden:
    return Golden(request.config.getoption("--update-goldens"))
