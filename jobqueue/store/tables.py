"""The SQLModel tables. Times are Unix seconds (floats): portable, exact and cheap to compare.

Request bodies never enter the database: they stay in shard files under the data dir. The
`requests` table is the per-request index: where each request is now; `outcomes` holds what
became of it and where its result line is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

metadata = SQLModel.metadata
# Explicit names keep migrations stable across databases.
metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=64)
    # A small integer key for the request index: a million requests repeat it a million times.
    number: int = Field(sa_column=Column(BigInteger, nullable=False, unique=True))
    status: str = Field(index=True, max_length=16)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(default="24h", max_length=16)
    # Remote batch metadata the user asked for (`--metadata K=V`).
    user_metadata: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    max_attempts: int = 3
    deadline_at: float | None = None
    source: str = Field(default="", max_length=4096)
    input_dir: str = Field(default="", max_length=4096)
    max_batch_requests: int
    max_batch_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    request_count: int = Field(sa_column=Column(BigInteger, nullable=False))
    bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    requests_succeeded: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0")
    )
    requests_failed: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0")
    )
    cancel_requested: bool = False
    error: str | None = Field(default=None, max_length=4096)
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    # Local input and result files deleted once the retention ran out.
    purged_at: float | None = None
    # A name given at submit (`--name`): the job can be found by it. Unique where set.
    name: str | None = Field(default=None, max_length=64, unique=True)
    # sha256 of the input file's content and the job's options: `process` finds its job again
    # by it, `submit` refuses a second open job for the same file.
    fingerprint: str | None = Field(default=None, max_length=64, index=True)
    # The job whose failed requests this one retries (`jobqueue retry`).
    retry_of: str | None = Field(default=None, max_length=64)
    # Why an open job is not moving (a key refused, the remote down), which kind of problem it
    # is, which duty saw it (only that duty's success clears it), and since when.
    problem: str | None = Field(default=None, max_length=512)
    problem_kind: str | None = Field(default=None, max_length=16)
    problem_source: str | None = Field(default=None, max_length=16)
    problem_at: float | None = None
    # The job's budget in USD (None: none), and when `job.budget_exceeded` was written for it
    # (None: not since the budget was last set).
    max_cost: float | None = None
    budget_exceeded_at: float | None = None


class BatchRow(SQLModel, table=True):
    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_status_not_before", "status", "not_before"),
        UniqueConstraint("job_id", "number"),
    )

    id: str = Field(primary_key=True, max_length=64)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=64)
    # 1, 2, 3… within the job: the request index names batches by it.
    number: int
    status: str = Field(max_length=16)
    shard_index: int
    attempt: int = 1
    model: str | None = Field(default=None, max_length=256)
    input_path: str = Field(max_length=4096)
    request_count: int
    bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    estimated_tokens: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0")
    )
    # The most output tokens the batch's requests may be billed for (None: some request sets
    # no bound). Priced with `estimated_tokens` for what is in flight under a budget.
    max_output_tokens: int | None = Field(default=None, sa_column=Column(BigInteger))
    remote_id: str | None = Field(default=None, unique=True, max_length=128)
    input_file_id: str | None = Field(default=None, max_length=128)
    output_file_id: str | None = Field(default=None, max_length=128)
    error_file_id: str | None = Field(default=None, max_length=128)
    remote_total: int = 0
    remote_completed: int = 0
    remote_failed: int = 0
    # The remote batch object's own `usage`, as it reported it.
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Tokens summed over the batch's responses while collecting (each body's `usage`); None
    # until collected. Compared with `usage` above, and priced by the model's batch prices.
    input_tokens: int | None = Field(default=None, sa_column=Column(BigInteger))
    cached_input_tokens: int | None = Field(default=None, sa_column=Column(BigInteger))
    output_tokens: int | None = Field(default=None, sa_column=Column(BigInteger))
    reasoning_tokens: int | None = Field(default=None, sa_column=Column(BigInteger))
    errors: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    last_error: str | None = Field(default=None, max_length=4096)
    # Claiming: a daemon holds a batch while it works on it. A lease is taken over only once it
    # has run out and its owner is not a live daemon. Each claim draws a new `lease_token`, and
    # every write the holder makes is fenced on (lease_owner, lease_token): a holder whose lease
    # was taken over changes nothing.
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_until: float | None = None
    lease_token: str | None = Field(default=None, max_length=32)
    # Not to be submitted before this time (token-limit backoff, transient submit errors).
    not_before: float | None = None
    submit_attempts: int = 0
    # Times the remote refused this shard for the enqueued-token limit: its backoff grows on it.
    token_limit_refusals: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0")
    )
    cancel_requested: bool = False
    created_at: float
    updated_at: float
    submitting_at: float | None = None
    validating_at: float | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    # The remote's own deadline for the batch (`expires_at`).
    expires_at: float | None = None
    refreshed_at: float | None = None
    # Results: set once output and error files are stored and outcomes recorded.
    output_path: str | None = Field(default=None, max_length=4096)
    error_path: str | None = Field(default=None, max_length=4096)
    collected_at: float | None = None
    purged_at: float | None = None
    overdue_reported_at: float | None = None
    stuck_reported_at: float | None = None


class RequestRow(SQLModel, table=True):
    """One request of a job: where it is now (its batch and attempt). Its outcome, once it has
    one, is a row of `outcomes`.

    Keyed by small integers (`jobs.number`, `batches.number`) rather than the text ids, and
    clustered on (job_number, position) (`WITHOUT ROWID` on SQLite): a row is ~35 bytes in one
    B-tree instead of ~265 bytes in four, which is what makes a million-request intake fast.
    Collection never updates these rows (it appends to `outcomes`), so they stay where intake
    wrote them, in input order. No foreign key: rows are only ever written with their job, in
    its transaction, and a per-row check would cost more than the row itself.
    """

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_job_number_batch_number", "job_number", "batch_number"),
        {"sqlite_with_rowid": False},
    )

    job_number: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    # 0-based ordinal of the request in the input file.
    position: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    custom_id: str = Field(sa_column=Column(Text, nullable=False))
    # The batch that holds the request now (its latest attempt).
    batch_number: int
    attempt: int = 1


class OutcomeRow(SQLModel, table=True):
    """The latest recorded outcome of a request (same key as `requests`): written when its batch
    is collected, append-only in the usual case (a request's first attempt), replaced when a
    retry's batch is collected. A request without a row, or whose row has `outcome` NULL (a
    retryable failure, waiting for its retry), is pending. Every request of a collected batch
    has a row (a line's, or one saying why it has none).

    Appending is what makes collection fast: a PostgreSQL INSERT (COPY) costs a fraction of an
    UPDATE of the full request pages, and the rows land in collection order, which is input
    order, so the export reads them in sequence. Clustered like `requests` on SQLite.
    """

    __tablename__ = "outcomes"
    __table_args__ = (
        # The few requests waiting for a retry, found without scanning the job's rows; rows
        # with a final outcome (nearly all) are not in it and cost it nothing.
        Index(
            "ix_outcomes_pending",
            "job_number",
            "position",
            sqlite_where=text("outcome IS NULL"),
            postgresql_where=text("outcome IS NULL"),
        ),
        {"sqlite_with_rowid": False},
    )

    job_number: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    position: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    # None while pending (a retryable failure); `succeeded` or `failed` once final.
    outcome: str | None = Field(default=None, max_length=16)
    status_code: int | None = None
    error_code: str | None = Field(default=None, max_length=128)
    # Where the outcome's line is: in the output or error file of batch `result_batch_number`
    # (None when no line names the request: it never ran, or the remote did not report it).
    result_batch_number: int | None = None
    result_kind: str | None = Field(default=None, max_length=8)
    result_offset: int | None = Field(default=None, sa_column=Column(BigInteger))
    result_length: int | None = None
    # Tokens from the response body's `usage` (None when the line had none, e.g. an error).
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None


class EventRow(SQLModel, table=True):
    """The outbox: written in the transaction that made the change, delivered afterwards."""

    __tablename__ = "events"

    # SQLite only autoincrements an INTEGER primary key; PostgreSQL gets a BIGINT identity.
    seq: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    id: str = Field(unique=True, max_length=64)
    type: str = Field(index=True, max_length=64)
    created_at: float
    job_id: str | None = Field(default=None, index=True, max_length=64)
    batch_id: str | None = Field(default=None, max_length=64)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str | None = Field(default=None, max_length=16)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DaemonRow(SQLModel, table=True):
    """A daemon (or any process running the duties) that shares the database: `id` is the
    owner name in its leases. It renews `heartbeat_at` every few seconds; one whose heartbeat
    is older than the daemon timeout, or that is stopped, is dead."""

    __tablename__ = "daemons"

    id: str = Field(primary_key=True, max_length=128)
    host: str = Field(max_length=255)
    pid: int
    version: str = Field(max_length=64)
    started_at: float
    heartbeat_at: float
    stopped_at: float | None = None


jobs_table = JobRow.__table__  # type: ignore[attr-defined]
batches_table = BatchRow.__table__  # type: ignore[attr-defined]
requests_table = RequestRow.__table__  # type: ignore[attr-defined]
outcomes_table = OutcomeRow.__table__  # type: ignore[attr-defined]
events_table = EventRow.__table__  # type: ignore[attr-defined]
daemons_table = DaemonRow.__table__  # type: ignore[attr-defined]


# -- hook deliveries ------------------------------------------------------------------------
# One row per (event, sink): the dispatcher fans events out into deliveries, claims them with a
# lease, and records every attempt. `sink_cursors` remembers how far fan-out got for each sink.

_SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")


class DeliveryRow(SQLModel, table=True):
    """One event for one sink: `pending` until delivered, or `dead` after its last attempt."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # Also the index on `event_seq` (its leading column): fan-out is idempotent through it.
        UniqueConstraint("event_seq", "sink"),
        # "Next due deliveries of a sink": equality on sink and status, range on the time.
        Index("ix_deliveries_sink_status_next_attempt_at", "sink", "status", "next_attempt_at"),
        # "Is an earlier delivery of this job still pending for this sink?" (in order per job).
        Index("ix_deliveries_sink_job_id_event_seq", "sink", "job_id", "event_seq"),
        Index("ix_deliveries_event_id", "event_id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(_SEQ_TYPE, primary_key=True, autoincrement=True)
    )
    event_seq: int = Field(
        sa_column=Column(_SEQ_TYPE, ForeignKey("events.seq", ondelete="CASCADE"), nullable=False)
    )
    event_id: str = Field(max_length=64)
    job_id: str | None = Field(default=None, max_length=64)
    sink: str = Field(max_length=1024)
    status: str = Field(max_length=16)
    attempts: int = 0
    next_attempt_at: float
    last_error: str | None = Field(default=None, max_length=1024)
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_until: float | None = None
    created_at: float
    updated_at: float
    delivered_at: float | None = None


class DeliveryAttemptRow(SQLModel, table=True):
    """One attempt at a delivery: when, by whom, and how it ended."""

    __tablename__ = "delivery_attempts"

    id: int | None = Field(
        default=None, sa_column=Column(_SEQ_TYPE, primary_key=True, autoincrement=True)
    )
    delivery_id: int = Field(
        sa_column=Column(
            _SEQ_TYPE,
            ForeignKey("deliveries.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    attempt: int
    owner: str = Field(max_length=128)
    started_at: float
    finished_at: float
    ok: bool
    error: str | None = Field(default=None, max_length=1024)
    status_code: int | None = None


class SinkCursorRow(SQLModel, table=True):
    """How far fan-out got for a sink: every event up to `last_seq` has its delivery rows."""

    __tablename__ = "sink_cursors"

    sink: str = Field(primary_key=True, max_length=1024)
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: float


deliveries_table = DeliveryRow.__table__  # type: ignore[attr-defined]
delivery_attempts_table = DeliveryAttemptRow.__table__  # type: ignore[attr-defined]
sink_cursors_table = SinkCursorRow.__table__  # type: ignore[attr-defined]
