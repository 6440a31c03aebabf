"""Per-key rate limits: requests per minute, tokens per minute and requests in flight.

Requests and tokens are token buckets (capacity = the per-minute limit, refilled evenly:
a burst of 200 against 60 rpm admits 60, then one a second), not windows: a fixed window
lets twice the limit through around its edge. One Lua script checks every limit of the
key and takes from all of them or from none, with the Redis server's clock, so replicas
share one count and a refused request costs nothing. The tokens bucket is charged the
request's estimate at admission and corrected to the actual count at `finish` (it may go
into debt: a request that used more than it said makes the next ones wait).

Answers carry OpenAI's x-ratelimit-* headers, refusals a Retry-After as well.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import RedisError

from clawdbot.common.errors import GatewayError
from clawdbot.common.quota.local import LocalRateState
from clawdbot.common.quota.scripts import ADMIT, BUCKET_SCALE, FINISH

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

RATE_LIMIT_EXCEEDED: Final = "rate_limit_exceeded"


def key_tag(key_id: str) -> str:
    """The hash tag every quota key of `key_id` starts with (one Redis Cluster slot)."""
    return "{cb:q:" + key_id + "}"


@dataclass(frozen=True)
class RateLimits:
    """A key's limits; None (or 0) is no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_parallel: int | None = None

    @property
    def any(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_parallel)


@dataclass(frozen=True)
class Admission:
    key_id: str
    limits: RateLimits
    tokens_held: int  # taken from the tokens bucket at admit()
    lease: str | None  # the max_parallel lease, released by finish()
    headers: tuple[tuple[str, str], ...]  # x-ratelimit-* as of admission; () without limits


def openai_duration(ms: int) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* write it (Go's time.Duration text, to the
    millisecond): "250ms", "1s", "1.5s", "1m30s", "6m0s", "1h0m0s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0") if millis else str(seconds)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def _trio(kind: str, limit: int, level: int) -> tuple[tuple[str, str], ...]:
    """The three headers of one bucket at `level` (units of 1/BUCKET_SCALE of a token)."""
    capacity = limit * BUCKET_SCALE
    remaining = max(0, level // BUCKET_SCALE)
    to_full = math.ceil((capacity - level) / limit) if level < capacity else 0
    return (
        (f"x-ratelimit-limit-{kind}", str(limit)),
        (f"x-ratelimit-remaining-{kind}", str(remaining)),
        (f"x-ratelimit-reset-{kind}", openai_duration(to_full)),
    )


def ratelimit_headers(limits: RateLimits, requests_level: int, tokens_level: int) -> tuple[tuple[str, str], ...]:
    """The x-ratelimit-* trios of the limits that are set, from the buckets' levels."""
    headers: tuple[tuple[str, str], ...] = ()
    if limits.requests_per_minute:
        headers += _trio("requests", limits.requests_per_minute, requests_level)
    if limits.tokens_per_minute:
        headers += _trio("tokens", limits.tokens_per_minute, tokens_level)
    return headers


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refusal(
    limits: RateLimits, reason: str, wait_ms: int, tokens: int, headers: tuple[tuple[str, str], ...]
) -> GatewayError:
    retry_s = max(1, math.ceil(wait_ms / 1000))
    again = f"Try again in {openai_duration(max(wait_ms, 1))}."
    if reason == "requests":
        kind = "requests"
        message = f"Rate limit reached for this key: {limits.requests_per_minute} requests per minute. {again}"
    elif reason == "tokens":
        kind = "tokens"
        message = (
            f"Rate limit reached for this key: {limits.tokens_per_minute} tokens per minute"
            f" (this request needs up to {tokens}). {again}"
        )
    elif reason == "too_large":
        kind = "tokens"
        message = (
            f"This request needs up to {tokens} tokens, more than this key's limit of"
            f" {limits.tokens_per_minute} tokens per minute, so it can never be admitted;"
            " lower max_tokens or shorten the input."
        )
    else:
        kind = "requests"
        message = (
            f"This key already has {limits.max_parallel} requests in flight, its limit;"
            " try again when one of them has finished."
        )
    return GatewayError(429, message, kind, RATE_LIMIT_EXCEEDED, None, str(retry_s), headers)


def _monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


class RateLimiter:
    """Admits a key's requests against its RateLimits (see the module doc)."""

    def __init__(
        self,
        redis: Redis | None,
        *,
        lease_ttl_s: float = 330.0,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        """`redis` None: counters in this process (said once, loudly). `now_ms`: the
        in-process counters' clock in milliseconds (tests); with Redis its TIME is the clock."""
        self._redis = redis
        self._lease_ttl_ms = max(1, int(lease_ttl_s * 1000))
        self._local: LocalRateState | None = None
        if redis is None:
            self._local = LocalRateState(now_ms or _monotonic_ms)
            log.warning(
                "rate limits are kept in this process only (no Redis for quota):"
                " with several replicas each key gets its limits once per replica",
                extra={"component": "quota.rate_limiter"},
            )
        else:
            self._admit = redis.register_script(ADMIT)
            self._finish = redis.register_script(FINISH)

    async def admit(self, key_id: str, limits: RateLimits, tokens: int) -> Admission:
        """Take one request (and `tokens`, and a lease) from the key's limits, all or
        nothing; raise a 429 GatewayError when a limit says no, 503 when Redis is away."""
        if not limits.any:
            return Admission(key_id, limits, 0, None, ())
        rpm = limits.requests_per_minute or 0
        tpm = limits.tokens_per_minute or 0
        parallel = limits.max_parallel or 0
        tokens = max(0, int(tokens)) if tpm else 0
        lease = uuid.uuid4().hex if parallel else ""
        tag = key_tag(key_id)
        keys = [f"{tag}:rl:req", f"{tag}:rl:tok", f"{tag}:rl:par"]
        args: list[Any] = [rpm, tpm, parallel, tokens, lease, self._lease_ttl_ms]
        if self._local is not None:
            result = self._local.admit(keys, args)
        else:
            try:
                result = await self._admit(keys=keys, args=args)
            except RedisError as exc:
                log.warning(
                    "rate limiter unavailable", extra={"key_id": key_id, "error": f"{type(exc).__name__}: {exc}"}
                )
                raise GatewayError.unavailable(
                    f"The rate limiter is unavailable ({type(exc).__name__}); try again shortly.",
                    code="rate_limiter_unavailable",
                ) from exc
        admitted, reason, wait_ms = int(result[0]), _text(result[1]), int(result[2])
        headers = ratelimit_headers(limits, int(result[3]), int(result[4]))
        if not admitted:
            raise _refusal(limits, reason, wait_ms, tokens, headers)
        return Admission(key_id, limits, tokens, lease or None, headers)

    async def finish(self, admission: Admission, actual_tokens: int | None) -> None:
        """The request is over: charge its tokens bucket the actual count (None: keep the
        estimate taken at admission) and give its lease back. Never raises."""
        limits = admission.limits
        tpm = limits.tokens_per_minute or 0
        delta = 0 if actual_tokens is None or not tpm else max(0, int(actual_tokens)) - admission.tokens_held
        if not delta and admission.lease is None:
            return
        tag = key_tag(admission.key_id)
        keys = [f"{tag}:rl:tok", f"{tag}:rl:par"]
        args: list[Any] = [tpm, delta, admission.lease or ""]
        if self._local is not None:
            self._local.finish(keys, args)
            return
        try:
            await self._finish(keys=keys, args=args)
        except RedisError as exc:
            # The lease lapses by itself (lease_ttl_s); the token correction is lost.
            log.warning(
                "rate limiter finish failed",
                extra={
                    "key_id": admission.key_id,
                    "token_delta": delta,
                    "lease": admission.lease,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
