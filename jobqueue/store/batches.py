"""Batches: inserting them, claiming and releasing them, and the named changes the duties make.

Every status change is the store's compare-and-set (`Store.transition_batch`), with its event in
the same transaction; the operations here name what a change means (claim a queued batch, requeue
one the remote refused, mark one collected) and hold the columns it writes, leases included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Row, bindparam, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from jobqueue.core.costs import CostEstimate, PriceTable
from jobqueue.core.ids import new_id
from jobqueue.core.lifecycle import TOKEN_LIMIT_CODE
from jobqueue.core.states import BATCH_REMOTE_OPEN, BatchStatus
from jobqueue.settings import packaged_prices
from jobqueue.store.coordination import wake
from jobqueue.store.costs import prices_of
from jobqueue.store.events import add_event, request_counts
from jobqueue.store.requests import fail_pending_requests, move_batch_requests
from jobqueue.store.tables import batches_table, jobs_table

if TYPE_CHECKING:
    from jobqueue.store.base import Store

B = BatchStatus
_RELEASED = {"lease_owner": None, "lease_until": None, "lease_token": None}
_ERROR_LIMIT = 4000


# -- leases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """A holder's lease on a batch: who holds it, the token drawn when it was claimed, and
    until when it runs. Every write the holder makes is fenced on `owner` and `token`: once the
    lease was taken over (or given back), the write changes nothing."""

    batch_id: str
    owner: str
    token: str
    until: float

    @classmethod
    def of(cls, row: Row[Any]) -> Lease:
        """The lease a claim's returned row holds."""
        if row.lease_owner is None or row.lease_token is None:
            raise ValueError(f"batch {row.id} is not leased")
        return cls(row.id, row.lease_owner, row.lease_token, float(row.lease_until or 0.0))


@dataclass(frozen=True, slots=True)
class BatchChange:
    """One transition of `Store.transition_batches`: `source -> dest` on a batch, with the
    columns it writes (`values`), the remote's time for it (`at`), what its event's data adds
    (`data`), and the lease it is fenced on, if any (as `Store.transition_batch` takes them)."""

    batch_id: str
    source: str
    dest: str
    values: Mapping[str, Any] | None = None
    at: float | None = None
    data: Mapping[str, Any] | None = None
    lease: Lease | None = None


def new_lease_token() -> str:
    return os.urandom(8).hex()


def held(lease: Lease) -> list[ColumnElement[bool]]:
    """WHERE clauses: the batch is still under `lease` (same owner, same token)."""
    b = batches_table
    return [
        b.c.id == lease.batch_id,
        b.c.lease_owner == lease.owner,
        b.c.lease_token == lease.token,
    ]


# Built once (SQLAlchemy caches their compiled form): the fenced writes of a lease holder,
# their SET clause from the names of the parameters.
_HELD = update(batches_table).where(
    batches_table.c.id == bindparam("w_id"),
    batches_table.c.lease_owner == bindparam("w_owner"),
    batches_table.c.lease_token == bindparam("w_token"),
)


def _held_params(lease: Lease, **values: Any) -> dict[str, Any]:
    return {"w_id": lease.batch_id, "w_owner": lease.owner, "w_token": lease.token, **values}


def renew_lease(conn: Connection, lease: Lease, *, until: float) -> Lease | None:
    """Extend a held lease to `until`; the renewed lease, or None when it was lost."""
    result = conn.execute(_HELD, _held_params(lease, lease_until=until))
    return replace(lease, until=until) if result.rowcount else None


def release(conn: Connection, lease: Lease) -> bool:
    """Give a held batch back unchanged (a step failed and will be tried again). False when
    the lease was lost already."""
    result = conn.execute(_HELD, _held_params(lease, **_RELEASED))
    return bool(result.rowcount)


# -- inserting ------------------------------------------------------------------------------


def insert_queued_batches(
    conn: Connection,
    batches: Sequence[Mapping[str, Any]],
    *,
    now: float,
    data: Sequence[Mapping[str, Any]] | None = None,
    prices: PriceTable | None = None,
) -> None:
    """Insert new batches of a job, `queued`, in one statement, and a `batch.queued` event for
    each (its attempt, shard index, model, request counts and estimate: `estimated_tokens`,
    `max_output_tokens` and their cost range at `prices`, the packaged table when not given;
    with `data[i]` added for the i-th).

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
    table = prices if prices is not None else packaged_prices()
    for row, extra in zip(rows, extras, strict=True):
        estimate = queued_estimate(table, row)
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
                **estimate.to_data(),
                "estimate_sampled": False,  # made from every request, unless `extra` says
                **extra,
            },
            now=now,
        )


def queued_estimate(prices: PriceTable, batch: Mapping[str, Any]) -> CostEstimate:
    """A new batch's estimate (its columns `model`, `estimated_tokens`, `max_output_tokens`)
    priced at `prices`."""
    return CostEstimate.of(
        prices, batch.get("model"), int(batch.get("estimated_tokens") or 0),
        batch.get("max_output_tokens"),
    )  # fmt: skip


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
    """Move a queued batch to `submitting` under `owner`'s lease, a new lease token drawn;
    the new row (`Lease.of(row)` is the lease), or None when another daemon claimed it first."""
    return store.transition_batch(
        conn,
        row.id,
        B.QUEUED,
        B.SUBMITTING,
        values={
            "lease_owner": owner,
            "lease_until": now + lease_seconds,
            "lease_token": new_lease_token(),
            "submit_attempts": row.submit_attempts + 1,
            "not_before": None,
        },
        now=now,
    )


def set_input_file(conn: Connection, lease: Lease, file_id: str | None) -> bool:
    """Record the batch's uploaded input file (None: gone remotely, upload it again). False,
    and nothing written, when the lease was lost."""
    result = conn.execute(update(batches_table).where(*held(lease)).values(input_file_id=file_id))
    return bool(result.rowcount)


def mark_create_uncertain(
    conn: Connection, lease: Lease, *, error: str, lease_until: float
) -> bool:
    """The remote create may have happened: keep the batch in `submitting`, its lease cut
    short to `lease_until`, so that recovery looks for the remote batch once it runs out.
    False, and nothing written, when the lease was lost."""
    result = conn.execute(
        update(batches_table)
        .where(*held(lease))
        .values(lease_until=lease_until, last_error=f"create uncertain: {error}"[:_ERROR_LIMIT])
    )
    return bool(result.rowcount)


def requeue_submitting(
    store: Store, conn: Connection, lease: Lease, *, error: str, delay: float, now: float
) -> Row[Any] | None:
    """Give a `submitting` batch back to `queued`, its lease released, not to be submitted
    again for `delay` seconds. None, and nothing written, when the lease was lost."""
    return store.transition_batch(
        conn,
        lease.batch_id,
        B.SUBMITTING,
        B.QUEUED,
        values={
            **_RELEASED,
            "not_before": now + delay if delay else None,
            "last_error": error[:_ERROR_LIMIT],
        },
        data={"reason": error[:500], "retry_in_seconds": round(delay, 1)},
        now=now,
        lease=lease,
    )


def fail_submission(
    store: Store,
    conn: Connection,
    row: Row[Any],
    lease: Lease,
    *,
    code: str,
    error: str,
    now: float,
) -> bool:
    """The remote refused a `submitting` batch for good: it ends `failed` (nothing to collect)
    and its pending requests fail with `code`. False, and nothing written, when the lease was
    lost."""
    failed = store.transition_batch(
        conn,
        lease.batch_id,
        B.SUBMITTING,
        B.FAILED,
        values={**_RELEASED, "last_error": f"{code}: {error}"[:_ERROR_LIMIT], "collected_at": now},
        now=now,
        lease=lease,
    )
    if failed is None:
        return False
    fail_pending_requests(conn, row.job_id, row.id, code)
    return True


def mark_submitted(
    store: Store,
    conn: Connection,
    lease: Lease,
    values: Mapping[str, Any],
    *,
    at: float | None,
    now: float,
) -> Row[Any] | None:
    """A `submitting` batch has its remote batch: record it (`values`: remote id, files, what
    the remote said), release the lease, move to `validating` stamped `at`. None, and nothing
    written, when the lease was lost (another daemon adopted or requeued it meanwhile)."""
    return store.transition_batch(
        conn,
        lease.batch_id,
        B.SUBMITTING,
        B.VALIDATING,
        values={**values, **_RELEASED},
        at=at,
        now=now,
        lease=lease,
    )


# -- observing ------------------------------------------------------------------------------


def record_observed(conn: Connection, batch_id: str, values: Mapping[str, Any]) -> None:
    """Record what a refresh saw of a batch whose status did not change."""
    _update(conn, batch_id, **values)


_BY_ID = update(batches_table).where(batches_table.c.id == bindparam("w_id"))


def record_observed_many(
    conn: Connection, observed: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """`record_observed` for many batches: one `executemany` per set of columns written."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for batch_id, values in observed:
        groups.setdefault(tuple(sorted(values)), []).append({**values, "w_id": batch_id})
    for params in groups.values():
        conn.execute(_BY_ID, params)


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
        "max_output_tokens": row.max_output_tokens,
        "input_file_id": row.input_file_id,
        "not_before": now + delay,
        "token_limit_refusals": refusals,
        "last_error": f"{TOKEN_LIMIT_CODE} x{refusals}",
    }
    insert_queued_batches(
        conn,
        [new],
        now=now,
        prices=prices_of(store),
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
    lease: Lease,
    *,
    output_path: str | None,
    error_path: str | None,
    now: float,
) -> bool:
    """The batch's outcomes are recorded and its files stored: release its lease. False, and
    nothing written, when the lease was lost or the batch was collected already; call it
    first in the transaction that records the outcomes, and record them only when it is True
    (on PostgreSQL the row stays locked by it until that transaction ends)."""
    result = conn.execute(
        update(batches_table)
        .where(*held(lease), batches_table.c.collected_at.is_(None))
        .values(collected_at=now, output_path=output_path, error_path=error_path, **_RELEASED)
    )
    return bool(result.rowcount)


def _update(conn: Connection, batch_id: str, **values: Any) -> None:
    b = batches_table
    conn.execute(update(b).where(b.c.id == batch_id).values(**values))
