"""A missing framework fails politely: ImportError naming what to pip install."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("runctl.integrations.lightning")
    monkeypatch.delitem(module.__dict__, "RunctlCheckpoint", raising=False)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch.callbacks", None)
    with pytest.raises(ImportError, match=r"pip install 'runctl\[lightning\]'"):
        module.RunctlCheckpoint  # noqa: B018


def test_missing_pytorch_lightning_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("runctl.integrations.lightning")
    monkeypatch.delitem(module.__dict__, "RunctlCheckpointPL", raising=False)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning.callbacks", None)
    with pytest.raises(ImportError, match="pip install 'pytorch-lightning'"):
        module.RunctlCheckpointPL  # noqa: B018


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "runctl.integrations.huggingface", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'runctl\[huggingface\]'"):
        importlib.import_module("runctl.integrations.huggingface")


def test_a_plain_loop_without_torch_is_told_to_install_torch(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "pip install 'runctl[lightning]'", where a plain loop needs torch alone (packaging pass).
    from runctl.integrations.loop import CheckpointManager

    manager = CheckpointManager(local_dir=str(tmp_path), s3_url=None)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'torch'"):
        manager.save({"w": 1}, step=1)


def test_integrations_do_not_import_a_framework_eagerly() -> None:
    import subprocess

    code = (
        "import sys, runctl.integrations.lightning, runctl.integrations.loop;"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def _exports(module: object) -> set[str]:
    return set(getattr(module, "__all__", ())) | set(vars(module))  # lazy classes are not built


def test_every_import_the_readme_shows_names_a_public_name() -> None:
    """An import line or dotted name a user copies from the README must resolve."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    lines = re.findall(r"from (runctl[\w.]*) import ([\w, ]+)", readme)
    assert len(lines) >= 5, lines
    for module_name, names in lines:
        module = importlib.import_module(module_name)
        missing = [n.strip() for n in names.split(",") if n.strip() not in _exports(module)]
        assert not missing, f"README: from {module_name} import {missing}"
    dotted = re.findall(r"`(runctl(?:\.\w+)+)", readme)
    assert dotted, "the README names no dotted runctl path"
    for path in dotted:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then one name in it
            try:
                module = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            rest = parts[cut:]
            assert len(rest) <= 1 and (not rest or rest[0] in _exports(module)), f"README: {path}"
            break


def test_a_framework_that_is_installed_but_cannot_import_is_not_called_missing(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lightning 2.1-2.3 import pkg_resources, gone from setuptools 82: the error said "lightning
    is not installed; pip install 'runctl[lightning]'", which cannot help (minimum-versions pass)."""
    from pathlib import Path

    from runctl.integrations._common import require

    root = Path(str(tmp_path))
    (root / "fakeframework_runctl").mkdir()
    (root / "fakeframework_runctl" / "__init__.py").write_text("import no_such_dependency_runctl_xyz\n")
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(ImportError) as raised:
        require("fakeframework_runctl", "lightning")
    assert "no_such_dependency_runctl_xyz" in str(raised.value)
    assert "runctl[lightning]" not in str(raised.value)
    with pytest.raises(ImportError, match=r"pip install 'runctl\[lightning\]'"):
        require("no_such_framework_runctl_xyz", "lightning")
