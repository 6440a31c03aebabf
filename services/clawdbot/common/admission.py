"""Admission control: a service serves at most `max_in_flight` gRPC calls at once.

Past the limit a call is refused at once with 503 `overloaded` and a Retry-After, so a
burst sheds at the edge of the service instead of queueing without bound inside it (where
every queued call would time out anyway, holding memory and upstream connections).

A call counts from the moment its handler starts until it returns or, for a streaming
response, until the stream ends (or the client goes away). The count is a plain integer:
every handler runs on the server's one event loop thread, so no lock is needed. The
counting itself is done by ServerGate (common/server_gate.py), around each handler.

Health checks and reflection are never refused: an overloaded service must not look dead
to Envoy's health checker, which would move its load onto the others all at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from clawdbot.common.errors import GatewayError

log = logging.getLogger(__name__)

# Seconds a refused caller is asked to wait: bursts drain in well under that.
RETRY_AFTER_S = 1

# How often, at most, a refusal is logged (each is counted).
_LOG_EVERY_S = 5.0

# A way to answer a refused call with a message instead of aborting it (the adapter's
# REST methods answer errors as an HttpBody); None: abort with the error.
Refusal = Callable[[str, grpc.aio.ServicerContext, GatewayError], Awaitable[Any | None]]


def overloaded(service: str, limit: int, retry_after_s: int = RETRY_AFTER_S) -> GatewayError:
    return GatewayError(
        503,
        f"The {service} service is at its limit of {limit} requests in flight; retry shortly.",
        "service_unavailable",
        "overloaded",
        None,
        str(retry_after_s),
    )


class AdmissionControl:
    """A service's count of calls in flight and its refusals. ServerGate
    (common/server_gate.py) counts each call around its handler and refuses past the
    limit."""

    def __init__(self, service: str, limit: int, retry_after_s: int = RETRY_AFTER_S) -> None:
        if limit <= 0:
            raise ValueError("the in-flight limit must be positive")
        self.service = service
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.refused = 0
        # Set by a service that answers refusals in its own shape (see Refusal).
        self.refusal: Refusal | None = None
        self._logged_at = 0.0

    async def refuse(self, method: str, context: grpc.aio.ServicerContext) -> Any | None:
        """The message to answer with, or None after aborting the call (abort raises)."""
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "overloaded: refusing calls",
                extra={"limit": self.limit, "in_flight": self.in_flight, "refused_total": self.refused},
            )
        error = overloaded(self.service, self.limit, self.retry_after_s)
        if self.refusal is not None:
            answer = await self.refusal(method, context, error)
            if answer is not None:
                return answer
        await error.abort(context)
        return None
