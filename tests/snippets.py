"""Helpers for tests of the documentation's code and of the optional framework integrations.

* :func:`python_block` returns the first ```python block under a heading of README.md or docs/*.md, so a test runs
  the snippet a user copies, exactly as written.
* :func:`require` imports an optional test dependency (transformers, lightning): without it the test is skipped
  locally, but under CI (``CI=true``, which ``.ci/run`` sets) it fails, so CI never passes by skipping.
"""
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str):
    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]')")


def cpu_backends():
    """["reference", "cpu"]: the backends a CPU test runs. Without the compiled CPU kernels "cpu" is left out
    locally; in CI that is an error, so a failed build cannot shrink the suite to the reference silently."""
    from fusedecay import available_backends, backends
    if "cpu" in available_backends():
        return ["reference", "cpu"]
    if in_ci():
        raise RuntimeError(f"the compiled CPU backend is unavailable in CI: {backends.unavailable_reasons()}")
    return ["reference"]


def python_block(relpath: str, heading: str) -> str:
    """The first ```python block after the line ``heading`` (a Markdown heading, matched whole) in ``relpath``."""
    text = open(os.path.join(ROOT, relpath)).read()
    m = re.search(rf"^{re.escape(heading)}[ \t]*$(.*?)^```python\n(.*?)^```", text, re.S | re.M)
    assert m, f"{relpath}: no ```python block under {heading!r}"
    assert not re.search(r"^#{1,6} ", m.group(1), re.M), f"{relpath}: no ```python block directly under {heading!r}"
    return m.group(2)
