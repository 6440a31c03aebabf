"""One trace through every service: a run of the smart assistant through Envoy is one
trace, from the request id Envoy assigned through the adapter, the orchestrator, the
cache, the router and the worker, every span linked to its parent; read back from the
JSON-lines span files (telemetry.traces_dir) and the services' logs."""

from __future__ import annotations

import base64
import json
from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Mesh
from tests.support import wait_for

pytestmark = pytest.mark.e2e

SERVICES = ("adapter", "orchestrator", "cache", "router", "worker")


def spans_of(mesh: Mesh, trace_id: str) -> list[dict[str, Any]]:
    """The spans of one trace, from every service's span file."""
    found = []
    for path in mesh.traces_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                span = json.loads(line)
                if span["trace_id"] == trace_id:
                    found.append(span)
    return found


def service(span: dict[str, Any]) -> str:
    return str(span["service"]).removeprefix("clawdbot-")


def log_lines(mesh: Mesh) -> list[dict[str, Any]]:
    """The mesh's JSON log lines (services and Envoy write to the runner's output)."""
    lines = []
    for line in mesh.runner.output().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line another process's output cut in two
    return lines


@pytest.mark.local_model
def test_a_smart_assistant_run_is_one_trace_through_every_service(local_models: Mesh) -> None:
    mesh = local_models
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=120)
    question = client.audio.speech.create(
        model="espeak-ng", voice="alloy", input="turn on the kitchen lights", response_format="wav"
    ).read()

    # No traceparent from the client: the trace starts at the gateway.
    reply = httpx.post(
        f"{mesh.v1}/workflows/smart_assistant:run",
        headers=mesh.auth_headers,
        json={"input": {"audio": base64.b64encode(question).decode()}},
        timeout=240,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "succeeded", reply.json()
    request_id = reply.headers["x-request-id"]  # what Envoy assigned, echoed to the caller

    def root() -> dict[str, Any] | None:
        path = mesh.traces_dir / "adapter.jsonl"
        candidates = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return next((s for s in candidates if s["attributes"].get("clawdbot.request_id") == request_id), None)

    first = wait_for(root, 30, "the adapter's span of the run")
    trace_id = first["trace_id"]

    def whole_trace() -> list[dict[str, Any]] | None:
        # Services export in batches: wait until every service's spans are in and every
        # parent has arrived (a parent ends, and so is written, after its children).
        spans = spans_of(mesh, trace_id)
        ids = {s["span_id"] for s in spans}
        complete = all(s["parent_span_id"] is None or s["parent_span_id"] in ids for s in spans)
        return spans if complete and {service(s) for s in spans} >= set(SERVICES) else None

    spans = wait_for(whole_trace, 60, f"spans of trace {trace_id} from {', '.join(SERVICES)}")
    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans)  # no span written twice

    # One root: the adapter's server span of the call Envoy made, carrying Envoy's id.
    [top] = [s for s in spans if s["parent_span_id"] is None]
    assert service(top) == "adapter" and top["kind"] == "SERVER"
    assert top["name"].startswith("clawdbot.v1.Gateway/")
    assert top["attributes"]["clawdbot.request_id"] == request_id
    assert top["attributes"]["rpc.system"] == "grpc" and top["attributes"]["rpc.grpc.status_code"] == 0

    def parent(span: dict[str, Any]) -> dict[str, Any]:
        return by_id[span["parent_span_id"]]

    # Every hop's server span is the child of its caller's span, in the caller's service.
    servers = [s for s in spans if s["kind"] == "SERVER" and s is not top]
    callers = Counter((service(parent(s)), service(s)) for s in servers)
    assert set(callers) == {
        ("adapter", "orchestrator"),
        ("orchestrator", "cache"),
        ("orchestrator", "router"),
        ("router", "worker"),
    }, callers
    for span in servers:
        assert span["attributes"]["rpc.system"] == "grpc"
        # The request id travelled with every call.
        assert span["attributes"]["clawdbot.request_id"] == request_id, span["name"]
    # The orchestrator's calls come from the step that made them...
    steps = {s["attributes"]["clawdbot.step"]: s for s in spans if s["name"].startswith("workflow step ")}
    assert {"asr", "intent", "knowledge", "answer", "speech"} <= set(steps)
    [run] = [s for s in servers if service(s) == "orchestrator"]
    assert all(parent(step) is run for step in steps.values())
    for span in servers:
        if service(span) in ("cache", "router") and service(parent(span)) == "orchestrator":
            assert parent(span)["name"].startswith("workflow step "), span["name"]
    # ...and the worker's from the router's call to the model instance.
    for span in (s for s in servers if service(s) == "worker"):
        upstream = parent(span)
        assert upstream["kind"] == "CLIENT" and upstream["attributes"]["gen_ai.request.model"], upstream
        assert service(parent(upstream)) == "router" and parent(upstream)["kind"] == "SERVER"
    models = {parent(s)["attributes"]["gen_ai.request.model"] for s in servers if service(s) == "worker"}
    assert {"pocketsphinx-en", "intent-classifier"} <= models  # never cached: always reach the worker

    # The same id in the logs, with the trace id: Envoy's access log line, and the line the
    # orchestrator writes for the run (two hops from Envoy: the id travelled as metadata).
    def logged() -> tuple[dict[str, Any], dict[str, Any]] | None:
        lines = log_lines(mesh)
        envoy = [line for line in lines if line.get("request_id") == request_id]
        ended = [
            line
            for line in lines
            if line.get("http.request.id") == request_id and line.get("message") == "workflow run ended"
        ]
        return (envoy[0], ended[0]) if envoy and ended else None

    access, ended = wait_for(logged, 30, f"log lines with request id {request_id}")
    assert access["path"].startswith("/v1/workflows/smart_assistant")
    assert ended["service.name"] == "orchestrator" and ended["trace.id"] == trace_id
    assert ended["clawdbot"]["workflow"] == "smart_assistant" and ended["clawdbot"]["status"] == "succeeded"
    # Whatever else was logged while serving it carries the same trace.
    ours = [line for line in log_lines(mesh) if line.get("http.request.id") == request_id]
    assert {line["trace.id"] for line in ours} == {trace_id}, ours
