"""What a daemon asks of the store besides its duties' work: where the cursors of its config
hooks start, whether the database answers, and its row in the `daemons` table.

The daemons sharing a database: a daemon's id is the owner name in its leases (`host:pid:random`;
its hook dispatcher leases as `<id>/hooks`). It registers when it starts, renews `heartbeat_at`
every few seconds and stamps `stopped_at` on a clean stop. Whether a daemon is alive is judged
from these rows by the duties (`jobqueue.duties.owners`); this module only reads and writes them.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, Row, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from jobqueue.core.states import JobStatus
from jobqueue.store import Store, StoreError
from jobqueue.store.tables import daemons_table, events_table, jobs_table, sink_cursors_table


def start_cursors_at_open_jobs(
    conn: Connection, dialect: str, sinks: Iterable[str], now: float
) -> None:
    """Give each sink that has no cursor yet one that starts with the events of the jobs still
    open (queued or running), or after the newest event when none is open: jobs submitted
    before a hook was configured are reported whole, events of jobs that ended are not
    replayed. A sink that has a cursor keeps it; two daemons doing this at once is harmless."""
    c, e, j = sink_cursors_table, events_table, jobs_table
    names = list(sinks)
    if not names:
        return
    known = set(conn.execute(select(c.c.sink).where(c.c.sink.in_(names))).scalars())
    missing = [name for name in names if name not in known]
    if not missing:
        return
    first_open = conn.execute(
        select(func.min(e.c.seq))
        .join(j, j.c.id == e.c.job_id)
        .where(j.c.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    ).scalar_one_or_none()
    newest = conn.execute(select(func.coalesce(func.max(e.c.seq), 0))).scalar_one()
    start = first_open - 1 if first_open is not None else newest
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    conn.execute(
        insert(c).on_conflict_do_nothing(index_elements=["sink"]),
        [{"sink": n, "last_seq": start, "updated_at": now} for n in missing],
    )


def ping(store: Store) -> None:
    """A trivial query in a read transaction: raises if the database does not answer."""
    with store.read() as conn:
        conn.execute(text("SELECT 1"))


# -- the daemons table ------------------------------------------------------------------------

D = daemons_table


def daemon_of_owner(owner: str) -> str:
    """The daemon id behind a lease owner name: `<id>` itself, or `<id>/<part>`."""
    return owner.split("/", 1)[0]


def hooks_owner(daemon_id: str) -> str:
    """The lease owner name of a daemon's hook dispatcher."""
    return f"{daemon_id}/hooks"


def register_daemon(
    conn: Connection, *, daemon_id: str, host: str, pid: int, version: str, now: float
) -> bool:
    """Add a daemon's row, its heartbeat at `now`. A row of that id already there is left as
    it is (a stopped one stays stopped). True when the row is ours: added now, or there with
    our host and pid; False when another process's row has that id."""
    found = conn.execute(select(D.c.host, D.c.pid).where(D.c.id == daemon_id)).first()
    if found is not None:
        return (found.host, found.pid) == (host[:255], pid)
    conn.execute(
        insert(D).values(
            id=daemon_id,
            host=host[:255],
            pid=pid,
            version=version[:64],
            started_at=now,
            heartbeat_at=now,
            stopped_at=None,
        )
    )
    return True


def renew_heartbeat(conn: Connection, daemon_id: str, now: float) -> bool:
    """Stamp the daemon's heartbeat; False when its row is gone or says it stopped."""
    result = conn.execute(
        update(D).where(D.c.id == daemon_id, D.c.stopped_at.is_(None)).values(heartbeat_at=now)
    )
    return bool(result.rowcount)


def mark_daemon_stopped(conn: Connection, daemon_id: str, now: float) -> bool:
    """The daemon stopped cleanly (or is to stop): it is dead from now on. False when its row
    is gone or was stopped already."""
    result = conn.execute(
        update(D).where(D.c.id == daemon_id, D.c.stopped_at.is_(None)).values(stopped_at=now)
    )
    return bool(result.rowcount)


def daemon_rows(conn: Connection, daemon_ids: Iterable[str] | None = None) -> list[Row]:
    """The rows of the given daemons (those that have one), or of every daemon, by id."""
    stmt = select(D).order_by(D.c.id)
    if daemon_ids is not None:
        ids = sorted(set(daemon_ids))
        if not ids:
            return []
        stmt = stmt.where(D.c.id.in_(ids))
    return list(conn.execute(stmt).all())


def forget_daemons(conn: Connection, before: float) -> int:
    """Delete the rows of daemons stopped, or last heard of, before `before`."""
    last = func.coalesce(D.c.stopped_at, D.c.heartbeat_at)
    return int(conn.execute(delete(D).where(last < before)).rowcount or 0)


def daemons_heard_since(conn: Connection, since: float) -> list[str]:
    """The daemons not stopped whose last heartbeat is at `since` or later, by id."""
    rows = conn.execute(
        select(D.c.id).where(D.c.stopped_at.is_(None), D.c.heartbeat_at >= since).order_by(D.c.id)
    ).scalars()
    return list(rows)


def is_unavailable(exc: BaseException) -> bool:
    """`exc` says the database does not answer (down, unreachable, a connection lost), as
    opposed to a mistake in what was asked of it."""
    if isinstance(
        exc, StoreError | OperationalError | InterfaceError | DisconnectionError | PoolTimeout
    ):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
