"""The jobs service's API (protos/clawdbot/v1/jobs.proto): submit (answered once the queue
has the job), look one up, list one's own.

The adapter parsed the request before submitting it, with the synchronous route's rules,
so that a bad one is a 400 at once rather than a failed job later. This side trusts no
caller all the same: a submission's size, kind and shape (common/clients/jobs.py
check_submission) and its callback URL are checked here before anything is recorded.
The owner is the caller's meta.api_key_id: the key the adapter authenticated; its grant
(meta.grant) is kept with the job and passes on to the router when the job runs
(re-read from the key store first for a stored key: jobs/keys.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import orjson

from clawdbot.common.bounded import too_large
from clawdbot.common.errors import GatewayError
from clawdbot.common.guarded_http import check_url
from clawdbot.common.jobs import check_submission
from clawdbot.common.url_policy import AddressPolicy, UrlRefused
from clawdbot.gen.v1 import jobs_pb2, jobs_pb2_grpc, router_pb2
from clawdbot.jobs.queue import JobQueue
from clawdbot.jobs.records import Job, grant_json, new_job_id
from clawdbot.jobs.store import JobStore

MAX_LIST = 100
MAX_CALLBACK_URL = 2048


async def _check_callback(url: str, policy: AddressPolicy) -> str:
    """The callback URL, or a 400 naming it when it is known bad now: not http(s),
    credentials in it, a spelling URL parsers disagree on, or an address (literal, or all
    a name resolves to) that only `jobs.callback_allow` could allow. Delivery checks again
    at connect time, for names that resolve differently by then."""
    if not url:
        return ""
    if len(url) > MAX_CALLBACK_URL:
        raise GatewayError.bad_request(
            f"'callback_url' must be an http(s) URL of at most {MAX_CALLBACK_URL} characters.",
            "callback_url",
            "invalid_value",
        )
    try:
        await check_url(url, policy)
    except UrlRefused as exc:
        raise GatewayError.bad_request(
            f"'callback_url' {exc}. Callbacks go to public addresses only, unless the gateway's "
            "jobs.callback_allow lists the target.",
            "callback_url",
            "invalid_value",
        ) from None
    return url


def _request_object(raw: bytes, max_bytes: int) -> Any:
    """The submitted request, no larger than a synchronous route's body may be."""
    if len(raw) > max_bytes:
        raise too_large(max_bytes, "'request'", "request")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError.bad_request("'request' must be a JSON object.", "request") from None


class JobsApi:
    def __init__(
        self, store: JobStore, queue: JobQueue, callback_allow: Iterable[str] = (), *, max_request_bytes: int
    ) -> None:
        self._store = store
        self._queue = queue
        # gateway.max_request_bytes: the body limit a job's request is held to, as on the
        # synchronous routes.
        self._max_request_bytes = max_request_bytes
        self._callback_policy = AddressPolicy.from_allowlist(callback_allow)

    async def submit(self, meta: router_pb2.RequestMeta, kind: str, request_json: bytes, callback_url: str) -> Job:
        kind, request = check_submission(kind, _request_object(request_json, self._max_request_bytes))
        callback_url = await _check_callback(callback_url, self._callback_policy)
        job = Job(
            id=new_job_id(),
            kind=kind,
            api_key_id=meta.api_key_id,
            request=request,
            callback_url=callback_url,
            durable=self._store.durable and self._queue.durable,
            grant=grant_json(meta),
        )
        await self._store.create(job)
        try:
            await self._queue.send(job)
        except GatewayError as err:
            job.status, job.error = "failed", err.to_dict()["error"]
            await self._store.finish(job)
            raise
        return job

    async def get(self, meta: router_pb2.RequestMeta, job_id: str) -> Job:
        job = await self._store.get(job_id) if job_id else None
        # Another key's job does not exist, as far as this caller can tell.
        if job is None or job.api_key_id != meta.api_key_id:
            raise GatewayError(404, f"No job with id '{job_id}'.", "invalid_request_error", "job_not_found", "id")
        return job

    async def list(self, meta: router_pb2.RequestMeta, limit: int) -> list[Job]:
        return await self._store.list(meta.api_key_id, max(1, min(limit or 20, MAX_LIST)))


def _view(job: Job) -> jobs_pb2.JobView:
    return jobs_pb2.JobView(json=orjson.dumps(job.public()))


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """clawdbot.v1.Jobs. Errors are raised as GatewayError: the server gate
    (common/server_gate.py) answers them with their status and the error in the trailers,
    which the caller's client rebuilds."""

    def __init__(self, api: JobsApi) -> None:
        self._api = api

    async def Submit(  # noqa: N802 - gRPC method name
        self, request: jobs_pb2.JobSubmission, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.JobView:
        job = await self._api.submit(request.meta, request.kind, request.request_json, request.callback_url)
        return _view(job)

    async def Get(  # noqa: N802 - gRPC method name
        self, request: jobs_pb2.JobLookup, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.JobView:
        return _view(await self._api.get(request.meta, request.request.id))

    async def List(  # noqa: N802 - gRPC method name
        self, request: jobs_pb2.JobListing, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.JobViews:
        jobs = await self._api.list(request.meta, request.request.limit)
        return jobs_pb2.JobViews(jobs=[_view(job) for job in jobs])
