"""Alembic upgrades run from code, serialized across processes.

Several processes (adapter replicas, the jobs service) may open the same store at once;
only one may migrate at a time: a file lock beside the SQLite file, a session-level
advisory lock on PostgreSQL. The others wait, then find the schema at head.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import portalocker
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock takes a bigint: a fixed one for "the key store's schema".
_PG_LOCK_ID = 0x6B657973746F7265  # "keystore"
# Waiting longer than this for another process's migration means something is stuck.
LOCK_TIMEOUT_S = 120.0


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def _upgrade_on(connection: AsyncConnection) -> None:
    await connection.run_sync(_upgrade)
    await connection.commit()


async def upgrade(engine: AsyncEngine, sqlite_path: Path | None) -> None:
    """Upgrade to head. `sqlite_path`: the database file (None: PostgreSQL)."""
    if sqlite_path is not None:
        lock = portalocker.Lock(
            str(sqlite_path) + ".migrate.lock", mode="a", timeout=LOCK_TIMEOUT_S, fail_when_locked=False
        )
        # Blocking acquisition runs in a thread: the event loop keeps serving meanwhile.
        await asyncio.to_thread(lock.acquire)
        try:
            async with engine.connect() as connection:
                await _upgrade_on(connection)
        finally:
            lock.release()
    else:
        async with engine.connect() as connection:
            # The session-level lock outlives the transactions the upgrade commits.
            await connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            await connection.commit()
            try:
                await _upgrade_on(connection)
            finally:
                await connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                await connection.commit()
    log.info("key store schema at head", extra={"sqlite": str(sqlite_path) if sqlite_path else None})
