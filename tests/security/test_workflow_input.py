"""A workflow run with an input of the wrong type (`{"input": 5}` for a workflow that reads
fields of an object), through Envoy on every protocol: refused with a 400 naming `input`
before any step runs, never run; a GET /v1/models sent meanwhile is answered; the
services are the ones the mesh started with."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import httpx
import pytest
import websockets
from google.protobuf import struct_pb2

from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import Mesh
from tests.support import timed, wait_for_async

pytestmark = pytest.mark.e2e

REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0


# (workflow, the wrong input, what the message says it takes): smart_assistant declares an
# object with `audio`; parallel_demo (tests/e2e/workflows) reads `input.topic`, so it takes
# an object too, inferred.
WRONG = [
    ("smart_assistant", 5, "an object", "an integer"),
    ("smart_assistant", "hello", "an object", "a string"),
    ("smart_assistant", [1, 2], "an object", "an array"),
    ("parallel_demo", 5, "an object", "an integer"),
    ("parallel_demo", True, "an object", "a boolean"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("workflow", "wrong", "takes", "got"), WRONG)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_wrong_typed_input_is_a_400_over_rest(
    mesh: Mesh, workflow: str, wrong: Any, takes: str, got: str, stream: bool
) -> None:
    before = mesh.service_pids()
    async with httpx.AsyncClient(timeout=30, headers=mesh.auth_headers) as client:
        (reply, elapsed), (models, models_s) = await asyncio.gather(
            timed(client.post(f"{mesh.v1}/workflows/{workflow}:run", json={"input": wrong, "stream": stream})),
            timed(client.get(f"{mesh.v1}/models")),
        )
    print(
        f"\n{workflow} with {wrong!r}: {reply.status_code} in {elapsed * 1000:.1f} ms; models {models_s * 1000:.1f} ms"
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "input" and error["code"] == "invalid_type"
    assert f"takes {takes}, but got {got} instead" in error["message"]
    assert models.status_code == 200
    assert elapsed < REFUSED_WITHIN_S and models_s < ANSWERED_WITHIN_S
    assert mesh.service_pids() == before


@pytest.mark.asyncio
async def test_a_required_field_missing_is_a_400_naming_it(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=30, headers=mesh.auth_headers) as client:
        reply = await client.post(f"{mesh.v1}/workflows/smart_assistant:run", json={"input": {"text": "hi"}})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "input.audio"
        reply = await client.post(f"{mesh.v1}/workflows/smart_assistant:run", json={})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "input", reply.text
        # Its description says what it takes.
        described = (await client.get(f"{mesh.v1}/workflows/smart_assistant")).json()
        assert described["input"]["required"] == ["audio"]


@pytest.mark.asyncio
async def test_a_wrong_typed_input_over_grpc_and_the_websocket(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.WorkflowRunRequest(name="smart_assistant", input=struct_pb2.Value(number_value=5))
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RunWorkflow(request, metadata=(("authorization", f"Bearer {mesh.api_key}"),), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert "'input'" in (caught.value.details() or "")
        assert time.perf_counter() - started < REFUSED_WITHIN_S
    url = mesh.url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers=mesh.auth_headers) as ws:
        await ws.send(json.dumps({"type": "workflow.run", "id": "w", "name": "parallel_demo", "input": 5}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert frame["id"] == "w" and frame["type"] == "error" and frame["status"] == 400, frame
        assert frame["error"]["param"] == "input"
        # The socket stays usable: the same workflow with the right input runs.
        await ws.send(json.dumps({"type": "workflow.run", "id": "ok", "name": "branching", "input": {"n": 1}}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "done":
            assert frame["type"] == "workflow.event", frame


@pytest.mark.asyncio
async def test_a_workflow_job_with_a_wrong_input_fails_once_and_is_not_retried(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=30, headers=mesh.auth_headers) as client:
        reply = await client.post(
            f"{mesh.v1}/jobs", json={"kind": "workflow", "request": {"name": "parallel_demo", "input": 5}}
        )
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["id"]

        async def finished() -> dict[str, Any] | None:
            job: dict[str, Any] = (await client.get(f"{mesh.v1}/jobs/{job_id}")).json()
            return job if job["status"] in ("succeeded", "failed") else None

        job = await wait_for_async(finished, 60, f"job {job_id} to finish")
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"]["param"] == "input" and job["error"]["code"] == "invalid_type"
