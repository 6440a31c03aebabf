"""The lite configuration (what the lite image runs) through the runner, as the image runs
it: Envoy, adapter, router, cache and the jobs service only, configured by the seed's
variables."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Mesh, running_mesh
from tests.support import REPO_ROOT, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    config = yaml.safe_load((REPO_ROOT / "config" / "lite.yaml").read_text())
    tmp = tmp_path_factory.mktemp("lite")
    # The hosted models, at the mock provider; a fresh object store.
    for model in config["models"]:
        model["base_url"] = mock_upstream
        model["upstream_model"] = "mock-embed" if model["task"] == "embeddings" else "mock-1"
    config.setdefault("cache", {})["object_dir"] = str(tmp / "objects")
    with pytest.MonkeyPatch.context() as patch:
        # `docker run -e ADAPTER_TYPES="rest,ws" -e MODEL_ROUTER_STRATEGY="cost_optimized"`
        patch.setenv("ADAPTER_TYPES", "rest,ws")
        patch.setenv("MODEL_ROUTER_STRATEGY", "cost_optimized")
        with running_mesh(tmp, config, mock_upstream) as mesh:
            yield mesh


def test_only_the_core_services_run(lite: Mesh) -> None:
    # The jobs service too: without Kafka, one process with its in-process queue.
    assert set(lite.info()["services"]) == {"envoy", "adapter", "router", "cache", "jobs-1"}


def test_chat_through_the_lite_mesh(lite: Mesh) -> None:
    headers = {"Authorization": f"Bearer {lite.api_key}"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    reply = httpx.post(f"{lite.v1}/chat/completions", headers=headers, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    # The environment picked the strategy.
    assert reply.headers["x-clawdbot-strategy"] == "cost_optimized"
    models = httpx.get(f"{lite.v1}/models", headers=headers, timeout=30).json()
    assert {m["id"] for m in models["data"]} == {"gpt-4o-mini", "text-embedding-3-small"}


def test_jobs_run_in_process(lite: Mesh) -> None:
    headers = {"Authorization": f"Bearer {lite.api_key}"}
    body = {"kind": "chat", "request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    reply = httpx.post(f"{lite.v1}/jobs", headers=headers, json=body, timeout=30)
    assert reply.status_code == 202, reply.text
    assert reply.json()["durable"] is False
    location = reply.headers["location"]

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = httpx.get(f"{lite.url}{location}", headers=headers, timeout=30).json()
        return job if job["status"] in ("succeeded", "failed") else None

    done = wait_for(finished, 60, "the in-process job to finish")
    assert done["status"] == "succeeded" and done["result"]["choices"][0]["message"]["content"], done


def test_health_says_ok_with_no_health_service(lite: Mesh) -> None:
    reply = httpx.get(f"{lite.v1}/health", timeout=30)  # no key needed
    assert reply.status_code == 200, reply.text
    status = reply.json()
    assert status["status"] == "ok" and status["services"] == {"adapter": "serving", "health": "disabled"}
