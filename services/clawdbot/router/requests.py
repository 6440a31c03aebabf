"""Building router requests from a JSON body, for the services that call the router on
their own (jobs, workflows, the cache's and the knowledge base's embeddings)."""

from __future__ import annotations

import base64
import binascii
import io
import wave
from typing import Any

import orjson

from clawdbot.gen.v1 import router_pb2, router_pb2_grpc


class BadAudio(ValueError):
    """A transcription body whose `file` is not base64."""


def model_request(meta: router_pb2.RequestMeta, task: str, body: dict[str, Any]) -> router_pb2.ModelRequest:
    """The router request for an OpenAI body; a transcription's base64 `file` travels as
    binary beside it. Raises BadAudio."""
    body = dict(body)
    binary = b""
    if task == "transcription":
        try:
            binary = base64.b64decode(str(body.pop("file", "")), validate=True)
        except (binascii.Error, ValueError):
            raise BadAudio("'file' must be base64-encoded audio") from None
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
