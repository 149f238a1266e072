"""a key to sign wake-up notifications with

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 06:30:00
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "secrets",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Made here, once per database, so that every process and host sharing
    # the database signs with the same key, and no operator has to hand it out.
    op.bulk_insert(table, [{"name": "wakeups", "value": secrets.token_bytes(32)}])


def downgrade() -> None:
    op.drop_table("secrets")
