"""budgets: jobs.max_cost, jobs.budget_exceeded_at, batches.max_output_tokens

A job's budget in USD (`--max-cost`, the config's `max_cost`; NULL: none) and when its
`job.budget_exceeded` event was written (NULL: not since the budget was last set), and each
batch's bound on output tokens (the sum of its requests' `max_tokens`, `max_completion_tokens`
or `max_output_tokens`; NULL when some request sets none, or for batches made before this
revision): the submit duty prices what is in flight with it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_cost", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("budget_exceeded_at", sa.Float(), nullable=True))
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_output_tokens", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("max_output_tokens")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("budget_exceeded_at")
        batch_op.drop_column("max_cost")
