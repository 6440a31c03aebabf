"""Jobs without Kafka: the adapter runs them on an in-process queue, through a real router
against the mock provider, and says they are not durable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format

from clawdbot.adapter.server import create_server as create_adapter
from clawdbot.common.config import Config
from clawdbot.common.service import internal_channel
from clawdbot.devtools.mock_upstream import start_mock
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from clawdbot.router.server import create_server as create_router

KEY = "test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest_asyncio.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    # The adapter runs the jobs here, so it signs their callbacks: it does not start without a secret.
    monkeypatch.setenv("CLAWDBOT_CALLBACK_SECRET", "in-process-callback-secret")
    mock_runner, mock_port = await start_mock(models=["mock-1"])
    config = Config.model_validate(
        {
            "adapter": {"grpc_port": 0, "http_port": 0},
            "router": {"grpc_port": 0, "http_port": 0},
            "cache": {"enabled": False},
            "jobs": {"kafka_bootstrap": "", "backoff_s": 0.01},
            "models": [{"name": "mock-1", "base_url": f"http://127.0.0.1:{mock_port}/v1"}],
        }
    )
    router = create_router(config)
    await router.start()
    config = config.model_copy(update={"router": config.router.model_copy(update={"grpc_port": router.grpc_port})})
    adapter = create_adapter(config, api_keys=[KEY])
    await adapter.start()
    channel = internal_channel(f"127.0.0.1:{adapter.grpc_port}")
    try:
        yield gateway_pb2_grpc.GatewayStub(channel)
    finally:
        await channel.close()
        await adapter.stop(grace=1, drain_notice=0)
        await router.stop(grace=1, drain_notice=0)
        await mock_runner.cleanup()


async def until_finished(gateway: gateway_pb2_grpc.GatewayStub, job_id: str) -> gateway_pb2.Job:
    for _ in range(400):
        job = await gateway.GetJob(gateway_pb2.GetJobRequest(id=job_id), metadata=AUTH)
        if job.status in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.asyncio
async def test_jobs_run_in_process_and_say_they_are_not_durable(gateway: gateway_pb2_grpc.GatewayStub) -> None:
    request = gateway_pb2.SubmitJobRequest(kind="chat")
    json_format.ParseDict({"model": "mock-1", "messages": [{"role": "user", "content": "later"}]}, request.request)
    submitted = await gateway.SubmitJob(request, metadata=AUTH)
    assert submitted.status == "queued" and submitted.durable is False
    done = await until_finished(gateway, submitted.id)
    assert done.status == "succeeded" and not done.durable
    result = json_format.MessageToDict(done.result)
    assert result["choices"][0]["message"]["content"] == "Hello from mock-1: later"
    listed = await gateway.ListJobs(gateway_pb2.ListJobsRequest(limit=10), metadata=AUTH)
    assert [j.id for j in listed.data] == [submitted.id]


@pytest.mark.asyncio
async def test_failures_are_retried_then_reported(gateway: gateway_pb2_grpc.GatewayStub) -> None:
    request = gateway_pb2.SubmitJobRequest(kind="chat")
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "x"}], "mock": {"status": 503}}
    json_format.ParseDict(body, request.request)
    done = await until_finished(gateway, (await gateway.SubmitJob(request, metadata=AUTH)).id)
    assert done.status == "failed" and done.attempts == 3, json_format.MessageToDict(done.error)
    assert json_format.MessageToDict(done.error)["message"]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await gateway.GetJob(gateway_pb2.GetJobRequest(id="job_missing"), metadata=AUTH)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
