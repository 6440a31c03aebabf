"""Where a service listens (bind_host) apart from where others reach it (host)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clawdbot.common.config import (
    AdapterConfig,
    Config,
    RouterConfig,
    ServiceEndpoint,
    load_config,
    service_sections,
)
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clawdbot.yaml"
    path.write_text(text)
    return path


def test_binds_on_host_unless_told_otherwise() -> None:
    assert RouterConfig(host="10.0.0.7").listen_host == "10.0.0.7"
    assert RouterConfig(host="router", bind_host="0.0.0.0").listen_host == "0.0.0.0"


def test_bind_host_from_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "router: {host: router, bind_host: 0.0.0.0}\n")
    config = load_config(path, env={})
    assert (config.router.host, config.router.listen_host) == ("router", "0.0.0.0")
    # The other sections keep binding where they are reached.
    assert config.adapter.listen_host == config.adapter.host == "127.0.0.1"


def test_every_service_section_is_found() -> None:
    sections = set(service_sections())
    assert {"adapter", "router", "worker", "cache", "jobs", "orchestrator"} <= sections
    assert "gateway" not in sections  # Envoy's listener: not a Python service
    for name in sections:
        field = Config.model_fields[name]
        assert isinstance(field.annotation, type) and issubclass(field.annotation, ServiceEndpoint)


def test_env_sets_bind_host_of_every_service(tmp_path: Path) -> None:
    # A section the file sets, one it leaves empty (None) and ones it does not mention.
    path = write(tmp_path, "router: {host: router, bind_host: 127.0.0.2}\ncache:\n")
    config = load_config(path, env={"CLAWDBOT_BIND_HOST": "0.0.0.0"})
    for name in service_sections():
        endpoint = getattr(config, name)
        assert endpoint.bind_host == "0.0.0.0", name
    # Only where they listen changes: where others reach them stays.
    assert config.router.host == "router"
    assert config.adapter.host == "127.0.0.1"
    assert config.gateway.host == "127.0.0.1"


def test_empty_env_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter: {bind_host: 127.0.0.3}\n")
    config = load_config(path, env={"CLAWDBOT_BIND_HOST": ""})
    assert config.adapter.bind_host == "127.0.0.3"
    assert config.router.bind_host == ""


def test_env_table_documents_the_variable() -> None:
    from clawdbot.common import config as module

    assert module.__doc__ is not None and "CLAWDBOT_BIND_HOST" in module.__doc__


@pytest.mark.asyncio
async def test_server_listens_on_bind_host_not_host() -> None:
    # `host` names something that resolves nowhere (as a Kubernetes Service name does
    # outside the cluster): a server that bound on it would fail to start.
    endpoint = AdapterConfig(host="adapter.clawdbot.invalid", bind_host="127.0.0.1", grpc_port=0, http_port=0)
    host = ServiceHost("adapter", endpoint, Metrics("adapter"))
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{host.http_port}/healthz") as r:
            assert r.status == 200
    finally:
        await host.stop(grace=0, drain_notice=0)
