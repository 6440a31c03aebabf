"""Rate limits in the adapter: each client request admitted once, finished once.

Every route that leads to model calls (a chat, embeddings, speech... call on any protocol,
cache hits included; a job submission; a workflow run) is admitted through
`Admitter.admit` before the cache, the router, the jobs service or the orchestrator is
asked: requests per minute, tokens per minute (an estimate: the request's JSON length / 4
plus the output cap it asks for) and requests at once, under the caller's key
(common/quota RateLimiter). Refused: 429 rate_limit_exceeded with Retry-After and the
x-ratelimit-* headers.

The admission of the request being served is kept in a context variable, as the caller is
(auth.caller), so that whoever ends the request (Gateway.complete, Gateway.stream, the job
submission, the workflow run) finishes it with the tokens actually used, and every
protocol's answer carries its x-ratelimit-* headers, without threading it through each
call. Budgets are not checked here: the router holds and settles them on each upstream
attempt, from meta.grant.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from clawdbot.adapter.auth import caller
from clawdbot.common.errors import GatewayError
from clawdbot.common.quota import Admission, RateLimiter
from clawdbot.gen.v1 import router_pb2

log = logging.getLogger(__name__)

BUDGET_HEADER = "x-clawdbot-budget-remaining-usd"


@dataclass
class Admitted:
    """One request's admission, finished at most once."""

    admission: Admission
    finished: bool = False


# The admission of the request being served (Admitter.admit sets it).
admitted: ContextVar[Admitted | None] = ContextVar("clawdbot_admission", default=None)


def output_cap(body: Mapping[str, Any]) -> int:
    """The output tokens a request asks for at most (max_tokens, or OpenAI's newer
    max_completion_tokens); 0 when it says neither."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        # bool is an int in Python; `true` is no token count.
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def token_estimate(json_bytes: int, body: Mapping[str, Any]) -> int:
    """Tokens a request is admitted for: about 4 bytes of JSON per input token, plus the
    output cap it asks for. Settled to the real count when the answer says it."""
    return json_bytes // 4 + output_cap(body)


def nothing_produced(err: GatewayError) -> bool:
    """A call refused before any work (a 4xx: bad request, not allowed, over budget, an
    upstream 429): it used no tokens. A 5xx, a timeout or a cancellation may have."""
    return 400 <= err.status < 500 and err.status != 499


def rate_headers() -> tuple[tuple[str, str], ...]:
    """The x-ratelimit-* headers of the request being served (none without limits)."""
    current = admitted.get()
    return current.admission.headers if current is not None else ()


def budget_headers(spend: router_pb2.Spend) -> list[tuple[str, str]]:
    """x-clawdbot-budget-remaining-usd when the key has a budget (as the cost is given)."""
    if not spend.budgeted:
        return []
    return [(BUDGET_HEADER, f"{max(spend.remaining_usd, 0.0):.8f}")]


def response_tokens(response: router_pb2.ModelResponse) -> int | None:
    """The tokens an answer used, as the router settled them: 0 for a cache hit (the
    request counts, replayed tokens do not); None when the answer does not say (the
    estimate taken at admission stands)."""
    if response.cache and response.cache != "miss":
        return 0
    if not response.HasField("spend"):
        return None
    return response.spend.input_tokens + response.spend.output_tokens


class Admitter:
    """Admits the current caller's requests against its key's rate limits."""

    def __init__(self, limiter: RateLimiter | None) -> None:
        # None: no rate limits at all (tests, tools); every request is admitted.
        self._limiter = limiter

    async def admit(self, tokens: int) -> Admitted | None:
        """Admit one request of about `tokens` tokens for the current caller; it becomes
        the current admission. GatewayError 429 (or 503 when the limiter cannot be asked)
        when refused. None (and nothing current) when the key has no limits."""
        admitted.set(None)
        principal = caller.get(None)
        if principal is None:
            # A route that asks for admission without having authenticated: a bug.
            raise RuntimeError("a request was admitted before the caller was authenticated")
        if self._limiter is None or not principal.limits.any:
            return None
        admission = await self._limiter.admit(principal.key_id, principal.limits, tokens)
        current = Admitted(admission)
        admitted.set(current)
        return current

    async def finish(self, current: Admitted | None, tokens: int | None) -> None:
        """End an admission with the tokens actually used (None: the estimate stands).
        Once: a second call does nothing. Never raises (RateLimiter.finish does not)."""
        if current is None or current.finished or self._limiter is None:
            return
        current.finished = True
        await self._limiter.finish(current.admission, tokens)

    @contextlib.asynccontextmanager
    async def holding(self, tokens: int) -> AsyncIterator[Admitted | None]:
        """Admitted for the block (a job submission, a workflow run), finished after it:
        the estimate stands (what a job or a run used is settled by the router, call by
        call), or nothing when the block was refused before any work (a 4xx)."""
        current = await self.admit(tokens)
        used: int | None = None
        try:
            yield current
        except GatewayError as err:
            if nothing_produced(err):
                used = 0
            raise
        finally:
            await self.finish(current, used)


def current() -> Admitted | None:
    """The current admission, unless it was finished already."""
    found = admitted.get()
    return None if found is None or found.finished else found
