"""Bad input and bad upstreams: the right status, OpenAI's error shape, services stay up."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Mesh
from tests.support import wait_for

pytestmark = pytest.mark.e2e

CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


def post(mesh: Mesh, path: str, key: str | None = "", **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key or mesh.api_key}"
    return httpx.post(f"{mesh.v1}{path}", headers=headers, timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_missing_and_wrong_key(mesh: Mesh) -> None:
    assert_openai_error(post(mesh, "/chat/completions", key=None, json=CHAT), 401, "invalid_api_key")
    assert_openai_error(post(mesh, "/chat/completions", key="wrong", json=CHAT), 401, "invalid_api_key")
    r = httpx.get(f"{mesh.v1}/models", timeout=30)
    assert_openai_error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mesh.v1, api_key="wrong", max_retries=0).models.list()


def test_malformed_json(mesh: Mesh) -> None:
    r = post(
        mesh,
        "/chat/completions",
        content=b'{"model": "mock-1", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert_openai_error(r, 400, "invalid_json")


def test_missing_and_wrongly_typed_fields(mesh: Mesh) -> None:
    error = assert_openai_error(post(mesh, "/chat/completions", json={"model": "mock-1"}), 400)
    assert error["param"] == "messages"
    error = assert_openai_error(post(mesh, "/chat/completions", json={**CHAT, "temperature": "warm"}), 400)
    assert error["param"] == "temperature"
    error = assert_openai_error(post(mesh, "/embeddings", json={"model": "mock-embed", "input": 3}), 400)
    assert error["param"] == "input"


def test_unknown_model(mesh: Mesh) -> None:
    assert_openai_error(
        post(mesh, "/chat/completions", json={**CHAT, "model": "no-such-model"}), 404, "model_not_found"
    )
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=True
        )


def test_oversize_body(mesh: Mesh) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    assert_openai_error(post(mesh, "/chat/completions", json=big), 413)


def test_unknown_route(mesh: Mesh) -> None:
    assert_openai_error(post(mesh, "/no/such/route", json={}), 404)


def test_upstream_rate_limit_keeps_retry_after(mesh: Mesh) -> None:
    r = post(mesh, "/chat/completions", json={**CHAT, "model": "mock-429", "mock": {"status": 429, "retry_after": 9}})
    assert_openai_error(r, 429, "rate_limit_exceeded")
    assert r.headers["retry-after"] == "9"


def test_upstream_unreachable(mesh: Mesh) -> None:
    assert_openai_error(post(mesh, "/chat/completions", json={**CHAT, "model": "dead-1"}), 502, "upstream_unreachable")


def test_upstream_timeout(mesh: Mesh) -> None:
    r = post(mesh, "/chat/completions", json={**CHAT, "model": "mock-impatient", "mock": {"delay_ms": 4000}})
    assert_openai_error(r, 504, "upstream_timeout")


def test_upstream_server_error(mesh: Mesh) -> None:
    assert_openai_error(
        post(mesh, "/chat/completions", json={**CHAT, "model": "mock-500", "mock": {"status": 500}}), 502
    )


def test_failure_mid_stream_is_an_sse_error_event(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0)
    stream = client.chat.completions.create(
        model="mock-drop",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        extra_body={"mock": {"drop_midstream": True}},
    )
    with pytest.raises(openai.APIError):
        list(stream)


def test_services_still_serve_after_all_that(mesh: Mesh) -> None:
    r = post(mesh, "/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text


def test_failures_are_logged_as_json_with_request_and_trace_ids(mesh: Mesh) -> None:
    r = post(mesh, "/chat/completions", json={**CHAT, "model": "dead-1"}, headers={"x-request-id": "log-check-1"})
    assert r.status_code == 502

    def logged() -> dict[str, Any] | None:
        for line in mesh.runner.output().splitlines():
            if line.startswith("{") and "log-check-1" in line:
                entry = json.loads(line)
                if entry.get("message") == "upstream call failed":
                    return entry
        return None

    # Elastic Common Schema names (common/logging.py); our own fields under "clawdbot".
    entry = wait_for(logged, 30, "the router's log line for the failed call")
    assert entry["service.name"] == "router" and entry["clawdbot"]["instance"] == "dead-1"
    assert entry["http.request.id"] == "log-check-1"
    assert len(entry["trace.id"]) == 32 and entry["log.level"] == "warning"
    # The runner prints the key once for the operator; no log line ever carries it.
    log_lines = [line for line in mesh.runner.output().splitlines() if line.startswith("{")]
    assert log_lines and not any(mesh.api_key in line for line in log_lines)
