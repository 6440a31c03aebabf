"""adapter.replicas: 2 — the runner starts two adapter processes ("adapter", "adapter-1"),
each on ports of its own; Envoy balances REST, gRPC and WebSocket traffic over both; one
stopped, the other keeps serving every request while the runner brings it back."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import GiveUp, wait_for

pytestmark = pytest.mark.e2e

REPLICAS = ("adapter", "adapter-1")


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("adapter-replicas")
    config = core_mesh_config(mock_upstream, tmp, adapter={"replicas": 2, "shutdown_grace_s": 5})
    with running_mesh(tmp, config, mock_upstream) as mesh:
        yield mesh


def served(mesh: Mesh, replica: str, protocol: str) -> float:
    """Chat requests this replica answered 200 over `protocol`, from its own /metrics."""
    port = mesh.info()["adapters"][replica]["http"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    labels = f'operation="chat",protocol="{protocol}",service="adapter",status="200"'
    pattern = r"^clawdbot_requests_total\{" + re.escape(labels) + r"\} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def chat(mesh: Mesh, text: str) -> httpx.Response:
    return httpx.post(
        f"{mesh.v1}/chat/completions",
        headers=mesh.auth_headers,
        timeout=60,
        json={"model": "mock-1", "messages": [{"role": "user", "content": text}]},
    )


def envoy_hosts(mesh: Mesh) -> dict[str, dict[int, bool]]:
    """Per adapter cluster, each endpoint's port and whether Envoy counts it healthy."""
    clusters = httpx.get(f"{mesh.admin_url}/clusters", params={"format": "json"}, timeout=10).json()
    hosts: dict[str, dict[int, bool]] = {}
    for cluster in clusters["cluster_statuses"]:
        if cluster["name"] not in ("adapter_grpc", "adapter_http"):
            continue
        hosts[cluster["name"]] = {
            host["address"]["socket_address"]["port_value"]: host["health_status"].get("eds_health_status") == "HEALTHY"
            and not any(flag for name, flag in host["health_status"].items() if name.startswith("failed"))
            for host in cluster.get("host_statuses", [])
        }
    return hosts


def test_each_replica_is_a_service_on_ports_of_its_own(replicated: Mesh) -> None:
    info = replicated.info()
    assert set(REPLICAS) <= set(info["services"])
    assert set(info["adapters"]) == set(REPLICAS)
    pids = {info["services"][name]["pid"] for name in REPLICAS}
    assert len(pids) == 2 and None not in pids
    ports = [port for name in REPLICAS for port in info["adapters"][name].values()]
    assert len(set(ports)) == 4
    # The first replica is where it always was.
    assert info["adapters"]["adapter"] == {"grpc": info["ports"]["adapter_grpc"], "http": info["ports"]["adapter_http"]}
    # Envoy's gRPC and HTTP (WebSocket, /healthz) clusters list both, and both are healthy.
    expected = {
        "adapter_grpc": {info["adapters"][name]["grpc"]: True for name in REPLICAS},
        "adapter_http": {info["adapters"][name]["http"]: True for name in REPLICAS},
    }
    wait_for(lambda: envoy_hosts(replicated) == expected or None, 30, "Envoy to see both replicas healthy")


def test_rest_requests_are_balanced_over_both(replicated: Mesh) -> None:
    before = {name: served(replicated, name, "rest") for name in REPLICAS}
    for i in range(20):
        reply = chat(replicated, f"balanced {i}")
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == f"Hello from mock-1: balanced {i}"
    after = {name: served(replicated, name, "rest") for name in REPLICAS}
    assert sum(after.values()) - sum(before.values()) == 20
    for name in REPLICAS:
        assert after[name] > before[name], f"{name} served none of 20 requests: {before} -> {after}"


@pytest.mark.asyncio
async def test_websockets_are_balanced_over_both(replicated: Mesh) -> None:
    before = {name: served(replicated, name, "ws") for name in REPLICAS}
    url = replicated.url.replace("http://", "ws://") + "/v1/ws"
    sockets = 6
    for i in range(sockets):
        # A socket of its own each time: the HTTP cluster picks a replica per connection.
        async with websockets.connect(url, additional_headers=replicated.auth_headers) as ws:
            body: dict[str, Any] = {"model": "mock-1", "stream": False, "messages": [{"role": "user", "content": "ws"}]}
            await ws.send(json.dumps({"id": str(i), "body": body}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert frame["type"] == "chat.completion", frame
    after = {name: served(replicated, name, "ws") for name in REPLICAS}
    assert sum(after.values()) - sum(before.values()) == sockets
    for name in REPLICAS:
        assert after[name] > before[name], f"{name} served none of {sockets} sockets: {before} -> {after}"


def test_one_replica_stopped_the_other_serves_every_request(replicated: Mesh) -> None:
    before = replicated.info()["services"]["adapter-1"]
    survivor = replicated.info()["services"]["adapter"]
    os.kill(before["pid"], signal.SIGTERM)

    def restarted() -> bool:
        return bool(replicated.info()["services"]["adapter-1"]["restarts"] > before["restarts"])

    # Until the runner has it back, every request is answered (by the other replica, or
    # by this one while it drains); none fails.
    answered = 0
    while not restarted():
        reply = chat(replicated, f"while stopped {answered}")
        assert reply.status_code == 200, reply.text
        answered += 1
    assert answered >= 3, "the replica was back before it could be shown missing"
    # The other replica never went anywhere.
    assert replicated.info()["services"]["adapter"] == survivor

    # Back, with a new process, and serving again through Envoy: its counters start from 0.
    info = replicated.info()
    assert info["services"]["adapter-1"]["pid"] != before["pid"]

    def serves_again() -> bool | None:
        reply = chat(replicated, "back again")
        if reply.status_code != 200:
            raise GiveUp(f"a request failed while the replica came back: {reply.status_code} {reply.text}")
        return served(replicated, "adapter-1", "rest") > 0 or None

    wait_for(serves_again, 60, "the restarted replica to take requests again")
