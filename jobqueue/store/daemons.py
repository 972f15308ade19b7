"""What a daemon asks of the store besides its duties' work: where the cursors of its config
hooks start, whether the database answers, and the heartbeats that tell others it runs."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from jobqueue.core.states import JobStatus
from jobqueue.store import Store, StoreError
from jobqueue.store.tables import events_table, jobs_table, sink_cursors_table


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


# -- heartbeats -------------------------------------------------------------------------------
# Until the table of daemons lands (branch `fencing`), a running daemon's heartbeat is a row of
# `sink_cursors` under a reserved name: no sink is ever called that (sink names are a hook's
# `name` or `command:…`/`webhook:…`), and the dispatcher only reads the cursors of its own sinks.
# `JobQueue.daemons_alive` is the one reader, so the storage can change without its callers.

HEARTBEAT_PREFIX = "~daemon "


def heartbeat(conn: Connection, dialect: str, owner: str, now: float) -> None:
    """Record that daemon `owner` is alive at `now`."""
    c = sink_cursors_table
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(c).values(sink=HEARTBEAT_PREFIX + owner, last_seq=0, updated_at=now)
    conn.execute(stmt.on_conflict_do_update(index_elements=["sink"], set_={"updated_at": now}))


def forget_daemon(conn: Connection, owner: str, *, before: float | None = None) -> None:
    """Remove daemon `owner`'s heartbeat (it stopped), and any older than `before`."""
    c = sink_cursors_table
    conn.execute(delete(c).where(c.c.sink == HEARTBEAT_PREFIX + owner))
    if before is not None:
        conn.execute(
            delete(c).where(c.c.sink.startswith(HEARTBEAT_PREFIX), c.c.updated_at < before)
        )


def daemons_seen(conn: Connection, since: float) -> list[str]:
    """The daemons whose last heartbeat is at `since` or later."""
    c = sink_cursors_table
    rows = conn.execute(
        select(c.c.sink).where(c.c.sink.startswith(HEARTBEAT_PREFIX), c.c.updated_at >= since)
    ).scalars()
    return [name[len(HEARTBEAT_PREFIX) :] for name in rows]


def is_unavailable(exc: BaseException) -> bool:
    """`exc` says the database does not answer (down, unreachable, a connection lost), as
    opposed to a mistake in what was asked of it."""
    if isinstance(
        exc, StoreError | OperationalError | InterfaceError | DisconnectionError | PoolTimeout
    ):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
