"""S3URL: parsing, validation, joining and display."""

from __future__ import annotations

import pytest

from runctl.exceptions import S3URLError, UsageError
from runctl.s3url import S3URL


@pytest.mark.parametrize(
    "text, bucket, key, is_bucket, is_prefix",
    [
        ("s3://bucket", "bucket", "", True, True),
        ("s3://bucket/", "bucket", "", True, True),
        ("s3://bucket/prefix/", "bucket", "prefix/", False, True),
        ("s3://bucket/prefix/deeper/", "bucket", "prefix/deeper/", False, True),
        ("s3://bucket/key", "bucket", "key", False, False),
        ("s3://bucket/dir/step_1.pt", "bucket", "dir/step_1.pt", False, False),
        ("s3://my.bucket-1/a b/c*?[d].pt", "my.bucket-1", "a b/c*?[d].pt", False, False),
        ("s3://bucket/ünïcødé/日本.pt", "bucket", "ünïcødé/日本.pt", False, False),
        ("  s3://bucket/k", "bucket", "k", False, False),
        ("s3://bucket/trailing space ", "bucket", "trailing space ", False, False),
    ],
)
def test_parse(text: str, bucket: str, key: str, is_bucket: bool, is_prefix: bool) -> None:
    url = S3URL.parse(text)
    assert (url.bucket, url.key, url.is_bucket, url.is_prefix) == (bucket, key, is_bucket, is_prefix)


def test_bucket_prefix_and_key_are_distinct() -> None:
    urls = {S3URL.parse(t) for t in ("s3://bucket", "s3://bucket/prefix/", "s3://bucket/prefix")}
    assert len(urls) == 3
    assert S3URL.parse("s3://bucket") == S3URL.parse("s3://bucket/")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("s3:/x", "must start with s3://"),
        ("s3:x/y", "must start with s3://"),
        ("http://bucket/key", "scheme 'http' is not s3"),
        ("https://bucket.s3.amazonaws.com/k", "scheme 'https'"),
        ("/local/path", "must start with s3://"),
        ("", "must start with s3://"),
        ("s3://", "bucket name is empty"),
        ("s3:///key", "bucket name is empty"),
        ("s3://ab/k", "bucket name 'ab'"),
        ("s3://Upper/k", "bucket name 'Upper'"),
        ("s3://-dash/k", "bucket name '-dash'"),
        ("s3://dash-/k", "bucket name 'dash-'"),
        ("s3://a..b/k", "bucket name 'a..b'"),
        ("s3://192.168.0.1/k", "bucket name '192.168.0.1'"),
        ("s3://" + "a" * 64 + "/k", "must be 3-63 characters"),
        ("s3://bucket/a\x00b", "NUL"),
        ("s3://bucket/caf\udce9", "not valid UTF-8"),
        ("s3://bucket/" + "k" * 1025, "longer than 1024 bytes"),
    ],
)
def test_parse_rejects(text: str, fragment: str) -> None:
    with pytest.raises(S3URLError, match=None) as info:
        S3URL.parse(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
    assert info.value.exit_code == 2


def test_parse_rejects_non_string() -> None:
    with pytest.raises(S3URLError, match="expected a string"):
        S3URL.parse(None)  # type: ignore[arg-type]


def test_constructor_validates_bucket() -> None:
    with pytest.raises(S3URLError):
        S3URL("Bad_Bucket!")


@pytest.mark.parametrize(
    "base, parts, expected",
    [
        ("s3://bkt/run", ("ckpt", "a.pt"), "s3://bkt/run/ckpt/a.pt"),
        ("s3://bkt/run/", ("a.pt",), "s3://bkt/run/a.pt"),
        ("s3://bkt", ("a.pt",), "s3://bkt/a.pt"),
        ("s3://bkt/", ("dir/", "x"), "s3://bkt/dir/x"),
        ("s3://bkt/run/", ("", "x"), "s3://bkt/run/x"),
        ("s3://bkt/run/", ("/x",), "s3://bkt/run/x"),
        ("s3://bkt/run/", ("sub/",), "s3://bkt/run/sub/"),
        ("s3://bkt/run/", ("*?[",), "s3://bkt/run/*?["),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert str(S3URL.parse(base).join(*parts)) == expected


def test_name_as_prefix_and_relative_key() -> None:
    assert S3URL.parse("s3://bkt/run/step_1.pt").name == "step_1.pt"
    assert S3URL.parse("s3://bkt/run/").name == "run"
    assert S3URL.parse("s3://bkt").name == ""
    assert str(S3URL.parse("s3://bkt/run").as_prefix()) == "s3://bkt/run/"
    prefix = S3URL.parse("s3://bkt/run/")
    assert prefix.as_prefix() is prefix
    assert prefix.relative_key("run/a/b.pt") == "a/b.pt"
    assert S3URL.parse("s3://bkt/run").relative_key("run/x") == "x"
    for outside in ("run-old/x", "run/", "other/run/x"):
        with pytest.raises(S3URLError, match="not inside"):
            prefix.relative_key(outside)


@pytest.mark.parametrize("text", ["s3://bkt", "s3://bkt/", "s3://bkt/p/", "s3://bkt/p/k.pt"])
def test_display_round_trips(text: str) -> None:
    url = S3URL.parse(text)
    assert S3URL.parse(str(url)) == url
    assert str(url).startswith("s3://bkt/")


def test_urls_are_frozen_and_ordered() -> None:
    url = S3URL.parse("s3://bkt/a")
    with pytest.raises(AttributeError):
        url.key = "b"  # type: ignore[misc]
    assert sorted([S3URL.parse("s3://bkt/b"), url]) == [url, S3URL.parse("s3://bkt/b")]
