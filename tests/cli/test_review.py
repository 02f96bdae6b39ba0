"""`runctl s3 review`: checkpoints, incomplete ones, abandoned multipart uploads and a cost that matches the price table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from runctl.cli.output import human_size
from runctl.review import DEFAULT_PRICES, GB, review
from runctl.s3url import S3URL
from tests.cli.cli_support import put_marker
from tests.servers import S3Server

SIZES = {"step_1.pt": 1000, "step_2.pt": 2345, "checkpoint-3/model.bin": 700, "train.log": 10}
PARTS = (4096, 100)


def monitor_app() -> typer.Typer:
    """The real `runctl` app (its s3 group has our watch and review registered)."""
    from runctl.cli.app import app

    return app


def populate(server: S3Server, bucket: S3URL) -> tuple[S3URL, str]:
    """A prefix with two file checkpoints, an unmarked directory, a log, a neighbour, and one unfinished upload."""
    client = server.client()
    prefix = bucket.join("run/")
    for key, size in SIZES.items():
        client.put_object(Bucket=bucket.bucket, Key=prefix.key + key, Body=b"z" * size)
    client.put_object(Bucket=bucket.bucket, Key="run-old/step_9.pt", Body=b"o" * 5000)
    upload = client.create_multipart_upload(Bucket=bucket.bucket, Key=prefix.key + "step_4.pt")
    for number, size in enumerate(PARTS, start=1):
        client.upload_part(
            Bucket=bucket.bucket, Key=prefix.key + "step_4.pt", UploadId=upload["UploadId"],
            PartNumber=number, Body=b"p" * size,
        )
    return prefix, upload["UploadId"]


def test_review_reports_abandoned_upload_and_cost_from_the_price_table(
    s3_server: S3Server, bucket: S3URL, transfer: Any
) -> None:
    prefix, upload_id = populate(s3_server, bucket)
    result = review(transfer, prefix, abandoned_after=0)

    assert [c.name for c in result.checkpoints] == ["step_1.pt", "step_2.pt", "checkpoint-3"]
    assert [c.name for c in result.incomplete] == ["checkpoint-3"]
    assert [o.key for o in result.others] == ["run/train.log"]
    assert (result.objects, result.size) == (4, sum(SIZES.values()))
    (upload,) = result.multipart_uploads
    assert (upload.key, upload.upload_id, upload.parts, upload.size) == ("run/step_4.pt", upload_id, 2, sum(PARTS))
    assert upload.abandoned and result.abandoned == (upload,)
    assert any("abandoned multipart" in w for w in result.warnings)

    billed = sum(SIZES.values()) + sum(PARTS)  # parts of unfinished uploads are billed too
    assert result.total_monthly_cost == billed / GB * DEFAULT_PRICES["STANDARD"]
    (standard,) = result.costs
    assert (standard.storage_class, standard.size, standard.multipart_size) == ("STANDARD", billed, sum(PARTS))

    recent = review(transfer, prefix, abandoned_after=10 * 365 * 86400.0 * 100)
    assert [m.abandoned for m in recent.multipart_uploads] == [False]
    assert recent.abandoned == () and not any("abandoned" in w for w in recent.warnings)


def test_review_notices_an_abort_incomplete_multipart_rule(moto_server: S3Server) -> None:
    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(moto_server.new_bucket())
    prefix, _ = populate(moto_server, bucket)
    transfer = BotoTransfer(moto_server.config())
    assert any("no lifecycle rule aborts" in w for w in review(transfer, prefix, abandoned_after=0).warnings)
    moto_server.client().put_bucket_lifecycle_configuration(
        Bucket=bucket.bucket,
        LifecycleConfiguration={"Rules": [{
            "ID": "abort", "Status": "Enabled", "Filter": {"Prefix": "run/"},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2},
        }]},
    )
    assert not any("no lifecycle rule" in w for w in review(transfer, prefix, abandoned_after=0).warnings)


def test_review_detailed_lists_every_file(moto_server: S3Server) -> None:
    from runctl.transfer.boto import BotoTransfer

    bucket = S3URL(moto_server.new_bucket())
    prefix, _ = populate(moto_server, bucket)
    moto_server.client().put_object(Bucket=bucket.bucket, Key="run/checkpoint-3/.runctl-manifest.json", Body=b"{}")
    result = review(BotoTransfer(moto_server.config()), prefix, detailed=True)
    by_name = {c.name: c for c in result.checkpoints}
    assert by_name["checkpoint-3"].complete
    assert [(f.key, f.size) for f in by_name["checkpoint-3"].file_list] == [
        ("run/checkpoint-3/model.bin", 700), ("run/checkpoint-3/.runctl-manifest.json", 2)
    ]


def test_cli_review_json_and_prices_file(
    s3_server: S3Server, bucket: S3URL, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prefix, _ = populate(s3_server, bucket)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"STANDARD": 2.5}))
    runner = CliRunner()
    result = runner.invoke(
        monitor_app(),
        ["s3", "review", str(prefix), "--json", "--no-use-s5cmd", "--abandoned-after", "0", "--prices", str(prices)],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    billed = sum(SIZES.values()) + sum(PARTS)
    assert doc["cost"]["total_monthly"] == billed / GB * 2.5
    assert doc["cost"]["by_storage_class"][0]["price_per_gb_month"] == 2.5
    assert doc["totals"]["abandoned_multipart_uploads"] == 1
    assert [m["key"] for m in doc["multipart_uploads"]] == ["run/step_4.pt"]
    assert doc["incomplete"] == ["checkpoint-3"]

    # the same through RUNCTL_PRICES, for people: tables with the abandoned upload and the cost
    monkeypatch.setenv("RUNCTL_PRICES", str(prices))
    result = runner.invoke(monitor_app(), ["s3", "review", str(prefix), "--no-use-s5cmd", "--abandoned-after", "0"])
    assert result.exit_code == 0, result.output
    for text in ("step_1.pt", "checkpoint-3", "abandoned", "run/step_4.pt", "Estimated monthly storage cost"):
        assert text in result.stdout
    assert f"{billed / GB * 2.5:.2e}" in result.stdout
    # the size is that of all three checkpoints, complete or not, and reads so
    all_three = SIZES["step_1.pt"] + SIZES["step_2.pt"] + SIZES["checkpoint-3/model.bin"]
    assert f"3 checkpoints, {human_size(all_three)} (2 complete)" in result.stdout


@pytest.mark.parametrize("backend", ["--use-s5cmd", "--no-use-s5cmd"])
def test_cli_review_verify_checks_each_marker_against_the_files(
    s3_server: S3Server, bucket: S3URL, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    prefix = bucket.join("run/")
    client = s3_server.client()
    for name, size in (("checkpoint-5", 3), ("checkpoint-6", 4), ("checkpoint-7", 3)):
        client.put_object(Bucket=bucket.bucket, Key=f"{prefix.key}{name}/model.bin", Body=b"m" * size)
    put_marker(s3_server, prefix, "checkpoint-5", {"model.bin": 3})
    put_marker(s3_server, prefix, "checkpoint-6", {"model.bin": 3})  # the file is 4 bytes
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    plain = runner.invoke(monitor_app(), ["s3", "review", str(prefix), "--json", backend])
    assert plain.exit_code == 0, plain.output
    doc = json.loads(plain.stdout)
    assert doc["incomplete"] == ["checkpoint-7"] and doc["markers_verified"] is False
    checked = runner.invoke(monitor_app(), ["s3", "review", str(prefix), "--json", "--verify", backend])
    assert checked.exit_code == 0, checked.output
    doc = json.loads(checked.stdout)
    assert doc["incomplete"] == ["checkpoint-6", "checkpoint-7"] and doc["markers_verified"] is True
    assert "checkpoint-6" in checked.stderr and "does not match its marker" in checked.stderr
    human = runner.invoke(monitor_app(), ["s3", "review", str(prefix), "--verify", backend])
    assert "(no marker, or one that does not match): checkpoint-6, checkpoint-7" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gs://bucket/x"], "must start with s3://"),
        (["s3://bucket-x/run/", "--abandoned-after", "soon"], "--abandoned-after"),
        (["s3://bucket-x/run/", "--prices", "/nonexistent/prices.json"], "--prices"),
    ],
)
def test_cli_review_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(monitor_app(), ["s3", "review", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_review_subprocess_json(s3_server: S3Server, bucket: S3URL) -> None:
    prefix, _ = populate(s3_server, bucket)
    env = {**os.environ, **s3_server.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "runctl", "s3", "review", str(prefix), "--json", "--no-use-s5cmd"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["type"] == "review" and doc["url"] == str(prefix)
    assert doc["totals"]["checkpoints"] == 3 and doc["totals"]["multipart_uploads"] == 1


@pytest.mark.parametrize("backend", ["--use-s5cmd", "--no-use-s5cmd"])
def test_review_marks_pinned_checkpoints_and_names_pins_left_without_one(
    s3_server: S3Server, bucket: S3URL, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    from runctl.checkpoints import pin_url

    prefix = bucket.join("run/")
    client = s3_server.client()
    for name in ("step_1.pt", "step_2.pt"):
        client.put_object(Bucket=bucket.bucket, Key=prefix.key + name, Body=b"c")
    for name in ("step_1.pt", "step_0.pt"):  # step_0.pt was deleted by hand; its pin stayed
        client.put_object(Bucket=bucket.bucket, Key=pin_url(prefix, name).key, Body=b"")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    result = runner.invoke(monitor_app(), ["s3", "review", str(prefix), "--json", backend])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {c["name"]: c["pinned"] for c in doc["checkpoints"]} == {"step_1.pt": True, "step_2.pt": False}
    assert doc["pinned"] == ["step_0.pt", "step_1.pt"] and doc["stray_pins"] == ["step_0.pt"]
    assert doc["others"] == []  # the pin objects are runctl's own, not artifacts

    human = runner.invoke(monitor_app(), ["s3", "review", str(prefix), backend])
    assert human.exit_code == 0, human.output
    assert "Pinned (every cleanup and retention keeps them): step_1.pt\n" in human.stdout
    assert f"Pins naming no checkpoint here (deleting the pin object unpins): {pin_url(prefix, 'step_0.pt')}" in human.stdout
    table = {line.split()[1]: line.split()[-2] for line in human.stdout.splitlines() if line.lstrip()[:1].isdigit()}
    assert table == {"step_1.pt": "yes", "step_2.pt": "-"}  # the "pinned" column


def test_review_totals_say_one_checkpoint_in_the_singular(moto_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = S3URL(moto_server.new_bucket())
    moto_server.client().put_object(Bucket=bucket.bucket, Key="run/step_1.pt", Body=b"c")
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(monitor_app(), ["s3", "review", str(bucket.join("run/")), "--no-use-s5cmd"])
    assert result.exit_code == 0, result.output
    assert "Totals: 1 object, 1 B; 1 checkpoint, 1 B (1 complete); 0 other objects" in result.stdout
