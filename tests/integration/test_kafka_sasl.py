"""The `kafka` config section against a real broker (deploy/kafka) whose client listener is
SASL_PLAINTEXT with the PLAIN mechanism: the mesh's clients, built from KafkaEndpoint,
create topics, queue a job (the jobs service's KafkaJobQueue) and read it back with the right
credentials; a wrong password or no SASL at all gets nowhere, and says so quickly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from clawdbot.common import topics
from clawdbot.common.config import Config, KafkaConfig
from clawdbot.common.errors import GatewayError
from clawdbot.common.kafka import KafkaEndpoint, broker_ready, ensure_topics, kafka_security_options
from clawdbot.jobs.queue import KafkaJobQueue
from clawdbot.jobs.records import Job
from clawdbot.runner.kafka import broker_argv, format_storage, kafka_installed
from tests.support import Proc, free_port, start_server

USER, PASSWORD = "clawdbot", "s3cret-for-tests"
# Generous: a busy 2-core machine. A refusal is a round trip or two.
REFUSED_WITHIN_S = 15.0
CONSUME_WITHIN_S = 60.0


def sasl_properties(text: str, port: int) -> str:
    """kafka.sh's server.properties with the client listener turned SASL_PLAINTEXT/PLAIN
    (the controller listener stays PLAINTEXT, on loopback, inside the one JVM)."""
    replaced = {
        f"listeners=PLAINTEXT://127.0.0.1:{port},": f"listeners=SASL_PLAINTEXT://127.0.0.1:{port},",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}": f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}",
        "protocol.map=PLAINTEXT:PLAINTEXT,": "protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,",
        "inter.broker.listener.name=PLAINTEXT": "inter.broker.listener.name=SASL_PLAINTEXT",
    }
    for old, new in replaced.items():
        assert old in text, f"kafka.sh's server.properties changed: no {old!r}"
        text = text.replace(old, new)
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{USER}" password="{PASSWORD}" user_{USER}="{PASSWORD}";'
    )
    return text + (
        "\nsasl.enabled.mechanisms=PLAIN\n"
        "sasl.mechanism.inter.broker.protocol=PLAIN\n"
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}\n"
    )


def endpoint(port: int, password: str = PASSWORD) -> KafkaEndpoint:
    config = Config.model_validate(
        {"jobs": {"kafka_bootstrap": f"127.0.0.1:{port}"}, "kafka": {"security_protocol": "SASL_PLAINTEXT"}}
    )
    return KafkaEndpoint.from_config(config, env={"KAFKA_USERNAME": USER, "KAFKA_PASSWORD": password})


@pytest.fixture(scope="module")
def sasl_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    assert kafka_installed(), "Kafka's jars missing: `make setup` installs them"
    tmp = tmp_path_factory.mktemp("kafka-sasl")
    data_dir = tmp / "kafka"
    controller = free_port()

    def argv(port: int) -> list[str]:
        format_storage(data_dir, port, controller)
        properties = data_dir / "server.properties"
        properties.write_text(sasl_properties(properties.read_text(), port))
        return broker_argv(data_dir)

    def answers(port: int) -> bool:
        return asyncio.run(broker_ready(endpoint(port)))

    proc, port = start_server("kafka-sasl", tmp, argv, answers, within_s=180)
    assert isinstance(proc, Proc)
    yield port
    proc.stop()


@pytest.mark.asyncio
async def test_the_mesh_clients_work_with_the_credentials(sasl_port: int) -> None:
    kafka = endpoint(sasl_port)
    await ensure_topics(kafka, {topics.JOBS: 1})
    queue = KafkaJobQueue(kafka)
    job = Job(id=f"sasl-{uuid.uuid4().hex}", kind="chat", api_key_id="k", request={"model": "m"})
    try:
        await queue.send(job)
    finally:
        await queue.close()
    consumer = AIOKafkaConsumer(
        topics.JOBS, **kafka.options(group_id=f"sasl-{uuid.uuid4().hex}", auto_offset_reset="earliest")
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + CONSUME_WITHIN_S
        seen: set[str] = set()
        while job.id not in seen and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            seen |= {Job.from_json(r.value).id for records in batches.values() for r in records if r.value}
        assert job.id in seen
    finally:
        await consumer.stop()


@pytest.mark.asyncio
async def test_a_wrong_password_gets_nowhere(sasl_port: int) -> None:
    wrong = endpoint(sasl_port, password="not-it")
    started = time.monotonic()
    assert not await broker_ready(wrong, timeout_s=5.0)
    with pytest.raises(KafkaError):
        await ensure_topics(wrong, {f"never-{uuid.uuid4().hex[:8]}": 1}, timeout_s=5.0)
    queue = KafkaJobQueue(wrong, send_timeout_s=5.0)
    try:
        with pytest.raises(GatewayError) as caught:
            await queue.send(Job(id="x", kind="chat", api_key_id="k", request={}))
        assert caught.value.status == 503 and caught.value.code == "queue_unavailable"
    finally:
        await queue.close()
    took = time.monotonic() - started
    print(f"wrong password refused three times in {took:.2f} s")
    assert took < 3 * REFUSED_WITHIN_S


@pytest.mark.asyncio
async def test_a_plaintext_client_is_not_let_in(sasl_port: int) -> None:
    assert kafka_security_options(KafkaConfig(), env={}) == {}
    assert not await broker_ready(f"127.0.0.1:{sasl_port}", timeout_s=5.0)
