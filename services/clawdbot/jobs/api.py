"""The job API as the adapter serves it: submit (answered once the queue has the job),
look one up, list one's own. Requests are checked before they are queued, with the same
rules as the synchronous routes, so a bad one is a 400 now rather than a failed job later."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urlsplit

from clawdbot.adapter.openai_requests import parse_chat, parse_embeddings
from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import router_pb2
from clawdbot.jobs.queue import JobQueue
from clawdbot.jobs.records import KINDS, Job, new_job_id
from clawdbot.jobs.store import JobStore

MAX_LIST = 100


def _check_request(kind: Any, request: Any) -> None:
    if kind not in KINDS:
        raise GatewayError.bad_request(
            f"Invalid 'kind': {kind!r}. Supported kinds are: " + ", ".join(f"'{k}'" for k in KINDS) + ".",
            "kind",
            "invalid_value",
        )
    if not isinstance(request, dict):
        raise GatewayError.bad_request("'request' must be an object: the body of the synchronous route.", "request")
    if kind == "chat":
        parse_chat(dict(request))
    elif kind == "embeddings":
        parse_embeddings(dict(request))
    elif kind == "workflow":
        if not isinstance(request.get("name"), str) or not request["name"]:
            raise GatewayError.bad_request(
                "A workflow job's request is {name, input}: 'request.name' is missing.", "request.name"
            )
    else:
        if not isinstance(request.get("model"), str) or not request["model"]:
            raise GatewayError.bad_request("Missing required parameter: 'request.model'.", "request.model")
        try:
            audio = base64.b64decode(str(request.get("file", "")), validate=True)
        except (binascii.Error, ValueError):
            audio = b""
        if not audio:
            raise GatewayError.bad_request("'request.file' must hold the audio, base64-encoded.", "request.file")


def _check_callback(url: Any) -> str:
    if url is None or url == "":
        return ""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise GatewayError.bad_request("'callback_url' must be an http(s) URL.", "callback_url", "invalid_value")
    return str(url)


class JobsApi:
    def __init__(self, store: JobStore, queue: JobQueue) -> None:
        self._store = store
        self._queue = queue

    async def submit(self, meta: router_pb2.RequestMeta, body: dict[str, Any]) -> Job:
        kind, request = body.get("kind"), body.get("request")
        _check_request(kind, request)
        job = Job(
            id=new_job_id(),
            kind=str(kind),
            api_key_id=meta.api_key_id,
            request=dict(request or {}),
            callback_url=_check_callback(body.get("callback_url")),
            durable=self._store.durable and self._queue.durable,
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

    async def close(self) -> None:
        await self._queue.close()
        await self._store.close()
