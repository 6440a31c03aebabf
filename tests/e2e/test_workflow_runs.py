"""Workflow runs through the whole mesh: an async run survives its orchestrator being
killed mid-run and completes once; model steps go through the cache; definitions are
reloaded when their folder changes."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from tests.conftest import Mesh
from tests.support import wait_for, wait_for_async

pytestmark = pytest.mark.e2e


def client(mesh: Mesh) -> httpx.AsyncClient:
    return httpx.AsyncClient(headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=120)


async def mock_requests_with(mesh: Mesh, text: str) -> list[dict[str, Any]]:
    """The requests the mock provider received whose body mentions text."""
    async with httpx.AsyncClient(timeout=30) as http:
        recorded = (await http.get(f"{mesh.mock_url.removesuffix('/v1')}/_mock/requests")).json()
    return [r for r in recorded if text in str(r.get("body"))]


@pytest.mark.asyncio
async def test_an_async_run_survives_an_orchestrator_restart_and_completes_once(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    redis = aioredis.Redis(port=mesh.info()["ports"]["redis"])
    try:
        async with client(mesh) as http:
            body = {"kind": "workflow", "request": {"name": "resumable", "input": {"marker": marker}}}
            accepted = await http.post(f"{mesh.v1}/jobs", json=body)
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["id"]

            # Kill the orchestrator once `first` is saved and `slow` is at the provider.
            async def slow_under_way() -> bool:
                saved = await redis.hexists(f"clawdbot:run:{job_id}", "step:first")
                return bool(saved) and bool(await mock_requests_with(mesh, f"slow {marker}"))

            await wait_for_async(slow_under_way, 60, "the run to reach its slow step")
            before = mesh.info()["services"]["orchestrator"]
            os.kill(before["pid"], signal.SIGKILL)
            wait_for(
                lambda: mesh.info()["services"]["orchestrator"]["restarts"] > before["restarts"],
                120,
                "the orchestrator to be restarted",
            )

            async def done() -> dict[str, Any] | None:
                job = (await http.get(f"{mesh.v1}/jobs/{job_id}")).json()
                return job if job["status"] in ("succeeded", "failed") else None

            job = await wait_for_async(done, 180, "the job to finish")
        assert job["status"] == "succeeded", job
        assert job["attempts"] >= 2  # the call the restart cut off, then the resumed run
        run = job["result"]
        assert run["output"] == [f"Hello from mock-1: first {marker}", f"Hello from mock-1: slow {marker}"]
        steps = {s["id"]: s for s in run["steps"]}
        assert steps["first"]["resumed"] and not steps["slow"]["resumed"]
        # Once: the finished step was not run again, and the job's result was stored once.
        assert len(await mock_requests_with(mesh, f"first {marker}")) == 1
        assert int(await redis.hget(f"clawdbot:job:{job_id}:results", "stored") or 0) == 1
    finally:
        await redis.aclose()


@pytest.mark.asyncio
async def test_a_deterministic_model_step_is_answered_by_the_cache(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    async with client(mesh) as http:
        runs = []
        for _ in range(2):
            reply = await http.post(f"{mesh.v1}/workflows/cached_step:run", json={"input": {"marker": marker}})
            assert reply.status_code == 200, reply.text
            runs.append(reply.json())
    first, second = (r["steps"][0] for r in runs)
    assert runs[0]["output"] == runs[1]["output"] == f"Hello from mock-1: cache me {marker}"
    assert first["cache"] == "miss" and second["cache"].startswith("hit-")
    assert len(await mock_requests_with(mesh, f"cache me {marker}")) == 1


@pytest.mark.asyncio
async def test_a_new_definition_file_is_picked_up_without_a_restart(mesh: Mesh) -> None:
    folder = Path(mesh.config_file).parent / "workflows"
    name = f"added_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.yaml").write_text(
        yaml.safe_dump(
            {"workflows": {name: {"steps": [{"id": "a", "type": "transform", "params": {"value": "${input.x}"}}]}}}
        )
    )
    try:
        async with client(mesh) as http:

            async def listed() -> bool:
                names = [w["name"] for w in (await http.get(f"{mesh.v1}/workflows")).json()["data"]]
                return name in names

            await wait_for_async(listed, 60, "the new workflow to be listed")
            reply = await http.post(f"{mesh.v1}/workflows/{name}:run", json={"input": {"x": 5}})
            assert reply.status_code == 200 and reply.json()["output"] == 5
    finally:
        (folder / f"{name}.yaml").unlink()
