"""The adapter service: the protocol front of the mesh.

It serves the public clawdbot.v1.Gateway (behind Envoy), turns every protocol's request
into one internal ModelRequest with metadata, consults the cache service, and calls the
router.
"""

from __future__ import annotations

import os

from clawdbot.adapter.auth import Authenticator
from clawdbot.adapter.gateway import Gateway
from clawdbot.adapter.protocols.base import ProtocolContext, load_protocols
from clawdbot.cache.client import ResponseCache
from clawdbot.common.config import Config
from clawdbot.common.kafka import KafkaEndpoint
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.gen.v1 import cache_pb2_grpc, gateway_pb2_grpc, monitor_pb2_grpc, orchestrator_pb2_grpc, router_pb2_grpc
from clawdbot.jobs.api import JobsApi
from clawdbot.jobs.execution import JobExecutor
from clawdbot.jobs.processing import JobProcessor
from clawdbot.jobs.queue import InProcessJobQueue, KafkaJobQueue
from clawdbot.jobs.store import MemoryJobStore, RedisJobStore, store_url

GATEWAY_SERVICE = "clawdbot.v1.Gateway"


def api_keys_from_env(env: dict[str, str] | None = None) -> list[str]:
    value = (env if env is not None else dict(os.environ)).get("CLAWDBOT_API_KEY", "")
    return [k.strip() for k in value.split(",") if k.strip()]


def jobs_api(
    config: Config, router: router_pb2_grpc.RouterStub, orchestrator: orchestrator_pb2_grpc.OrchestratorStub | None
) -> JobsApi:
    """Jobs through Kafka with records in Redis; without Kafka, in this process and memory."""
    if config.jobs.kafka_bootstrap:
        records = RedisJobStore(store_url(config), config.jobs.retention_s, config.redis)
        return JobsApi(
            records,
            KafkaJobQueue(KafkaEndpoint.from_config(config)),
            config.jobs.callback_allow,
            gateway=config.gateway,
        )
    store = MemoryJobStore(config.jobs.local_max_jobs, config.jobs.local_retention_s)
    executor = JobExecutor(router, store, config.jobs, orchestrator, max_request_bytes=config.gateway.max_request_bytes)
    processor = JobProcessor(executor, store, config.jobs)
    return JobsApi(
        store,
        InProcessJobQueue(processor, max_queued=config.jobs.local_max_queued),
        config.jobs.callback_allow,
        gateway=config.gateway,
    )


def create_server(config: Config, api_keys: list[str] | None = None) -> ServiceHost:
    metrics = Metrics("adapter")
    host = ServiceHost(
        "adapter",
        config.adapter,
        metrics,
        reflection_services=(GATEWAY_SERVICE,),
        http_client_max_size=config.gateway.max_request_bytes,
    )
    router_channel = internal_channel(f"{config.router.host}:{config.router.grpc_port}")
    router = router_pb2_grpc.RouterStub(router_channel)
    channels = [router_channel]
    cache: ResponseCache | None = None
    if config.cache.enabled:
        cache_channel = internal_channel(f"{config.cache.host}:{config.cache.grpc_port}")
        channels.append(cache_channel)
        cache = ResponseCache(cache_pb2_grpc.CacheServiceStub(cache_channel), config.cache, config.models, router)
    auth = Authenticator(api_keys if api_keys is not None else api_keys_from_env(), config.auth.keys)
    orchestrator = None
    if config.orchestrator.enabled:
        orchestrator_channel = internal_channel(f"{config.orchestrator.host}:{config.orchestrator.grpc_port}")
        channels.append(orchestrator_channel)
        orchestrator = orchestrator_pb2_grpc.OrchestratorStub(orchestrator_channel)
    health = None
    if config.health.enabled:
        health_channel = internal_channel(f"{config.health.host}:{config.health.grpc_port}")
        channels.append(health_channel)
        health = monitor_pb2_grpc.HealthMonitorStub(health_channel)
    jobs = jobs_api(config, router, orchestrator) if config.jobs.enabled else None
    gateway = Gateway(router, auth, metrics, config.adapter.router_timeout_s, cache, jobs, orchestrator, health)
    servicer = gateway_pb2_grpc.GatewayServicer()
    ctx = ProtocolContext(config=config, gateway=gateway, servicer=servicer, host=host)
    for plugin in load_protocols(config):
        plugin.install(ctx)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, host.grpc_server)
    host.add_service_name(GATEWAY_SERVICE)

    async def close_channels() -> None:
        if jobs is not None:
            await jobs.close()
        for channel in channels:
            await channel.close(grace=None)

    host.on_shutdown(close_channels)
    return host
