"""Writing events into the outbox, in the caller's transaction (the one that made the change)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection

from jobqueue.core.ids import new_id
from jobqueue.store.coordination import NOTIFY_SQL, duties_of_event, notified, wake
from jobqueue.store.driver import driver_of

# The hot path of every transition: written as driver SQL (the statement's text built once per
# dialect), the data serialized here, so that an event costs its INSERT and little around it.
_COLUMNS = "id, type, created_at, job_id, batch_id, from_status, to_status, data"
_INSERT_SQL = {
    "sqlite": f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "postgresql": f"INSERT INTO events ({_COLUMNS}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, CAST(%s AS json))",
}
# One event on PostgreSQL, with the notification of the duties it gives work to.
_INSERT_NOTIFYING_PG = (
    f"INSERT INTO events ({_COLUMNS}) SELECT %s, %s, %s, %s, %s, %s, %s, CAST(%s AS json) "
    f"FROM (SELECT {NOTIFY_SQL}) AS woken"
)
# Many events on PostgreSQL: one INSERT … SELECT over one JSON array (an array an event),
# parsed by the server, the events in the order of the array.
_INSERT_MANY_PG = (
    f"INSERT INTO events ({_COLUMNS}) SELECT e.x ->> 0, e.x ->> 1, CAST(e.x ->> 2 AS float8), "
    "e.x ->> 3, e.x ->> 4, e.x ->> 5, e.x ->> 6, e.x -> 7 "
    "FROM json_array_elements(CAST(%s AS json)) WITH ORDINALITY AS e(x, n) ORDER BY e.n"
)


def _dumps(data: Any) -> str:
    """JSON text, as the JSON column's own serializer would write it (an event's data)."""
    if not data:
        return "{}"
    try:
        return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # what orjson does not know, json may (it raises the same otherwise)
        return json.dumps(data if isinstance(data, list | dict) else dict(data))


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
    params: tuple[Any, ...] = (
        event_id,
        type_,
        now if now is not None else time.time(),
        job_id,
        batch_id,
        from_status,
        to_status,
        _dumps(data),
    )
    # On the driver's own cursor: through `exec_driver_sql` the INSERT costs about twice. On
    # PostgreSQL the INSERT notifies its duties itself, sparing a round trip at the commit.
    duties = duties_of_event(type_)
    if conn.dialect.name == "postgresql":
        driver_of(conn).execute(_INSERT_NOTIFYING_PG, (*params, notified(conn, duties)))
    else:
        driver_of(conn).execute(_INSERT_SQL["sqlite"], params)
    wake(conn, *duties)
    return event_id


def add_events(conn: Connection, events: Sequence[Mapping[str, Any]]) -> list[str]:
    """Write many events with one statement (`executemany`), in order: each mapping holds
    `type`, `job_id`, and optionally `batch_id`, `from_status`, `to_status`, `data` and
    `created_at` (now by default). Their ids, in the same order."""
    if not events:
        return []
    now = time.time()
    rows = []
    duties: set[str] = set()
    for given in events:
        type_ = given["type"]
        rows.append(
            (
                new_id("evt"),
                type_,
                now if given.get("created_at") is None else float(given["created_at"]),
                given.get("job_id"),
                given.get("batch_id"),
                given.get("from_status"),
                given.get("to_status"),
                _dumps(given.get("data")),
            )
        )
        duties.update(duties_of_event(type_))
    if conn.dialect.name == "postgresql" and len(rows) > 1:
        text = _dumps([[*row[:7], orjson.Fragment(row[7])] for row in rows])
        conn.exec_driver_sql(_INSERT_MANY_PG, (text,))
    else:
        conn.exec_driver_sql(_INSERT_SQL[conn.dialect.name], rows)
    wake(conn, *duties)
    return [row[0] for row in rows]


def request_counts(total: int, completed: int, failed: int) -> dict[str, int]:
    """The `request_counts` object of an event's data."""
    return {"total": total, "completed": completed, "failed": failed}
