"""The caller's side of the jobs service (protos/clawdbot/v1/jobs.proto).

The jobs service is the one home of async jobs, with Kafka or without: it records a job,
queues it and runs it through the router. The adapter parses a job's request as it parses
the synchronous route's body, then submits it here; the jobs service checks the shape
again (common/jobs.py check_submission, a size bound, the callback URL), trusting no
caller.

Deadlines and retries, decided once here:
- Submit is never retried: it is not idempotent (a retry after an answer lost on the way
  would queue the job twice). A jobs process that is restarting is waited for
  (wait_for_ready, within the deadline) rather than failed on at once.
- Get and List are reads: a call whose connection broke is tried again (RetryPolicy).
The trace context, the request id and the internal credential come with the channel
(common/service.py mesh_channel).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final

import grpc
import orjson

from clawdbot.common.errors import GatewayError
from clawdbot.common.retry import RetryPolicy, retryable_grpc
from clawdbot.gen.v1 import gateway_pb2, jobs_pb2, jobs_pb2_grpc, router_pb2

log = logging.getLogger(__name__)

# Submit waits for Kafka to take the job, which may take its producer's send timeout
# (15 s) while the broker restarts: room above that.
SUBMIT_TIMEOUT_S: Final = 30.0
READ_TIMEOUT_S: Final = 10.0
READ_RETRY: Final = RetryPolicy(max_attempts=3, base_s=0.05, max_backoff_s=0.5)


@dataclass(frozen=True)
class Job:
    """A job as its owner sees it (GET /v1/jobs/{id}), as the jobs service answered it."""

    id: str
    status: str
    durable: bool
    shown: dict[str, Any]

    @classmethod
    def from_json(cls, raw: bytes) -> Job:
        shown = orjson.loads(raw)
        if not isinstance(shown, dict) or not isinstance(shown.get("id"), str):
            raise GatewayError(502, "The jobs service answered with something that is no job.", "server_error")
        return cls(str(shown["id"]), str(shown.get("status", "")), bool(shown.get("durable")), shown)

    def public(self) -> dict[str, Any]:
        return self.shown


def _failure(err: grpc.aio.AioRpcError) -> GatewayError:
    return GatewayError.from_rpc_error(err, "jobs")


class JobsClient:
    """Submit, look up and list jobs on the jobs service, as the owner `meta.api_key_id`.
    Failures are GatewayErrors: the jobs service's own (a bad callback URL is a 400
    naming it, a full in-process queue a 503), or 503 when it cannot be reached."""

    def __init__(self, stub: jobs_pb2_grpc.JobsStub) -> None:
        self._stub = stub

    async def submit(
        self, meta: router_pb2.RequestMeta, kind: str, request: dict[str, Any], callback_url: str = ""
    ) -> Job:
        submission = jobs_pb2.JobSubmission(
            meta=meta, kind=kind, request_json=orjson.dumps(request), callback_url=callback_url
        )
        try:
            reply = await self._stub.Submit(submission, timeout=SUBMIT_TIMEOUT_S, wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            raise _failure(err) from None
        return Job.from_json(reply.json)

    async def get(self, meta: router_pb2.RequestMeta, job_id: str) -> Job:
        lookup = jobs_pb2.JobLookup(meta=meta, request=gateway_pb2.GetJobRequest(id=job_id))
        reply = await self._read(self._stub.Get, lookup)
        return Job.from_json(reply.json)

    async def list(self, meta: router_pb2.RequestMeta, limit: int) -> list[Job]:
        listing = jobs_pb2.JobListing(meta=meta, request=gateway_pb2.ListJobsRequest(limit=limit))
        reply = await self._read(self._stub.List, listing)
        return [Job.from_json(view.json) for view in reply.jobs]

    async def _read(self, method: Any, request: Any) -> Any:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await method(request, timeout=READ_TIMEOUT_S, wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                # The jobs process went away mid-call (another may answer, or it is back).
                if not (retryable_grpc(err.code()) and READ_RETRY.may_retry(attempts)):
                    raise _failure(err) from None
                log.info("jobs service call failed; retrying", extra={"attempt": attempts, "code": err.code().name})
                await asyncio.sleep(READ_RETRY.backoff(attempts))
