"""`runctl s3 lifecycle show|set|clear` on moto: prefix-scoped rules merged with the bucket's others."""

from __future__ import annotations

from typing import Any

import pytest

from runctl.lifecycle import (
    LifecycleSpec,
    build_rule,
    clear_rule,
    has_abort_multipart_rule,
    rule_id,
    set_rule,
)
from runctl.s3url import S3URL
from tests.cli.cli_support import of_type, run_process, run_s3
from tests.servers import S3Server

OTHER = {
    "ID": "logs-expire",
    "Filter": {"Prefix": "logs/"},
    "Status": "Enabled",
    "Expiration": {"Days": 5},
}


def rules(server: S3Server, bucket: str) -> list[dict[str, Any]]:
    client = server.client()
    try:
        return client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except client.exceptions.ClientError as exc:
        assert exc.response["Error"]["Code"] == "NoSuchLifecycleConfiguration"
        return []


def by_id(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["ID"]: r for r in found}


@pytest.fixture
def lc_bucket(moto_server: S3Server) -> str:
    name = moto_server.new_bucket("lc")
    moto_server.client().put_bucket_lifecycle_configuration(
        Bucket=name, LifecycleConfiguration={"Rules": [OTHER]}
    )
    return name


def test_set_merges_with_other_rules_and_rerun_replaces_only_ours(
    moto_server: S3Server, lc_bucket: str
) -> None:
    url = f"s3://{lc_bucket}/run-7"  # no slash: still the run-7/ prefix
    result = run_s3(
        moto_server,
        "s3",
        "lifecycle",
        "set",
        url,
        "--expire-days",
        "30",
        "--abort-incomplete-multipart-days",
        "2",
        "--transition-days",
        "7",
        "--storage-class",
        "glacier_ir",
    )
    assert result.exit_code == 0, result.output
    found = by_id(rules(moto_server, lc_bucket))
    assert found["logs-expire"] == OTHER
    ours = found["runctl-run-7/"]
    assert ours["Filter"] == {"Prefix": "run-7/"} and ours["Status"] == "Enabled"
    assert ours["Expiration"] == {"Days": 30}
    assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    assert ours["Transitions"] == [{"Days": 7, "StorageClass": "GLACIER_IR"}]
    assert "expire objects after 30 days" in result.stdout

    # a second prefix gets its own rule; re-running the first replaces only that one
    assert (
        run_s3(
            moto_server, "s3", "lifecycle", "set", f"s3://{lc_bucket}/run-8/", "--expire-days", "9"
        ).exit_code
        == 0
    )
    again = run_s3(
        moto_server,
        "s3",
        "lifecycle",
        "set",
        url,
        "--abort-incomplete-multipart-days",
        "1",
        "--json",
    )
    assert again.exit_code == 0, again.output
    (change,) = of_type(again.stdout, "lifecycle_change")
    assert change["written"] and change["rule_id"] == "runctl-run-7/"
    found = by_id(rules(moto_server, lc_bucket))
    assert set(found) == {"logs-expire", "runctl-run-7/", "runctl-run-8/"}
    assert "Expiration" not in found["runctl-run-7/"]
    assert found["runctl-run-7/"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert found["runctl-run-8/"]["Expiration"] == {"Days": 9}

    # the same settings again write nothing
    same = run_s3(
        moto_server,
        "s3",
        "lifecycle",
        "set",
        url,
        "--abort-incomplete-multipart-days",
        "1",
        "--json",
    )
    (change,) = of_type(same.stdout, "lifecycle_change")
    assert not change["changed"] and not change["written"]


def test_dry_run_shows_the_resulting_configuration_and_writes_nothing(
    moto_server: S3Server, lc_bucket: str
) -> None:
    before = rules(moto_server, lc_bucket)
    human = run_s3(
        moto_server,
        "s3",
        "lifecycle",
        "set",
        f"s3://{lc_bucket}/ckpt/",
        "--expire-days",
        "3",
        "--dry-run",
    )
    assert human.exit_code == 0, human.output
    assert (
        "dry run" in human.stdout
        and '"runctl-ckpt/"' in human.stdout
        and '"logs-expire"' in human.stdout
    )
    # The table is of what would be written, not of what the bucket holds.
    assert f"Lifecycle rules of s3://{lc_bucket}/ once written (dry run)" in human.stdout
    js = run_s3(
        moto_server,
        "s3",
        "lifecycle",
        "set",
        f"s3://{lc_bucket}/ckpt/",
        "--expire-days",
        "3",
        "--dry-run",
        "--json",
    )
    (change,) = of_type(js.stdout, "lifecycle_change")
    assert change["dry_run"] and not change["written"] and change["changed"]
    assert [r["ID"] for r in change["after"]["Rules"]] == ["logs-expire", "runctl-ckpt/"]
    assert rules(moto_server, lc_bucket) == before


def test_show_lists_rules_readably_and_as_json(moto_server: S3Server, lc_bucket: str) -> None:
    client = moto_server.client()
    set_rule(
        client,
        S3URL.parse(f"s3://{lc_bucket}/run/"),
        LifecycleSpec(abort_incomplete_multipart_days=4),
    )
    human = run_s3(moto_server, "s3", "lifecycle", "show", f"s3://{lc_bucket}/run/")
    assert human.exit_code == 0, human.output
    assert (
        "runctl-run/ *" in human.stdout
        and "abort incomplete multipart uploads after 4 days" in human.stdout
    )
    assert "logs-expire" in human.stdout and "expire after 5 days" in human.stdout
    js = run_s3(moto_server, "s3", "lifecycle", "show", f"s3://{lc_bucket}/run/", "--json")
    (shown,) = of_type(js.stdout, "lifecycle")
    assert shown["rule_id"] == "runctl-run/" and shown["reaching_prefix"] == ["runctl-run/"]
    assert {r["ID"] for r in shown["rules"]} == {"logs-expire", "runctl-run/"}

    empty = moto_server.new_bucket("lc")
    none = run_s3(moto_server, "s3", "lifecycle", "show", f"s3://{empty}/run/")
    assert none.exit_code == 0 and "no lifecycle rules" in none.stdout


def test_clear_removes_only_our_rule_for_that_prefix(moto_server: S3Server, lc_bucket: str) -> None:
    client = moto_server.client()
    set_rule(client, S3URL.parse(f"s3://{lc_bucket}/a/"), LifecycleSpec(expire_days=2))
    set_rule(client, S3URL.parse(f"s3://{lc_bucket}/b/"), LifecycleSpec(expire_days=3))
    result = run_s3(moto_server, "s3", "lifecycle", "clear", f"s3://{lc_bucket}/a/")
    assert result.exit_code == 0, result.output
    assert set(by_id(rules(moto_server, lc_bucket))) == {"logs-expire", "runctl-b/"}
    # nothing to clear is fine; clearing the last rules leaves no configuration at all
    assert run_s3(moto_server, "s3", "lifecycle", "clear", f"s3://{lc_bucket}/a/").exit_code == 0
    clear_rule(client, S3URL.parse(f"s3://{lc_bucket}/b/"))
    client.delete_bucket_lifecycle(Bucket=lc_bucket)
    set_rule(client, S3URL.parse(f"s3://{lc_bucket}/c/"), LifecycleSpec(expire_days=2))
    clear_rule(client, S3URL.parse(f"s3://{lc_bucket}/c/"))
    assert rules(moto_server, lc_bucket) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "give at least one of"),
        (("--transition-days", "30"), "--storage-class"),
        (("--storage-class", "GLACIER"), "--transition-days"),
        (("--expire-days", "-1"), "--expire-days"),
        (("--expire-days", "0"), "--expire-days"),
        (("--abort-incomplete-multipart-days", "-3"), "--abort-incomplete-multipart-days"),
        (("--transition-days", "-1", "--storage-class", "GLACIER"), "--transition-days"),
        (("--transition-days", "5", "--storage-class", "TAPE"), "--storage-class"),
        (
            ("--transition-days", "30", "--storage-class", "GLACIER", "--expire-days", "10"),
            "--expire-days",
        ),
    ],
)
def test_bad_input_is_exit_2_and_changes_nothing(
    moto_server: S3Server, lc_bucket: str, flags: tuple[str, ...], message: str
) -> None:
    before = rules(moto_server, lc_bucket)
    result = run_s3(moto_server, "s3", "lifecycle", "set", f"s3://{lc_bucket}/run/", *flags)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert rules(moto_server, lc_bucket) == before


def test_expiry_on_a_bucket_root_needs_confirmation(moto_server: S3Server, lc_bucket: str) -> None:
    root = f"s3://{lc_bucket}/"
    before = rules(moto_server, lc_bucket)
    result = run_s3(moto_server, "s3", "lifecycle", "set", root, "--expire-days", "10")
    assert result.exit_code == 2, result.output
    assert "--yes-bucket-root" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert rules(moto_server, lc_bucket) == before
    # A dry run shows it; aborting multipart uploads bucket-wide deletes no object: no confirmation.
    assert run_s3(moto_server, "s3", "lifecycle", "set", root, "--expire-days", "10", "--dry-run").exit_code == 0
    assert rules(moto_server, lc_bucket) == before
    ok = run_s3(moto_server, "s3", "lifecycle", "set", root, "--abort-incomplete-multipart-days", "2")
    assert ok.exit_code == 0, ok.output
    confirmed = run_s3(moto_server, "s3", "lifecycle", "set", root, "--expire-days", "10", "--yes-bucket-root")
    assert confirmed.exit_code == 0, confirmed.output
    rule = by_id(rules(moto_server, lc_bucket))[rule_id(S3URL(lc_bucket))]
    assert rule["Expiration"] == {"Days": 10}  # set replaces our rule whole


def test_missing_bucket_is_one_line(moto_server: S3Server) -> None:
    result = run_s3(moto_server, "s3", "lifecycle", "show", "s3://no-such-bucket-lc/run/")
    assert result.exit_code == 2, result.output
    assert "NoSuchBucket" in result.stderr and "Traceback" not in result.stderr


def test_has_abort_multipart_rule(moto_server: S3Server, lc_bucket: str) -> None:
    client = moto_server.client()
    assert not has_abort_multipart_rule(client, lc_bucket, "run/")
    set_rule(
        client,
        S3URL.parse(f"s3://{lc_bucket}/run/"),
        LifecycleSpec(abort_incomplete_multipart_days=1),
    )
    assert has_abort_multipart_rule(client, lc_bucket, "run/")
    assert has_abort_multipart_rule(client, lc_bucket, "run/sub/")
    assert not has_abort_multipart_rule(
        client, lc_bucket, ""
    )  # the rule does not reach the whole bucket
    assert not has_abort_multipart_rule(client, lc_bucket, "runs/")


def test_rule_id_is_bounded() -> None:
    long = S3URL("bkt", "x" * 600 + "/")
    assert len(rule_id(long)) <= 255 and rule_id(long).startswith("runctl-")
    assert rule_id(long) != rule_id(S3URL("bkt", "x" * 599 + "y/"))
    assert build_rule(S3URL.parse("s3://bkt/"), LifecycleSpec(expire_days=1))["Filter"] == {
        "Prefix": ""
    }


def test_subprocess_set_and_show(moto_server: S3Server, lc_bucket: str) -> None:
    env = {"AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    done = run_process(
        "s3",
        "lifecycle",
        "set",
        f"s3://{lc_bucket}/p/",
        "--abort-incomplete-multipart-days",
        "3",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    shown = run_process("s3", "lifecycle", "show", f"s3://{lc_bucket}/p/", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    (record,) = of_type(shown.stdout, "lifecycle")
    assert {r["ID"] for r in record["rules"]} == {"logs-expire", "runctl-p/"}
    bad = run_process(
        "s3", "lifecycle", "set", f"s3://{lc_bucket}/p/", "--expire-days", "-2", env=env
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("runctl: error:")
