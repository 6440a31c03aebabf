"""Dynamic batching: requests that arrive within a short window share one model call.

The first request opens a window of `window_s`; everything that arrives before it closes
(or until `max_batch` texts are waiting) goes into one call, and each caller gets its own
rows back. Model calls run one at a time in a worker thread, so the event loop keeps
serving while numpy computes (it releases the GIL in matrix products).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

EmbedFn = Callable[[list[str]], NDArray[np.float32]]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[NDArray[np.float32]]


class Batcher:
    def __init__(
        self, embed: EmbedFn, window_s: float, max_batch: int, on_call: Callable[[int], None] | None = None
    ) -> None:
        self._embed = embed
        self._window_s = window_s
        self._max_batch = max_batch
        self._on_call = on_call
        self._pending: list[_Pending] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()  # one model call at a time
        self._tasks: set[asyncio.Task[None]] = set()

    async def embed(self, texts: list[str]) -> NDArray[np.float32]:
        if self._window_s <= 0 or len(texts) >= self._max_batch:
            return await self._call(texts)
        future: asyncio.Future[NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(texts, future))
        self._size += len(texts)
        if self._size >= self._max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._size = self._pending, [], 0
        if batch:
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, texts: list[str]) -> NDArray[np.float32]:
        async with self._lock:
            if self._on_call is not None:
                self._on_call(len(texts))
            return await asyncio.to_thread(self._embed, texts)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            vectors = await self._call([t for p in batch for t in p.texts])
        except Exception as exc:  # noqa: BLE001 - not ours to judge: every caller of this batch gets it
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(vectors[start : start + len(p.texts)])
            start += len(p.texts)
