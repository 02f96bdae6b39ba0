"""The transfer interface every backend implements, and the values it passes around."""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from runctl.config import S3Config
from runctl.s3url import S3URL

MiB = 1024 * 1024
#: S3 caps a multipart upload at 10,000 parts; we leave headroom.
MAX_PARTS = 9_000
DEFAULT_PART_SIZE = 50 * MiB
#: DeleteObjects takes at most 1,000 keys per call.
DELETE_BATCH = 1_000

#: Called with a number of bytes just moved.
ProgressCallback = Callable[[int], None]

#: What an S3 XML body cannot carry as itself: the characters XML 1.0 has no place for, and a
#: carriage return, which every XML parser reads as a newline.
_NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\r\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(key: str) -> bool:
    r"""Whether ``key`` goes into an XML body (DeleteObjects) and reaches S3 unchanged.

    A key with a control character does not: s5cmd (Go's encoding/xml) writes U+FFFD in its
    place, and S3 deleted whichever key has U+FFFD there, in another prefix too (keys pass);
    botocore writes it as it is, and S3 refuses the whole batch (MalformedXML). Such a key is
    deleted on its own, its name in the request's path. A listing read from XML without
    ``EncodingType=url`` loses the same characters.

    Example:
        >>> xml_safe("run/step 1.pt"), xml_safe("run/step\x1b1.pt"), xml_safe("run/a\rb")
        (True, False, False)
    """
    return _NOT_IN_XML.search(key) is None


def part_size_for(size: int, default: int = DEFAULT_PART_SIZE) -> int:
    """Multipart part size (whole MiB) that keeps ``size`` under S3's 10,000-part limit.

    Example:
        >>> part_size_for(1024**4) // MiB   # 1 TiB
        117
    """
    needed = math.ceil(size / MAX_PARTS) if size > 0 else 0
    return max(default, math.ceil(needed / MiB) * MiB)


#: A name's line breaks and tabs, written out: a one-line message collapses them to a space,
#: and a failed "new\nline.bin" read as "new line.bin", a file that had gone up (keys pass).
_SPELLED = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def failure_summary(failures: Mapping[str, str], shown: int = 5) -> str:
    r"""The first ``shown`` failures as ``name: reason`` pairs, then how many more there are.

    Example:
        >>> failure_summary({"s3://b/a": "NoSuchKey", "s3://b/c": "AccessDenied"}, shown=1)
        's3://b/a: NoSuchKey (and 1 more)'
        >>> print(failure_summary({"s3://b/new\nline.bin": "AccessDenied"}))
        s3://b/new\nline.bin: AccessDenied
    """
    first = itertools.islice(failures.items(), shown)
    head = "; ".join(f"{name.translate(_SPELLED)}: {reason}" for name, reason in first)
    return head + (f" (and {len(failures) - shown} more)" if len(failures) > shown else "")


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a listing."""

    bucket: str
    key: str
    size: int
    last_modified: datetime
    etag: str | None = None
    storage_class: str | None = None

    @property
    def url(self) -> S3URL:
        return S3URL(self.bucket, self.key)

    def to_json(self) -> dict[str, object]:
        return {
            "url": str(self.url),
            "key": self.key,
            "size": self.size,
            "last_modified": self.last_modified.isoformat(),
            "etag": self.etag,
            "storage_class": self.storage_class,
        }


@dataclass(frozen=True)
class PrefixInfo:
    """A common prefix ("directory") in a one-level listing; ``key`` ends with ``/``."""

    bucket: str
    key: str

    @property
    def url(self) -> S3URL:
        return S3URL(self.bucket, self.key)

    def to_json(self) -> dict[str, object]:
        return {"url": str(self.url), "key": self.key, "type": "prefix"}


@dataclass(frozen=True)
class BucketInfo:
    """One bucket in the listing of an account's buckets (``runctl s3 list`` without a bucket)."""

    name: str  # as S3 has it: a legacy bucket's name may hold capitals or '_', which S3URL refuses
    created: datetime

    def to_json(self) -> dict[str, object]:
        return {"url": f"s3://{self.name}/", "name": self.name, "created": self.created.isoformat()}


@dataclass(frozen=True)
class DeleteResult:
    """What a batched delete did: keys removed, and keys that failed with their reason."""

    deleted: int
    errors: dict[str, str] = field(default_factory=dict)


def kernel_abspath(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute as the kernel resolves it: ``os.path.abspath`` but for ``..``.

    ``abspath`` (and Go's ``filepath.Clean``, which s5cmd uses) drop ``x/..`` as text, where the
    kernel follows a symlink ``x`` first: with ``l`` a link to ``other/sub``, ``l/../f.pt`` is
    ``other/f.pt``, not ``./f.pt``. Such a path comes back with its directory resolved.

    Example:
        >>> kernel_abspath("/tmp/a/b.pt")
        '/tmp/a/b.pt'
    """
    text = os.fspath(path)
    if ".." not in text or ".." not in Path(text).parts:  # the string test first: 2,000 files a batch
        return os.path.abspath(text)
    head, tail = os.path.split(os.path.join(os.getcwd(), text))
    if tail in ("", ".", ".."):
        return os.path.realpath(text)
    return os.path.join(os.path.realpath(head), tail)


@runtime_checkable
class Transfer(Protocol):
    """One S3 backend. Both implementations obey the same contract and conformance tests.

    Paths and URLs are always explicit pairs: a backend never expands wildcards, and a key
    with ``*``, ``?`` or ``[`` is transferred literally (``put_tree`` may copy a directory
    whole, for a caller that vouches for its content, and ``get_tree`` may download a prefix
    whole into a directory the caller gives up to it). Containment (no file outside a
    destination) and atomic renames are the caller's (``runctl.transfer.ops``); a backend
    writes exactly the path it is given, or, in ``get_tree``, only inside the root it is given.
    """

    name: str
    config: S3Config

    def put_files(
        self,
        pairs: Sequence[tuple[Path, S3URL]],
        *,
        storage_class: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Upload each local file to exactly its URL (multipart where large).

        Raises:
            PartialTransferError: naming every pair that failed, after trying them all.
        """
        ...

    def put_tree(
        self,
        root: Path,
        pairs: Sequence[tuple[Path, S3URL]],
        *,
        storage_class: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[Path, S3URL, int | None]]:
        """``put_files`` for a whole directory: ``pairs`` are every file below ``root``, nothing else.

        The caller promises that ``root`` held exactly these regular files (no symlinks, no
        other entries) when it listed them, and that each goes to one prefix plus its path
        relative to ``root``; a backend may then copy the directory in one command rather than
        pair by pair. Same objects, same errors as ``put_files``, plus any file that appeared
        in ``root`` since (a directory copy walks it again): returned as ``(path, url, size of
        its object)``, ``[]`` when none did (a ``PartialTransferError``'s ``done`` when some of
        the pairs failed).

        Example:
            >>> t.put_tree(Path("ckpt"), [(Path("ckpt/a.pt"), S3URL.parse("s3://b/run/a.pt"))])  # doctest: +SKIP
            []
        """
        ...

    def get_files(
        self,
        pairs: Iterable[tuple[S3URL, Path]],
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Download each object to exactly the given path (parents already exist).

        ``pairs`` may be lazy (an iterator whose pairs are still coming): a backend may start
        on the first before the rest arrive. An exception from it is raised.

        Raises:
            PartialTransferError: naming every pair that failed, after trying them all.
        """
        ...

    def get_tree(
        self,
        prefix: S3URL,
        root: Path,
        pairs: Iterable[tuple[S3URL, Path]],
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """``get_files`` for objects below ``prefix``, each to ``root`` plus its key relative to it.

        The caller promises that ``root`` is an empty directory of its own, removed (with
        whatever else is in it) once the files are moved out, and that each path is
        ``root / key[len(prefix.key):]`` with its parent created. A backend may then download
        the whole prefix in one command, started before ``pairs`` (which may be lazy) are
        read: objects below ``prefix`` that are not in ``pairs`` may appear under ``root``
        too, and nothing appears outside it. An exception from ``pairs`` stops the download
        and is raised. Otherwise the same errors as ``get_files``, for the pairs only.

        Example:
            >>> t.get_tree(S3URL.parse("s3://b/run/"), Path("stage"), [(S3URL.parse("s3://b/run/a.pt"), Path("stage/a.pt"))])  # doctest: +SKIP
        """
        ...

    def iter_objects(self, url: S3URL, *, recursive: bool = True) -> Iterator[ObjectInfo | PrefixInfo]:
        """Stream objects whose key starts with ``url.key``, page by page, never all at once.

        With ``recursive=False`` the listing stops at the next ``/`` and yields
        ``PrefixInfo`` for the common prefixes.
        """
        ...

    def iter_buckets(self) -> Iterator[BucketInfo]:
        """The buckets the credentials' account owns (ListBuckets), in S3's order (by name)."""
        ...

    def delete_keys(self, bucket: str, keys: Iterable[str]) -> DeleteResult:
        """Delete keys in batches of at most 1,000 (DeleteObjects); a missing key is not an error."""
        ...

    def stat(self, url: S3URL) -> ObjectInfo | None:
        """The object's metadata, or None if it does not exist."""
        ...

    def unlisted(self, prefix: S3URL, rels: Sequence[str]) -> dict[str, ObjectInfo]:
        """Of these keys (``prefix``'s key + each of ``rels``), which a listing just made did not
        show, those in S3, by ``rels``.

        s5cmd's listing leaves out every object dated later than the moment its first page
        arrived (peak/s5cmd#531): on AWS one written a moment ago (dated up to a second
        ahead), on a server whose clock runs ahead of this machine's everything that recent.
        Where a listing says that something is missing, a caller asks here before acting on
        it; a backend whose listing shows everything answers ``{}`` without a request.

        Example:
            >>> transfer.unlisted(S3URL.parse("s3://b/run/step_4/"), ["shard_0.bin"])  # doctest: +SKIP
            {'shard_0.bin': ObjectInfo(bucket='b', key='run/step_4/shard_0.bin', ...)}
        """
        ...

    def put_stream(self, fd: int, url: S3URL, *, storage_class: str | None = None) -> None:
        """Upload everything read from the file descriptor ``fd``, to its end, as one object."""
        ...

    def get_stream(self, url: S3URL, fd: int) -> None:
        """Write one object's bytes to the file descriptor ``fd`` (StreamClosedError on a broken pipe)."""
        ...

    def put_bytes(self, data: bytes, url: S3URL) -> None:
        """Write a small object (markers, manifests) in one put."""
        ...

    def get_bytes(self, url: S3URL) -> bytes:
        """Read a small object whole."""
        ...

    def warm_up(self) -> None:
        """Prepare, in the background, for small requests (``put_bytes``, ``get_bytes``) soon after.

        Returns at once; the uploader calls it before a directory's files, whose manifest follows.

        Example:
            >>> transfer.warm_up()  # doctest: +SKIP
        """
        ...

    def close(self) -> None:
        """Release clients, pools and child processes."""
        ...
