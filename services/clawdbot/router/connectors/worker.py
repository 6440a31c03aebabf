"""Connector for the worker service: local models over gRPC, OpenAI JSON both ways.

The trace context and request id travel the way they do on every internal call, added by
the mesh channel (common/service.py); `trace_headers` is for the HTTP connectors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import orjson

from clawdbot.common.errors import GatewayError
from clawdbot.common.service import internal_channel
from clawdbot.gen.v1 import worker_pb2, worker_pb2_grpc
from clawdbot.router.connectors.base import Answer
from clawdbot.router.connectors.openai import UpstreamError
from clawdbot.router.registry import Instance


def _as_upstream_error(instance: Instance, err: grpc.aio.AioRpcError) -> UpstreamError:
    failure = GatewayError.from_rpc_error(err, f"worker for {instance.id}")
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = "timeout"
    elif err.code() == grpc.StatusCode.UNAVAILABLE and failure.code == "service_unavailable":
        kind = "unreachable"
    elif failure.status >= 500:
        kind = "server_error"
    else:
        kind = "client_error"
    return UpstreamError.make(
        failure.status,
        failure.message,
        failure.type,
        failure.code or "worker_error",
        retryable=failure.status >= 500 or failure.status == 429,
        kind=kind,
        param=failure.param,
        retry_after=failure.retry_after,
    )


class WorkerConnector:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, instance: Instance) -> worker_pb2_grpc.ModelServiceStub:
        target = instance.base_url.removeprefix("grpc://")
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = internal_channel(target)
        return worker_pb2_grpc.ModelServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()

    async def call(
        self,
        instance: Instance,
        task: str,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
        binary: bytes = b"",
    ) -> Answer:
        request = worker_pb2.InferRequest(
            model=instance.upstream_model,
            task=task,
            openai_json=orjson.dumps(body),
            request_id=request_id,
            binary=binary,
        )
        try:
            reply = await self._stub(instance).Infer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise _as_upstream_error(instance, err) from None
        return Answer(orjson.loads(reply.openai_json), reply.binary, reply.content_type)

    async def stream(
        self,
        instance: Instance,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        request = worker_pb2.InferRequest(
            model=instance.upstream_model, task="chat", openai_json=orjson.dumps(body), request_id=request_id
        )
        started = False
        try:
            async for chunk in self._stub(instance).InferStream(request, timeout=timeout_s):
                started = True
                yield chunk.chunk_json
        except grpc.aio.AioRpcError as err:
            failure = _as_upstream_error(instance, err)
            failure.retryable = failure.retryable and not started
            raise failure from None
