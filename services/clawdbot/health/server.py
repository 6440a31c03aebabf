"""The health service: per-instance windows from telemetry, threshold rules with active
probes, IsolationForest anomalies, alerts; routers watch its verdicts over gRPC.

Probes go through the router's Probe RPC (the router holds the instances' connectors and
keys); the services' own health is read with the standard gRPC health check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clawdbot.common.config import Config, ServiceEndpoint, repo_path
from clawdbot.common.errors import GatewayError
from clawdbot.common.kafka import KafkaEndpoint
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost, mesh_channel
from clawdbot.gen.v1 import monitor_pb2, monitor_pb2_grpc, router_pb2, router_pb2_grpc
from clawdbot.health.alerts import Alerter
from clawdbot.health.intake import consume_telemetry, take
from clawdbot.health.monitor import Monitor

log = logging.getLogger(__name__)

# Verdicts are re-sent this often even without a change: a watcher whose stream went
# quiet can tell a live health service from a hung one.
HEARTBEAT_S = 5.0


def services_of(config: Config) -> dict[str, ServiceEndpoint]:
    """The mesh's services this one reports on (the enabled ones)."""
    found: dict[str, ServiceEndpoint] = {"adapter": config.adapter, "router": config.router}
    for name, section in (
        ("cache", config.cache),
        ("orchestrator", config.orchestrator),
    ):
        if section.enabled:
            found[name] = section
    if config.worker.models:
        found["worker"] = config.worker
    return found


class ServiceChecks:
    """The standard gRPC health check of each service, on demand."""

    def __init__(self, services: dict[str, ServiceEndpoint]) -> None:
        self._channels = {name: mesh_channel(s) for name, s in services.items()}

    async def check(self) -> dict[str, str]:
        async def one(name: str, channel: grpc.aio.Channel) -> tuple[str, str]:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError as err:
                return name, f"unreachable ({err.code().name})"
            return name, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower()

        results = await asyncio.gather(*(one(n, c) for n, c in self._channels.items()))
        return {"health": "serving", **dict(results)}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)


class HealthServicer(monitor_pb2_grpc.HealthMonitorServicer):
    def __init__(self, monitor: Monitor, checks: ServiceChecks) -> None:
        self._monitor = monitor
        self._checks = checks

    async def Report(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[monitor_pb2.ObservationBatch], context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ReportAck:
        accepted = 0
        async for batch in request_iterator:
            accepted += sum(take(self._monitor, raw, "grpc") for raw in batch.observations_json)
        return monitor_pb2.ReportAck(accepted=accepted)

    async def Watch(  # noqa: N802 - gRPC method name
        self, request: monitor_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[monitor_pb2.InstanceVerdicts]:
        queue = self._monitor.subscribe()
        log.info("watcher connected", extra={"watcher": request.watcher})
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield self._monitor.verdicts()
        finally:
            self._monitor.unsubscribe(queue)
            log.info("watcher left", extra={"watcher": request.watcher})

    async def Status(  # noqa: N802 - gRPC method name
        self, request: monitor_pb2.HealthStatusRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.HealthStatusReply:
        instances = self._monitor.status(request.detailed)
        services = await self._checks.check()
        serving = all(state == "serving" for state in services.values())
        degraded = any(i["status"] != "available" for i in instances)
        summary: dict[str, Any] = {
            "object": "health",
            "status": "ok" if serving and not degraded else "degraded",
            "services": services,
            "instances": instances,
        }
        return monitor_pb2.HealthStatusReply(json=orjson.dumps(summary))


def router_probe(router: router_pb2_grpc.RouterStub) -> Any:
    async def probe(instance_id: str, timeout_s: float) -> tuple[bool, str]:
        try:
            reply = await router.Probe(
                router_pb2.ProbeRequest(instance_id=instance_id, timeout_s=timeout_s), timeout=timeout_s + 5
            )
        except grpc.aio.AioRpcError as err:
            failure = GatewayError.from_rpc_error(err, "router")
            return False, f"the router could not probe: {failure.message}"
        return reply.ok, reply.error

    return probe


def create_server(config: Config) -> ServiceHost:
    metrics = Metrics("health")
    host = ServiceHost("health", config.health, metrics)
    router_channel = mesh_channel(config.router)
    alerter = Alerter(config.health.alert_webhook, metrics.registry, config.health.alert_allow)
    monitor = Monitor(
        config.health,
        metrics.registry,
        alerter,
        probe=router_probe(router_pb2_grpc.RouterStub(router_channel)),
        state_dir=repo_path(config.health.state_dir),
    )
    checks = ServiceChecks(services_of(config))
    monitor_pb2_grpc.add_HealthMonitorServicer_to_server(HealthServicer(monitor, checks), host.grpc_server)
    host.add_service_name("clawdbot.v1.HealthMonitor")
    host.in_background(monitor.run)
    if config.jobs.over_kafka:
        kafka = KafkaEndpoint.from_config(config)
        host.in_background(lambda: consume_telemetry(kafka, monitor))

    async def close() -> None:
        await monitor.close()
        await alerter.close()
        await checks.close()
        await router_channel.close(grace=None)

    host.on_shutdown(close)
    return host
