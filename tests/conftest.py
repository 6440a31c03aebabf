from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from clawdbot.common.internal_auth import TOKEN_ENV
from tests.support import (
    INTERNAL_METADATA,
    INTERNAL_TOKEN,
    REPO_ROOT,
    GiveUp,
    Proc,
    python_env,
    read_json_file,
    start_mock_upstream,
    unused_port,
    wait_for,
)

TESTS = REPO_ROOT / "tests"

# Set at import, before any fixture: servers started in-process require it, clients send it,
# and the runner of every test mesh hands it to its services and Envoy. A token from the
# developer's shell is replaced, so that INTERNAL_METADATA is always the right one.
os.environ[TOKEN_ENV] = INTERNAL_TOKEN

# What the mesh's job callbacks are signed with.
CALLBACK_SECRET = "test-callback-secret"


@pytest.fixture(scope="session")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (…/v1) of a mock OpenAI provider in its own process."""
    tmp = tmp_path_factory.mktemp("mock")
    proc, port = start_mock_upstream(tmp, "--model", "mock-1", "--model", "mock-embed")
    yield f"http://127.0.0.1:{port}/v1"
    proc.stop()


@dataclass
class Mesh:
    url: str
    grpc_target: str
    api_key: str
    admin_url: str
    ready_file: Path
    traces_dir: Path
    mock_url: str
    runner: Proc
    config_file: Path

    def info(self) -> dict[str, Any]:
        info = read_json_file(self.ready_file)
        assert info is not None
        return info

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def service_pids(self) -> dict[str, Any]:
        """Each service's pid: unchanged after an attack means nothing crashed or restarted."""
        return {name: service.get("pid") for name, service in self.info()["services"].items()}

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def worker_target(self) -> str:
        return f"127.0.0.1:{self.info()['ports']['worker_grpc']}"

    def worker_models(self) -> dict[str, Any]:
        """The worker's own account of its models: name -> {state, version, detail, ...}."""
        from google.protobuf import json_format

        from clawdbot.gen.v1 import worker_pb2, worker_pb2_grpc

        with grpc.insecure_channel(self.worker_target) as channel:
            reply = worker_pb2_grpc.ModelServiceStub(channel).ListModels(
                worker_pb2.WorkerListModelsRequest(), timeout=10, metadata=INTERNAL_METADATA
            )
        return {
            m.name: json_format.MessageToDict(
                m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for m in reply.models
        }

    def wait_for_local_models(self) -> None:
        """The worker serves before its models finish loading; tests of them wait here."""

        def all_ready() -> bool | None:
            models = self.worker_models()
            failed = {n: m["detail"] for n, m in models.items() if m["state"] == "unavailable"}
            if failed:
                raise GiveUp(f"local models failed to load: {failed}")
            return all(m["state"] == "ready" for m in models.values()) or None

        wait_for(all_ready, 300, "the worker's models to load", interval=0.5)


# The worker's models in the test mesh, and the task of each.
WORKER_MODELS = {
    "all-minilm-l6-v2": "embeddings",
    "intent-classifier": "intent",
    "espeak-ng": "speech",
    "pocketsphinx-en": "transcription",
    "gemma-3-270m": "chat",
}


def workflows_dir(tmp: Path) -> Path:
    folder = tmp / "workflows"
    folder.mkdir(exist_ok=True)
    for source in [*(REPO_ROOT / "config" / "workflows").iterdir(), *(TESTS / "e2e" / "workflows").iterdir()]:
        if source.suffix in (".yaml", ".bpmn"):
            shutil.copy(source, folder / source.name)
    return folder


def mesh_config(mock_url: str, traces_dir: Path, dead_port: int) -> dict[str, Any]:
    """Every kind of model instance the end-to-end tests need, on one mesh."""
    return {
        "gateway": {"max_request_bytes": 1024 * 1024, "request_timeout_s": 120},
        "adapter": {"shutdown_grace_s": 20},
        "router": {"shutdown_grace_s": 20},
        "models": [
            {
                "name": "mock-1",
                "labels": {"modalities": "text,image"},
                "task": "chat",
                "base_url": mock_url,
                "pricing": {"input_per_1k": 0.0005, "output_per_1k": 0.0015},
                "quality": {"chat": 0.7},
            },
            {"name": "mock-embed", "task": "embeddings", "base_url": mock_url},
            # mock-1 again, with the semantic cache on.
            {"name": "mock-semantic", "task": "chat", "base_url": mock_url, "upstream_model": "mock-1"},
            # Hosted audio models, as OpenAI serves them.
            {"name": "mock-whisper", "task": "transcription", "base_url": mock_url},
            {"name": "mock-tts", "task": "speech", "base_url": mock_url},
            # A model whose only instance is down: 502.
            {"name": "dead-1", "task": "chat", "base_url": f"http://127.0.0.1:{dead_port}/v1"},
            # A group whose first instance is down: the router falls back to the second.
            {
                "name": "mock-ha",
                "task": "chat",
                "instance": "mock-ha-dead",
                "base_url": f"http://127.0.0.1:{dead_port}/v1",
                "upstream_model": "mock-1",
            },
            {
                "name": "mock-ha",
                "task": "chat",
                "instance": "mock-ha-live",
                "base_url": mock_url,
                "upstream_model": "mock-1",
            },
            # Fault injection goes to these, one breaker each, so that mock-1's stays closed
            # (mock-job-500: the job retry count's own, whatever other tests did to mock-500).
            *(
                {"name": name, "task": "chat", "base_url": mock_url, "upstream_model": "mock-1"}
                for name in ("mock-429", "mock-500", "mock-drop", "mock-job-500")
            ),
            # Short timeout, for the 504 test.
            {
                "name": "mock-impatient",
                "task": "chat",
                "base_url": mock_url,
                "timeout_s": 1,
                "upstream_model": "mock-1",
            },
            # The runner points these at the worker it starts.
            *(
                {"name": name, "task": task, "connector": "worker", "base_url": "grpc://127.0.0.1:1"}
                for name, task in WORKER_MODELS.items()
            ),
        ],
        # A wide window, so that the batching test's concurrent requests surely share calls.
        "worker": {
            "models": [
                {"name": "all-minilm-l6-v2", "runtime": "minilm"},
                {"name": "intent-classifier", "runtime": "intent"},
                {"name": "espeak-ng", "runtime": "espeak"},
                {"name": "pocketsphinx-en", "runtime": "pocketsphinx"},
                {"name": "gemma-3-270m", "runtime": "llama_cpp", "n_ctx": 1024},
            ],
            "batch_window_ms": 20,
        },
        # A fresh object store per session: answers cached by an earlier run must not hit.
        # The shipped workflows plus the tests' own (tests/e2e/workflows).
        "orchestrator": {"workflows_dir": str(workflows_dir(traces_dir.parent))},
        # Two consumer processes, and quick retries, for the job tests.
        # The callback tests' receivers listen on loopback, which callbacks reach only when allowed.
        "jobs": {"consumers": 2, "backoff_s": 0.1, "max_attempts": 3, "callback_allow": ["127.0.0.1"]},
        "cache": {
            "object_dir": str(traces_dir.parent / "objects"),
            "semantic": {"models": ["mock-semantic"], "embeddings_model": "all-minilm-l6-v2"},
        },
        "model_router": {
            "rules": [
                {"name": "images", "match": {"modality": "image"}, "require_labels": {"modalities": "image"}},
                {"name": "premium", "match": {"headers": {"x-tier": "premium"}}, "strategy": "quality_first"},
            ]
        },
        # The health service watches, but takes nothing out of rotation here: the tests
        # with failing models expect their failures (tests/e2e/test_health.py has its own).
        "health": {"rules": {"min_requests": 1_000_000}, "anomaly": {"enabled": False}},
        "telemetry": {"traces_dir": str(traces_dir)},
        "logging": {"level": "info"},
    }


def core_mesh_config(mock_url: str, tmp: Path, **sections: Any) -> dict[str, Any]:
    """Envoy, adapter, router and cache (memory and a local object store: no Redis, Kafka,
    orchestrator, health service or local models), one chat model at the mock provider:
    the smallest mesh an attack can be tried on. `sections` replace whole sections."""
    base: dict[str, Any] = {
        "cache": {"redis_url": "", "run_redis": False, "object_dir": str(tmp / "objects")},
        "jobs": {"kafka_bootstrap": "", "run_kafka": False},
        "orchestrator": {"enabled": False},
        "health": {"enabled": False},
        "worker": {"models": []},
        "models": [{"name": "mock-1", "task": "chat", "base_url": mock_url}],
    }
    return {**base, **sections}


@contextlib.contextmanager
def running_mesh(
    tmp: Path,
    config: dict[str, Any],
    mock_url: str,
    runner_args: Sequence[str] = (),
    expect_clean_stop: bool = True,
) -> Iterator[Mesh]:
    """A mesh started by the runner exactly as `make run` does, on free ports (runner_args:
    more of the runner's flags, e.g. --prometheus). The runner is stopped at the end
    whatever happened; expect_clean_stop=False for a test that kills it itself."""
    config_file = tmp / "clawdbot.yaml"
    config_file.write_text(yaml.safe_dump(config))
    ready = tmp / "ready.json"
    # Its own key, Kafka data and Redis: nothing carries over from another mesh or run.
    # (Model files are unpacked once per checkout, into worker.model_dir.)
    state = tmp / "state"
    argv = [sys.executable, "-m", "clawdbot.runner", "--config", str(config_file), "--ephemeral-ports"]
    argv += ["--ready-file", str(ready), "--state-dir", str(state), *runner_args]
    runner = Proc(argv, tmp / "runner.log", env=python_env(CLAWDBOT_CALLBACK_SECRET=CALLBACK_SECRET))

    def started() -> dict[str, Any] | None:
        if not runner.alive():
            raise GiveUp(f"runner exited:\n{runner.output()[-5000:]}")
        return read_json_file(ready) if "Clawdbot is up" in runner.output() else None

    try:
        info = wait_for(started, 240, "the mesh to start")
    except Exception:
        print(runner.output()[-10000:])
        runner.stop()
        raise
    traces = Path(config.get("telemetry", {}).get("traces_dir", tmp / "traces"))
    finished = False
    try:
        yield Mesh(
            info["url"],
            info["grpc_target"],
            info["api_key"],
            info["admin_url"],
            ready,
            traces,
            mock_url,
            runner,
            config_file,
        )
        finished = True
    finally:
        code = runner.stop()
    if finished and expect_clean_stop:
        assert code == 0, f"runner did not stop cleanly ({code}):\n{runner.output()[-5000:]}"


@pytest.fixture
def local_models(mesh: Mesh) -> Mesh:
    """The session mesh, once every model of its worker serves."""
    mesh.wait_for_local_models()
    return mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    """The whole mesh with every kind of instance the end-to-end tests need."""
    tmp = tmp_path_factory.mktemp("mesh")
    with running_mesh(tmp, mesh_config(mock_upstream, tmp / "traces", unused_port()), mock_upstream) as mesh:
        yield mesh
