"""Building router requests from a JSON body, for the services that call the router on
their own (jobs, workflows, the cache's and the knowledge base's embeddings)."""

from __future__ import annotations

import io
import wave
from typing import Any

import orjson

from clawdbot.common.bounded import b64decode
from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc


class BadAudio(ValueError):
    """A transcription body whose `file` is not base64, or decodes past the limit."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error  # 400 invalid_audio, or 413 request_too_large


def model_request(
    meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], max_binary_bytes: int | None = None
) -> router_pb2.ModelRequest:
    """The router request for an OpenAI body; a transcription's base64 `file` travels as
    binary beside it, decoded to at most `max_binary_bytes` (gateway.max_request_bytes; a
    transcription needs it). Raises BadAudio. Decoding is CPU work proportional to the
    file: callers with a large one run this off the event loop (bounded.off_loop_if_large)."""
    body = dict(body)
    binary = b""
    if task == "transcription":
        if max_binary_bytes is None:
            raise TypeError("a transcription's model_request needs max_binary_bytes")
        encoded = body.pop("file", "")
        if not isinstance(encoded, str) or not encoded:
            raise BadAudio(GatewayError.bad_request("'file' must be base64-encoded audio.", "file", "invalid_audio"))
        try:
            binary = b64decode(encoded, max_binary_bytes, what="'file'", param="file", code="invalid_audio")
        except GatewayError as err:
            raise BadAudio(err) from None
    return router_pb2.ModelRequest(
        meta=meta, task=task, model=str(body.get("model", "")), openai_json=orjson.dumps(body), binary=binary
    )


async def embed(
    router: router_pb2_grpc.RouterStub, meta: router_pb2.RequestMeta, model: str, texts: list[str], timeout_s: float
) -> list[list[float]]:
    """One vector per text, in order. grpc.aio.AioRpcError when the router fails."""
    body = {"model": model, "input": texts, "encoding_format": "float"}
    reply = await router.Complete(model_request(meta, "embeddings", body), timeout=timeout_s)
    data = orjson.loads(reply.openai_json)["data"]
    return [item["embedding"] for item in sorted(data, key=lambda d: d["index"])]


def _silence_wav(seconds: float = 0.25, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


def probe_request(task: str) -> tuple[dict[str, Any], bytes]:
    """The smallest real request of a task (body, audio file): what a health probe sends."""
    if task == "chat":
        return {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}, b""
    if task == "transcription":
        return {}, _silence_wav()
    if task == "speech":
        return {"input": "ok", "voice": "alloy"}, b""
    return {"input": "ping"}, b""  # embeddings, intent
