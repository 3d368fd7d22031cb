"""Make ``onnxmp.passes`` importable when ``onnxmp`` is imported from a source checkout.

The repository keeps the passes in a top-level ``passes/`` folder that setuptools installs as
``onnxmp.passes``. A regular (non-editable) install puts both in site-packages, but Python started in
the repository root imports the source ``onnxmp/`` first, and that folder has no ``passes`` inside.
This finder maps ``onnxmp.passes`` to the checkout's ``passes/`` in exactly that case, so the source
tree always imports with its own passes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_PASSES = _PACKAGE_DIR.parent / "passes"


class _SourcePassesFinder(importlib.abc.MetaPathFinder):
    """Finds ``onnxmp.passes`` and its modules in the checkout's ``passes/`` folder."""

    def find_spec(self, fullname, path, target=None):  # noqa: D401 - importlib protocol
        if fullname != "onnxmp.passes":
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            _SOURCE_PASSES / "__init__.py",
            submodule_search_locations=[str(_SOURCE_PASSES)],
        )


def is_source_checkout() -> bool:
    """True when this ``onnxmp`` is the checkout's folder, with ``passes/`` beside it."""
    return not (_PACKAGE_DIR / "passes").is_dir() and (_SOURCE_PASSES / "__init__.py").is_file()


def install() -> None:
    """Register the finder once, for source checkouts only.

    It goes first: another finder (an editable install of a different checkout) would otherwise
    answer ``onnxmp.passes`` with that checkout's passes.
    """
    if is_source_checkout() and not any(isinstance(f, _SourcePassesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcePassesFinder())
