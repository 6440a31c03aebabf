"""`python -m clawdbot.jobs`: the jobs service, the one home of async jobs.

It serves clawdbot.v1.Jobs (submit, look up, list) to the adapter, and runs the jobs:
- with Kafka (jobs.kafka_bootstrap set): records in Redis, shared by every jobs process; a
  submission is produced to clawdbot.jobs, and each process is one member of a consumer
  group that runs them through the router. Run several for more throughput (the runner
  starts jobs.consumers of them): any of them answers any call.
- without: records in this process's memory, and its own in-process queue, run here
  (jobs/queue.py says why not a Redis-backed queue). Exactly one such process runs (the
  runner starts one), and its jobs say "durable": false.

Shutdown, in ServiceHost.stop's order: report NOT_SERVING; stop the gRPC server (no new
submissions; those in flight finish); ask the consumer to stop (it finishes the batch in
hand, commits it and leaves its group); then `close` below: the queue (the Kafka producer;
or the in-process workers, whose jobs are lost, as "durable": false said), the processor
(callbacks under way get their grace), the store, the channels.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiokafka.errors import KafkaError

from clawdbot.common import topics
from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.jobs import store_url
from clawdbot.common.kafka import KafkaEndpoint, ensure_topics
from clawdbot.common.metrics import Metrics
from clawdbot.common.retry import RetryPolicy
from clawdbot.common.service import ServiceHost, mesh_channel
from clawdbot.gen.v1 import jobs_pb2_grpc, orchestrator_pb2_grpc, router_pb2_grpc
from clawdbot.jobs.api import JobsApi, JobsServicer
from clawdbot.jobs.consumer import JobConsumer
from clawdbot.jobs.execution import JobExecutor
from clawdbot.jobs.keys import JobKeys
from clawdbot.jobs.processing import JobProcessor
from clawdbot.jobs.queue import InProcessJobQueue, JobQueue, KafkaJobQueue
from clawdbot.jobs.store import JobStore, MemoryJobStore, RedisJobStore

log = logging.getLogger(__name__)

JOBS_SERVICE: Final = "clawdbot.v1.Jobs"
# Restarting the consumer while Kafka (or Redis) is away: it never gives up, so only the
# policy's backoff is used, capped low so that a broker back is noticed soon.
CONSUMER_RESTART: Final = RetryPolicy(max_attempts=0, base_s=0.5, max_backoff_s=5.0)


def create_server(config: Config) -> ServiceHost:
    jobs = config.jobs
    metrics = Metrics("jobs")
    host = ServiceHost("jobs", jobs, metrics)
    router_channel = mesh_channel(config.router)
    channels = [router_channel]
    orchestrator = None
    if config.orchestrator.enabled:
        channels.append(mesh_channel(config.orchestrator))
        orchestrator = orchestrator_pb2_grpc.OrchestratorStub(channels[-1])
    store: JobStore
    if jobs.over_kafka:
        store = RedisJobStore(store_url(config), jobs.retention_s, config.redis)
    else:
        store = MemoryJobStore(jobs.local_max_jobs, jobs.local_retention_s)
    # The key store the adapters authenticate virtual keys from: a job of such a key
    # re-reads it when it runs (opened on the first such job, migrated if need be).
    keys = JobKeys(config.database.effective_url())
    executor = JobExecutor(
        router_pb2_grpc.RouterStub(router_channel),
        store,
        jobs,
        orchestrator,
        max_request_bytes=config.gateway.max_request_bytes,
        keys=keys,
    )
    processor = JobProcessor(executor, store, jobs)
    queue: JobQueue
    if jobs.over_kafka:
        kafka = KafkaEndpoint.from_config(config)
        queue = KafkaJobQueue(kafka)
        consumer = JobConsumer(jobs, processor, registry=metrics.registry, kafka=kafka)

        async def consume() -> None:
            # Kafka may be restarting: keep trying, saying so, rather than die quietly.
            failures = 0
            while True:
                try:
                    await ensure_topics(
                        kafka, {topics.JOBS: jobs.partitions, topics.RESULTS: jobs.partitions, topics.DLQ: 1}
                    )
                    await consumer.run()
                    return
                except (KafkaError, OSError, GatewayError) as exc:
                    # Kafka or the job store (Redis) is away; uncommitted jobs are redelivered.
                    failures += 1
                    delay = CONSUMER_RESTART.backoff(failures)
                    log.error(
                        "job consumer interrupted; retrying",
                        extra={"error": f"{type(exc).__name__}: {exc}", "delay_s": round(delay, 3)},
                    )
                    await asyncio.sleep(delay)

        host.in_background(consume, stop=consumer.stop)
    else:
        queue = InProcessJobQueue(processor, max_queued=jobs.local_max_queued)
    api = JobsApi(store, queue, jobs.callback_allow, max_request_bytes=config.gateway.max_request_bytes)
    jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(api), host.grpc_server)
    host.add_service_name(JOBS_SERVICE)

    async def close() -> None:
        await queue.close()
        await processor.close()
        await store.close()
        await keys.close()
        for channel in channels:
            await channel.close(grace=None)

    host.on_shutdown(close)
    return host
