"""The SQL of request outcomes: where a batch's requests are, recording their outcomes, and
reading their result locations back in input order.

Collection and export touch every request of a job, so these go through the driver's own
cursor and plain tuples, not SQLAlchemy rows: updates by primary key, through `executemany` on
SQLite and JSON rows parsed by the server on PostgreSQL. `jobqueue.store.results` composes them
with the file side (`jobqueue.files.results`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import orjson
from sqlalchemy import Connection

from jobqueue.store import Store

_CHUNK = 10_000  # updates a PostgreSQL statement carries


def _param(dialect: str) -> str:
    return "%s" if dialect == "postgresql" else "?"


def _driver_cursor(conn: Connection) -> Any:
    """A cursor of the driver's own connection under `conn` (sqlite3 or psycopg)."""
    driver = conn.connection.driver_connection
    assert driver is not None  # a connection in use always has one
    return driver.cursor()


def batch_positions(
    conn: Connection, dialect: str, job_number: int, batch_number: int
) -> dict[str, int]:
    """custom_id -> position of every request the batch holds (from the (job, batch) index)."""
    p = _param(dialect)
    # The driver's own cursor: SQLAlchemy's row objects would cost more than the query.
    cur = _driver_cursor(conn)
    try:
        cur.execute(
            f"SELECT custom_id, position FROM requests "
            f"WHERE job_number = {p} AND batch_number = {p}",
            (job_number, batch_number),
        )
        return dict(cur.fetchall())
    finally:
        cur.close()


def write_outcomes(
    conn: Connection,
    dialect: str,
    job_number: int,
    batch_number: int,
    updates: Iterable[tuple[int, tuple[Any, ...]]],
) -> int:
    """Record (position, (outcome, status_code, error_code, kind, offset, length)) for requests
    of the job whose lines are in the batch's files; return how many were updated.

    On SQLite they are applied in position order (each page of the clustered index touched
    once, in order); on PostgreSQL a chunk at a time while the next is being produced. Each
    position must come once.
    """
    if dialect == "postgresql":
        return _update_postgresql(conn, job_number, batch_number, iter(updates))
    by_position = dict(updates)
    cur = _driver_cursor(conn)
    try:
        cur.executemany(
            """UPDATE requests SET outcome = ?, status_code = ?, error_code = ?,
                   result_kind = ?, result_offset = ?, result_length = ?,
                   result_batch_number = ?
               WHERE job_number = ? AND position = ?""",
            [(*by_position[pos], batch_number, job_number, pos) for pos in sorted(by_position)],
        )
    finally:
        cur.close()
    return len(by_position)


def _update_postgresql(
    conn: Connection,
    job_number: int,
    batch_number: int,
    updates: Iterator[tuple[int, tuple[Any, ...]]],
) -> int:
    """Apply the updates as they are produced: a chunk at a time, as one UPDATE … FROM
    json_to_recordset (the server parses the rows; one round trip a chunk), sent from a helper
    thread so the server applies one chunk while this thread scans the next. Returns how many
    requests were updated."""
    sql = """UPDATE requests AS r SET outcome = u.o, status_code = u.s, error_code = u.e,
                 result_kind = u.k, result_offset = u.off, result_length = u.len,
                 result_batch_number = %s
             FROM json_to_recordset(%s::json)
                 AS u(p bigint, o text, s integer, e text, k text, off bigint, len integer)
             WHERE r.job_number = %s AND r.position = u.p"""
    keys = ("o", "s", "e", "k", "off", "len")

    def apply(chunk: list[dict[str, Any]]) -> None:
        conn.exec_driver_sql(sql, (batch_number, orjson.dumps(chunk).decode(), job_number))

    recorded = 0
    in_flight: list[Future[None]] = []
    # The connection is only ever used by one thread at a time: the helper while a chunk is in
    # flight, the caller's (for the query of missing requests) once all are done.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobqueue-record") as pool:
        chunk: list[dict[str, Any]] = []
        for position, values in updates:
            chunk.append({"p": position, **dict(zip(keys, values, strict=True))})
            if len(chunk) >= _CHUNK:
                recorded += len(chunk)
                in_flight.append(pool.submit(apply, chunk))
                chunk = []
                if len(in_flight) > 1:  # at most two chunks held: memory stays bounded
                    in_flight.pop(0).result()
        if chunk:
            recorded += len(chunk)
            in_flight.append(pool.submit(apply, chunk))
        for future in in_flight:
            future.result()
    return recorded


def record_missing(
    conn: Connection,
    dialect: str,
    job_number: int,
    batch_number: int,
    outcome: str | None,
    error_code: str,
) -> int:
    """Give the batch's requests that no line mentioned `outcome` and `error_code`; return how
    many there were. Every request a line was recorded for has result_batch_number = this
    batch; no other can (a batch is collected once, in one transaction)."""
    p = _param(dialect)
    result = conn.exec_driver_sql(
        f"""UPDATE requests SET outcome = {p}, error_code = {p}, status_code = NULL,
               result_batch_number = NULL, result_kind = NULL, result_offset = NULL,
               result_length = NULL
            WHERE job_number = {p} AND batch_number = {p}
              AND (result_batch_number IS NULL OR result_batch_number <> {p})""",
        (outcome, error_code, job_number, batch_number, batch_number),
    )
    return result.rowcount or 0


def result_locations_in_order(
    store: Store,
    job_number: int,
    *,
    errors_only: bool = False,
    chunk: int = 20_000,
    final_only: bool = False,
) -> Iterator[list[tuple[Any, ...]]]:
    """The job's requests in input order, a page of `chunk` at a time, each page read in its
    own read transaction: lists of location tuples (position, custom_id, status_code,
    error_code, result_batch_number, result_kind, result_offset, result_length), the shape
    `jobqueue.files.results.read_runs` takes. With `errors_only`, only requests that did not
    succeed; with `final_only`, only requests with a final outcome (a job still running).
    Read with the driver's own cursor, only the columns needed."""
    p = _param(store.dialect)
    query = (
        "SELECT position, custom_id, status_code, error_code, result_batch_number, "
        "result_kind, result_offset, result_length FROM requests "
        f"WHERE job_number = {p} AND position > {p}"
        + (" AND (outcome IS NULL OR outcome <> 'succeeded')" if errors_only else "")
        + (" AND outcome IS NOT NULL" if final_only else "")
        + f" ORDER BY position LIMIT {p}"
    )
    last = -1
    while True:
        with store.read() as conn:
            cur = _driver_cursor(conn)
            try:
                cur.execute(query, (job_number, last, chunk))
                rows = cur.fetchall()
            finally:
                cur.close()
        if not rows:
            return
        yield rows
        last = rows[-1][0]
