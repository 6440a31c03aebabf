"""Admission control: a service serves at most `max_in_flight` gRPC calls at once.

Past the limit a call is refused at once with 503 `overloaded` and a Retry-After, so a
burst sheds at the edge of the service instead of queueing without bound inside it (where
every queued call would time out anyway, holding memory and upstream connections).

A call counts from the moment its handler starts until it returns or, for a streaming
response, until the stream ends (or the client goes away). The count is a plain integer:
every handler runs on the server's one event loop thread, so no lock is needed, and the
cost per call is one extra coroutine frame.

Health checks and reflection are never refused: an overloaded service must not look dead
to Envoy's health checker, which would move its load onto the others all at once.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from clawdbot.common.errors import GatewayError

log = logging.getLogger(__name__)

# Methods never refused (prefixes of the full method name).
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Seconds a refused caller is asked to wait: bursts drain in well under that.
RETRY_AFTER_S = 1

# How often, at most, a refusal is logged (each is counted).
_LOG_EVERY_S = 5.0

# A way to answer a refused call with a message instead of aborting it (the adapter's
# REST methods answer errors as an HttpBody); None: abort with the error.
Refusal = Callable[[str, grpc.aio.ServicerContext, GatewayError], Awaitable[Any | None]]

Behavior = Callable[..., Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


def overloaded(service: str, limit: int, retry_after_s: int = RETRY_AFTER_S) -> GatewayError:
    return GatewayError(
        503,
        f"The {service} service is at its limit of {limit} requests in flight; retry shortly.",
        "service_unavailable",
        "overloaded",
        None,
        str(retry_after_s),
    )


class AdmissionControl(grpc.aio.ServerInterceptor):
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
        # method -> (the handler it was built from, the counting handler): built once per
        # method, not per call. Keys are methods a handler exists for, so the map stays small.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        # None at run time for a method nobody serves, whatever the stubs say.
        handler: Handler | None = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(EXEMPT):
            return handler  # type: ignore[return-value]
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    # --- refusing --------------------------------------------------------------------

    async def _refuse(self, method: str, context: grpc.aio.ServicerContext) -> Any | None:
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

    # --- counting --------------------------------------------------------------------

    def _wrap(self, method: str, handler: Handler) -> Handler:
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._single(method, handler.unary_unary), **options)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._single(method, handler.stream_unary), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._streamed(method, handler.unary_stream), **options)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._streamed(method, handler.stream_stream), **options)
        return handler

    def _single(self, method: str, behavior: Behavior) -> Behavior:
        """A handler that answers once (or streams through context.write)."""
        if not inspect.iscoroutinefunction(behavior):
            # A synchronous handler runs in grpc's thread pool, which bounds it already.
            return behavior

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.in_flight >= self.limit:
                return await self._refuse(method, context)
            self.in_flight += 1
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1

        return admitted

    def _streamed(self, method: str, behavior: Behavior) -> Behavior:
        """A handler whose responses are a stream: counted until the stream ends."""
        if inspect.iscoroutinefunction(behavior):
            return self._single(method, behavior)  # writes with context.write
        if not inspect.isasyncgenfunction(behavior):
            return behavior

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.in_flight >= self.limit:
                answer = await self._refuse(method, context)
                if answer is not None:
                    yield answer
                return
            self.in_flight += 1
            try:
                # aclosing: when the client goes away, the handler's own clean-up (cancelling
                # its upstream call) runs now, not when the generator is collected.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                self.in_flight -= 1

        return admitted
