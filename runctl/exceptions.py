"""The one exception tree: every error runctl raises is a ``RunctlError``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Exit codes the CLI maps errors to (documented in the README).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the CLI's main thread so that Ctrl-C's clean-up runs for it too.

    A ``KeyboardInterrupt`` so that every ``except KeyboardInterrupt`` stops children, aborts
    unfinished multipart uploads and removes temporary files alike; the CLI exits 143 for it.
    """


def interrupted_exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (128 + the signal, as a shell reports it).

    Example:
        >>> interrupted_exit_code(KeyboardInterrupt()), interrupted_exit_code(Terminated())
        (130, 143)
    """
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


class RunctlError(Exception):
    """Root of every runctl error; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EXIT_FAILED


class UsageError(RunctlError, ValueError):
    """Bad input from a person or a caller: a flag, a value, a path."""

    exit_code = EXIT_USAGE


class S3URLError(UsageError):
    """A string that is not a valid ``s3://bucket[/key]`` URL."""


class ConfigError(UsageError):
    """Endpoint, profile, region or credentials that cannot be used."""


class BinaryNotFoundError(RunctlError, FileNotFoundError):
    """The s5cmd binary is missing or cannot run."""

    exit_code = EXIT_USAGE


class TransferError(RunctlError):
    """An S3 operation failed.

    Args:
        message: what failed, already scrubbed of credentials.
        code: the S3 error code when known (``NoSuchBucket``, ``AccessDenied``, ...).
        url: the object or prefix concerned, when there is one.
        failures: for a batch that failed whole for one cause, each item's own reason (a
            caller naming the items does not repeat ``message``, which sums them up, per item).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        url: str | None = None,
        failures: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.url = url
        self.failures = dict(failures or {})

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code and self.code not in self.message else self.message

    def reason_for(self, item: str) -> str:
        """Why ``item`` of the batch failed: its own reason when the error has one, else the whole.

        Example:
            >>> TransferError("2 failed: ...", failures={"s3://b/k": "refused"}).reason_for("s3://b/k")
            'refused'
        """
        return self.failures.get(item, str(self))


class NoSuchBucketError(TransferError, LookupError):
    """The bucket does not exist."""

    exit_code = EXIT_USAGE


class NoSuchKeyError(TransferError, FileNotFoundError):
    """The object or prefix does not exist."""

    exit_code = EXIT_USAGE


class AccessDeniedError(TransferError, PermissionError):
    """The credentials were refused (AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch)."""


class MissingCredentialsError(AccessDeniedError):
    """No credentials were found (none in the environment, the files or a role): a setting to
    fix, exit 2 as a missing profile's is."""

    exit_code = EXIT_USAGE


class EndpointError(TransferError, ConnectionError):
    """The endpoint could not be reached."""


class StreamClosedError(TransferError, BrokenPipeError):
    """The reader of a download streamed to stdout closed it first (a broken pipe).

    A ``BrokenPipeError`` too: the CLI stops quietly, exit 1, as for ``runctl s3 list | head``.
    """


class UnsafeKeyError(TransferError):
    """An S3 key that would land outside the download destination."""


class PartialTransferError(TransferError):
    """Some objects of a batch failed; ``failures`` maps each one to its reason.

    ``done``, when the operation says, is what it did carry out, in the shape it returns on
    success (so a caller can report the copies that landed beside the ones that failed).
    """

    def __init__(
        self,
        message: str,
        failures: dict[str, str],
        *,
        code: str | None = None,
        done: Any = None,
    ) -> None:
        super().__init__(message, code=code, failures=failures)
        self.done = done


class SubprocessError(TransferError):
    """A child process (s5cmd) failed; carries return code, command and output, scrubbed."""

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None,
        cmd: Sequence[str],
        output: str = "",
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.returncode = returncode
        self.cmd = list(cmd)
        self.output = output


class MarkerError(RunctlError, ValueError):
    """A checkpoint marker (manifest) that cannot be parsed or does not match."""


class JournalError(RunctlError):
    """The upload journal cannot be read or written."""


class LockTimeout(RunctlError, TimeoutError):
    """A retention lock could not be taken in time."""


class UploadError(RunctlError):
    """One or more checkpoints failed to upload; ``failures`` maps each name to its cause."""

    def __init__(self, failures: dict[str, BaseException | str]) -> None:
        self.failures = dict(failures)
        super().__init__(_failed_to_upload(self.failures))


def _failed_to_upload(failures: dict[str, BaseException | str]) -> str:
    parts = [f"{name}: {cause}" for name, cause in failures.items()]
    noun = "checkpoint" if len(parts) == 1 else "checkpoints"
    return f"{len(parts)} {noun} failed to upload: " + "; ".join(parts)


class FlushTimeout(UploadError, TimeoutError):
    """``flush(timeout)`` ran out of time; ``pending`` names what is still queued or uploading."""

    def __init__(self, pending: Sequence[str], failures: dict[str, BaseException | str] | None = None) -> None:
        self.pending = list(pending)
        super().__init__(dict(failures or {}))
        message = f"flush timed out with {len(self.pending)} pending: " + ", ".join(self.pending)
        if self.failures:
            message += "; " + _failed_to_upload(self.failures)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])
