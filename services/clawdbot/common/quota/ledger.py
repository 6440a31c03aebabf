"""The way spend reaches the ledger: one record per settled call, queued in memory and
written in batches off the request path.

`add` never blocks a request; `run` writes what is queued every `interval_s`, or at once
when a batch is full; `close` writes everything left. A failed write is retried with the
mesh's RetryPolicy; while the writer runs, a batch that still fails stays queued and is
tried again on the next round (the store being away for a minute loses nothing), and
only at close, or past `max_queued`, is spend dropped, logged and counted. `write` must be
idempotent (the key store's is: unique (key_id, request_id)), since a batch whose write
failed half-way, or was cancelled, is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from clawdbot.common.retry import RetryPolicy

log = logging.getLogger(__name__)

# Attempts per batch and round: a few quick tries ride over a busy database.
DEFAULT_RETRY: Final = RetryPolicy(max_attempts=4, base_s=0.1, max_backoff_s=2.0)
# How often, at most, drops are logged (each is counted).
_DROP_LOG_EVERY_S: Final = 5.0


@dataclass(frozen=True)
class SpendRecord:
    key_id: str
    model: str
    instance: str
    request_id: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    at: datetime


class LedgerWriter:
    """Batches SpendRecords into `write` (see the module doc)."""

    def __init__(
        self,
        write: Callable[[list[SpendRecord]], Awaitable[None]],
        *,
        max_batch: int = 500,
        interval_s: float = 0.2,
        max_queued: int = 200_000,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if max_batch < 1 or max_queued < 1:
            raise ValueError("max_batch and max_queued must be positive")
        self._write = write
        self._max_batch = max_batch
        self._interval_s = interval_s
        self._max_queued = max_queued
        self._retry = retry
        self._queue: deque[SpendRecord] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._stopping = False
        self._closed = False
        self._drop_logged_at: float | None = None
        # Counts, for logs and tests.
        self.written = 0
        self.dropped = 0
        self.failed_writes = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def add(self, record: SpendRecord) -> None:
        """Queue one record; never blocks. Past max_queued (or after close) it is dropped."""
        if self._closed:
            self._drop([record], "the ledger writer is closed")
            return
        if len(self._queue) >= self._max_queued:
            self._drop([record], "the ledger queue is full")
            return
        self._queue.append(record)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def run(self) -> None:
        """Write batches until stop() or close(); for ServiceHost.in_background."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            await self._flush(final=False)

    def stop(self) -> None:
        """Ask run() to return (close() writes what is left)."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        """Write everything queued (retrying), then refuse new records."""
        self.stop()
        await self._flush(final=True)
        self._closed = True
        log.info(
            "ledger writer closed", extra={"written": self.written, "dropped": self.dropped, "queued": self.queued}
        )

    async def _flush(self, *, final: bool) -> None:
        async with self._flushing:
            while self._queue:
                # The batch stays queued while it is written: a cancelled or failed write
                # leaves it for the next round (or for close).
                batch = list(itertools.islice(self._queue, 0, self._max_batch))
                if await self._write_with_retry(batch):
                    for _ in batch:
                        self._queue.popleft()
                    self.written += len(batch)
                elif final:
                    for _ in batch:
                        self._queue.popleft()
                    self._drop(batch, "the ledger write kept failing at close")
                else:
                    return

    async def _write_with_retry(self, batch: list[SpendRecord]) -> bool:
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._write(batch)
                return True
            except Exception as exc:
                # Whatever the store raises (a driver error, a lost connection): the
                # records are kept and the write is tried again.
                self.failed_writes += 1
                extra = {"records": len(batch), "attempt": attempts, "error": f"{type(exc).__name__}: {exc}"}
                if not self._retry.may_retry(attempts):
                    log.error("ledger write failed; will try again later", extra=extra, exc_info=True)
                    return False
                log.warning("ledger write failed; retrying", extra=extra, exc_info=True)
            await asyncio.sleep(self._retry.backoff(attempts))

    def _drop(self, records: list[SpendRecord], why: str) -> None:
        self.dropped += len(records)
        now = time.monotonic()
        # One drop at a time (a full queue) is logged every few seconds; a batch always.
        if self._drop_logged_at is not None and now - self._drop_logged_at < _DROP_LOG_EVERY_S and len(records) == 1:
            return
        self._drop_logged_at = now
        log.error(
            "spend records dropped",
            extra={
                "why": why,
                "records": len(records),
                "cost_usd": sum(r.cost_usd for r in records),
                "request_ids": [r.request_id for r in records[:20]],
                "dropped_total": self.dropped,
            },
        )
