"""The adapter service: the protocol front of the mesh.

It serves the public clawdbot.v1.Gateway (behind Envoy), turns every protocol's request
into one internal ModelRequest with metadata, consults the cache service, and calls the
router. Async jobs it checks and hands to the jobs service, which runs them. Virtual
keys it authenticates from the key store (database.url), cached (adapter/virtual_keys.py).
Each request is admitted against its key's rate limits (adapter/limits.py), counted in
Redis (quota.redis_url, else the cache's) so that every replica shares them.
"""

from __future__ import annotations

import os

from clawdbot.adapter.auth import Authenticator
from clawdbot.adapter.gateway import Gateway
from clawdbot.adapter.jobs import JobsFront
from clawdbot.adapter.limits import Admitter
from clawdbot.adapter.protocols.base import ProtocolContext, load_protocols
from clawdbot.adapter.virtual_keys import VirtualKeys
from clawdbot.common.clients.cache import ResponseCache
from clawdbot.common.clients.jobs import JobsClient
from clawdbot.common.config import Config
from clawdbot.common.metrics import Metrics
from clawdbot.common.quota import RateLimiter
from clawdbot.common.quota import quota_redis as connect_quota_redis
from clawdbot.common.service import ServiceHost, mesh_channel
from clawdbot.gen.v1 import (
    cache_pb2_grpc,
    gateway_pb2_grpc,
    jobs_pb2_grpc,
    monitor_pb2_grpc,
    orchestrator_pb2_grpc,
    router_pb2_grpc,
)

GATEWAY_SERVICE = "clawdbot.v1.Gateway"


def api_keys_from_env(env: dict[str, str] | None = None) -> list[str]:
    value = (env if env is not None else dict(os.environ)).get("CLAWDBOT_API_KEY", "")
    return [k.strip() for k in value.split(",") if k.strip()]


def create_server(config: Config, api_keys: list[str] | None = None) -> ServiceHost:
    metrics = Metrics("adapter")
    host = ServiceHost(
        "adapter",
        config.adapter,
        metrics,
        reflection_services=(GATEWAY_SERVICE,),
        http_client_max_size=config.gateway.max_request_bytes,
    )
    router_channel = mesh_channel(config.router)
    router = router_pb2_grpc.RouterStub(router_channel)
    channels = [router_channel]
    cache: ResponseCache | None = None
    if config.cache.enabled:
        cache_channel = mesh_channel(config.cache)
        channels.append(cache_channel)
        cache = ResponseCache(cache_pb2_grpc.CacheServiceStub(cache_channel), config.cache, config.models, router)
    # Opened by its background task once the host starts (migrating the schema if need
    # be); until then a virtual key's first lookup waits for it. Static keys never do.
    keys = VirtualKeys(config.database.effective_url())
    host.in_background(keys.run, stop=keys.stop)
    auth = Authenticator(api_keys if api_keys is not None else api_keys_from_env(), config.auth.keys, virtual=keys)
    # Rate limits: counted in Redis, shared by every replica; no Redis URL at all: in this
    # process's memory (RateLimiter says so once: limits then multiply by the replicas).
    quota_redis = connect_quota_redis(config)
    admitter = Admitter(RateLimiter(quota_redis))
    orchestrator = None
    if config.orchestrator.enabled:
        orchestrator_channel = mesh_channel(config.orchestrator)
        channels.append(orchestrator_channel)
        orchestrator = orchestrator_pb2_grpc.OrchestratorStub(orchestrator_channel)
    health = None
    if config.health.enabled:
        health_channel = mesh_channel(config.health)
        channels.append(health_channel)
        health = monitor_pb2_grpc.HealthMonitorStub(health_channel)
    jobs = None
    if config.jobs.enabled:
        # The jobs service at jobs.host:grpc_port, with Kafka or without: the first of the
        # runner's jobs processes (any of them answers any call; a k8s Service, all of them).
        jobs_channel = mesh_channel(config.jobs)
        channels.append(jobs_channel)
        jobs = JobsFront(JobsClient(jobs_pb2_grpc.JobsStub(jobs_channel)), config.gateway, admitter)
    gateway = Gateway(
        router,
        auth,
        metrics,
        config.adapter.router_timeout_s,
        cache,
        jobs,
        orchestrator,
        health,
        keys=keys,
        admitter=admitter,
    )
    ctx = ProtocolContext(config=config, gateway=gateway, host=host)
    for plugin in load_protocols(config):
        plugin.install(ctx)
    gateway_pb2_grpc.add_GatewayServicer_to_server(ctx.rpcs.servicer(), host.grpc_server)
    host.add_service_name(GATEWAY_SERVICE)

    async def close_channels() -> None:
        for channel in channels:
            await channel.close(grace=None)

    host.on_shutdown(close_channels)
    host.on_shutdown(keys.close)
    if quota_redis is not None:
        host.on_shutdown(quota_redis.aclose)
    return host
