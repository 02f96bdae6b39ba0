"""Every ``>>>`` example in runctl's and the integrations' docstrings runs and prints what it shows.

Examples that need a server, a framework or a network are marked ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import tempfile

import pytest

import runctl
import runctl.integrations


def _modules() -> list[str]:
    names = []
    for package in (runctl, runctl.integrations):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_the_docstring_examples_hold(
    name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The examples make their directories with tempfile.mkdtemp(), as a reader would; here they
    # land under tmp_path, which pytest removes, instead of piling up in /tmp run after run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an integration whose framework is not installed
        pytest.skip(f"{name}: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
