"""Local embeddings (all-MiniLM-L6-v2 in the worker) through Envoy, with the openai SDK."""

from __future__ import annotations

import asyncio
import math
import re

import grpc
import httpx
import numpy as np
import openai
import pytest

from clawdbot.common.service import internal_channel
from clawdbot.gen.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]

MODEL = "all-minilm-l6-v2"


def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60)


def test_embeddings_are_384_dimensional_unit_vectors_that_know_paraphrases(local_models: Mesh) -> None:
    mesh = local_models
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    reply = client(mesh).embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert reply.usage.prompt_tokens > 0
    floats = client(mesh).embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[0], atol=1e-5)


def test_bad_input_is_a_clear_400(local_models: Mesh) -> None:
    mesh = local_models
    c = client(mesh)
    with pytest.raises(openai.BadRequestError, match="empty"):
        c.embeddings.create(model=MODEL, input=["fine", "   "])
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        c.embeddings.create(model=MODEL, input="word " * 400)
    with pytest.raises(openai.BadRequestError, match="384"):
        c.embeddings.create(model=MODEL, input="x", dimensions=128)


def worker_calls(mesh: Mesh) -> float:
    port = mesh.info()["ports"]["worker_http"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(r'clawdbot_worker_model_calls_total\{model="all-minilm-l6-v2"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.asyncio
async def test_concurrent_requests_share_model_calls_with_identical_results(local_models: Mesh) -> None:
    mesh = local_models
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(16)]
    alone = [
        client(mesh).embeddings.create(model=MODEL, input=t, encoding_format="float").data[0].embedding
        for t in texts[:3]
    ]
    before = worker_calls(mesh)
    async_client = openai.AsyncOpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60)
    replies = await asyncio.gather(
        *(async_client.embeddings.create(model=MODEL, input=t, encoding_format="float") for t in texts)
    )
    calls = worker_calls(mesh) - before
    assert 1 <= calls < len(texts), calls
    for single, batched in zip(alone, replies[:3], strict=False):
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(single, batched.data[0].embedding, strict=True))


@pytest.mark.asyncio
async def test_hot_model_update_under_load_fails_no_request(local_models: Mesh) -> None:
    mesh = local_models
    async_client = openai.AsyncOpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60)
    reloading = True
    outcomes: list[str] = []

    async def steady_load(worker: int) -> None:
        i = 0
        while reloading:
            try:
                reply = await async_client.embeddings.create(model=MODEL, input=f"load {worker} request {i}")
                outcomes.append("ok" if len(reply.data[0].embedding) == 384 else "wrong")
            except openai.OpenAIError as exc:
                outcomes.append(f"failed: {exc}")
            i += 1

    loaders = [asyncio.create_task(steady_load(w)) for w in range(4)]
    async with internal_channel(mesh.worker_target) as channel:
        stub = worker_pb2_grpc.ModelServiceStub(channel)
        reports = []
        for _ in range(4):
            reports.append(await stub.LoadModel(worker_pb2.LoadModelRequest(name=MODEL), timeout=120))
        # A load that cannot succeed leaves the serving version in place and says why.
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.LoadModel(worker_pb2.LoadModelRequest(name=MODEL, source="/nonexistent/minilm"), timeout=60)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "missing" in (failed.value.details() or "")
    served_during_reloads = len(outcomes)
    reloading = False
    await asyncio.gather(*loaders)

    assert served_during_reloads > 0
    assert all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"][:5]
    assert all(r.version == reports[0].version and r.load_ms > 0 for r in reports)
    state = mesh.worker_models()[MODEL]
    assert state["state"] == "ready" and state["version"] == reports[0].version
    assert "nonexistent" in state["detail"]  # the failed load is reported beside the serving version
