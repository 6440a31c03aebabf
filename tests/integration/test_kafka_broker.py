"""The local Kafka broker (deploy/kafka/kafka.sh) against aiokafka: topics, an idempotent
producer, consumer groups, and the data surviving a restart over the same storage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from clawdbot.common.kafka import broker_ready, ensure_topics
from tests.support import Proc, start_kafka, unused_port

# Generous: a busy 2-core machine. Nothing waits this long unless something is broken.
CONSUME_WITHIN_S = 120.0
MESSAGES = 200
KEYS = 7


@dataclass
class KafkaBroker:
    tmp: Path
    proc: Proc
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self) -> int:
        """SIGTERM (a clean shutdown), then the same ports and data again; returns the exit code."""
        code = self.proc.stop()
        self.proc, _, _ = start_kafka(self.tmp, self.port, self.controller_port)
        return code


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    tmp = tmp_path_factory.mktemp("kafka")
    broker = KafkaBroker(tmp, *start_kafka(tmp))
    yield broker
    broker.proc.stop()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def produce(bootstrap: str, topic: str, count: int, tag: str) -> list[tuple[bytes, bytes]]:
    """count keyed messages, each acknowledged by the broker; returns (key, value) in send order."""
    sent = [(f"key-{i % KEYS}".encode(), f"{tag}-{i}".encode()) for i in range(count)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        # All in flight at once (batched), then every acknowledgement awaited.
        acks = [await producer.send(topic, key=key, value=value) for key, value in sent]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return sent


async def consume(bootstrap: str, topic: str, group: str, count: int) -> list[tuple[bytes, bytes, int]]:
    """Read count messages as a member of group (from the earliest offset when the group has
    none committed) and commit; returns (key, value, partition) in the order read."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: list[tuple[bytes, bytes, int]] = []
    try:
        deadline = time.monotonic() + CONSUME_WITHIN_S
        while len(received) < count:
            assert time.monotonic() < deadline, f"read {len(received)} of {count} messages from {topic}"
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                received += [(r.key, r.value, r.partition) for r in records]
        await consumer.commit()
        # Nothing beyond what was expected.
        assert not any((await consumer.getmany(timeout_ms=500)).values())
    finally:
        await consumer.stop()
    return received


async def partition_counts(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> list[int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return [await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)]
    finally:
        await consumer.stop()


def assert_keyed_in_order(sent: list[tuple[bytes, bytes]], received: list[tuple[bytes, bytes, int]]) -> None:
    """Every message exactly once; each key on one partition, its messages in send order."""
    assert sorted((k, v) for k, v, _ in received) == sorted(sent)
    for key in {k for k, _ in sent}:
        assert len({p for k, _, p in received if k == key}) == 1
        assert [v for k, v, _ in received if k == key] == [v for k, v in sent if k == key]


@pytest.mark.asyncio
async def test_ensure_topics_creates_missing_topics_and_is_idempotent(kafka: KafkaBroker) -> None:
    jobs, events = unique("jobs"), unique("events")
    await ensure_topics(kafka.bootstrap, {jobs: 3, events: 1})
    await ensure_topics(kafka.bootstrap, {jobs: 3, events: 1})
    # An existing topic is left alone, whatever partition count is asked for.
    await ensure_topics(kafka.bootstrap, {jobs: 5})
    counts = await partition_counts(kafka.bootstrap)
    assert counts[jobs] == 3
    assert counts[events] == 1


@pytest.mark.asyncio
async def test_broker_ready_says_no_when_nothing_listens() -> None:
    assert not await broker_ready(f"127.0.0.1:{unused_port()}", timeout_s=2.0)


@pytest.mark.asyncio
async def test_idempotent_producer_and_a_consumer_group(kafka: KafkaBroker) -> None:
    topic, group = unique("orders"), unique("group")
    await ensure_topics(kafka.bootstrap, {topic: 3})
    sent = await produce(kafka.bootstrap, topic, MESSAGES, "first")

    received = await consume(kafka.bootstrap, topic, group, MESSAGES)

    assert_keyed_in_order(sent, received)
    offsets = await committed_offsets(kafka.bootstrap, group, topic, 3)
    assert sum(o or 0 for o in offsets) == MESSAGES
    # The group resumes after its commit: more messages, and only those, reach it.
    more = await produce(kafka.bootstrap, topic, 10, "more")
    assert sorted((k, v) for k, v, _ in await consume(kafka.bootstrap, topic, group, 10)) == sorted(more)


@pytest.mark.asyncio
async def test_messages_and_commits_survive_a_restart(kafka: KafkaBroker) -> None:
    topic, group = unique("durable"), unique("group")
    await ensure_topics(kafka.bootstrap, {topic: 3})
    sent = await produce(kafka.bootstrap, topic, MESSAGES, "before")
    assert len(await consume(kafka.bootstrap, topic, group, MESSAGES)) == MESSAGES

    # start_kafka calls asyncio.run: off this event loop.
    code = await asyncio.to_thread(kafka.restart)

    assert code in (0, 143), f"the broker did not stop cleanly on SIGTERM (exit code {code})"
    assert await broker_ready(kafka.bootstrap)
    # Topics, messages and the group's commits are all still there.
    assert (await partition_counts(kafka.bootstrap))[topic] == 3
    assert_keyed_in_order(sent, await consume(kafka.bootstrap, topic, unique("fresh"), MESSAGES))
    assert sum(o or 0 for o in await committed_offsets(kafka.bootstrap, group, topic, 3)) == MESSAGES
    await ensure_topics(kafka.bootstrap, {topic: 3})
    # And it takes new messages: the old group gets exactly those.
    after = await produce(kafka.bootstrap, topic, MESSAGES, "after")
    assert_keyed_in_order(after, await consume(kafka.bootstrap, topic, group, MESSAGES))
