"""Telemetry into the monitor: the clawdbot.telemetry topic when Kafka is there (the
routers publish every call to it), and the gRPC Report stream otherwise.

Each health process reads the whole topic under a group of its own, from the newest
record: a restarted process rebuilds its windows from fresh calls, and every replica sees
every instance.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from clawdbot.common import topics
from clawdbot.common.kafka import KafkaEndpoint, ensure_topics
from clawdbot.health.monitor import Monitor

log = logging.getLogger(__name__)


def take(monitor: Monitor, raw: bytes | None, source: str) -> bool:
    """One observation into the monitor; False (and a log line) if it is not one."""
    try:
        observation = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        log.warning("unreadable observation skipped", extra={"source": source, "error": str(exc)})
        return False
    if not isinstance(observation, dict):
        log.warning("observation is not an object; skipped", extra={"source": source})
        return False
    monitor.ingest(observation, source)
    return True


async def consume_telemetry(kafka: str | KafkaEndpoint, monitor: Monitor) -> None:
    """Read until cancelled; reconnect when Kafka goes away."""
    endpoint = KafkaEndpoint.of(kafka)
    group = f"clawdbot-health-{socket.gethostname()}-{os.getpid()}"
    complained = False
    while True:
        consumer = AIOKafkaConsumer(topics.TELEMETRY, **endpoint.options(group_id=group, auto_offset_reset="latest"))
        try:
            await ensure_topics(endpoint, {topics.TELEMETRY: topics.TELEMETRY_PARTITIONS})
            await consumer.start()
            log.info("consuming telemetry", extra={"topic": topics.TELEMETRY, "group": group})
            complained = False
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                for records in batches.values():
                    for record in records:
                        take(monitor, record.value, "kafka")
        except (KafkaError, OSError) as exc:
            if not complained:
                log.warning("telemetry unavailable: Kafka away", extra={"error": f"{type(exc).__name__}: {exc}"})
                complained = True
            await asyncio.sleep(2)
        finally:
            await consumer.stop()
