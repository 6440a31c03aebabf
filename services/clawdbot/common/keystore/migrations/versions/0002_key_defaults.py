"""Per-key defaults: a routing strategy, a cache scope and the workflows a key may run.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A JSON literal default fills the existing rows on both dialects ('{}' is valid
    # json on PostgreSQL and text on SQLite); batch mode (env.py) rebuilds the SQLite
    # table only if it must — ADD COLUMN with a constant default it does in place.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("defaults", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("defaults")
