"""A service that gets SIGTERM finishes the stream it is serving; the runner restarts it."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

from tests.conftest import Mesh
from tests.support import wait_for

pytestmark = pytest.mark.e2e

WORDS = "one two three four five six seven eight nine ten"


def chat_ok(mesh: Mesh) -> bool:
    r = httpx.post(
        f"{mesh.v1}/chat/completions",
        headers={"Authorization": f"Bearer {mesh.api_key}"},
        timeout=30,
        json={"model": "mock-1", "messages": [{"role": "user", "content": "back?"}]},
    )
    return r.status_code == 200


@pytest.mark.parametrize("service", ["router", "adapter"])
def test_sigterm_lets_an_in_flight_stream_complete(mesh: Mesh, service: str) -> None:
    before = mesh.info()["services"][service]
    first_chunk = threading.Event()
    body: list[bytes] = []
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{mesh.v1}/chat/completions",
                timeout=60,
                headers={"Authorization": f"Bearer {mesh.api_key}"},
                json={
                    "model": "mock-1",
                    "stream": True,
                    "messages": [{"role": "user", "content": WORDS}],
                    "mock": {"chunk_delay_ms": 250},
                },
            ) as r:
                assert r.status_code == 200, r.read()
                for part in r.iter_bytes():
                    body.append(part)
                    first_chunk.set()
        except BaseException as exc:
            failure.append(exc)
            first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60), "the stream never started"
    os.kill(before["pid"], signal.SIGTERM)
    reader.join(90)
    assert not failure, failure
    text = b"".join(body)
    assert text.endswith(b"data: [DONE]\n\n"), text[-300:]
    for word in WORDS.split():
        assert word.encode() in text

    # The runner notices the exit and brings the service back.
    wait_for(lambda: mesh.info()["services"][service]["restarts"] > before["restarts"], 60, f"{service} restart")
    wait_for(lambda: chat_ok(mesh), 60, f"requests to succeed again after the {service} restart")
