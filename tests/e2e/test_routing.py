"""Routing through Envoy: explained choices, accounted cost, strategies, feedback."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Mesh
from tests.e2e.test_grpc_and_ws import grpcurl

pytestmark = pytest.mark.e2e


def client(mesh: Mesh) -> httpx.Client:
    return httpx.Client(timeout=60, headers={"Authorization": f"Bearer {mesh.api_key}"})


def chat(mesh: Mesh, **extra: Any) -> httpx.Response:
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "route"}], **extra}
    return client(mesh).post(f"{mesh.v1}/chat/completions", json=body)


def test_responses_name_instance_strategy_and_cost(mesh: Mesh) -> None:
    r = chat(mesh)
    assert r.status_code == 200, r.text
    assert r.headers["x-clawdbot-model-instance"] == "mock-1"
    assert r.headers["x-clawdbot-strategy"] == "performance_first"
    usage = r.json()["usage"]
    expected = (usage["prompt_tokens"] * 0.0005 + usage["completion_tokens"] * 0.0015) / 1000
    assert float(r.headers["x-clawdbot-cost-usd"]) == pytest.approx(expected, rel=1e-3)


def test_strategy_from_body_field_is_not_forwarded(mesh: Mesh) -> None:
    r = chat(mesh, clawdbot={"strategy": "quality_first"}, messages=[{"role": "user", "content": "body-strategy"}])
    assert r.status_code == 200, r.text
    assert r.headers["x-clawdbot-strategy"] == "quality_first"
    seen = httpx.get(mesh.mock_url.removesuffix("/v1") + "/_mock/requests", timeout=10).json()
    sent = [q["body"] for q in seen if "body-strategy" in json.dumps(q.get("body"))][-1]
    assert "clawdbot" not in sent


def test_explain_shows_candidates_terms_and_the_winner(mesh: Mesh) -> None:
    r = client(mesh).get(f"{mesh.v1}/routing/explain", params={"model": "auto", "strategy": "cost_optimized"})
    assert r.status_code == 200, r.text
    explanation = r.json()
    assert explanation["strategy"] == "cost_optimized"
    assert explanation["weights"] == {"latency": 0.2, "accuracy": 0.2, "cost": 0.6}
    ids = [c["instance"] for c in explanation["candidates"]]
    assert {"mock-1", "gemma-3-270m", "mock-ha-live"} <= set(ids)
    best = explanation["candidates"][0]
    assert best["rank"] == 1 and explanation["chosen"] == best["instance"]
    assert set(best["terms"]) == {"latency", "accuracy", "cost"}
    assert explanation["why"].startswith(best["instance"])
    # Free instances beat priced ones on cost.
    assert next(c for c in explanation["candidates"] if c["instance"] == "mock-1")["terms"]["cost"] < 0.05


def test_explain_errors(mesh: Mesh) -> None:
    assert client(mesh).get(f"{mesh.v1}/routing/explain", params={"model": "nope"}).status_code == 404
    r = client(mesh).get(f"{mesh.v1}/routing/explain", params={"model": "auto", "strategy": "fastest"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strategy"
    assert httpx.get(f"{mesh.v1}/routing/explain", params={"model": "auto"}, timeout=30).status_code == 401


def test_explain_over_grpc(mesh: Mesh) -> None:
    result = grpcurl(mesh, "clawdbot.v1.Gateway/ExplainRouting", data={"model": "mock-ha"})
    assert result.returncode == 0, result.stderr
    explanation = json.loads(result.stdout)
    assert [c["instance"] for c in explanation["candidates"]][-1] in ("mock-ha-dead", "mock-ha-live")


def test_feedback_moves_the_quality_estimate(mesh: Mesh) -> None:
    # Each answer counts once: two ratings need two requests.
    request_ids = [chat(mesh, messages=[{"role": "user", "content": "rate me"}]).headers["x-request-id"] for _ in "ab"]
    first = client(mesh).post(f"{mesh.v1}/feedback", json={"request_id": request_ids[0], "score": 0.0})
    assert first.status_code == 200, first.text
    assert first.json()["instance"] == "mock-1" and first.json()["task"] == "chat"
    second = client(mesh).post(f"{mesh.v1}/feedback", json={"request_id": request_ids[1], "score": 0.0})
    assert second.json()["quality"] < first.json()["quality"] < 0.7


def test_feedback_errors(mesh: Mesh) -> None:
    c = client(mesh)
    r = c.post(f"{mesh.v1}/feedback", json={"request_id": "never-seen", "score": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    assert c.post(f"{mesh.v1}/feedback", json={"request_id": "x", "score": 7}).json()["error"]["param"] == "score"
    assert c.post(f"{mesh.v1}/feedback", json={"score": 1}).json()["error"]["param"] == "request_id"


def test_cost_is_summed_per_key_and_model(mesh: Mesh) -> None:
    chat(mesh).raise_for_status()
    port = mesh.info()["ports"]["router_http"]
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = [line for line in metrics.splitlines() if line.startswith("clawdbot_cost_usd_total{")]
    assert any('model="mock-1"' in line and 'api_key_id="key_' in line for line in lines), lines


def test_rules_send_images_only_where_declared_and_honour_headers(mesh: Mesh) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    content = [{"type": "text", "text": "what is this?"}, image]
    for _ in range(5):
        r = chat(mesh, model="auto", messages=[{"role": "user", "content": content}])
        assert r.status_code == 200, r.text
        assert r.headers["x-clawdbot-model-instance"] == "mock-1"  # the only one labelled for images
    r = chat(mesh, model="gemma-3-270m", messages=[{"role": "user", "content": content}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_matching_instance"
    r = client(mesh).post(
        f"{mesh.v1}/chat/completions",
        headers={"x-tier": "premium"},
        json={"model": "mock-1", "messages": [{"role": "user", "content": "vip"}]},
    )
    assert r.headers["x-clawdbot-strategy"] == "quality_first"
    explained = client(mesh).get(f"{mesh.v1}/routing/explain", params={"model": "auto", "modality": "image"}).json()
    assert explained["rules"] == ["images"] and [c["instance"] for c in explained["candidates"]] == ["mock-1"]
