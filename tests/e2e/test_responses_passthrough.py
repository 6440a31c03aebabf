"""The Responses pass-through through Envoy, with the official openai SDK: a model whose
upstream serves OpenAI's Responses API (`responses_api: true`, the mock) gets the caller's
own body at /v1/responses (byte for byte but the model), its answers and events are
relayed under the gateway's response id, and the response is stored (Redis) and
retrievable by that id afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

MODEL = "mock-rsp"
UPSTREAM = "mock-rsp-passthrough"


@pytest.fixture(scope="module")
def passthrough_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("responses-passthrough")
    # Redis on (the runner starts one): the responses are stored there.
    config = core_mesh_config(mock_upstream, tmp, cache={"object_dir": str(tmp / "objects")})
    config["models"] = [
        *config["models"],
        {"name": MODEL, "task": "chat", "base_url": mock_upstream, "upstream_model": UPSTREAM, "responses_api": True},
    ]
    with running_mesh(tmp, config, mock_upstream) as mesh:
        yield mesh


def sdk(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60)


def upstream_request(mesh: Mesh) -> dict[str, Any]:
    """The last request the mock received for the pass-through model."""
    base = mesh.mock_url.removesuffix("/v1")
    reply = httpx.get(f"{base}/_mock/last", params={"model": UPSTREAM}, timeout=30)
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = reply.json()
    return found


def test_create_plain_passes_the_body_through(passthrough_mesh: Mesh) -> None:
    mesh = passthrough_mesh
    # The caller's bytes, odd spacing and an unknown field included.
    raw = (
        b'{ "model" : "mock-rsp",\n "input": "byte for byte", "instructions": "Be brief.",'
        b' "x_vendor_field": {"keep": [1, 2.50]}, "metadata": {"k": "v"} }'
    )
    reply = httpx.post(
        f"{mesh.v1}/responses",
        content=raw,
        headers={**mesh.auth_headers, "Content-Type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    sent = upstream_request(mesh)
    assert (sent["method"], sent["path"]) == ("POST", "/v1/responses")
    assert sent["body_raw"].encode() == raw.replace(b'"model" : "mock-rsp"', f'"model" : "{UPSTREAM}"'.encode(), 1)
    # The gateway's own credentials for the provider, never the caller's key.
    assert mesh.api_key not in sent["headers"].get("authorization", "")
    answer = reply.json()
    assert answer["output"][0]["content"][0]["text"] == f"Hello from {UPSTREAM}: byte for byte"

    # The SDK parses the relayed answer; the id is the gateway's, and it is stored.
    client = sdk(mesh)
    response = client.responses.create(model=MODEL, input="hello there", instructions="Be brief.")
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == f"Hello from {UPSTREAM}: hello there"
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    sent = upstream_request(mesh)
    assert sent["path"] == "/v1/responses"
    assert sent["body"]["input"] == "hello there" and sent["body"]["instructions"] == "Be brief."
    assert sent["body"]["model"] == UPSTREAM
    retrieved = client.responses.retrieve(response.id)
    assert retrieved.id == response.id and retrieved.output_text == response.output_text


def test_create_streamed_passes_the_events_through(passthrough_mesh: Mesh) -> None:
    mesh = passthrough_mesh
    client = sdk(mesh)
    kinds: list[str] = []
    sequence: list[int] = []
    with client.responses.stream(model=MODEL, input="stream me please") as stream:
        for event in stream:
            kinds.append(event.type)
            sequence.append(event.sequence_number)
        final = stream.get_final_response()
    assert final.output_text == f"Hello from {UPSTREAM}: stream me please"
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens > 0
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert sequence == list(range(len(sequence)))
    sent = upstream_request(mesh)
    assert sent["path"] == "/v1/responses"
    assert sent["body"]["stream"] is True and sent["body"]["input"] == "stream me please"
    # Stored under the gateway's id, as a translated stream is.
    retrieved = client.responses.retrieve(final.id)
    assert retrieved.id == final.id and retrieved.output_text == final.output_text

    # A conversation continued by previous_response_id is translated (the upstream never
    # saw our ids): it reaches the mock's Chat route, with the earlier turn.
    follow = client.responses.create(model=MODEL, input="and again", previous_response_id=final.id)
    assert follow.output_text == f"Hello from {UPSTREAM}: and again"
    sent = upstream_request(mesh)
    assert sent["path"] == "/v1/chat/completions"
    assert [m["role"] for m in sent["body"]["messages"]] == ["user", "assistant", "user"]
