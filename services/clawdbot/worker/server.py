"""The worker service: local model runtimes behind one gRPC ModelService.

Models load in the background after the service starts serving its health; until one
is ready, requests for it get 503 (and the router's breaker and retries take over).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import orjson
from prometheus_client import Counter, Histogram

from clawdbot.common.config import Config, WorkerModel
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.common.logging import request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost
from clawdbot.gen.v1 import worker_pb2, worker_pb2_grpc
from clawdbot.worker.batching import Batcher
from clawdbot.worker.embeddings import EmbeddingsTask
from clawdbot.worker.runtimes.minilm import MiniLM, ModelUnavailable

log = logging.getLogger(__name__)

TASK_OF_RUNTIME = {"minilm": "embeddings"}


class WorkerServicer(worker_pb2_grpc.ModelServiceServicer):
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config.worker
        self._models: dict[str, EmbeddingsTask] = {}
        self._state: dict[str, tuple[str, str]] = {m.name: ("loading", "") for m in config.worker.models}
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

    async def load_all(self) -> None:
        for spec in self._config.models:
            await self._load(spec)

    async def _load(self, spec: WorkerModel) -> None:
        try:
            model = await asyncio.to_thread(MiniLM.load, Path(self._config.model_dir) / spec.name)
        except ModelUnavailable as exc:
            self._state[spec.name] = ("unavailable", str(exc))
            log.error("model unavailable", extra={"model": spec.name, "error": str(exc)})
            return

        def counted(size: int, name: str = spec.name) -> None:
            self.model_calls.labels(name).inc()
            self.batch_size.labels(name).observe(size)

        window_s = self._config.batch_window_ms / 1000
        batcher = Batcher(model.embed, window_s, self._config.max_batch, counted)
        self._models[spec.name] = EmbeddingsTask(spec.name, model, batcher)
        self._state[spec.name] = ("ready", "")
        log.info("model ready", extra={"model": spec.name, "runtime": spec.runtime})

    def _task(self, name: str) -> EmbeddingsTask:
        task = self._models.get(name)
        if task is not None:
            return task
        state, detail = self._state.get(name, ("unknown", ""))
        if state == "unknown":
            raise GatewayError.model_not_found(name)
        raise GatewayError.unavailable(f"The local model `{name}` is {state}" + (f": {detail}" if detail else "."))

    async def Infer(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.InferResponse:
        request_id_var.set(request.request_id)
        try:
            task = self._task(request.model)
            if request.task != "embeddings":
                raise GatewayError.bad_request(f"`{request.model}` does not serve {request.task} requests.", "model")
            body = orjson.loads(request.openai_json)
            if not isinstance(body, dict):
                raise GatewayError.bad_request("The request body must be a JSON object.")
            return worker_pb2.InferResponse(openai_json=orjson.dumps(await task.answer(body)))
        except GatewayError as err:
            await err.abort(context)
        except orjson.JSONDecodeError:
            await GatewayError.bad_request("The request body is not valid JSON.", None, "invalid_json").abort(context)
        except Exception:
            log.exception("inference failed")
            await internal_error().abort(context)
        raise AssertionError("unreachable: abort raises")

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.WorkerListModelsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerListModelsResponse:
        return worker_pb2.WorkerListModelsResponse(
            models=[
                worker_pb2.WorkerModel(
                    name=m.name,
                    task=TASK_OF_RUNTIME[m.runtime],
                    runtime=m.runtime,
                    state=self._state[m.name][0],
                    detail=self._state[m.name][1],
                )
                for m in self._config.models
            ]
        )


def create_server(config: Config) -> ServiceHost:
    metrics = Metrics("worker")
    host = ServiceHost("worker", config.worker, metrics, reflection_services=("clawdbot.v1.ModelService",))
    servicer = WorkerServicer(config, metrics)
    worker_pb2_grpc.add_ModelServiceServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.ModelService")
    host.in_background(servicer.load_all)
    return host
