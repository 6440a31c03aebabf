"""GET /v1/admin/spend (and its gRPC twin GetSpend): the query's parameters, validated with
a 400 naming the one at fault, and the answer's shape. The sums come from
KeyStore.spend_report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore.store import GROUP_BYS, KeyStore

# Unix seconds: digits, optionally a fraction (no sign: the ledger starts after 1970).
_UNIX = re.compile(r"^\d{1,12}(\.\d{1,9})?$")
_MAX_PARAM = 64
# datetime's range; a unix time past it is a typo, not a window.
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def parse_when(param: str, value: str) -> datetime:
    """ISO 8601 (a date, or a date and time; no offset = UTC) or unix seconds, as UTC."""
    text = value.strip()
    bad = GatewayError.bad_request(
        f"`{param}` must be an ISO 8601 date or date and time (e.g. 2026-12-01T00:00:00Z) or unix seconds.",
        param=param,
    )
    if not text or len(value) > _MAX_PARAM:
        raise bad
    if _UNIX.match(text):
        seconds = float(text)
        if not math.isfinite(seconds) or seconds > _LATEST.timestamp():
            raise bad
        return datetime.fromtimestamp(seconds, UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise bad from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@dataclass(frozen=True)
class SpendQuery:
    group_by: str
    since: datetime
    until: datetime

    @classmethod
    def parse(cls, group_by: str | None, since: str | None, until: str | None, now: datetime) -> SpendQuery:
        """Empty or missing values take the defaults: group_by "key", from the start of the
        current UTC month, to `now`."""
        grouping = (group_by or "").replace(" ", "") or "key"
        if grouping not in GROUP_BYS:
            raise GatewayError.bad_request('`group_by` must be "key", "model" or "key,model".', param="group_by")
        start = parse_when("from", since) if since else month_start(now)
        end = parse_when("to", until) if until else now.astimezone(UTC)
        if start > end:
            raise GatewayError.bad_request("`from` must not be after `to`.", param="from")
        return cls(",".join(GROUP_BYS[grouping]), start, end)

    async def run(self, store: KeyStore) -> dict[str, Any]:
        """The answer's JSON: {"object": "list", "group_by", "from", "to", "data": rows}."""
        rows = await store.spend_report(self.group_by, self.since, self.until)
        return {
            "object": "list",
            "group_by": self.group_by,
            "from": self.since.isoformat(),
            "to": self.until.isoformat(),
            "data": rows,
        }
