"""What every party to an async job agrees on: its kinds and statuses, the shape a
submission must have, and where job records live. The adapter holds a submission to the
shape before handing it to the jobs service (common/clients/jobs.py), and the jobs
service again, trusting no caller; the orchestrator keeps the runs of workflow jobs
beside the job records."""

from __future__ import annotations

from typing import Any, Final, Literal

from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError

Status = Literal["queued", "running", "succeeded", "failed"]
TERMINAL: Final = ("succeeded", "failed")
KINDS: Final = ("chat", "embeddings", "transcription", "workflow")


def store_url(config: Config) -> str:
    """The Redis job records live in: the jobs' own, or else the cache's. Workflow runs
    started by jobs are saved beside them (the orchestrator's run store)."""
    return config.jobs.redis_url or config.cache.redis_url


def _missing(param: str) -> GatewayError:
    return GatewayError.bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _text(request: dict[str, Any], field: str) -> bool:
    value = request.get(field)
    return isinstance(value, str) and bool(value)


def check_submission(kind: Any, request: Any) -> tuple[str, dict[str, Any]]:
    """The shape of a job, held to by the adapter (after its route's parser) and by the
    jobs service: a known kind, a request object, and each kind's required fields.
    (kind, request) when it holds; GatewayError 400 naming the parameter when not."""
    if kind not in KINDS:
        raise GatewayError.bad_request(
            f"Invalid 'kind': {kind!r}. Supported kinds are: " + ", ".join(f"'{k}'" for k in KINDS) + ".",
            "kind",
            "invalid_value",
        )
    if not isinstance(request, dict):
        raise GatewayError.bad_request("'request' must be an object: the body of the synchronous route.", "request")
    if kind == "chat":
        if not _text(request, "model"):
            raise _missing("model")
        if not isinstance(request.get("messages"), list) or not request["messages"]:
            raise _missing("messages")
    elif kind == "embeddings":
        if not _text(request, "model"):
            raise _missing("model")
        if request.get("input") is None:
            raise _missing("input")
    elif kind == "workflow":
        if not _text(request, "name"):
            raise GatewayError.bad_request(
                "A workflow job's request is {name, input}: 'request.name' is missing.", "request.name"
            )
    else:  # transcription
        if not _text(request, "model"):
            raise GatewayError.bad_request("Missing required parameter: 'request.model'.", "request.model")
        if not _text(request, "file"):
            raise GatewayError.bad_request(
                "'request.file' must hold the audio, base64-encoded.", "request.file", "invalid_audio"
            )
    return str(kind), request
