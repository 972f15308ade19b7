"""The daemons sharing a database: registration, heartbeats and stops.

A daemon's id is the owner name in its leases (`host:pid:random`; its hook dispatcher leases as
`<id>/hooks`). It registers when it starts, renews `heartbeat_at` every few seconds and stamps
`stopped_at` on a clean stop. Whether a daemon is alive is judged from these rows by the duties
(`jobqueue.duties.owners`); this module only reads and writes them.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, Row, delete, func, insert, select, update

from jobqueue.store.tables import daemons_table

__all__ = [
    "daemon_of_owner",
    "daemon_rows",
    "forget_daemons",
    "hooks_owner",
    "mark_daemon_stopped",
    "register_daemon",
    "renew_heartbeat",
]

D = daemons_table


def daemon_of_owner(owner: str) -> str:
    """The daemon id behind a lease owner name: `<id>` itself, or `<id>/<part>`."""
    return owner.split("/", 1)[0]


def hooks_owner(daemon_id: str) -> str:
    """The lease owner name of a daemon's hook dispatcher."""
    return f"{daemon_id}/hooks"


def register_daemon(
    conn: Connection, *, daemon_id: str, host: str, pid: int, version: str, now: float
) -> None:
    """Add a daemon's row, its heartbeat at `now`. A row of that id already there is left as
    it is (a stopped one stays stopped)."""
    exists = conn.execute(select(D.c.id).where(D.c.id == daemon_id)).first()
    if exists is not None:
        return
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
