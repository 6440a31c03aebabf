"""The in-process fallback: the Lua scripts of scripts.py mirrored in Python, over a small
in-memory key space with expiries, for a gateway run without Redis.

Each function takes the same KEYS and ARGV and answers the same list as its script, so
RateLimiter and BudgetBook run one code path over either. Atomicity comes from the event
loop: a function runs to its end without awaiting. The counters are this process's alone:
with several replicas every limit multiplies by their number (the limiter and the book say
so loudly when they start without Redis).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from clawdbot.common.quota.scripts import BUCKET_IDLE_MS, BUCKET_SCALE

# Expired entries are swept every this many writes (reads drop the ones they meet).
_SWEEP_EVERY: Final = 1000


class _Space:
    """Values with optional expiries (ms on the owner's clock), like a Redis keyspace."""

    def __init__(self, now_ms: Callable[[], int]) -> None:
        self.now_ms = now_ms
        self._values: dict[str, Any] = {}
        self._expiry: dict[str, int] = {}
        self._writes = 0

    def get(self, key: str) -> Any | None:
        expires = self._expiry.get(key)
        if expires is not None and expires <= self.now_ms():
            self.delete(key)
        return self._values.get(key)

    def set(self, key: str, value: Any, ttl_ms: int | None = None) -> None:
        self._values[key] = value
        if ttl_ms is None:
            self._expiry.pop(key, None)
        else:
            self._expiry[key] = self.now_ms() + ttl_ms
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep()

    def expire(self, key: str, ttl_ms: int) -> None:
        if key in self._values:
            self._expiry[key] = self.now_ms() + ttl_ms

    def delete(self, key: str) -> None:
        self._values.pop(key, None)
        self._expiry.pop(key, None)

    def __len__(self) -> int:
        return len(self._values)

    def _sweep(self) -> None:
        now = self.now_ms()
        for key in [k for k, at in self._expiry.items() if at <= now]:
            self.delete(key)


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LocalRateState:
    """scripts.ADMIT and scripts.FINISH in memory."""

    def __init__(self, now_ms: Callable[[], int]) -> None:
        self._space = _Space(now_ms)

    def _level(self, key: str, rate: int, now: int) -> int:
        cap = rate * BUCKET_SCALE
        state = self._space.get(key)
        if state is None:
            return cap
        level, last = state
        return min(cap, level + max(0, now - last) * rate)

    def _store(self, key: str, rate: int, level: int, now: int) -> None:
        cap = rate * BUCKET_SCALE
        self._space.set(key, (level, now), math.ceil((cap - level) / rate) + BUCKET_IDLE_MS)

    def _leases(self, key: str, now: int) -> dict[str, int]:
        leases: dict[str, int] = self._space.get(key) or {}
        for lease in [lease for lease, at in leases.items() if at <= now]:
            del leases[lease]
        return leases

    def admit(self, keys: list[str], args: list[Any]) -> list[Any]:
        now = self._space.now_ms()
        rpm, tpm, par, tokens = (_int(a) for a in args[:4])
        lease, lease_ttl = _str(args[4]), _int(args[5])
        wait, reason, rv, tv, inflight = 0, "", -1, -1, 0
        if rpm > 0:
            rv = self._level(keys[0], rpm, now)
            if rv < BUCKET_SCALE:
                wait, reason = math.ceil((BUCKET_SCALE - rv) / rpm), "requests"
        if tpm > 0:
            tv = self._level(keys[1], tpm, now)
            need = tokens * BUCKET_SCALE
            if tv < need:
                w = math.ceil((need - tv) / tpm)
                if w > wait:
                    wait, reason = w, "tokens"
        leases: dict[str, int] = {}
        if par > 0:
            leases = self._leases(keys[2], now)
            inflight = len(leases)
            if inflight >= par and wait < 1000:
                wait, reason = 1000, "parallel"
        if tpm > 0 and tokens > tpm:
            reason, wait = "too_large", math.ceil((tpm * BUCKET_SCALE - tv) / tpm)
        if reason:
            return [0, reason, wait, rv, tv, inflight]
        if rpm > 0:
            rv -= BUCKET_SCALE
            self._store(keys[0], rpm, rv, now)
        if tpm > 0 and tokens > 0:
            tv -= tokens * BUCKET_SCALE
            self._store(keys[1], tpm, tv, now)
        if par > 0:
            leases[lease] = now + lease_ttl
            self._space.set(keys[2], leases, lease_ttl + BUCKET_IDLE_MS)
            inflight += 1
        return [1, "", 0, rv, tv, inflight]

    def finish(self, keys: list[str], args: list[Any]) -> int:
        now = self._space.now_ms()
        tpm, delta, lease = _int(args[0]), _int(args[1]), _str(args[2])
        if tpm > 0 and delta != 0:
            level = min(tpm * BUCKET_SCALE, self._level(keys[0], tpm, now) - delta * BUCKET_SCALE)
            self._store(keys[0], tpm, level, now)
        if lease:
            self._leases(keys[1], now).pop(lease, None)
        return 1


class LocalBudgetState:
    """scripts.HOLD, SETTLE, PEEK and SEED in memory."""

    def __init__(self, now_ms: Callable[[], int]) -> None:
        self._space = _Space(now_ms)

    def _holds(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """The period's live holds (id -> (amount, expiry ms)), expired ones dropped."""
        now = self._space.now_ms()
        holds: dict[str, tuple[int, int]] = self._space.get(keys[1]) or {}
        for hold_id in [h for h, (_amount, at) in holds.items() if at <= now]:
            del holds[hold_id]
        return holds

    def _spent(self, key: str) -> int | None:
        value = self._space.get(key)
        return None if value is None else int(value)

    def hold(self, keys: list[str], args: list[Any]) -> list[Any]:
        spent = self._spent(keys[0])
        if spent is None:
            return ["cold", 0]
        hold_id, amount, budget, ttl = _str(args[0]), _int(args[1]), _int(args[2]), _int(args[3])
        holds = self._holds(keys)
        held = sum(a for a, _at in holds.values())
        if hold_id in holds:
            return ["ok", budget - spent - held]
        if spent >= budget or spent + held + amount > budget:
            return ["refused", budget - spent - held]
        holds[hold_id] = (amount, self._space.now_ms() + ttl)
        self._space.set(keys[1], holds, 2 * ttl + 60_000)
        return ["ok", budget - spent - held - amount]

    def settle(self, keys: list[str], args: list[Any]) -> list[Any]:
        hold_id, cost, budget = _str(args[0]), _int(args[1]), _int(args[2])
        counter_ttl_s, marker_ttl_s, release_only = _int(args[3]), _int(args[4]), _str(args[5]) == "1"
        spent = self._spent(keys[0])
        holds = self._holds(keys)
        if self._space.get(keys[3]) is not None:
            return ["duplicate", budget - (spent or 0) - sum(a for a, _at in holds.values())]
        holds.pop(hold_id, None)
        if spent is None:
            if not release_only:
                return ["cold", 0]
            self._space.set(keys[3], 1, marker_ttl_s * 1000)
            return ["released", 0]
        spent += cost
        self._space.set(keys[0], spent, counter_ttl_s * 1000 if counter_ttl_s > 0 else None)
        self._space.set(keys[3], 1, marker_ttl_s * 1000)
        return ["ok", budget - spent - sum(a for a, _at in holds.values())]

    def peek(self, keys: list[str], args: list[Any]) -> list[Any]:
        spent = self._spent(keys[0])
        if spent is None:
            return ["cold", 0]
        return ["ok", _int(args[0]) - spent - sum(a for a, _at in self._holds(keys).values())]

    def seed(self, keys: list[str], args: list[Any]) -> int:
        current = self._spent(keys[0])
        seeded, ttl_s = _int(args[0]), _int(args[1])
        if current is not None and current >= seeded:
            return current
        self._space.set(keys[0], seeded, ttl_s * 1000 if ttl_s > 0 else None)
        return seeded
