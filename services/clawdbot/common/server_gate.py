"""What every call to a service passes before its handler runs: the internal credential
(UNAUTHENTICATED without it), then admission (503 `overloaded` past the service's
in-flight limit).

Both are applied by one wrapper around each method's handler, built once when a servicer
is registered on the GatedServer: one coroutine frame per call. As grpc.aio server
interceptors they were two coroutines per call, and admission had to wrap the handler
anyway (to count until a stream ends). The check runs before the handler reads a message,
so a caller streaming requests without the credential is refused at once. Measured on
this machine: reading a call's metadata costs about 7 µs, the check about 1 µs.

`grpc.health.v1.Health` is neither authenticated nor counted (Kubernetes' gRPC probes and
Envoy's health checks cannot send metadata, and an overloaded service must not look dead);
reflection needs the credential but is never refused for load. A method nobody serves is
UNAUTHENTICATED without the credential, UNIMPLEMENTED with it: no caller without the secret
learns what a port serves.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from clawdbot.common.admission import AdmissionControl
from clawdbot.common.internal_auth import REFUSAL, credential_matches, metadata_values

# Neither authenticated nor counted.
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"
# Authenticated, never refused for load.
UNCOUNTED_METHOD_PREFIXES = (OPEN_METHOD_PREFIX, "/grpc.reflection.")

Behavior = Callable[..., Any]
Handler = Any  # grpc.RpcMethodHandler: generic in the stubs only


async def _unauthenticated(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


class ServerGate:
    def __init__(self, token: str, admission: AdmissionControl) -> None:
        self._expected = token.encode("ascii")
        self.admission = admission
        # Fits any kind of method on the wire, and aborts before reading a message.
        self.refusal: Handler = grpc.stream_stream_rpc_method_handler(_unauthenticated)

    def allows(self, metadata: Any) -> bool:
        """Whether a call's metadata (key, value pairs) carries exactly the credential."""
        return credential_matches(metadata_values(metadata), self._expected)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler behind the credential check and, unless exempt, admission."""
        if handler is None or method.startswith(OPEN_METHOD_PREFIX):
            return handler
        counted = not method.startswith(UNCOUNTED_METHOD_PREFIXES)
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._gated(method, handler.unary_unary, counted), **options)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._gated(method, handler.stream_unary, counted), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._gated(method, handler.unary_stream, counted), **options)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._gated(method, handler.stream_stream, counted), **options)
        raise TypeError(f"{method}: a method handler with no behaviour")

    def _gated(self, method: str, behavior: Behavior, counted: bool) -> Behavior:
        if inspect.isasyncgenfunction(behavior):
            return self._gated_stream(method, behavior, counted)
        if not inspect.iscoroutinefunction(behavior):
            return self._gated_sync(behavior)
        admission = self.admission

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not self.allows(context.invocation_metadata()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            if not counted:
                return await behavior(request, context)
            if admission.in_flight >= admission.limit:
                return await admission.refuse(method, context)
            admission.in_flight += 1
            try:
                return await behavior(request, context)
            finally:
                admission.in_flight -= 1

        return gated

    def _gated_sync(self, behavior: Behavior) -> Behavior:
        """A synchronous handler: in this mesh only the generated servicer's stub of a
        method a service leaves unimplemented (an adapter protocol turned off), which
        answers UNIMPLEMENTED at once. Checked like any other, not counted."""

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not self.allows(context.invocation_metadata()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            return behavior(request, context)

        return gated

    def _gated_stream(self, method: str, behavior: Behavior, counted: bool) -> Behavior:
        """A handler whose responses are a stream: counted until the stream ends."""
        admission = self.admission

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if not self.allows(context.invocation_metadata()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            if counted and admission.in_flight >= admission.limit:
                answer = await admission.refuse(method, context)
                if answer is not None:
                    yield answer
                return
            admission.in_flight += counted
            try:
                # aclosing: when the client goes away, the handler's own clean-up
                # (cancelling its upstream call) runs now, not when it is collected.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                admission.in_flight -= counted

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
