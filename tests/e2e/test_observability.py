"""Health, metrics and traces of the running mesh."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Mesh
from tests.support import wait_for

pytestmark = pytest.mark.e2e


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)


def test_every_service_reports_serving(mesh: Mesh) -> None:
    ports = mesh.info()["ports"]
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health(f"127.0.0.1:{ports['router_grpc']}") == serving
    assert health(f"127.0.0.1:{ports['router_grpc']}", "clawdbot.v1.Router") == serving
    assert health(f"127.0.0.1:{ports['adapter_grpc']}", "clawdbot.v1.Gateway") == serving
    # Through Envoy as well, without a key: health is the one open route.
    assert health(mesh.grpc_target) == serving
    r = httpx.get(f"{mesh.url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["serving"] is True
    assert httpx.get(f"{mesh.admin_url}/ready", timeout=10).text.strip() == "LIVE"


def test_metrics_on_every_service(mesh: Mesh) -> None:
    httpx.post(
        f"{mesh.v1}/chat/completions",
        headers={"Authorization": f"Bearer {mesh.api_key}"},
        timeout=60,
        json={"model": "mock-1", "messages": [{"role": "user", "content": "count me"}]},
    ).raise_for_status()
    ports = mesh.info()["ports"]
    adapter = httpx.get(f"http://127.0.0.1:{ports['adapter_http']}/metrics", timeout=10).text
    router = httpx.get(f"http://127.0.0.1:{ports['router_http']}/metrics", timeout=10).text
    assert 'clawdbot_requests_total{operation="chat",protocol="rest",service="adapter",status="200"}' in adapter
    assert "clawdbot_request_duration_seconds_bucket" in adapter
    assert 'clawdbot_requests_in_flight{service="adapter"} 0.0' in adapter
    assert 'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="mock-1"' in router
    assert "gen_ai_client_operation_duration_seconds_bucket" in router
    assert "clawdbot_upstream_errors_total" in router
    envoy = httpx.get(f"{mesh.admin_url}/stats/prometheus", timeout=10).text
    assert "envoy_cluster_upstream_rq" in envoy


def spans(mesh: Mesh, service: str) -> list[dict[str, Any]]:
    path = mesh.traces_dir / f"{service}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_trace_across_adapter_router_and_upstream(mesh: Mesh) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(
        f"{mesh.v1}/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {mesh.api_key}", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        json={"model": "mock-1", "messages": [{"role": "user", "content": "trace me"}]},
    )
    assert r.status_code == 200
    adapter = wait_for(lambda: [s for s in spans(mesh, "adapter") if s["trace_id"] == trace_id], 30, "adapter spans")
    router = wait_for(lambda: [s for s in spans(mesh, "router") if s["trace_id"] == trace_id], 30, "router spans")
    assert {s["kind"] for s in router} == {"SERVER", "CLIENT"}
    # The metadata the adapter attached travelled with the request.
    served = next(s for s in router if s["kind"] == "SERVER")["attributes"]
    assert served["clawdbot.client_ip"] == "127.0.0.1"
    assert served["clawdbot.device_type"] == "cli"  # httpx's python-httpx user agent
    assert served["clawdbot.protocol"] == "rest"
    assert served["clawdbot.api_key_id"].startswith("key_")
    assert adapter[0]["service"] == "clawdbot-adapter"
    upstream_call = next(s for s in router if s["kind"] == "CLIENT")
    assert upstream_call["attributes"]["gen_ai.request.model"] == "mock-1"
    seen = httpx.get(mesh.mock_url.removesuffix("/v1") + "/_mock/requests", timeout=10).json()
    upstream = [q for q in seen if "trace me" in json.dumps(q.get("body"))][-1]
    assert upstream["headers"]["traceparent"].split("-")[1] == trace_id
    assert upstream["headers"]["traceparent"].split("-")[2] == upstream_call["span_id"]
