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


def test_every_test_docs_guarantees_names_exists() -> None:
    # docs/guarantees.md backs each promise with tests; a `::name` after a file's path is a
    # test of that file. Three pointed at the wrong file (test_staging.py for test_uploader.py).
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    missing = []
    for line in (root / "docs" / "guarantees.md").read_text().splitlines():
        current = None
        for ref in re.findall(r"`([^`]+)`", line):
            if ref.startswith("tests/"):
                current, _, name = ref.partition("::")
            elif ref.startswith("::") and current is not None:
                name = ref[2:]
            else:
                continue
            path = root / current
            test = name.split("[")[0]
            if not path.is_file() or (test and not re.search(rf"def {re.escape(test)}\b", path.read_text())):
                missing.append(f"{current}::{name}")
    assert not missing
