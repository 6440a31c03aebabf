"""The worker service: local model runtimes behind one gRPC ModelService.

Models load in the background after the service starts serving its health; until one
is ready, requests for it get 503 (and the router's breaker and retries take over).
Each model sits in a double-buffered slot (slots.py), so LoadModel replaces it while it
serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from prometheus_client import Counter, Histogram

from clawdbot.common.config import Config, WorkerModel
from clawdbot.common.errors import GatewayError
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost
from clawdbot.gen.v1 import worker_pb2, worker_pb2_grpc
from clawdbot.worker.catalog import LoadedModel, builder
from clawdbot.worker.slots import LoadFailed, ModelSlot

log = logging.getLogger(__name__)

# At shutdown, how long a model's threads get to leave it before it is left open (below
# the service's deadline: common/lifeline.py).
MODEL_SETTLE_S = 2.0


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise GatewayError.bad_request("The request body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError.bad_request("The request body must be a JSON object.", None, "invalid_json")
    return body


class WorkerServicer(worker_pb2_grpc.ModelServiceServicer):
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._specs: dict[str, WorkerModel] = {m.name: m for m in config.worker.models}
        self.model_calls = Counter(
            "clawdbot_worker_model_calls",
            "Calls into a model runtime (a batch is one call).",
            ["model"],
            registry=metrics.registry,
        )
        self.batch_size = Histogram(
            "clawdbot_worker_batch_size",
            "Texts per model call.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=metrics.registry,
        )
        self.loads = Counter(
            "clawdbot_worker_model_loads",
            "Model loads into the standby slot, by outcome (swapped or failed).",
            ["model", "outcome"],
            registry=metrics.registry,
        )
        self._slots: dict[str, ModelSlot[LoadedModel]] = {
            spec.name: ModelSlot(spec.name, builder(spec, config.worker, self._count_batch))
            for spec in config.worker.models
        }

    def _count_batch(self, model: str, size: int) -> None:
        self.model_calls.labels(model).inc()
        self.batch_size.labels(model).observe(size)

    async def load_all(self) -> None:
        for name in self._slots:
            try:
                await self._load(name, "")
            except LoadFailed:
                continue  # the slot logged why and reports it as unavailable; load the rest

    async def _load(self, name: str, source: str) -> worker_pb2.LoadModelResponse:
        try:
            report = await self._slots[name].load(source)
        except LoadFailed:
            self.loads.labels(name, "failed").inc()
            raise
        self.loads.labels(name, "swapped").inc()
        return worker_pb2.LoadModelResponse(name=name, **report.__dict__)

    def _slot(self, name: str, task: str) -> ModelSlot[LoadedModel]:
        slot = self._slots.get(name)
        if slot is None:
            raise GatewayError.model_not_found(name)
        if self._specs[name].task != task:
            raise GatewayError.bad_request(f"`{name}` does not serve {task} requests.", "model", "model_not_supported")
        return slot

    async def Infer(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.InferResponse:
        slot = self._slot(request.model, request.task)
        body = _json_object(request.openai_json)
        with slot.use() as model:
            task = model.task
            if request.task == "speech":
                audio, content_type = await task.answer(body)
                return worker_pb2.InferResponse(
                    openai_json=b"{}", binary=audio, content_type=content_type, model_version=model.version
                )
            if request.task == "transcription":
                data = await task.answer(body, request.binary)
            else:
                data = await task.answer(body)
            return worker_pb2.InferResponse(openai_json=orjson.dumps(data), model_version=model.version)

    async def InferStream(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.InferChunk]:
        slot = self._slot(request.model, "chat")
        body = _json_object(request.openai_json)
        with slot.use() as model:
            async for payload in model.task.stream(body):
                yield worker_pb2.InferChunk(chunk_json=payload)

    async def close(self) -> None:
        """The worker's shutdown, after the gRPC server has stopped (no request arrives, and
        those in flight have had their grace). Order, and why:
          1. every slot closes: no request or load takes a model from here on, and a load
             still running never swaps in what it built (the loader itself was cancelled
             with the background work);
          2. every model is interrupted: a generation stops at its next token, the model's
             thread pool takes no more work and its queued generations never start;
          3. each model is freed once its threads have left it, within MODEL_SETTLE_S; one
             still computing (a prompt being evaluated is one C call) is left open, since
             freeing it under the computation would crash: the entry point then leaves its
             thread behind and exits (common/lifeline.py), which frees it.
        All slots at once: every interrupt is sent before any wait."""
        await asyncio.gather(*(slot.close(MODEL_SETTLE_S) for slot in self._slots.values()))

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.WorkerListModelsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerListModelsResponse:
        return worker_pb2.WorkerListModelsResponse(
            models=[
                worker_pb2.WorkerModel(name=spec.name, task=spec.task, runtime=spec.runtime, **slot.describe())
                for spec, slot in ((self._specs[name], slot) for name, slot in self._slots.items())
            ]
        )

    async def LoadModel(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadModelResponse:
        if request.name not in self._slots:
            raise GatewayError.model_not_found(request.name)
        try:
            return await self._load(request.name, request.source)
        except LoadFailed as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("unreachable: abort raises")


def create_server(config: Config) -> ServiceHost:
    metrics = Metrics("worker")
    host = ServiceHost("worker", config.worker, metrics, reflection_services=("clawdbot.v1.ModelService",))
    servicer = WorkerServicer(config, metrics)
    worker_pb2_grpc.add_ModelServiceServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.ModelService")
    host.in_background(servicer.load_all)
    host.on_shutdown(servicer.close)
    return host
