"""The orchestrator service: workflows from config/workflows/ run step by step through the
router, with retrieval from a knowledge base in Qdrant (embedded locally, or a server)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict
from typing import Any

import grpc
import orjson

from clawdbot.common.config import Config, OrchestratorConfig, repo_path
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.common.logging import request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.gen.v1 import orchestrator_pb2, orchestrator_pb2_grpc, router_pb2, router_pb2_grpc
from clawdbot.orchestrator.definitions import load_catalog
from clawdbot.orchestrator.engine import Engine, ModelCaller, StepFailed
from clawdbot.orchestrator.retrieval import KnowledgeBase, RetrievalUnavailable
from clawdbot.router.requests import embed

log = logging.getLogger(__name__)


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
        meta = router_pb2.RequestMeta(request_id="knowledge-base", protocol="internal")
        return await embed(self._router, meta, self._config.embeddings_model, texts, 120)

    async def fill(self) -> None:
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


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, config: Config, router: router_pb2_grpc.RouterStub, knowledge: Knowledge | None) -> None:
        self.catalog = load_catalog(repo_path(config.orchestrator.workflows_dir))
        for problem in self.catalog.problems:
            log.error("workflow refused", extra={"problem": problem})
        self.engine = Engine(lambda: self.catalog, ModelCaller(router), knowledge)

    async def Run(  # noqa: N802 - gRPC method name
        self, request: orchestrator_pb2.RunWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.WorkflowReply:
        request_id_var.set(request.meta.request_id)
        try:
            run_input = orjson.loads(request.input_json) if request.input_json else None
            run = await self.engine.run(request.name, run_input, request.meta)
            return orchestrator_pb2.WorkflowReply(json=orjson.dumps(run))
        except GatewayError as err:
            await err.abort(context)
        except orjson.JSONDecodeError:
            await GatewayError.bad_request("The workflow input is not valid JSON.", "input").abort(context)
        except Exception:
            log.exception("workflow run failed", extra={"workflow": request.name})
            await internal_error().abort(context)
        raise AssertionError("unreachable: abort raises")

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
            error = GatewayError(
                404, f"No workflow named `{request.name}`.", "invalid_request_error", "workflow_not_found"
            )
            await error.abort(context)
            raise AssertionError("unreachable: abort raises")
        described = {
            **workflow.describe(),
            "steps": [s.model_dump(by_alias=True, exclude_none=True) for s in workflow.steps],
        }
        return orchestrator_pb2.WorkflowReply(json=orjson.dumps(described))


def create_server(config: Config) -> ServiceHost:
    host = ServiceHost("orchestrator", config.orchestrator, Metrics("orchestrator"))
    router_channel = internal_channel(f"{config.router.host}:{config.router.grpc_port}")
    router = router_pb2_grpc.RouterStub(router_channel)
    knowledge = Knowledge(config.orchestrator, router) if config.orchestrator.knowledge_dir else None
    servicer = OrchestratorServicer(config, router, knowledge)
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.Orchestrator")

    async def close() -> None:
        if knowledge is not None:
            await knowledge.base.close()
        await router_channel.close(grace=None)

    if knowledge is not None:
        host.in_background(knowledge.fill)
    host.on_shutdown(close)
    return host
