"""A small frozen retry policy: exponential backoff with a cap and jitter, and which errors to retry."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from runctl.exceptions import (
    AccessDeniedError,
    BinaryNotFoundError,
    NoSuchBucketError,
    PartialTransferError,
    TransferError,
    UsageError,
)

#: Refusals that end once the credentials are renewed (temporary ones expire and are refreshed):
#: not retried at once, but a checkpoint refused so gets another round once a later one lands,
#: as one S3 failed to take does (after a 12 s window of them, a run ended with UploadError
#: naming checkpoints that a retry would have landed; fault pass).
RENEWED_CODES: frozenset[str] = frozenset({"ExpiredToken", "InvalidToken", "RequestExpired"})

#: S3 error codes that no amount of waiting fixes.
PERMANENT_CODES: frozenset[str] = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "Forbidden",
        "NoCredentials",
        "NoSuchBucket",
        "InvalidBucketName",
        "LocalFileNotFound",
        "LocalAccessDenied",  # this machine refused runctl a file: no retry fixes that
        "LocalNameNotUTF8",  # a local name no S3 key can spell
        # The endpoint's certificate is not one this machine trusts, or the CA file is missing:
        # retried, each checkpoint spent 14-22 s failing the same way (config pass).
        "CertificateError",
        "LoadCustomCABundleError",
        # The bucket is in another region than the one configured: s5cmd does not follow.
        "BucketRegionError",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        # The request itself is refused (a key the server will not store: rclone's "Object name
        # contains unsupported characters" for a/../b/): retried 5 times, 15 s a checkpoint
        # (API pass).
        "InvalidArgument",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failed upload (like urllib3's ``Retry``).

    ``attempts`` counts every try, the first included. Before retry ``n`` (1-based) the wait is
    ``min(backoff_max, backoff_factor * 2 ** (n - 1))``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` and capped again at ``backoff_max``.

    Example:
        >>> policy = RetryPolicy(attempts=4, backoff_factor=1.0, backoff_max=3.0, jitter=0.0)
        >>> [policy.delay(n) for n in (1, 2, 3)]
        [1.0, 2.0, 3.0]
    """

    attempts: int = 5
    backoff_factor: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.25
    permanent_codes: frozenset[str] = field(default=PERMANENT_CODES)

    def __post_init__(self) -> None:
        if (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or self.attempts < 1
        ):
            raise UsageError(
                f"RetryPolicy attempts must be an integer >= 1 (got {self.attempts!r})"
            )
        for name in ("backoff_factor", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UsageError(f"RetryPolicy {name} must be a number >= 0 (got {value!r})")
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, (int, float))
            or not 0 <= self.jitter <= 1
        ):
            raise UsageError(f"RetryPolicy jitter must be a number in [0, 1] (got {self.jitter!r})")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        base = min(self.backoff_max, self.backoff_factor * (2 ** max(0, retry - 1)))
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, min(self.backoff_max, base))

    def wait(self, retry: int, interrupt: threading.Event) -> bool:
        """Wait before retry ``retry``; return True at once if ``interrupt`` is set meanwhile."""
        return interrupt.wait(self.delay(retry))

    def is_retryable(self, exc: BaseException) -> bool:
        """False for errors a retry cannot fix: refused credentials, a missing bucket, bad input.

        Example:
            >>> RetryPolicy().is_retryable(TransferError("boom", code="SlowDown"))
            True
            >>> RetryPolicy().is_retryable(TransferError("no", code="AccessDenied"))
            False
            >>> RetryPolicy().is_retryable(TransferError("unsupported characters", code="InvalidArgument"))
            False
        """
        if isinstance(exc, (AccessDeniedError, NoSuchBucketError, UsageError, BinaryNotFoundError)):
            return False
        if isinstance(exc, TransferError):
            if exc.code in self.permanent_codes:
                return False
            if isinstance(exc, PartialTransferError) and exc.failures:
                # Only when every item failed for a permanent reason is the batch hopeless.
                return not all(
                    any(code in reason for code in self.permanent_codes)
                    for reason in exc.failures.values()
                )
            return True
        if isinstance(exc, FileNotFoundError):
            return False
        return isinstance(exc, (OSError, TimeoutError))
