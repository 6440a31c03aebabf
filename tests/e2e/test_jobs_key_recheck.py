"""A job's virtual key is checked again when the job runs, through Envoy: jobs queued behind
slow ones, then their keys revoked or narrowed while they wait. The revoked key's job fails
401 (told through its callback: the key can no longer look it up), the narrowed key's 403
model_not_allowed; a key left alone runs its job. None is retried."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import wait_for_async

pytestmark = pytest.mark.e2e

# The in-process queue runs this many jobs at once (jobs/queue.py InProcessJobQueue).
WORKERS = 8
SLOW_MS = 6000


@pytest.fixture(scope="module")
def jobs_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("jobs-key-recheck")
    config = core_mesh_config(
        mock_upstream,
        tmp,
        # No Kafka: one jobs process, its in-process queue, WORKERS jobs at a time.
        jobs={"kafka_bootstrap": "", "run_kafka": False, "callback_allow": ["127.0.0.1"], "max_attempts": 3},
    )
    with running_mesh(tmp, config, mock_upstream) as mesh:
        yield mesh


@pytest_asyncio.fixture
async def hook() -> AsyncIterator[tuple[str, asyncio.Queue[dict[str, Any]]]]:
    """A callback receiver on loopback: (its URL, the jobs it was sent)."""
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        await received.put(json.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_job(text: str, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"model": "mock-1", "messages": [{"role": "user", "content": text}]}
    return {"kind": "chat", "request": {**request, **extra.pop("request_extra", {})}, **extra}


async def submitted(http: httpx.AsyncClient, mesh: Mesh, key: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await http.post(f"{mesh.v1}/jobs", json=body, headers=auth(key))
    assert reply.status_code in (200, 201, 202), reply.text
    job: dict[str, Any] = reply.json()
    return job


async def finished(http: httpx.AsyncClient, mesh: Mesh, key: str, job_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        job: dict[str, Any] = (await http.get(f"{mesh.v1}/jobs/{job_id}", headers=auth(key))).json()
        return job if job.get("status") in ("succeeded", "failed") else None

    return await wait_for_async(done, 120, f"job {job_id} to finish")


@pytest.mark.asyncio
async def test_keys_revoked_or_narrowed_while_their_jobs_wait(
    jobs_mesh: Mesh, hook: tuple[str, asyncio.Queue[dict[str, Any]]]
) -> None:
    hook_url, callbacks = hook
    admin = auth(jobs_mesh.api_key)
    async with httpx.AsyncClient(timeout=60) as http:
        keys = {}
        for name in ("revoked", "narrowed", "untouched"):
            made = await http.post(
                f"{jobs_mesh.v1}/admin/keys", headers=admin, json={"name": name, "models": ["mock-*"]}
            )
            assert made.status_code == 201, made.text
            keys[name] = made.json()

        # Every worker busy for a while with the runner's key...
        slow = [
            await submitted(
                http, jobs_mesh, jobs_mesh.api_key, chat_job(f"slow {i}", request_extra={"mock": {"delay_ms": SLOW_MS}})
            )
            for i in range(WORKERS)
        ]
        # ...so these wait in the queue, each submitted while its key allowed it.
        revoked = await submitted(
            http, jobs_mesh, keys["revoked"]["key"], chat_job("revoked meanwhile", callback_url=hook_url)
        )
        narrowed = await submitted(http, jobs_mesh, keys["narrowed"]["key"], chat_job("narrowed meanwhile"))
        untouched = await submitted(http, jobs_mesh, keys["untouched"]["key"], chat_job("left alone"))
        for job, key in ((revoked, "revoked"), (narrowed, "narrowed")):
            now = (await http.get(f"{jobs_mesh.v1}/jobs/{job['id']}", headers=auth(keys[key]["key"]))).json()
            assert now["status"] == "queued", f"the {key} job ran before its key changed: {now}"

        gone = await http.delete(f"{jobs_mesh.v1}/admin/keys/{keys['revoked']['id']}", headers=admin)
        assert gone.status_code == 200, gone.text
        patched = await http.patch(
            f"{jobs_mesh.v1}/admin/keys/{keys['narrowed']['id']}", headers=admin, json={"models": ["other-*"]}
        )
        assert patched.status_code == 200, patched.text

        # The revoked key cannot look its job up any more: the callback says how it ended.
        sent = await asyncio.wait_for(callbacks.get(), 120)
        assert sent["id"] == revoked["id"] and sent["status"] == "failed", sent
        assert sent["error"]["code"] == "invalid_api_key" and sent["attempts"] == 1, sent

        done = await finished(http, jobs_mesh, keys["narrowed"]["key"], narrowed["id"])
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "model_not_allowed" and done["error"]["type"] == "permission_error"
        assert done["attempts"] == 1, done

        ok = await finished(http, jobs_mesh, keys["untouched"]["key"], untouched["id"])
        assert ok["status"] == "succeeded", ok
        assert ok["result"]["choices"][0]["message"]["content"] == "Hello from mock-1: left alone"

        # The slow jobs were the runner's key's, and ran as ever.
        for job in slow:
            assert (await finished(http, jobs_mesh, jobs_mesh.api_key, job["id"]))["status"] == "succeeded"
