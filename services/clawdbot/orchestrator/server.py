"""The orchestrator service: workflows from config/workflows/ run step by step through the
cache and the router, with retrieval from a knowledge base in Qdrant (embedded locally, or
a server). Runs are answered whole (Run) or as progress events (RunStream); a run with an
id is durable (see run_state.py)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc
import orjson

from clawdbot.common.clients.cache import ResponseCache
from clawdbot.common.clients.router import embed
from clawdbot.common.config import Config, OrchestratorConfig, repo_path
from clawdbot.common.errors import GatewayError
from clawdbot.common.jobs import store_url
from clawdbot.common.logging import request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost, mesh_channel
from clawdbot.gen.v1 import cache_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, router_pb2, router_pb2_grpc
from clawdbot.orchestrator.catalog_watch import CatalogWatch
from clawdbot.orchestrator.definitions import Catalog
from clawdbot.orchestrator.engine import Engine, ModelCaller, StepFailed
from clawdbot.orchestrator.retrieval import KnowledgeBase, RetrievalUnavailable
from clawdbot.orchestrator.run_state import LeaseLost, MemoryRunStore, RedisRunStore, RunStore

log = logging.getLogger(__name__)

# The request id of the knowledge base's own embedding calls, made while it fills.
KNOWLEDGE_BASE_REQUEST_ID = "knowledge-base"


class Knowledge:
    """The knowledge base, filled in the background (the embeddings model may still be
    loading when the orchestrator starts); retrieval says so until it is ready."""

    def __init__(self, config: OrchestratorConfig, router: router_pb2_grpc.RouterStub) -> None:
        self._config = config
        self._router = router
        self.ready = False
        self.base = KnowledgeBase(
            config.collection,
            self._embed,
            path=None if config.qdrant_url else config.qdrant_path,
            url=config.qdrant_url or None,
            api_key=os.environ.get(config.qdrant_api_key_env) or None,
            # A different embeddings model makes every stored vector stale: part of the hash.
            embedder_id=config.embeddings_model,
        )

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        meta = router_pb2.RequestMeta(request_id=KNOWLEDGE_BASE_REQUEST_ID, protocol="internal")
        return await embed(self._router, meta, self._config.embeddings_model, texts, 120)

    async def fill(self) -> None:
        # Background work, no request's: its calls (and their logs downstream) say so.
        request_id_var.set(KNOWLEDGE_BASE_REQUEST_ID)
        folder = repo_path(self._config.knowledge_dir)
        while True:
            try:
                chunks = await self.base.ingest(folder)
                self.ready = True
                log.info("knowledge base ready", extra={"chunks": chunks, "folder": str(folder)})
                return
            except RetrievalUnavailable as exc:
                if isinstance(exc.__cause__, grpc.aio.AioRpcError):
                    # The embeddings model is not serving yet (the worker is still loading).
                    log.info("knowledge base waits for embeddings", extra={"error": exc.__cause__.code().name})
                else:
                    log.error("knowledge base unavailable", extra={"error": str(exc)})
            await asyncio.sleep(2)

    async def __call__(self, query: str, top_k: int, min_score: float | None) -> list[dict[str, Any]]:
        if not self.ready:
            raise StepFailed({"message": "the knowledge base is still being built", "code": "retrieval_not_ready"})
        try:
            hits = await self.base.search(query, top_k=top_k, min_score=min_score)
        except RetrievalUnavailable as exc:
            raise StepFailed({"message": str(exc), "code": "retrieval_unavailable"}) from exc
        return [asdict(hit) for hit in hits]


def run_store(config: Config) -> RunStore:
    """Redis when durable runs can happen (jobs over Kafka) or one is named; else memory."""
    url = config.orchestrator.redis_url or (store_url(config) if config.jobs.over_kafka else "")
    if not url:
        return MemoryRunStore()
    return RedisRunStore(url, config.orchestrator.run_retention_s, config.orchestrator.run_lease_s, config.redis)


def run_busy() -> GatewayError:
    return GatewayError(409, "The run was taken over elsewhere.", "conflict", "run_busy")


def _ended(run: dict[str, Any]) -> None:
    """One line per run (with the request and trace id, like every line written while
    serving it): what an operator searches for first."""
    log.info(
        "workflow run ended",
        extra={
            "workflow": run.get("workflow"),
            "run_id": run.get("run_id"),
            "status": run.get("status"),
            "duration_ms": run.get("duration_ms"),
        },
    )


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, watch: CatalogWatch, engine: Engine) -> None:
        self.watch = watch
        self.engine = engine

    @property
    def catalog(self) -> Catalog:
        return self.watch.catalog

    @staticmethod
    def _input(request: orchestrator_pb2.RunWorkflowRequest) -> Any:
        try:
            return orjson.loads(request.input_json) if request.input_json else None
        except orjson.JSONDecodeError:
            raise GatewayError.bad_request("The workflow input is not valid JSON.", "input") from None

    async def Run(  # noqa: N802 - gRPC method name
        self, request: orchestrator_pb2.RunWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.WorkflowReply:
        try:
            run = await self.engine.run(request.name, self._input(request), request.meta, run_id=request.run_id)
        except LeaseLost:
            raise run_busy() from None
        _ended(run)
        return orchestrator_pb2.WorkflowReply(json=orjson.dumps(run))

    async def RunStream(  # noqa: N802 - gRPC method name
        self, request: orchestrator_pb2.RunWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.WorkflowEvent]:
        """The run's events as they happen; an error before the first is the call's status."""
        # The run's events, then None once it ended (however it ended).
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        run_input = self._input(request)
        # The task copies this call's context: the run's spans are children of the call's.
        running = asyncio.create_task(
            self.engine.run(request.name, run_input, request.meta, run_id=request.run_id, emit=events.put_nowait)
        )
        running.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield orchestrator_pb2.WorkflowEvent(json=orjson.dumps(event))
            _ended(running.result())  # or raises what ended a run that did not complete
        except LeaseLost:
            raise run_busy() from None
        finally:
            running.cancel()

    async def List(  # noqa: N802 - gRPC method name
        self, request: orchestrator_pb2.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.WorkflowReply:
        listed = {
            "object": "list",
            "data": [w.describe() for w in self.catalog.workflows.values()],
            "problems": self.catalog.problems,
        }
        return orchestrator_pb2.WorkflowReply(json=orjson.dumps(listed))

    async def Describe(  # noqa: N802 - gRPC method name
        self, request: orchestrator_pb2.DescribeWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.WorkflowReply:
        workflow = self.catalog.workflows.get(request.name)
        if workflow is None:
            raise GatewayError(
                404, f"No workflow named `{request.name}`.", "invalid_request_error", "workflow_not_found"
            )
        described = {
            **workflow.describe(),
            "steps": [s.model_dump(by_alias=True, exclude_none=True) for s in workflow.steps],
        }
        return orchestrator_pb2.WorkflowReply(json=orjson.dumps(described))


def create_server(config: Config) -> ServiceHost:
    host = ServiceHost("orchestrator", config.orchestrator, Metrics("orchestrator"))
    channels = [mesh_channel(config.router)]
    router = router_pb2_grpc.RouterStub(channels[0])
    cache = None
    if config.cache.enabled:
        channels.append(mesh_channel(config.cache))
        cache = ResponseCache(cache_pb2_grpc.CacheServiceStub(channels[-1]), config.cache, config.models, router)
    knowledge = Knowledge(config.orchestrator, router) if config.orchestrator.knowledge_dir else None
    watch = CatalogWatch(repo_path(config.orchestrator.workflows_dir))
    runs = run_store(config)
    caller = ModelCaller(router, cache, max_request_bytes=config.gateway.max_request_bytes)
    engine = Engine(lambda: watch.catalog, caller, knowledge, runs, limits=config.gateway)
    servicer = OrchestratorServicer(watch, engine)
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.Orchestrator")

    async def close() -> None:
        if knowledge is not None:
            await knowledge.base.close()
        await runs.close()
        for channel in channels:
            await channel.close(grace=None)

    if knowledge is not None:
        host.in_background(knowledge.fill)
    if config.orchestrator.reload_interval_s > 0:
        interval = config.orchestrator.reload_interval_s
        host.in_background(lambda: watch.watch(interval))
    host.on_shutdown(close)
    return host
