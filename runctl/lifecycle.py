"""S3 lifecycle rules scoped to one prefix, merged with the bucket's other rules instead of replacing them."""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runctl.exceptions import UsageError
from runctl.s3url import S3URL

log = logging.getLogger("runctl.lifecycle")

#: Every rule runctl writes has an ID starting with this; others are never touched.
RULE_ID_PREFIX = "runctl-"
#: Storage classes a lifecycle rule can transition objects to.
TRANSITION_CLASSES = (
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
)
_MAX_ID = 255

Rule = dict[str, Any]


def rule_id(prefix: S3URL) -> str:
    """The ID of runctl's rule for a prefix: ``runctl-<key>`` (hashed when too long for S3's 255).

    Example:
        >>> rule_id(S3URL.parse("s3://bkt/run-7/"))
        'runctl-run-7/'
    """
    key = prefix.as_prefix().key
    text = RULE_ID_PREFIX + (key or "*")
    if len(text) <= _MAX_ID:
        return text
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return text[: _MAX_ID - 17] + "~" + digest


@dataclass(frozen=True)
class LifecycleSpec:
    """What runctl's rule for a prefix does; validated on construction (``UsageError`` names the flag).

    Example:
        >>> LifecycleSpec(expire_days=30, abort_incomplete_multipart_days=7).describe()
        'expire objects after 30 days; abort incomplete multipart uploads after 7 days'
    """

    expire_days: int | None = None
    abort_incomplete_multipart_days: int | None = None
    transition_days: int | None = None
    storage_class: str | None = None

    def __post_init__(self) -> None:
        if all(
            v is None
            for v in (self.expire_days, self.abort_incomplete_multipart_days, self.transition_days)
        ):
            if self.storage_class is not None:
                raise UsageError("--storage-class needs --transition-days N")
            raise UsageError(
                "give at least one of --expire-days, --abort-incomplete-multipart-days, "
                "--transition-days with --storage-class"
            )
        for value, flag, least in (
            (self.expire_days, "--expire-days", 1),
            (self.abort_incomplete_multipart_days, "--abort-incomplete-multipart-days", 1),
            (self.transition_days, "--transition-days", 0),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise UsageError(f"{flag} must be a whole number of days >= {least}, got {value!r}")
        if self.transition_days is not None and self.storage_class is None:
            raise UsageError(
                "--transition-days needs --storage-class CLASS (one of "
                + ", ".join(TRANSITION_CLASSES)
                + ")"
            )
        if self.storage_class is not None:
            if self.transition_days is None:
                raise UsageError("--storage-class needs --transition-days N")
            upper = self.storage_class.strip().upper()
            if upper not in TRANSITION_CLASSES:
                raise UsageError(
                    f"--storage-class must be one of {', '.join(TRANSITION_CLASSES)}, got {self.storage_class!r}"
                )
            object.__setattr__(self, "storage_class", upper)
        if (
            self.expire_days is not None
            and self.transition_days is not None
            and self.expire_days <= self.transition_days
        ):
            raise UsageError(
                f"--expire-days ({self.expire_days}) must be later than --transition-days ({self.transition_days})"
            )

    def describe(self) -> str:
        """One readable line of what the rule does."""
        parts = []
        if self.transition_days is not None:
            parts.append(
                f"move objects to {self.storage_class} after {_days(self.transition_days)}"
            )
        if self.expire_days is not None:
            parts.append(f"expire objects after {_days(self.expire_days)}")
        if self.abort_incomplete_multipart_days is not None:
            parts.append(
                f"abort incomplete multipart uploads after {_days(self.abort_incomplete_multipart_days)}"
            )
        return "; ".join(parts)


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def build_rule(prefix: S3URL, spec: LifecycleSpec) -> Rule:
    """runctl's rule for ``prefix`` (``Filter.Prefix`` is the prefix, with its trailing slash).

    Example:
        >>> rule = build_rule(S3URL.parse("s3://bkt/run"), LifecycleSpec(expire_days=3))
        >>> rule["ID"], rule["Filter"], rule["Expiration"]
        ('runctl-run/', {'Prefix': 'run/'}, {'Days': 3})
    """
    key = prefix.as_prefix().key
    rule: Rule = {"ID": rule_id(prefix), "Filter": {"Prefix": key}, "Status": "Enabled"}
    if spec.transition_days is not None:
        rule["Transitions"] = [{"Days": spec.transition_days, "StorageClass": spec.storage_class}]
    if spec.expire_days is not None:
        rule["Expiration"] = {"Days": spec.expire_days}
    if spec.abort_incomplete_multipart_days is not None:
        rule["AbortIncompleteMultipartUpload"] = {
            "DaysAfterInitiation": spec.abort_incomplete_multipart_days
        }
    return rule


def rule_prefix(rule: Mapping[str, Any]) -> str:
    """The key prefix a rule is scoped to ("" for the whole bucket), whatever form its filter takes.

    Example:
        >>> rule_prefix({"Filter": {"And": {"Prefix": "a/", "Tags": []}}}), rule_prefix({"Prefix": "b/"})
        ('a/', 'b/')
    """
    rule_filter = rule.get("Filter")
    if isinstance(rule_filter, Mapping):
        if "Prefix" in rule_filter:
            return str(rule_filter.get("Prefix") or "")
        and_filter = rule_filter.get("And")
        if isinstance(and_filter, Mapping):
            return str(and_filter.get("Prefix") or "")
        return ""
    return str(rule.get("Prefix") or "")


def _tag_scoped(rule: Mapping[str, Any]) -> bool:
    rule_filter = rule.get("Filter")
    if not isinstance(rule_filter, Mapping):
        return False
    and_filter = rule_filter.get("And")
    return "Tag" in rule_filter or (
        isinstance(and_filter, Mapping) and bool(and_filter.get("Tags"))
    )


def merge_rules(existing: Sequence[Mapping[str, Any]], rule: Mapping[str, Any]) -> list[Rule]:
    """``existing`` with ``rule`` in place of the rule of the same ID (appended when there is none).

    Example:
        >>> old = [{"ID": "keep-me"}, {"ID": "runctl-a/", "Status": "Enabled"}]
        >>> [r["ID"] for r in merge_rules(old, {"ID": "runctl-a/", "Status": "Disabled"})]
        ['keep-me', 'runctl-a/']
    """
    merged = [copy.deepcopy(dict(r)) for r in existing]
    for i, current in enumerate(merged):
        if current.get("ID") == rule["ID"]:
            merged[i] = copy.deepcopy(dict(rule))
            return merged
    merged.append(copy.deepcopy(dict(rule)))
    return merged


def remove_rule(existing: Sequence[Mapping[str, Any]], prefix: S3URL) -> list[Rule]:
    """``existing`` without runctl's rule for ``prefix`` (other rules untouched).

    Example:
        >>> rules = [{"ID": "runctl-a/"}, {"ID": "other"}]
        >>> remove_rule(rules, S3URL.parse("s3://bkt/a/"))
        [{'ID': 'other'}]
    """
    wanted = rule_id(prefix)
    return [copy.deepcopy(dict(r)) for r in existing if r.get("ID") != wanted]


def _clean(rule: Mapping[str, Any]) -> Rule:
    """A rule as read back, in the shape PutBucketLifecycleConfiguration accepts."""
    cleaned = copy.deepcopy(dict(rule))
    expiration = cleaned.get("Expiration")
    if isinstance(expiration, dict):
        # Some servers return ExpiredObjectDeleteMarker=False next to Days/Date, which S3 refuses.
        if ("Days" in expiration or "Date" in expiration) and not expiration.get(
            "ExpiredObjectDeleteMarker"
        ):
            expiration.pop("ExpiredObjectDeleteMarker", None)
    if "Filter" in cleaned and "Prefix" in cleaned and not cleaned["Prefix"]:
        cleaned.pop("Prefix")  # both forms at once is refused; the Filter is the one that counts
    return cleaned


def get_rules(client: Any, bucket: str) -> list[Rule]:
    """The bucket's lifecycle rules ([] when it has none).

    Raises:
        TransferError: (NoSuchBucketError, AccessDeniedError, ...) the request failed.
    """
    from botocore.exceptions import ClientError

    from runctl.transfer.boto import map_error

    try:
        response = client.get_bucket_lifecycle_configuration(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
            return []
        raise map_error(exc, f"s3://{bucket}/", "reading the lifecycle configuration of") from None
    except Exception as exc:
        raise map_error(exc, f"s3://{bucket}/", "reading the lifecycle configuration of") from None
    return [_clean(r) for r in response.get("Rules", []) or []]


def put_rules(client: Any, bucket: str, rules: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rules`` as the bucket's whole lifecycle configuration (deleting it when empty)."""
    from runctl.transfer.boto import map_error

    try:
        if rules:
            client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": [dict(r) for r in rules]}
            )
        else:
            client.delete_bucket_lifecycle(Bucket=bucket)
    except Exception as exc:
        raise map_error(exc, f"s3://{bucket}/", "writing the lifecycle configuration of") from None


@dataclass(frozen=True)
class LifecycleChange:
    """The bucket's rules before and after a ``set``/``clear`` (``written`` is False on a dry run).

    Example:
        >>> LifecycleChange("bkt", "run/", "runctl-run/", (), ({"ID": "runctl-run/"},), False).changed
        True
    """

    bucket: str
    prefix: str
    rule_id: str
    before: tuple[Rule, ...]
    after: tuple[Rule, ...]
    written: bool

    @property
    def changed(self) -> bool:
        return list(self.before) != list(self.after)

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "rule_id": self.rule_id,
            "changed": self.changed,
            "written": self.written,
            "before": {"Rules": list(self.before)},
            "after": {"Rules": list(self.after)},
        }


def set_rule(
    client: Any, prefix: S3URL, spec: LifecycleSpec, *, dry_run: bool = False
) -> LifecycleChange:
    """Put runctl's rule for ``prefix``, keeping every other rule of the bucket.

    Re-running replaces only runctl's rule for this prefix.

    Example:
        >>> set_rule(client, S3URL.parse("s3://bkt/run/"), LifecycleSpec(expire_days=30))  # doctest: +SKIP
    """
    prefix = prefix.as_prefix()
    before = get_rules(client, prefix.bucket)
    after = merge_rules(before, build_rule(prefix, spec))
    written = False
    if not dry_run and after != before:
        put_rules(client, prefix.bucket, after)
        written = True
        log.info("lifecycle rule %s set on s3://%s/", rule_id(prefix), prefix.bucket)
    return LifecycleChange(
        prefix.bucket, prefix.key, rule_id(prefix), tuple(before), tuple(after), written
    )


def clear_rule(client: Any, prefix: S3URL, *, dry_run: bool = False) -> LifecycleChange:
    """Remove runctl's rule for ``prefix`` (nothing else); no-op when there is none.

    Example:
        >>> clear_rule(client, S3URL.parse("s3://bkt/run/")).changed  # doctest: +SKIP
        True
    """
    prefix = prefix.as_prefix()
    before = get_rules(client, prefix.bucket)
    after = remove_rule(before, prefix)
    written = False
    if not dry_run and after != before:
        put_rules(client, prefix.bucket, after)
        written = True
    return LifecycleChange(
        prefix.bucket, prefix.key, rule_id(prefix), tuple(before), tuple(after), written
    )


def applies_to(rule: Mapping[str, Any], prefix: S3URL) -> bool:
    """True when the rule reaches objects under ``prefix`` (its prefix contains or lies inside it).

    Example:
        >>> p = S3URL.parse("s3://bkt/run/")
        >>> applies_to({"Filter": {"Prefix": ""}}, p), applies_to({"Filter": {"Prefix": "other/"}}, p)
        (True, False)
    """
    key = prefix.as_prefix().key
    scope = rule_prefix(rule)
    return key.startswith(scope) or scope.startswith(key)


def has_abort_multipart_rule(client: Any, bucket: str, prefix: str) -> bool:
    """True when an enabled rule aborts incomplete multipart uploads for every key under ``prefix``.

    A rule counts when its prefix is a prefix of ``prefix`` (or it covers the whole bucket) and it
    is not scoped by tags (multipart uploads carry none).

    Raises:
        TransferError: the configuration could not be read (other than "there is none").

    Example:
        >>> has_abort_multipart_rule(client, "bkt", "run-7/")  # doctest: +SKIP
        False
    """
    for rule in get_rules(client, bucket):
        if rule.get("Status") != "Enabled" or "AbortIncompleteMultipartUpload" not in rule:
            continue
        if _tag_scoped(rule):
            continue
        if prefix.startswith(rule_prefix(rule)):
            return True
    return False


def describe_rule(rule: Mapping[str, Any]) -> str:
    """What a rule does, in words.

    Example:
        >>> describe_rule({"Expiration": {"Days": 30}, "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}})
        'expire after 30 days; abort incomplete multipart uploads after 7 days'
    """
    parts = []
    for transition in rule.get("Transitions", []) or []:
        when = (
            f"after {_days(transition['Days'])}"
            if "Days" in transition
            else f"on {transition.get('Date')}"
        )
        parts.append(f"move to {transition.get('StorageClass')} {when}")
    expiration = rule.get("Expiration") or {}
    if "Days" in expiration:
        parts.append(f"expire after {_days(expiration['Days'])}")
    elif "Date" in expiration:
        parts.append(f"expire on {expiration['Date']}")
    if expiration.get("ExpiredObjectDeleteMarker"):
        parts.append("remove expired delete markers")
    abort = rule.get("AbortIncompleteMultipartUpload") or {}
    if "DaysAfterInitiation" in abort:
        parts.append(
            f"abort incomplete multipart uploads after {_days(abort['DaysAfterInitiation'])}"
        )
    noncurrent = rule.get("NoncurrentVersionExpiration") or {}
    if "NoncurrentDays" in noncurrent:
        parts.append(f"expire old versions after {_days(noncurrent['NoncurrentDays'])}")
    for transition in rule.get("NoncurrentVersionTransitions", []) or []:
        if "NoncurrentDays" in transition:
            parts.append(
                f"move old versions to {transition.get('StorageClass')} after {_days(transition['NoncurrentDays'])}"
            )
    return "; ".join(parts) or "no actions"
