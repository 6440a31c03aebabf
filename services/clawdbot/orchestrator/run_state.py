"""Where a durable run keeps its state: each finished step (its record and output) and the
finished run, under the run's id, so that a run asked for again — the job redelivered,
the orchestrator restarted mid-run — resumes after the last finished step, or returns the
run it already finished instead of running anything twice.

One process runs a given run at a time: it holds a lease (a Redis key with an expiry,
renewed while it runs). Another process asked for the same run waits for the lease; a
holder that died lets it lapse within `lease_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson
from redis.exceptions import RedisError

from clawdbot.common.config import RedisConfig
from clawdbot.common.errors import GatewayError, redis_available
from clawdbot.common.redis_client import redis_client

log = logging.getLogger(__name__)

_PREFIX: Final = "clawdbot:run:"
_FINAL: Final = "final"
_STEP: Final = "step:"

# Renew or release a lease only while it is still ours.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class SavedRun:
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step id -> record with output
    final: dict[str, Any] | None = None  # the finished run, as Run returned it


class LeaseLost(Exception):
    """Another process took the run over (this one stalled past its lease)."""


class RunStore(Protocol):
    durable: bool

    def lease(self, run_id: str, wait_s: float) -> contextlib.AbstractAsyncContextManager[None]: ...
    async def load(self, run_id: str) -> SavedRun: ...
    async def save_step(self, run_id: str, step_id: str, state: dict[str, Any]) -> None: ...
    async def save_final(self, run_id: str, run: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


def _available() -> contextlib.AbstractAsyncContextManager[None]:
    return redis_available("workflow run store", "run_store_unavailable")


class RedisRunStore:
    durable = True

    def __init__(self, url: str, retention_s: float, lease_s: float = 5.0, settings: RedisConfig | None = None) -> None:
        self._redis = redis_client(url, settings, socket_timeout=5, socket_connect_timeout=5)
        self._retention = int(retention_s)
        self._lease_ms = int(lease_s * 1000)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    @contextlib.asynccontextmanager
    async def lease(self, run_id: str, wait_s: float) -> AsyncIterator[None]:
        """Hold the run for the duration; raise 409 run_busy when it stays taken for wait_s,
        and cancel the body (LeaseLost) when the lease cannot be renewed."""
        key = f"{_PREFIX}{run_id}:lease"
        owner = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        async with _available():
            while not await self._redis.set(key, owner, nx=True, px=self._lease_ms):
                if loop.time() >= deadline:
                    raise GatewayError(
                        409, f"Run `{run_id}` is being run elsewhere.", "invalid_request_error", "run_busy"
                    )
                await asyncio.sleep(0.2)
        body = asyncio.current_task()
        lost = False

        async def renew() -> None:
            nonlocal lost
            while True:
                await asyncio.sleep(self._lease_ms / 3000)
                try:
                    held = await self._renew(keys=[key], args=[owner, self._lease_ms])
                except RedisError as exc:
                    log.warning("run lease not renewed", extra={"run_id": run_id, "error": str(exc)})
                    continue  # Redis may be back before the lease lapses
                if not held:
                    log.error("run lease lost; stopping this copy of the run", extra={"run_id": run_id})
                    lost = True
                    if body is not None:
                        body.cancel()
                    return

        renewer = asyncio.create_task(renew())
        try:
            yield
        except asyncio.CancelledError:
            if lost and body is not None:
                body.uncancel()  # the cancellation was ours, to stop the body: not the caller's
                raise LeaseLost(run_id) from None
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._release(keys=[key], args=[owner])
            except RedisError as exc:
                log.warning("run lease not released; it lapses by itself", extra={"run_id": run_id, "error": str(exc)})

    async def load(self, run_id: str) -> SavedRun:
        async with _available():
            fields = await self._redis.hgetall(_PREFIX + run_id)
        saved = SavedRun()
        for name, raw in fields.items():
            label = name.decode() if isinstance(name, bytes) else name
            if label == _FINAL:
                saved.final = orjson.loads(raw)
            elif label.startswith(_STEP):
                saved.steps[label.removeprefix(_STEP)] = orjson.loads(raw)
        return saved

    async def _put(self, run_id: str, name: str, value: dict[str, Any]) -> None:
        async with _available(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(_PREFIX + run_id, name, orjson.dumps(value))
            pipe.expire(_PREFIX + run_id, self._retention)
            await pipe.execute()

    async def save_step(self, run_id: str, step_id: str, state: dict[str, Any]) -> None:
        await self._put(run_id, _STEP + step_id, state)

    async def save_final(self, run_id: str, run: dict[str, Any]) -> None:
        await self._put(run_id, _FINAL, run)

    async def close(self) -> None:
        await self._redis.aclose()


class MemoryRunStore:
    """Without Redis: runs resume within this process only (a redelivered job still
    finds its finished run), and a restart forgets them. The latest `keep` runs are kept."""

    durable = False

    def __init__(self, keep: int = 1000) -> None:
        self._runs: OrderedDict[str, SavedRun] = OrderedDict()
        self._keep = keep
        # run id -> (its lock, how many hold it or wait for it): dropped at zero.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def lease(self, run_id: str, wait_s: float) -> AsyncIterator[None]:
        lock, users = self._locks.get(run_id, (asyncio.Lock(), 0))
        self._locks[run_id] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(wait_s):
                    await lock.acquire()
            except TimeoutError:
                raise GatewayError(
                    409, f"Run `{run_id}` is being run elsewhere.", "invalid_request_error", "run_busy"
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[run_id]
            if users == 1:
                del self._locks[run_id]
            else:
                self._locks[run_id] = (lock, users - 1)

    def _saved(self, run_id: str) -> SavedRun:
        saved = self._runs.setdefault(run_id, SavedRun())
        self._runs.move_to_end(run_id)
        while len(self._runs) > self._keep:
            self._runs.popitem(last=False)
        return saved

    async def load(self, run_id: str) -> SavedRun:
        saved = self._runs.get(run_id, SavedRun())
        return SavedRun(dict(saved.steps), saved.final)

    async def save_step(self, run_id: str, step_id: str, state: dict[str, Any]) -> None:
        self._saved(run_id).steps[step_id] = state

    async def save_final(self, run_id: str, run: dict[str, Any]) -> None:
        self._saved(run_id).final = run

    async def close(self) -> None:
        return None
