"""The SQL of hook deliveries: fan-out, claims with leases, attempt records, and queries.

The dispatcher (`jobqueue.hooks.dispatcher`) decides *what* to do; this module says it in SQL.
Every function takes an open connection from `Store.write()` or `Store.read()`, so the caller
chooses the transaction. Deliveries are `pending`, `delivered` or `dead`:

- fan-out inserts `pending` rows with `INSERT … ON CONFLICT DO NOTHING` on (event_seq, sink), so
  doing it twice (two daemons, or a retry) is harmless, and advances the sink's cursor;
- a claim sets `lease_owner`/`lease_until` on due pending rows that head their job's queue;
- recording an attempt is a compare-and-set on the lease: a dispatcher that lost its lease (it
  was too slow, another one took over) cannot overwrite what the new owner does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from jobqueue.core.records import Delivery
from jobqueue.store.tables import (
    deliveries_table,
    delivery_attempts_table,
    events_table,
    sink_cursors_table,
)

__all__ = [
    "DEAD",
    "DELIVERED",
    "PENDING",
    "Claimed",
    "Delivery",
    "advance_cursor",
    "backlog",
    "claim",
    "cursors",
    "dead_count",
    "dead_deliveries",
    "deliveries_by_seq",
    "deliveries_for",
    "due_sinks",
    "ensure_cursors",
    "event_window",
    "events_in_ranges",
    "find_event",
    "insert_deliveries",
    "max_event_seq",
    "next_due",
    "pending_count",
    "purge_attempts",
    "record_attempt",
    "redeliver",
    "release",
]

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
ERROR_LIMIT = 1000  # characters of an error kept on a delivery and an attempt

d = deliveries_table
e = events_table
a = delivery_attempts_table
c = sink_cursors_table


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= ERROR_LIMIT:
        return text
    return text[: ERROR_LIMIT - 1] + "…"


def _upsert(dialect: str) -> Any:
    return pg_insert if dialect == "postgresql" else sqlite_insert


# -- cursors and fan-out ------------------------------------------------------------------------


def max_event_seq(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(e.c.seq), 0))).scalar_one())


def cursors(conn: Connection, sinks: Iterable[str]) -> dict[str, int]:
    names = list(sinks)
    if not names:
        return {}
    rows = conn.execute(select(c.c.sink, c.c.last_seq).where(c.c.sink.in_(names))).all()
    return {name: int(seq) for name, seq in rows}


def ensure_cursors(
    conn: Connection, dialect: str, sinks: Mapping[str, bool], now: float
) -> dict[str, int]:
    """Create the cursor of each sink seen for the first time; return every sink's cursor.

    `sinks` maps a name to `replay`: a new sink starts after the newest event (only new events
    reach it) unless it replays, then it starts at 0 (every stored event reaches it).
    """
    found = cursors(conn, sinks)
    missing = [name for name in sinks if name not in found]
    if missing:
        newest = max_event_seq(conn)
        stmt = _upsert(dialect)(c).on_conflict_do_nothing(index_elements=["sink"])
        conn.execute(
            stmt,
            [
                {"sink": name, "last_seq": 0 if sinks[name] else newest, "updated_at": now}
                for name in missing
            ],
        )
        found = cursors(conn, sinks)
    return found


def event_window(conn: Connection, after_seq: int, limit: int) -> list[Row]:
    """The next events after `after_seq`, oldest first: what fan-out needs of them."""
    return list(
        conn.execute(
            select(e.c.seq, e.c.id, e.c.type, e.c.job_id)
            .where(e.c.seq > after_seq)
            .order_by(e.c.seq)
            .limit(limit)
        ).all()
    )


def events_in_ranges(conn: Connection, ranges: Iterable[tuple[int, int]]) -> list[Row]:
    """Events whose seq lies in one of the inclusive ranges (gaps that filled in late)."""
    conditions = [e.c.seq.between(lo, hi) for lo, hi in ranges]
    if not conditions:
        return []
    return list(
        conn.execute(
            select(e.c.seq, e.c.id, e.c.type, e.c.job_id).where(or_(*conditions)).order_by(e.c.seq)
        ).all()
    )


def insert_deliveries(
    conn: Connection, dialect: str, rows: Sequence[Mapping[str, Any]], now: float
) -> None:
    """Pending deliveries for `rows` of (event_seq, event_id, job_id, sink); duplicates ignored."""
    if not rows:
        return
    values = [
        {
            "event_seq": row["event_seq"],
            "event_id": row["event_id"],
            "job_id": row["job_id"],
            "sink": row["sink"],
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for row in rows
    ]
    stmt = _upsert(dialect)(d).on_conflict_do_nothing(index_elements=["event_seq", "sink"])
    conn.execute(stmt, values)


def advance_cursor(conn: Connection, sink: str, last_seq: int, now: float) -> None:
    """Move a sink's cursor forward (never back: two dispatchers may race to the same place)."""
    conn.execute(
        update(c)
        .where(c.c.sink == sink, c.c.last_seq < last_seq)
        .values(last_seq=last_seq, updated_at=now)
    )


# -- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A delivery this dispatcher holds a lease on, with its event row."""

    id: int
    sink: str
    attempts: int
    lease_until: float
    event: Row


def _head_of_job() -> Any:
    """True for a pending delivery with no earlier pending delivery of its job and sink."""
    earlier = d.alias("earlier")
    return ~exists(
        select(earlier.c.id).where(
            earlier.c.sink == d.c.sink,
            earlier.c.job_id == d.c.job_id,
            earlier.c.status == PENDING,
            earlier.c.event_seq < d.c.event_seq,
        )
    )


def _unleased(now: float, free_owners: Iterable[str] = ()) -> Any:
    """No lease on the delivery: none, run out, or held by an owner known dead."""
    free = sorted(set(free_owners))
    conditions = [d.c.lease_until.is_(None), d.c.lease_until <= now]
    if free:
        conditions.append(d.c.lease_owner.in_(free))
    return or_(*conditions)


def _claimable(now: float, free_owners: Iterable[str] = ()) -> Any:
    return and_(d.c.status == PENDING, d.c.next_attempt_at <= now, _unleased(now, free_owners))


def due_sinks(
    conn: Connection, sinks: Iterable[str], now: float, free_owners: Iterable[str] = ()
) -> set[str]:
    """Which of `sinks` have a due, unleased pending delivery (a cheap read before claiming).
    A lease of one of `free_owners` (owners known dead) counts as none."""
    names = list(sinks)
    if not names:
        return set()
    rows = conn.execute(
        select(d.c.sink).where(d.c.sink.in_(names), _claimable(now, free_owners)).group_by(d.c.sink)
    ).all()
    return {row[0] for row in rows}


def next_due(
    conn: Connection, sinks: Iterable[str], free_owners: Iterable[str] = ()
) -> float | None:
    """The earliest time a pending delivery of `sinks` becomes due (or its lease runs out; a
    lease of one of `free_owners` counts as none)."""
    names = list(sinks)
    if not names:
        return None
    # The later of the two: SQLite's two-argument max() is PostgreSQL's greatest().
    later = func.greatest if conn.dialect.name == "postgresql" else func.max
    free = sorted(set(free_owners))
    lease_end: Any = func.coalesce(d.c.lease_until, 0.0)
    if free:
        lease_end = case((d.c.lease_owner.in_(free), 0.0), else_=lease_end)
    due = later(d.c.next_attempt_at, lease_end)
    value = conn.execute(
        select(func.min(due)).where(d.c.sink.in_(names), d.c.status == PENDING)
    ).scalar()
    return float(value) if value is not None else None


def claim(
    conn: Connection,
    dialect: str,
    sink: str,
    owner: str,
    now: float,
    lease_until: float,
    limit: int,
    free_owners: Iterable[str] = (),
) -> list[Claimed]:
    """Lease up to `limit` due deliveries of `sink`, oldest event first, one per job at most.

    Only the head of each job's queue is claimable, so a job's events reach a sink in order and
    a failing one holds back the later ones of its job only. A delivery leased by one of
    `free_owners` (owners known dead: a killed daemon's lane) is taken over at once. PostgreSQL
    skips rows another daemon is claiming (`FOR UPDATE SKIP LOCKED`); on SQLite the write
    transaction serialises.
    """
    stmt = (
        select(d.c.id)
        .where(d.c.sink == sink, _claimable(now, free_owners), _head_of_job())
        .order_by(d.c.event_seq)
        .limit(limit)
    )
    if dialect == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True, of=d)
    ids = [row[0] for row in conn.execute(stmt).all()]
    if not ids:
        return []
    conn.execute(
        update(d)
        .where(d.c.id.in_(ids))
        .values(lease_owner=owner, lease_until=lease_until, updated_at=now)
    )
    rows = conn.execute(
        select(d.c.id.label("delivery_id"), d.c.attempts, *e.c)
        .join(e, e.c.seq == d.c.event_seq)
        .where(d.c.id.in_(ids))
        .order_by(d.c.event_seq)
    ).all()
    return [Claimed(row.delivery_id, sink, row.attempts, lease_until, row) for row in rows]


def release(conn: Connection, delivery_id: int, owner: str, lease_until: float) -> bool:
    """Give a claimed delivery back unattempted (the dispatcher is stopping)."""
    result = conn.execute(
        update(d)
        .where(d.c.id == delivery_id, d.c.lease_owner == owner, d.c.lease_until == lease_until)
        .values(lease_owner=None, lease_until=None)
    )
    return result.rowcount == 1


def record_attempt(
    conn: Connection,
    claimed: Claimed,
    owner: str,
    *,
    started_at: float,
    finished_at: float,
    ok: bool,
    error: str | None,
    status_code: int | None,
    status: str,
    next_attempt_at: float,
) -> bool:
    """Record one attempt and the delivery's new state; False if the lease was lost meanwhile.

    The attempt row is written either way (it happened); the delivery changes only while this
    owner still holds the lease it claimed with.
    """
    attempt = claimed.attempts + 1
    conn.execute(
        insert(a).values(
            delivery_id=claimed.id,
            attempt=attempt,
            owner=owner,
            started_at=started_at,
            finished_at=finished_at,
            ok=ok,
            error=_clip(error),
            status_code=status_code,
        )
    )
    result = conn.execute(
        update(d)
        .where(
            d.c.id == claimed.id,
            d.c.status == PENDING,
            d.c.lease_owner == owner,
            d.c.lease_until == claimed.lease_until,
        )
        .values(
            status=status,
            attempts=attempt,
            next_attempt_at=next_attempt_at,
            last_error=_clip(error),
            lease_owner=None,
            lease_until=None,
            updated_at=finished_at,
            delivered_at=finished_at if status == DELIVERED else None,
        )
    )
    return result.rowcount == 1


def redeliver(conn: Connection, event_id: str, sink: str | None, now: float) -> int:
    """Put an event's dead or delivered deliveries back to pending, attempts reset."""
    stmt = update(d).where(d.c.event_id == event_id, d.c.status.in_((DEAD, DELIVERED)))
    if sink is not None:
        stmt = stmt.where(d.c.sink == sink)
    result = conn.execute(
        stmt.values(
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            lease_owner=None,
            lease_until=None,
            delivered_at=None,
            updated_at=now,
        )
    )
    return int(result.rowcount)


def purge_attempts(conn: Connection, before: float) -> int:
    """Delete attempt records finished before `before` (for a retention duty)."""
    return int(conn.execute(delete(a).where(a.c.finished_at < before)).rowcount)


# -- queries --------------------------------------------------------------------------------


def _deliveries() -> Any:
    return select(*d.c, e.c.type.label("event_type")).join(e, e.c.seq == d.c.event_seq)


def deliveries_for(
    conn: Connection,
    job_id: str | None = None,
    *,
    status: str | None = None,
    sink: str | None = None,
    limit: int | None = None,
) -> list[Delivery]:
    stmt = _deliveries().order_by(d.c.event_seq, d.c.sink)
    if job_id is not None:
        stmt = stmt.where(d.c.job_id == job_id)
    if status is not None:
        stmt = stmt.where(d.c.status == status)
    if sink is not None:
        stmt = stmt.where(d.c.sink == sink)
    if limit:
        stmt = stmt.limit(limit)
    return [Delivery.from_row(row) for row in conn.execute(stmt).all()]


def dead_deliveries(
    conn: Connection, job_id: str | None = None, *, limit: int | None = None
) -> list[Delivery]:
    return deliveries_for(conn, job_id, status=DEAD, limit=limit)


def deliveries_by_seq(conn: Connection, seqs: Iterable[int]) -> dict[int, list[Delivery]]:
    """The deliveries of the given events, by event seq (for the `events` table)."""
    wanted = sorted(set(seqs))
    out: dict[int, list[Delivery]] = {}
    for start in range(0, len(wanted), 500):  # keep the IN lists small
        chunk = wanted[start : start + 500]
        stmt = _deliveries().where(d.c.event_seq.in_(chunk)).order_by(d.c.event_seq, d.c.sink)
        for row in conn.execute(stmt).all():
            out.setdefault(row.event_seq, []).append(Delivery.from_row(row))
    return out


def find_event(conn: Connection, event_id: str) -> Row | None:
    return conn.execute(select(e).where(e.c.id == event_id)).first()


def _count(conn: Connection, status: str, sinks: Iterable[str] | None) -> int:
    stmt = select(func.count()).select_from(d).where(d.c.status == status)
    if sinks is not None:
        stmt = stmt.where(d.c.sink.in_(list(sinks)))
    return int(conn.execute(stmt).scalar_one())


def pending_count(conn: Connection, sinks: Iterable[str] | None = None) -> int:
    return _count(conn, PENDING, sinks)


def dead_count(conn: Connection, sinks: Iterable[str] | None = None) -> int:
    return _count(conn, DEAD, sinks)


def backlog(conn: Connection, sinks: Iterable[str]) -> int:
    """Events not yet fanned out to some sink: past the lowest cursor of `sinks`."""
    found = cursors(conn, sinks)
    if not found:
        return 0
    low = min(found.values())
    return int(conn.execute(select(func.count()).select_from(e).where(e.c.seq > low)).scalar_one())
