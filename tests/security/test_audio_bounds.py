"""Audio outside physical bounds, sent through Envoy to /v1/audio/transcriptions with real
clients: impossible sample rates and channel counts, chunk sizes that lie, a 60-byte file
claiming gigabytes, audio longer than gateway.max_audio_seconds.

The adapter reads the WAV header before the request goes anywhere, so each is a 400
naming `file` within a second, for a local model and a hosted one alike (the provider is
never called); a normal transcription still works; a GET /v1/models sent meanwhile is
answered; the services are the ones the mesh started with. The worker, which other callers
reach too, refuses the same files itself (defence in depth)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import orjson
import pytest

from clawdbot.common.errors import ERROR_METADATA_KEY
from clawdbot.common.service import internal_channel
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import handmade_wav as wav
from tests.support import timed, wait_for

pytestmark = pytest.mark.e2e

REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0


HALF_SECOND = bytes(16000)  # 16-bit mono silence at 16 kHz

# (case, file, what the message names)
HOSTILE = [
    ("10,000,019 Hz", wav(HALF_SECOND, rate=10_000_019), "10000019 Hz"),
    ("999,983 Hz", wav(HALF_SECOND, rate=999_983), "999983 Hz"),
    ("1e8 Hz", wav(HALF_SECOND, rate=100_000_000), "100000000 Hz"),
    ("0 channels", wav(HALF_SECOND, channels=0), "0 channels"),
    ("65,535 channels", wav(HALF_SECOND, channels=65535), "65535 channels"),
    ("fmt chunk size 0xFFFFFFFF", wav(HALF_SECOND, fmt_size=0xFFFFFFFF), "'fmt ' chunk"),
    (
        "LIST chunk size 0xFFFFFFFF",
        wav(HALF_SECOND, before_data=b"LIST" + struct.pack("<I", 0xFFFFFFFF) + b"INFO"),
        "'LIST' chunk",
    ),
    ("a 60-byte file claiming 1 GiB", wav(bytes(16), data_size=1 << 30), "truncated or its header is wrong"),
    ("a 60-byte file claiming 4 GiB", wav(bytes(16), data_size=0xFFFFFFFF), "at least 0.1 seconds"),
]


def uploads_since(mesh: Mesh, since: float) -> int:
    """Transcriptions the mock provider has been sent since the time `since`."""
    recorded = httpx.get(mesh.mock_url.removesuffix("/v1") + "/_mock/requests", timeout=10).json()
    return sum(1 for r in recorded if r["path"] == "/v1/audio/transcriptions" and r["ts"] >= since)


async def transcribe_meanwhile(mesh: Mesh, model: str, audio: bytes) -> tuple[httpx.Response, float, float]:
    """The upload's response and time, and the time of a GET /v1/models sent with it."""
    async with httpx.AsyncClient(timeout=30, headers=mesh.auth_headers) as client:
        (reply, elapsed), (models, models_s) = await asyncio.gather(
            timed(
                client.post(
                    f"{mesh.v1}/audio/transcriptions",
                    files={"file": ("attack.wav", audio, "audio/wav")},
                    data={"model": model},
                )
            ),
            timed(client.get(f"{mesh.v1}/models")),
        )
    assert models.status_code == 200, models.text
    return reply, elapsed, models_s


@pytest.mark.asyncio
@pytest.mark.parametrize("model", ["pocketsphinx-en", "mock-whisper"])
@pytest.mark.parametrize(("case", "audio", "needle"), HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_a_hostile_wav_header_is_a_400_naming_file_within_a_second(
    mesh: Mesh, model: str, case: str, audio: bytes, needle: str
) -> None:
    before, started = mesh.service_pids(), time.time()
    reply, elapsed, models_s = await transcribe_meanwhile(mesh, model, audio)
    print(
        f"\n{case} ({len(audio)} bytes) to {model}: {reply.status_code} in {elapsed * 1000:.1f} ms; "
        f"GET /v1/models meanwhile {models_s * 1000:.1f} ms"
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_audio" and error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert elapsed < REFUSED_WITHIN_S and models_s < ANSWERED_WITHIN_S
    assert uploads_since(mesh, started) == 0  # refused before any provider saw it
    assert mesh.service_pids() == before


def test_the_openai_sdk_sees_a_bad_request_naming_the_file(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="mock-whisper", file=("a.wav", HOSTILE[0][1], "audio/wav"))
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "file"
    # A normal file goes through to the provider.
    transcript = client.audio.transcriptions.create(model="mock-whisper", file=("a.wav", wav(HALF_SECOND), "audio/wav"))
    assert transcript.text == "mock transcript by mock-whisper"


@pytest.mark.asyncio
async def test_the_typed_grpc_route_refuses_them_too(mesh: Mesh) -> None:
    metadata = (("authorization", f"Bearer {mesh.api_key}"),)
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for case, audio, needle in HOSTILE:
            request = gateway_pb2.TranscriptionRequest(model="mock-whisper", file=audio)
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateTranscription(request, metadata=metadata, timeout=30)
            elapsed = time.perf_counter() - started
            print(f"\ngRPC, {case}: {caught.value.code().name} in {elapsed * 1000:.1f} ms")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert needle in (caught.value.details() or "")
            assert elapsed < REFUSED_WITHIN_S
        good = gateway_pb2.TranscriptionRequest(model="mock-whisper", file=wav(HALF_SECOND))
        reply = await stub.CreateTranscription(good, metadata=metadata, timeout=30)
        assert reply.text == "mock transcript by mock-whisper"


def test_a_normal_local_transcription_still_works(mesh: Mesh) -> None:
    wait_for_model(mesh, "pocketsphinx-en")
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60)
    for rate in (8000, 16000, 44100):
        silence = wav(bytes(2 * rate // 2), rate=rate)
        assert (
            client.audio.transcriptions.create(model="pocketsphinx-en", file=("a.wav", silence, "audio/wav")).text == ""
        )


def wait_for_model(mesh: Mesh, name: str) -> None:
    """The one worker model a test needs, serving (the others may still be loading)."""
    wait_for(lambda: mesh.worker_models().get(name, {}).get("state") == "ready" or None, 300, f"{name} to load")


@pytest.mark.asyncio
async def test_the_worker_refuses_the_same_files_itself(mesh: Mesh) -> None:
    """Defence in depth: a caller that reaches the worker without the adapter (the router
    with a job's audio, say) gets the same 400, never a resampling that runs for minutes."""
    wait_for_model(mesh, "pocketsphinx-en")
    async with internal_channel(mesh.worker_target) as channel:
        stub = worker_pb2_grpc.ModelServiceStub(channel)
        for case, audio, needle in HOSTILE:
            request = worker_pb2.InferRequest(
                model="pocketsphinx-en", task="transcription", openai_json=b'{"model": "pocketsphinx-en"}', binary=audio
            )
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Infer(request, timeout=30)
            elapsed = time.perf_counter() - started
            print(f"\nworker, {case}: {caught.value.code().name} in {elapsed * 1000:.1f} ms")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            error = dict(caught.value.trailing_metadata() or ())[ERROR_METADATA_KEY]
            carried = orjson.loads(error)
            assert carried["status"] == 400 and carried["param"] == "file" and carried["code"] == "invalid_audio"
            assert needle in carried["message"]
            assert elapsed < REFUSED_WITHIN_S


# --- the duration cap, on a mesh of its own with a short one -----------------------------

MAX_AUDIO_SECONDS = 2


@pytest.fixture(scope="module")
def short_audio(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    """Envoy, adapter, router and cache with gateway.max_audio_seconds of 2 and a hosted
    transcription model: the session mesh's body limit cannot hold a file past the default."""
    tmp = tmp_path_factory.mktemp("short_audio")
    config = core_mesh_config(
        mock_upstream,
        tmp,
        gateway={"max_audio_seconds": MAX_AUDIO_SECONDS},
        models=[{"name": "mock-whisper", "task": "transcription", "base_url": mock_upstream}],
    )
    with running_mesh(tmp, config, mock_upstream) as mesh:
        yield mesh


@pytest.mark.asyncio
async def test_audio_longer_than_the_cap_counted_on_its_samples_is_a_400(short_audio: Mesh) -> None:
    mesh = short_audio
    before = mesh.service_pids()
    three_seconds = wav(bytes(8000 * 3), rate=8000, bits=8)
    reply, elapsed, models_s = await transcribe_meanwhile(mesh, "mock-whisper", three_seconds)
    print(
        f"\n3 s of audio past a {MAX_AUDIO_SECONDS} s cap: {reply.status_code} in {elapsed * 1000:.1f} ms; "
        f"GET /v1/models meanwhile {models_s * 1000:.1f} ms"
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "file" and error["code"] == "audio_too_long"
    assert "3.0 seconds long; the limit is 2 seconds" in error["message"]
    assert elapsed < REFUSED_WITHIN_S and models_s < ANSWERED_WITHIN_S
    # A header that claims hours but holds one second is one second long: accepted.
    claims_hours = wav(bytes(8000), rate=8000, bits=8, data_size=0xFFFFFFFF)
    reply, _, _ = await transcribe_meanwhile(mesh, "mock-whisper", claims_hours)
    assert reply.status_code == 200, reply.text
    assert mesh.service_pids() == before


def test_the_config_key_is_checked(tmp_path: Path) -> None:
    from clawdbot.common.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("gateway: {max_audio_seconds: 0}\n")
    with pytest.raises(ConfigError, match="max_audio_seconds"):
        load_config(path, env={})
