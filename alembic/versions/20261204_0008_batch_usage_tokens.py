"""batch usage tokens: batches.input_tokens, cached_input_tokens, output_tokens,
reasoning_tokens

Tokens summed over a batch's responses while it is collected (each response body's `usage`), so
that status, the API, events and `jobqueue cost` read them without another pass over the files.
Batches collected before this revision have none (NULL: not known, never 0).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for column in _COLUMNS:
            batch_op.add_column(sa.Column(column, sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for column in reversed(_COLUMNS):
            batch_op.drop_column(column)
