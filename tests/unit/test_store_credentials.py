"""Redis and Kafka credentials: the `redis` and `kafka` config sections become the keyword
arguments every client of the mesh is built with, secrets read from the variables named."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.asyncio.connection import SSLConnection

from clawdbot.common.config import REPO_ROOT, Config, ConfigError, KafkaConfig, RedisConfig
from clawdbot.common.kafka import KafkaEndpoint, kafka_security_options
from clawdbot.common.redis_client import redis_client, redis_credentials, redis_options

SERVICES = REPO_ROOT / "services" / "clawdbot"
CA_FILE = ssl.get_default_verify_paths().cafile or ""


# -- Redis -------------------------------------------------------------------------------


def test_redis_password_comes_from_the_named_variable() -> None:
    assert redis_options("redis://r:6379/0", RedisConfig(), env={"REDIS_PASSWORD": "s3cret"}) == {"password": "s3cret"}
    named = RedisConfig(password_env="CACHE_PW", username_env="CACHE_USER")
    assert redis_options("redis://r:6379/0", named, env={"CACHE_PW": "pw", "CACHE_USER": "cache"}) == {
        "password": "pw",
        "username": "cache",
    }
    # Unset or empty: nothing is sent (a Redis without requirepass).
    assert redis_options("redis://r:6379/0", RedisConfig(), env={}) == {}
    assert redis_options("redis://r:6379/0", RedisConfig(), env={"REDIS_PASSWORD": ""}) == {}


def test_a_user_name_without_a_password_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CACHE_USER is set but the password variable REDIS_PASSWORD is not"):
        redis_credentials(RedisConfig(username_env="CACHE_USER"), env={"CACHE_USER": "cache"})


def test_redis_tls_options_reach_only_tls_connections() -> None:
    tls = RedisConfig(tls=True, ca_file="/ca.pem", cert_file="/c.pem", key_file="/k.pem")
    assert redis_options("redis://r:6379/0", tls, env={}) == {
        "connection_class": SSLConnection,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
    }
    # rediss:// is TLS by itself; a plain redis:// URL would refuse ssl_* keywords.
    ca_only = RedisConfig(ca_file="/ca.pem")
    assert redis_options("rediss://r:6379/0", ca_only, env={}) == {"ssl_ca_certs": "/ca.pem"}
    assert redis_options("redis://r:6379/0", ca_only, env={}) == {}
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        RedisConfig(cert_file="/c.pem")


def test_the_client_carries_the_credentials_and_a_url_password_wins() -> None:
    env = {"REDIS_PASSWORD": "from-env"}
    kwargs = redis_client("redis://127.0.0.1:1/0", env=env).connection_pool.connection_kwargs
    assert kwargs["password"] == "from-env"
    kwargs = redis_client("redis://:in-url@127.0.0.1:1/0", env=env).connection_pool.connection_kwargs
    assert kwargs["password"] == "in-url"


def test_every_redis_and_kafka_client_is_built_by_the_common_helpers() -> None:
    """Credentials reach every client only if no call site builds its own."""
    redis_makers = {"from_url", "Redis", "StrictRedis", "ConnectionPool", "BlockingConnectionPool"}
    kafka_makers = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "AIOKafkaClient"}
    helpers = {SERVICES / "common" / "redis_client.py", SERVICES / "common" / "kafka.py"}
    offenders: list[str] = []
    for path in SERVICES.rglob("*.py"):
        if path in helpers or "gen" in path.relative_to(SERVICES).parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func).split(".")[-1]
            keywords = {k.arg for k in node.keywords}
            if called in redis_makers and not (called == "Redis" and keywords == {"connection_pool"}):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {ast.unparse(node.func)}")
            # A Kafka client takes its address and security from KafkaEndpoint.options().
            if called in kafka_makers and "bootstrap_servers" in keywords:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    assert not offenders, offenders


# -- Kafka -------------------------------------------------------------------------------


def test_plaintext_adds_nothing() -> None:
    assert kafka_security_options(KafkaConfig(), env={"KAFKA_USERNAME": "u", "KAFKA_PASSWORD": "p"}) == {}
    assert KafkaEndpoint("k:9092").options(acks=1) == {"bootstrap_servers": "k:9092", "acks": 1}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_maps_to_aiokafkas_names(mechanism: str) -> None:
    settings = KafkaConfig.model_validate({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism})
    options = kafka_security_options(settings, env={"KAFKA_USERNAME": "jobs", "KAFKA_PASSWORD": "pw"})
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "jobs",
        "sasl_plain_password": "pw",
    }


def test_sasl_ssl_has_both_and_ssl_has_a_context_only() -> None:
    settings = KafkaConfig.model_validate(
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "username_env": "U", "password_env": "P"}
    )
    options = kafka_security_options(settings, env={"U": "jobs", "P": "pw"})
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "jobs",
        "sasl_plain_password": "pw",
    }
    ssl_only = kafka_security_options(KafkaConfig(security_protocol="SSL", ca_file=CA_FILE), env={})
    assert set(ssl_only) == {"security_protocol", "ssl_context"} and ssl_only["security_protocol"] == "SSL"


def test_a_missing_ca_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        kafka_security_options(KafkaConfig(security_protocol="SSL", ca_file=str(tmp_path / "absent.pem")), env={})


def test_sasl_without_credentials_names_the_variables() -> None:
    settings = KafkaConfig(security_protocol="SASL_SSL")
    with pytest.raises(ConfigError, match="set KAFKA_USERNAME and KAFKA_PASSWORD"):
        kafka_security_options(settings, env={})
    with pytest.raises(ConfigError, match="set KAFKA_PASSWORD"):
        kafka_security_options(settings, env={"KAFKA_USERNAME": "u"})


def test_an_unknown_protocol_or_mechanism_is_refused() -> None:
    with pytest.raises(ValidationError):
        KafkaConfig.model_validate({"security_protocol": "SASL"})
    with pytest.raises(ValidationError):
        KafkaConfig.model_validate({"sasl_mechanism": "GSSAPI"})


def test_the_endpoint_from_config_reads_the_secrets_at_once() -> None:
    config = Config.model_validate(
        {"jobs": {"kafka_bootstrap": "kafka:9092"}, "kafka": {"security_protocol": "SASL_PLAINTEXT"}}
    )
    endpoint = KafkaEndpoint.from_config(config, env={"KAFKA_USERNAME": "u", "KAFKA_PASSWORD": "p"})
    assert endpoint.options(group_id="g") == {
        "bootstrap_servers": "kafka:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
        "group_id": "g",
    }
    with pytest.raises(ConfigError):
        KafkaEndpoint.from_config(config, env={})


def test_the_runner_starts_no_plaintext_broker_for_a_secured_kafka() -> None:
    from clawdbot.runner.__main__ import local_kafka

    plain = Config.model_validate({"jobs": {"kafka_bootstrap": "127.0.0.1:9092"}})
    secured = Config.model_validate(
        {"jobs": {"kafka_bootstrap": "127.0.0.1:9092"}, "kafka": {"security_protocol": "SASL_PLAINTEXT"}}
    )
    assert local_kafka(plain) == ("127.0.0.1", 9092)
    # Its broker would speak PLAINTEXT to clients expecting SASL: the operator runs that one.
    assert local_kafka(secured) is None
