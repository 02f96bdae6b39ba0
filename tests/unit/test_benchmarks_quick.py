"""The benchmark suite runs end to end on tiny data and fills every row (it asserts nothing about speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_IDS = [
    "1", "1b", "2a", "2b", "3a", "3b", "3c", "3d", "3e", "3f", "4", "5a", "5b", "5c", "6a", "6b", "7",
    "8a", "8b", "8c", "8d", "8e", "8f",
]  # fmt: skip


def test_quick_benchmarks_fill_every_row_of_the_table_and_the_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--tiny",
            "--no-install-aws",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert header.startswith(
        "| # | measurement | runctl (median s) | baseline(s) (median s) | ratio(s) |"
    )
    assert [line.split(" | ")[0].removeprefix("| ") for line in body] == EXPECTED_IDS
    for line in body:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 7, line
        assert all(cells) and "—" not in (cells[2], cells[3], cells[5], cells[6]), line
        assert not cells[2].startswith("failed"), line

    assert (tmp_path / "latest.md").read_text().count("\n| ") >= len(EXPECTED_IDS)
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert [row["id"] for row in doc["rows"]] == EXPECTED_IDS
    for row in doc["rows"]:
        for key in ("measurement", "runctl", "baselines", "ratios", "target", "met"):
            assert row[key], (row["id"], key)
    assert doc["meta"]["mode"] == "tiny"

    # Rows 3 carry the ratio of a command that only started: s5cmd's time plus runctl's
    # start-up beyond s5cmd's (row 6b less `s5cmd version`), from this run's own numbers.
    rows = {row["id"]: row for row in doc["rows"]}
    startup = rows["6b"]["data"]
    extra = startup["runctl s3 list --help"]["median_s"] - startup["s5cmd version"]["median_s"]
    for rid in ("3a", "3b", "3c", "3d", "3e", "3f"):
        row = rows[rid]
        assert row["data"]["startup_extra_s"] == pytest.approx(max(0.0, extra)), rid
        s5 = row["data"]["s5cmd cp"]["median_s"]
        floor = (s5 + row["data"]["startup_extra_s"]) / s5
        assert f"start-up floor {floor:.2f}×" in row["ratios"], (rid, row["ratios"], floor)
    assert "start-up floor" in rows["3a"]["note"]

    # Row 2's raw copy is the copy inside each "cp, then read back" repetition, not a third arm.
    for rid in ("2a", "2b"):
        arms = rows[rid]["data"]
        copies, verified = arms["s5cmd cp"]["samples_s"], arms["s5cmd cp + ls/head"]["samples_s"]
        assert len(copies) == len(verified) > 0, rid
        assert all(c < v for c, v in zip(copies, verified, strict=True)), (rid, copies, verified)

    # The small-file upload (3c) and download (3f) also time the least Typer CLI that keeps
    # runctl's promises.
    for rid, direction in (("3c", "upload"), ("3f", "download")):
        row = rows[rid]
        least = row["data"][f"least Typer {direction}"]["median_s"]
        ratio = row["data"][f"runctl s3 {direction}"]["median_s"] / least
        assert f"{ratio:.2f}× least" in row["ratios"], (row["ratios"], ratio)
        assert f"least Typer {direction}" in row["baselines"]
        assert f"least_{direction}.py" in row["note"]
    assert all("least" not in rows[rid]["ratios"] for rid in ("3a", "3b", "3d", "3e"))


def test_server_storage_prefers_the_request_then_roomy_tmpfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import suite

    assert suite.server_storage(tmp_path) == tmp_path
    monkeypatch.setattr(suite, "TMPFS", tmp_path)
    monkeypatch.setattr(suite, "TMPFS_NEEDS", 1)
    assert suite.server_storage(None) == tmp_path
    monkeypatch.setattr(suite, "TMPFS_NEEDS", 1 << 62)
    assert suite.server_storage(None) is None
    monkeypatch.setattr(suite, "TMPFS", tmp_path / "missing")
    assert suite.server_storage(None) is None


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (/dev/shm)")
def test_link_tree_copies_across_filesystems(tmp_path: Path) -> None:
    import tempfile

    from benchmarks import data

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 10)
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        data.link_tree(src, other / "tree")
        data.link_tree(src / "a.bin", other / "single.bin")
        assert (other / "tree" / "a.bin").read_bytes() == b"a" * 10
        assert (other / "single.bin").read_bytes() == b"a" * 10
    finally:
        shutil.rmtree(other)
