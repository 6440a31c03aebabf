"""Virtual keys in the adapter: authentication from the key store, cached, and the admin API.

The hot path is a dictionary lookup: a key this replica has seen is answered from memory
by the SHA-256 of its secret, no I/O. What the cache does not know is looked up once in
the key store (single-flight per hash, a bounded number of lookups at a time, a bounded
queue behind them), and an unknown secret is remembered as unknown for a while (bounded
too), so a flood of made-up keys costs at most a bounded trickle of queries.

Changes reach every replica through the key store's version: a background task polls it
every `poll_s` (0.5 s) and, when it moved, reloads the cached records (one query) and
forgets the unknown ones. A revoked or changed key takes effect within one second on every
replica; on the one that made the change, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from clawdbot.adapter.auth import ADMIN, Principal
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyRecord, KeySpec, KeyStore
from clawdbot.common.keystore.reports import SpendQuery
from clawdbot.common.quota import RateLimits

log = logging.getLogger(__name__)

# Every virtual key's secret starts so; anything else is not looked up.
VIRTUAL_PREFIX = "sk-cb-"
# A secret longer than this is not one of ours (ours are 46 characters).
_MAX_SECRET = 256

Opener = Callable[[str], Awaitable[KeyStore]]


def period_start(budget: dict[str, Any] | None, now: datetime) -> datetime | None:
    """When the key's current budget period began: midnight UTC for "day", the first of
    the month for "month"; None (all time) for "total" or no budget."""
    period = (budget or {}).get("period")
    if period == "day":
        return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def principal_of(record: KeyRecord) -> Principal:
    """The principal of a stored key: its role and everything it restricts."""
    rate = record.rate_limit or {}
    budget = record.budget or {}
    # The store gives the full shape; a record built elsewhere may leave parts out.
    defaults = record.defaults or {}
    return Principal(
        record.id,
        ADMIN if record.admin else "user",
        tuple(record.models),
        RateLimits(
            requests_per_minute=rate.get("requests_per_minute"),
            tokens_per_minute=rate.get("tokens_per_minute"),
            max_parallel=record.max_parallel,
        ),
        budget_usd=float(budget.get("usd") or 0.0),
        budget_period=str(budget.get("period") or "") if budget.get("usd") else "",
        strategy=str(defaults.get("strategy") or ""),
        cache_scope=str(defaults.get("cache") or ""),
        workflows=tuple(defaults.get("workflows") or ()),
        stored=True,
    )


class VirtualKeys:
    def __init__(
        self,
        url: str,
        *,
        poll_s: float = 0.5,
        max_cached: int = 10_000,
        max_unknown: int = 10_000,
        unknown_ttl_s: float = 30.0,
        max_lookups: int = 8,
        max_waiting: int = 256,
        opener: Opener | None = None,
    ) -> None:
        self._url = url
        self._opener: Opener = opener or KeyStore.open
        self._store: KeyStore | None = None
        self._opening = asyncio.Lock()
        self._poll_s = poll_s
        # sha256 hex -> (record, principal), least recently used first.
        self._known: OrderedDict[str, tuple[KeyRecord, Principal]] = OrderedDict()
        self._max_known = max_cached
        # sha256 hex -> monotonic time until which it is known to be no key.
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._max_unknown = max_unknown
        self._unknown_ttl = unknown_ttl_s
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._lookups = asyncio.Semaphore(max_lookups)
        self._max_waiting = max_waiting
        self._waiting = 0
        # Bumped whenever cached records are reloaded: a lookup that overlapped a reload
        # may have read what the reload replaced, so its answer is used, not cached.
        self._generation = 0
        self._version: int | None = None
        self._stopping = asyncio.Event()
        self._failing = False

    # --- the store ------------------------------------------------------------------------

    async def store(self) -> KeyStore:
        """The key store, opened (and migrated) on first use; 503 while it cannot be."""
        if self._store is not None:
            return self._store
        async with self._opening:
            if self._store is None:
                try:
                    self._store = await self._opener(self._url)
                except Exception as exc:
                    # Said once by run() (which retries), not once per request.
                    raise GatewayError.unavailable(
                        "The key store is unavailable; try again shortly.", "key_store_unavailable"
                    ) from exc
            return self._store

    async def close(self) -> None:
        self._stopping.set()
        if self._store is not None:
            await self._store.close()
            self._store = None

    def stop(self) -> None:
        self._stopping.set()

    # --- authentication -----------------------------------------------------------------

    @staticmethod
    def may_hold(key: str) -> bool:
        """Whether `key` could be a virtual key at all (others are never looked up)."""
        return key.startswith(VIRTUAL_PREFIX) and len(key) <= _MAX_SECRET

    async def principal(self, secret: str) -> Principal:
        """The principal of a usable virtual key; GatewayError 401 otherwise."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        known = self._known.get(digest)
        if known is None:
            record = await self._lookup(digest, secret)
            if record is None:
                raise GatewayError.unauthorized("Incorrect API key provided.")
            known = (record, principal_of(record))
        else:
            self._known.move_to_end(digest)
        record, principal = known
        if not record.usable(datetime.now(UTC)):
            raise GatewayError.unauthorized("This API key has been revoked or has expired.")
        return principal

    async def _lookup(self, digest: str, secret: str) -> KeyRecord | None:
        until = self._unknown.get(digest)
        if until is not None:
            if until > time.monotonic():
                return None
            del self._unknown[digest]
        pending = self._inflight.get(digest)
        while pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller who was looking it up went away; not our cancellation: again.
                pending = self._inflight.get(digest)
        if self._waiting >= self._max_waiting:
            # Past this, lookups would only queue up behind a flood: refuse, don't queue.
            raise GatewayError(
                503,
                "Too many API keys to look up at once; try again shortly.",
                "service_unavailable",
                "key_lookups_overloaded",
                retry_after="1",
            )
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        generation = self._generation
        self._waiting += 1
        try:
            async with self._lookups:
                store = await self.store()
                record = await store.find_by_secret(secret)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            # Those who waited on it get the same error; nobody else need retrieve it.
            future.exception()
            raise
        finally:
            self._waiting -= 1
            del self._inflight[digest]
        future.set_result(record)
        if generation == self._generation:
            self._remember(digest, record)
        return record

    def _remember(self, digest: str, record: KeyRecord | None) -> None:
        if record is None:
            self._unknown[digest] = time.monotonic() + self._unknown_ttl
            while len(self._unknown) > self._max_unknown:
                self._unknown.popitem(last=False)
            return
        self._known[digest] = (record, principal_of(record))
        while len(self._known) > self._max_known:
            self._known.popitem(last=False)

    # --- keeping up with changes -----------------------------------------------------------

    async def run(self) -> None:
        """Background: open the store, then follow its version until stopped."""
        while not self._stopping.is_set():
            try:
                await self.poll()
                if self._failing:
                    log.info("key store reachable again")
                    self._failing = False
            except Exception as exc:  # noqa: BLE001 - any failure: keep polling, said once
                # Cached keys keep working meanwhile; new ones wait for the store.
                if not self._failing:
                    cause = exc.__cause__ or exc
                    log.error("key store unavailable; serving cached keys", extra={"error": repr(cause)})
                    self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._poll_s)

    async def poll(self) -> None:
        """Reload the cached keys if the store's version moved since the last poll."""
        store = await self.store()
        version = await store.version()
        if version != self._version:
            await self._reload(store, version)

    async def changed(self) -> None:
        """After this replica changed a key: apply it here now, not at the next poll."""
        store = await self.store()
        await self._reload(store, await store.version())

    async def _reload(self, store: KeyStore, version: int) -> None:
        self._generation += 1
        records = {record.id: record for record in await store.list()}
        self._generation += 1
        for digest, (old, _principal) in list(self._known.items()):
            fresh = records.get(old.id)
            if fresh is None:
                del self._known[digest]
            else:
                self._known[digest] = (fresh, principal_of(fresh))
        # A secret unknown before may be a key now.
        self._unknown.clear()
        self._version = version

    # --- the admin API --------------------------------------------------------------------

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = KeySpec.parse(body)
        record, secret = await (await self.store()).create(spec)
        log.info("virtual key created", extra={"key_id": record.id, "admin": record.admin})
        await self.changed()
        return {**record.public(), "key": secret}

    async def list(self) -> dict[str, Any]:
        records = await (await self.store()).list()
        return {"object": "list", "data": [record.public() for record in records]}

    async def get(self, key_id: str) -> dict[str, Any]:
        store = await self.store()
        record = await store.get(key_id)
        spend = await store.spend(key_id, period_start(record.budget, datetime.now(UTC)))
        return {**record.public(), "spend": spend}

    async def update(self, key_id: str, body: dict[str, Any]) -> dict[str, Any]:
        changes = KeySpec.parse_changes(body)
        record = await (await self.store()).update(key_id, changes)
        log.info("virtual key updated", extra={"key_id": record.id, "fields": sorted(changes)})
        await self.changed()
        return record.public()

    async def revoke(self, key_id: str) -> dict[str, Any]:
        record = await (await self.store()).revoke(key_id)
        log.info("virtual key revoked", extra={"key_id": record.id})
        await self.changed()
        return record.public()

    async def spend(self, group_by: str | None, since: str | None, until: str | None) -> dict[str, Any]:
        """GET /v1/admin/spend: the ledger summed per key and/or model; 400 naming a bad
        parameter (see common/keystore/reports.py for the defaults)."""
        query = SpendQuery.parse(group_by, since, until, datetime.now(UTC))
        return await query.run(await self.store())
