"""Running a workflow: every step starts as soon as the steps it depends on have finished,
so independent steps run at the same time. Each step's `if` is checked first (false:
skipped), then it is attempted up to its retry limit within its timeout; a failure either
fails the run or, with `on_error: continue`, is recorded for later steps to act on.

Model steps go through the router, so routing, fallbacks and breakers apply per step.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import grpc
import orjson

from clawdbot.common.errors import GatewayError
from clawdbot.common.telemetry import inject_headers
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.orchestrator.definitions import Catalog, Step, Workflow
from clawdbot.orchestrator.expressions import ExpressionError, render, truthy
from clawdbot.router.requests import BadAudio, model_request

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 300.0
MAX_DEPTH = 5  # workflows within workflows


class StepFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "step failed"))
        self.error = error


class Retriever(Protocol):
    async def __call__(self, query: str, top_k: int, min_score: float | None) -> list[dict[str, Any]]: ...


@dataclass
class StepRecord:
    id: str
    type: str
    status: str = "pending"  # pending | running | succeeded | failed | skipped | cancelled
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    instance: str = ""
    error: dict[str, Any] | None = None
    output: Any = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def public(self) -> dict[str, Any]:
        """What a run reports of the step (its output is the run's to show, by template)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("done", "output")}


class ModelCaller:
    """A model step's call: the router, with the run's request metadata."""

    def __init__(self, router: router_pb2_grpc.RouterStub) -> None:
        self._router = router

    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str]:
        try:
            request = model_request(meta, task, body)
        except BadAudio as exc:
            raise StepFailed({"message": str(exc), "code": "invalid_audio"}) from None
        try:
            reply = await self._router.Complete(request, timeout=timeout_s, metadata=list(inject_headers().items()))
        except grpc.aio.AioRpcError as err:
            raise StepFailed(GatewayError.from_rpc_error(err, "router").to_dict()["error"]) from None
        output: Any = orjson.loads(reply.openai_json) if reply.openai_json else {}
        if reply.binary:
            output = {**output, "audio": base64.b64encode(reply.binary).decode(), "content_type": reply.content_type}
        return output, reply.instance


class Engine:
    def __init__(
        self, catalog: Callable[[], Catalog], call_model: ModelCaller, retrieve: Retriever | None = None
    ) -> None:
        self._catalog = catalog
        self._call_model = call_model
        self._retrieve = retrieve

    async def run(self, name: str, run_input: Any, meta: router_pb2.RequestMeta, depth: int = 0) -> dict[str, Any]:
        workflow = self._catalog().workflows.get(name)
        if workflow is None:
            raise GatewayError(
                404, f"No workflow named `{name}`.", "invalid_request_error", "workflow_not_found", "name"
            )
        if depth > MAX_DEPTH:
            raise GatewayError.bad_request(f"workflows nest deeper than {MAX_DEPTH} levels", "workflow")
        started = time.time()
        records = {s.id: StepRecord(s.id, s.type) for s in workflow.steps}
        context: dict[str, Any] = {"input": run_input, "steps": {}}
        tasks = [
            asyncio.create_task(self._step(workflow, step, records, context, meta, depth)) for step in workflow.steps
        ]
        failure: StepFailed | None = None
        try:
            for finished in asyncio.as_completed(tasks):
                try:
                    await finished
                except StepFailed as exc:
                    failure = exc
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        status = "failed" if failure else "succeeded"
        output = None
        if failure is None:
            try:
                output = (
                    render(workflow.output, context) if workflow.output is not None else self._last(workflow, records)
                )
            except ExpressionError as exc:
                status, failure = "failed", StepFailed({"message": f"output: {exc}"})
        ended = time.time()
        return {
            "object": "workflow.run",
            "workflow": name,
            "status": status,
            "output": output,
            "error": failure.error if failure else None,
            "steps": [records[s.id].public() for s in workflow.steps],
            "started_at": started,
            "duration_ms": round((ended - started) * 1000, 3),
        }

    @staticmethod
    def _last(workflow: Workflow, records: dict[str, StepRecord]) -> Any:
        return records[workflow.steps[-1].id].output

    async def _step(
        self,
        workflow: Workflow,
        step: Step,
        records: dict[str, StepRecord],
        context: dict[str, Any],
        meta: router_pb2.RequestMeta,
        depth: int,
    ) -> None:
        record = records[step.id]
        dependencies = sorted(workflow.dependencies(step))
        for dependency in dependencies:
            await records[dependency].done.wait()
        fatal = {s.id for s in workflow.steps if s.on_error == "fail"}
        try:
            if any(records[d].status == "failed" and d in fatal for d in dependencies):
                record.status = "cancelled"  # the run is failing; nothing after it starts
                return
            if step.when and not truthy(step.when, context):
                record.status = "skipped"
                return
            record.status, record.started_at = "running", time.time()
            last_error: dict[str, Any] = {}
            for attempt in range(1, step.retry.max_attempts + 1):
                record.attempts = attempt
                try:
                    async with asyncio.timeout(step.timeout_s or DEFAULT_STEP_TIMEOUT_S):
                        record.output = await self._execute(step, context, meta, depth, record)
                    record.status = "succeeded"
                    return
                except TimeoutError:
                    last_error = {"message": f"step `{step.id}` timed out after {step.timeout_s} s", "code": "timeout"}
                except StepFailed as exc:
                    last_error = exc.error
                except ExpressionError as exc:
                    last_error = {"message": str(exc), "code": "invalid_expression"}
                except GatewayError as exc:
                    last_error = exc.to_dict()["error"]
                if attempt < step.retry.max_attempts:
                    await asyncio.sleep(step.retry.backoff_s * 2 ** (attempt - 1))
            record.status, record.error = "failed", {**last_error, "step": step.id}
            log.warning("workflow step failed", extra={"workflow": workflow.name, "step": step.id, "error": last_error})
            if step.on_error == "fail":
                raise StepFailed(record.error)
        finally:
            if record.started_at is not None:
                record.ended_at = time.time()
                record.duration_ms = round((record.ended_at - record.started_at) * 1000, 3)
            context["steps"][step.id] = {"output": record.output, "status": record.status, "error": record.error}
            record.done.set()

    async def _execute(
        self, step: Step, context: dict[str, Any], meta: router_pb2.RequestMeta, depth: int, record: StepRecord
    ) -> Any:
        params = render(step.params, context)
        given = render(step.input, context)
        if step.type == "transform":
            return render(params.get("value"), context) if "value" in params else given
        if step.type == "retrieve":
            if self._retrieve is None:
                raise StepFailed({"message": "no knowledge base is configured for retrieval", "code": "no_retrieval"})
            query = given.get("query") if isinstance(given, dict) else given
            if not isinstance(query, str) or not query.strip():
                raise StepFailed(
                    {"message": f"step `{step.id}`: retrieval needs a non-empty query", "code": "empty_query"}
                )
            hits = await self._retrieve(query, int(params.get("top_k", 3)), params.get("min_score"))
            return {"query": query, "hits": hits}
        if step.type == "workflow":
            run = await self.run(str(params["workflow"]), given, meta, depth + 1)
            if run["status"] != "succeeded":
                raise StepFailed(run["error"] or {"message": "sub-workflow failed"})
            return run["output"]
        task = str(params.pop("task", "chat"))
        body = {**params, **(given if isinstance(given, dict) else {"input": given} if given is not None else {})}
        body["model"] = str(body.get("model") or "auto")
        output, record.instance = await self._call_model(meta, task, body, step.timeout_s or DEFAULT_STEP_TIMEOUT_S)
        return output
