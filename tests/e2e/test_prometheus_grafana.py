"""A real Prometheus, started by the runner (--prometheus), scrapes every process of the
mesh; after a burst of traffic every query of every shipped Grafana dashboard returns data."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import WORKER_MODELS, Mesh, mesh_config, running_mesh
from tests.support import REPO_ROOT, unused_port, wait_for

pytestmark = pytest.mark.e2e

DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"
# What Grafana puts in place of its variables: the whole range, every instance.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$model_instance": ".*",
}
# Children of the runner that serve no metrics of their own.
UNSCRAPED = {"kafka", "redis", "prometheus"}


def grafana_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of every dashboard."""
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                # label_values(metric, label): the metric must have series with that label.
                inner = variable["definition"].removeprefix("label_values(").removesuffix(")")
                metric, label = (part.strip() for part in inner.split(","))
                queries.append((f"{path.stem} ${variable['name']}", f"count by ({label}) ({metric})"))
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"{path.name}: a variable this test does not know in {expr}"
                queries.append((f"{path.stem} / {panel['title']} / {target['refId']}", expr))
    return queries


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    """A mesh of its own with --prometheus, quick health windows and one local model."""
    tmp = tmp_path_factory.mktemp("observed")
    config = mesh_config(mock_upstream, tmp / "traces", unused_port())
    # One local model (the worker's panels need one; loading all would only cost time).
    keep = "all-minilm-l6-v2"
    config["worker"]["models"] = [m for m in config["worker"]["models"] if m["name"] == keep]
    config["models"] = [m for m in config["models"] if m["name"] not in WORKER_MODELS or m["name"] == keep]
    # Rules that trip after two failures (and keep the instance out for the test's length),
    # and anomaly windows short enough for a score to appear within seconds of traffic.
    config["health"] = {
        "rules": {"min_requests": 2, "window_s": 30, "cooldown_s": 600},
        "anomaly": {"window_s": 1, "min_requests": 1, "min_windows": 5, "history": 10},
    }
    with running_mesh(tmp, config, mock_upstream, runner_args=["--prometheus"]) as mesh:
        yield mesh


def prometheus_url(mesh: Mesh) -> str:
    port = mesh.info()["ports"]["prometheus"]
    assert port, "the runner started no Prometheus"
    return f"http://127.0.0.1:{port}"


def query(mesh: Mesh, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus_url(mesh)}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def test_prometheus_scrapes_every_process(observed: Mesh) -> None:
    info = observed.info()
    config_file = Path(info["state_dir"]) / "prometheus" / "prometheus.yml"
    assert config_file.exists()
    expected = (set(info["services"]) - UNSCRAPED) | {"envoy"}
    assert {"adapter", "router", "cache", "worker", "orchestrator", "jobs-1", "jobs-2"} <= expected

    def all_up() -> dict[str, str] | None:
        reply = httpx.get(f"{prometheus_url(observed)}/api/v1/targets", timeout=10).json()
        health = {t["labels"]["process"]: t["health"] for t in reply["data"]["activeTargets"]}
        return health if set(health) == expected and all(h == "up" for h in health.values()) else None

    health = wait_for(all_up, 120, f"Prometheus to scrape {sorted(expected)}", interval=1)
    assert health["envoy"] == "up"
    # Envoy's own series come from /stats/prometheus.
    assert query(observed, 'envoy_server_live{job="envoy"}')


class Trickle:
    """Steady traffic in the background: anomaly scores need several windows of calls."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def _run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {self._mesh.api_key}"}, timeout=30) as client:
            while not self._stop.wait(0.2):
                body = {"model": "mock-1", "messages": [{"role": "user", "content": f"steady {self.sent}"}]}
                client.post(f"{self._mesh.v1}/chat/completions", json=body)
                self.sent += 1

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def burst(mesh: Mesh) -> None:
    """A request of every kind the panels count."""
    client = httpx.Client(headers={"Authorization": f"Bearer {mesh.api_key}"}, timeout=60)

    def chat(model: str, content: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return client.post(f"{mesh.v1}/chat/completions", json=body)

    with client:
        for i in range(5):
            assert chat("mock-1", f"hello {i}").status_code == 200
        stream = {"stream": True, "stream_options": {"include_usage": True}}
        body = {"model": "mock-1", "messages": [{"role": "user", "content": "a stream"}], **stream}
        with client.stream("POST", f"{mesh.v1}/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert any(line == "data: [DONE]" for line in r.iter_lines())
        for model in ("mock-embed", "all-minilm-l6-v2"):
            r = client.post(f"{mesh.v1}/embeddings", json={"model": model, "input": "metrics"})
            assert r.status_code == 200, r.text
        # The same deterministic request twice: a miss, then a hit.
        caches = [chat("mock-1", "cache me", temperature=0).headers.get("x-clawdbot-cache") for _ in range(2)]
        assert caches == ["miss", "hit-l1"], caches
        # A failing upstream (errors, retries, an open breaker) and a group whose first
        # instance is down (fallbacks).
        for _ in range(4):
            assert chat("mock-500", "fail", mock={"status": 500}).status_code in (502, 503)
        for _ in range(4):
            assert chat("mock-ha", "fall back").status_code == 200
        job = {"kind": "chat", "request": {"model": "mock-1", "messages": [{"role": "user", "content": "a job"}]}}
        r = client.post(f"{mesh.v1}/jobs", json=job)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def finished() -> bool:
            return client.get(f"{mesh.v1}/jobs/{job_id}").json()["status"] == "succeeded"

        wait_for(finished, 60, "the job to run")


def test_every_dashboard_query_returns_data_after_traffic(observed: Mesh) -> None:
    queries = grafana_queries()
    assert len(queries) > 30
    observed.wait_for_local_models()
    burst(observed)
    pending = dict(queries)

    def all_answered() -> bool:
        for where, expr in list(pending.items()):
            if query(observed, expr):
                del pending[where]
        return not pending

    with Trickle(observed):
        try:
            wait_for(all_answered, 180, "every dashboard query to return data", interval=2)
        except TimeoutError:
            pytest.fail("no data for:\n" + "\n".join(f"  {where}: {expr}" for where, expr in pending.items()))

    # What the new instruments say, beyond having data.
    assert query(observed, 'clawdbot_requests_in_flight{service="router"}')
    assert query(observed, 'clawdbot_routing_decisions_total{model_instance="mock-500",reason="retry"}')
    assert query(observed, 'clawdbot_instance_status{model_instance="mock-500"} == 0'), "mock-500 not marked down"
    assert query(observed, 'clawdbot_health_alerts_total{model_instance="mock-500",kind="rule",state="firing"}')

    # Every partition of the job topic is reported, by exactly one consumer, and drained.
    run_config = yaml.safe_load((Path(observed.info()["state_dir"]) / "run" / "clawdbot.yaml").read_text())
    partitions = {str(p) for p in range(run_config["jobs"]["partitions"])}

    def lag_per_partition() -> list[dict[str, Any]] | None:
        series = query(observed, "clawdbot_jobs_lag")
        reported = [s["metric"]["partition"] for s in series]
        # Anything else is a rebalance in passing.
        return series if sorted(reported) == sorted(partitions) else None

    series = wait_for(lag_per_partition, 60, f"the consumers to report the lag of partitions {partitions}", interval=1)
    assert {s["metric"]["process"] for s in series} == {"jobs-1", "jobs-2"}
    assert all(float(s["value"][1]) == 0 for s in series), series
