"""The review's price table and cost arithmetic: documented defaults, overrides, exact sums per storage class."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from runctl.cli.monitor import money
from runctl.config import S3Config
from runctl.exceptions import UsageError
from runctl.review import DEFAULT_PRICES, GB, load_prices, monthly_cost, review
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, PrefixInfo

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


class ListingOnly:
    """A transfer that only lists a fixed set of objects (review needs nothing else without multipart)."""

    name = "listing"
    config = S3Config()

    def __init__(self, objects: list[ObjectInfo]) -> None:
        self.objects = objects

    def iter_objects(self, url: S3URL, *, recursive: bool = True) -> Iterator[ObjectInfo | PrefixInfo]:
        return iter([o for o in self.objects if o.key.startswith(url.key)])


def obj(key: str, size: int, storage_class: str | None = "STANDARD") -> ObjectInfo:
    return ObjectInfo("bkt", key, size, T0, etag="e", storage_class=storage_class)


def test_default_prices_cover_every_documented_class() -> None:
    assert set(DEFAULT_PRICES) == {
        "STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
        "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE", "REDUCED_REDUNDANCY",
    }
    assert all(0 < p < 0.1 for p in DEFAULT_PRICES.values())
    assert DEFAULT_PRICES["DEEP_ARCHIVE"] < DEFAULT_PRICES["GLACIER"] < DEFAULT_PRICES["STANDARD_IA"] < DEFAULT_PRICES["STANDARD"]


def test_monthly_cost_is_size_in_gib_times_price() -> None:
    assert monthly_cost(GB, 0.023) == 0.023
    assert monthly_cost(10 * GB, 0.0125) == pytest.approx(0.125, rel=1e-15)
    assert monthly_cost(0, 1.0) == 0.0


def test_price_file_overrides_are_merged_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"standard": 0.02, "MY_CLASS": 1}))
    prices = load_prices(path)
    assert prices["STANDARD"] == 0.02 and prices["MY_CLASS"] == 1.0
    assert prices["GLACIER"] == DEFAULT_PRICES["GLACIER"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"STANDARD": -1}', "'STANDARD' must be a non-negative number, got -1"),
        ('{"STANDARD": "cheap"}', "got 'cheap'"),
        ('{"STANDARD": true}', "got True"),
    ],
)
def test_bad_price_file_is_one_clear_usage_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        load_prices(path)
    assert str(path) in str(info.value)


def test_missing_price_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope.json"):
        load_prices(tmp_path / "nope.json")


def test_review_costs_sum_exactly_per_storage_class() -> None:
    objects = [
        obj("run/step_1.pt", 3 * GB),
        obj("run/step_2.pt", 5 * GB, "STANDARD_IA"),
        obj("run/checkpoint-3/model.bin", 123_456_789, "GLACIER"),
        obj("run/checkpoint-3/.runctl-manifest.json", 200, "GLACIER"),
        obj("run/train.log", 1_000, None),  # no class reported: billed as STANDARD
        obj("run/odd.bin", 2 * GB, "SOMETHING_NEW"),
        obj("other/step_9.pt", 7 * GB),  # outside the prefix: not listed, not counted
    ]
    prices = {"STANDARD_IA": 0.01}
    result = review(ListingOnly(objects), S3URL("bkt", "run/"), prices=prices, include_multipart=False)  # type: ignore[arg-type]
    costs = {c.storage_class: c for c in result.costs}
    assert set(costs) == {"STANDARD", "STANDARD_IA", "GLACIER", "SOMETHING_NEW"}
    assert costs["STANDARD"].size == 3 * GB + 1_000 and costs["STANDARD"].objects == 2
    assert costs["STANDARD"].monthly_cost == (3 * GB + 1_000) / GB * DEFAULT_PRICES["STANDARD"]
    assert costs["STANDARD_IA"].monthly_cost == 5 * 0.01
    assert costs["GLACIER"].monthly_cost == (123_456_789 + 200) / GB * DEFAULT_PRICES["GLACIER"]
    assert costs["SOMETHING_NEW"].monthly_cost is None and costs["SOMETHING_NEW"].price_per_gb_month is None
    expected = sum(costs[c].monthly_cost for c in ("GLACIER", "STANDARD", "STANDARD_IA"))  # type: ignore[misc]
    assert result.total_monthly_cost == expected
    assert any("SOMETHING_NEW" in w for w in result.warnings)
    assert result.objects == 6 and result.size == sum(o.size for o in objects[:6])
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["cost"]["total_monthly"] == expected
    assert doc["incomplete"] == [] and doc["totals"]["checkpoints"] == 3
    assert [o["key"] for o in doc["others"]] == ["run/odd.bin", "run/train.log"]


def test_review_rejects_a_negative_threshold() -> None:
    with pytest.raises(UsageError, match="abandoned_after"):
        review(ListingOnly([]), S3URL("bkt", "run/"), abandoned_after=-1, include_multipart=False)  # type: ignore[arg-type]


def test_money_never_rounds_a_real_cost_to_zero() -> None:
    assert money(0.0) == "0"
    assert money(3.2e-08) == "3.20e-08"
    assert money(12.5) == "12.5000"
