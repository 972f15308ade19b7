"""token limit refusals: batches.token_limit_refusals, the count the token-limit backoff grows on

The count of times the remote refused a shard for the enqueued-token limit was written into the
free text of `last_error` ("token_limit_exceeded xN") and parsed back with a regular expression.
It is a column now. Batches whose `last_error` still carries the count keep it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:00:00
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNT = re.compile(r"token_limit_exceeded x(\d+)")


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("token_limit_refusals", sa.Integer(), server_default="0", nullable=False)
        )
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(
            "SELECT id, last_error FROM batches WHERE last_error LIKE '%token_limit_exceeded x%'"
        )
    ).all()
    counts = [
        {"id": batch_id, "n": int(found.group(1))}
        for batch_id, last_error in rows
        if (found := _COUNT.search(last_error or ""))
    ]
    if counts:
        conn.execute(sa.text("UPDATE batches SET token_limit_refusals = :n WHERE id = :id"), counts)


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("token_limit_refusals")
