"""job names, fingerprints and problems: jobs.name (unique), jobs.fingerprint (indexed),
jobs.retry_of, and jobs.problem, problem_kind, problem_source, problem_at

A job may be named at submit and found by its name; its fingerprint (the input's sha256 with the
job's options) lets `jobqueue process` find its job again after a crash and `submit` refuse a
second open job for one file; `retry_of` links a retry job to the job it retries; the problem
columns say why an open job is not moving. Existing jobs get none of them.

Revision ID: 0007
Revises: 0005 (there is no 0006: the branch that had it did not land)
Create Date: 2026-12-03 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("fingerprint", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("retry_of", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("problem", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True)
        )
        batch_op.add_column(
            sa.Column("problem_kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        )
        batch_op.add_column(
            sa.Column("problem_source", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        )
        batch_op.add_column(sa.Column("problem_at", sa.Float(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_jobs_name"), ["name"])
        batch_op.create_index(batch_op.f("ix_jobs_fingerprint"), ["fingerprint"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_fingerprint"))
        batch_op.drop_constraint(batch_op.f("uq_jobs_name"), type_="unique")
        for column in (
            "problem_at", "problem_source", "problem_kind", "problem", "retry_of",
            "fingerprint", "name",
        ):  # fmt: skip
            batch_op.drop_column(column)
