"""Jobs without Kafka: the adapter hands them to the jobs service, which keeps them in its
memory and runs them on its own in-process queue through a real router against the mock
provider, and says they are not durable. Real servers on ports from the OS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from google.protobuf import json_format

from clawdbot.adapter.server import create_server as create_adapter
from clawdbot.common.config import Config
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.devtools.mock_upstream import MOCK_KEY, MockUpstream, start_mock
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc, jobs_pb2, jobs_pb2_grpc, router_pb2
from clawdbot.jobs.server import create_server as create_jobs
from clawdbot.router.server import create_server as create_router
from tests.support import unused_port, wait_for_async

KEY = "test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


@dataclass
class JobsMesh:
    gateway: gateway_pb2_grpc.GatewayStub
    jobs: jobs_pb2_grpc.JobsStub  # the jobs service itself, as any internal caller reaches it
    mock: MockUpstream
    config: Config


async def _stop(*hosts: ServiceHost) -> None:
    for host in hosts:
        await host.stop(grace=1, drain_notice=0)


@pytest_asyncio.fixture
async def mesh(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JobsMesh]:
    # The jobs service delivers (and signs) callbacks: it does not start without a secret.
    monkeypatch.setenv("CLAWDBOT_CALLBACK_SECRET", "in-process-callback-secret")
    mock_runner, mock_port = await start_mock(models=["mock-1"])
    mock: MockUpstream = mock_runner.app[MOCK_KEY]
    config = Config.model_validate(
        {
            "adapter": {"grpc_port": 0, "http_port": 0},
            "router": {"grpc_port": 0, "http_port": 0},
            "jobs": {"grpc_port": 0, "http_port": 0, "kafka_bootstrap": "", "backoff_s": 0.01, "max_attempts": 3},
            "cache": {"enabled": False},
            "orchestrator": {"enabled": False},
            "health": {"enabled": False},
            "models": [{"name": "mock-1", "base_url": f"http://127.0.0.1:{mock_port}/v1"}],
        }
    )
    router = create_router(config)
    await router.start()
    config = config.model_copy(update={"router": config.router.model_copy(update={"grpc_port": router.grpc_port})})
    jobs = create_jobs(config)
    await jobs.start()
    config = config.model_copy(update={"jobs": config.jobs.model_copy(update={"grpc_port": jobs.grpc_port})})
    adapter = create_adapter(config, api_keys=[KEY])
    await adapter.start()
    gateway_channel = internal_channel(f"127.0.0.1:{adapter.grpc_port}")
    jobs_channel = internal_channel(f"127.0.0.1:{jobs.grpc_port}")
    try:
        yield JobsMesh(
            gateway_pb2_grpc.GatewayStub(gateway_channel), jobs_pb2_grpc.JobsStub(jobs_channel), mock, config
        )
    finally:
        await gateway_channel.close()
        await jobs_channel.close()
        await _stop(adapter, jobs, router)
        await mock_runner.cleanup()


async def submit(gateway: gateway_pb2_grpc.GatewayStub, body: dict[str, Any]) -> gateway_pb2.Job:
    request = gateway_pb2.SubmitJobRequest(kind="chat")
    json_format.ParseDict(body, request.request)
    return await gateway.SubmitJob(request, metadata=AUTH)


async def until_finished(gateway: gateway_pb2_grpc.GatewayStub, job_id: str) -> gateway_pb2.Job:
    async def finished() -> gateway_pb2.Job | None:
        job = await gateway.GetJob(gateway_pb2.GetJobRequest(id=job_id), metadata=AUTH)
        return job if job.status in ("succeeded", "failed") else None

    return await wait_for_async(finished, 30, f"job {job_id} to finish")


def upstream_calls(mock: MockUpstream, marker: str) -> int:
    return sum(1 for r in mock.requests() if r["path"].endswith("/chat/completions") and marker in str(r["body"]))


@pytest.mark.asyncio
async def test_jobs_run_in_the_jobs_service_and_say_they_are_not_durable(mesh: JobsMesh) -> None:
    submitted = await submit(mesh.gateway, {"model": "mock-1", "messages": [{"role": "user", "content": "later"}]})
    assert submitted.status == "queued" and submitted.durable is False
    done = await until_finished(mesh.gateway, submitted.id)
    assert done.status == "succeeded" and not done.durable and done.attempts == 1
    result = json_format.MessageToDict(done.result)
    assert result["choices"][0]["message"]["content"] == "Hello from mock-1: later"
    listed = await mesh.gateway.ListJobs(gateway_pb2.ListJobsRequest(limit=10), metadata=AUTH)
    assert [j.id for j in listed.data] == [submitted.id]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.gateway.GetJob(gateway_pb2.GetJobRequest(id="job_missing"), metadata=AUTH)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
async def test_an_upstream_failure_ends_the_job_after_the_routers_own_retries(mesh: JobsMesh) -> None:
    # The router retries the failing upstream; the job does not retry around it again.
    marker = "doomed-in-process"
    body = {"model": "mock-1", "messages": [{"role": "user", "content": marker}], "mock": {"status": 503}}
    done = await until_finished(mesh.gateway, (await submit(mesh.gateway, body)).id)
    assert done.status == "failed" and done.attempts == 1, json_format.MessageToDict(done.error)
    assert json_format.MessageToDict(done.error)["message"]
    calls = upstream_calls(mesh.mock, marker)
    assert 1 <= calls <= mesh.config.model_router.retry.max_attempts, calls


@pytest.mark.asyncio
async def test_a_router_that_cannot_be_reached_is_retried_up_to_the_jobs_attempts(mesh: JobsMesh) -> None:
    # A second jobs service whose router is nowhere: the call is never taken, so the job
    # tries again, jobs.max_attempts times in all, then says why it failed.
    nowhere = mesh.config.router.model_copy(update={"grpc_port": unused_port()})
    own_ports = mesh.config.jobs.model_copy(update={"grpc_port": 0, "http_port": 0})
    jobs = create_jobs(mesh.config.model_copy(update={"router": nowhere, "jobs": own_ports}))
    await jobs.start()
    channel = internal_channel(f"127.0.0.1:{jobs.grpc_port}")
    stub = jobs_pb2_grpc.JobsStub(channel)
    owner = router_pb2.RequestMeta(api_key_id="key_unreachable")
    try:
        request = {"model": "mock-1", "messages": [{"role": "user", "content": "hello?"}]}
        view = await stub.Submit(
            jobs_pb2.JobSubmission(meta=owner, kind="chat", request_json=orjson.dumps(request)), timeout=10
        )
        job_id = orjson.loads(view.json)["id"]

        async def finished() -> dict[str, Any] | None:
            reply = await stub.Get(jobs_pb2.JobLookup(meta=owner, request=gateway_pb2.GetJobRequest(id=job_id)))
            job: dict[str, Any] = orjson.loads(reply.json)
            return job if job["status"] in ("succeeded", "failed") else None

        done = await wait_for_async(finished, 30, "the job to give up on the router")
    finally:
        await channel.close()
        await _stop(jobs)
    assert done["status"] == "failed" and done["attempts"] == mesh.config.jobs.max_attempts
    assert done["error"]["code"] == "service_unavailable", done["error"]


async def _refusal(stub: jobs_pb2_grpc.JobsStub, submission: jobs_pb2.JobSubmission) -> dict[str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Submit(submission, timeout=10)
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    for key, value in refused.value.trailing_metadata() or ():
        if key == "clawdbot-error-bin":
            error: dict[str, Any] = orjson.loads(value)
            return error
    raise AssertionError("no error in the trailers")


@pytest.mark.asyncio
async def test_the_jobs_service_trusts_no_caller(mesh: JobsMesh) -> None:
    """What the adapter would have refused is refused by the jobs service too, before
    anything is recorded: a caller with the internal credential is no proof of a good job."""
    meta = router_pb2.RequestMeta(api_key_id="key_direct")
    chat = orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "x"}]})
    cases = [
        (jobs_pb2.JobSubmission(meta=meta, kind="painting", request_json=b"{}"), "kind"),
        (jobs_pb2.JobSubmission(meta=meta, kind="chat", request_json=b'"hi"'), "request"),
        (jobs_pb2.JobSubmission(meta=meta, kind="chat", request_json=b"{not json"), "request"),
        (jobs_pb2.JobSubmission(meta=meta, kind="chat", request_json=b'{"model": "mock-1"}'), "messages"),
        (jobs_pb2.JobSubmission(meta=meta, kind="workflow", request_json=b'{"input": {}}'), "request.name"),
        (jobs_pb2.JobSubmission(meta=meta, kind="chat", request_json=chat, callback_url="ftp://x"), "callback_url"),
        # A loopback receiver: callbacks reach public addresses only (jobs.callback_allow).
        (
            jobs_pb2.JobSubmission(meta=meta, kind="chat", request_json=chat, callback_url="http://127.0.0.1:9/"),
            "callback_url",
        ),
    ]
    for submission, param in cases:
        error = await _refusal(mesh.jobs, submission)
        assert error["status"] == 400 and error["param"] == param, (param, error)
    limit = mesh.config.gateway.max_request_bytes
    huge = orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "x" * limit}]})
    error = await _refusal(mesh.jobs, jobs_pb2.JobSubmission(meta=meta, kind="chat", request_json=huge))
    assert (error["status"], error["code"]) == (413, "request_too_large")
    listed = await mesh.jobs.List(jobs_pb2.JobListing(meta=meta, request=gateway_pb2.ListJobsRequest(limit=100)))
    assert list(listed.jobs) == []  # none of them was recorded


@pytest.mark.asyncio
async def test_another_keys_job_does_not_exist(mesh: JobsMesh) -> None:
    submitted = await submit(mesh.gateway, {"model": "mock-1", "messages": [{"role": "user", "content": "mine"}]})
    other = router_pb2.RequestMeta(api_key_id="key_someone_else")
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await mesh.jobs.Get(jobs_pb2.JobLookup(meta=other, request=gateway_pb2.GetJobRequest(id=submitted.id)))
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await mesh.jobs.List(jobs_pb2.JobListing(meta=other, request=gateway_pb2.ListJobsRequest(limit=10)))
    assert list(listed.jobs) == []


@pytest.mark.asyncio
async def test_the_in_process_run_continues_the_submitters_trace(mesh: JobsMesh) -> None:
    """The job's model call carries the trace the submission came with, as a Kafka record's
    headers carry it: the upstream sees the submitter's trace id."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    marker = "traced-in-process"
    request = gateway_pb2.SubmitJobRequest(kind="chat")
    json_format.ParseDict({"model": "mock-1", "messages": [{"role": "user", "content": marker}]}, request.request)
    traced = (*AUTH, ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"))
    submitted = await mesh.gateway.SubmitJob(request, metadata=traced)
    assert (await until_finished(mesh.gateway, submitted.id)).status == "succeeded"
    (call,) = [r for r in mesh.mock.requests() if marker in str(r["body"])]
    assert call["headers"]["traceparent"].split("-")[1] == trace_id


@pytest.mark.asyncio
async def test_a_callback_is_delivered_by_the_jobs_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Kafka too, the finished job is POSTed to its callback URL, signed."""
    monkeypatch.setenv("CLAWDBOT_CALLBACK_SECRET", "in-process-callback-secret")
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        await received.put(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    hook = web.AppRunner(app)
    await hook.setup()
    site = web.TCPSite(hook, "127.0.0.1", 0)
    await site.start()
    hook_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    mock_runner, mock_port = await start_mock(models=["mock-1"])
    config = Config.model_validate(
        {
            "router": {"grpc_port": 0, "http_port": 0},
            "jobs": {"grpc_port": 0, "http_port": 0, "kafka_bootstrap": "", "callback_allow": ["127.0.0.1"]},
            "orchestrator": {"enabled": False},
            "models": [{"name": "mock-1", "base_url": f"http://127.0.0.1:{mock_port}/v1"}],
        }
    )
    router = create_router(config)
    await router.start()
    config = config.model_copy(update={"router": config.router.model_copy(update={"grpc_port": router.grpc_port})})
    jobs = create_jobs(config)
    await jobs.start()
    channel = internal_channel(f"127.0.0.1:{jobs.grpc_port}")
    try:
        request = orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "call me"}]})
        view = await jobs_pb2_grpc.JobsStub(channel).Submit(
            jobs_pb2.JobSubmission(
                meta=router_pb2.RequestMeta(api_key_id="key_hook"),
                kind="chat",
                request_json=request,
                callback_url=f"http://127.0.0.1:{hook_port}/hook",
            ),
            timeout=10,
        )
        payload = orjson.loads(await asyncio.wait_for(received.get(), 30))
    finally:
        await channel.close()
        await _stop(jobs, router)
        await mock_runner.cleanup()
        await hook.cleanup()
    assert payload["id"] == orjson.loads(view.json)["id"] and payload["status"] == "succeeded"
    assert payload["durable"] is False
