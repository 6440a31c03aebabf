"""Internal authentication: every service's gRPC port refuses a call without the internal
credential (missing, wrong, duplicated, non-ASCII) with UNAUTHENTICATED, fast, and
serves it with the credential; grpc.health.v1 answers without it; the adapter's HTTP
side refuses a WebSocket upgrade without it; through Envoy (the one public entry) every
request carries Envoy's credential, whatever a client sends in its place.

The attacks go straight at the ports a local user (or any pod) can reach, with real
clients: grpc.aio, grpcurl, a raw HTTP/2 client for what grpc refuses to send, aiohttp."""

from __future__ import annotations

import asyncio
import functools
import json
import stat
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import pytest
import websockets
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clawdbot.common.config import ConfigError, ServiceEndpoint
from clawdbot.common.internal_auth import TOKEN_ENV, TOKEN_METADATA_KEY
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.runner.envoy_config import EnvoyParams, render
from tests.conftest import CALLBACK_SECRET, Mesh
from tests.support import INTERNAL_TOKEN, grpcurl, wait_for_async

REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0

# Per service port (as the ready file names it): a harmless method, and what a call with
# the credential gets. The job consumer serves only grpc.health.v1: with the credential,
# any other method is UNIMPLEMENTED, not UNAUTHENTICATED.
CALLS: dict[str, tuple[str, grpc.StatusCode]] = {
    "adapter_grpc": ("/clawdbot.v1.Gateway/ListModels", grpc.StatusCode.OK),
    "router_grpc": ("/clawdbot.v1.Router/ListModels", grpc.StatusCode.OK),
    "worker_grpc": ("/clawdbot.v1.ModelService/ListModels", grpc.StatusCode.OK),
    "cache_grpc": ("/clawdbot.v1.CacheService/Stats", grpc.StatusCode.OK),
    "orchestrator_grpc": ("/clawdbot.v1.Orchestrator/List", grpc.StatusCode.OK),
    "health_grpc": ("/clawdbot.v1.HealthMonitor/Status", grpc.StatusCode.OK),
    "jobs_grpc": ("/clawdbot.v1.Router/ListModels", grpc.StatusCode.UNIMPLEMENTED),
}

# What a caller without the secret might try.
BAD_CREDENTIALS: dict[str, tuple[tuple[str, str], ...]] = {
    "missing": (),
    "wrong": ((TOKEN_METADATA_KEY, "not-the-internal-token"),),
    "empty": ((TOKEN_METADATA_KEY, ""),),
    "prefix": ((TOKEN_METADATA_KEY, INTERNAL_TOKEN[:-1]),),
    "duplicated, both right": ((TOKEN_METADATA_KEY, INTERNAL_TOKEN), (TOKEN_METADATA_KEY, INTERNAL_TOKEN)),
    "duplicated, one right": ((TOKEN_METADATA_KEY, "wrong"), (TOKEN_METADATA_KEY, INTERNAL_TOKEN)),
}


def targets(mesh: Mesh) -> dict[str, str]:
    ports = mesh.info()["ports"]
    found = {name: f"127.0.0.1:{ports[name]}" for name in CALLS if ports.get(name)}
    # The session mesh runs every service; a missing one would silently go untested.
    assert set(found) == set(CALLS), f"ports missing from the ready file: {set(CALLS) - set(found)}"
    return found


async def call(target: str, method: str, metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, float]:
    """The status of one unary call with an empty request (valid for every method here),
    and how long it took."""
    async with grpc.aio.insecure_channel(target) as channel:
        # Connected first (a child the runner restarts is back within seconds): only the
        # call itself is timed.
        await asyncio.wait_for(channel.channel_ready(), 60)
        started = time.perf_counter()
        try:
            await channel.unary_unary(method, None, None)(b"", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), time.perf_counter() - started
        return grpc.StatusCode.OK, time.perf_counter() - started


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_every_service_refuses_calls_without_the_credential(mesh: Mesh) -> None:
    api_key = (("authorization", f"Bearer {mesh.api_key}"),)
    slowest = 0.0
    for name, target in targets(mesh).items():
        method, _ = CALLS[name]
        for case, metadata in BAD_CREDENTIALS.items():
            # The adapter gets a valid API key too: the API key is no internal credential.
            extra = api_key if name == "adapter_grpc" else ()
            code, seconds = await call(target, method, (*metadata, *extra))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, case, code)
            assert seconds < REFUSED_WITHIN_S, (name, case, seconds)
            slowest = max(slowest, seconds)
    print(f"\n{len(CALLS) * len(BAD_CREDENTIALS)} refusals, slowest {slowest * 1000:.1f} ms")


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_every_service_serves_calls_with_the_credential(mesh: Mesh) -> None:
    api_key = (("authorization", f"Bearer {mesh.api_key}"),)
    for name, target in targets(mesh).items():
        method, expected = CALLS[name]
        extra = api_key if name == "adapter_grpc" else ()
        code, seconds = await call(target, method, ((TOKEN_METADATA_KEY, INTERNAL_TOKEN), *extra))
        assert code == expected, (name, code)
        assert seconds < ANSWERED_WITHIN_S, (name, seconds)
        # internal_channel, what the services use, attaches it by itself.
        async with internal_channel(target) as channel:
            try:
                await channel.unary_unary(method, None, None)(b"", metadata=extra, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        assert code == expected, (name, "internal_channel", code)


def grpc_frame(message: bytes) -> bytes:
    return b"\0" + struct.pack(">I", len(message)) + message


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_non_ascii_and_undecodable_credentials_are_refused(mesh: Mesh) -> None:
    """grpc's own clients refuse to send such metadata; a raw HTTP/2 client sends it, and
    the comparison (on bytes) must refuse it rather than raise."""
    values = ["tök-ünïcode".encode(), b"\xff\xfe\xfd", INTERNAL_TOKEN.encode() + "é".encode()]
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        for name, target in targets(mesh).items():
            method, _ = CALLS[name]
            for value in values:
                started = time.perf_counter()
                reply = await client.post(
                    f"http://{target}{method}",
                    content=grpc_frame(b""),
                    headers=[
                        (b"content-type", b"application/grpc"),
                        (b"te", b"trailers"),
                        (TOKEN_METADATA_KEY.encode(), value),
                    ],
                )
                seconds = time.perf_counter() - started
                # Trailers-only: the status arrives in the headers.
                status = reply.headers.get("grpc-status")
                assert status == str(grpc.StatusCode.UNAUTHENTICATED.value[0]), (name, value, status, reply.headers)
                assert seconds < REFUSED_WITHIN_S, (name, value, seconds)


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_a_streaming_call_is_refused_before_it_sends_anything(mesh: Mesh) -> None:
    """A client stream that never sends a message must not hold the refusal back."""
    never = asyncio.Event()

    async def silent() -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    target = targets(mesh)["cache_grpc"]
    async with grpc.aio.insecure_channel(target) as channel:
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.stream_unary("/clawdbot.v1.CacheService/Put", None, None)(silent(), timeout=10)
        seconds = time.perf_counter() - started
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert seconds < REFUSED_WITHIN_S
    print(f"\nclient stream refused in {seconds * 1000:.1f} ms")


@pytest.mark.e2e
def test_grpcurl_needs_the_credential(mesh: Mesh) -> None:
    target = targets(mesh)["router_grpc"]
    started = time.perf_counter()
    refused = grpcurl(target, "list")
    seconds = time.perf_counter() - started
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr, refused.stderr
    refused_call = grpcurl(target, "clawdbot.v1.Router/ListModels", data={})
    assert refused_call.returncode != 0 and "Unauthenticated" in refused_call.stderr, refused_call.stderr
    header = f"{TOKEN_METADATA_KEY}: {INTERNAL_TOKEN}"
    listed = grpcurl(target, "list", headers=(header,))
    assert listed.returncode == 0, listed.stderr
    assert "clawdbot.v1.Router" in listed.stdout
    served = grpcurl(target, "clawdbot.v1.Router/ListModels", data={}, headers=(header,))
    assert served.returncode == 0, served.stderr
    assert "mock-1" in served.stdout
    print(f"\ngrpcurl refused in {seconds * 1000:.0f} ms (process start included)")


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_health_checks_need_no_credential(mesh: Mesh) -> None:
    async def serving(target: str) -> bool:
        # Waited on: a child the runner is restarting answers again within seconds.
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                # The one answer that would mean the credential is wanted: fail at once.
                assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, (target, exc.details())
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    for name, target in targets(mesh).items():
        await wait_for_async(functools.partial(serving, target), 60, f"{name} to report SERVING")


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_the_adapters_http_side_refuses_a_websocket_without_the_credential(mesh: Mesh) -> None:
    ports = mesh.info()["ports"]
    base = f"http://127.0.0.1:{ports['adapter_http']}"
    key = {"Authorization": f"Bearer {mesh.api_key}"}
    async with aiohttp.ClientSession() as session:
        for headers in (key, {**key, TOKEN_METADATA_KEY: "wrong"}):
            started = time.perf_counter()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{base}/v1/ws", headers=headers)
            assert refused.value.status == 401
            assert time.perf_counter() - started < REFUSED_WITHIN_S
        # The probes stay open (Envoy's and the kubelet's health checks send no credential).
        async with session.get(f"{base}/healthz") as probe:
            assert probe.status == 200
        # With it (as Envoy sends it) the socket opens and serves.
        async with session.ws_connect(f"{base}/v1/ws", headers={**key, TOKEN_METADATA_KEY: INTERNAL_TOKEN}) as ws:
            assert not ws.closed


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_through_envoy_a_client_sent_credential_is_replaced(mesh: Mesh) -> None:
    """Envoy overwrites the header: a client's value, however many, neither breaks a
    request (the adapter sees Envoy's) nor stands in for an API key."""
    key = {"Authorization": f"Bearer {mesh.api_key}"}
    forged = [(TOKEN_METADATA_KEY, "forged"), (TOKEN_METADATA_KEY, INTERNAL_TOKEN)]
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.perf_counter()
        plain = await client.get(f"{mesh.v1}/models", headers=key)
        with_forged = await client.get(f"{mesh.v1}/models", headers=[*key.items(), *forged])
        seconds = time.perf_counter() - started
        assert plain.status_code == with_forged.status_code == 200, with_forged.text
        assert seconds < 2 * ANSWERED_WITHIN_S
        # The internal credential is no API key, whoever sends it.
        no_key = await client.get(f"{mesh.v1}/models", headers=[(TOKEN_METADATA_KEY, INTERNAL_TOKEN)])
        assert no_key.status_code == 401, no_key.text
    # gRPC through Envoy, with a forged credential: served.
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        reply = await channel.unary_unary("/clawdbot.v1.Gateway/ListModels", None, None)(
            b"", metadata=(("authorization", f"Bearer {mesh.api_key}"), (TOKEN_METADATA_KEY, "forged")), timeout=10
        )
    assert b"mock-1" in reply
    # The WebSocket upgrade through Envoy carries Envoy's credential too.
    ws_url = mesh.url.replace("http", "ws", 1) + "/v1/ws"
    async with websockets.connect(ws_url, additional_headers={**key, TOKEN_METADATA_KEY: "forged"}) as ws:
        chat = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        await ws.send(json.dumps({"type": "chat.completions", "id": "c1", "body": chat}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), ANSWERED_WITHIN_S))
    assert answer["id"] == "c1" and answer["type"] == "chat.completion", answer


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_requests_are_answered_while_a_port_is_hammered(mesh: Mesh) -> None:
    """Unauthenticated calls flooding the router cost it next to nothing: a chat request
    through Envoy meanwhile is answered in its usual time."""
    target = targets(mesh)["router_grpc"]
    stop = asyncio.Event()
    refused = 0

    async def hammer() -> None:
        nonlocal refused
        async with grpc.aio.insecure_channel(target) as channel:
            method = channel.unary_unary("/clawdbot.v1.Router/Complete", None, None)
            while not stop.is_set():
                with pytest.raises(grpc.aio.AioRpcError):
                    await method(b"", timeout=5)
                refused += 1

    async def flooding() -> bool:
        return refused >= 200

    attackers = [asyncio.create_task(hammer()) for _ in range(4)]
    try:
        flood_started = time.perf_counter()
        await wait_for_async(flooding, 30, "the flood of unauthenticated calls to get going")
        rate = refused / (time.perf_counter() - flood_started)
        body: dict[str, Any] = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(timeout=30) as client:
            started = time.perf_counter()
            reply = await client.post(
                f"{mesh.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {mesh.api_key}"}
            )
            seconds = time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.gather(*attackers)
    assert reply.status_code == 200, reply.text
    assert seconds < ANSWERED_WITHIN_S
    print(
        f"\nchat answered in {seconds * 1000:.0f} ms during a flood of unauthenticated calls "
        f"refused at {rate:.0f}/s ({refused} in all)"
    )


def environ(pid: int) -> dict[str, str] | None:
    """A process's environment as it started; None when it is gone (a child restarting)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except FileNotFoundError:
        return None
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


@pytest.mark.e2e
def test_the_runner_keeps_its_secrets(mesh: Mesh) -> None:
    """Files holding a secret are 0600; each child has only the secrets it needs; the
    runner's output never shows the internal credential or the callback secret."""
    info = mesh.info()
    state = Path(info["state_dir"])
    for path in (mesh.ready_file, state / "api_key", state / "run" / "clawdbot.yaml"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    services = info["services"]
    envs = {name: env for name, child in services.items() if (env := environ(child["pid"])) is not None}
    assert {"adapter", "router", "cache", "envoy"} <= set(envs), set(envs)
    assert envs["adapter"]["CLAWDBOT_API_KEY"] == mesh.api_key
    consumers = [name for name in envs if name.startswith("jobs-")]
    for name in consumers:
        assert envs[name]["CLAWDBOT_CALLBACK_SECRET"] == CALLBACK_SECRET
    for name in ("adapter", "router", "cache", "worker", "health", "orchestrator", "envoy", *consumers):
        if name in envs:
            assert envs[name][TOKEN_ENV] == INTERNAL_TOKEN, name
    for name, env in envs.items():
        if name != "adapter":
            assert "CLAWDBOT_API_KEY" not in env, name
        if name not in consumers:
            assert "CLAWDBOT_CALLBACK_SECRET" not in env, name
        if name in ("redis", "kafka", "prometheus"):
            assert TOKEN_ENV not in env, name
    output = mesh.runner.output()
    assert INTERNAL_TOKEN not in output
    assert CALLBACK_SECRET not in output


# --- without the mesh ----------------------------------------------------------------------


def test_a_service_without_the_credential_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        ServiceHost("router", ServiceEndpoint(grpc_port=0, http_port=0), Metrics("router"))
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        internal_channel("127.0.0.1:1")
    monkeypatch.setenv(TOKEN_ENV, "has spaces and ünïcode")
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        ServiceHost("router", ServiceEndpoint(grpc_port=0, http_port=0), Metrics("router"))


def test_envoy_adds_the_credential_from_its_environment_overwriting_clients() -> None:
    rendered = render(EnvoyParams())
    entry = (
        "key: x-clawdbot-internal-token\n"
        '                            value: "%ENVIRONMENT(CLAWDBOT_INTERNAL_TOKEN)%"\n'
        "                          append_action: OVERWRITE_IF_EXISTS_OR_ADD"
    )
    assert entry in rendered
    # Never the secret itself in a config file.
    assert INTERNAL_TOKEN not in rendered
