"""GET /v1/admin/spend's parameters: defaults, both time spellings, 400s naming the
parameter (the sums themselves are tested on real databases in
tests/integration/test_keystore.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore.reports import SpendQuery, month_start, parse_when

NOW = datetime(2026, 12, 4, 21, 30, 15, tzinfo=UTC)


def test_defaults_are_this_utc_month_until_now_grouped_by_key() -> None:
    query = SpendQuery.parse(None, None, None, NOW)
    assert query == SpendQuery("key", datetime(2026, 12, 1, tzinfo=UTC), NOW)
    assert SpendQuery.parse("", "", "", NOW) == query
    # "Now" in another zone is still the UTC month's start.
    late = datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))  # 22:30 UTC on Nov 30
    assert month_start(late) == datetime(2026, 11, 1, tzinfo=UTC)


def test_group_by_spellings() -> None:
    assert SpendQuery.parse("model", None, None, NOW).group_by == "model"
    assert SpendQuery.parse("key,model", None, None, NOW).group_by == "key,model"
    assert SpendQuery.parse("model, key", None, None, NOW).group_by == "key,model"


def test_iso_and_unix_times() -> None:
    assert parse_when("from", "2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("from", "2026-11-01T10:00:00Z") == datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert parse_when("from", "2026-11-01T12:00:00+02:00") == datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert parse_when("from", "2026-11-01T10:00:00") == datetime(2026, 11, 1, 10, tzinfo=UTC)  # naive = UTC
    assert parse_when("to", "1764547200") == datetime(2025, 12, 1, tzinfo=UTC)
    assert parse_when("to", "1764547200.5") == datetime(2025, 12, 1, 0, 0, 0, 500000, tzinfo=UTC)
    query = SpendQuery.parse("key", "1764547200", "2026-11-01", NOW)
    assert (query.since, query.until) == (datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    # An empty window is allowed (it sums nothing).
    assert SpendQuery.parse("key", "2026-11-01", "2026-11-01", NOW).since == datetime(2026, 11, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("group_by", "since", "until", "param"),
    [
        ("instance", None, None, "group_by"),
        ("key,key", None, None, "group_by"),
        ("key", "yesterday", None, "from"),
        ("key", "-5", None, "from"),
        ("key", "1e9", None, "from"),
        ("key", "9" * 12, None, "from"),
        ("key", "2026-13-01", None, "from"),
        ("key", "2026-11-01" + " " * 100, None, "from"),
        ("key", None, "now", "to"),
        ("key", None, "2026-12-01T25:00:00Z", "to"),
        ("key", "2026-12-02", "2026-12-01", "from"),  # from after to
        ("key", "2026-12-05", None, "from"),  # after the default to (now)
    ],
)
def test_bad_values_are_400s_naming_the_parameter(
    group_by: str, since: str | None, until: str | None, param: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        SpendQuery.parse(group_by, since, until, NOW)
    assert (caught.value.status, caught.value.param) == (400, param)
