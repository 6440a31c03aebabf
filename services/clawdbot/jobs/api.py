"""The job API as the adapter serves it: submit (answered once the queue has the job),
look one up, list one's own. Requests are checked before they are queued, with the same
rules as the synchronous routes, so a bad one is a 400 now rather than a failed job later."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clawdbot.adapter.openai_requests import parse_chat, parse_embeddings
from clawdbot.common.audio_bounds import check_upload
from clawdbot.common.bounded import b64decode, off_loop_if_large
from clawdbot.common.config import GatewayConfig
from clawdbot.common.errors import GatewayError
from clawdbot.common.guarded_http import check_url
from clawdbot.common.url_policy import AddressPolicy, UrlRefused
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
        if not isinstance(request.get("file"), str) or not request["file"]:
            raise GatewayError.bad_request(
                "'request.file' must hold the audio, base64-encoded.", "request.file", "invalid_audio"
            )


def _check_audio(encoded: str, gateway: GatewayConfig) -> None:
    """A transcription job's audio, decoded within the body limit and checked within the
    audio bounds now, so a bad file is a 400 at submit rather than a failed job later."""
    audio = b64decode(
        encoded, gateway.max_request_bytes, what="'request.file'", param="request.file", code="invalid_audio"
    )
    if not audio:
        raise GatewayError.bad_request(
            "'request.file' must hold the audio, base64-encoded.", "request.file", "invalid_audio"
        )
    check_upload(audio, "request.file", gateway.max_audio_seconds)


MAX_CALLBACK_URL = 2048


async def _check_callback(url: Any, policy: AddressPolicy) -> str:
    """The callback URL, or a 400 naming it when it is known bad now: not http(s),
    credentials in it, a spelling URL parsers disagree on, or an address (literal, or all
    a name resolves to) that only `jobs.callback_allow` could allow. Delivery checks again
    at connect time, for names that resolve differently by then."""
    if url is None or url == "":
        return ""
    if not isinstance(url, str) or len(url) > MAX_CALLBACK_URL:
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


class JobsApi:
    def __init__(
        self,
        store: JobStore,
        queue: JobQueue,
        callback_allow: Iterable[str] = (),
        *,
        gateway: GatewayConfig | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        # The body and audio limits a job's input is held to, as on the synchronous routes.
        self._gateway = gateway or GatewayConfig()
        self._callback_policy = AddressPolicy.from_allowlist(callback_allow)

    async def submit(self, meta: router_pb2.RequestMeta, body: dict[str, Any]) -> Job:
        kind, request = body.get("kind"), body.get("request")
        _check_request(kind, request)
        if kind == "transcription" and isinstance(request, dict):  # _check_request made sure of both
            encoded = str(request["file"])
            await off_loop_if_large(len(encoded), _check_audio, encoded, self._gateway)
        callback_url = await _check_callback(body.get("callback_url"), self._callback_policy)
        job = Job(
            id=new_job_id(),
            kind=str(kind),
            api_key_id=meta.api_key_id,
            request=dict(request or {}),
            callback_url=callback_url,
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
