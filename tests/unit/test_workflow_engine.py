"""Workflow definitions and the engine's scheduling, with model calls answered in-process
(the end-to-end tests run the same workflows through the real router)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from clawdbot.gen.v1 import router_pb2
from clawdbot.orchestrator.definitions import Catalog, load_catalog
from clawdbot.orchestrator.engine import Engine, StepFailed
from clawdbot.orchestrator.expressions import render


def catalog_of(tmp_path: Path, workflows: dict[str, Any]) -> Catalog:
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"workflows": workflows}))
    return load_catalog(tmp_path)


class Models:
    """Answers model steps after a delay, failing those asked to."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]:
        self.calls.append(body)
        await asyncio.sleep(body.get("delay", 0))
        if body.get("fail"):
            raise StepFailed({"message": "upstream failed", "code": "upstream_error"})
        if body.get("bad"):
            raise StepFailed({"message": "bad request", "type": "invalid_request_error", "code": None})
        return {"echo": body.get("input")}, "fake-1", "miss"


def test_templates_keep_types_and_interpolate() -> None:
    context = {"input": {"n": 3, "tags": ["a"]}, "steps": {}}
    assert render({"n": "${input.n}", "s": "n=${input.n} ${input.tags}"}, context) == {"n": 3, "s": 'n=3 ["a"]'}


def test_bad_definitions_are_refused_and_the_rest_load(tmp_path: Path) -> None:
    catalog = catalog_of(
        tmp_path,
        {
            "good": {"steps": [{"id": "a", "type": "transform", "params": {"value": 1}}]},
            "cycle": {
                "steps": [
                    {"id": "a", "type": "transform", "needs": ["b"]},
                    {"id": "b", "type": "transform", "needs": ["a"]},
                ]
            },
            "dupe": {"steps": [{"id": "a", "type": "transform"}, {"id": "a", "type": "transform"}]},
            "no_task": {"steps": [{"id": "a", "type": "model"}]},
            "sub": {"steps": [{"id": "a", "type": "workflow", "params": {"workflow": "absent"}}]},
            "typo": {"steps": [{"id": "a", "type": "transform", "neds": ["x"]}]},
        },
    )
    assert list(catalog.workflows) == ["good"]
    text = "\n".join(catalog.problems)
    for expected in ("cycle: a -> b -> a", "used twice", "`task` or a `model`", "unknown workflow `absent`", "neds"):
        assert expected in text, text


@pytest.mark.asyncio
async def test_independent_steps_run_together_and_failures_follow_on_error(tmp_path: Path) -> None:
    catalog = catalog_of(
        tmp_path,
        {
            "w": {
                "steps": [
                    {"id": "a", "type": "model", "params": {"task": "chat", "delay": 0.3}, "input": {"input": "A"}},
                    {"id": "b", "type": "model", "params": {"task": "chat", "delay": 0.3}, "input": {"input": "B"}},
                    {
                        "id": "bad",
                        "type": "model",
                        "params": {"task": "chat", "fail": True},
                        "retry": {"max_attempts": 3, "backoff_s": 0},
                        "on_error": "continue",
                    },
                    {
                        "id": "rescue",
                        "type": "transform",
                        "if": "steps.bad.status == 'failed'",
                        "params": {"value": "ok"},
                    },
                ],
                "output": {"a": "${steps.a.output.echo}", "b": "${steps.b.output.echo}", "r": "${steps.rescue.output}"},
            }
        },
    )
    models = Models()
    result = await Engine(lambda: catalog, models).run("w", {}, router_pb2.RequestMeta())
    assert result["status"] == "succeeded" and result["output"] == {"a": "A", "b": "B", "r": "ok"}
    ran = {s["id"]: s for s in result["steps"]}
    assert ran["a"]["started_at"] < ran["b"]["ended_at"] and ran["b"]["started_at"] < ran["a"]["ended_at"]
    assert ran["bad"]["attempts"] == 3 and ran["bad"]["status"] == "failed"


@pytest.mark.asyncio
async def test_a_failure_without_continue_fails_the_run_and_stops_the_rest(tmp_path: Path) -> None:
    catalog = catalog_of(
        tmp_path,
        {
            "w": {
                "steps": [
                    {"id": "bad", "type": "model", "params": {"task": "chat", "fail": True}},
                    {"id": "after", "type": "transform", "needs": ["bad"], "params": {"value": 1}},
                    {"id": "slow", "type": "model", "params": {"task": "chat", "delay": 5}, "timeout_s": 0.2},
                ]
            }
        },
    )
    result = await Engine(lambda: catalog, Models()).run("w", {}, router_pb2.RequestMeta())
    assert result["status"] == "failed" and result["error"]["step"] in ("bad", "slow")
    assert {s["id"]: s["status"] for s in result["steps"]}["after"] in ("pending", "cancelled")


@pytest.mark.asyncio
async def test_a_bad_request_is_not_retried(tmp_path: Path) -> None:
    catalog = catalog_of(
        tmp_path,
        {
            "w": {
                "steps": [
                    {
                        "id": "bad",
                        "type": "model",
                        "params": {"task": "chat", "bad": True},
                        "retry": {"max_attempts": 3, "backoff_s": 0},
                    }
                ]
            }
        },
    )
    models = Models()
    result = await Engine(lambda: catalog, models).run("w", {}, router_pb2.RequestMeta())
    assert result["status"] == "failed" and result["steps"][0]["attempts"] == 1 and len(models.calls) == 1
