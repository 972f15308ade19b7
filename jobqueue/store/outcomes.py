"""The SQL of request outcomes: where a batch's requests are, recording their outcomes, and
reading their result locations back in input order.

Collection and export touch every request of a job, so these go through the driver's own
cursor and plain tuples, not SQLAlchemy rows: outcome rows appended (`INSERT` through
`executemany` on SQLite, `COPY` on PostgreSQL), never updates of the request rows.
`jobqueue.store.results` composes them with the file side (`jobqueue.files.results`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection

from jobqueue.core.states import JOB_TERMINAL
from jobqueue.store import Store
from jobqueue.store.driver import driver_cursor

_CHUNK = 10_000  # rows a PostgreSQL COPY carries


def _param(dialect: str) -> str:
    return "%s" if dialect == "postgresql" else "?"


def batch_positions(
    conn: Connection, dialect: str, job_number: int, batch_number: int
) -> dict[str, int]:
    """custom_id -> position of every request the batch holds.

    On SQLite the planner would rather walk every request of the job (the primary key's
    `job_number = ?`) than the (job, batch) index: a million rows read for each batch of a
    million-request job. So the batch's position range comes first, from that index (covering:
    no row read), and when its requests are most of their range (a first attempt's shard is
    one run of positions) that range of the clustered table is read in order; otherwise (a
    retry batch's scattered requests) the index is used, by name."""
    p = _param(dialect)
    # The driver's own cursor: SQLAlchemy's row objects would cost more than the query.
    cur = driver_cursor(conn)
    try:
        if dialect != "sqlite":
            cur.execute(
                f"SELECT custom_id, position FROM requests "
                f"WHERE job_number = {p} AND batch_number = {p}",
                (job_number, batch_number),
            )
            return dict(cur.fetchall())
        cur.execute(
            "SELECT min(position), max(position), count(*) FROM requests "
            "INDEXED BY ix_requests_job_number_batch_number "
            "WHERE job_number = ? AND batch_number = ?",
            (job_number, batch_number),
        )
        low, high, count = cur.fetchone()
        if not count:
            return {}
        if high - low + 1 <= 2 * count:
            cur.execute(
                "SELECT custom_id, position FROM requests WHERE job_number = ? "
                "AND position BETWEEN ? AND ? AND batch_number = ?",
                (job_number, low, high, batch_number),
            )
        else:
            cur.execute(
                "SELECT custom_id, position FROM requests "
                "INDEXED BY ix_requests_job_number_batch_number "
                "WHERE job_number = ? AND batch_number = ?",
                (job_number, batch_number),
            )
        return dict(cur.fetchall())
    finally:
        cur.close()


# The columns of an outcome row after (job_number, position), in the order `write_outcomes`
# takes them.
OUTCOME_COLUMNS = (
    "outcome", "status_code", "error_code", "result_kind", "result_offset", "result_length",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
)  # fmt: skip
_INSERT_COLUMNS = "job_number, position, result_batch_number, " + ", ".join(OUTCOME_COLUMNS)


def write_outcomes(
    conn: Connection,
    dialect: str,
    job_number: int,
    batch_number: int,
    rows: Iterable[tuple[int, tuple[Any, ...]]],
    *,
    replace: Collection[int] = (),
) -> int:
    """Append (position, (outcome, status_code, error_code, kind, offset, length, input_tokens,
    cached_input_tokens, output_tokens, reasoning_tokens)) to `outcomes` for requests of the
    job whose lines are in batch `batch_number`'s files; return how many were written. Each
    position must come once.

    `replace`: positions of requests that may have an outcome row already (a retry batch's):
    their rows are deleted first, so the new attempt's outcome replaces the old one. A first
    attempt's requests have none, and their rows are only appended.

    On SQLite the rows are inserted in position order (the clustered index appended to in
    order); on PostgreSQL they are copied in (COPY), a chunk at a time from a helper thread
    while the next chunk is produced.
    """
    _delete_outcomes(conn, dialect, job_number, replace)
    if dialect == "postgresql":
        return _copy_postgresql(conn, job_number, batch_number, iter(rows))
    by_position = dict(rows)
    cur = driver_cursor(conn)
    try:
        cur.executemany(
            f"INSERT INTO outcomes ({_INSERT_COLUMNS}) VALUES ({', '.join(['?'] * 13)})",
            [(job_number, pos, batch_number, *by_position[pos]) for pos in sorted(by_position)],
        )
    finally:
        cur.close()
    return len(by_position)


def _delete_outcomes(
    conn: Connection, dialect: str, job_number: int, positions: Collection[int]
) -> None:
    """Delete the outcome rows of the job's requests at `positions`: each by its key (on
    PostgreSQL one `= ANY(array)`), a plan that needs no statistics of the table."""
    if not positions:
        return
    if dialect == "postgresql":
        conn.exec_driver_sql(
            "DELETE FROM outcomes WHERE job_number = %s AND position = ANY(%s)",
            (job_number, list(positions)),
        )
        return
    cur = driver_cursor(conn)
    try:
        cur.executemany(
            "DELETE FROM outcomes WHERE job_number = ? AND position = ?",
            [(job_number, position) for position in sorted(positions)],
        )
    finally:
        cur.close()


def _copy_postgresql(
    conn: Connection,
    job_number: int,
    batch_number: int,
    rows: Iterator[tuple[int, tuple[Any, ...]]],
) -> int:
    """Copy the rows in as they are produced: a chunk at a time, one COPY each, sent from a
    helper thread so the server takes one chunk while this thread scans the next. Returns how
    many rows were written."""
    sql = f"COPY outcomes ({_INSERT_COLUMNS}) FROM STDIN"

    def apply(chunk: list[tuple[Any, ...]]) -> None:
        cur = driver_cursor(conn)
        try:
            with cur.copy(sql) as copy:
                for row in chunk:
                    copy.write_row(row)
        finally:
            cur.close()

    written = 0
    in_flight: list[Future[None]] = []
    # The connection is only ever used by one thread at a time: the helper while a chunk is in
    # flight, the caller's (for the missing requests) once all are done.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobqueue-record") as pool:
        chunk: list[tuple[Any, ...]] = []
        for position, values in rows:
            chunk.append((job_number, position, batch_number, *values))
            if len(chunk) >= _CHUNK:
                written += len(chunk)
                in_flight.append(pool.submit(apply, chunk))
                chunk = []
                if len(in_flight) > 1:  # at most two chunks held: memory stays bounded
                    in_flight.pop(0).result()
        if chunk:
            written += len(chunk)
            in_flight.append(pool.submit(apply, chunk))
        for future in in_flight:
            future.result()
    return written


def record_missing(
    conn: Connection,
    dialect: str,
    job_number: int,
    batch_number: int,
    outcome: str | None,
    error_code: str,
) -> int:
    """Give the requests of batch `batch_number` that no line mentioned `outcome` and
    `error_code` (an outcome row without a line); return how many there were. Called after
    `write_outcomes` in the same transaction: a request of the batch that has no row then is
    one no line mentioned."""
    p = _param(dialect)
    result = conn.exec_driver_sql(
        f"""INSERT INTO outcomes (job_number, position, outcome, error_code)
            SELECT r.job_number, r.position, {p}, {p} FROM requests AS r
            WHERE r.job_number = {p} AND r.batch_number = {p}
              AND NOT EXISTS (SELECT 1 FROM outcomes AS o
                              WHERE o.job_number = r.job_number AND o.position = r.position)""",
        (outcome, error_code, job_number, batch_number),
        execution_options={"preserve_rowcount": True},  # an INSERT's count is not kept else
    )
    return result.rowcount or 0


def _job_extent(conn: Connection, dialect: str, job_number: int) -> tuple[str | None, int]:
    """(the job's status, its last request's position; -1 without requests)."""
    p = _param(dialect)
    cur = driver_cursor(conn)
    try:
        cur.execute(
            f"SELECT (SELECT status FROM jobs WHERE number = {p}), "
            f"(SELECT max(position) FROM requests WHERE job_number = {p})",
            (job_number, job_number),
        )
        status, last = cur.fetchone()
    finally:
        cur.close()
    return status, -1 if last is None else int(last)


# The location tuple from `outcomes` alone: the request's custom_id only where the row has no
# line (the export writes a line for it; a line carries its own), read from `requests` then.
_FROM_OUTCOMES = """SELECT o.position,
        CASE WHEN o.result_kind IS NULL THEN (SELECT r.custom_id FROM requests AS r
            WHERE r.job_number = o.job_number AND r.position = o.position) END,
        o.status_code, o.error_code, o.result_batch_number, o.result_kind, o.result_offset,
        o.result_length
    FROM outcomes AS o
    WHERE o.job_number = {p} AND o.position >= {p} AND o.position < {p}"""
# Every request, with or without an outcome row (the requests of a job still running).
_FROM_REQUESTS = """SELECT r.position, r.custom_id, o.status_code, o.error_code,
        o.result_batch_number, o.result_kind, o.result_offset, o.result_length
    FROM requests AS r LEFT JOIN outcomes AS o
        ON o.job_number = r.job_number AND o.position = r.position
        AND o.position >= {p} AND o.position < {p}
    WHERE r.job_number = {p} AND r.position >= {p} AND r.position < {p}"""
# (The range on `o` too: PostgreSQL does not carry a range across the join's equality, and
# would read every outcome of the job for each page.)


def result_locations_in_order(
    store: Store,
    job_number: int,
    *,
    errors_only: bool = False,
    chunk: int = 20_000,
    final_only: bool = False,
) -> Iterator[list[tuple[Any, ...]]]:
    """The job's requests in input order, `chunk` positions at a time, each page read in its
    own read transaction: lists of location tuples (position, custom_id, status_code,
    error_code, result_batch_number, result_kind, result_offset, result_length), the shape
    `jobqueue.files.results.read_runs` takes. `custom_id` is None where the request's line is
    named (the line holds it). With `errors_only`, only requests that did not succeed; with
    `final_only`, only requests with a final outcome (a job still running).

    Read with the driver's own cursor, only the columns needed: from `outcomes` alone when
    every request has a row (an ended job: it ends only once none is pending), else from
    `requests` joined to it. Pages are ranges of positions, not `LIMIT`s, so that each is one
    range of the primary key whatever the planner knows of the table (PostgreSQL, before the
    freshly written rows are analyzed, would sort the rest of the job for every page)."""
    p = _param(store.dialect)
    with store.read() as conn:
        status, last_position = _job_extent(conn, store.dialect, job_number)
    whole = final_only or status in {s.value for s in JOB_TERMINAL}
    query = (
        (_FROM_OUTCOMES if whole else _FROM_REQUESTS).format(p=p)
        + (" AND (o.outcome IS NULL OR o.outcome <> 'succeeded')" if errors_only else "")
        + (" AND o.outcome IS NOT NULL" if final_only else "")
        + f" ORDER BY {'o' if whole else 'r'}.position"
    )
    for start in range(0, last_position + 1, chunk):
        with store.read() as conn:
            cur = driver_cursor(conn)
            try:
                end = start + chunk
                cur.execute(
                    query,
                    (job_number, start, end) if whole else (start, end, job_number, start, end),
                )
                rows = cur.fetchall()
            finally:
                cur.close()
        if rows:
            yield rows
