"""``runctl demo --fast``: the README's main job, against its embedded S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from runctl.cli.demo import register
from tests.servers import S3Server


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """runctl (test root)."""

    register(app)
    return app


def test_demo_fast_json_lands_keep_last_n_complete(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["demo", "--fast", "--json", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    demo = next(r for r in records if r["type"] == "demo")
    assert demo["steps"] == 20
    names = {c["name"] for c in demo["review"]["checkpoints"]}
    # Saves at 5, 10, 15, 20 plus last.ckpt; keep-last-3 drops step 5 in S3 and locally.
    assert names == {
        "epoch=0-step=10.ckpt",
        "epoch=0-step=15.ckpt",
        "epoch=1-step=20.ckpt",
        "last.ckpt",
    }
    assert all(c["complete"] for c in demo["review"]["checkpoints"])
    assert {row["name"] for row in demo["local"]} == names
    assert all(row["durable"] for row in demo["local"])
    assert demo["stats"]["runctl/failures"] == 0


def test_demo_human_output_names_what_landed(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["demo", "--fast", "--steps", "10", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Trained 10 steps" in result.stdout
    assert "epoch=0-step=10.ckpt" in result.stdout
    # The embedded server's multipart uploads are not listed: the report must not say "none".
    assert "Multipart uploads: not listed" in result.stdout
    assert "none unfinished" not in result.stdout


def test_demo_on_a_given_prefix_lists_its_unfinished_multipart_uploads(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # With --s3-url the demo said "none unfinished" without looking (a real bucket may hold
    # abandoned, billed parts).
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    client.create_multipart_upload(Bucket=bucket, Key="demo/old.bin")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in moto_server.env().items():
            mp.setenv(key, value)
        result = CliRunner().invoke(
            _app(),
            ["demo", "--fast", "--steps", "5", "--dir", str(tmp_path), "--s3-url", f"s3://{bucket}/demo/"],
        )
    assert result.exit_code == 0, result.output
    assert "Unfinished multipart uploads" in result.stdout and "demo/old.bin" in result.stdout


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_mid_training_exits_as_every_command_does(
    tmp_path: Path, sig: signal.Signals, code: int, line: str
) -> None:
    # Lightning turns the KeyboardInterrupt into exit(1) after its own shutdown; the demo must
    # still say why it stopped and exit 128 + the signal, as the README's exit codes promise.
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "demo", "--fast", "--steps", "100000", "--dir", str(ckpt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    deadline = time.monotonic() + 120
    while not (ckpt.is_dir() and any(p.suffix == ".ckpt" for p in ckpt.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was saved"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.decode().strip().splitlines()[-1] == f"runctl: error: {line}"
