"""``runctl demo --fast``: the README's main job, against its embedded S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from runctl.cli.demo import register


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
