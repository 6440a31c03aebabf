"""The Kafka consumer of jobs: one member of a consumer group, at least once, idempotent.

A batch from the broker runs concurrently (up to `concurrency` jobs); each partition's
offsets are committed only after all its jobs in the batch have their end state stored and
published. A process killed mid-batch commits nothing of it: the group gives those
partitions to another member, which finds the jobs already finished skip (their result is
stored once) and runs the rest. Malformed messages and failed jobs go to the DLQ.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Gauge

from clawdbot.common import topics
from clawdbot.common.config import JobsConfig
from clawdbot.common.jobs import KINDS, TERMINAL
from clawdbot.common.kafka import KafkaEndpoint
from clawdbot.common.logging import request_id_var
from clawdbot.common.telemetry import extract_context
from clawdbot.jobs.processing import JobProcessor
from clawdbot.jobs.records import Job

log = logging.getLogger(__name__)


class MalformedJob(ValueError):
    pass


def parse_job(raw: bytes | None) -> Job:
    try:
        job = Job.from_json(raw or b"")
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise MalformedJob(f"not a job: {exc}") from exc
    if not job.id or job.kind not in KINDS or not isinstance(job.request, dict):
        raise MalformedJob(f"not a runnable job: id={job.id!r} kind={job.kind!r}")
    return job


def _headers(record: ConsumerRecord[Any, Any]) -> list[tuple[str, str]]:
    return [(k, v.decode(errors="replace")) for k, v in (record.headers or ())]


class JobConsumer:
    def __init__(
        self,
        config: JobsConfig,
        processor: JobProcessor,
        concurrency: int = 32,
        registry: CollectorRegistry | None = None,
        kafka: KafkaEndpoint | None = None,
    ) -> None:
        self._config = config
        # The broker with its security settings (None: config.kafka_bootstrap, PLAINTEXT).
        self._kafka = kafka or KafkaEndpoint(config.kafka_bootstrap)
        self._processor = processor
        self._gate = asyncio.Semaphore(concurrency)
        self._tracer = trace.get_tracer("clawdbot.jobs")
        self._stopping = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        # Per partition this member holds: jobs queued behind its committed offset.
        self.lag = Gauge(
            "clawdbot_jobs_lag",
            "Jobs waiting in a partition this consumer holds: the partition's end offset minus the committed one.",
            ["partition"],
            registry=registry,
        )
        self._lag_partitions: set[str] = set()

    async def run(self) -> None:
        self.producer = AIOKafkaProducer(**self._kafka.options(acks="all", enable_idempotence=True))
        self.consumer = AIOKafkaConsumer(
            topics.JOBS,
            **self._kafka.options(
                group_id=topics.CONSUMER_GROUP,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # A killed member's partitions move to the others within seconds.
                session_timeout_ms=6000,
                heartbeat_interval_ms=1000,
                max_poll_interval_ms=int(self._config.job_timeout_s * self._config.max_attempts * 1000) + 60_000,
            ),
        )
        await self.producer.start()
        await self.consumer.start()
        log.info("consuming jobs", extra={"topic": topics.JOBS, "group": topics.CONSUMER_GROUP})
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=500, max_records=256)
                if batches:
                    await asyncio.gather(*(self._partition(tp, records) for tp, records in batches.items()))
                await self._measure_lag()
        finally:
            self._forget_lag(set())
            await self.consumer.stop()
            await self.producer.stop()

    async def _measure_lag(self) -> None:
        """Each batch is committed by now, so the position is the committed offset; the
        highwater comes with every fetch response (none yet: the partition is not measured)."""
        assert self.consumer is not None
        held: set[str] = set()
        for tp in self.consumer.assignment():
            try:
                highwater = self.consumer.highwater(tp)
                if highwater is None:
                    continue
                position = await self.consumer.position(tp)
            except (IllegalStateError, AssertionError):
                continue  # taken away by a rebalance meanwhile
            label = str(tp.partition)
            self.lag.labels(label).set(max(0, highwater - position))
            held.add(label)
        self._forget_lag(held)

    def _forget_lag(self, held: set[str]) -> None:
        """Partitions given to another member are theirs to report."""
        for label in self._lag_partitions - held:
            self.lag.remove(label)
        self._lag_partitions = held

    def stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group."""
        self._stopping.set()

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        await asyncio.gather(*(self._guarded(record) for record in records))
        assert self.consumer is not None
        await self.consumer.commit({tp: records[-1].offset + 1})

    async def _guarded(self, record: ConsumerRecord[Any, Any]) -> None:
        async with self._gate:
            await self._handle(record)

    async def _handle(self, record: ConsumerRecord[Any, Any]) -> None:
        try:
            job = parse_job(record.value)
        except MalformedJob as exc:
            log.error("malformed job sent to the DLQ", extra={"partition": record.partition, "offset": record.offset})
            await self._send(
                topics.DLQ,
                record.key,
                {
                    "error": {"message": str(exc), "type": "invalid_request_error", "code": "malformed_job"},
                    "payload": (record.value or b"").decode(errors="replace"),
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
            return
        request_id_var.set(job.id)
        store = self._processor.store
        current = await store.get(job.id)
        if current is not None and current.status in TERMINAL:
            # Redelivered after its result was stored: nothing to run, maybe something to publish.
            if not current.published:
                await self._publish(current)
            return
        if current is None:
            await store.create(job)  # produced by a submitter whose record is gone: keep it
        else:
            job = current
        with self._tracer.start_as_current_span(
            f"job {job.kind}", context=extract_context(_headers(record)), kind=SpanKind.CONSUMER
        ) as span:
            span.set_attribute("clawdbot.job_id", job.id)
            span.set_attribute("messaging.system", "kafka")
            span.set_attribute("messaging.destination.name", topics.JOBS)
            done, stored = await self._processor.process(job)
        if stored:
            if done.status == "failed":
                await self._send(topics.DLQ, job.id.encode(), {"job": done.public(), "error": done.error})
            await self._publish(done)

    async def _publish(self, job: Job) -> None:
        await self._send(topics.RESULTS, job.id.encode(), job.public())
        job.published = True
        await self._processor.store.update(job)

    async def _send(self, topic: str, key: bytes | None, value: dict[str, Any]) -> None:
        assert self.producer is not None
        await self.producer.send_and_wait(topic, orjson.dumps(value), key=key)
