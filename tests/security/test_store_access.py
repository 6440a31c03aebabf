"""Reaching the mesh's Redis directly, as anyone on the machine could, on a mesh the runner
started with REDIS_PASSWORD-style credentials (`redis.password_env`).

The runner starts its local Redis with `requirepass` from a 0600 file (never on a command
line), and every client of the mesh authenticates with the variable's value. A client
without the password, or with a wrong one, is refused (NOAUTH / WRONGPASS) within a
second, can read and write nothing, and a normal request through Envoy is answered
meanwhile; the cache keeps using Redis, and the services are the ones it started with."""

from __future__ import annotations

import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.exceptions import AuthenticationError

from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

PASSWORD_ENV = "CLAWDBOT_TEST_MESH_REDIS_PASSWORD"
PASSWORD = f"redis-{uuid.uuid4().hex}"
REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0


def config(mock_url: str, tmp: Path) -> dict[str, Any]:
    """Envoy, adapter, router and the cache with the runner's Redis; one chat model."""
    return core_mesh_config(
        mock_url, tmp, cache={"object_dir": str(tmp / "objects")}, redis={"password_env": PASSWORD_ENV}
    )


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("redis-guarded")
    with pytest.MonkeyPatch.context() as patch:
        # The password only ever sits in the environment; YAML names the variable.
        patch.setenv(PASSWORD_ENV, PASSWORD)
        with running_mesh(tmp, config(mock_upstream, tmp), mock_upstream) as mesh:
            yield mesh


def redis_port(mesh: Mesh) -> int:
    port = mesh.info()["ports"]["redis"]
    assert port, "the runner started no Redis"
    return int(port)


def chat(mesh: Mesh, text: str) -> httpx.Response:
    body = {"model": "mock-1", "messages": [{"role": "user", "content": text}], "temperature": 0}
    headers = {"Authorization": f"Bearer {mesh.api_key}"}
    return httpx.post(f"{mesh.v1}/chat/completions", headers=headers, json=body, timeout=30)


def raw_reply(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.recv(256)


def cache_keys(port: int) -> int:
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=5)
    try:
        return len(list(client.scan_iter("clawdbot:cache:*", count=1000)))
    finally:
        client.close()


def test_redis_refuses_clients_without_the_password(guarded: Mesh) -> None:
    before = guarded.service_pids()
    port = redis_port(guarded)
    attempts = {
        "PING": b"*1\r\n$4\r\nPING\r\n",
        "KEYS *": b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n",
        "SET": b"*3\r\n$3\r\nSET\r\n$6\r\npoison\r\n$1\r\n1\r\n",
        "FLUSHALL": b"*1\r\n$8\r\nFLUSHALL\r\n",
    }
    for name, command in attempts.items():
        started = time.perf_counter()
        reply = raw_reply(port, command)
        took = time.perf_counter() - started
        print(f"{name} without the password: {reply[:40]!r} in {took * 1000:.1f} ms")
        assert reply.startswith(b"-NOAUTH"), (name, reply)
        assert took < REFUSED_WITHIN_S
    started = time.perf_counter()
    reply = raw_reply(port, b"*2\r\n$4\r\nAUTH\r\n$7\r\nguessed\r\n")
    took = time.perf_counter() - started
    print(f"a wrong password: {reply[:40]!r} in {took * 1000:.1f} ms")
    assert reply.startswith(b"-WRONGPASS") and took < REFUSED_WITHIN_S
    # A client library gets there too (after its own retries: no timing asserted).
    with pytest.raises(AuthenticationError):
        redis.Redis(port=port, password="guessed", socket_timeout=5).ping()
    # Nothing was written; a request through Envoy meanwhile is answered as usual.
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=5)
    try:
        assert client.exists("poison") == 0
    finally:
        client.close()
    started = time.perf_counter()
    reply = chat(guarded, f"during the attack {uuid.uuid4().hex}")
    took = time.perf_counter() - started
    print(f"a normal chat meanwhile: {reply.status_code} in {took * 1000:.1f} ms")
    assert reply.status_code == 200 and took < ANSWERED_WITHIN_S
    assert guarded.service_pids() == before


def test_the_cache_writes_to_redis_with_the_password(guarded: Mesh) -> None:
    port = redis_port(guarded)
    before = cache_keys(port)
    first = chat(guarded, f"cache me {uuid.uuid4().hex}")
    assert first.status_code == 200 and first.headers["x-clawdbot-cache"] == "miss"
    # The cache's L2 write lands in the Redis that refuses everyone else.
    deadline = time.monotonic() + ANSWERED_WITHIN_S
    while cache_keys(port) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache_keys(port) > before


def test_the_password_is_on_no_command_line_and_its_file_is_private(guarded: Mesh) -> None:
    info = guarded.info()
    redis_pid = info["services"]["redis"]["pid"]
    cmdline = Path(f"/proc/{redis_pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline
    for pid in (service["pid"] for service in info["services"].values() if service.get("pid")):
        assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    auth_file = Path(info["state_dir"]) / "run" / "redis-auth.conf"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
