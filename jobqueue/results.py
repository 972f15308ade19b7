"""Result files: per-request outcomes from streamed output and error files, and the ordered merge.

Collection never holds a file in memory: lines are scanned one at a time and their outcomes go to
the database in chunks through a temporary table, joined onto the request index in one UPDATE.
The index then records, for each request, where its line is (batch, file, offset, length), so the
export in input order reads each line straight from disk.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Connection, Row, and_, select

from jobqueue.models import requests_table
from jobqueue.store import Store

# Outcomes worth another attempt: the request never ran, or the remote failed it transiently.
RETRYABLE_CODES = frozenset({"batch_expired", "batch_cancelled", "missing_result"})
NEVER_RAN_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "missing_result": "The remote reported no result for this request.",
}
_CHUNK = 10_000


def is_retryable(status_code: int | None, error_code: str | None) -> bool:
    if error_code in RETRYABLE_CODES:
        return True
    return status_code is not None and (status_code >= 500 or status_code in (408, 429))


@dataclass(slots=True)
class LineOutcome:
    custom_id: str
    kind: str  # "output" or "error": which file holds the line
    offset: int
    length: int
    succeeded: bool
    status_code: int | None
    error_code: str | None

    @property
    def retryable(self) -> bool:
        return not self.succeeded and is_retryable(self.status_code, self.error_code)


def classify(line: dict[str, Any]) -> tuple[bool, int | None, str | None]:
    """(succeeded, status_code, error_code) of one output or error line."""
    response = line.get("response") or None
    error = line.get("error") or None
    status_code = response.get("status_code") if isinstance(response, dict) else None
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        return False, status_code, code or "error"
    if status_code is not None and 200 <= status_code < 300:
        return True, status_code, None
    code = None
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code") or body["error"].get("type")
    if code is None:
        code = f"http_{status_code}" if status_code is not None else "no_response"
    return False, status_code, code


def scan_result_file(path: Path, kind: str) -> Iterator[LineOutcome]:
    """Every line's outcome and place in the file, streaming."""
    offset = 0
    with path.open("rb", buffering=1 << 20) as f:
        for raw in f:
            length = len(raw)
            stripped = raw.strip()
            if stripped:
                try:
                    line = orjson.loads(stripped)
                except orjson.JSONDecodeError:
                    line = None
                if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                    succeeded, status_code, error_code = classify(line)
                    yield LineOutcome(
                        line["custom_id"], kind, offset, length, succeeded, status_code, error_code
                    )
            offset += length


def record_outcomes(
    store: Store,
    conn: Connection,
    *,
    job_id: str,
    batch_id: str,
    files: list[tuple[str, Path]],
    can_retry: bool,
    missing_code: str,
) -> dict[str, int]:
    """Record the outcome of every request of a collected batch; return final counts.

    A retryable failure leaves the request pending (outcome NULL) when `can_retry`, for the retry
    duty to resubmit, but its line is recorded so results can show it if no retry ever runs.
    Requests the files do not mention get `missing_code`.
    """
    dialect = store.dialect
    if dialect == "postgresql":
        conn.exec_driver_sql(
            "CREATE TEMP TABLE collect_buf (custom_id TEXT PRIMARY KEY, outcome TEXT, "
            "status_code INTEGER, error_code TEXT, kind TEXT, off BIGINT, len INTEGER) "
            "ON COMMIT DROP"
        )
    else:
        conn.exec_driver_sql("DROP TABLE IF EXISTS temp.collect_buf")
        conn.exec_driver_sql(
            "CREATE TEMP TABLE collect_buf (custom_id TEXT PRIMARY KEY, outcome TEXT, "
            "status_code INTEGER, error_code TEXT, kind TEXT, off INTEGER, len INTEGER)"
        )
    raw = conn.connection.driver_connection
    cur = raw.cursor()
    if dialect == "postgresql":
        insert = (
            "INSERT INTO collect_buf VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (custom_id) DO NOTHING"
        )
    else:
        insert = "INSERT OR IGNORE INTO collect_buf VALUES (?, ?, ?, ?, ?, ?, ?)"
    try:
        buffer: list[tuple[Any, ...]] = []
        # Output lines first: if a request appears in both files, its success wins.
        for kind, path in files:
            for o in scan_result_file(path, kind):
                if o.succeeded:
                    outcome = "succeeded"
                elif o.retryable and can_retry:
                    outcome = None
                else:
                    outcome = "failed"
                buffer.append(
                    (o.custom_id, outcome, o.status_code, o.error_code, o.kind, o.offset, o.length)
                )
                if len(buffer) >= _CHUNK:
                    cur.executemany(insert, buffer)
                    buffer.clear()
        if buffer:
            cur.executemany(insert, buffer)
    finally:
        cur.close()
    p = "%s" if dialect == "postgresql" else "?"
    conn.exec_driver_sql(
        f"""UPDATE requests SET outcome = b.outcome, status_code = b.status_code,
               error_code = b.error_code, result_batch_id = {p}, result_kind = b.kind,
               result_offset = b.off, result_length = b.len
            FROM collect_buf AS b
            WHERE requests.job_id = {p} AND requests.batch_id = {p}
              AND requests.custom_id = b.custom_id""",
        (batch_id, job_id, batch_id),
    )
    missing_final = None if (can_retry and missing_code in RETRYABLE_CODES) else "failed"
    conn.exec_driver_sql(
        f"""UPDATE requests SET outcome = {p}, error_code = {p}, status_code = NULL,
               result_batch_id = NULL, result_kind = NULL, result_offset = NULL,
               result_length = NULL
            WHERE job_id = {p} AND batch_id = {p}
              AND NOT EXISTS (SELECT 1 FROM collect_buf AS b
                              WHERE b.custom_id = requests.custom_id)""",
        (missing_final, missing_code, job_id, batch_id),
    )
    if dialect != "postgresql":
        conn.exec_driver_sql("DROP TABLE temp.collect_buf")
    counts = {"succeeded": 0, "failed": 0, "pending": 0}
    for outcome, n in conn.exec_driver_sql(
        f"SELECT outcome, count(*) FROM requests WHERE job_id = {p} AND batch_id = {p} "
        "GROUP BY outcome",
        (job_id, batch_id),
    ):
        counts[outcome or "pending"] = n
    return counts


# -- the ordered merge ------------------------------------------------------------------------


class _FileCache:
    """A few open result files, least recently used closed first."""

    def __init__(self, size: int = 64) -> None:
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()
        self._size = size

    def read(self, path: str, offset: int, length: int) -> bytes:
        f = self._files.get(path)
        if f is None:
            f = open(path, "rb")  # noqa: SIM115 - kept open across calls, closed by close()
            self._files[path] = f
            if len(self._files) > self._size:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(path)
        return os.pread(f.fileno(), length, offset)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _never_ran(custom_id: str, code: str | None, status_code: int | None) -> bytes:
    code = code or "batch_cancelled"
    return orjson.dumps(
        {
            "id": None,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": NEVER_RAN_MESSAGES.get(code, code)},
        }
    )


def iter_result_lines(
    store: Store,
    job_id: str,
    result_paths: dict[str, dict[str, str]],
    *,
    errors_only: bool = False,
    chunk: int = 20_000,
) -> Iterator[tuple[Row, bytes]]:
    """(request row, raw JSONL line without newline) for every request, in input order.

    `result_paths` maps batch id -> {"output": path, "error": path}. A request that never ran
    (cancelled or expired before it was executed) gets a synthetic line with that error.
    """
    cache = _FileCache()
    last = -1
    t = requests_table
    try:
        while True:
            with store.read() as conn:
                stmt = (
                    select(t)
                    .where(t.c.job_id == job_id, t.c.position > last)
                    .order_by(t.c.position)
                    .limit(chunk)
                )
                if errors_only:
                    stmt = stmt.where(and_(t.c.outcome.is_distinct_from("succeeded")))
                rows = conn.execute(stmt).all()
            if not rows:
                return
            for row in rows:
                path = None
                if row.result_batch_id is not None:
                    path = result_paths.get(row.result_batch_id, {}).get(row.result_kind)
                if path is not None:
                    line = cache.read(path, row.result_offset, row.result_length).rstrip(b"\r\n")
                else:
                    line = _never_ran(row.custom_id, row.error_code, row.status_code)
                yield row, line
            last = rows[-1].position
    finally:
        cache.close()
