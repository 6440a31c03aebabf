"""The two questions services and the runner ask of any Kafka: is it answering, and do my
topics exist (services create the topics they own at start-up)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code

log = logging.getLogger(__name__)


def _host_ports(bootstrap: str) -> list[tuple[str, int]]:
    """'host:port[,host:port…]' as pairs; a malformed address is a configuration bug and raises."""
    pairs = []
    for server in bootstrap.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"not a Kafka bootstrap address (host:port[,host:port…]): {bootstrap!r}")
        pairs.append((host.strip("[]"), int(port)))
    return pairs


async def _any_accepts(servers: list[tuple[str, int]], timeout_s: float) -> bool:
    for host, port in servers:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError):
            continue
        writer.close()
        return True
    return False


async def broker_ready(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True once a broker answers a metadata request and lists at least one broker
    (a KRaft broker lists itself only once it is registered and unfenced). Never raises
    for an absent or failing broker: a readiness probe, called again and again."""
    servers = _host_ports(bootstrap)
    # A plain connect first: aiokafka logs every failed bootstrap at ERROR, which a probe
    # polling a starting broker would otherwise do a dozen times.
    if not await _any_accepts(servers, timeout_s):
        return False
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
        return bool(client.cluster.brokers())
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await client.close()


async def ensure_topics(bootstrap: str, topics: Mapping[str, int], timeout_s: float = 60.0) -> None:
    """Create those of `topics` (name -> partitions; replication 1) that do not exist yet.

    Existing topics are left alone, also when their partition count differs (that is only
    logged: growing it would move keys to other partitions). Another process creating the
    same topic at the same moment is fine. Returns once the broker has a leader for every
    partition of the new topics. Retriable broker errors (a broker still starting) are
    retried until timeout_s; anything else raises a KafkaError naming the topic.
    """
    if not topics:
        return
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        # All topics (no names): a metadata request naming a missing topic would create it,
        # with the broker's defaults, on a broker that auto-creates topics.
        existing = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
        for name, partitions in topics.items():
            if name in existing and existing[name] != partitions:
                log.warning(
                    "topic exists with another partition count; left as it is",
                    extra={"topic": name, "partitions": existing[name], "wanted": partitions},
                )
        missing = {name: partitions for name, partitions in topics.items() if name not in existing}
        pending, delay = missing, 0.1
        while pending:
            response = await admin.create_topics(
                [NewTopic(name, partitions, 1) for name, partitions in pending.items()],
                timeout_ms=int(max(deadline - time.monotonic(), 1.0) * 1000),
            )
            retry = {}
            for name, code, message in _topic_errors(response):
                if code in (0, TopicAlreadyExistsError.errno):
                    continue
                error = for_code(code)
                if error.retriable and time.monotonic() + delay < deadline:
                    retry[name] = pending[name]
                    continue
                raise error(f"could not create Kafka topic {name!r}: {message or error.description}")
            if retry:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            pending = retry
        if missing:
            await _wait_for_leaders(admin, set(missing), deadline)
            log.info("created Kafka topics", extra={"topics": sorted(missing)})
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: set[str], deadline: float) -> None:
    """Until the broker's metadata has a leader for every partition of these new topics:
    the controller acknowledges a creation before the broker has caught up, and producing
    or subscribing in that moment only earns retries and warnings."""
    delay = 0.05
    while True:
        topics = {t["topic"]: t for t in await admin.describe_topics() if t["topic"] in names}
        lagging = sorted(
            name
            for name in names
            if name not in topics
            or topics[name]["error_code"]
            or not topics[name]["partitions"]
            or any(p["leader"] < 0 for p in topics[name]["partitions"])
        )
        if not lagging:
            return
        if time.monotonic() + delay >= deadline:
            raise KafkaTimeoutError(f"created Kafka topics {lagging} have no partition leaders yet")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    """(topic, error code, message) from any CreateTopics response version (v0 has no message)."""
    return [(entry[0], entry[1], entry[2] if len(entry) > 2 else None) for entry in response.topic_errors]
