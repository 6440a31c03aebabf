"""A run's input is checked against what its workflow takes before any step runs."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from clawdbot.common.config import GatewayConfig
from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import router_pb2
from clawdbot.orchestrator.definitions import load_catalog
from clawdbot.orchestrator.engine import Engine

WORKFLOWS = Path(__file__).resolve().parents[2] / "config" / "workflows"


def wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    payload = bytes(2 * int(rate * seconds))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


class Models:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]:
        self.calls.append((task, body))
        return {"text": "ok", "data": [{"intent": "x"}], "choices": [{"message": {"content": "a"}}]}, "fake", "miss"


def engine(tmp_path: Path, workflows: dict[str, Any], models: Models, max_request_bytes: int = 1 << 20) -> Engine:
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"workflows": workflows}))
    catalog = load_catalog(tmp_path)
    assert not catalog.problems, catalog.problems
    return Engine(lambda: catalog, models, limits=GatewayConfig(max_request_bytes=max_request_bytes))


READS_A_FIELD = {"steps": [{"id": "a", "type": "model", "params": {"task": "chat"}, "input": {"q": "${input.q}"}}]}
TAKES_AUDIO = {
    "input": {"type": "object", "required": ["audio"], "properties": {"audio": {"type": "string", "format": "audio"}}},
    "steps": [{"id": "asr", "type": "model", "params": {"task": "transcription"}, "input": {"file": "${input.audio}"}}],
}
TAKES_A_STRING = {
    "input": {"type": "string"},
    "steps": [{"id": "a", "type": "transform", "params": {"value": "${input}"}}],
}


async def refused(run: Engine, name: str, run_input: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await run.run(name, run_input, router_pb2.RequestMeta())
    return caught.value


@pytest.mark.asyncio
@pytest.mark.parametrize("wrong", [5, "text", [1, 2], True, 2.5])
async def test_a_wrong_typed_input_is_a_400_naming_input_and_nothing_runs(tmp_path: Path, wrong: Any) -> None:
    models = Models()
    run = engine(tmp_path, {"reads": READS_A_FIELD}, models)
    err = await refused(run, "reads", wrong)
    assert (err.status, err.param, err.code) == (400, "input", "invalid_type")
    assert "takes an object" in err.message
    assert models.calls == []
    # Right type: it runs. No input at all reads as null fields, as it always has.
    assert (await run.run("reads", {"q": "hi"}, router_pb2.RequestMeta()))["status"] == "succeeded"
    assert (await run.run("reads", None, router_pb2.RequestMeta()))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_declared_types_are_enforced(tmp_path: Path) -> None:
    models = Models()
    run = engine(tmp_path, {"s": TAKES_A_STRING, "audio": TAKES_AUDIO}, models)
    assert (await refused(run, "s", {"a": 1})).message.endswith("takes a string, but got an object instead.")
    assert (await refused(run, "s", None)).code == "missing_required_parameter"
    assert (await run.run("s", "hello", router_pb2.RequestMeta()))["output"] == "hello"
    missing = await refused(run, "audio", {})
    assert (missing.param, missing.code) == ("input.audio", "missing_required_parameter")
    wrong = await refused(run, "audio", {"audio": 5})
    assert (wrong.param, wrong.code) == ("input.audio", "invalid_type")
    assert models.calls == []


@pytest.mark.asyncio
async def test_audio_inputs_are_decoded_within_the_limit_and_checked_within_the_bounds(tmp_path: Path) -> None:
    models = Models()
    run = engine(tmp_path, {"audio": TAKES_AUDIO}, models, max_request_bytes=64 * 1024)
    junk = await refused(run, "audio", {"audio": "this is not base64!"})
    assert (junk.status, junk.param, junk.code) == (400, "input.audio", "invalid_audio")
    too_big = await refused(run, "audio", {"audio": base64.b64encode(bytes(100_000)).decode()})
    assert (too_big.status, too_big.param, too_big.code) == (413, "input.audio", "request_too_large")
    odd_rate = await refused(run, "audio", {"audio": base64.b64encode(wav(rate=999_983)[:4000]).decode()})
    assert (odd_rate.status, odd_rate.param, odd_rate.code) == (400, "input.audio", "invalid_audio")
    assert "999983 Hz" in odd_rate.message
    assert models.calls == []
    good = base64.b64encode(wav()).decode()
    result = await run.run("audio", {"audio": good}, router_pb2.RequestMeta())
    assert result["status"] == "succeeded"
    assert models.calls == [("transcription", {"file": good, "model": "auto"})]


def test_the_shipped_workflows_say_what_they_take() -> None:
    catalog = load_catalog(WORKFLOWS)
    for name in ("smart_assistant", "smart_assistant_bpmn"):
        described = catalog.workflows[name].describe()["input"]
        assert described["type"] == "object" and described["required"] == ("audio",)
        assert described["properties"]["audio"] == {"type": "string", "format": "audio"}


def test_input_fields_only_describe_objects(tmp_path: Path) -> None:
    bad = {"input": {"type": "string", "required": ["x"]}, "steps": [{"id": "a", "type": "transform"}]}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"workflows": {"bad": bad}}))
    catalog = load_catalog(tmp_path)
    assert "bad" not in catalog.workflows
    assert "describe an object input" in "\n".join(catalog.problems)
