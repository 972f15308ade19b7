"""outcomes table: request outcomes appended, not updated in place, with per-request usage

Collecting a batch used to UPDATE every request row it answered (outcome, status, line place).
On PostgreSQL that writes a new version of each row and its index entries (~9 µs a row against
~2.6 for an INSERT), and leaves the table twice its size and out of input order for the export.
Outcomes now go to `outcomes` (same key as `requests`, one row a request: its latest recorded
outcome), appended while collecting, with the tokens of each response body's `usage`.

Existing outcomes are carried over (every request that had any of them recorded gets its row)
and back on downgrade (per-request tokens have no place there and are dropped; the per-batch
sums on `batches` stay).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HOLD = "requests_migrating"
_OUTCOME = "outcome, status_code, error_code, result_batch_number, result_kind, result_offset, "
_OUTCOME += "result_length"
_RECORDED = (
    "outcome IS NOT NULL OR status_code IS NOT NULL OR error_code IS NOT NULL "
    "OR result_batch_number IS NOT NULL OR result_kind IS NOT NULL"
)


def _is_postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _outcome_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_code", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("result_batch_number", sa.Integer(), nullable=True),
        sa.Column("result_kind", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("result_offset", sa.BigInteger(), nullable=True),
        sa.Column("result_length", sa.Integer(), nullable=True),
    ]


def _create_requests(with_outcomes: bool) -> None:
    op.create_table(
        "requests",
        sa.Column("job_number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("custom_id", sa.Text(), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        *(_outcome_columns() if with_outcomes else []),
        sa.PrimaryKeyConstraint("job_number", "position", name=op.f("pk_requests")),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_requests_job_number_batch_number", "requests", ["job_number", "batch_number"]
    )


_REQUEST = "job_number, position, custom_id, batch_number, attempt"


def _rebuild_requests_sqlite(with_outcomes: bool, select: str) -> None:
    """SQLite cannot drop or add columns of a WITHOUT ROWID table in place (and batch mode
    would lose WITHOUT ROWID): the table is rebuilt from `select`, which reads `_HOLD`."""
    op.execute(f"CREATE TABLE {_HOLD} AS SELECT * FROM requests")
    op.drop_index("ix_requests_job_number_batch_number", table_name="requests")
    op.drop_table("requests")
    _create_requests(with_outcomes)
    columns = _REQUEST + (", " + _OUTCOME if with_outcomes else "")
    op.execute(f"INSERT INTO requests ({columns}) {select} ORDER BY 1, 2")
    op.drop_table(_HOLD)


def upgrade() -> None:
    op.create_table(
        "outcomes",
        sa.Column("job_number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        *_outcome_columns(),
        sa.Column("input_tokens", sa.Integer(), nullable=True),
        sa.Column("cached_input_tokens", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("job_number", "position", name=op.f("pk_outcomes")),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_outcomes_pending",
        "outcomes",
        ["job_number", "position"],
        sqlite_where=sa.text("outcome IS NULL"),
        postgresql_where=sa.text("outcome IS NULL"),
    )
    op.execute(
        f"INSERT INTO outcomes (job_number, position, {_OUTCOME}) "
        f"SELECT job_number, position, {_OUTCOME} FROM requests WHERE {_RECORDED} "
        "ORDER BY job_number, position"
    )
    if _is_postgresql():
        for column in reversed(_OUTCOME.split(", ")):
            op.drop_column("requests", column)
    else:
        _rebuild_requests_sqlite(False, f"SELECT {_REQUEST} FROM {_HOLD}")


def downgrade() -> None:
    if _is_postgresql():
        for column in _outcome_columns():
            op.add_column("requests", column)
        op.execute(
            f"UPDATE requests AS r SET {', '.join(f'{c} = o.{c}' for c in _OUTCOME.split(', '))} "
            "FROM outcomes AS o "
            "WHERE o.job_number = r.job_number AND o.position = r.position"
        )
    else:
        prefixed = ", ".join(f"o.{c}" for c in _OUTCOME.split(", "))
        _rebuild_requests_sqlite(
            True,
            f"SELECT r.job_number, r.position, r.custom_id, r.batch_number, r.attempt, "
            f"{prefixed} FROM {_HOLD} AS r LEFT JOIN outcomes AS o "
            "ON o.job_number = r.job_number AND o.position = r.position",
        )
    op.drop_index("ix_outcomes_pending", table_name="outcomes")
    op.drop_table("outcomes")
