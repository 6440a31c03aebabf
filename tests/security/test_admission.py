"""Admission control, attacked through Envoy with real clients.

- One WebSocket carrying more requests at once than its cap (to a slow model): the excess
  is answered with 429 error frames at once, the socket stays open, the admitted requests
  complete, and other clients are served meanwhile.
- A burst past a service's in-flight limit (set low here, on the adapter and the router):
  refused at once with 503 `overloaded` and Retry-After, rather than queued; the admitted
  requests complete, and a normal request is answered once the burst has drained.
The services are the ones the mesh started with afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0
# Long enough that every admitted request is still in flight while the excess arrives,
# on a busy two-core machine.
SLOW_MS = 2500
WS_CAP = 4
ADAPTER_LIMIT = 3
ROUTER_LIMIT = 2


def config(mock_url: str, tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Envoy, adapter, router and cache; one chat model at the mock provider."""
    return core_mesh_config(mock_url, tmp, **sections)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("ws-cap")
    with running_mesh(tmp, config(mock_upstream, tmp, adapter={"ws_max_in_flight": WS_CAP}), mock_upstream) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("tight")
    limits = {"adapter": {"max_in_flight": ADAPTER_LIMIT}, "router": {"max_in_flight": ROUTER_LIMIT}}
    with running_mesh(tmp, config(mock_upstream, tmp, **limits), mock_upstream) as mesh:
        yield mesh


def slow_chat(text: str, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "mock-1",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        "mock": {"delay_ms": SLOW_MS},
    }


@pytest.mark.asyncio
async def test_one_websocket_past_its_cap_gets_429_frames_and_stays_open(capped: Mesh) -> None:
    before = capped.service_pids()
    headers = {"Authorization": f"Bearer {capped.api_key}"}
    url = capped.url.replace("http://", "ws://") + "/v1/ws"
    excess = 3
    # Made before the flood: building a client loads CA certificates for ~0.1 s, which
    # would stall this loop's reading of the refusals and pad their measured latency.
    other = httpx.AsyncClient(headers=headers, timeout=30)
    async with other, websockets.connect(url, additional_headers=headers) as ws:
        sent_at: dict[str, float] = {}
        for n in range(WS_CAP + excess):
            frame_id = f"r{n}"
            sent_at[frame_id] = time.perf_counter()
            body = slow_chat(f"ws {n}")
            await ws.send(json.dumps({"type": "chat.completions", "id": frame_id, "body": body}))

        # Another client meanwhile: answered as usual.
        async def meanwhile() -> tuple[int, float]:
            started = time.perf_counter()
            models = await other.get(f"{capped.v1}/models")
            return models.status_code, time.perf_counter() - started

        other_client = asyncio.create_task(meanwhile())
        refused: dict[str, float] = {}
        done: set[str] = set()
        while len(done) < WS_CAP or len(refused) < excess:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["type"] == "error":
                assert frame["status"] == 429, frame
                assert frame["error"]["code"] == "too_many_in_flight"
                refused[frame["id"]] = time.perf_counter() - sent_at[frame["id"]]
            elif frame["type"] == "done":
                done.add(frame["id"])
        print("429 frames after (ms):", {k: round(v * 1000, 1) for k, v in refused.items()})
        assert set(refused) == {f"r{n}" for n in range(WS_CAP, WS_CAP + excess)}
        assert set(done) == {f"r{n}" for n in range(WS_CAP)}
        assert max(refused.values()) < REFUSED_WITHIN_S
        status, took = await other_client
        print(f"GET /v1/models during the flood: {status} in {took * 1000:.1f} ms")
        assert status == 200 and took < ANSWERED_WITHIN_S

        # The socket is still open and serves again once the admitted ones are done.
        started = time.perf_counter()
        body = {"model": "mock-1", "messages": [{"role": "user", "content": "after"}], "stream": False}
        await ws.send(json.dumps({"type": "chat.completions", "id": "after", "body": body}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "done":
            assert frame["type"] != "error", frame
        after = time.perf_counter() - started
        print(f"request on the same socket afterwards: done in {after * 1000:.1f} ms")
        assert after < ANSWERED_WITHIN_S
    assert capped.service_pids() == before


@pytest.mark.asyncio
async def test_a_burst_past_the_in_flight_limit_is_shed_with_503_overloaded(tight: Mesh) -> None:
    before = tight.service_pids()
    headers = {"Authorization": f"Bearer {tight.api_key}"}
    burst = 8
    limits = httpx.Limits(max_connections=burst + 2)
    async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as http:

        async def one(n: int, stream: bool) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            reply = await http.post(f"{tight.v1}/chat/completions", json=slow_chat(f"burst {n}", stream))
            await reply.aread()
            return reply, time.perf_counter() - started

        # Streams hold their slot until they end, as unary calls do.
        results = await asyncio.gather(*(one(n, stream=n % 2 == 1) for n in range(burst)))
        ok = [took for reply, took in results if reply.status_code == 200]
        shed = [(reply, took) for reply, took in results if reply.status_code != 200]
        print(f"admitted: {len(ok)} in {[round(t, 2) for t in ok]} s")
        print(f"shed: {[(r.status_code, round(t * 1000, 1)) for r, t in shed]} (status, ms)")
        # The adapter admits ADAPTER_LIMIT, the router ROUTER_LIMIT of those.
        assert len(ok) == ROUTER_LIMIT
        assert len(shed) == burst - ROUTER_LIMIT
        shed_by = set()
        for reply, took in shed:
            assert reply.status_code == 503, reply.text
            error = reply.json()["error"]
            assert (error["code"], error["type"]) == ("overloaded", "service_unavailable"), error
            assert reply.headers["retry-after"] == "1"
            assert took < REFUSED_WITHIN_S
            shed_by.add(error["message"].split()[1])
        assert shed_by == {"adapter", "router"}  # each service sheds its own excess

        # Drained: served again, in its usual time.
        started = time.perf_counter()
        body = {"model": "mock-1", "messages": [{"role": "user", "content": "after the burst"}]}
        after = await http.post(f"{tight.v1}/chat/completions", json=body)
        took = time.perf_counter() - started
        print(f"normal request after the burst: {after.status_code} in {took * 1000:.1f} ms")
        assert after.status_code == 200 and took < ANSWERED_WITHIN_S
    assert tight.service_pids() == before
