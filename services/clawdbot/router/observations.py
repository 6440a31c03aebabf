"""Per-call telemetry: one observation of every model call, published to Kafka's
clawdbot.telemetry topic for the health service (or, without Kafka, streamed to the health
service over gRPC), off the request's hot path.

Recording is a put into a bounded in-memory queue; a background task sends in batches
(acks=1: telemetry may lose a message in a broker crash; requests must never wait for it).
When the queue is full, for instance while Kafka is away, observations are dropped and
counted rather than slowing requests or growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import grpc
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import trace
from prometheus_client import Counter

from clawdbot.common import topics
from clawdbot.common.kafka import KafkaEndpoint, ensure_topics
from clawdbot.common.metrics import Metrics
from clawdbot.gen.v1 import monitor_pb2, monitor_pb2_grpc
from clawdbot.router.registry import Instance

log = logging.getLogger(__name__)

QUEUE_LIMIT: Final = 10_000


@dataclass
class Observation:
    instance: str
    model: str
    task: str
    started_at: float
    api_key_id: str
    request_id: str
    trace_id: str = ""
    status: str = "ok"  # ok | timeout | unreachable | server_error | client_error | ...
    http_status: int = 200
    latency_s: float = 0.0
    ttft_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def begin(cls, instance: Instance, task: str, api_key_id: str, request_id: str) -> Observation:
        context = trace.get_current_span().get_span_context()
        return cls(
            instance=instance.id,
            model=instance.name,
            task=task,
            started_at=time.time(),
            api_key_id=api_key_id,
            request_id=request_id,
            trace_id=f"{context.trace_id:032x}" if context.is_valid else "",
        )


class TelemetryPublisher:
    def __init__(self, kafka: str | KafkaEndpoint, metrics: Metrics) -> None:
        self._kafka = KafkaEndpoint.of(kafka)
        self._queue: asyncio.Queue[Observation] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = Counter(
            "clawdbot_telemetry_dropped",
            "Call observations not published (queue full: Kafka slow or away).",
            registry=metrics.registry,
        )
        self.published = Counter(
            "clawdbot_telemetry_published", "Call observations sent to Kafka.", registry=metrics.registry
        )

    def record(self, observation: Observation) -> None:
        try:
            self._queue.put_nowait(observation)
        except asyncio.QueueFull:
            self.dropped.inc()

    async def run(self) -> None:
        """Send until cancelled; reconnect (quietly after the first complaint) when Kafka goes."""
        complained = False
        while True:
            producer = AIOKafkaProducer(**self._kafka.options(acks=1, linger_ms=50))
            try:
                await ensure_topics(self._kafka, {topics.TELEMETRY: topics.TELEMETRY_PARTITIONS})
                await producer.start()
                complained = False
                await self._send_forever(producer)
            except (KafkaError, OSError) as exc:
                if not complained:
                    log.warning(
                        "telemetry not published: Kafka unavailable", extra={"error": f"{type(exc).__name__}: {exc}"}
                    )
                    complained = True
                await asyncio.sleep(2)
            finally:
                await producer.stop()

    async def _batch(self, linger_s: float = 0.0) -> list[Observation]:
        """The waiting observations (at least one; waits for it), up to 500; with a
        linger, those that arrive within it after the first as well."""
        batch = [await self._queue.get()]
        if linger_s and self._queue.qsize() < 500:
            await asyncio.sleep(linger_s)
        while not self._queue.empty() and len(batch) < 500:
            batch.append(self._queue.get_nowait())
        return batch

    async def _send_forever(self, producer: AIOKafkaProducer) -> None:
        while True:
            batch = await self._batch()
            for observation in batch:
                # orjson writes a dataclass as its fields, natively (asdict is far slower).
                await producer.send(topics.TELEMETRY, orjson.dumps(observation), key=observation.instance.encode())
            self.published.inc(len(batch))


class ReportingPublisher(TelemetryPublisher):
    """Without Kafka: the same observations, streamed to the health service's Report."""

    def __init__(self, health: monitor_pb2_grpc.HealthMonitorStub, metrics: Metrics) -> None:
        super().__init__("", metrics)
        self._health = health

    async def run(self) -> None:
        complained = False
        while True:
            call = self._health.Report()
            try:
                while True:
                    # A message per call would cost both sides more than the calls' own
                    # accounting: a tenth of a second of them travels together.
                    batch = await self._batch(linger_s=0.1)
                    payload = [orjson.dumps(o) for o in batch]
                    await call.write(monitor_pb2.ObservationBatch(observations_json=payload))
                    self.published.inc(len(batch))
                    complained = False
            except grpc.aio.AioRpcError as err:
                if not complained:
                    log.warning("telemetry not reported: health service unavailable", extra={"error": err.code().name})
                    complained = True
            finally:
                call.cancel()
            await asyncio.sleep(2)
