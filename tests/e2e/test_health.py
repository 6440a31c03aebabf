"""The health service end to end, on a mesh of its own (short windows, an alert webhook,
no Kafka: telemetry reaches it over gRPC) with mock providers whose faults the tests set:

* an instance that starts failing half its requests is taken out of rotation within the
  window, the webhook hears of it, clients with a healthy alternative see no errors, and
  it comes back (with a recovery alert) once its probes succeed;
* an instance whose latency rises fivefold raises an anomaly alert and loses traffic
  share, while its unchanged twin raises none.

And on the session mesh (Kafka carries the telemetry): the status routes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import Mesh, running_mesh
from tests.support import Proc, grpcurl, start_mock_upstream, wait_for

pytestmark = pytest.mark.e2e


class Webhook:
    """An alert receiver: every JSON body POSTed to it, in order."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, instance: str, kind: str, state: str) -> list[dict[str, Any]]:
        return [a for a in list(self.alerts) if (a["instance"], a["kind"], a["state"]) == (instance, kind, state)]


@dataclass
class Upstream:
    name: str
    proc: Proc
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, fault: dict[str, Any] | None) -> None:
        httpx.put(f"{self.base}/_mock/fault", json=fault, timeout=10).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.base}/_mock/requests", timeout=30).json())

    def traffic(self, since: float) -> int:
        """Client requests (not health probes) that reached it since a time."""
        return sum(
            1
            for r in self.requests()
            if r["ts"] >= since and not r["headers"].get("x-request-id", "").startswith("probe-")
        )


@dataclass
class HealthMesh:
    mesh: Mesh
    webhook: Webhook
    upstreams: dict[str, Upstream] = field(default_factory=dict)


@pytest.fixture(scope="module")
def health_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealthMesh]:
    tmp = tmp_path_factory.mktemp("health-mesh")
    upstreams = {}
    for name in ("pair-a", "pair-b", "duo-c", "duo-d"):
        (tmp / name).mkdir()
        proc, port = start_mock_upstream(tmp / name, "--model", "mock-1")
        upstreams[name] = Upstream(name, proc, port)
    webhook = Webhook()

    def instance(group: str, name: str) -> dict[str, Any]:
        url = f"{upstreams[name].base}/v1"
        return {"name": group, "task": "chat", "instance": name, "base_url": url, "upstream_model": "mock-1"}

    config = {
        "models": [instance(name.split("-")[0], name) for name in upstreams],
        "worker": {"models": []},
        "jobs": {"enabled": False},
        "cache": {"enabled": False},
        "orchestrator": {"enabled": False},
        # The router's own breakers would hide the failures from the health service.
        "model_router": {"breaker": {"consecutive_failures": 1000, "min_requests": 1000}},
        "health": {
            "rules": {
                "error_ratio": 0.3,
                "min_requests": 10,
                "window_s": 5,
                "cooldown_s": 3,
                "probes": 2,
                "probe_interval_s": 0.5,
            },
            # Once slowed, an instance loses most of its traffic to its twin (the router
            # prefers the faster): its windows stretch until they hold 3 calls.
            "anomaly": {"window_s": 1, "min_requests": 3, "min_windows": 30, "consecutive": 4},
            "alert_webhook": webhook.url,
            # The receiver is on loopback, which webhooks reach only when allowed.
            "alert_allow": ["127.0.0.1"],
        },
        "telemetry": {"traces_dir": str(tmp / "traces")},
    }
    (tmp / "mesh").mkdir()
    try:
        with running_mesh(tmp / "mesh", config, f"{upstreams['pair-a'].base}/v1") as mesh:
            yield HealthMesh(mesh, webhook, upstreams)
    finally:
        webhook.server.shutdown()
        for upstream in upstreams.values():
            upstream.proc.stop()


class Load:
    """Steady traffic to one model from a few threads, until stopped; every answer's status kept."""

    def __init__(self, mesh: Mesh, model: str, rate_per_s: float = 25.0, threads: int = 4) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads)
        headers = {"authorization": f"Bearer {mesh.api_key}"}
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        pause = threads / rate_per_s

        def send() -> None:
            with httpx.Client(headers=headers, timeout=60) as http:
                while not self._stop.is_set():
                    self.statuses.append(http.post(f"{mesh.v1}/chat/completions", json=body).status_code)
                    self._stop.wait(pause)  # pacing, not synchronisation

        self._futures = [self._pool.submit(send) for _ in range(threads)]

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=120)
        self._pool.shutdown()


def admin(mesh: Mesh) -> dict[str, dict[str, Any]]:
    reply = httpx.get(f"{mesh.v1}/admin/instances", headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=30)
    assert reply.status_code == 200, reply.text
    return {i["id"]: i for i in reply.json()["data"]}


def test_an_instance_failing_half_its_calls_is_taken_out_and_comes_back(health_mesh: HealthMesh) -> None:
    mesh, webhook, flaky, healthy = (
        health_mesh.mesh,
        health_mesh.webhook,
        health_mesh.upstreams["pair-a"],
        health_mesh.upstreams["pair-b"],
    )
    load = Load(mesh, "pair")
    try:
        wait_for(lambda: flaky.traffic(0) >= 10 and healthy.traffic(0) >= 10, 60, "traffic on both instances")
        flaky.fault({"status": 500, "error_rate": 0.5})
        failing_since = time.time()
        (down,) = wait_for(lambda: webhook.of("pair-a", "rule", "firing") or None, 60, "the unavailable alert")
        # Within the 5 s window, give or take what a busy machine adds: the router already
        # shifts traffic away from the failing instance, so its 10th request in the window
        # may come late, and telemetry travels in 0.1 s batches to a 0.25 s tick.
        took = down["time"] - failing_since
        assert took <= 5 + 5, f"not within the window: {took:.1f} s, {down['values']}"
        assert "error ratio" in down["summary"] and down["values"]["requests"] >= 10
        assert admin(mesh)["pair-a"]["health"]["status"] in ("unavailable", "probing")
        # The router stops sending it client traffic within a second.
        cut_off = down["time"] + 1.0
        wait_for(lambda: time.time() > cut_off + 3, 10, "a few seconds of traffic after the cut-off")
        assert flaky.traffic(cut_off) == 0
        assert healthy.traffic(cut_off) > 0
        assert not webhook.of("pair-b", "rule", "firing")

        flaky.fault(None)
        (up,) = wait_for(lambda: webhook.of("pair-a", "rule", "resolved") or None, 60, "the recovery alert")
        assert "probes in a row succeeded" in up["summary"]
        wait_for(lambda: flaky.traffic(up["time"] + 0.5) > 0, 30, "traffic back on the recovered instance")
        assert len(webhook.of("pair-a", "rule", "firing")) == 1  # once while it lasted
    finally:
        load.stop()
    # A healthy alternative was there all along: no client saw an error.
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))


def test_fivefold_latency_raises_an_anomaly_and_loses_traffic_share(health_mesh: HealthMesh) -> None:
    mesh, webhook = health_mesh.mesh, health_mesh.webhook
    slow, steady = health_mesh.upstreams["duo-c"], health_mesh.upstreams["duo-d"]
    for upstream in (slow, steady):
        upstream.fault({"delay_ms": 20})
    load = Load(mesh, "duo")
    try:
        wait_for(
            lambda: all(admin(mesh)[i]["monitor"]["anomaly"]["ready"] for i in ("duo-c", "duo-d")) or None,
            180,
            "both baselines to be learnt",
        )
        before = time.time()
        wait_for(lambda: time.time() > before + 5, 10, "a few seconds of normal traffic")
        share_before = slow.traffic(before) / max(1, slow.traffic(before) + steady.traffic(before))
        slow.fault({"delay_ms": 100})
        slowed = time.time()
        try:
            (alert,) = wait_for(lambda: webhook.of("duo-c", "anomaly", "firing") or None, 120, "the anomaly alert")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the monitor's view of duo-c: {admin(mesh)['duo-c']['monitor']}") from exc
        values = alert["values"]
        assert values["anomaly_score"] < values["threshold"] or "latency_p50_s" in values["beyond_baseline"], values
        assert admin(mesh)["duo-c"]["health"]["penalty"] > 0
        wait_for(lambda: time.time() > alert["time"] + 5, 10, "traffic under the penalty")
        after = alert["time"]
        share_after = slow.traffic(after) / max(1, slow.traffic(after) + steady.traffic(after))
        assert share_after < share_before, (share_before, share_after)
        assert admin(mesh)["duo-c"]["health"]["status"] == "available"  # soft: not ejected
    finally:
        load.stop()
    assert not webhook.of("duo-d", "anomaly", "firing"), "the unchanged instance raised an anomaly"
    assert set(load.statuses) == {200}
    assert slowed < alert["time"]


def test_the_status_routes_report_services_and_instances(mesh: Mesh) -> None:
    """On the session mesh: telemetry through Kafka; /v1/health needs no key."""
    headers = {"authorization": f"Bearer {mesh.api_key}"}
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "hello health"}]}
    assert httpx.post(f"{mesh.v1}/chat/completions", json=body, headers=headers, timeout=60).status_code == 200

    def seen() -> dict[str, Any] | None:
        reply = httpx.get(f"{mesh.v1}/health", timeout=30)  # no key
        assert reply.status_code == 200, reply.text
        status = reply.json()
        return status if any(i["id"] == "mock-1" for i in status["instances"]) else None

    status = wait_for(seen, 60, "the health service to hear of mock-1 through Kafka")
    assert status["services"]["router"] == "serving" and status["services"]["adapter"] == "serving"
    assert {"id", "model", "status"} <= set(status["instances"][0])
    assert "window" not in status["instances"][0]  # the public summary stays short
    listed = admin(mesh)
    mock = listed["mock-1"]
    assert mock["breaker"] == "closed" and mock["health"]["status"] == "available"
    assert mock["monitor"]["window"]["requests"] >= 1 and "anomaly" in mock["monitor"]
    assert httpx.get(f"{mesh.v1}/admin/instances", timeout=30).status_code == 401


def test_grpc_twins_of_the_status_routes(mesh: Mesh) -> None:
    health = grpcurl(mesh.grpc_target, "clawdbot.v1.Gateway/GetHealth", data={})
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["services"]["adapter"] == "serving"
    key = f"authorization: Bearer {mesh.api_key}"
    listed = grpcurl(mesh.grpc_target, "clawdbot.v1.Gateway/ListInstances", data={}, headers=(key,))
    assert listed.returncode == 0, listed.stderr
    assert any(i["id"] == "mock-1" for i in json.loads(listed.stdout)["data"])
    refused = grpcurl(mesh.grpc_target, "clawdbot.v1.Gateway/ListInstances", data={})
    assert "Unauthenticated" in refused.stderr
