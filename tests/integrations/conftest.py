"""Fixtures for the integration tests: one moto bucket per test, and helpers that read S3 back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from runctl.s3url import S3URL
from tests.servers import S3Server

MARKER = ".runctl-manifest.json"


@pytest.fixture(autouse=True)
def _quiet_frameworks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def moto_bucket(moto_server: S3Server) -> S3URL:
    """A fresh bucket on the session's moto server."""
    return S3URL(moto_server.new_bucket("integ"))


def as_under_runctl_local(
    monkeypatch: pytest.MonkeyPatch, checkpoint_dir: Path, prefix: S3URL, server: S3Server
) -> None:
    """The environment `runctl local --checkpoint-dir DIR --upload-to PREFIX` gives its script."""
    monkeypatch.setenv("RUNCTL_LOCAL_WATCHING", "1")
    monkeypatch.setenv("RUNCTL_CHECKPOINT_DIR", str(checkpoint_dir))
    monkeypatch.setenv("RUNCTL_S3_URL", str(prefix))
    monkeypatch.setenv("RUNCTL_ENDPOINT_URL", server.endpoint_url)


def s3_objects(server: S3Server, prefix: S3URL) -> dict[str, bytes]:
    """Every object under ``prefix``, keyed relative to it, with its bytes."""
    client = server.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=prefix.bucket, Prefix=prefix.key
    ):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=prefix.bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(prefix.key) :]] = body
    return out


def file_checkpoints(objects: dict[str, bytes]) -> dict[str, bytes]:
    """Top-level single-object checkpoints (no ``/`` in the relative key)."""
    return {k: v for k, v in objects.items() if "/" not in k}


def dir_checkpoints(objects: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Directory checkpoints: name -> {relative file: bytes} (marker included)."""
    out: dict[str, dict[str, bytes]] = {}
    for key, body in objects.items():
        if "/" in key:
            name, rel = key.split("/", 1)
            out.setdefault(name, {})[rel] = body
    return out


def assert_dir_complete(name: str, files: dict[str, bytes], local: Path | None) -> None:
    """A directory checkpoint in S3 has its marker, and matches the marker (and the local copy)."""
    assert MARKER in files, f"{name} has no marker in S3: {sorted(files)}"
    manifest: Any = json.loads(files[MARKER])
    listed = manifest["files"]
    data = {k: v for k, v in files.items() if k != MARKER}
    assert set(listed) == set(data), (
        f"{name}: marker lists {sorted(listed)}, S3 holds {sorted(data)}"
    )
    for rel, entry in listed.items():
        assert len(data[rel]) == entry["size"], f"{name}/{rel}: size differs from the marker"
    if local is not None:
        for rel, body in data.items():
            assert (local / rel).read_bytes() == body, f"{name}/{rel} differs from the local copy"
