"""S3 URL value object: parse, validate, join and display ``s3://bucket/key``."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from runctl.exceptions import S3URLError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


@functools.lru_cache(maxsize=64)
def _bucket_problem(bucket: str) -> str | None:
    """What is wrong with a bucket name, or None (cached: a tree's URLs share one bucket)."""
    if not bucket:
        return "the bucket name is empty"
    # Underscores are not allowed by AWS but GCS and several S3-compatible stores accept them.
    if not _BUCKET_RE.match(bucket) or ".." in bucket or _IP_RE.match(bucket):
        return (
            f"bucket name {bucket!r} must be 3-63 characters of "
            "lowercase letters, digits, '.', '-' (starting and ending with a letter or digit)"
        )
    return None


def _check_bucket(bucket: str, raw: str) -> None:
    problem = _bucket_problem(bucket)
    if problem is not None:
        raise S3URLError(f"invalid S3 URL {raw!r}: {problem}")


#: Why a local name with bytes that are not UTF-8 is not sent: aws and the s5cmd binary refuse it
#: as well (runctl's s5cmd runs sent three such files to one key, "\ufffd" for each, exit 0).
NOT_UTF8 = "its name is not valid UTF-8, which every S3 key is (rename it)"


def not_utf8(name: str) -> bool:
    """True for a local name (``os.fsdecode``: surrogate escapes) that no S3 key can spell.

    Example:
        >>> import os
        >>> not_utf8("step_1.pt"), not_utf8("café.pt"), not_utf8(os.fsdecode(b"x\\xe9"))
        (False, False, True)
    """
    if name.isascii():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True, order=True)
class S3URL:
    """An S3 location: a bucket plus a key, which may be empty (the bucket root).

    A key ending in ``/`` is a prefix ("directory"); any other non-empty key names
    one object. ``s3://bucket`` and ``s3://bucket/`` both mean the bucket root.

    Example:
        >>> url = S3URL.parse("s3://my-bucket/runs/7/")
        >>> url.is_prefix, str(url.join("step_10.pt"))
        (True, 's3://my-bucket/runs/7/step_10.pt')
    """

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        if _bucket_problem(self.bucket) is not None:
            _check_bucket(self.bucket, f"s3://{self.bucket}/{self.key}")

    @classmethod
    def parse(cls, text: str) -> S3URL:
        """Parse ``s3://bucket[/key]``; raise ``S3URLError`` naming what is wrong.

        Example:
            >>> S3URL.parse("s3://bkt/ckpt/step_1.pt").key
            'ckpt/step_1.pt'
        """
        if not isinstance(text, str):
            raise S3URLError(f"invalid S3 URL {text!r}: expected a string like s3://bucket/prefix/")
        # Only leading blanks go: a key may legitimately end in a space.
        raw = text.lstrip()
        if not raw.startswith("s3://"):
            scheme = raw.split(":", 1)[0] if ":" in raw else ""
            hint = f" (scheme {scheme!r} is not s3)" if scheme and scheme != "s3" else ""
            raise S3URLError(f"invalid S3 URL {text!r}: must start with s3://{hint}")
        rest = raw[len("s3://") :]
        bucket, _, key = rest.partition("/")
        _check_bucket(bucket, text)
        if "\x00" in key:
            raise S3URLError(f"invalid S3 URL {text!r}: key contains a NUL character")
        try:
            encoded = key.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell could not decode: S3 keys are UTF-8
            raise S3URLError(f"invalid S3 URL {text!r}: the key is not valid UTF-8") from None
        if len(encoded) > 1024:
            raise S3URLError(f"invalid S3 URL {text!r}: key is longer than 1024 bytes")
        return cls(bucket, key)

    @property
    def is_bucket(self) -> bool:
        """True for the bucket root (``s3://bucket`` or ``s3://bucket/``)."""
        return self.key == ""

    @property
    def is_prefix(self) -> bool:
        """True when this names a "directory": the bucket root or a key ending in ``/``."""
        return self.key == "" or self.key.endswith("/")

    @property
    def name(self) -> str:
        """The last path component (``step_1.pt`` of ``s3://bkt/run/step_1.pt``; ``run`` of ``s3://bkt/run/``)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def as_prefix(self) -> S3URL:
        """The same location as a directory: ``s3://bkt/run`` becomes ``s3://bkt/run/``.

        Example:
            >>> str(S3URL.parse("s3://bkt/run").as_prefix())
            's3://bkt/run/'
        """
        if self.is_prefix:
            return self
        return S3URL(self.bucket, self.key + "/")

    def join(self, *parts: str) -> S3URL:
        """Append path parts below this prefix (``/`` is added after a non-prefix key).

        Example:
            >>> str(S3URL.parse("s3://bkt/run").join("ckpt", "a.pt"))
            's3://bkt/run/ckpt/a.pt'
        """
        key = self.key
        for part in parts:
            if not part:
                continue
            if key and not key.endswith("/"):
                key += "/"
            key += part.lstrip("/") if key else part
        return S3URL(self.bucket, key)

    def relative_key(self, key: str) -> str:
        """``key`` relative to this prefix (``run/a/b.pt`` under ``s3://bkt/run/`` is ``a/b.pt``).

        Raises:
            S3URLError: if ``key`` is not strictly inside this prefix.
        """
        prefix = self.as_prefix().key
        if not key.startswith(prefix) or key == prefix:
            raise S3URLError(f"key {key!r} is not inside {self}")
        return key[len(prefix) :]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"
