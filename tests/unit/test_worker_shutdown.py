"""The worker's shutdown (worker/server.py WorkerServicer.close): slots close for good,
generations stop at their next token, a model is freed once its thread has left it and
left open while a computation still runs in it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from clawdbot.common.errors import GatewayError
from clawdbot.worker.chat import ChatTask
from clawdbot.worker.runtimes.llama import Piece
from clawdbot.worker.slots import LoadFailed, ModelSlot
from tests.support import wait_for_async


class Computing:
    """A servable model with one computation that ends only when interrupted (or, with
    stuck=True, when the test lets it: a C call that cannot be interrupted)."""

    def __init__(self, stuck: bool = False) -> None:
        self.version = "v1"
        self.stuck = stuck
        self.interrupted = False
        self.closed = False
        self.done = asyncio.Event()

    def warm_up(self) -> None:
        pass

    def interrupt(self) -> None:
        self.interrupted = True
        if not self.stuck:
            self.done.set()

    async def settle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        assert self.done.is_set(), "freed under a running computation"
        self.closed = True


@pytest.mark.asyncio
async def test_a_closed_slot_frees_its_model_once_the_computation_stopped() -> None:
    model = Computing()
    slot: ModelSlot[Computing] = ModelSlot("m", lambda _source: model)
    await slot.load()
    await slot.close(settle_s=5)
    assert model.interrupted and model.closed
    assert slot.describe()["state"] == "unavailable"
    with pytest.raises(GatewayError) as caught, slot.use():
        pass
    assert caught.value.status == 503 and "shutting down" in caught.value.message


@pytest.mark.asyncio
async def test_a_model_still_computing_is_left_open_even_when_its_request_leaves() -> None:
    model = Computing(stuck=True)
    slot: ModelSlot[Computing] = ModelSlot("m", lambda _source: model)
    await slot.load()
    with slot.use():
        await slot.close(settle_s=0.1)
        assert model.interrupted and not model.closed
    assert not model.closed  # the request left, the computation has not: still not freed


@pytest.mark.asyncio
async def test_a_load_that_ends_after_shutdown_never_serves() -> None:
    building, release = threading.Event(), threading.Event()
    built = Computing()
    built.done.set()

    def build(_source: str) -> Computing:
        building.set()
        release.wait(30)
        return built

    slot: ModelSlot[Computing] = ModelSlot("m", build)
    load = asyncio.create_task(slot.load())
    await asyncio.to_thread(building.wait, 30)
    await slot.close(settle_s=1)
    release.set()
    with pytest.raises(LoadFailed, match="shutting down"):
        await load
    assert built.closed and slot.describe()["state"] == "unavailable"


class FakeLlama:
    """LlamaModel's surface: a token every 10 ms until max_tokens or the flag; with a
    prompt of "stuck", a first call that does not return until `let_go` is set."""

    def __init__(self) -> None:
        self.version = "fake"
        self.n_ctx = 4096
        self.closed = False
        self.tokens = 0
        self.started = threading.Event()
        self.let_go = threading.Event()

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split()) + 1))

    def generate(
        self, prompt: str, *, max_tokens: int, cancelled: threading.Event, **_sampling: Any
    ) -> Iterator[Piece]:
        self.started.set()
        if "stuck" in prompt:
            self.let_go.wait(30)
        for _ in range(max_tokens):
            time.sleep(0.01)
            self.tokens += 1
            yield Piece(" tok", None)
            if cancelled.is_set():
                return
        yield Piece("", "length")

    def close(self) -> None:
        self.closed = True


def chat_task(llama: FakeLlama) -> ChatTask:
    return ChatTask("fake", llama)  # type: ignore[arg-type]  # FakeLlama stands for LlamaModel


def body(text: str, max_tokens: int = 100_000) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


@pytest.mark.asyncio
async def test_interrupt_stops_a_generation_at_its_next_token() -> None:
    llama = FakeLlama()
    llama.n_ctx = 1_000_000
    task = chat_task(llama)
    answer = asyncio.create_task(task.answer(body("go on")))

    async def generating() -> bool:
        return llama.tokens >= 3

    await wait_for_async(generating, 30, "a few tokens")
    task.interrupt()
    assert await task.settle(5)
    reply = await answer
    assert llama.tokens < 1000 and reply["choices"][0]["message"]["content"]
    task.close()
    assert llama.closed
    with pytest.raises(GatewayError) as caught:
        await task.answer(body("after"))
    assert caught.value.status == 503


@pytest.mark.asyncio
async def test_a_generation_stuck_in_its_prompt_does_not_settle() -> None:
    llama = FakeLlama()
    task = chat_task(llama)
    answer = asyncio.create_task(task.answer(body("stuck", max_tokens=5)))
    await asyncio.to_thread(llama.started.wait, 30)
    task.interrupt()
    assert not await task.settle(0.2)
    llama.let_go.set()  # the C call returns: the flag stops it at its first token
    assert await task.settle(5)
    await answer
    assert llama.tokens == 1
