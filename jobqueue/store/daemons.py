"""What a daemon asks of the store besides its duties' work: where the cursors of its config
hooks start, and whether the database answers."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from jobqueue.store import Store
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
        .where(j.c.status.in_(["queued", "running"]))
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
