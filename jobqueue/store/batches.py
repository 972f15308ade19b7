"""Batches: inserting them, claiming and releasing them, and the named changes the duties make.

Every status change is the store's compare-and-set (`Store.transition_batch`), with its event in
the same transaction; the operations here name what a change means (claim a queued batch, requeue
one the remote refused, mark one collected) and hold the columns it writes, leases included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Row, func, insert, select, update

from jobqueue.core.ids import new_id
from jobqueue.core.lifecycle import TOKEN_LIMIT_CODE
from jobqueue.core.states import BATCH_REMOTE_OPEN, BatchStatus
from jobqueue.store.coordination import wake
from jobqueue.store.events import add_event, request_counts
from jobqueue.store.requests import fail_pending_requests, move_batch_requests
from jobqueue.store.tables import batches_table, jobs_table

if TYPE_CHECKING:
    from jobqueue.store.base import Store

B = BatchStatus
_RELEASED = {"lease_owner": None, "lease_until": None}
_ERROR_LIMIT = 4000


# -- inserting ------------------------------------------------------------------------------


def insert_queued_batches(
    conn: Connection,
    batches: Sequence[Mapping[str, Any]],
    *,
    now: float,
    data: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Insert new batches of a job, `queued`, in one statement, and a `batch.queued` event for
    each (its attempt, shard index, model and request counts, with `data[i]` added for the i-th).

    Each mapping holds the batch's columns; status, created_at and updated_at default to queued
    and `now`.
    """
    rows = [
        {"status": B.QUEUED.value, "created_at": now, "updated_at": now, **batch}
        for batch in batches
    ]
    if not rows:
        return
    conn.execute(insert(batches_table), rows)
    extras = list(data) if data is not None else [{}] * len(rows)
    for row, extra in zip(rows, extras, strict=True):
        add_event(
            conn,
            "batch.queued",
            job_id=row["job_id"],
            batch_id=row["id"],
            to_status=B.QUEUED,
            data={
                "attempt": row.get("attempt", 1),
                "shard_index": row["shard_index"],
                "model": row.get("model"),
                "request_counts": request_counts(row["request_count"], 0, 0),
                **extra,
            },
            now=now,
        )


def next_batch_number(conn: Connection, job_id: str) -> int:
    """A number for a new batch of the job. The job's row is locked first on PostgreSQL, so
    two daemons adding batches to one job take turns (SQLite writers always do)."""
    j, b = jobs_table, batches_table
    conn.execute(select(j.c.id).where(j.c.id == job_id).with_for_update())
    latest = conn.execute(select(func.max(b.c.number)).where(b.c.job_id == job_id)).scalar_one()
    return int(latest or 0) + 1


def last_shard_index(conn: Connection, job_id: str) -> int:
    """The highest shard index among the job's batches (0 when it has none)."""
    b = batches_table
    found = conn.execute(select(func.max(b.c.shard_index)).where(b.c.job_id == job_id)).scalar()
    return int(found or 0)


# -- submitting -----------------------------------------------------------------------------


def claim_queued(
    store: Store, conn: Connection, row: Row[Any], *, owner: str, now: float, lease_seconds: float
) -> Row[Any] | None:
    """Move a queued batch to `submitting` under `owner`'s lease; the new row, or None when
    another daemon claimed it first."""
    return store.transition_batch(
        conn,
        row.id,
        B.QUEUED,
        B.SUBMITTING,
        values={
            "lease_owner": owner,
            "lease_until": now + lease_seconds,
            "submit_attempts": row.submit_attempts + 1,
            "not_before": None,
        },
        now=now,
    )


def set_input_file(conn: Connection, batch_id: str, file_id: str | None) -> None:
    """Record the batch's uploaded input file (None: gone remotely, upload it again)."""
    _update(conn, batch_id, input_file_id=file_id)


def mark_create_uncertain(
    conn: Connection, batch_id: str, *, error: str, lease_until: float
) -> None:
    """The remote create may have happened: keep the batch in `submitting`, its lease cut
    short to `lease_until`, so that recovery looks for the remote batch once it runs out."""
    _update(conn, batch_id, lease_until=lease_until, last_error=f"create uncertain: {error}")


def requeue_submitting(
    store: Store, conn: Connection, batch_id: str, *, error: str, delay: float, now: float
) -> Row[Any] | None:
    """Give a `submitting` batch back to `queued`, its lease released, not to be submitted
    again for `delay` seconds."""
    return store.transition_batch(
        conn,
        batch_id,
        B.SUBMITTING,
        B.QUEUED,
        values={
            **_RELEASED,
            "not_before": now + delay if delay else None,
            "last_error": error[:_ERROR_LIMIT],
        },
        data={"reason": error[:500], "retry_in_seconds": round(delay, 1)},
        now=now,
    )


def fail_submission(
    store: Store, conn: Connection, row: Row[Any], *, code: str, error: str, now: float
) -> bool:
    """The remote refused a `submitting` batch for good: it ends `failed` (nothing to collect)
    and its pending requests fail with `code`. False when it was no longer submitting."""
    failed = store.transition_batch(
        conn,
        row.id,
        B.SUBMITTING,
        B.FAILED,
        values={**_RELEASED, "last_error": f"{code}: {error}"[:_ERROR_LIMIT], "collected_at": now},
        now=now,
    )
    if failed is None:
        return False
    fail_pending_requests(conn, row.job_id, row.id, code)
    return True


def mark_submitted(
    store: Store,
    conn: Connection,
    batch_id: str,
    values: Mapping[str, Any],
    *,
    at: float | None,
    now: float,
) -> Row[Any] | None:
    """A `submitting` batch has its remote batch: record it (`values`: remote id, files, what
    the remote said), release the lease, move to `validating` stamped `at`."""
    return store.transition_batch(
        conn, batch_id, B.SUBMITTING, B.VALIDATING, values={**values, **_RELEASED}, at=at, now=now
    )


# -- observing ------------------------------------------------------------------------------


def record_observed(conn: Connection, batch_id: str, values: Mapping[str, Any]) -> None:
    """Record what a refresh saw of a batch whose status did not change."""
    _update(conn, batch_id, **values)


def requeue_after_token_limit(
    store: Store,
    conn: Connection,
    row: Row[Any],
    values: Mapping[str, Any],
    *,
    delay: float,
    now: float,
) -> str | None:
    """The remote refused `row` for the enqueued-token limit: it ends `failed` (with `values`,
    what the remote said; nothing to collect), and its requests move to a new queued batch of
    the same shard and uploaded file, in the same attempt, not to be submitted for `delay`
    seconds, one more refusal counted on it. Returns the new batch's id, or None when `row`
    had moved meanwhile. An illegal edge raises `IllegalTransition` before anything is written.
    """
    failed = store.transition_batch(
        conn, row.id, row.status, B.FAILED,
        values={**values, "collected_at": now}, now=now, data={"reason": TOKEN_LIMIT_CODE},
    )  # fmt: skip
    if failed is None:
        return None
    refusals = row.token_limit_refusals + 1
    new = {
        "id": new_id("batch"),
        "job_id": row.job_id,
        "number": next_batch_number(conn, row.job_id),
        "shard_index": row.shard_index,
        "attempt": row.attempt,
        "model": row.model,
        "input_path": row.input_path,
        "request_count": row.request_count,
        "bytes": row.bytes,
        "estimated_tokens": row.estimated_tokens,
        "input_file_id": row.input_file_id,
        "not_before": now + delay,
        "token_limit_refusals": refusals,
        "last_error": f"{TOKEN_LIMIT_CODE} x{refusals}",
    }
    insert_queued_batches(
        conn,
        [new],
        now=now,
        data=[
            {
                "requeued_from": row.id,
                "reason": TOKEN_LIMIT_CODE,
                "retry_in_seconds": round(delay, 1),
            }
        ],
    )
    move_batch_requests(conn, row.job_id, row.id, new["number"])
    return str(new["id"])


# -- cancelling -----------------------------------------------------------------------------


def cancel_queued(
    store: Store,
    conn: Connection,
    job_id: str,
    batch_id: str,
    *,
    reason: str,
    error_code: str,
    now: float,
    by_user: bool = False,
) -> bool:
    """End a batch that never left `queued` as `cancelled` (nothing to collect); its requests
    fail with `error_code`. `by_user` marks it cancelled at its user's request. False when it
    was no longer queued."""
    values: dict[str, Any] = {"collected_at": now}
    if by_user:
        values["cancel_requested"] = True
    ended = store.transition_batch(
        conn, batch_id, B.QUEUED, B.CANCELLED, values=values, data={"reason": reason}, now=now
    )
    if ended is None:
        return False
    fail_pending_requests(conn, job_id, batch_id, error_code)
    return True


def request_remote_cancel(conn: Connection, batch_id: str, now: float) -> None:
    """Ask for the batch to be cancelled remotely: the reconcile duty sends the cancel."""
    _update(conn, batch_id, cancel_requested=True, updated_at=now)
    wake(conn, "reconcile")


# -- overdue and stuck ----------------------------------------------------------------------


def open_unreported(conn: Connection) -> list[Row[Any]]:
    """Batches the remote holds open that were not reported both overdue and stuck yet."""
    b = batches_table
    return list(
        conn.execute(
            select(b).where(
                b.c.status.in_([s.value for s in BATCH_REMOTE_OPEN]),
                b.c.overdue_reported_at.is_(None) | b.c.stuck_reported_at.is_(None),
            )
        ).all()
    )


def report_once(
    conn: Connection,
    row: Row[Any],
    kind: Literal["overdue", "stuck"],
    data: Mapping[str, Any],
    *,
    now: float,
) -> bool:
    """Raise `batch.<kind>` for a batch once: stamp `<kind>_reported_at` unless already set, and
    write the event with it. False when it was already reported."""
    b = batches_table
    column = b.c[f"{kind}_reported_at"]
    result = conn.execute(update(b).where(b.c.id == row.id, column.is_(None)).values({column: now}))
    if not result.rowcount:
        return False
    add_event(
        conn, f"batch.{kind}", job_id=row.job_id, batch_id=row.id,
        from_status=row.status, to_status=row.status,
        data={"remote_id": row.remote_id, **data}, now=now,
    )  # fmt: skip
    return True


# -- collecting -----------------------------------------------------------------------------


def mark_collected(
    conn: Connection,
    batch_id: str,
    *,
    output_path: str | None,
    error_path: str | None,
    now: float,
) -> None:
    """The batch's outcomes are recorded and its files stored: release its lease."""
    _update(
        conn, batch_id, collected_at=now, output_path=output_path, error_path=error_path,
        **_RELEASED,
    )  # fmt: skip


def _update(conn: Connection, batch_id: str, **values: Any) -> None:
    b = batches_table
    conn.execute(update(b).where(b.c.id == batch_id).values(**values))
