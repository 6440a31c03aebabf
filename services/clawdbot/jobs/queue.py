"""Getting a job to a consumer: Kafka (durable; answered only once the broker has it), or
this process's own queue when there is no Kafka (the jobs die with the process).

Why in-process rather than a Redis-backed queue without Kafka: the mesh runs without
Kafka where it runs small (the lite image: no Redis either), and a second durable queue
would have to re-build what Kafka's consumer group gives (delivery at least once,
another member taking over a dead one's work) for a mode that says "not durable" anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from clawdbot.common import topics
from clawdbot.common.errors import GatewayError
from clawdbot.common.kafka import KafkaEndpoint
from clawdbot.common.logging import request_id_var
from clawdbot.common.telemetry import extract_context, inject_headers
from clawdbot.jobs.processing import JobProcessor
from clawdbot.jobs.records import Job

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    durable: bool

    async def send(self, job: Job) -> None:
        """Hand the job over; raises GatewayError(503) when it cannot be taken."""
        ...

    async def close(self) -> None: ...


def kafka_headers() -> list[tuple[str, bytes]]:
    """The current trace context, so the consumer's spans join the submitter's trace."""
    return [(k, v.encode()) for k, v in inject_headers().items()]


class KafkaJobQueue:
    durable = True

    def __init__(self, kafka: str | KafkaEndpoint, send_timeout_s: float = 15.0) -> None:
        self._kafka = KafkaEndpoint.of(kafka)
        self._timeout = send_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def _ready(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    **self._kafka.options(
                        acks="all",
                        enable_idempotence=True,
                        request_timeout_ms=int(self._timeout * 1000),
                        retry_backoff_ms=200,
                    )
                )
                try:
                    await producer.start()
                except BaseException:
                    # A broker refusing us (credentials) or away: its connections go too.
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send(self, job: Job) -> None:
        try:
            producer = await self._ready()
            await asyncio.wait_for(
                producer.send_and_wait(topics.JOBS, job.to_json(), key=job.id.encode(), headers=kafka_headers()),
                self._timeout,
            )
        except (KafkaError, TimeoutError, OSError) as exc:
            log.error(
                "job not queued: Kafka unavailable", extra={"job": job.id, "error": f"{type(exc).__name__}: {exc}"}
            )
            raise GatewayError.unavailable(
                "The job queue is unavailable; the job was not accepted. Try again shortly.", code="queue_unavailable"
            ) from exc

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class InProcessJobQueue:
    """Without Kafka: jobs run in this process, `concurrency` at a time, and say they are
    not durable (a restart loses those not finished). At most `max_queued` wait; past
    that a job is refused with 503 `overloaded` at submit rather than queued without bound.
    Each job carries its submitter's trace context, as a Kafka record does in its headers:
    its run is a CONSUMER span of the submitter's trace either way."""

    durable = False

    def __init__(self, processor: JobProcessor, concurrency: int = 8, max_queued: int = 1000) -> None:
        self._processor = processor
        self._concurrency = concurrency
        self._queue: asyncio.Queue[tuple[Job, dict[str, str]]] = asyncio.Queue(maxsize=max_queued)
        self._workers: list[asyncio.Task[None]] = []
        self._tracer = trace.get_tracer("clawdbot.jobs")

    async def send(self, job: Job) -> None:
        if not self._workers:
            # In a context of their own: not the first submitter's (its span, its request id).
            self._workers = [
                asyncio.create_task(self._work(), context=contextvars.Context()) for _ in range(self._concurrency)
            ]
        try:
            self._queue.put_nowait((job, inject_headers()))
        except asyncio.QueueFull:
            raise GatewayError(
                503,
                f"The in-process job queue is full ({self._queue.maxsize} jobs waiting); retry later.",
                "service_unavailable",
                "overloaded",
                None,
                "5",
            ) from None

    async def _work(self) -> None:
        while True:
            job, headers = await self._queue.get()
            request_id_var.set(job.id)
            try:
                with self._tracer.start_as_current_span(
                    f"job {job.kind}", context=extract_context(headers), kind=SpanKind.CONSUMER
                ) as span:
                    span.set_attribute("clawdbot.job_id", job.id)
                    await self._processor.process(job)
            except Exception:
                log.exception("in-process job failed unexpectedly", extra={"job": job.id})
            finally:
                self._queue.task_done()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
