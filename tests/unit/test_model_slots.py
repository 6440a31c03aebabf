"""The double buffer: swaps are atomic, old models are released after their last request,
and a failed load leaves the serving model in place."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clawdbot.common.errors import GatewayError
from clawdbot.worker.slots import LoadFailed, ModelSlot


class FakeModel:
    def __init__(self, version: str, warm_ok: bool = True) -> None:
        self.version = version
        self.warm_ok = warm_ok
        self.closed = threading.Event()

    def warm_up(self) -> None:
        if not self.warm_ok:
            raise LoadFailed("warm-up answer was wrong")

    def interrupt(self) -> None:
        pass  # nothing computes here (shutdown: tests/unit/test_worker_shutdown.py)

    async def settle(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        self.closed.set()


def builder(models: dict[str, FakeModel]):  # type: ignore[no-untyped-def]
    def build(source: str) -> FakeModel:
        if source not in models:
            raise FileNotFoundError(f"no model at {source!r}")
        return models[source]

    return build


@pytest.mark.asyncio
async def test_requests_before_the_first_load_get_503() -> None:
    slot: ModelSlot[FakeModel] = ModelSlot("m", builder({}))
    with pytest.raises(GatewayError) as caught, slot.use():
        pass
    assert caught.value.status == 503 and "loading" in caught.value.message


@pytest.mark.asyncio
async def test_swap_keeps_in_flight_requests_on_the_old_model_until_they_finish() -> None:
    v1, v2 = FakeModel("v1"), FakeModel("v2")
    slot: ModelSlot[FakeModel] = ModelSlot("m", builder({"": v1, "new": v2}))
    await slot.load()
    with slot.use() as during:
        report = await slot.load("new")
        assert during is v1 and not v1.closed.is_set()  # still in use: not released
        with slot.use() as after:
            assert after is v2  # new requests see the new model at once
    assert v1.closed.is_set() and not v2.closed.is_set()
    assert (report.version, report.previous_version) == ("v2", "v1")
    assert slot.describe() == {"state": "ready", "detail": "", "version": "v2", "in_flight": 0}


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [FakeModel("broken", warm_ok=False), None])
async def test_a_failed_load_leaves_the_active_model_serving(bad: FakeModel | None) -> None:
    v1 = FakeModel("v1")
    models = {"": v1} | ({"bad": bad} if bad else {})
    slot: ModelSlot[FakeModel] = ModelSlot("m", builder(models))
    await slot.load()
    with pytest.raises(LoadFailed, match="bad"):
        await slot.load("bad")
    with slot.use() as model:
        assert model is v1
    assert slot.state == "ready" and "bad" in slot.detail and not v1.closed.is_set()


@pytest.mark.asyncio
async def test_a_first_load_that_fails_marks_the_model_unavailable() -> None:
    slot: ModelSlot[FakeModel] = ModelSlot("m", builder({}))
    with pytest.raises(LoadFailed):
        await slot.load()
    assert slot.state == "unavailable"
    with pytest.raises(GatewayError, match="unavailable"), slot.use():
        pass


@pytest.mark.asyncio
async def test_concurrent_loads_run_one_at_a_time_and_all_swap() -> None:
    models = {str(i): FakeModel(str(i)) for i in range(5)}
    slot: ModelSlot[FakeModel] = ModelSlot("m", builder(models))
    reports = await asyncio.gather(*(slot.load(str(i)) for i in range(5)))
    assert [r.previous_version for r in reports] == ["", "0", "1", "2", "3"]
    assert all(models[str(i)].closed.is_set() for i in range(4)) and not models["4"].closed.is_set()
