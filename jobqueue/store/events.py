"""Writing events into the outbox, in the caller's transaction (the one that made the change)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, insert

from jobqueue.core.ids import new_id
from jobqueue.store.coordination import duties_of_event, wake
from jobqueue.store.tables import events_table


def add_event(
    conn: Connection,
    type_: str,
    *,
    job_id: str | None,
    batch_id: str | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    data: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Write one event; return its id. On PostgreSQL every daemon is woken for it (and for the
    duty it gives work to, e.g. `submit` for `batch.queued`) when the transaction commits."""
    event_id = new_id("evt")
    conn.execute(
        insert(events_table).values(
            id=event_id,
            type=type_,
            created_at=now if now is not None else time.time(),
            job_id=job_id,
            batch_id=batch_id,
            from_status=from_status,
            to_status=to_status,
            data=dict(data or {}),
        )
    )
    wake(conn, *duties_of_event(type_))
    return event_id


def request_counts(total: int, completed: int, failed: int) -> dict[str, int]:
    """The `request_counts` object of an event's data."""
    return {"total": total, "completed": completed, "failed": failed}
