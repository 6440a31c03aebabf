"""A job's key, checked again when the job runs, against a real SQLite key store: the grant
kept with the job at submission and passed on to the router (and the orchestrator); a
stored key re-read before each attempt — revoked or expired fails the job with 401, a model
or workflow no longer allowed with 403, none retried, and the router gets the key's grant
as it is now; key lookups cached under a second and shared by a burst; old job records
(no grant) still read and run as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from clawdbot.common.config import JobsConfig
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyRecord, KeySpec, KeyStore
from clawdbot.common.keystore.grants import grant_of
from clawdbot.gen.v1 import orchestrator_pb2, router_pb2
from clawdbot.jobs.api import JobsApi
from clawdbot.jobs.execution import JobExecutor
from clawdbot.jobs.keys import MAX_TTL_S, JobKeys
from clawdbot.jobs.records import Job, grant_json, new_job_id
from clawdbot.jobs.store import MemoryJobStore


class FakeRouter:
    """Stands in for the router's stub: records each request, answers a fixed completion."""

    def __init__(self) -> None:
        self.requests: list[router_pb2.ModelRequest] = []

    async def Complete(self, request: router_pb2.ModelRequest, **_call: Any) -> router_pb2.ModelResponse:  # noqa: N802
        self.requests.append(request)
        return router_pb2.ModelResponse(openai_json=orjson.dumps({"object": "chat.completion", "ok": True}))


class FakeOrchestrator:
    def __init__(self) -> None:
        self.requests: list[orchestrator_pb2.RunWorkflowRequest] = []

    async def Run(self, request: orchestrator_pb2.RunWorkflowRequest, **_call: Any) -> orchestrator_pb2.WorkflowReply:  # noqa: N802
        self.requests.append(request)
        return orchestrator_pb2.WorkflowReply(json=orjson.dumps({"status": "succeeded"}))


class FakeQueue:
    durable = True

    def __init__(self) -> None:
        self.sent: list[Job] = []

    async def send(self, job: Job) -> None:
        self.sent.append(job)

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    opened = await KeyStore.open(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}", migrate=True)
    yield opened
    await opened.close()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"


async def new_key(store: KeyStore, **body: Any) -> KeyRecord:
    record, _secret = await store.create(KeySpec.parse({"name": "job-key", **body}))
    return record


def chat_job(record: KeyRecord | None, grant: router_pb2.KeyGrant | None, model: str = "mock-1") -> Job:
    meta = router_pb2.RequestMeta(api_key_id=record.id if record else "static-key")
    if grant is not None:
        meta.grant.CopyFrom(grant)
    return Job(
        id=new_job_id(),
        kind="chat",
        api_key_id=meta.api_key_id,
        request={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        grant=grant_json(meta),
    )


def executor(
    keys: JobKeys | None, router: FakeRouter, orchestrator: FakeOrchestrator | None = None, attempts: int = 3
) -> JobExecutor:
    config = JobsConfig(max_attempts=attempts, backoff_s=0)
    return JobExecutor(
        router,  # type: ignore[arg-type]
        MemoryJobStore(),
        config,
        orchestrator,  # type: ignore[arg-type]
        max_request_bytes=1 << 20,
        keys=keys,
    )


# --- the record ------------------------------------------------------------------------


def test_the_grant_is_kept_with_the_job_and_old_records_still_read() -> None:
    grant = router_pb2.KeyGrant(
        models=["mock-*"], budget_usd=0.5, budget_period="day", stored=True, cache_scope="private"
    )
    job = chat_job(None, grant)
    again = Job.from_json(job.to_json())
    assert again.key_grant == grant
    # Not shown to its owner: it is the gateway's business.
    assert "grant" not in job.public()

    # A record written before grants existed: no grant, and it reads.
    old = orjson.loads(job.to_json())
    del old["grant"]
    legacy = Job.from_json(orjson.dumps(old))
    assert legacy.grant is None and legacy.key_grant is None
    # One written by a newer jobs service, with a field this one does not know: it reads.
    newer = Job.from_json(orjson.dumps({**old, "added_later": {"x": 1}}))
    assert newer.id == job.id
    with pytest.raises(TypeError):
        Job.from_json(b"[1, 2]")

    # A meta without a grant records none (not an empty one).
    assert grant_json(router_pb2.RequestMeta(api_key_id="k")) is None


@pytest.mark.asyncio
async def test_submission_records_the_callers_grant() -> None:
    queue = FakeQueue()
    api = JobsApi(MemoryJobStore(), queue, max_request_bytes=1 << 20)
    grant = router_pb2.KeyGrant(models=["mock-*"], stored=True)
    meta = router_pb2.RequestMeta(api_key_id="key_abc", grant=grant)
    body = orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]})
    job = await api.submit(meta, "chat", body, "")
    assert job.key_grant == grant
    (sent,) = queue.sent
    assert Job.from_json(sent.to_json()).key_grant == grant


# --- running ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stored_key_runs_under_its_current_grant(store: KeyStore, url: str) -> None:
    record = await new_key(store, models=["mock-*"], budget={"usd": 1.0, "period": "day"})
    job = chat_job(record, grant_of(record))
    # Changed after submission: the job runs under what the key says now.
    changed = await store.update(record.id, {"budget": {"usd": 0.25, "period": "month"}, "models": ["mock-1"]})
    keys = JobKeys(url)
    router = FakeRouter()
    try:
        done = await executor(keys, router).run(job)
    finally:
        await keys.close()
    assert done.status == "succeeded", done.error
    (request,) = router.requests
    assert request.meta.grant == grant_of(changed)
    assert request.meta.grant.budget_usd == 0.25 and request.meta.grant.budget_period == "month"
    assert request.meta.grant.stored and list(request.meta.grant.models) == ["mock-1"]
    assert request.meta.api_key_id == record.id and request.meta.protocol == "job"


@pytest.mark.asyncio
async def test_a_revoked_key_fails_its_job_with_401_not_retried(store: KeyStore, url: str) -> None:
    record = await new_key(store)
    job = chat_job(record, grant_of(record))
    await store.revoke(record.id)
    keys = JobKeys(url)
    router = FakeRouter()
    try:
        done = await executor(keys, router, attempts=3).run(job)
    finally:
        await keys.close()
    assert done.status == "failed"
    assert done.error is not None
    assert done.error["code"] == "invalid_api_key" and done.error["type"] == "invalid_request_error"
    assert "revoked" in done.error["message"]
    # Not retried, and no model was called.
    assert done.attempts == 1 and done.error["attempts"] == 1
    assert router.requests == []


@pytest.mark.asyncio
async def test_an_expired_key_fails_its_job_with_401(store: KeyStore, url: str) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    record = await new_key(store, expires_at=expires.isoformat())
    job = chat_job(record, grant_of(record))
    # Two hours on: the key has expired since the job was submitted.
    keys = JobKeys(url, now=lambda: datetime.now(UTC) + timedelta(hours=2))
    router = FakeRouter()
    try:
        done = await executor(keys, router).run(job)
    finally:
        await keys.close()
    assert done.status == "failed" and done.error is not None
    assert done.error["code"] == "invalid_api_key" and done.attempts == 1
    assert router.requests == []


@pytest.mark.asyncio
async def test_a_model_no_longer_allowed_fails_with_403(store: KeyStore, url: str) -> None:
    record = await new_key(store, models=["mock-*"])
    job = chat_job(record, grant_of(record), model="mock-1")
    await store.update(record.id, {"models": ["other-*"]})
    keys = JobKeys(url)
    router = FakeRouter()
    try:
        done = await executor(keys, router).run(job)
    finally:
        await keys.close()
    assert done.status == "failed" and done.error is not None
    assert done.error["code"] == "model_not_allowed" and done.error["type"] == "permission_error"
    assert done.error["param"] == "model" and "mock-1" in done.error["message"]
    assert done.attempts == 1 and router.requests == []


@pytest.mark.asyncio
async def test_a_workflow_job_is_checked_and_carries_the_current_grant(store: KeyStore, url: str) -> None:
    record = await new_key(store, models=["mock-*"], defaults={"workflows": ["summarize*"]})
    orchestrator = FakeOrchestrator()
    keys = JobKeys(url)

    def workflow_job(name: str) -> Job:
        meta = router_pb2.RequestMeta(api_key_id=record.id, grant=grant_of(record))
        return Job(new_job_id(), "workflow", record.id, {"name": name, "input": {}}, grant=grant_json(meta))

    try:
        allowed = await executor(keys, FakeRouter(), orchestrator).run(workflow_job("summarize-text"))
        assert allowed.status == "succeeded", allowed.error
        (request,) = orchestrator.requests
        assert request.meta.grant == grant_of(record) and request.meta.api_key_id == record.id

        refused = await executor(keys, FakeRouter(), orchestrator).run(workflow_job("translate"))
        assert refused.status == "failed" and refused.error is not None
        assert refused.error["code"] == "workflow_not_allowed" and refused.attempts == 1
        assert len(orchestrator.requests) == 1

        await store.revoke(record.id)
        keys_now = JobKeys(url)
        try:
            gone = await executor(keys_now, FakeRouter(), orchestrator).run(workflow_job("summarize-text"))
        finally:
            await keys_now.close()
        assert gone.status == "failed" and gone.error is not None and gone.error["code"] == "invalid_api_key"
        assert len(orchestrator.requests) == 1
    finally:
        await keys.close()


@pytest.mark.asyncio
async def test_a_key_declared_in_yaml_keeps_its_recorded_grant_without_lookups(url: str) -> None:
    grant = router_pb2.KeyGrant(models=["mock-*"], budget_usd=2.0, budget_period="total", stored=False)
    job = chat_job(None, grant)
    keys = JobKeys(url)
    router = FakeRouter()
    try:
        done = await executor(keys, router).run(job)
    finally:
        await keys.close()
    assert done.status == "succeeded", done.error
    assert router.requests[0].meta.grant == grant
    assert keys.lookups == 0


@pytest.mark.asyncio
async def test_an_old_record_without_a_grant_runs_as_before(url: str) -> None:
    job = chat_job(None, None)
    keys = JobKeys(url)
    router = FakeRouter()
    try:
        done = await executor(keys, router).run(job)
    finally:
        await keys.close()
    assert done.status == "succeeded", done.error
    assert not router.requests[0].meta.HasField("grant")
    assert keys.lookups == 0


@pytest.mark.asyncio
async def test_an_unavailable_key_store_is_retried_then_fails_503(tmp_path: Path) -> None:
    opened = 0

    async def broken(url: str) -> KeyStore:
        nonlocal opened
        opened += 1
        raise OSError("database is away")

    keys = JobKeys("sqlite+aiosqlite:///unused.db", opener=broken)
    router = FakeRouter()
    job = chat_job(None, router_pb2.KeyGrant(stored=True))
    done = await executor(keys, router, attempts=3).run(job)
    assert done.status == "failed" and done.error is not None
    assert done.error["code"] == "key_store_unavailable"
    # Worth another attempt (nothing was called), up to the job's limit.
    assert done.attempts == 3 and opened == 3
    assert router.requests == []


# --- the cache --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_burst_of_jobs_costs_one_lookup_per_second(store: KeyStore, url: str) -> None:
    record = await new_key(store, models=["mock-*"])
    clock = Clock()
    keys = JobKeys(url, clock=clock)
    try:
        grants = await asyncio.gather(*(keys.current_grant(record.id, "mock-1") for _ in range(50)))
        assert all(g == grant_of(record) for g in grants)
        assert keys.lookups == 1
        # Revoked: still served from the cache within the TTL...
        await store.revoke(record.id)
        clock.now += MAX_TTL_S / 2
        await keys.current_grant(record.id, "mock-1")
        assert keys.lookups == 1
        # ...and refused once it is over: a revocation reaches jobs within a second.
        clock.now += MAX_TTL_S / 2
        results = await asyncio.gather(
            *(keys.current_grant(record.id, "mock-1") for _ in range(20)), return_exceptions=True
        )
        assert keys.lookups == 2
        assert all(isinstance(r, GatewayError) and r.status == 401 for r in results), results
    finally:
        await keys.close()


@pytest.mark.asyncio
async def test_an_unknown_key_is_refused_and_the_ttl_is_bounded(url: str) -> None:
    keys = JobKeys(url)
    try:
        with pytest.raises(GatewayError) as info:
            await keys.current_grant("key_does_not_exist", "mock-1")
        assert info.value.status == 401
    finally:
        await keys.close()
    with pytest.raises(ValueError, match="ttl_s"):
        JobKeys(url, ttl_s=MAX_TTL_S + 1)
