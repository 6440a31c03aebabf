"""The job routes' work in the adapter: a submission is checked here with the synchronous
route's own parsing (a bad request is a 400 now, not a failed job later), then handed to
the jobs service, which records, queues and runs it (common/clients/jobs.py). Looking jobs
up and listing them is the jobs service's answer, as the caller's key. A submission is
admitted against the key's rate limits as one request (adapter/limits.py); the job's model
call is held to the key's models and budget when it runs (the jobs service, the router)."""

from __future__ import annotations

from typing import Any

import orjson

from clawdbot.adapter.auth import require_model
from clawdbot.adapter.limits import Admitter, token_estimate
from clawdbot.adapter.openai_requests import parse_chat, parse_embeddings
from clawdbot.common.audio_bounds import check_upload
from clawdbot.common.bounded import b64decode, off_loop_if_large
from clawdbot.common.clients.jobs import Job, JobsClient
from clawdbot.common.config import GatewayConfig
from clawdbot.common.errors import GatewayError
from clawdbot.common.jobs import check_submission
from clawdbot.gen.v1 import router_pb2


def _check_audio(encoded: str, gateway: GatewayConfig) -> None:
    """A transcription job's audio, decoded within the body limit and checked within the
    audio bounds, as the synchronous route checks an upload."""
    audio = b64decode(
        encoded, gateway.max_request_bytes, what="'request.file'", param="request.file", code="invalid_audio"
    )
    if not audio:
        raise GatewayError.bad_request(
            "'request.file' must hold the audio, base64-encoded.", "request.file", "invalid_audio"
        )
    check_upload(audio, "request.file", gateway.max_audio_seconds)


async def check_job(body: dict[str, Any], gateway: GatewayConfig) -> tuple[str, dict[str, Any], str]:
    """(kind, request, callback URL) of a submission body, or the 400 its synchronous
    route would give. The callback URL's address is the jobs service's to check: it
    delivers callbacks, under jobs.callback_allow."""
    kind, request = body.get("kind"), body.get("request")
    # The route's parser first, for its precise errors; then the shape every job has.
    if isinstance(request, dict):
        if kind == "chat":
            parse_chat(dict(request))
        elif kind == "embeddings":
            parse_embeddings(dict(request))
    kind, request = check_submission(kind, request)
    if kind == "transcription":
        encoded = str(request["file"])
        await off_loop_if_large(len(encoded), _check_audio, encoded, gateway)
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        raise GatewayError.bad_request("'callback_url' must be an http(s) URL.", "callback_url", "invalid_value")
    return kind, request, callback_url or ""


def job_tokens(request: dict[str, Any]) -> int:
    """A job's token estimate, as its synchronous route's: its JSON (the audio of a
    transcription left out: it is no text) and its output cap."""
    text = {name: value for name, value in request.items() if name != "file"}
    return token_estimate(len(orjson.dumps(text)), request)


class JobsFront:
    def __init__(self, client: JobsClient, gateway: GatewayConfig, admitter: Admitter | None = None) -> None:
        self._client = client
        # The body and audio limits a job's input is held to, as on the synchronous routes.
        self._gateway = gateway
        self._admitter = admitter or Admitter(None)

    async def submit(self, meta: router_pb2.RequestMeta, body: dict[str, Any]) -> Job:
        kind, request, callback_url = await check_job(body, self._gateway)
        # The key's models and rate limits are held to at submission, as on the
        # synchronous routes.
        require_model(str(request.get("model", "")))
        async with self._admitter.holding(job_tokens(request)):
            return await self._client.submit(meta, kind, request, callback_url)

    async def get(self, meta: router_pb2.RequestMeta, job_id: str) -> Job:
        return await self._client.get(meta, job_id)

    async def list(self, meta: router_pb2.RequestMeta, limit: int) -> list[Job]:
        return await self._client.list(meta, limit)
