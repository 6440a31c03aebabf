"""Workflow progress, streamed through Envoy: server-sent events (httpx), WebSocket frames
(aiohttp) and the typed gRPC stream (grpcurl) all carry the orchestrator's events, from
run.started to run.completed, which holds the same run a non-streamed call returns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import aiohttp
import httpx
import pytest

from tests import support
from tests.conftest import Mesh

pytestmark = pytest.mark.e2e

# Generous: two cores, a whole mesh and other tests' load.
TIMEOUT_S = 180


def http(mesh: Mesh) -> httpx.Client:
    return httpx.Client(headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=TIMEOUT_S)


def sse_events(lines: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, parsed data) for each server-sent event, as an SSE client reads them."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].lstrip())
    if data:
        events.append((name, json.loads("\n".join(data))))
    return events


def stream_run(mesh: Mesh, name: str, run_input: Any) -> list[dict[str, Any]]:
    """The events of one streamed run over SSE; checks each is named after its type."""
    with (
        http(mesh) as client,
        client.stream("POST", f"{mesh.v1}/workflows/{name}:run", json={"input": run_input, "stream": True}) as r,
    ):
        if r.status_code != 200:
            r.read()
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        named = sse_events(r.iter_lines())
    for event_name, event in named:
        assert event_name == event["type"], (event_name, event)
    return [event for _name, event in named]


def check_progress(events: list[dict[str, Any]], workflow: str, steps: list[str]) -> dict[str, Any]:
    """The shape every streamed run has; returns the run that run.completed carries."""
    assert events[0]["type"] == "run.started", events[0]
    assert events[0]["workflow"] == workflow and events[0]["steps"] == steps and "run_id" in events[0]
    assert events[-1]["type"] == "run.completed", events[-1]
    assert [e["type"] for e in events].count("run.completed") == 1
    mine = [e for e in events if e.get("workflow") == workflow]
    for step in steps:
        kinds = [e["type"] for e in mine if e.get("step") == step]
        assert "step.finished" in kinds, (step, kinds)
        if "step.started" in kinds:  # a skipped step may finish without starting
            assert kinds.index("step.started") < kinds.index("step.finished"), (step, kinds)
    run: dict[str, Any] = events[-1]["run"]
    assert run["workflow"] == workflow
    return run


def index_of(events: list[dict[str, Any]], kind: str, step: str) -> int:
    return next(i for i, e in enumerate(events) if e["type"] == kind and e.get("step") == step)


def test_sse_streams_every_step_and_ends_with_the_whole_run(mesh: Mesh) -> None:
    run_input = {"topic": "streams"}
    events = stream_run(mesh, "parallel_demo", run_input)
    run = check_progress(events, "parallel_demo", ["left", "right", "both"])
    for step in ("left", "right", "both"):  # every step here really runs
        assert index_of(events, "step.started", step) < index_of(events, "step.finished", step)
    started = events[index_of(events, "step.started", "left")]
    assert started["workflow"] == "parallel_demo" and started["step_type"] == "model" and started["attempt"] == 1
    left = events[index_of(events, "step.finished", "left")]
    assert left["status"] == "succeeded" and left["attempts"] == 1 and left["instance"] == "mock-1"
    assert left["duration_ms"] >= 400 and left["error"] is None
    # `both` needs the two model steps: it starts only once they have finished.
    both = index_of(events, "step.started", "both")
    assert index_of(events, "step.finished", "left") < both and index_of(events, "step.finished", "right") < both

    with http(mesh) as client:
        plain = client.post(f"{mesh.v1}/workflows/parallel_demo:run", json={"input": run_input})
        assert plain.status_code == 200, plain.text
        assert plain.headers["content-type"].startswith("application/json")
        also_plain = client.post(f"{mesh.v1}/workflows/parallel_demo:run", json={"input": run_input, "stream": False})
        assert also_plain.status_code == 200, also_plain.text
    for answer in (plain.json(), also_plain.json()):
        assert (run["status"], run["output"]) == (answer["status"], answer["output"])
        assert [(s["id"], s["status"]) for s in run["steps"]] == [(s["id"], s["status"]) for s in answer["steps"]]
    assert run["output"] == ["Hello from mock-1: left streams", "Hello from mock-1: right streams"]


def test_retries_and_sub_workflows_are_streamed_too(mesh: Mesh) -> None:
    events = stream_run(mesh, "error_path", {})
    run = check_progress(events, "error_path", ["flaky", "fallback"])
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert [e["step"] for e in retrying] == ["flaky"] and retrying[0]["error"], retrying
    assert index_of(events, "step.started", "flaky") < events.index(retrying[0])
    flaky = events[index_of(events, "step.finished", "flaky")]
    assert (flaky["status"], flaky["attempts"]) == ("failed", 2) and flaky["error"]
    assert run["status"] == "succeeded" and run["output"].startswith("fallback after ")

    events = stream_run(mesh, "nested", {"n": 7})
    run = check_progress(events, "nested", ["inner"])
    assert run["output"] == "big 7"
    # The sub-workflow's steps report under its own name, inside its parent's step.
    inner = [e for e in events if e.get("workflow") == "branching"]
    big = [e for e in inner if e.get("step") == "big"]
    assert [e["type"] for e in big] == ["step.started", "step.finished"] and big[-1]["status"] == "succeeded"
    assert any(e["type"] == "step.finished" and e.get("step") == "small" for e in inner)
    assert index_of(events, "step.started", "inner") < events.index(big[0])
    assert events.index(big[-1]) < index_of(events, "step.finished", "inner")


def test_a_streamed_run_that_cannot_start_gets_a_json_error(mesh: Mesh) -> None:
    with http(mesh) as client:
        missing = client.post(f"{mesh.v1}/workflows/nope:run", json={"input": {}, "stream": True})
        assert missing.status_code == 404, missing.text
        assert missing.headers["content-type"].startswith("application/json")
        assert missing.json()["error"]["code"] == "workflow_not_found"
        assert missing.json()["error"]["type"] == "invalid_request_error"
        bad = client.post(f"{mesh.v1}/workflows/branching:run", json={"input": {"n": 1}, "stream": "yes"})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == "stream"


def ws_url(mesh: Mesh) -> str:
    return mesh.url.replace("http://", "ws://") + "/v1/ws"


async def frames_until_finished(ws: aiohttp.ClientWebSocketResponse, ids: set[Any]) -> dict[Any, list[dict[str, Any]]]:
    """Every frame, by id, until each of ids has had its done or error frame."""
    frames: dict[Any, list[dict[str, Any]]] = {frame_id: [] for frame_id in ids}
    waiting = set(ids)
    while waiting:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT_S)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        assert frame.get("id") in frames, frame
        frames[frame["id"]].append(frame)
        if frame["type"] in ("done", "error"):
            waiting.discard(frame["id"])
    return frames


def chat_frame(frame_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "chat.completions",
        "id": frame_id,
        "body": {"model": "mock-1", "messages": [{"role": "user", "content": text}]},
    }


def chat_text(frames: list[dict[str, Any]]) -> str:
    chunks = [f["data"] for f in frames if f["type"] == "chat.completion.chunk"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.mark.asyncio
async def test_websocket_streams_workflow_progress_beside_a_chat(mesh: Mesh) -> None:
    headers = {"Authorization": f"Bearer {mesh.api_key}"}
    async with aiohttp.ClientSession(headers=headers) as session, session.ws_connect(ws_url(mesh)) as ws:
        await ws.send_json({"type": "workflow.run", "id": "w1", "name": "parallel_demo", "input": {"topic": "ws"}})
        # A chat on the same socket while the workflow runs.
        await ws.send_json(chat_frame("c1", "beside"))
        frames = await frames_until_finished(ws, {"w1", "c1"})

        workflow = frames["w1"]
        assert workflow[-1]["type"] == "done" and workflow[-1]["request_id"], workflow[-1]
        assert all(f["type"] == "workflow.event" for f in workflow[:-1])
        run = check_progress([f["data"] for f in workflow[:-1]], "parallel_demo", ["left", "right", "both"])
        assert run["status"] == "succeeded"
        assert run["output"] == ["Hello from mock-1: left ws", "Hello from mock-1: right ws"]
        assert frames["c1"][-1]["type"] == "done" and chat_text(frames["c1"]) == "Hello from mock-1: beside"

        # Failures are error frames for that request only; the socket stays usable.
        await ws.send_json({"type": "workflow.run", "id": "w2", "name": "nope", "input": {}})
        await ws.send_json({"type": "workflow.run", "id": "w3", "input": {}})
        await ws.send_json({"type": "teleport", "id": "x1"})
        frames = await frames_until_finished(ws, {"w2", "w3", "x1"})
        missing, nameless, unknown = frames["w2"][-1], frames["w3"][-1], frames["x1"][-1]
        assert missing["type"] == "error" and missing["status"] == 404, missing
        assert missing["error"]["code"] == "workflow_not_found"
        assert nameless["type"] == "error" and nameless["status"] == 400 and nameless["error"]["param"] == "name"
        assert unknown["status"] == 400 and "workflow.run" in unknown["error"]["message"]

        await ws.send_json({"type": "workflow.run", "id": "w4", "name": "branching", "input": {"n": 2}})
        await ws.send_json(chat_frame("c2", "still here"))
        frames = await frames_until_finished(ws, {"w4", "c2"})
        assert frames["w4"][-1]["type"] == "done"
        assert frames["w4"][-2]["data"]["run"]["output"] == "small 2"
        assert chat_text(frames["c2"]) == "Hello from mock-1: still here"
        assert not ws.closed


def grpc_messages(stdout: str) -> list[dict[str, Any]]:
    """grpcurl prints a stream's messages as JSON documents one after another."""
    decoder, messages, at = json.JSONDecoder(), list[dict[str, Any]](), 0
    while True:
        while at < len(stdout) and stdout[at].isspace():
            at += 1
        if at == len(stdout):
            return messages
        message, at = decoder.raw_decode(stdout, at)
        messages.append(message)


def test_grpc_stream_workflow_returns_the_events(mesh: Mesh) -> None:
    auth = (f"authorization: Bearer {mesh.api_key}",)
    result = support.grpcurl(
        mesh.grpc_target,
        "clawdbot.v1.Gateway/StreamWorkflow",
        data={"name": "branching", "input": {"n": 6}},
        headers=auth,
    )
    assert result.returncode == 0, result.stderr
    events = grpc_messages(result.stdout)
    run = check_progress(events, "branching", ["big", "small"])
    assert run["status"] == "succeeded" and run["output"] == "big 6"
    assert events[index_of(events, "step.finished", "small")]["status"] == "skipped"

    missing = support.grpcurl(
        mesh.grpc_target, "clawdbot.v1.Gateway/StreamWorkflow", data={"name": "nope", "input": {}}, headers=auth
    )
    assert missing.returncode != 0 and "NotFound" in missing.stderr, missing.stderr
