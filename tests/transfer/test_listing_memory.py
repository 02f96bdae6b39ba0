"""Listing streams: walking 20,000 keys takes no more memory than walking 2,000."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator

import pytest

from runctl.s3url import S3URL
from runctl.transfer import get_transfer
from runctl.transfer.base import ObjectInfo, PrefixInfo
from tests.servers import S3Server, start_rclone

SIZES = {"small": 2_000, "large": 20_000, "quick-small": 2_000, "quick-large": 6_000}
BUCKET = "listing-memory"


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An rclone S3 server (its own process, so tracemalloc sees only our side) over a tree made on disk.

    Writing the files straight into the served directory takes a second; 20,000 PUTs to a
    loopback server would take about a minute on a small machine.
    """
    data = tmp_path_factory.mktemp("rclone-listing")
    for prefix, count in SIZES.items():
        for i in range(count):
            directory = data / BUCKET / prefix / f"d{i % 20:02d}"
            if i < 20:
                directory.mkdir(parents=True)
            (directory / f"key-{i:06d}.bin").write_bytes(b"x")
    server = start_rclone(data)
    yield server
    server.stop()


def peak_while_listing(transfer: object, url: S3URL, *, recursive: bool = True) -> tuple[int, int]:
    """(items seen, peak bytes traced) for consuming the listing one item at a time."""
    gc.collect()
    tracemalloc.start()
    try:
        seen = 0
        for entry in transfer.iter_objects(url, recursive=recursive):  # type: ignore[attr-defined]
            assert isinstance(entry, (ObjectInfo, PrefixInfo))
            seen += 1
        return seen, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "small, large",
    [
        pytest.param("quick-small", "quick-large", id="2k-vs-6k"),
        # About 15 s per backend on two shared cores, so it runs with the slow suite.
        pytest.param("small", "large", id="2k-vs-20k", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("backend", ["s5cmd", "boto3"])
def test_listing_memory_does_not_grow_with_key_count(
    populated: S3Server, backend: str, small: str, large: str
) -> None:
    transfer = get_transfer(populated.config(), use_s5cmd=backend == "s5cmd")
    try:
        # Warm up (client creation, imports) so neither measurement pays for it.
        peak_while_listing(transfer, S3URL(BUCKET, f"{small}/d00/"))
        small_seen, small_peak = peak_while_listing(transfer, S3URL(BUCKET, f"{small}/"))
        large_seen, large_peak = peak_while_listing(transfer, S3URL(BUCKET, f"{large}/"))
    finally:
        transfer.close()
    assert (small_seen, large_seen) == (SIZES[small], SIZES[large])
    # A stream holds about one page whatever the key count; holding every entry costs about
    # 400 bytes a key (1.4x the peak at 6,000 keys, 3x at 20,000). Allow a little noise.
    assert large_peak < 1.15 * small_peak + 256 * 1024, (backend, small_peak, large_peak)
