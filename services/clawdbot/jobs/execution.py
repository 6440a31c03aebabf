"""Running one job through the router (or a workflow through the orchestrator), and when a
job tries again.

Retries do not multiply (common/retry.py says which layer retries what): the router
already retries a model call across instances, model_router.retry.max_attempts calls in
all, so a job tries again only when the router (or the orchestrator) could not take the
call at all: unreachable, draining, over its in-flight limit, or with no instance to send
it to. No model was called then. Any answer from an upstream, success or failure, ends
the job. So one job makes at most model_router.retry.max_attempts upstream calls; only a
router that dies in the middle of a call (its calls lost with it) can make a job call
upstream again, and then at most jobs.max_attempts times that.

Before each attempt the job's key is checked as it is now (jobs/keys.py): a job of a
stored key that was revoked, expired or lost the model since submission fails then (401,
403 for a model or workflow; not retried), and the router gets the key's current grant.

The job record says how it went after every step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Final, cast

import grpc
import orjson
from google.protobuf import json_format

from clawdbot.common.bounded import off_loop_if_large
from clawdbot.common.clients.router import BadAudio, model_request
from clawdbot.common.config import JobsConfig
from clawdbot.common.errors import ERROR_METADATA_KEY, GatewayError
from clawdbot.common.retry import RetryPolicy
from clawdbot.gen.v1 import orchestrator_pb2, orchestrator_pb2_grpc, router_pb2, router_pb2_grpc
from clawdbot.jobs.keys import JobKeys
from clawdbot.jobs.records import Job
from clawdbot.jobs.store import JobStore

log = logging.getLogger(__name__)

# What a service of the mesh answers when it did not take a call: over its in-flight
# limit (common/admission.py), or, the router, no instance to send it to.
REFUSAL_CODES: Final = frozenset({"overloaded", "no_available_instance"})


class JobFailure(Exception):
    def __init__(self, error: dict[str, Any], retryable: bool) -> None:
        super().__init__(error.get("message", "job failed"))
        self.error = error
        self.retryable = retryable


def not_taken(err: grpc.aio.AioRpcError, failure: GatewayError) -> bool:
    """Whether the callee could not take the call at all (so nothing ran): the call never
    reached it (UNAVAILABLE from the transport, no error of ours in the trailers: down,
    restarting, or draining and refusing new calls), or it refused it with a refusal code.
    An error it reports on an upstream's behalf is no refusal, whatever its status."""
    trailers = cast("Iterable[tuple[str, str | bytes]]", err.trailing_metadata() or ())
    if not any(key == ERROR_METADATA_KEY for key, _ in trailers):
        return err.code() == grpc.StatusCode.UNAVAILABLE
    return failure.code in REFUSAL_CODES


def recorded_grant(job: Job) -> router_pb2.KeyGrant | None:
    """The grant recorded at submission (None: none was); JobFailure, never retried, when
    it does not read: a job whose limits are unknown must not run unlimited."""
    try:
        return job.key_grant
    except json_format.ParseError as exc:
        raise JobFailure(
            {"message": f"The job's key grant is unreadable: {exc}", "code": "malformed_job"}, False
        ) from None


def job_meta(job: Job, grant: router_pb2.KeyGrant | None) -> router_pb2.RequestMeta:
    """The meta of the calls a job makes: the job's id and submitter, and the grant they
    run under (None: none, as for a job recorded before grants existed)."""
    meta = router_pb2.RequestMeta(request_id=job.id, api_key_id=job.api_key_id, protocol="job")
    if grant is not None:
        meta.grant.CopyFrom(grant)
    return meta


def job_model(job: Job) -> str | None:
    """The model a job calls (None: a workflow, whose steps name theirs)."""
    model = job.request.get("model") if job.kind != "workflow" else None
    return model if isinstance(model, str) else None


def job_workflow(job: Job) -> str | None:
    """The workflow a job runs (None: a model call)."""
    name = job.request.get("name") if job.kind == "workflow" else None
    return name if isinstance(name, str) else None


def job_request(job: Job, max_request_bytes: int, grant: router_pb2.KeyGrant | None) -> router_pb2.ModelRequest:
    """The router request a job stands for, a transcription's audio decoded within
    `max_request_bytes`; JobFailure (never retried) when it cannot be one."""
    body = {**job.request, "stream": False} if job.kind == "chat" else job.request
    meta = job_meta(job, grant)
    try:
        return model_request(meta, job.kind, body, max_request_bytes)
    except BadAudio as exc:
        raise JobFailure(exc.error.to_dict()["error"], False) from None


class JobExecutor:
    def __init__(
        self,
        router: router_pb2_grpc.RouterStub,
        store: JobStore,
        config: JobsConfig,
        orchestrator: orchestrator_pb2_grpc.OrchestratorStub | None = None,
        *,
        max_request_bytes: int,
        keys: JobKeys | None = None,
    ) -> None:
        self._router = router
        self._store = store
        self._config = config
        self._orchestrator = orchestrator
        # gateway.max_request_bytes: what a transcription job's base64 audio may decode to.
        self._max_request_bytes = max_request_bytes
        self._retry = RetryPolicy(config.max_attempts, config.backoff_s)
        # Where a stored key is re-read when its job runs; None: no key store here, and a
        # job of a stored key fails rather than run on a grant that may be stale.
        self._keys = keys

    async def _grant(self, job: Job) -> router_pb2.KeyGrant | None:
        """The grant this attempt runs under: the key's current one for a stored key (or
        JobFailure: 401 revoked or expired, 403 model no longer allowed, neither retried;
        503 key store unavailable, retried), else the one recorded at submission."""
        recorded = recorded_grant(job)
        if recorded is None or not recorded.stored:
            return recorded
        if self._keys is None:
            raise JobFailure(
                GatewayError.unavailable(
                    "This job's key must be checked, and no key store is configured here.", "key_store_unavailable"
                ).to_dict()["error"],
                False,
            )
        try:
            return await self._keys.current_grant(job.api_key_id, job_model(job), job_workflow(job))
        except GatewayError as err:
            if err.status in (401, 403):
                log.info(
                    "job refused: its key no longer allows it",
                    extra={"job": job.id, "key_id": job.api_key_id, "status": err.status, "code": err.code},
                )
            # The key store unavailable (503) is worth another attempt; nothing was called.
            raise JobFailure(err.to_dict()["error"], err.status >= 500) from None

    async def _run_workflow(self, job: Job) -> dict[str, Any]:
        if self._orchestrator is None:
            raise JobFailure({"message": "workflows are turned off here", "code": "workflows_disabled"}, False)
        meta = job_meta(job, await self._grant(job))
        # The job's id names the run: the orchestrator saves each step under it, so a retry
        # (or a redelivery) resumes the run rather than starting it over.
        request = orchestrator_pb2.RunWorkflowRequest(
            meta=meta, name=str(job.request["name"]), input_json=orjson.dumps(job.request.get("input")), run_id=job.id
        )
        try:
            # wait_for_ready: an orchestrator that is restarting is waited for, not failed on.
            reply = await self._orchestrator.Run(request, timeout=self._config.job_timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            failure = GatewayError.from_rpc_error(err, "orchestrator")
            # run_busy: another copy of this run still holds it (a call that timed out here);
            # trying again later resumes it. A step's failure is the run's (its own retries,
            # as its definition asks, are spent).
            retryable = not_taken(err, failure) or failure.code == "run_busy"
            raise JobFailure(failure.to_dict()["error"], retryable) from None
        run: dict[str, Any] = orjson.loads(reply.json)
        if run.get("status") != "succeeded":
            # Its steps had their own retries: the run as a whole is not retried.
            raise JobFailure(run.get("error") or {"message": "the workflow failed"}, False)
        return run

    async def _call(self, job: Job) -> dict[str, Any]:
        if job.kind == "workflow":
            return await self._run_workflow(job)
        grant = await self._grant(job)
        file = job.request.get("file") if job.kind == "transcription" else None
        size = len(file) if isinstance(file, str) else 0
        request = await off_loop_if_large(size, job_request, job, self._max_request_bytes, grant)
        try:
            reply = await self._router.Complete(request, timeout=self._config.job_timeout_s)
        except grpc.aio.AioRpcError as err:
            failure = GatewayError.from_rpc_error(err, "router")
            raise JobFailure(failure.to_dict()["error"], not_taken(err, failure)) from None
        result: dict[str, Any] = orjson.loads(reply.openai_json) if reply.openai_json else {}
        return result

    async def run(self, job: Job) -> Job:
        """Attempts until success, a final failure, or the limit; the job in its end state
        (not yet stored as such: the caller finishes it, exactly once)."""
        while True:
            job.attempts += 1
            job.status = "running"
            await self._store.update(job)
            try:
                job.result = await self._call(job)
                job.status, job.error = "succeeded", None
                return job
            except JobFailure as failure:
                if failure.retryable and self._retry.may_retry(job.attempts):
                    delay = self._retry.backoff(job.attempts)
                    log.info(
                        "job attempt not taken; retrying",
                        extra={
                            "job": job.id,
                            "attempt": job.attempts,
                            "delay_s": round(delay, 3),
                            "error": str(failure),
                        },
                    )
                    await asyncio.sleep(delay)
                    continue
                job.status, job.error = "failed", {**failure.error, "attempts": job.attempts}
                return job
