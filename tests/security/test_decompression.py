"""Compressed and encoded input, attacked through Envoy with real clients: a gzip bomb in a
WebSocket frame, junk and oversized base64 audio in jobs and workflow runs.

Each is refused with its status (413 request_too_large past gateway.max_request_bytes,
400 for junk) within a second, in the protocol's own shape (a WebSocket error frame with
the socket kept open; OpenAI's JSON error over REST); a GET /v1/models sent meanwhile is
answered; and the services are the ones the mesh started with afterwards."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import json
import struct
import zlib
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import Mesh
from tests.support import timed

pytestmark = pytest.mark.e2e


# The session mesh's gateway.max_request_bytes (tests/conftest.py).
MAX_BODY = 1024 * 1024
REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0
MiB = 1024 * 1024


@functools.cache
def gzip_bomb(inflated: int = 256 * MiB) -> bytes:
    """One gzip member of `inflated` zero bytes: about a thousandth of that on the wire."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MiB)
    return b"".join([*(compressor.compress(block) for _ in range(inflated // MiB)), compressor.flush()])


def wav(rate: int = 16000, seconds: float = 0.5) -> bytes:
    payload = bytes(2 * int(16000 * seconds))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def ws_url(mesh: Mesh) -> str:
    return mesh.url.replace("http://", "ws://") + "/v1/ws"


async def models_meanwhile(mesh: Mesh, attacking: asyncio.Event) -> list[float]:
    """GET /v1/models over and over while the attack lasts (and at least once): their times."""
    times: list[float] = []
    async with httpx.AsyncClient(timeout=30, headers=mesh.auth_headers) as client:
        while not times or attacking.is_set():
            reply, elapsed = await timed(client.get(f"{mesh.v1}/models"))
            assert reply.status_code == 200, reply.text
            times.append(elapsed)
    return times


async def next_frame(ws: websockets.ClientConnection, frame_id: Any) -> dict[str, Any]:
    """The next frame for `frame_id` that ends its request (done or error)."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if frame.get("id") == frame_id and frame["type"] in ("done", "error"):
            return frame


async def send_and_wait(ws: websockets.ClientConnection, data: bytes, frame_id: Any) -> dict[str, Any]:
    await ws.send(data)
    return await next_frame(ws, frame_id)


@pytest.mark.asyncio
async def test_a_gzip_bomb_frame_is_a_413_frame_fast_and_the_socket_stays_open(mesh: Mesh) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < 256 * 1024  # 255 KiB that inflates to 256 MiB
    before = mesh.service_pids()
    attacking = asyncio.Event()
    attacking.set()
    async with websockets.connect(ws_url(mesh), additional_headers=mesh.auth_headers, max_size=None) as ws:
        normal = asyncio.create_task(models_meanwhile(mesh, attacking))
        refusals: list[float] = []
        try:
            for _ in range(8):
                frame, elapsed = await timed(send_and_wait(ws, bomb, None))
                refusals.append(elapsed)
                assert frame["type"] == "error" and frame["status"] == 413, frame
                assert (
                    frame["error"]["code"] == "request_too_large" and frame["error"]["type"] == "invalid_request_error"
                )
                assert str(MAX_BODY) in frame["error"]["message"]
        finally:
            attacking.clear()
        models_times = await normal

        # Same socket: a normal request (gzip-compressed, as the protocol allows) is answered.
        chat = {
            "type": "chat.completions",
            "id": "after",
            "body": {"model": "mock-1", "stream": False, "messages": [{"role": "user", "content": "still here"}]},
        }
        done, after_s = await timed(send_and_wait(ws, gzip.compress(json.dumps(chat).encode()), "after"))
        assert done["type"] == "done", done
    print(
        f"\n8 gzip bombs ({len(bomb)} bytes -> 256 MiB): refused in max {max(refusals) * 1000:.1f} ms "
        f"(median {sorted(refusals)[4] * 1000:.1f} ms); {len(models_times)} GET /v1/models meanwhile, "
        f"max {max(models_times) * 1000:.1f} ms; a chat after them {after_s * 1000:.1f} ms"
    )
    assert max(refusals) < REFUSED_WITHIN_S
    assert max(models_times) < ANSWERED_WITHIN_S
    assert mesh.service_pids() == before


@pytest.mark.asyncio
async def test_broken_and_many_member_gzip_frames_are_400_frames(mesh: Mesh) -> None:
    async with websockets.connect(ws_url(mesh), additional_headers=mesh.auth_headers) as ws:
        for data, needle in (
            (gzip.compress(b'{"model": "mock-1"}')[:-10], "truncated"),
            (gzip.compress(b"") * 50_000, "members"),
        ):
            frame, elapsed = await timed(send_and_wait(ws, data, None))
            print(f"\n{needle}: 400 frame in {elapsed * 1000:.1f} ms")
            assert frame["status"] == 400 and frame["error"]["code"] == "invalid_frame", frame
            assert needle in frame["error"]["message"]
            assert elapsed < REFUSED_WITHIN_S


async def refused_meanwhile(mesh: Mesh, method: str, path: str, body: Any) -> tuple[httpx.Response, float, float]:
    """The attack's response and time, and the slowest GET /v1/models sent while it ran."""
    attacking = asyncio.Event()
    attacking.set()
    normal = asyncio.create_task(models_meanwhile(mesh, attacking))
    try:
        async with httpx.AsyncClient(timeout=30, headers=mesh.auth_headers) as client:
            reply, elapsed = await timed(client.request(method, f"{mesh.v1}{path}", json=body))
    finally:
        attacking.clear()
    return reply, elapsed, max(await normal)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


JOB_AUDIO = [
    # (what, the base64 text, status, code)
    ("junk", "this is not base64!!", 400, "invalid_audio"),
    ("base64 with a newline in it", b64(wav())[:40] + "\n" + b64(wav())[40:], 400, "invalid_audio"),
    ("a 999,983 Hz header", b64(wav(rate=999_983)), 400, "invalid_audio"),
    ("more than the body limit", "A" * (MAX_BODY + 4), 413, "request_too_large"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "encoded", "status", "code"), JOB_AUDIO, ids=[c[0] for c in JOB_AUDIO])
async def test_bad_base64_audio_in_a_job_is_refused_at_submit(
    mesh: Mesh, what: str, encoded: str, status: int, code: str
) -> None:
    before = mesh.service_pids()
    body = {"kind": "transcription", "request": {"model": "pocketsphinx-en", "file": encoded}}
    reply, elapsed, normal_s = await refused_meanwhile(mesh, "POST", "/jobs", body)
    print(f"\njob with {what}: {reply.status_code} in {elapsed * 1000:.1f} ms; GET /v1/models {normal_s * 1000:.1f} ms")
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code
    if status == 400:
        assert error["param"] == "request.file"
    assert elapsed < REFUSED_WITHIN_S and normal_s < ANSWERED_WITHIN_S
    assert mesh.service_pids() == before


WORKFLOW_AUDIO = [
    ("junk", "this is not base64!!", 400, "invalid_audio"),
    ("a 10,000,019 Hz header", b64(wav(rate=10_000_019)), 400, "invalid_audio"),
    ("more than the body limit", "A" * (MAX_BODY + 4), 413, "request_too_large"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "encoded", "status", "code"), WORKFLOW_AUDIO, ids=[c[0] for c in WORKFLOW_AUDIO])
async def test_bad_base64_audio_in_a_workflow_run_is_refused_before_it_runs(
    mesh: Mesh, what: str, encoded: str, status: int, code: str
) -> None:
    before = mesh.service_pids()
    body = {"input": {"audio": encoded}}
    reply, elapsed, normal_s = await refused_meanwhile(mesh, "POST", "/workflows/smart_assistant:run", body)
    print(f"\nrun with {what}: {reply.status_code} in {elapsed * 1000:.1f} ms; GET /v1/models {normal_s * 1000:.1f} ms")
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code
    if status == 400:
        assert error["param"] == "input.audio"
    assert elapsed < REFUSED_WITHIN_S and normal_s < ANSWERED_WITHIN_S
    assert mesh.service_pids() == before


@pytest.mark.asyncio
async def test_bad_base64_audio_in_a_workflow_over_the_websocket_is_an_error_frame(mesh: Mesh) -> None:
    async with websockets.connect(ws_url(mesh), additional_headers=mesh.auth_headers) as ws:
        run = {"type": "workflow.run", "id": "w", "name": "smart_assistant", "input": {"audio": "junk!"}}
        frame, elapsed = await timed(send_and_wait(ws, json.dumps(run).encode(), "w"))
        assert frame["type"] == "error" and frame["status"] == 400, frame
        assert frame["error"]["param"] == "input.audio" and frame["error"]["code"] == "invalid_audio"
        assert elapsed < REFUSED_WITHIN_S
        chat = {
            "type": "chat.completions",
            "id": "c",
            "body": {"model": "mock-1", "messages": [{"role": "user", "content": "next"}]},
        }
        assert (await send_and_wait(ws, json.dumps(chat).encode(), "c"))["type"] == "done"
