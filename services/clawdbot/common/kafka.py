"""How every Kafka client of the mesh connects (KafkaEndpoint: the bootstrap address and
the `kafka` config section's security, SASL and TLS, as aiokafka's keyword arguments), and
the two questions services and the runner ask of any Kafka: is it answering, and do my
topics exist (services create the topics they own at start-up)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code
from aiokafka.helpers import create_ssl_context

from clawdbot.common.config import Config, ConfigError, KafkaConfig
from clawdbot.common.retry import RetryPolicy

log = logging.getLogger(__name__)


def kafka_security_options(settings: KafkaConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """aiokafka's keyword arguments for the settings' security protocol: nothing for
    PLAINTEXT (aiokafka's defaults); an SSL context (the CA file, else the system's CAs,
    and a client certificate when given) for SSL; the mechanism and the user name and
    password from the variables the settings name for SASL. A SASL setting whose
    variables are unset raises ConfigError naming them: without it the broker would only
    answer every connection with an authentication failure, far from the cause."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    if settings.security_protocol == "PLAINTEXT":
        return options
    options["security_protocol"] = settings.security_protocol
    if settings.tls:
        options["ssl_context"] = create_ssl_context(
            cafile=settings.ca_file or None,
            certfile=settings.cert_file or None,
            keyfile=settings.key_file or None,
        )
    if settings.sasl:
        username = env.get(settings.username_env, "") if settings.username_env else ""
        password = env.get(settings.password_env, "") if settings.password_env else ""
        missing = [
            name or "(empty name)"
            for name, value in ((settings.username_env, username), (settings.password_env, password))
            if not value
        ]
        if missing:
            raise ConfigError(
                f"kafka.security_protocol is {settings.security_protocol}: set {' and '.join(missing)} "
                "(kafka.username_env, kafka.password_env) to the SASL user name and password"
            )
        options |= {
            "sasl_mechanism": settings.sasl_mechanism,
            # aiokafka takes the SCRAM credentials under these names too.
            "sasl_plain_username": username,
            "sasl_plain_password": password,
        }
    return options


@dataclass(frozen=True)
class KafkaEndpoint:
    """Where the broker is and how to authenticate to it: every producer, consumer and
    admin client of the mesh is made from one, so the security settings reach them all."""

    bootstrap: str
    security: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> KafkaEndpoint:
        """The jobs' broker with the `kafka` section's security (read now: a missing
        secret fails the service's start, not its first message)."""
        return cls(config.jobs.kafka_bootstrap, kafka_security_options(config.kafka, env))

    @classmethod
    def of(cls, target: str | KafkaEndpoint) -> KafkaEndpoint:
        """A bare bootstrap address is a PLAINTEXT broker (the runner's local one)."""
        return target if isinstance(target, KafkaEndpoint) else cls(target)

    def options(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for an aiokafka client: the address, the security, `extra`."""
        return {"bootstrap_servers": self.bootstrap, **self.security, **extra}


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


async def broker_ready(target: str | KafkaEndpoint, timeout_s: float = 5.0) -> bool:
    """True once a broker answers a metadata request and lists at least one broker
    (a KRaft broker lists itself only once it is registered and unfenced). Never raises
    for an absent or failing broker: a readiness probe, called again and again."""
    endpoint = KafkaEndpoint.of(target)
    servers = _host_ports(endpoint.bootstrap)
    # A plain connect first: aiokafka logs every failed bootstrap at ERROR, which a probe
    # polling a starting broker would otherwise do a dozen times.
    if not await _any_accepts(servers, timeout_s):
        return False
    client = AIOKafkaClient(**endpoint.options(request_timeout_ms=int(timeout_s * 1000)))
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
        return bool(client.cluster.brokers())
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await client.close()


async def ensure_topics(target: str | KafkaEndpoint, topics: Mapping[str, int], timeout_s: float = 60.0) -> None:
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
    admin = AIOKafkaAdminClient(**KafkaEndpoint.of(target).options(request_timeout_ms=int(timeout_s * 1000)))
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
        pending, attempts = missing, 0
        while pending:
            attempts += 1
            delay = _TOPIC_RETRY.backoff(attempts)
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
            pending = retry
        if missing:
            await _wait_for_leaders(admin, set(missing), deadline)
            log.info("created Kafka topics", extra={"topics": sorted(missing)})
    finally:
        await admin.close()


# Waits on a broker that is still settling: the mesh's one backoff (common/retry.py);
# these are bounded by the caller's deadline, not by a count.
_TOPIC_RETRY = RetryPolicy(max_attempts=0, base_s=0.1, max_backoff_s=2.0)
_LEADER_POLL = RetryPolicy(max_attempts=0, base_s=0.05, max_backoff_s=1.0)


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: set[str], deadline: float) -> None:
    """Until the broker's metadata has a leader for every partition of these new topics:
    the controller acknowledges a creation before the broker has caught up, and producing
    or subscribing in that moment only earns retries and warnings."""
    polls = 0
    while True:
        polls += 1
        delay = _LEADER_POLL.backoff(polls)
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


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    """(topic, error code, message) from any CreateTopics response version (v0 has no message)."""
    return [(entry[0], entry[1], entry[2] if len(entry) > 2 else None) for entry in response.topic_errors]
