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

from clawdbot.common.config import ServiceEndpoint
from clawdbot.common.metrics import Metrics

log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[None]]

# Seconds between NOT_SERVING and refusing new calls, so that Envoy's active health check
# (1 s interval) takes the instance out of rotation before it stops accepting.
DRAIN_NOTICE_S = 1.5

_GRPC_OPTIONS: Sequence[tuple[str, int]] = (
    # A port collision must fail loudly, not silently share the port with an old process.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
)


def internal_channel(target: str) -> grpc.aio.Channel:
    """A channel to another service of the mesh: room for audio-sized messages both ways,
    and quick reconnects after the peer restarts instead of backing off for seconds."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )


class ServiceHost:
    def __init__(
        self,
        name: str,
        endpoint: ServiceEndpoint,
        metrics: Metrics,
        *,
        reflection_services: Sequence[str] = (),
        http_client_max_size: int = 1024 * 1024,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.metrics = metrics
        self.grpc_server = grpc.aio.server(options=list(_GRPC_OPTIONS))
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
        self.http_app = web.Application(client_max_size=http_client_max_size)
        self.http_app.router.add_get("/metrics", metrics.handle)
        self.http_app.router.add_get("/healthz", self._healthz)
        self._http_runner: web.AppRunner | None = None
        self._cleanups: list[Cleanup] = []
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._serving = False
        self.grpc_port = 0
        self.http_port = 0

    def add_service_name(self, full_name: str) -> None:
        """A gRPC service whose health is reported alongside the overall ("") status."""
        self._service_names.append(full_name)

    def in_background(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run job() while the service serves; cancelled when it stops."""
        self._background.append(job)

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
        #  4. stop the HTTP side (metrics, WebSocket sessions are closed by their owners
        #     in cleanups);
        #  5. run service cleanups (close client pools, channels), last registered first;
        #  6. telemetry is flushed by serve() after this returns.
        grace = self.endpoint.shutdown_grace_s if grace is None else grace
        if self._serving:
            await self._set_serving(False)
            await asyncio.sleep(drain_notice)
        await self.grpc_server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for cleanup in reversed(self._cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("cleanup failed during shutdown")
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        log.info("stopped")


async def run_until_signalled(host: ServiceHost) -> None:
    """Start, serve until SIGTERM or SIGINT, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    await stop.wait()
    log.info("shutdown requested")
    await host.stop()


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async main on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
