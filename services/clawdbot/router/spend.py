"""What each upstream attempt does to its key's budget and the spend ledger (issue 16).

Per attempt, in server.py's order:
  1. `check_model`: the key's model allowlist (403 model_not_allowed), before anything;
  2. `hold`: with a budget, the attempt's worst case (input estimate + max_tokens, or
     quota.default_max_tokens, at the instance's prices) is reserved in the BudgetBook
     before the connector is called; a refusal is the 429 insufficient_quota the book
     raises, and the call is never made;
  3. `settle`, exactly once per hold: the real cost after success; nothing (a release)
     after an upstream failure that produced nothing; what was relayed when a stream is
     cut, fails midway or ends without a usage chunk; the input estimate when a unary call
     is cancelled (the upstream had the prompt). Every billed call with a key id (budgeted
     or not) becomes a SpendRecord appended to the LedgerWriter.

Cheap on the hot path: a grant without a budget does no Redis I/O at all, and the ledger
append never blocks. A budget settle runs as its own task that the caller awaits through
asyncio.shield: a call cancelled by its client (a gRPC cancel, a stream's aclose) still
settles, and the task is kept referenced until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from clawdbot.common.audio_bounds import AudioError, is_wav, read_wav
from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import KeyStore, allowed
from clawdbot.common.quota import BudgetBook, LedgerWriter, SpendRecord, quota_redis
from clawdbot.gen.v1 import router_pb2
from clawdbot.router.registry import Instance

log = logging.getLogger(__name__)

# Speech is priced per second of audio produced, which is not known before the call: a
# held worst case of one second per this many characters of input (people speak about
# fifteen a second; slower voices and pauses stay inside ten).
SPEECH_CHARS_PER_SECOND = 10.0


@dataclass(frozen=True)
class Estimate:
    """An attempt's worst case, before the call: what the hold is priced on."""

    input_tokens: int
    output_tokens: int
    audio_seconds: float = 0.0

    def cost(self, instance: Instance) -> float:
        return instance.expected_cost(self.input_tokens, self.output_tokens, self.audio_seconds)

    def input_cost(self, instance: Instance) -> float:
        """What an upstream that took the request but produced nothing may bill: the prompt
        (and, for speech, whose price is per second produced, nothing more)."""
        return instance.expected_cost(self.input_tokens, 0)


def estimate(
    task: str,
    body: dict[str, Any],
    binary: bytes,
    input_tokens: int,
    max_tokens: int | None,
    default_max_tokens: int,
    max_audio_seconds: float,
) -> Estimate:
    """The worst case of one call. Embeddings produce no tokens; a transcription is priced
    on its audio's length (the WAV's frames, else the longest audio the gateway admits);
    speech on its input text (SPEECH_CHARS_PER_SECOND)."""
    output = 0 if task == "embeddings" else (max_tokens or default_max_tokens)
    seconds = 0.0
    if task == "transcription":
        seconds = max_audio_seconds
        if is_wav(binary):
            try:
                seconds = read_wav(binary).seconds
            except AudioError:
                # The worker will refuse it; until it has, the longest admitted is held.
                seconds = max_audio_seconds
    elif task == "speech":
        text = body.get("input")
        seconds = 1.0 + (len(text) / SPEECH_CHARS_PER_SECOND if isinstance(text, str) else 0.0)
    return Estimate(input_tokens, output, seconds)


def unreported_cost(instance: Instance, worst: Estimate, binary: bytes) -> float:
    """A successful call whose answer reported no usage: its input estimate, plus the
    audio it produced when that is a WAV (speech) whose length can be counted."""
    seconds = 0.0
    if binary and is_wav(binary):
        try:
            seconds = read_wav(binary).seconds
        except AudioError:
            log.warning("an unreadable WAV answer: billed on its input alone", extra={"instance": instance.id})
    return instance.expected_cost(worst.input_tokens, 0, seconds)


def check_model(grant: router_pb2.KeyGrant, model: str) -> None:
    """403 model_not_allowed unless the key's globs allow `model` (by the name asked for,
    as the adapter checks it: "auto" or a group is a name like any other)."""
    if not allowed(grant.models, model):
        raise GatewayError.model_not_allowed(model)


class Charge:
    """One attempt's claim on its key's budget (a hold, when budgeted), settled once."""

    __slots__ = ("budgeted", "estimate", "hold_id", "instance", "meta", "remaining_usd", "settled", "spend")

    def __init__(
        self, meta: router_pb2.RequestMeta, instance: Instance, estimate: Estimate, hold_id: str, budgeted: bool
    ) -> None:
        self.meta = meta
        self.instance = instance
        self.estimate = estimate
        self.hold_id = hold_id
        self.budgeted = budgeted
        # The budget left once the hold was taken (budgeted only).
        self.remaining_usd = 0.0
        # Set the moment a settlement starts (never twice), and its outcome once known.
        self.settled = False
        self.spend: router_pb2.Spend | None = None

    @property
    def ledger_id(self) -> str:
        # One request may make several calls (a workflow's steps, retries): each its own row.
        return f"{self.meta.request_id}:{self.hold_id[:12]}"

    def announced(self) -> router_pb2.Spend:
        """For a stream's instance announcement: the budget left after its hold."""
        return router_pb2.Spend(budgeted=self.budgeted, remaining_usd=self.remaining_usd if self.budgeted else 0.0)


class Spending:
    """Budget holds and settlements against a BudgetBook, and ledger records through a
    LedgerWriter. `book` None: a grant with a budget is refused (503), never let through
    unchecked; `ledger` None: nothing is recorded (a router built without a key store)."""

    def __init__(self, book: BudgetBook | None, ledger: LedgerWriter | None, default_max_tokens: int) -> None:
        self._book = book
        self._ledger = ledger
        self.default_max_tokens = default_max_tokens
        # Settlements under way, referenced until done (a task nobody holds may be
        # collected mid-flight) and awaited at shutdown.
        self._pending: set[asyncio.Task[Any]] = set()

    check_model = staticmethod(check_model)

    async def hold(self, meta: router_pb2.RequestMeta, instance: Instance, estimate: Estimate) -> Charge:
        """The attempt's Charge, its worst case held first when the key has a budget.
        Raises the book's 429 insufficient_quota (the call must not be made) or 503."""
        grant = meta.grant
        budgeted = bool(grant.budget_period)
        charge = Charge(meta, instance, estimate, uuid.uuid4().hex, budgeted)
        if not budgeted:
            return charge
        if not meta.api_key_id:
            # A budget is kept per key: without one there is nothing to hold it against.
            log.error("a budgeted grant without a key id", extra={"request_id": meta.request_id})
            raise GatewayError(
                500, "The call's budget has no key to be held against.", "server_error", "internal_error"
            )
        if self._book is None:
            raise GatewayError.unavailable("Budgets are not available on this router.", "budget_unavailable")
        amount = estimate.cost(instance)
        book = self._book
        try:
            charge.remaining_usd = await book.hold(
                meta.api_key_id, grant.budget_usd, grant.budget_period, charge.hold_id, amount
            )
        except asyncio.CancelledError:
            # The script may have run before the cancel arrived: let the hold go now rather
            # than pin the amount until the hold's TTL (a settle of an unknown hold adds 0).
            charge.settled = True
            self._in_background(
                book.settle(meta.api_key_id, grant.budget_usd, grant.budget_period, charge.hold_id, 0.0)
            )
            raise
        return charge

    async def settle(
        self, charge: Charge, input_tokens: int, output_tokens: int, cost_usd: float, *, bill: bool = True
    ) -> router_pb2.Spend:
        """Settle the charge at `cost_usd` (once: a later call returns the first outcome or
        a bare Spend). bill=False: nothing was produced, the hold is only released and no
        ledger row written. Survives its caller's cancellation (see the module docstring)."""
        if charge.settled:
            return charge.spend or router_pb2.Spend(budgeted=charge.budgeted)
        charge.settled = True
        meta = charge.meta
        if bill and meta.api_key_id and self._ledger is not None:
            self._ledger.add(
                SpendRecord(
                    key_id=meta.api_key_id,
                    model=charge.instance.name,
                    instance=charge.instance.id,
                    request_id=charge.ledger_id,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    cost_usd=cost_usd,
                    at=datetime.now(UTC),
                )
            )
        spend = router_pb2.Spend(
            budgeted=charge.budgeted, cost_usd=cost_usd, input_tokens=input_tokens, output_tokens=output_tokens
        )
        if charge.budgeted and self._book is not None:
            grant = meta.grant
            settling = self._in_background(
                self._book.settle(meta.api_key_id, grant.budget_usd, grant.budget_period, charge.hold_id, cost_usd)
            )
            spend.remaining_usd = await asyncio.shield(settling)
        charge.spend = spend
        return spend

    async def release(self, charge: Charge) -> None:
        """Nothing was produced: the hold goes, nothing is billed."""
        await self.settle(charge, 0, 0, 0.0, bill=False)

    def _in_background(self, work: Coroutine[Any, Any, float]) -> asyncio.Task[float]:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for settlements still under way (at shutdown, before Redis is closed)."""
        pending = list(self._pending)
        if not pending:
            return
        _done, stuck = await asyncio.wait(pending, timeout=timeout_s)
        if stuck:
            log.error("budget settlements did not finish at shutdown", extra={"count": len(stuck)})


class LedgerStore:
    """The key store the ledger is written to and budgets re-seeded from, opened (and
    migrated) at start-up by `open`, or on first use if that failed."""

    def __init__(self, url: str, opener: Callable[[str], Awaitable[KeyStore]] | None = None) -> None:
        self._url = url
        self._opener: Callable[[str], Awaitable[KeyStore]] = opener or KeyStore.open
        self._store: KeyStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> KeyStore:
        if self._store is not None:
            return self._store
        async with self._opening:
            if self._store is None:
                self._store = await self._opener(self._url)
            return self._store

    async def open(self) -> None:
        try:
            await self.store()
        except Exception:
            # The writer retries its batches, and the book's re-seed opens on demand.
            log.exception("key store unavailable at start-up; the ledger will retry", extra={"url": _safe(self._url)})

    async def record(self, records: Sequence[SpendRecord]) -> None:
        store = await self.store()
        await store.record_spends(records)

    async def spent(self, key_id: str, since: datetime | None) -> float:
        store = await self.store()
        return await store.spend_total(key_id, since)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None


def _safe(url: str) -> str:
    """A database URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{userinfo.partition(':')[0]}{at}{host}" if at else url


class RouterSpending:
    """The router's wiring: key store, budget Redis, BudgetBook, LedgerWriter, Spending.
    `run` is the background job (opens the store, flushes the ledger); `close` drains the
    settlements, flushes the ledger and closes the clients, for ServiceHost.on_shutdown."""

    def __init__(self, config: Config) -> None:
        self.store = LedgerStore(config.database.effective_url())
        self.redis: aioredis.Redis | None = quota_redis(config)
        self.book = BudgetBook(self.redis, self.store.spent, hold_ttl_s=config.quota.hold_ttl_s)
        self.ledger = LedgerWriter(self.store.record)
        self.spending = Spending(self.book, self.ledger, config.quota.default_max_tokens)

    async def run(self) -> None:
        await self.store.open()
        await self.ledger.run()

    async def close(self) -> None:
        await self.spending.drain()
        try:
            await self.ledger.close()
        finally:
            if self.redis is not None:
                await self.redis.aclose()
            await self.store.close()
