"""KeyStore: virtual keys and the spend ledger on SQLAlchemy 2 (async), SQLite embedded by
default, PostgreSQL when database.url says so — the same code for both.

Every change to a key bumps the one-row `keystore_version` in the same transaction, and
bumps it first: on SQLite that first write takes the database's write lock at once (a
read-then-write transaction could fail on a concurrent writer instead of waiting), and
replicas learn about any change by reading one integer.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import migrate
from clawdbot.common.keystore.models import ApiKey, KeystoreVersion, SpendEntry
from clawdbot.common.keystore.records import KeyNotFound, KeyRecord, KeySpec

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-cb-"
ID_PREFIX = "key_"
PREFIX_CHARS = 8
# How long a SQLite writer waits for another process's transaction before giving up.
SQLITE_BUSY_TIMEOUT_S = 30


# Ledger column widths (models.SpendEntry): longer values are shortened, never refused —
# a write the database refuses would be retried forever by the ledger writer.
_MAX_KEY_ID = 40
_MAX_TEXT = 200
GROUP_BYS = {"key": ("key",), "model": ("model",), "key,model": ("key", "model"), "model,key": ("key", "model")}


class SpendLike(Protocol):
    """What the ledger records of one settled call: clawdbot.common.quota.SpendRecord has
    these fields (typed structurally so the store does not depend on the quota package)."""

    @property
    def key_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def instance(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def at(self) -> datetime: ...


def _fit(value: str, width: int) -> str:
    """`value` within `width` characters, still unique: a long one keeps a prefix and gets
    a digest of the whole, so a repeated long request id is still the same id."""
    if len(value) <= width:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    return value[: width - 33] + "#" + digest


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(30)  # 40 url-safe characters


def _new_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(18)  # 24 url-safe characters


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        models=tuple(row.models or ()),
        budget=dict(row.budget) if row.budget is not None else None,
        rate_limit=dict(row.rate_limit) if row.rate_limit is not None else None,
        max_parallel=row.max_parallel,
        expires_at=row.expires_at,
        metadata=dict(row.meta or {}),
        admin=bool(row.admin),
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked_at=row.revoked_at,
        defaults=_full_defaults(row.defaults),
    )


def _full_defaults(stored: dict[str, Any] | None) -> dict[str, Any]:
    # Rows from before migration 0002 hold {}: fill the shape in rather than fail on them.
    stored = stored or {}
    return {
        "strategy": str(stored.get("strategy") or ""),
        "cache": str(stored.get("cache") or ""),
        "workflows": [str(glob) for glob in stored.get("workflows") or ()],
    }


def _sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for PostgreSQL. Refuses other dialects."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql+asyncpg":
        return None
    if parsed.drivername != "sqlite+aiosqlite":
        raise ValueError(
            f"unsupported database URL {parsed.drivername}://…; use sqlite+aiosqlite or postgresql+asyncpg"
        )
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("the key store needs a SQLite file (several connections share it), not :memory:")
    return Path(parsed.database)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer, so two adapter processes can share the file;
    # busy_timeout: a writer waits for the other's transaction instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # NORMAL is durable across process crashes in WAL mode (only a power cut may lose the
    # last commits), and spares an fsync per ledger write.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> KeyStore:
        """url: "sqlite+aiosqlite:///abs/path.db" or "postgresql+asyncpg://user@host:port/db".
        migrate=True: Alembic upgrade to head, serialized across processes."""
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            engine = create_async_engine(url, pool_pre_ping=True)
        try:
            if migrate:
                await _migrate(engine, path)
        except BaseException:
            await engine.dispose()
            raise
        log.info("key store open", extra={"dialect": engine.dialect.name, "sqlite": str(path) if path else None})
        return cls(engine)

    async def close(self) -> None:
        await self._engine.dispose()

    @asynccontextmanager
    async def _change(self) -> AsyncIterator[AsyncSession]:
        """A write transaction that bumps the version first (see the module docstring)."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(KeystoreVersion).where(KeystoreVersion.id == 1).values(version=KeystoreVersion.version + 1)
            )
            yield session

    # --- keys ------------------------------------------------------------------------

    async def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """(record, secret). The secret is returned here only; the store keeps its hash."""
        secret = _new_secret()
        now = datetime.now(UTC)
        row = ApiKey(
            id=_new_id(),
            name=spec.name,
            prefix=secret[len(SECRET_PREFIX) : len(SECRET_PREFIX) + PREFIX_CHARS],
            sha256=hash_secret(secret),
            models=list(spec.models),
            budget=spec.budget,
            rate_limit=spec.rate_limit,
            max_parallel=spec.max_parallel,
            expires_at=spec.expires_at,
            meta=dict(spec.metadata),
            admin=spec.admin,
            defaults=dict(spec.defaults),
            created_at=now,
            updated_at=now,
            revoked_at=None,
        )
        async with self._change() as session:
            session.add(row)
        record = _record(row)
        log.info("key created", extra={"key_id": record.id, "key_name": record.name, "admin": record.admin})
        return record, secret

    async def list(self) -> builtins.list[KeyRecord]:
        """Newest first, revoked keys included."""
        async with self._sessions() as session:
            rows = await session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id))
            return [_record(row) for row in rows]

    async def get(self, key_id: str) -> KeyRecord:
        async with self._sessions() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            return _record(row)

    async def update(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Apply a PATCH (validated again here: KeySpec.parse_changes is idempotent)."""
        changes = KeySpec.parse_changes(changes)
        if not changes:
            return await self.get(key_id)
        async with self._change() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            for name, value in changes.items():
                if name == "metadata":
                    row.meta = value
                elif name == "models":
                    row.models = list(value)
                else:
                    setattr(row, name, value)
            row.updated_at = datetime.now(UTC)
        log.info("key updated", extra={"key_id": key_id, "fields": sorted(changes)})
        return _record(row)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Idempotent: revoking a revoked key keeps its first revocation time."""
        async with self._change() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is None:
                now = datetime.now(UTC)
                row.revoked_at = now
                row.updated_at = now
        log.info("key revoked", extra={"key_id": key_id})
        return _record(row)

    async def find_by_secret(self, secret: str) -> KeyRecord | None:
        """The key this secret belongs to (revoked or expired included: check usable()),
        or None."""
        if not secret.startswith(SECRET_PREFIX):
            return None
        async with self._sessions() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.sha256 == hash_secret(secret)))
            return _record(row) if row is not None else None

    async def version(self) -> int:
        async with self._sessions() as session:
            value = await session.scalar(select(KeystoreVersion.version).where(KeystoreVersion.id == 1))
            if value is None:
                raise GatewayError.unavailable("the key store's schema is missing (not migrated)")
            return int(value)

    # --- the ledger --------------------------------------------------------------------

    async def record_spend(
        self,
        *,
        key_id: str,
        model: str,
        instance: str,
        request_id: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float | Decimal,
        at: datetime | None = None,
    ) -> None:
        """One settled call. Idempotent per (key_id, request_id): a repeat is ignored, so a
        retried settlement never bills twice — give each billed attempt its own id."""
        if input_tokens < 0 or output_tokens < 0 or cost_usd < 0:
            raise ValueError("spend cannot be negative")
        when = at or datetime.now(UTC)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        values = {
            "key_id": key_id,
            "model": model,
            "instance": instance,
            "request_id": request_id,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cost_usd": cost_usd if isinstance(cost_usd, Decimal) else Decimal(str(cost_usd)),
            "at": when,
        }
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = insert(SpendEntry).values(**values).on_conflict_do_nothing(index_elements=["key_id", "request_id"])
        async with self._sessions() as session, session.begin():
            await session.execute(statement)

    async def record_spends(self, records: Sequence[SpendLike]) -> None:
        """Many settled calls in one transaction (the ledger writer's batch). Idempotent per
        (key_id, request_id) like record_spend, so a batch retried after a failure that
        did commit bills nothing twice. A record that cannot be stored as it is (negative
        or non-finite numbers, a key id past its column) is logged and skipped: refusing the
        batch would only make the writer retry it forever."""
        rows: builtins.list[dict[str, Any]] = []
        for record in records:
            cost = float(record.cost_usd)
            if (
                record.input_tokens < 0
                or record.output_tokens < 0
                or not math.isfinite(cost)
                or cost < 0
                or not record.key_id
                or len(record.key_id) > _MAX_KEY_ID
            ):
                log.error(
                    "ledger record skipped: not storable",
                    extra={
                        "key_id": record.key_id[:_MAX_TEXT],
                        "request_id": record.request_id[:_MAX_TEXT],
                        "model": record.model[:_MAX_TEXT],
                        "input_tokens": record.input_tokens,
                        "output_tokens": record.output_tokens,
                        "cost_usd": repr(record.cost_usd),
                    },
                )
                continue
            rows.append(
                {
                    "key_id": record.key_id,
                    "model": _fit(record.model, _MAX_TEXT),
                    "instance": _fit(record.instance, _MAX_TEXT),
                    "request_id": _fit(record.request_id, _MAX_TEXT),
                    "input_tokens": int(record.input_tokens),
                    "output_tokens": int(record.output_tokens),
                    # Through str: the float's shortest repr (0.001), not its binary expansion.
                    "cost_usd": Decimal(str(cost)),
                    "at": _utc(record.at),
                }
            )
        if not rows:
            return
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = insert(SpendEntry).on_conflict_do_nothing(index_elements=["key_id", "request_id"])
        # A list of parameter sets: SQLAlchemy batches them (executemany / insertmanyvalues)
        # within each dialect's parameter limits, all inside this one transaction.
        async with self._sessions() as session, session.begin():
            await session.execute(statement, rows)

    async def spend_total(self, key_id: str, since: datetime | None) -> float:
        """USD this key spent from `since` (inclusive) on, or ever (None): what the budget
        counters are seeded from when Redis does not have them."""
        query = select(func.sum(SpendEntry.cost_usd)).where(SpendEntry.key_id == key_id)
        if since is not None:
            query = query.where(SpendEntry.at >= _utc(since))
        async with self._sessions() as session:
            total = await session.scalar(query)
        return float(total or 0)

    async def spend_report(
        self, group_by: str, since: datetime | None, until: datetime | None
    ) -> builtins.list[dict[str, Any]]:
        """The ledger summed per key, per model or per (key, model), over [since, until)
        (None: unbounded): rows {"key_id"?, "model"?, "requests", "input_tokens",
        "output_tokens", "cost_usd"}, the most expensive first.
        group_by other than "key", "model", "key,model": 400 naming `group_by`."""
        dimensions = GROUP_BYS.get(group_by.replace(" ", ""))
        if dimensions is None:
            raise GatewayError.bad_request('`group_by` must be "key", "model" or "key,model".', param="group_by")
        columns = [SpendEntry.key_id if name == "key" else SpendEntry.model for name in dimensions]
        cost = func.sum(SpendEntry.cost_usd)
        query = select(
            *columns,
            func.count().label("requests"),
            func.sum(SpendEntry.input_tokens).label("input_tokens"),
            func.sum(SpendEntry.output_tokens).label("output_tokens"),
            cost.label("cost_usd"),
        ).group_by(*columns)
        if since is not None:
            query = query.where(SpendEntry.at >= _utc(since))
        if until is not None:
            query = query.where(SpendEntry.at < _utc(until))
        query = query.order_by(cost.desc(), *columns)
        async with self._sessions() as session:
            result = (await session.execute(query)).all()
        report: builtins.list[dict[str, Any]] = []
        for row in result:
            entry: dict[str, Any] = {}
            for index, name in enumerate(dimensions):
                entry["key_id" if name == "key" else "model"] = row[index]
            entry["requests"] = int(row.requests)
            entry["input_tokens"] = int(row.input_tokens or 0)
            entry["output_tokens"] = int(row.output_tokens or 0)
            entry["cost_usd"] = float(row.cost_usd or 0)
            report.append(entry)
        return report

    async def spend(self, key_id: str, since: datetime | None = None) -> dict[str, float]:
        """USD per model for this key, from `since` (inclusive) on, or ever."""
        query = (
            select(SpendEntry.model, func.sum(SpendEntry.cost_usd))
            .where(SpendEntry.key_id == key_id)
            .group_by(SpendEntry.model)
        )
        if since is not None:
            query = query.where(SpendEntry.at >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return {model: float(total or 0) for model, total in rows}


async def _migrate(engine: AsyncEngine, path: Path | None) -> None:
    await migrate.upgrade(engine, path)
