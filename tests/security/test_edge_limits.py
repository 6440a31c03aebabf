"""Envoy's edge, attacked through the public port with real clients: HTTP/2 limits and
rapid reset, header names with underscores, bodies at and past the limit, bursts, and
Envoy's own overload answers (heap nearly full, circuit breaker open).

Each attack is refused with its status within a second, a normal request sent meanwhile
is answered, and the mesh's services are still the ones it started with afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest
import websockets
import yaml

from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from clawdbot.runner.__main__ import envoy_binary, free_port
from clawdbot.runner.envoy_config import EnvoyParams, write
from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import Proc, unused_port, wait_for

pytestmark = pytest.mark.e2e

# This mesh's body limit (gateway.max_request_bytes): far above the 32 KiB connection
# buffers, yet small enough that uploading it takes little time on a busy machine.
MAX_BODY = 1024 * 1024
REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0


def lite_config(mock_url: str, tmp: Path) -> dict[str, Any]:
    """Envoy, adapter, router and cache; one chat model at the mock provider."""
    return core_mesh_config(mock_url, tmp, gateway={"max_request_bytes": MAX_BODY})


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("edge")
    with running_mesh(tmp, lite_config(mock_upstream, tmp), mock_upstream) as mesh:
        yield mesh


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-1", "messages": [{"role": "user", "content": content}], **extra}


def timed_models(mesh: Mesh, http2: bool = False) -> float:
    """Seconds a normal GET /v1/models takes (asserting it succeeds)."""
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
        start = time.perf_counter()
        reply = client.get(f"{mesh.v1}/models", headers=mesh.auth_headers)
        elapsed = time.perf_counter() - start
    assert reply.status_code == 200, reply.text
    return elapsed


def assert_services_unchanged(mesh: Mesh, before: dict[str, Any]) -> None:
    """Every service still runs, and none was restarted meanwhile."""
    after = mesh.info()["services"]
    assert after == before, f"services changed during the attack: {before} -> {after}"
    assert timed_models(mesh) < ANSWERED_WITHIN_S


class H2Client:
    """A raw HTTP/2 client over one TCP connection, for what httpx will not do: read the
    server's SETTINGS, exceed them, reset streams as fast as it can."""

    def __init__(self, mesh: Mesh) -> None:
        parts = urlsplit(mesh.url)
        assert parts.hostname and parts.port
        self.authority = f"{parts.hostname}:{parts.port}"
        self.api_key = mesh.api_key
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def events(self) -> list[h2.events.Event]:
        """The next batch of events; [] once the server has closed the connection."""
        try:
            data = self.sock.recv(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            return []
        events = self.conn.receive_data(data)
        with contextlib.suppress(OSError):
            self.flush()
        return events

    def wait_for_settings(self) -> None:
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events()):
            assert not self.closed, "connection closed before the server's SETTINGS"

    def headers(self, path: str, method: str = "GET") -> list[tuple[str, str]]:
        return [
            (":method", method),
            (":scheme", "http"),
            (":authority", self.authority),
            (":path", path),
            ("authorization", f"Bearer {self.api_key}"),
            ("content-type", "application/json"),
        ]

    def close(self) -> None:
        self.sock.close()


def test_http2_announces_stream_and_window_limits(edge: Mesh) -> None:
    client = H2Client(edge)
    try:
        client.wait_for_settings()
        settings = client.conn.remote_settings
        print(
            f"SETTINGS: max_concurrent_streams={settings.max_concurrent_streams} "
            f"initial_window_size={settings.initial_window_size}"
        )
        assert settings.max_concurrent_streams == 100
        assert settings.initial_window_size == 65536
        # The connection window is raised from the protocol's 65,535 by a WINDOW_UPDATE.
        deadline = time.monotonic() + 5
        while client.conn.outbound_flow_control_window < 1048576 and time.monotonic() < deadline:
            client.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            with contextlib.suppress(TimeoutError):
                client.events()
        assert client.conn.outbound_flow_control_window == 1048576
    finally:
        client.close()


def test_streams_past_the_limit_are_refused(edge: Mesh) -> None:
    """A client that ignores the announced limit: a hundred streams open at once are
    held, the 101st ends the connection (Envoy treats it as a protocol error) at once,
    and other clients are served meanwhile."""
    client = H2Client(edge)
    try:
        client.wait_for_settings()
        # Pretend the server allowed more (h2 would otherwise refuse to send them).
        client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
        client.conn.remote_settings.acknowledge()

        def open_stream() -> None:
            # A request whose body never comes: it holds its stream in the buffer filter.
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, client.headers("/v1/chat/completions", "POST"))
            client.flush()

        for _ in range(100):
            open_stream()
        # A PING answered proves Envoy has read all hundred and kept the connection.
        client.conn.ping(b"held-100")
        client.flush()
        resets: list[h2.events.Event] = []
        while True:
            events = client.events()
            assert not client.closed, "the connection was closed within the limit"
            resets += [e for e in events if isinstance(e, h2.events.StreamReset)]
            if any(isinstance(e, h2.events.PingAckReceived) for e in events):
                break
        assert resets == [], f"streams within the limit were reset: {resets}"

        start = time.perf_counter()
        open_stream()
        client.sock.settimeout(REFUSED_WITHIN_S * 5)
        ended: list[h2.events.Event] = []
        while not client.closed:
            ended += [
                e for e in client.events() if isinstance(e, h2.events.ConnectionTerminated | h2.events.StreamReset)
            ]
            if ended:
                break
        elapsed = time.perf_counter() - start
        print(f"stream 101: connection ended ({ended or 'closed'}) after {elapsed * 1000:.1f} ms")
        assert elapsed < REFUSED_WITHIN_S
        during = timed_models(edge, http2=True)
        print(f"a normal request right after: {during * 1000:.1f} ms")
        assert during < ANSWERED_WITHIN_S
    finally:
        client.close()


def test_rapid_reset_closes_the_connection(edge: Mesh) -> None:
    """CVE-2023-44487: open a stream, reset it, repeat, on several connections in turn.
    Envoy closes each connection after about a hundred such streams; a normal request
    sent meanwhile is answered and no service falls over."""
    before = edge.info()["services"]
    closed_before = premature_reset_closes(edge)
    outcome: dict[str, Any] = {"streams": [], "seconds": []}
    done = threading.Event()

    def attack() -> None:
        try:
            for _ in range(10):
                client = H2Client(edge)
                start = time.perf_counter()
                sent = 0
                try:
                    client.wait_for_settings()
                    client.sock.settimeout(0.001)
                    while sent < 5000:
                        for _ in range(20):
                            stream_id = client.conn.get_next_available_stream_id()
                            client.conn.send_headers(stream_id, client.headers("/v1/models"), end_stream=True)
                            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                            sent += 1
                        client.flush()
                        # Drain what the server sent, noticing GOAWAY or the close.
                        with contextlib.suppress(TimeoutError):
                            events = client.events()
                            if client.closed or any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                                break
                except OSError:
                    pass  # the server closed the connection while we wrote: the point
                finally:
                    client.close()
                outcome["streams"].append(sent)
                outcome["seconds"].append(time.perf_counter() - start)
        finally:
            done.set()

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    during: list[float] = []
    while not done.is_set():
        during.append(timed_models(edge, http2=True))
    thread.join()
    print(
        f"streams opened and reset per connection before Envoy closed it: {outcome['streams']}; "
        f"seconds per connection: {[round(s, 3) for s in outcome['seconds']]}; "
        f"normal requests meanwhile: {len(during)}, slowest {max(during) * 1000:.1f} ms"
    )
    assert len(outcome["streams"]) == 10
    # Frames already on the wire when Envoy decides still arrive: allow for them, but the
    # connection must be cut long before the client gives up on its own.
    assert max(outcome["streams"]) < 5000
    assert max(outcome["seconds"]) < REFUSED_WITHIN_S
    assert max(during) < ANSWERED_WITHIN_S
    # Envoy's own count: each connection was closed for its premature resets.
    assert premature_reset_closes(edge) - closed_before == 10
    assert_services_unchanged(edge, before)


def premature_reset_closes(mesh: Mesh) -> int:
    """Connections Envoy has closed for too many premature stream resets."""
    stats = httpx.get(
        f"{mesh.admin_url}/stats",
        params={"filter": r"^http\.public\.downstream_rq_too_many_premature_resets$", "format": "json"},
        timeout=5,
    ).json()["stats"]
    (stat,) = stats
    return int(stat["value"])


def test_header_names_with_underscores_are_refused(edge: Mesh) -> None:
    headers = {**edge.auth_headers, "x_api_key": "smuggled"}
    with httpx.Client(timeout=30) as client:
        start = time.perf_counter()
        reply = client.get(f"{edge.v1}/models", headers=headers)
        elapsed = time.perf_counter() - start
    print(f"HTTP/1.1 underscore header: {reply.status_code} in {elapsed * 1000:.1f} ms: {reply.text}")
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert elapsed < REFUSED_WITHIN_S
    # Over HTTP/2 the stream is refused (reset) rather than answered.
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        start = time.perf_counter()
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"{edge.v1}/models", headers=headers)
        elapsed = time.perf_counter() - start
    print(f"HTTP/2 underscore header: reset in {elapsed * 1000:.1f} ms")
    assert elapsed < REFUSED_WITHIN_S
    # The same header spelled with a dash is nothing special.
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{edge.v1}/models", headers={**edge.auth_headers, "x-api-key-note": "x"}).status_code == 200


def test_slow_headers_are_cut_off(edge: Mesh) -> None:
    """Slowloris: a request line and a header, then nothing. Envoy answers 408 once the
    headers have taken 10 s (request_headers_timeout) and closes; others are served."""
    parts = urlsplit(edge.url)
    assert parts.hostname and parts.port
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: slow\r\n")
        start = time.perf_counter()
        during = timed_models(edge)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        elapsed = time.perf_counter() - start
    status_line = answer.split(b"\r\n", 1)[0]
    print(f"slow headers: {status_line!r} after {elapsed:.2f} s; a normal request meanwhile: {during * 1000:.1f} ms")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    assert 9 < elapsed < 15
    assert during < ANSWERED_WITHIN_S


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_body_past_the_limit_is_413_at_once(edge: Mesh, http2: bool) -> None:
    body = json.dumps(chat_body("x" * MAX_BODY)).encode()
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
        start = time.perf_counter()
        reply = client.post(
            f"{edge.v1}/chat/completions",
            content=body,
            headers={**edge.auth_headers, "content-type": "application/json"},
        )
        elapsed = time.perf_counter() - start
    print(f"{len(body)} bytes: {reply.status_code} in {elapsed * 1000:.1f} ms")
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"
    assert elapsed < REFUSED_WITHIN_S


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_body_just_under_the_limit_is_served(edge: Mesh, http2: bool) -> None:
    """The connection buffer limits (32 KiB) do not cap bodies: the buffer filter takes a
    request up to max_request_bytes, and the echoed answer as large comes back whole."""
    content = "y" * (MAX_BODY - 1024)
    body = json.dumps(chat_body(content)).encode()
    assert len(body) < MAX_BODY
    with httpx.Client(http1=not http2, http2=http2, timeout=60) as client:
        start = time.perf_counter()
        reply = client.post(
            f"{edge.v1}/chat/completions",
            content=body,
            headers={**edge.auth_headers, "content-type": "application/json"},
        )
        elapsed = time.perf_counter() - start
    print(f"{len(body)} bytes up, {len(reply.content)} down over {reply.http_version}: {elapsed * 1000:.1f} ms")
    assert reply.status_code == 200, reply.text[:500]
    assert reply.json()["choices"][0]["message"]["content"] == f"Hello from mock-1: {content}"


@pytest.mark.asyncio
async def test_large_websocket_message_passes_the_buffers(edge: Mesh) -> None:
    """A WebSocket message near the body limit crosses Envoy's 32 KiB connection buffers
    both ways (flow control, not truncation) and is answered whole."""
    content = "w" * (MAX_BODY - 64 * 1024)
    url = edge.url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers=edge.auth_headers, max_size=2 * MAX_BODY) as ws:
        start = time.perf_counter()
        await ws.send(json.dumps({"id": "big", "body": chat_body(content, stream=False)}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        elapsed = time.perf_counter() - start
    print(f"{len(content)} bytes over the WebSocket and back: {elapsed * 1000:.1f} ms")
    assert frame["type"] == "chat.completion", str(frame)[:500]
    assert frame["data"]["choices"][0]["message"]["content"] == f"Hello from mock-1: {content}"


@pytest.mark.asyncio
async def test_a_burst_does_not_starve_a_normal_request(edge: Mesh) -> None:
    """400 chat requests at once over a few HTTP/2 connections; normal requests on a
    connection of their own, sent one after another while the burst lasts, are answered
    in their usual time."""
    before = edge.info()["services"]
    body = chat_body("burst")
    during: list[float] = []
    async with (
        httpx.AsyncClient(http1=False, http2=True, timeout=60, limits=httpx.Limits(max_connections=4)) as burst,
        httpx.AsyncClient(timeout=60) as single,
    ):
        burst_started = time.perf_counter()
        replies_future = asyncio.gather(
            *(burst.post(f"{edge.v1}/chat/completions", json=body, headers=edge.auth_headers) for _ in range(400))
        )
        while not replies_future.done():
            start = time.perf_counter()
            normal = await single.get(f"{edge.v1}/models", headers=edge.auth_headers)
            during.append(time.perf_counter() - start)
            assert normal.status_code == 200, normal.text
        replies = await replies_future
        burst_s = time.perf_counter() - burst_started
    statuses: dict[int, int] = {}
    for reply in replies:
        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
    print(
        f"burst of 400 in {burst_s * 1000:.0f} ms, statuses {statuses}; normal requests during it: "
        f"{len(during)}, slowest {max(during) * 1000:.1f} ms"
    )
    assert max(during) < ANSWERED_WITHIN_S
    # Whatever was shed was shed as overload, never as a failure.
    for reply in replies:
        assert reply.status_code in (200, 429, 503), reply.text
        if reply.status_code == 503:
            assert reply.json()["error"]["code"] == "overloaded"
            assert "retry-after" in reply.headers
    assert_services_unchanged(edge, before)


# --- Envoy's own overload answers, from an extra Envoy beside the mesh's ------------------


@contextlib.contextmanager
def extra_envoy(tmp: Path, config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Envoy on a bootstrap of ours; yields (public URL, admin URL) once it is live."""
    port, admin = free_port(), free_port()
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == "public"]
    listener["address"]["socket_address"]["port_value"] = port
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    path = tmp / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [envoy_binary(), "-c", str(path), "--use-dynamic-base-id", "--concurrency", "1", "--log-level", "warn"]
    proc = Proc(argv, tmp / "envoy.log")

    def live() -> bool:
        assert proc.alive(), proc.output()
        return httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=2).status_code == 200

    try:
        wait_for(live, 60, "the extra Envoy")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    finally:
        proc.stop()


def test_heap_nearly_full_is_503_overloaded(tmp_path: Path) -> None:
    """gateway.max_heap_size_bytes far below what Envoy itself needs: the overload manager
    refuses every request with 503 `overloaded` and Retry-After, REST and gRPC alike."""
    params = EnvoyParams(
        adapter_grpc_port=unused_port(), adapter_http_port=unused_port(), max_heap_size_bytes=1024 * 1024
    )
    config = yaml.safe_load(write(params, tmp_path / "rendered.yaml").read_text())
    with extra_envoy(tmp_path, config) as (url, admin):

        def overloaded() -> bool:
            stats = httpx.get(f"{admin}/stats", params={"filter": "stop_accepting_requests.active"}, timeout=2).text
            return stats.strip().endswith(": 1")

        wait_for(overloaded, 10, "the overload manager to act")
        start = time.perf_counter()
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat_body("hi"), timeout=10)
        elapsed = time.perf_counter() - start
        print(f"REST while overloaded: {reply.status_code} {reply.text} in {elapsed * 1000:.1f} ms")
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["error"] == {
            "message": reply.json()["error"]["message"],
            "type": "service_unavailable",
            "param": None,
            "code": "overloaded",
        }
        assert elapsed < REFUSED_WITHIN_S

        async def grpc_call() -> grpc.StatusCode:
            async with grpc.aio.insecure_channel(url.removeprefix("http://")) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
            return info.value.code()

        start = time.perf_counter()
        code = asyncio.run(grpc_call())
        elapsed = time.perf_counter() - start
        print(f"gRPC while overloaded: {code} in {elapsed * 1000:.1f} ms")
        assert code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < REFUSED_WITHIN_S


def test_circuit_breaker_sheds_with_503_overloaded(edge: Mesh, tmp_path: Path) -> None:
    """The mesh's own Envoy bootstrap with the adapter cluster's breaker at 2 calls in
    flight: a third call while two slow ones run is refused at once, 503 `overloaded` with
    Retry-After, and served again once they are done."""
    runner_config = edge.info()["state_dir"]
    config = yaml.safe_load((Path(runner_config) / "run" / "envoy.yaml").read_text())
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "adapter_grpc"]
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    # Pending: calls waiting while the first connection to the adapter is set up; room
    # for both slow calls, so that only calls in flight decide.
    thresholds.update(max_requests=2, max_pending_requests=2)
    slow = chat_body("slow", mock={"delay_ms": 3000})
    with extra_envoy(tmp_path, config) as (url, admin):

        async def scenario() -> tuple[list[httpx.Response], httpx.Response, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                # The connection to the adapter is up before the breaker is put to the test.
                warm = await client.post(
                    f"{url}/v1/chat/completions", json=chat_body("warm"), headers=edge.auth_headers
                )
                assert warm.status_code == 200, warm.text
                running = [
                    asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=slow, headers=edge.auth_headers))
                    for _ in range(2)
                ]

                async def both_in_flight() -> None:
                    while True:
                        finished = [task.result() for task in running if task.done()]
                        assert not finished, f"a slow call ended early: {[(r.status_code, r.text) for r in finished]}"
                        stats = (
                            await client.get(
                                f"{admin}/stats", params={"filter": r"cluster\.adapter_grpc\.upstream_rq_active$"}
                            )
                        ).text
                        if stats.strip().endswith(": 2"):
                            return
                        await asyncio.sleep(0.02)

                await asyncio.wait_for(both_in_flight(), 10)
                start = time.perf_counter()
                shed = await client.post(
                    f"{url}/v1/chat/completions", json=chat_body("third"), headers=edge.auth_headers
                )
                elapsed = time.perf_counter() - start
                return list(await asyncio.gather(*running)), shed, elapsed

        served, shed, elapsed = asyncio.run(scenario())
        print(f"third call: {shed.status_code} {shed.text} in {elapsed * 1000:.1f} ms")
        assert [r.status_code for r in served] == [200, 200]
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert shed.json()["error"]["type"] == "service_unavailable"
        assert elapsed < REFUSED_WITHIN_S
        again = httpx.post(f"{url}/v1/chat/completions", json=chat_body("after"), headers=edge.auth_headers, timeout=30)
        assert again.status_code == 200, again.text
