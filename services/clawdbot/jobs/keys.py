"""A job's key, checked again when the job runs (issue 16).

A job can run long after it was submitted (a queue behind it, retries, a consumer that
was down): its key may have been revoked, may have expired, or may have lost the model
since. A job submitted with a stored (virtual) key, whose grant says `stored`, re-reads
that key here before each attempt: revoked or expired fails the job with 401
(`invalid_api_key`), a model no longer allowed with 403 (`model_not_allowed`), a workflow
no longer allowed with 403 (`workflow_not_allowed`); none is retried. Otherwise the grant
the router is given is rebuilt from the key as it is now (`grant_of`), so a budget or
allowlist changed since submission is the one that holds.

A burst of jobs under one key costs one query a second at most: records are cached for
`ttl_s` (1 s: a revocation reaches jobs within a second, as it reaches the adapters), and
concurrent lookups of one key share one query.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyNotFound, KeyRecord, KeyStore, allowed
from clawdbot.common.keystore.grants import grant_of
from clawdbot.gen.v1 import router_pb2

log = logging.getLogger(__name__)

Opener = Callable[[str], Awaitable[KeyStore]]

# Longest a key's record is trusted before it is read again.
MAX_TTL_S = 1.0
# Cached records kept at most; past it the expired ones go, and if that is not enough, all.
MAX_CACHED = 10_000


def revoked() -> GatewayError:
    return GatewayError.unauthorized("The API key that submitted this job has been revoked or has expired.")


def allows_workflow(record: KeyRecord, name: str) -> bool:
    """As the adapter decides at submission: no workflow globs in the key's defaults
    allow every workflow."""
    globs = (record.defaults or {}).get("workflows") or ()
    return allowed(globs, name)


def workflow_not_allowed(name: str) -> GatewayError:
    # The adapter's answer at submission (adapter/auth.py require_workflow), word for word.
    return GatewayError(
        403,
        f"This API key is not allowed to use the workflow `{name}`.",
        "permission_error",
        "workflow_not_allowed",
        "name",
    )


def _open(url: str) -> Awaitable[KeyStore]:
    return KeyStore.open(url, migrate=True)


class JobKeys:
    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = MAX_TTL_S,
        opener: Opener = _open,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not 0 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be in 0..{MAX_TTL_S}, got {ttl_s}")
        self._url = url
        self._ttl = ttl_s
        self._opener = opener
        self._clock = clock
        self._now = now
        self._store: KeyStore | None = None
        self._opening = asyncio.Lock()
        # key id -> (monotonic time it was read, its record; None: no such key).
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        # Queries actually made (for tests and the curious).
        self.lookups = 0

    async def _opened(self) -> KeyStore:
        if self._store is not None:
            return self._store
        async with self._opening:
            if self._store is None:
                try:
                    self._store = await self._opener(self._url)
                except Exception as exc:
                    log.error("key store did not open", extra={"error": f"{type(exc).__name__}: {exc}"})
                    raise GatewayError.unavailable(
                        "The key store is unavailable; the job will be tried again.", "key_store_unavailable"
                    ) from exc
            return self._store

    async def _read(self, key_id: str) -> KeyRecord | None:
        store = await self._opened()
        self.lookups += 1
        try:
            return await store.get(key_id)
        except KeyNotFound:
            # Keys are revoked, never deleted: a stored key this database does not have
            # means the jobs service reads another database than the adapter that
            # authenticated it (each with a SQLite file of its own, say). Refused all
            # the same: a job's limits must not be guessed.
            log.warning(
                "a job's stored key is not in the key store: is database.url the adapters' one?",
                extra={"key_id": key_id},
            )
            return None
        except GatewayError:
            raise
        except Exception as exc:
            # The database is away or failing: the job may be tried again (no model was called).
            log.error("key lookup failed", extra={"key_id": key_id, "error": f"{type(exc).__name__}: {exc}"})
            raise GatewayError.unavailable(
                "The key store is unavailable; the job will be tried again.", "key_store_unavailable"
            ) from exc

    async def record(self, key_id: str) -> KeyRecord | None:
        """The key's record as of at most ttl_s ago (None: the store has no such key)."""
        cached = self._cache.get(key_id)
        if cached is not None and self._clock() - cached[0] < self._ttl:
            return cached[1]
        lookup = self._inflight.get(key_id)
        if lookup is None:
            # One query per key at a time, in a task of its own: a job cancelled while
            # waiting (its consumer stopping) does not cancel it for the others.
            lookup = asyncio.create_task(self._lookup(key_id), name=f"key lookup {key_id}")
            self._inflight[key_id] = lookup
            # Its failure is each waiter's to handle; retrieved here too, so that one whose
            # waiters were all cancelled is not reported as never retrieved.
            lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(lookup)

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        try:
            read_at = self._clock()
            found = await self._read(key_id)
            self._remember(key_id, read_at, found)
            return found
        finally:
            del self._inflight[key_id]

    def _remember(self, key_id: str, read_at: float, found: KeyRecord | None) -> None:
        if len(self._cache) >= MAX_CACHED:
            now = self._clock()
            self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self._ttl}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[key_id] = (read_at, found)

    async def current_grant(
        self, key_id: str, model: str | None = None, workflow: str | None = None
    ) -> router_pb2.KeyGrant:
        """The grant of the key as it is now, for a job about to call `model` or run
        `workflow` (whose model steps the router checks one by one against this grant).
        GatewayError 401 when the key is gone, revoked or expired; 403 when the model or
        the workflow is no longer allowed; 503 when the key store cannot say."""
        record = await self.record(key_id)
        if record is None or not record.usable(self._now()):
            raise revoked()
        if model is not None and not record.allows_model(model):
            raise GatewayError.model_not_allowed(model)
        if workflow is not None and not allows_workflow(record, workflow):
            raise workflow_not_allowed(workflow)
        return grant_of(record)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None
