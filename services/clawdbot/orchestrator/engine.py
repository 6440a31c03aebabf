"""Running a workflow: every step starts as soon as the steps it depends on have finished,
so independent steps run at the same time. Each step's `if` is checked first (false:
skipped), then it is attempted up to its retry limit within its timeout (a failure no
retry can mend, such as a bad request, is not retried); a failure either
fails the run or, with `on_error: continue`, is recorded for later steps to act on.

Model steps go through the cache and the router, so caching, routing, fallbacks and
breakers apply per step.

A run with an id (an async job's) is durable: each finished step is saved as it finishes,
and a run asked for again resumes after the last finished step — or, finished already,
is returned as it was. Progress events (run.started, step.started, step.retrying,
step.finished, run.completed) go to an optional sink, for streaming clients.
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
from opentelemetry import trace

from clawdbot.common.bounded import off_loop_if_large
from clawdbot.common.clients.cache import OPT_HEADER, ResponseCache
from clawdbot.common.clients.router import BadAudio, model_request
from clawdbot.common.config import GatewayConfig
from clawdbot.common.errors import GatewayError
from clawdbot.common.retry import RetryPolicy
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.orchestrator.definitions import Catalog, Step, Workflow
from clawdbot.orchestrator.expressions import ExpressionError, render, truthy
from clawdbot.orchestrator.inputs import check_input
from clawdbot.orchestrator.run_state import MemoryRunStore, RunStore

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 300.0
MAX_DEPTH = 5  # workflows within workflows
# How long a run waits for another process's hold on the same run to end: longer than a
# dead holder's lease takes to lapse.
LEASE_WAIT_S = 30.0
# States a step keeps when the run resumes; any other is run again.
SETTLED = frozenset({"succeeded", "failed", "skipped"})

# Where progress events go (a queue's put_nowait, for a streaming client).
EventSink = Callable[[dict[str, Any]], None]


class StepFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "step failed"))
        self.error = error


class CallModel(Protocol):
    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]: ...


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
    cache: str = ""  # the cache's verdict on a model step: miss, hit-l1, ...
    error: dict[str, Any] | None = None
    # Restored from the run's saved state rather than run again.
    resumed: bool = False
    output: Any = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def public(self) -> dict[str, Any]:
        """What a run reports of the step (its output is the run's to show, by template)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("done", "output")}

    def saved(self) -> dict[str, Any]:
        return {**self.public(), "output": self.output}

    def restore(self, saved: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in saved and f.name not in ("id", "type", "done"):
                setattr(self, f.name, saved[f.name])
        self.resumed = True
        self.done.set()


class ModelCaller:
    """A model step's call: the cache, then the router, with the run's request metadata
    (so a step is cached exactly when the same request from a client would be)."""

    def __init__(
        self, router: router_pb2_grpc.RouterStub, cache: ResponseCache | None = None, *, max_request_bytes: int
    ) -> None:
        self._router = router
        self._cache = cache
        # gateway.max_request_bytes: what a transcription step's base64 audio may decode to.
        self._max_request_bytes = max_request_bytes

    async def _complete(self, request: router_pb2.ModelRequest, timeout_s: float) -> router_pb2.ModelResponse:
        try:
            reply: router_pb2.ModelResponse = await self._router.Complete(request, timeout=timeout_s)
            return reply
        except grpc.aio.AioRpcError as err:
            raise StepFailed(GatewayError.from_rpc_error(err, "router").to_dict()["error"]) from None

    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]:
        """(output, the instance that answered, the cache outcome)."""
        file = body.get("file") if task == "transcription" else None
        try:
            # Decoding a large file is CPU work: in a thread, so other runs go on meanwhile.
            request = await off_loop_if_large(
                len(file) if isinstance(file, str) else 0, model_request, meta, task, body, self._max_request_bytes
            )
        except BadAudio as exc:
            raise StepFailed(exc.error.to_dict()["error"]) from None
        if self._cache is None:
            reply = await self._complete(request, timeout_s)
        else:
            reply = await self._cache.complete(request, lambda r: self._complete(r, timeout_s))
        output: Any = orjson.loads(reply.openai_json) if reply.openai_json else {}
        if reply.binary:
            output = {**output, "audio": base64.b64encode(reply.binary).decode(), "content_type": reply.content_type}
        return output, reply.instance, reply.cache


class Engine:
    def __init__(
        self,
        catalog: Callable[[], Catalog],
        call_model: CallModel,
        retrieve: Retriever | None = None,
        runs: RunStore | None = None,
        *,
        limits: GatewayConfig | None = None,
    ) -> None:
        self._catalog = catalog
        self._call_model = call_model
        self._retrieve = retrieve
        self._runs: RunStore = runs or MemoryRunStore()
        # The body and audio limits a run's input is held to, as on the model routes.
        self._limits = limits or GatewayConfig()
        self._tracer = trace.get_tracer("clawdbot.orchestrator")

    async def run(
        self,
        name: str,
        run_input: Any,
        meta: router_pb2.RequestMeta,
        depth: int = 0,
        run_id: str = "",
        emit: EventSink | None = None,
    ) -> dict[str, Any]:
        """The finished run: {status, output, error, steps[], ...}. With a run id, the run
        is held (one process runs it), saved step by step, and resumed if it was begun."""
        workflow = self._catalog().workflows.get(name)
        if workflow is None:
            raise GatewayError(
                404, f"No workflow named `{name}`.", "invalid_request_error", "workflow_not_found", "name"
            )
        if depth > MAX_DEPTH:
            raise GatewayError.bad_request(f"workflows nest deeper than {MAX_DEPTH} levels", "workflow")
        # Before anything runs (or is held, or saved): a wrong input is the caller's 400.
        await check_input(workflow, run_input, self._limits)
        sink = emit or (lambda event: None)
        if not run_id:
            return await self._run(workflow, run_input, meta, depth, "", {}, sink)
        async with self._runs.lease(run_id, LEASE_WAIT_S):
            saved = await self._runs.load(run_id)
            if saved.final is not None:
                log.info("run finished already; returning it", extra={"run_id": run_id, "workflow": name})
                if depth == 0:
                    sink({"type": "run.completed", "run": saved.final})
                return saved.final
            run = await self._run(workflow, run_input, meta, depth, run_id, saved.steps, sink)
            await self._runs.save_final(run_id, run)
            return run

    async def _run(
        self,
        workflow: Workflow,
        run_input: Any,
        meta: router_pb2.RequestMeta,
        depth: int,
        run_id: str,
        saved_steps: dict[str, dict[str, Any]],
        emit: EventSink,
    ) -> dict[str, Any]:
        started = time.time()
        records = {s.id: StepRecord(s.id, s.type) for s in workflow.steps}
        context: dict[str, Any] = {"input": run_input, "steps": {}}
        for step_id, state in saved_steps.items():
            if step_id in records and state.get("status") in SETTLED:
                record = records[step_id]
                record.restore(state)
                context["steps"][step_id] = {"output": record.output, "status": record.status, "error": record.error}
        resumed = [s.id for s in workflow.steps if records[s.id].resumed]
        if resumed:
            log.info("run resumed", extra={"run_id": run_id, "workflow": workflow.name, "restored": resumed})
        emit(
            {
                "type": "run.started",
                "workflow": workflow.name,
                "run_id": run_id,
                "steps": [s.id for s in workflow.steps],
                "resumed": resumed,
            }
        )
        run = _Run(workflow, records, context, meta, depth, run_id, emit)
        tasks = [asyncio.create_task(self._step(run, step)) for step in workflow.steps if not records[step.id].resumed]
        # A fatal failure saved just before the process stopped: the run had failed.
        failure = next(
            (StepFailed(records[s.id].error or {}) for s in workflow.steps if _failed_fatally(s, records[s.id])), None
        )
        try:
            for finished in asyncio.as_completed(tasks) if failure is None else ():
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
        result = {
            "object": "workflow.run",
            "workflow": workflow.name,
            "run_id": run_id or None,
            "status": status,
            "output": output,
            "error": failure.error if failure else None,
            "steps": [records[s.id].public() for s in workflow.steps],
            "started_at": started,
            "duration_ms": round((ended - started) * 1000, 3),
        }
        if depth == 0:
            emit({"type": "run.completed", "run": result})
        return result

    @staticmethod
    def _last(workflow: Workflow, records: dict[str, StepRecord]) -> Any:
        return records[workflow.steps[-1].id].output

    async def _step(self, run: _Run, step: Step) -> None:
        record = run.records[step.id]
        dependencies = sorted(run.workflow.dependencies(step))
        for dependency in dependencies:
            await run.records[dependency].done.wait()
        try:
            if any(_failed_fatally(run.workflow.step(d), run.records[d]) for d in dependencies):
                record.status = "cancelled"  # the run is failing; nothing after it starts
                return
            if step.when and not truthy(step.when, run.context):
                record.status = "skipped"
                return
            record.status, record.started_at = "running", time.time()
            last_error: dict[str, Any] = {}
            for attempt in range(1, step.retry.max_attempts + 1):
                record.attempts = attempt
                run.emit(
                    {
                        "type": "step.started",
                        "workflow": run.workflow.name,
                        "step": step.id,
                        "step_type": step.type,
                        "attempt": attempt,
                    }
                )
                try:
                    async with asyncio.timeout(step.timeout_s or DEFAULT_STEP_TIMEOUT_S):
                        record.output = await self._execute(run, step, record)
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
                if not _retryable(last_error):
                    break
                if attempt < step.retry.max_attempts:
                    run.emit(
                        {
                            "type": "step.retrying",
                            "workflow": run.workflow.name,
                            "step": step.id,
                            "attempt": attempt,
                            "error": last_error,
                        }
                    )
                    await asyncio.sleep(RetryPolicy(step.retry.max_attempts, step.retry.backoff_s).backoff(attempt))
            record.status, record.error = "failed", {**last_error, "step": step.id}
            log.warning(
                "workflow step failed", extra={"workflow": run.workflow.name, "step": step.id, "error": last_error}
            )
            if step.on_error == "fail":
                raise StepFailed(record.error)
        finally:
            await self._settle(run, step, record)

    async def _settle(self, run: _Run, step: Step, record: StepRecord) -> None:
        """A step's end: its timings, its place in the context, its saved state, its event."""
        if record.started_at is not None and record.ended_at is None:
            record.ended_at = time.time()
            record.duration_ms = round((record.ended_at - record.started_at) * 1000, 3)
        run.context["steps"][step.id] = {"output": record.output, "status": record.status, "error": record.error}
        if run.run_id and record.status in SETTLED:
            try:
                await self._runs.save_step(run.run_id, step.id, record.saved())
            except GatewayError as err:
                # The run goes on; were it to stop now, this step would run again on resume.
                log.error("step state not saved", extra={"run_id": run.run_id, "step": step.id, "error": err.message})
        if record.status != "running":
            run.emit(
                {
                    "type": "step.finished",
                    "workflow": run.workflow.name,
                    "step": step.id,
                    "status": record.status,
                    "attempts": record.attempts,
                    "duration_ms": record.duration_ms,
                    "instance": record.instance,
                    "cache": record.cache,
                    "error": record.error,
                }
            )
        record.done.set()

    async def _execute(self, run: _Run, step: Step, record: StepRecord) -> Any:
        """One attempt at a step, in a span of its own: a child of the run's call, and the
        parent of the calls the step makes (cache, router, knowledge base). A failure
        marks the span as failed."""
        attributes: dict[str, str | int] = {
            "clawdbot.workflow": run.workflow.name,
            "clawdbot.step": step.id,
            "clawdbot.step_type": step.type,
            "clawdbot.attempt": record.attempts,
        }
        with self._tracer.start_as_current_span(f"workflow step {step.id}", attributes=attributes):
            return await self._attempt(run, step, record)

    async def _attempt(self, run: _Run, step: Step, record: StepRecord) -> Any:
        params = render(step.params, run.context)
        given = render(step.input, run.context)
        if step.type == "transform":
            return render(params.get("value"), run.context) if "value" in params else given
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
            child_id = f"{run.run_id}/{step.id}" if run.run_id else ""
            child = await self.run(str(params["workflow"]), given, run.meta, run.depth + 1, child_id, run.emit)
            if child["status"] != "succeeded":
                raise StepFailed(child["error"] or {"message": "sub-workflow failed"})
            return child["output"]
        task = str(params.pop("task", "chat"))
        meta = run.meta
        if "cache" in params:  # `cache: on|off` in a step's params, as the client header would say
            meta = router_pb2.RequestMeta()
            meta.CopyFrom(run.meta)
            meta.headers[OPT_HEADER] = str(params.pop("cache")).lower()
        body = {**params, **(given if isinstance(given, dict) else {"input": given} if given is not None else {})}
        body["model"] = str(body.get("model") or "auto")
        output, record.instance, record.cache = await self._call_model(
            meta, task, body, step.timeout_s or DEFAULT_STEP_TIMEOUT_S
        )
        return output


@dataclass
class _Run:
    """One run in progress: what its steps share."""

    workflow: Workflow
    records: dict[str, StepRecord]
    context: dict[str, Any]
    meta: router_pb2.RequestMeta
    depth: int
    run_id: str
    emit: EventSink


# Failures a retry cannot mend: the step's request itself is wrong.
_FINAL_CODES = frozenset(
    {"invalid_audio", "request_too_large", "invalid_expression", "empty_query", "no_retrieval", "workflow_not_found"}
)


def _retryable(error: dict[str, Any]) -> bool:
    return error.get("type") != "invalid_request_error" and error.get("code") not in _FINAL_CODES


def _failed_fatally(step: Step, record: StepRecord) -> bool:
    return record.status == "failed" and step.on_error == "fail"
