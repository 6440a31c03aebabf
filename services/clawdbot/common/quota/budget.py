"""Per-key spend caps that hold exactly under concurrency: hold the worst case, settle the
real cost.

Before a call, `hold` reserves its worst-case cost in one Lua script: it refuses when the
period's spend plus the holds in flight plus this one would pass the budget, so any
number of concurrent calls, on any number of replicas, can never jointly overshoot. After
the call, `settle` swaps the hold for the real cost, exactly once per hold id. A process
that dies between the two leaves a hold that lapses after `hold_ttl_s` (the scripts reap
it). Money is integer nano-dollars in Redis: fifty holds of $0.001 add up to exactly $0.05.

The period (its UTC day, month, or all time) comes from the injectable clock and names the
counter, so the next period starts from nothing. A counter Redis does not have (first use
in a period, or Redis lost its data) is seeded from the ledger as max(Redis, ledger)
before anything is held on it. Budgets fail closed: without Redis a hold is a 503, never a
call on a guess.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import RedisError

from clawdbot.common.errors import GatewayError
from clawdbot.common.quota.limits import key_tag
from clawdbot.common.quota.local import LocalBudgetState
from clawdbot.common.quota.scripts import HOLD, PEEK, SEED, SETTLE

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

USD_NANO: Final = 1_000_000_000
PERIODS: Final = ("day", "month", "total")
INSUFFICIENT_QUOTA: Final = "insufficient_quota"
BUDGET_UNAVAILABLE: Final = "budget_unavailable"

_DAY_S: Final = 86_400
# A period's counter outlives its period by two days (a late settle still finds it), and
# is refreshed by every settle; "total" never expires.
_COUNTER_TTL_S: Final = {"day": 3 * _DAY_S, "month": 33 * _DAY_S, "total": 0}
# Last remaining figures kept for a best guess when Redis fails during a settle.
_REMEMBERED_KEYS: Final = 10_000

LedgerSpent = Callable[[str, datetime | None], Awaitable[float]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _check_period(period: str) -> None:
    if period not in PERIODS:
        raise ValueError(f"unknown budget period {period!r} (expected one of {', '.join(PERIODS)})")


def period_start(period: str, now: datetime) -> datetime | None:
    """Where the period containing `now` began: UTC midnight ("day"), the 1st at 00:00 UTC
    ("month"); None for "total" (all time). A naive `now` is taken as UTC."""
    _check_period(period)
    now = _utc(now)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def period_id(period: str, now: datetime) -> str:
    """The name of the period containing `now` in counter keys: "2026-12-04" (day),
    "2026-12" (month), "total"."""
    _check_period(period)
    now = _utc(now)
    if period == "day":
        return now.strftime("%Y-%m-%d")
    if period == "month":
        return now.strftime("%Y-%m")
    return "total"


def to_nano(usd: float) -> int:
    """Dollars as integer nano-dollars (NaN and negatives count as nothing)."""
    if not math.isfinite(usd) or usd <= 0:
        return 0
    return round(usd * USD_NANO)


def _usd_text(usd: float) -> str:
    return f"{usd:.2f}" if round(usd, 2) == usd else f"{usd:.9f}".rstrip("0")


def budget_exhausted(budget_usd: float, period: str) -> GatewayError:
    """429 in OpenAI's quota shape: the key's budget for this period is spent (or the
    call's worst case would pass it)."""
    if period == "day":
        span, after = "per day", "it starts again at midnight UTC"
    elif period == "month":
        span, after = "per month", "it starts again on the 1st of next month (UTC)"
    else:
        span, after = "in total", "ask the gateway's administrator to raise it"
    return GatewayError(
        429,
        f"You exceeded this key's budget of ${_usd_text(budget_usd)} {span}; {after}.",
        INSUFFICIENT_QUOTA,
        INSUFFICIENT_QUOTA,
    )


def _unavailable(why: str) -> GatewayError:
    return GatewayError.unavailable(
        f"The budget counter is unavailable ({why}); try again shortly.", BUDGET_UNAVAILABLE
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class BudgetBook:
    """Holds and settles spend against a key's budget (see the module doc)."""

    def __init__(
        self,
        redis: Redis | None,
        ledger_spent: LedgerSpent,
        *,
        clock: Callable[[], datetime] = _utc_now,
        hold_ttl_s: float = 900.0,
    ) -> None:
        """`ledger_spent(key_id, since)`: the ledger's total for the key since the period
        began (None: all time), to seed a counter Redis does not have. `redis` None:
        counters in this process (said once, loudly), whose holds expire on `clock`."""
        self._ledger_spent = ledger_spent
        self._clock = clock
        self._hold_ttl_ms = max(1, int(hold_ttl_s * 1000))
        # A settled hold id is remembered this long: a repeated settle (two end callbacks
        # of one call) within it is a no-op.
        self._marker_ttl_s = max(600, math.ceil(2 * hold_ttl_s))
        self._remembered: OrderedDict[str, float] = OrderedDict()
        self._seeding: dict[str, asyncio.Future[None]] = {}
        self._local: LocalBudgetState | None = None
        if redis is None:
            self._local = LocalBudgetState(lambda: int(self._clock().timestamp() * 1000))
            log.warning(
                "budgets are kept in this process only (no Redis for quota): with several"
                " replicas each key can spend its budget once per replica",
                extra={"component": "quota.budget_book"},
            )
        else:
            self._scripts = {
                "hold": redis.register_script(HOLD),
                "settle": redis.register_script(SETTLE),
                "peek": redis.register_script(PEEK),
                "seed": redis.register_script(SEED),
            }

    # --- the public operations --------------------------------------------------------

    async def hold(self, key_id: str, budget_usd: float, period: str, hold_id: str, amount_usd: float) -> float:
        """Reserve `amount_usd` (the call's worst case) under `hold_id`; the budget left
        after it. Raises budget_exhausted (429) when it does not fit, 503
        budget_unavailable when the counter cannot be read."""
        now = self._clock()
        keys = self._keys(key_id, period_id(period, now), hold_id)[:3]
        budget = to_nano(budget_usd)
        args: list[Any] = [hold_id, to_nano(amount_usd), budget, self._hold_ttl_ms]
        try:
            status, value = await self._run("hold", keys, args)
            if status == "cold":
                await self._seed(key_id, period, now, keys[0])
                status, value = await self._run("hold", keys, args)
        except RedisError as exc:
            log.warning("budget hold failed", extra={"key_id": key_id, "hold_id": hold_id, "error": _error(exc)})
            raise _unavailable(type(exc).__name__) from exc
        if status == "cold":
            # Seeded and gone at once: Redis is losing data (restarting, evicting).
            log.error("budget counter vanished after seeding", extra={"key_id": key_id, "period": period})
            raise _unavailable("counter lost")
        remaining = self._remember(key_id, value)
        if status == "refused":
            log.info(
                "budget exhausted",
                extra={"key_id": key_id, "budget_usd": budget_usd, "period": period, "remaining_usd": remaining},
            )
            raise budget_exhausted(budget_usd, period)
        return remaining

    async def settle(self, key_id: str, budget_usd: float, period: str, hold_id: str, cost_usd: float) -> float:
        """Replace hold `hold_id` by the real `cost_usd` (0: release), once: a repeated
        settle of the same hold id changes nothing. The budget left (negative when a call
        cost more than its hold). The cost counts in the period current now: a call held
        before midnight and settled after counts in the new day. Never raises: a failure
        is logged and a best guess returned (a caller being cancelled should shield it)."""
        try:
            now = self._clock()
            keys = self._keys(key_id, period_id(period, now), hold_id)
            args: list[Any] = [
                hold_id,
                to_nano(cost_usd),
                to_nano(budget_usd),
                _COUNTER_TTL_S[period],
                self._marker_ttl_s,
                "0",
            ]
            status, value = await self._run("settle", keys, args)
            if status == "cold":
                try:
                    await self._seed(key_id, period, now, keys[0])
                except GatewayError:
                    # Counting on an unseeded counter would hide the ledger's spend for
                    # the rest of the period: release the hold only, and leave the
                    # counter cold for the next hold to seed (the ledger has this call).
                    args[5] = "1"
                status, value = await self._run("settle", keys, args)
            if status == "duplicate":
                log.info("budget settle repeated; ignored", extra={"key_id": key_id, "hold_id": hold_id})
            if status in ("ok", "duplicate"):
                return self._remember(key_id, value)
            log.warning(
                "budget settled without counting",
                extra={"key_id": key_id, "hold_id": hold_id, "status": status, "cost_usd": cost_usd},
            )
        except (RedisError, GatewayError, ValueError) as exc:
            log.error(
                "budget settle failed",
                extra={"key_id": key_id, "hold_id": hold_id, "cost_usd": cost_usd, "error": _error(exc)},
            )
        guess = self._remembered.get(key_id, budget_usd)
        return max(0.0, guess - max(0.0, cost_usd)) if math.isfinite(guess) else 0.0

    async def remaining(self, key_id: str, budget_usd: float, period: str) -> float:
        """The budget left in the current period after spend and holds in flight (may be
        negative after a call that cost more than its hold). 503 when unreadable."""
        now = self._clock()
        keys = self._keys(key_id, period_id(period, now), "")[:3]
        args: list[Any] = [to_nano(budget_usd)]
        try:
            status, value = await self._run("peek", keys, args)
            if status == "cold":
                await self._seed(key_id, period, now, keys[0])
                status, value = await self._run("peek", keys, args)
        except RedisError as exc:
            log.warning("budget read failed", extra={"key_id": key_id, "error": _error(exc)})
            raise _unavailable(type(exc).__name__) from exc
        if status == "cold":
            raise _unavailable("counter lost")
        return self._remember(key_id, value)

    # --- plumbing ---------------------------------------------------------------------

    @staticmethod
    def _keys(key_id: str, pid: str, hold_id: str) -> list[str]:
        tag = key_tag(key_id)
        return [
            f"{tag}:b:{pid}:spent",
            f"{tag}:b:{pid}:holds",
            f"{tag}:b:{pid}:expiry",
            # Not per period: a call held before midnight and settled after is settled once.
            f"{tag}:settled:{hold_id}",
        ]

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> tuple[str, int]:
        if self._local is not None:
            result = getattr(self._local, name)(keys, args)
        else:
            result = await self._scripts[name](keys=keys, args=args)
        return _text(result[0]), int(result[1])

    async def _seed(self, key_id: str, period: str, now: datetime, counter: str) -> None:
        """Give a missing counter the ledger's figure for the period (max with whatever
        another replica seeded or counted meanwhile). 503 when the ledger cannot say.

        Callers that find the same counter cold at once share one ledger read: after a
        Redis restart every request in flight would otherwise ask the database."""
        seeding = self._seeding.get(counter)
        if seeding is None:
            seeding = asyncio.ensure_future(self._seed_once(key_id, period, now, counter))
            self._seeding[counter] = seeding
            seeding.add_done_callback(lambda done: self._seeded(counter, done))
        # Shielded: one caller giving up must not cancel the others' seeding.
        await asyncio.shield(seeding)

    def _seeded(self, counter: str, done: asyncio.Future[None]) -> None:
        self._seeding.pop(counter, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: its callers may all have gone

    async def _seed_once(self, key_id: str, period: str, now: datetime, counter: str) -> None:
        since = period_start(period, now)
        try:
            spent = await self._ledger_spent(key_id, since)
        except Exception as exc:
            log.error(
                "ledger unreadable; budget counter not seeded",
                extra={"key_id": key_id, "period": period, "error": _error(exc)},
                exc_info=True,
            )
            raise _unavailable("ledger unreadable") from exc
        args: list[Any] = [to_nano(spent), _COUNTER_TTL_S[period]]
        if self._local is not None:
            seeded = self._local.seed([counter], args)
        else:
            seeded = int(await self._scripts["seed"](keys=[counter], args=args))
        log.info(
            "budget counter seeded from the ledger",
            extra={"key_id": key_id, "period": period, "ledger_usd": spent, "counter_usd": seeded / USD_NANO},
        )

    def _remember(self, key_id: str, remaining_nano: int) -> float:
        remaining = remaining_nano / USD_NANO
        self._remembered[key_id] = remaining
        self._remembered.move_to_end(key_id)
        while len(self._remembered) > _REMEMBERED_KEYS:
            self._remembered.popitem(last=False)
        return remaining


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
