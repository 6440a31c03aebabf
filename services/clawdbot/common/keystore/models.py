"""The key store's tables (SQLAlchemy 2 declarative). The schema itself is created by
the Alembic migrations in migrations/versions; these classes must match them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from clawdbot.common.keystore.types import Money, UtcDateTime

# SQLite only auto-increments an "INTEGER PRIMARY KEY"; PostgreSQL gets a bigint.
LedgerId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("sha256", name="uq_api_keys_sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    # The only trace of the secret: a leaked database does not leak keys.
    sha256: Mapped[str] = mapped_column(String(64))
    models: Mapped[list[str]] = mapped_column(JSON)
    budget: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rate_limit: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    max_parallel: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # "metadata" is reserved on declarative classes; the column keeps the API's name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # {"strategy", "cache", "workflows"} (migration 0002; {} for keys made before it).
    defaults: Mapped[dict[str, Any]] = mapped_column(JSON, server_default=text("'{}'"))


class SpendEntry(Base):
    __tablename__ = "spend_ledger"
    __table_args__ = (
        # One settlement per request: a repeated record (a retried settlement, a duplicate
        # end callback) is dropped by INSERT … ON CONFLICT DO NOTHING.
        UniqueConstraint("key_id", "request_id", name="uq_spend_ledger_key_request"),
        Index("ix_spend_ledger_key_at", "key_id", "at"),
        Index("ix_spend_ledger_at", "at"),
    )

    id: Mapped[int] = mapped_column(LedgerId, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    instance: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(Money)
    at: Mapped[datetime] = mapped_column(UtcDateTime)


class KeystoreVersion(Base):
    """One row, bumped in the same transaction as every key change, so replicas notice a
    change by reading one integer."""

    __tablename__ = "keystore_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
