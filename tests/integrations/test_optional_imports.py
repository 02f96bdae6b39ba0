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
