"""What every call to a service passes through, written once for the whole mesh.

Around each method's handler, in this order:

1. the internal credential: UNAUTHENTICATED without it, before the handler reads a
   message, so a caller streaming requests without it is refused at once;
2. admission: 503 `overloaded` past the service's in-flight limit;
3. trace context: the caller's W3C `traceparent` (and `tracestate`) from the metadata is
   the parent of a SERVER span named by the RPC (`clawdbot.v1.Router/Complete`), with the
   rpc.* attributes and the gRPC status it ended with; the handler runs inside it, so its
   own spans are children and its calls carry it on (common/service.py's channels). With
   no exporter configured the span is not recorded, only its ids made (see
   common/telemetry.py's tracer_provider): logs and the next hop still get them;
4. the request id: `x-request-id` from the metadata goes into the logging context
   (common/logging.py writes it on every line as `http.request.id`, beside `trace.id`)
   and onto the span;
5. error mapping: a handler that raises GatewayError is aborted with its gRPC status,
   message and the error in trailing metadata; any other exception is logged with its
   traceback and answered as internal_error(). Handlers raise; none catches to abort;
6. metrics: calls in flight (clawdbot_requests_in_flight) and the duration of each call by
   method and status (rpc_server_duration_seconds).

Streams are treated alike: the span and the count last until the last message.

Hand-written, not opentelemetry-instrumentation-grpc (0.66b2 installs beside our pinned
opentelemetry-api/sdk 1.45.2, and its aio server interceptor would compose with the
GatedServer: it wraps whatever handler the gate returns). It was measured against this
wrapper and not taken, because:
- cost: it is a grpc.aio server interceptor, i.e. another coroutine per call in front of
  this one, it wraps the servicer context in a wrapt proxy, builds a dict of the metadata
  twice and parses the peer address on every call. Measured with
  `python -m clawdbot.devtools.bench_rpc_telemetry` (figures in its docstring): the span
  costs this gate about 27 µs a call, the interceptor about 62 µs for the same span, and
  with its client interceptors about 200 µs a call more than this gate and the mesh
  channel, on a hop whose server side costs about 300 µs in all (the adapter→router path
  of `make bench` crosses two such hops per request);
- order: an interceptor runs before the gate, so a caller without the credential would
  get a span (and choose its trace id) before being refused; here the span starts after
  the check;
- it does neither the request id nor the error mapping, which need this wrapper anyway:
  with it, every call would pass two layers instead of one.
Its client-side interceptors are declined for the same reason (a Python call object and
a task per call): the mesh channel adds `traceparent` to each call's metadata itself.

`grpc.health.v1.Health` is neither authenticated, counted nor traced (Kubernetes' gRPC
probes and Envoy's health checks cannot send metadata, an overloaded service must not look
dead, and a probe every second is no request worth a span); reflection needs the
credential but is never refused for load. A method nobody serves is UNAUTHENTICATED
without the credential, UNIMPLEMENTED with it: no caller without the secret learns what a
port serves.

Why handler wrappers and not grpc.aio server interceptors: the wrapper is built once per
method when a servicer is registered, and costs one coroutine frame per call; as
interceptors the credential check and admission were two coroutines per call, and
admission had to wrap the handler anyway (to count until a stream ends).

Contextvars (the current span, the request id) are set without being reset: grpc.aio runs
every call in a task of its own, whose context ends with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from clawdbot.common.admission import AdmissionControl
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.common.internal_auth import REFUSAL, TOKEN_METADATA_KEY, credential_matches
from clawdbot.common.logging import REQUEST_ID_METADATA_KEY, request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.telemetry import TRACEPARENT, TRACESTATE, remote_context

log = logging.getLogger(__name__)

# Neither authenticated, counted nor traced.
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"
# Authenticated, never refused for load.
UNCOUNTED_METHOD_PREFIXES = (OPEN_METHOD_PREFIX, "/grpc.reflection.")

# Span attribute carrying the request id (the router's and adapter's spans always had it).
REQUEST_ID_ATTRIBUTE = "clawdbot.request_id"
# The server span's status is an error only for these (OTel's gRPC semantic conventions:
# the rest are the caller's mistakes, not the server's failures).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Behavior = Callable[..., Any]
Handler = Any  # grpc.RpcMethodHandler: generic in the stubs only


async def _unauthenticated(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


class _Call:
    """What one call's metadata says: whether the credential is right, and the caller's
    trace context and request id. One pass over the metadata."""

    __slots__ = ("allowed", "request_id", "traceparent", "tracestate")

    def __init__(self, metadata: Iterable[tuple[str, str | bytes]] | None, expected: bytes) -> None:
        tokens: list[str | bytes] = []
        traceparent = tracestate = request_id = None
        for key, value in metadata or ():
            if key == TOKEN_METADATA_KEY:
                tokens.append(value)
            elif key == TRACEPARENT:
                traceparent = value
            elif key == REQUEST_ID_METADATA_KEY:
                request_id = value
            elif key == TRACESTATE:
                tracestate = value
        self.allowed = credential_matches(tokens, expected)
        # Keys without -bin carry str values.
        self.traceparent: str | None = traceparent if isinstance(traceparent, str) else None
        self.tracestate: str | None = tracestate if isinstance(tracestate, str) else None
        self.request_id: str | None = request_id if isinstance(request_id, str) else None


class _Method:
    """Per method, built once: its span name and attributes, and its metrics."""

    __slots__ = ("attributes", "counted", "durations", "in_flight", "name", "path")

    def __init__(self, path: str, counted: bool, metrics: Metrics | None, service: str) -> None:
        self.path = path
        self.counted = counted
        # "/pkg.Service/Method" -> span "pkg.Service/Method" (the semantic conventions').
        self.name = path.lstrip("/")
        rpc_service, _, rpc_method = self.name.partition("/")
        self.attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method}
        self.in_flight = metrics.in_flight.labels(service) if metrics is not None and counted else None
        self.durations: dict[grpc.StatusCode, Any] = {}
        if metrics is not None:
            # Children made now, not per call (labels() costs a lock and a dict lookup).
            for code in grpc.StatusCode:
                self.durations[code] = metrics.rpc_duration.labels(service, self.name, str(code.value[0]))


class ServerGate:
    def __init__(
        self,
        token: str,
        admission: AdmissionControl,
        *,
        metrics: Metrics | None = None,
        service: str = "",
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self._expected = token.encode("ascii")
        self.admission = admission
        self._metrics = metrics
        self._service = service or admission.service
        # Default, the process's provider (a proxy until the entry point has set it up).
        self._tracer = trace.get_tracer("clawdbot.rpc", tracer_provider=tracer_provider)
        # Fits any kind of method on the wire, and aborts before reading a message.
        self.refusal: Handler = grpc.stream_stream_rpc_method_handler(_unauthenticated)

    def allows(self, metadata: Any) -> bool:
        """Whether a call's metadata (key, value pairs) carries exactly the credential."""
        return _Call(metadata, self._expected).allowed

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler behind the credential check and, unless exempt, admission, inside
        its span, with errors mapped and the call counted."""
        if handler is None or method.startswith(OPEN_METHOD_PREFIX):
            return handler
        counted = not method.startswith(UNCOUNTED_METHOD_PREFIXES)
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        described = _Method(method, counted, self._metrics, self._service)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._gated(described, handler.unary_unary), **options)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._gated(described, handler.stream_unary), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._gated(described, handler.unary_stream), **options)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._gated(described, handler.stream_stream), **options)
        raise TypeError(f"{method}: a method handler with no behaviour")

    # --- the parts of a call -------------------------------------------------------------

    def _begin(self, method: _Method, call: _Call) -> Span:
        """The call's server span, current from here on, and its request id in the logs."""
        span = self._tracer.start_span(
            method.name, remote_context(call.traceparent, call.tracestate), SpanKind.SERVER, method.attributes
        )
        if call.request_id:
            request_id_var.set(call.request_id)
            span.set_attribute(REQUEST_ID_ATTRIBUTE, call.request_id)
        otel_context.attach(trace.set_span_in_context(span))
        if method.in_flight is not None:
            method.in_flight.inc()
        return span

    @staticmethod
    def _end(method: _Method, span: Span, code: grpc.StatusCode, message: str, started: float) -> None:
        if method.in_flight is not None:
            method.in_flight.dec()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, message or code.name))
        span.end()
        if method.durations:
            method.durations[code].observe(time.perf_counter() - started)

    @staticmethod
    def _bug(method: _Method, span: Span, exc: Exception) -> GatewayError:
        """A handler's unexpected exception: logged with its traceback (and the trace and
        request id), and answered as internal_error(), without the details."""
        log.exception("call failed", extra={"rpc": method.name})
        span.record_exception(exc)
        return internal_error()

    @staticmethod
    def _aborted(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
        """The status a handler aborted with itself (context.abort)."""
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    # --- the wrappers ----------------------------------------------------------------------

    def _gated(self, method: _Method, behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):
            return self._gated_stream(method, behavior)
        if not inspect.iscoroutinefunction(behavior):
            return self._gated_sync(behavior)
        admission = self.admission
        expected = self._expected
        counted = method.counted

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(context.invocation_metadata(), expected)
            if not call.allowed:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            if counted and admission.in_flight >= admission.limit:
                return await admission.refuse(method.path, context)
            span = self._begin(method, call)
            started = time.perf_counter()
            admission.in_flight += counted
            code, message = grpc.StatusCode.OK, ""
            try:
                return await behavior(request, context)
            except GatewayError as err:
                code, message = err.grpc_code(), err.message
                await err.abort(context)
            except grpc.aio.AbortError:
                code = self._aborted(context)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 (a bug: _bug logs it with its traceback)
                error = self._bug(method, span, exc)
                code, message = error.grpc_code(), error.message
                await error.abort(context)
            finally:
                admission.in_flight -= counted
                self._end(method, span, code, message, started)

        return gated

    def _gated_sync(self, behavior: Behavior) -> Behavior:
        """A synchronous handler: in this mesh only the generated servicer's stub of a
        method a service leaves unimplemented (an adapter protocol turned off), which
        answers UNIMPLEMENTED at once. Checked like any other, not counted or traced."""
        expected = self._expected

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not _Call(context.invocation_metadata(), expected).allowed:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            return behavior(request, context)

        return gated

    def _gated_stream(self, method: _Method, behavior: Behavior) -> Behavior:
        """A handler whose responses are a stream: counted and traced until it ends."""
        admission = self.admission
        expected = self._expected
        counted = method.counted

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = _Call(context.invocation_metadata(), expected)
            if not call.allowed:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            if counted and admission.in_flight >= admission.limit:
                answer = await admission.refuse(method.path, context)
                if answer is not None:
                    yield answer
                return
            span = self._begin(method, call)
            started = time.perf_counter()
            admission.in_flight += counted
            code, message = grpc.StatusCode.OK, ""
            try:
                # aclosing: when the client goes away, the handler's own clean-up
                # (cancelling its upstream call) runs now, not when it is collected.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except GatewayError as err:
                code, message = err.grpc_code(), err.message
                await err.abort(context)
            except grpc.aio.AbortError:
                code = self._aborted(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # The client went away (or cancelled) mid-stream.
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 (a bug: _bug logs it with its traceback)
                error = self._bug(method, span, exc)
                code, message = error.grpc_code(), error.message
                await error.abort(context)
            finally:
                admission.in_flight -= counted
                self._end(method, span, code, message, started)

        return gated


class _GatedGeneric(grpc.GenericRpcHandler):
    """A generic handler (looked up per call by method name) behind the gate; each
    method's wrapped handler is built once."""

    def __init__(self, inner: grpc.GenericRpcHandler, gate: ServerGate) -> None:
        self._inner = inner
        self._gate = gate
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._gate.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _UnknownMethods(grpc.GenericRpcHandler):
    """Last in line: a method nobody serves is refused as unauthenticated to a caller
    without the credential (None: UNIMPLEMENTED, for a caller with it)."""

    def __init__(self, gate: ServerGate) -> None:
        self._gate = gate

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        if self._gate.allows(handler_call_details.invocation_metadata):
            return None
        return self._gate.refusal


class GatedServer(grpc.aio.Server):
    """A grpc.aio server whose every registered servicer sits behind the gate."""

    def __init__(self, server: grpc.aio.Server, gate: ServerGate) -> None:
        self._server = server
        self._gate = gate
        self._generic: list[grpc.GenericRpcHandler] = []
        self._unknown = _UnknownMethods(gate)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        # The server asks its generic handlers in the order they were added: keep the
        # unknown-method refusal behind every one.
        self._generic.extend(_GatedGeneric(handler, self._gate) for handler in generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Handler]) -> None:
        # Not in grpc's type stubs, but grpc.aio.Server has it (grpcio >= 1.63).
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name,
            {name: self._gate.wrap(f"/{service_name}/{name}", h) for name, h in method_handlers.items()},
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        self._server.add_generic_rpc_handlers((*self._generic, self._unknown))
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (grpc.aio.Server's signature)
        return await self._server.wait_for_termination(timeout)
