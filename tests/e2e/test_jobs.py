"""Async jobs over a real Kafka broker: submitted through Envoy to the jobs service, which
produces them to Kafka; its processes, one consumer group, run them through the router;
results in Redis and on clawdbot.results, failures in the DLQ."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from clawdbot.common import topics
from clawdbot.common.config import load_config
from tests.conftest import CALLBACK_SECRET, Mesh
from tests.support import wait_for, wait_for_async

pytestmark = pytest.mark.e2e


def bootstrap(mesh: Mesh) -> str:
    return f"127.0.0.1:{mesh.info()['ports']['kafka']}"


def client(mesh: Mesh) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=60, limits=httpx.Limits(max_connections=32)
    )


def chat_job(text: str, model: str = "mock-1", **extra: Any) -> dict[str, Any]:
    return {"kind": "chat", "request": {"model": model, "messages": [{"role": "user", "content": text}]}, **extra}


async def finished(http: httpx.AsyncClient, mesh: Mesh, job_id: str, within_s: float = 120) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        job = (await http.get(f"{mesh.v1}/jobs/{job_id}")).json()
        return job if job["status"] in ("succeeded", "failed") else None

    return await wait_for_async(done, within_s, f"job {job_id} to finish")


async def topic_values(mesh: Mesh, topic: str, want: int = 1, within_s: float = 60) -> list[dict[str, Any]]:
    """Every message on a topic (from the start), once at least `want` are there."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap(mesh), group_id=f"test-{uuid.uuid4().hex}", auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[dict[str, Any]] = []
    try:
        deadline = asyncio.get_running_loop().time() + within_s
        while asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            values += [orjson.loads(r.value) for records in batches.values() for r in records]
            if len(values) >= want and not batches:
                break
    finally:
        await consumer.stop()
    return values


@pytest_asyncio.fixture
async def jobs_redis(mesh: Mesh) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis(port=mesh.info()["ports"]["redis"])
    yield r
    await r.aclose()


@pytest.mark.asyncio
async def test_a_job_runs_and_its_result_is_kept(mesh: Mesh) -> None:
    async with client(mesh) as http:
        r = await http.post(f"{mesh.v1}/jobs", json=chat_job("as a job"))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and job["durable"] is True and r.headers["location"] == f"/v1/jobs/{job['id']}"
        done = await finished(http, mesh, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 1
        assert done["result"]["choices"][0]["message"]["content"] == "Hello from mock-1: as a job"
        listed = (await http.get(f"{mesh.v1}/jobs", params={"limit": 5})).json()
        assert job["id"] in [j["id"] for j in listed["data"]]
        assert (await http.get(f"{mesh.v1}/jobs/job_nope")).status_code == 404
    results = await topic_values(mesh, topics.RESULTS)
    assert any(v["id"] == job["id"] and v["status"] == "succeeded" for v in results)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"kind": "painting", "request": {}}, "kind"),
        ({"kind": "chat", "request": {"model": "mock-1"}}, "messages"),
        ({"kind": "chat", "request": "hi"}, "request"),
        ({**chat_job("x"), "callback_url": "ftp://example"}, "callback_url"),
        ({"kind": "transcription", "request": {"model": "pocketsphinx-en", "file": "not base64!"}}, "request.file"),
    ],
)
async def test_bad_jobs_are_refused_before_they_are_queued(mesh: Mesh, body: dict[str, Any], param: str) -> None:
    async with client(mesh) as http:
        r = await http.post(f"{mesh.v1}/jobs", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.asyncio
async def test_a_job_that_always_fails_ends_in_the_dlq(mesh: Mesh) -> None:
    async with client(mesh) as http:
        body = chat_job("doomed", model="mock-500")
        body["request"]["mock"] = {"status": 500}
        job = (await http.post(f"{mesh.v1}/jobs", json=body)).json()
        done = await finished(http, mesh, job["id"])
    # The router retried the upstream; the job does not retry around it (common/retry.py).
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["type"] and done["error"]["message"]
    dead = await topic_values(mesh, topics.DLQ)
    assert any(v.get("job", {}).get("id") == job["id"] for v in dead)


async def upstream_calls(http: httpx.AsyncClient, mesh: Mesh, marker: str) -> int:
    """Chat calls the mock provider received carrying the marker."""
    recorded = (await http.get(f"{mesh.mock_url.removesuffix('/v1')}/_mock/requests")).json()
    return sum(1 for r in recorded if r["path"].endswith("/chat/completions") and marker in json.dumps(r["body"]))


@pytest.mark.asyncio
async def test_retries_do_not_multiply_one_job_calls_a_failing_upstream_at_most_the_routers_attempts(
    mesh: Mesh,
) -> None:
    """One async job against an upstream that always fails, through Envoy, Kafka, a jobs
    consumer and the router: the router makes its model_router.retry.max_attempts calls and
    the job ends there, rather than jobs.max_attempts times that (9 with these settings)."""
    config = load_config(mesh.config_file)
    router_attempts, job_attempts = config.model_router.retry.max_attempts, config.jobs.max_attempts
    assert job_attempts > 1 and router_attempts > 1  # else the product could not tell
    marker = f"count-{uuid.uuid4().hex}"
    async with client(mesh) as http:
        body = chat_job(marker, model="mock-job-500")
        body["request"]["mock"] = {"status": 500}
        job = (await http.post(f"{mesh.v1}/jobs", json=body)).json()
        done = await finished(http, mesh, job["id"])
        calls = await upstream_calls(http, mesh, marker)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"]["code"] == "upstream_error", done["error"]
    # Each call went out: the router retried the 500s (at most its attempts; fewer only if
    # the instance's breaker opened meanwhile), and never more across the job's attempts.
    assert 1 <= calls <= router_attempts < router_attempts * job_attempts, calls


@pytest.mark.asyncio
async def test_malformed_messages_go_to_the_dlq(mesh: Mesh) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(mesh), acks="all")
    await producer.start()
    marker = uuid.uuid4().hex
    try:
        await producer.send_and_wait(topics.JOBS, f"not json {marker}".encode(), key=b"garbage")
    finally:
        await producer.stop()

    async def in_dlq() -> list[dict[str, Any]] | None:
        found = [v for v in await topic_values(mesh, topics.DLQ, within_s=5) if marker in v.get("payload", "")]
        return found or None

    (entry,) = await wait_for_async(in_dlq, 60, "the malformed message in the DLQ")
    assert entry["error"]["code"] == "malformed_job"


@pytest.mark.asyncio
async def test_the_callback_arrives_signed(mesh: Mesh) -> None:
    received: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        await received.put((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with client(mesh) as http:
            body = chat_job("call me back", callback_url=f"http://127.0.0.1:{port}/hook")
            job = (await http.post(f"{mesh.v1}/jobs", json=body)).json()
        payload, headers = await asyncio.wait_for(received.get(), 60)
    finally:
        await runner.cleanup()
    expected = "sha256=" + hmac.new(CALLBACK_SECRET.encode(), payload, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-clawdbot-signature"], expected)
    sent = json.loads(payload)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded"


def spans(mesh: Mesh, service: str) -> list[dict[str, Any]]:
    path = mesh.traces_dir / f"{service}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.asyncio
async def test_one_trace_spans_submit_consumer_and_model_call(mesh: Mesh) -> None:
    trace_id = uuid.uuid4().hex
    async with client(mesh) as http:
        r = await http.post(
            f"{mesh.v1}/jobs",
            json=chat_job("trace the job"),
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        await finished(http, mesh, r.json()["id"])
    for service, kind in (("adapter", "SERVER"), ("jobs", "CONSUMER"), ("router", "SERVER")):
        found = wait_for(
            lambda service=service, kind=kind: [  # type: ignore[misc]
                s for s in spans(mesh, service) if s["trace_id"] == trace_id and s["kind"] == kind
            ],
            30,
            f"a {kind} span of {service} in the trace",
        )
        assert found


@pytest.mark.asyncio
async def test_a_thousand_jobs_survive_a_consumer_killed_mid_run(mesh: Mesh, jobs_redis: aioredis.Redis) -> None:
    marker = uuid.uuid4().hex[:8]
    async with client(mesh) as http:
        gate = asyncio.Semaphore(32)

        async def submit(i: int) -> str:
            async with gate:
                r = await http.post(f"{mesh.v1}/jobs", json=chat_job(f"bulk {marker} {i}", mock={"delay_ms": 20}))
                assert r.status_code == 202, r.text
                return str(r.json()["id"])

        ids = await asyncio.gather(*(submit(i) for i in range(1000)))

        async def progress() -> int:
            jobs = await jobs_redis.mget([f"clawdbot:job:{i}" for i in ids[::10]])
            return sum(1 for raw in jobs if raw and json.loads(raw)["status"] == "succeeded")

        # Kill one consumer outright once the work is under way.
        await wait_for_async(lambda: _at_least(progress, 10), 120, "the jobs to get going")
        os.kill(mesh.info()["services"]["jobs-1"]["pid"], signal.SIGKILL)

        async def all_done() -> bool:
            raws = await jobs_redis.mget([f"clawdbot:job:{i}" for i in ids])
            return all(raw and json.loads(raw)["status"] in ("succeeded", "failed") for raw in raws)

        await wait_for_async(all_done, 300, "all 1000 jobs to finish")
    raws = await jobs_redis.mget([f"clawdbot:job:{i}" for i in ids])
    assert all(json.loads(raw)["status"] == "succeeded" for raw in raws)
    async with jobs_redis.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.hget(f"clawdbot:job:{i}:results", "stored")
        stored = await pipe.execute()
    assert {int(s) for s in stored} == {1}  # each result stored exactly once
    dead = await topic_values(mesh, topics.DLQ, within_s=5)
    assert not {v.get("job", {}).get("id") for v in dead} & set(ids)


async def _at_least(progress: Any, n: int) -> bool:
    return bool(await progress() >= n)


@pytest.mark.asyncio
async def test_every_accepted_job_completes_across_a_broker_restart(mesh: Mesh) -> None:
    accepted: list[str] = []
    refused = 0
    marker = uuid.uuid4().hex[:8]
    async with client(mesh) as http:

        async def submit(i: int) -> None:
            nonlocal refused
            r = await http.post(f"{mesh.v1}/jobs", json=chat_job(f"restart {marker} {i}"))
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            else:
                assert r.status_code == 503, r.text  # not taken: said so, nothing half-done
                refused += 1

        await asyncio.gather(*(submit(i) for i in range(50)))
        # The runner restarts a broker that stops; its data survives on disk. Submissions
        # while it is away wait for it or are refused.
        os.kill(mesh.info()["services"]["kafka"]["pid"], signal.SIGTERM)
        await asyncio.gather(*(submit(i) for i in range(50, 80)))
        wait_for(lambda: mesh.info()["services"]["kafka"]["restarts"] >= 1, 180, "the broker to be restarted")
        await asyncio.gather(*(submit(i) for i in range(80, 130)))
        for job_id in accepted:
            assert (await finished(http, mesh, job_id, within_s=240))["status"] == "succeeded"
    assert len(accepted) >= 50


@pytest.mark.asyncio
async def test_every_model_call_is_observed_on_the_telemetry_topic(mesh: Mesh) -> None:
    trace_id = uuid.uuid4().hex
    async with client(mesh) as http:
        r = await http.post(
            f"{mesh.v1}/chat/completions",
            json={"model": "mock-1", "messages": [{"role": "user", "content": "observe me"}]},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        assert r.status_code == 200

    async def observed() -> list[dict[str, Any]] | None:
        found = [v for v in await topic_values(mesh, topics.TELEMETRY, within_s=3) if v["trace_id"] == trace_id]
        return found or None

    (seen,) = await wait_for_async(observed, 60, "the call's observation on clawdbot.telemetry")
    assert seen["instance"] == "mock-1" and seen["task"] == "chat" and seen["status"] == "ok"
    assert seen["latency_s"] > 0 and seen["input_tokens"] > 0 and seen["output_tokens"] > 0
    assert seen["cost_usd"] > 0 and seen["api_key_id"].startswith("key_")


@pytest.mark.asyncio
async def test_a_workflow_runs_as_a_job(mesh: Mesh) -> None:
    async with client(mesh) as http:
        body = {"kind": "workflow", "request": {"name": "branching", "input": {"n": 8}}}
        job = (await http.post(f"{mesh.v1}/jobs", json=body)).json()
        done = await finished(http, mesh, job["id"])
        assert done["status"] == "succeeded" and done["result"]["output"] == "big 8"
        assert [s["id"] for s in done["result"]["steps"]] == ["big", "small"]
        refused = await http.post(f"{mesh.v1}/jobs", json={"kind": "workflow", "request": {"input": {}}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "request.name"
