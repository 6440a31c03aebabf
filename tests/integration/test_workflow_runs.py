"""Durable workflow runs against a real Redis: a run stopped mid-way resumes after its last
finished step in a new engine (as after an orchestrator restart), a finished run is
returned rather than run again, two callers of one run id share one execution; and the
progress events a streaming client sees. Model calls are answered in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from clawdbot.gen.v1 import router_pb2
from clawdbot.orchestrator.definitions import Catalog, load_catalog
from clawdbot.orchestrator.engine import Engine, StepFailed
from clawdbot.orchestrator.run_state import MemoryRunStore, RedisRunStore, RunStore
from tests.support import Proc, start_redis, wait_for_async

WORKFLOWS = {
    "chain": {
        "steps": [
            {"id": "first", "type": "model", "params": {"task": "chat"}, "input": {"input": "${input.text}"}},
            {"id": "slow", "type": "model", "params": {"task": "chat", "gate": True}, "input": {"input": "slow"}},
            {"id": "maybe", "type": "transform", "if": "input.never == `true`", "params": {"value": 1}},
            {
                "id": "last",
                "type": "transform",
                "params": {"value": {"first": "${steps.first.output.echo}", "slow": "${steps.slow.output.echo}"}},
            },
        ]
    },
    "outer": {
        "steps": [
            {"id": "pre", "type": "model", "params": {"task": "chat"}, "input": {"input": "pre"}},
            {"id": "inner", "type": "workflow", "params": {"workflow": "chain"}, "input": {"text": "nested"}},
        ]
    },
}


class Models:
    """Echoes; a step whose params say `gate` waits until the test opens the gate."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.gate = asyncio.Event()
        self.at_gate = asyncio.Event()

    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]:
        self.calls.append(body.get("input"))
        if body.get("gate"):
            self.at_gate.set()
            await self.gate.wait()
        if body.get("fail"):
            raise StepFailed({"message": "upstream failed"})
        return {"echo": body.get("input")}, "fake-1", "miss"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc: Proc
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"workflows": WORKFLOWS}))
    loaded = load_catalog(tmp_path)
    assert not loaded.problems, loaded.problems
    return loaded


@pytest_asyncio.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[RunStore]:
    runs: RunStore = RedisRunStore(redis_url, 60, lease_s=1.0) if request.param == "redis" else MemoryRunStore()
    yield runs
    await runs.close()


async def stop_at_gate(engine: Engine, models: Models, name: str, run_id: str) -> None:
    """Start a run and stop it (as a crash would) while its gated step is running."""
    running = asyncio.create_task(engine.run(name, {"text": "hello"}, router_pb2.RequestMeta(), run_id=run_id))
    await asyncio.wait_for(models.at_gate.wait(), 30)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


@pytest.mark.asyncio
async def test_a_stopped_run_resumes_after_its_last_finished_step(catalog: Catalog, store: RunStore) -> None:
    crashed = Models()
    await stop_at_gate(Engine(lambda: catalog, crashed, runs=store), crashed, "chain", "run-2")
    assert crashed.calls == ["hello", "slow"]
    resumed_models = Models()
    resumed_models.gate.set()
    resumed = await Engine(lambda: catalog, resumed_models, runs=store).run(
        "chain", {"text": "hello"}, router_pb2.RequestMeta(), run_id="run-2"
    )
    assert resumed["status"] == "succeeded"
    assert resumed["output"] == {"first": "hello", "slow": "slow"}
    assert resumed_models.calls == ["slow"], "the finished step ran again"
    steps = {s["id"]: s for s in resumed["steps"]}
    assert steps["first"]["resumed"] and steps["first"]["instance"] == "fake-1"
    assert steps["maybe"]["status"] == "skipped"
    assert not steps["slow"]["resumed"] and not steps["last"]["resumed"]

    # Asked for once more (a redelivered job): the finished run, nothing called.
    again_models = Models()
    again = await Engine(lambda: catalog, again_models, runs=store).run(
        "chain", {"text": "hello"}, router_pb2.RequestMeta(), run_id="run-2"
    )
    assert again == resumed and again_models.calls == []


@pytest.mark.asyncio
async def test_a_nested_run_resumes_inside_its_parent(catalog: Catalog, store: RunStore) -> None:
    crashed = Models()
    await stop_at_gate(Engine(lambda: catalog, crashed, runs=store), crashed, "outer", "run-3")
    assert crashed.calls == ["pre", "nested", "slow"]
    models = Models()
    models.gate.set()
    run = await Engine(lambda: catalog, models, runs=store).run("outer", {}, router_pb2.RequestMeta(), run_id="run-3")
    assert run["status"] == "succeeded" and run["output"] == {"first": "nested", "slow": "slow"}
    assert models.calls == ["slow"]


@pytest.mark.asyncio
async def test_two_callers_of_one_run_share_one_execution(catalog: Catalog, store: RunStore) -> None:
    models = Models()
    engine = Engine(lambda: catalog, models, runs=store)
    meta = router_pb2.RequestMeta()
    first = asyncio.create_task(engine.run("chain", {"text": "x"}, meta, run_id="run-4"))
    await asyncio.wait_for(models.at_gate.wait(), 30)
    second = asyncio.create_task(engine.run("chain", {"text": "x"}, meta, run_id="run-4"))
    models.gate.set()
    one, two = await asyncio.gather(first, second)
    assert one == two and one["status"] == "succeeded"
    assert models.calls == ["x", "slow"]


@pytest.mark.asyncio
async def test_a_dead_holders_lease_lapses(catalog: Catalog, redis_url: str) -> None:
    """A process killed while holding a run leaves its lease behind; it lapses."""
    store = RedisRunStore(redis_url, 60, lease_s=1.0)
    try:
        import redis.asyncio as redis

        client = redis.Redis.from_url(redis_url)
        await client.set("clawdbot:run:run-5:lease", "a-dead-process", px=1000)
        await client.aclose()
        models = Models()
        models.gate.set()
        run = await Engine(lambda: catalog, models, runs=store).run(
            "chain", {"text": "y"}, router_pb2.RequestMeta(), run_id="run-5"
        )
        assert run["status"] == "succeeded"
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_progress_events_tell_the_run_as_it_goes(catalog: Catalog) -> None:
    models = Models()
    models.gate.set()
    events: list[dict[str, Any]] = []
    run = await Engine(lambda: catalog, models).run("outer", {}, router_pb2.RequestMeta(), emit=events.append)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run.started" and kinds[-1] == "run.completed" and kinds.count("run.completed") == 1
    assert events[-1]["run"] == run
    for workflow, step in [("outer", "pre"), ("outer", "inner"), ("chain", "first"), ("chain", "slow")]:
        mine = [e["type"] for e in events if e.get("workflow") == workflow and e.get("step") == step]
        assert mine == ["step.started", "step.finished"], (workflow, step, mine)
    skipped = [e for e in events if e.get("step") == "maybe"]
    assert [(e["type"], e["status"]) for e in skipped] == [("step.finished", "skipped")]
    # The sub-workflow's steps finish before the step that runs it.
    order = [(e.get("workflow"), e.get("step")) for e in events if e["type"] == "step.finished"]
    assert order.index(("chain", "last")) < order.index(("outer", "inner"))


@pytest.mark.asyncio
async def test_a_retried_step_says_so(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text(
        yaml.safe_dump(
            {
                "workflows": {
                    "w": {
                        "steps": [
                            {
                                "id": "bad",
                                "type": "model",
                                "params": {"task": "chat", "fail": True},
                                "retry": {"max_attempts": 2, "backoff_s": 0},
                            }
                        ]
                    }
                }
            }
        )
    )
    catalog = load_catalog(tmp_path)
    events: list[dict[str, Any]] = []
    run = await Engine(lambda: catalog, Models()).run("w", {}, router_pb2.RequestMeta(), emit=events.append)
    assert run["status"] == "failed"
    assert [e["type"] for e in events] == [
        "run.started",
        "step.started",
        "step.retrying",
        "step.started",
        "step.finished",
        "run.completed",
    ]
    assert events[4]["status"] == "failed" and events[2]["error"]["message"] == "upstream failed"


@pytest.mark.asyncio
async def test_redis_holds_the_state_between_processes(catalog: Catalog, redis_url: str) -> None:
    """What a second process reads is what the first saved (not a copy in memory)."""
    writer, reader = RedisRunStore(redis_url, 60), RedisRunStore(redis_url, 60)
    try:
        crashed = Models()
        await stop_at_gate(Engine(lambda: catalog, crashed, runs=writer), crashed, "chain", "run-6")

        async def saved_first() -> bool:
            return "first" in (await reader.load("run-6")).steps

        await wait_for_async(saved_first, 10, "the first step to be saved")
        state = (await reader.load("run-6")).steps["first"]
        assert state["status"] == "succeeded" and state["output"] == {"echo": "hello"}
    finally:
        await writer.close()
        await reader.close()
