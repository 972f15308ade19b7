"""integer request keys: jobs.number, batches.number, and a compact request index keyed by them

The request index repeated 28- to 30-character text ids in every row and in four B-trees
(~265 bytes a request on SQLite). It is now keyed by small integers, clustered on
(job_number, position) (WITHOUT ROWID on SQLite), with one secondary index on
(job_number, batch_number). Existing rows are carried over: jobs are numbered in creation order,
batches in creation order within their job.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 01:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HOLD = "requests_migrating"


def _is_postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _create_new_requests() -> None:
    op.create_table(
        "requests",
        sa.Column("job_number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("custom_id", sa.Text(), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_code", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("result_batch_number", sa.Integer(), nullable=True),
        sa.Column("result_kind", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("result_offset", sa.BigInteger(), nullable=True),
        sa.Column("result_length", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("job_number", "position", name=op.f("pk_requests")),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_requests_job_number_batch_number", "requests", ["job_number", "batch_number"]
    )


def _create_old_requests() -> None:
    op.create_table(
        "requests",
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("custom_id", sa.Text(), nullable=False),
        sa.Column("batch_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_code", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("result_batch_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("result_kind", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("result_offset", sa.BigInteger(), nullable=True),
        sa.Column("result_length", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_requests_job_id_jobs")),
        sa.PrimaryKeyConstraint("job_id", "position", name=op.f("pk_requests")),
        sa.UniqueConstraint("job_id", "custom_id", name=op.f("uq_requests_job_id_custom_id")),
    )
    op.create_index("ix_requests_batch_id_custom_id", "requests", ["batch_id", "custom_id"])


_COLUMNS_NEW = (
    "job_number, position, custom_id, batch_number, attempt, outcome, status_code, error_code, "
    "result_batch_number, result_kind, result_offset, result_length"
)
_COLUMNS_OLD = (
    "job_id, position, custom_id, batch_id, attempt, outcome, status_code, error_code, "
    "result_batch_id, result_kind, result_offset, result_length"
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("number", sa.BigInteger(), nullable=True))
    op.add_column("batches", sa.Column("number", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE jobs SET number = n.rn FROM (SELECT id, row_number() OVER "
        "(ORDER BY created_at, id) AS rn FROM jobs) AS n WHERE jobs.id = n.id"
    )
    op.execute(
        "UPDATE batches SET number = n.rn FROM (SELECT id, row_number() OVER "
        "(PARTITION BY job_id ORDER BY created_at, shard_index, id) AS rn FROM batches) AS n "
        "WHERE batches.id = n.id"
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("number", existing_type=sa.BigInteger(), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_jobs_number"), ["number"])
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.alter_column("number", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint(
            batch_op.f("uq_batches_job_id_number"), ["job_id", "number"]
        )
    if _is_postgresql():
        op.execute("CREATE SEQUENCE jobs_number_seq")
        op.execute(
            "SELECT setval('jobs_number_seq', (SELECT coalesce(max(number), 0) + 1 FROM jobs), "
            "false)"
        )

    op.execute(
        f"CREATE TABLE {_HOLD} AS SELECT j.number AS job_number, r.position, r.custom_id, "
        "b.number AS batch_number, r.attempt, r.outcome, r.status_code, r.error_code, "
        "rb.number AS result_batch_number, r.result_kind, r.result_offset, r.result_length "
        "FROM requests AS r JOIN jobs AS j ON j.id = r.job_id "
        "JOIN batches AS b ON b.id = r.batch_id "
        "LEFT JOIN batches AS rb ON rb.id = r.result_batch_id"
    )
    op.drop_index("ix_requests_batch_id_custom_id", table_name="requests")
    op.drop_table("requests")
    _create_new_requests()
    op.execute(
        f"INSERT INTO requests ({_COLUMNS_NEW}) SELECT {_COLUMNS_NEW} FROM {_HOLD} "
        "ORDER BY job_number, position"
    )
    op.drop_table(_HOLD)


def downgrade() -> None:
    op.execute(
        f"CREATE TABLE {_HOLD} AS SELECT j.id AS job_id, r.position, r.custom_id, "
        "b.id AS batch_id, r.attempt, r.outcome, r.status_code, r.error_code, "
        "rb.id AS result_batch_id, r.result_kind, r.result_offset, r.result_length "
        "FROM requests AS r JOIN jobs AS j ON j.number = r.job_number "
        "JOIN batches AS b ON b.job_id = j.id AND b.number = r.batch_number "
        "LEFT JOIN batches AS rb ON rb.job_id = j.id AND rb.number = r.result_batch_number"
    )
    op.drop_index("ix_requests_job_number_batch_number", table_name="requests")
    op.drop_table("requests")
    _create_old_requests()
    op.execute(f"INSERT INTO requests ({_COLUMNS_OLD}) SELECT {_COLUMNS_OLD} FROM {_HOLD}")
    op.drop_table(_HOLD)

    if _is_postgresql():
        op.execute("DROP SEQUENCE jobs_number_seq")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_batches_job_id_number"), type_="unique")
        batch_op.drop_column("number")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_jobs_number"), type_="unique")
        batch_op.drop_column("number")
