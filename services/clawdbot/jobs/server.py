"""`python -m clawdbot.jobs`: one consumer of the job queue, its own process. Run several
for more throughput: they share the work as one Kafka consumer group."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.errors import KafkaError

from clawdbot.common import topics
from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.kafka import KafkaEndpoint, ensure_topics
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.gen.v1 import orchestrator_pb2_grpc, router_pb2_grpc
from clawdbot.jobs.consumer import JobConsumer
from clawdbot.jobs.execution import JobExecutor
from clawdbot.jobs.processing import JobProcessor
from clawdbot.jobs.store import RedisJobStore, store_url

log = logging.getLogger(__name__)


def create_server(config: Config) -> ServiceHost:
    jobs = config.jobs
    metrics = Metrics("jobs")
    host = ServiceHost("jobs", jobs, metrics)
    router_channel = internal_channel(f"{config.router.host}:{config.router.grpc_port}")
    channels = [router_channel]
    orchestrator = None
    if config.orchestrator.enabled:
        channels.append(internal_channel(f"{config.orchestrator.host}:{config.orchestrator.grpc_port}"))
        orchestrator = orchestrator_pb2_grpc.OrchestratorStub(channels[-1])
    store = RedisJobStore(store_url(config), jobs.retention_s, config.redis)
    executor = JobExecutor(
        router_pb2_grpc.RouterStub(router_channel),
        store,
        jobs,
        orchestrator,
        max_request_bytes=config.gateway.max_request_bytes,
    )
    processor = JobProcessor(executor, store, jobs)
    kafka = KafkaEndpoint.from_config(config)
    consumer = JobConsumer(jobs, processor, registry=metrics.registry, kafka=kafka)

    async def consume() -> None:
        # Kafka may be restarting: keep trying, saying so, rather than die quietly.
        while True:
            try:
                await ensure_topics(
                    kafka, {topics.JOBS: jobs.partitions, topics.RESULTS: jobs.partitions, topics.DLQ: 1}
                )
                await consumer.run()
                return
            except (KafkaError, OSError, GatewayError) as exc:
                # Kafka or the job store (Redis) is away; uncommitted jobs are redelivered.
                log.error("job consumer interrupted; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(2)

    async def close() -> None:
        await processor.close()
        await store.close()
        for channel in channels:
            await channel.close(grace=None)

    host.in_background(consume, stop=consumer.stop)
    host.on_shutdown(close)
    return host
