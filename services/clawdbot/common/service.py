"""What every Clawdbot service shares: a grpc.aio server with the standard health
service, a small HTTP side (/metrics, /healthz, plus whatever the service adds), and
graceful shutdown on SIGTERM/SIGINT.

Build apart from run: a service's create_server(config) returns a ServiceHost; tests
start it on port 0 and stop it; __main__ calls serve().
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from clawdbot.common import internal_auth
from clawdbot.common.admission import AdmissionControl
from clawdbot.common.config import ServiceEndpoint
from clawdbot.common.errors import GatewayError
from clawdbot.common.internal_auth import REFUSAL, TOKEN_METADATA_KEY, credential_matches
from clawdbot.common.logging import REQUEST_ID_METADATA_KEY, request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.server_gate import GatedServer, ServerGate
from clawdbot.common.telemetry import TRACEPARENT, trace_metadata

log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[None]]

# Seconds between NOT_SERVING and refusing new calls, so that Envoy's active health check
# (1 s interval) takes the instance out of rotation before it stops accepting.
DRAIN_NOTICE_S = 1.5
# Seconds background work gets to finish when asked at shutdown, and again once cancelled.
BACKGROUND_STOP_S = 5.0

_GRPC_OPTIONS: Sequence[tuple[str, int]] = (
    # A port collision must fail loudly, not silently share the port with an old process.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
)


# The HTTP side's paths open without the internal credential: probes and Prometheus,
# which reveal nothing a caller could use (the same reasoning as grpc.health.v1).
OPEN_HTTP_PATHS = frozenset({"/healthz", "/metrics"})

Metadata = tuple[tuple[str, str], ...]


class _WithCredential:
    """A multi-callable that adds to every call's metadata the internal credential, the
    current trace context (W3C traceparent, so the callee's span is a child of the
    caller's) and the request id being served (x-request-id, so the callee's logs carry
    it), and gives a call without a deadline the channel's default.

    Chosen over grpc.aio client interceptors (the credential one, and the
    opentelemetry-instrumentation-grpc ones for the trace context), which wrap every call
    in an extra Python call object and task: this costs one function call and a few
    tuples per call (measured with devtools/bench_internal_auth.py and
    devtools/bench_rpc_telemetry.py; figures in their docstrings). A call site never adds
    any of these itself; metadata it passes (say, a caller's own traceparent) comes first
    and is kept."""

    __slots__ = ("_call", "_default_timeout", "_metadata")

    def __init__(self, call: Any, metadata: Metadata, default_timeout: float | None) -> None:
        self._call = call
        self._metadata = metadata
        self._default_timeout = default_timeout

    def __call__(self, *args: Any, metadata: Any = None, timeout: float | None = None, **kwargs: Any) -> Any:
        sent = self._metadata + trace_metadata()
        request_id = request_id_var.get()
        if request_id:
            sent += ((REQUEST_ID_METADATA_KEY, request_id),)
        if metadata is not None:
            sent = _merged(metadata, sent)
        return self._call(*args, metadata=sent, timeout=self._default_timeout if timeout is None else timeout, **kwargs)


def _merged(given: Any, ours: Metadata) -> Metadata:
    """The call site's metadata first, then ours less the trace context and request id it
    set itself (one of each: a server reads the last)."""
    keys = {key for key, _value in given}
    if TRACEPARENT in keys or REQUEST_ID_METADATA_KEY in keys:
        ours = tuple((key, value) for key, value in ours if key == TOKEN_METADATA_KEY or key not in keys)
    return (*given, *ours)


class InternalChannel(grpc.aio.Channel):
    """A grpc.aio channel whose calls all carry the internal credential, the trace context
    and the request id (see _WithCredential). Call credentials would need TLS (grpc
    refuses them on an insecure aio channel), so it is metadata.

    default_deadline_s bounds unary calls made without a timeout of their own. Streams
    are left to their call sites: some are meant to last (the router's watch of the health
    service's verdicts, its telemetry report stream), and each bounded one passes its own.
    """

    def __init__(self, channel: grpc.aio.Channel, token: str, default_deadline_s: float | None = None) -> None:
        self._channel = channel
        self._metadata: Metadata = ((TOKEN_METADATA_KEY, token),)
        self._default_deadline_s = default_deadline_s

    async def __aenter__(self) -> InternalChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithCredential(
            self._channel.unary_unary(method, *args, **kwargs), self._metadata, self._default_deadline_s
        )

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithCredential(self._channel.unary_stream(method, *args, **kwargs), self._metadata, None)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithCredential(self._channel.stream_unary(method, *args, **kwargs), self._metadata, None)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithCredential(self._channel.stream_stream(method, *args, **kwargs), self._metadata, None)


def grpc_target(endpoint: ServiceEndpoint) -> str:
    """host:port of a service, as other services dial it (an IPv6 address in brackets)."""
    host = endpoint.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{endpoint.grpc_port}"


def mesh_channel(endpoint: ServiceEndpoint, token: str | None = None) -> grpc.aio.Channel:
    """The channel to a service of the mesh, from its config section: see internal_channel;
    unary calls without a timeout get the service's call_timeout_s."""
    return internal_channel(grpc_target(endpoint), token, default_deadline_s=endpoint.call_timeout_s)


def internal_channel(
    target: str, token: str | None = None, *, default_deadline_s: float | None = None
) -> grpc.aio.Channel:
    """A channel to a gRPC server of the mesh (mesh_channel, for a service named in the
    config; this, for a target known otherwise, like a worker instance's URL): every call
    carries the internal credential (token, default CLAWDBOT_INTERNAL_TOKEN: a ConfigError
    when unset), the trace context and the request id; room for audio-sized messages both
    ways, and quick reconnects after the peer restarts instead of backing off for
    seconds."""
    token = internal_auth.internal_token() if token is None else token
    channel = grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
    return InternalChannel(channel, token, default_deadline_s)


def _internal_only(token: str) -> Any:
    """aiohttp middleware: the HTTP side (the adapter's WebSocket endpoint, reached only
    through Envoy, which adds the credential) refuses callers without it, probes aside."""
    expected = token.encode("ascii")

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        if request.path in OPEN_HTTP_PATHS or credential_matches(
            request.headers.getall(TOKEN_METADATA_KEY, ()), expected
        ):
            return await handler(request)
        error = GatewayError(401, REFUSAL, "authentication_error", "internal_credential_required")
        return web.Response(status=401, body=error.to_json(), content_type="application/json")

    return check


class ServiceHost:
    def __init__(
        self,
        name: str,
        endpoint: ServiceEndpoint,
        metrics: Metrics,
        *,
        reflection_services: Sequence[str] = (),
        http_client_max_size: int = 1024 * 1024,
        internal_token: str | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.metrics = metrics
        # Fail closed: without the internal credential (default: CLAWDBOT_INTERNAL_TOKEN)
        # a service does not start, rather than serving anyone who can reach its port.
        token = internal_auth.internal_token() if internal_token is None else internal_token
        # Admission after authentication: a call without the credential takes no slot.
        self.admission = AdmissionControl(name, endpoint.max_in_flight)
        # Every handler behind one gate: credential, admission, trace context, request id,
        # error mapping and per-call metrics (common/server_gate.py).
        self.grpc_server: grpc.aio.Server = GatedServer(
            grpc.aio.server(options=list(_GRPC_OPTIONS)),
            ServerGate(token, self.admission, metrics=metrics, service=name),
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        if reflection_services:
            names = (
                *reflection_services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self.grpc_server)
        self._service_names: list[str] = []
        self.http_app = web.Application(client_max_size=http_client_max_size, middlewares=[_internal_only(token)])
        self.http_app.router.add_get("/metrics", metrics.handle)
        self.http_app.router.add_get("/healthz", self._healthz)
        self._http_runner: web.AppRunner | None = None
        self._cleanups: list[Cleanup] = []
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._background_stops: list[Callable[[], None]] = []
        self._stoppable: list[bool] = []  # per background job: whether it has a stop()
        self._stoppable_tasks: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._serving = False
        self.grpc_port = 0
        self.http_port = 0

    def add_service_name(self, full_name: str) -> None:
        """A gRPC service whose health is reported alongside the overall ("") status."""
        self._service_names.append(full_name)

    def in_background(
        self, job: Callable[[], Coroutine[Any, Any, None]], stop: Callable[[], None] | None = None
    ) -> None:
        """Run job() while the service serves. At shutdown `stop()` asks it to finish (a
        Kafka consumer commits its batch and leaves its group); what has not finished
        within BACKGROUND_STOP_S is cancelled, and waited for as long again."""
        self._background.append(job)
        self._stoppable.append(stop is not None)
        if stop is not None:
            self._background_stops.append(stop)

    def on_shutdown(self, cleanup: Cleanup) -> None:
        """Run after the servers stopped, in reverse order of registration."""
        self._cleanups.append(cleanup)

    async def _healthz(self, _request: web.Request) -> web.Response:
        status = 200 if self._serving else 503
        return web.json_response({"service": self.name, "serving": self._serving}, status=status)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._serving = serving
        for service in ("", *self._service_names):
            await self.health.set(service, status)

    async def start(self) -> None:
        bind = self.endpoint.listen_host
        self.grpc_port = self.grpc_server.add_insecure_port(f"{bind}:{self.endpoint.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"{self.name}: cannot bind gRPC on {bind}:{self.endpoint.grpc_port}")
        await self.grpc_server.start()
        self._http_runner = web.AppRunner(self.http_app, access_log=None, handle_signals=False)
        await self._http_runner.setup()
        site = web.TCPSite(self._http_runner, bind, self.endpoint.http_port, reuse_port=False)
        await site.start()
        server = cast("asyncio.Server | None", site._server)
        sockets = server.sockets if server else ()
        self.http_port = sockets[0].getsockname()[1] if sockets else self.endpoint.http_port
        self._tasks = [asyncio.create_task(job()) for job in self._background]
        self._stoppable_tasks = {t for t, can_stop in zip(self._tasks, self._stoppable, strict=True) if can_stop}
        await self._set_serving(True)
        log.info(
            "serving",
            extra={"grpc_port": self.grpc_port, "http_port": self.http_port, "host": bind},
        )

    async def stop(self, grace: float | None = None, drain_notice: float = DRAIN_NOTICE_S) -> None:
        # Shutdown order, and why:
        #  1. report NOT_SERVING, so health-checking peers (Envoy, the runner) stop sending;
        #  2. wait a moment for them to notice;
        #  3. stop the gRPC server: new calls are refused, in-flight calls (streams
        #     included) get up to `grace` seconds to finish;
        #  4. ask background work to stop (a Kafka consumer commits its batch and leaves
        #     its group), cancel what does not within BACKGROUND_STOP_S;
        #  5. run service cleanups (close client pools, channels; the worker its models
        #     and threads), last registered first;
        #  6. stop the HTTP side (metrics; WebSocket sessions were closed by their owners
        #     in cleanups);
        #  7. the entry point (common/entrypoint.py) then flushes telemetry and leaves
        #     through common/lifeline.py, which abandons a thread stuck in native code;
        #     past shutdown_grace_s + 8 s from the signal its deadline ends the process.
        grace = self.endpoint.shutdown_grace_s if grace is None else grace
        if self._serving:
            await self._set_serving(False)
            await asyncio.sleep(drain_notice)
        await self.grpc_server.stop(grace)
        await self._stop_background()
        for cleanup in reversed(self._cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("cleanup failed during shutdown")
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        log.info("stopped")

    async def _stop_background(self) -> None:
        # Cancelling a Kafka consumer in the middle of a fetch or a rebalance left its
        # group-leave to the interpreter's exit, which waited on it past the runner's
        # patience; asked to stop, it leaves at once. Work with no way to be asked is
        # cancelled at once. Nothing is left for asyncio.run to wait on.
        for stop in self._background_stops:
            stop()
        asked = [task for task in self._tasks if task in self._stoppable_tasks]
        if asked:
            await asyncio.wait(asked, timeout=BACKGROUND_STOP_S)
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            _done, stuck = await asyncio.wait(pending, timeout=BACKGROUND_STOP_S)
            if stuck:
                log.error("background work did not stop", extra={"tasks": [t.get_name() for t in stuck]})
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("background work failed", exc_info=task.exception())
        self._tasks = []
        self._stoppable_tasks = set()


async def run_until_signalled(host: ServiceHost, on_signal: Callable[[], None] | None = None) -> None:
    """Start, serve until SIGTERM or SIGINT, then stop gracefully. on_signal runs first
    (the entry point's: the shutdown's hard deadline starts there, common/lifeline.py)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    await stop.wait()
    log.info("shutdown requested")
    if on_signal is not None:
        on_signal()
    await host.stop()


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async main on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
