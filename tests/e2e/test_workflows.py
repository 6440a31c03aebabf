"""Workflows through Envoy: parallel steps, branches, retries and error paths, nesting,
refused definitions, and the smart assistant end to end on the local models."""

from __future__ import annotations

import base64
import io
import json
import wave
from typing import Any

import httpx
import openai
import pytest

from tests import support
from tests.conftest import Mesh
from tests.support import wait_for

pytestmark = pytest.mark.e2e


def http(mesh: Mesh) -> httpx.Client:
    return httpx.Client(headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=180)


def run(mesh: Mesh, name: str, run_input: Any) -> dict[str, Any]:
    r = http(mesh).post(f"{mesh.v1}/workflows/{name}:run", json={"input": run_input})
    assert r.status_code == 200, r.text
    return dict(r.json())


def steps(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in result["steps"]}


def test_independent_steps_overlap_and_join(mesh: Mesh) -> None:
    result = run(mesh, "parallel_demo", {"topic": "tides"})
    assert result["status"] == "succeeded"
    assert result["output"] == ["Hello from mock-1: left tides", "Hello from mock-1: right tides"]
    left, right = steps(result)["left"], steps(result)["right"]
    assert left["started_at"] < right["ended_at"] and right["started_at"] < left["ended_at"]  # they overlapped
    assert left["instance"] == "mock-1" and left["duration_ms"] >= 400


def test_a_condition_picks_the_branch(mesh: Mesh) -> None:
    big, small = run(mesh, "branching", {"n": 9}), run(mesh, "branching", {"n": 2})
    assert (big["output"], small["output"]) == ("big 9", "small 2")
    assert steps(big)["small"]["status"] == "skipped" and steps(small)["big"]["status"] == "skipped"
    assert run(mesh, "nested", {"n": 7})["output"] == "big 7"


def test_a_failing_step_retries_then_takes_its_error_path(mesh: Mesh) -> None:
    result = run(mesh, "error_path", {})
    flaky = steps(result)["flaky"]
    assert flaky["status"] == "failed" and flaky["attempts"] == 2 and flaky["error"]["message"]
    assert result["status"] == "succeeded" and result["output"].startswith("fallback after ")


def test_definitions_are_listed_described_and_bad_ones_refused_clearly(mesh: Mesh) -> None:
    listed = http(mesh).get(f"{mesh.v1}/workflows").json()
    names = {w["name"] for w in listed["data"]}
    assert {"smart_assistant", "smart_assistant_bpmn", "parallel_demo", "branching", "error_path", "nested"} <= names
    assert not names & {"cyclic", "unknown_type", "missing_step", "bad_expression"}
    problems = "\n".join(listed["problems"])
    assert "cyclic" in problems and "cycle" in problems
    assert "unknown_type" in problems and "teleport" in problems
    assert "missing_step" in problems and "nowhere" in problems
    assert "bad_expression" in problems and "invalid expression" in problems
    assert "broken.bpmn: line 7: userTask `approve`" in problems
    described = http(mesh).get(f"{mesh.v1}/workflows/smart_assistant").json()
    assert {"from": "asr", "to": "intent"} in described["graph"]["edges"]
    assert [s["id"] for s in described["steps"]] == ["asr", "intent", "knowledge", "answer", "speech"]
    missing = http(mesh).post(f"{mesh.v1}/workflows/nope:run", json={"input": {}})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "workflow_not_found"


def test_workflows_over_grpc(mesh: Mesh) -> None:
    result = support.grpcurl(
        mesh.grpc_target,
        "clawdbot.v1.Gateway/RunWorkflow",
        data={"name": "branching", "input": {"n": 6}},
        headers=(f"authorization: Bearer {mesh.api_key}",),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == "big 6"


@pytest.mark.local_model
def test_the_smart_assistant_answers_a_spoken_question_with_speech(local_models: Mesh) -> None:
    mesh = local_models
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=120)
    question = client.audio.speech.create(
        model="espeak-ng", voice="alloy", input="turn on the kitchen lights", response_format="wav"
    ).read()

    def grounded() -> dict[str, Any] | None:
        # The knowledge base fills in the background once the embeddings model serves.
        result = run(mesh, "smart_assistant", {"audio": base64.b64encode(question).decode()})
        return result if steps(result)["knowledge"]["status"] == "succeeded" else None

    result = wait_for(grounded, 240, "a grounded answer", interval=2)
    assert result["status"] == "succeeded", result
    output = result["output"]
    assert "kitchen" in output["transcript"] and "lights" in output["transcript"]
    assert output["intent"] == "lights_on"
    assert output["answer"].strip() and output["sources"]
    audio = base64.b64decode(output["audio"])
    with wave.open(io.BytesIO(audio)) as wav:
        assert wav.getnframes() / wav.getframerate() > 0.3
    ran = steps(result)
    assert ran["intent"]["started_at"] < ran["knowledge"]["ended_at"]  # independent: side by side
    assert {ran[s]["instance"] for s in ("asr", "intent", "answer", "speech")} == {
        "pocketsphinx-en",
        "intent-classifier",
        "gemma-3-270m",
        "espeak-ng",
    }
    # The BPMN twin (config/workflows/smart_assistant_bpmn.bpmn) gives the same answer.
    twin = run(mesh, "smart_assistant_bpmn", {"audio": base64.b64encode(question).decode()})
    assert twin["status"] == "succeeded"
    assert twin["output"] == output
    assert [(s["id"], s["status"]) for s in twin["steps"]] == [(s["id"], s["status"]) for s in result["steps"]]
