"""Result files meet the request index: recording a collected batch's outcomes, and the export
of a job's results in input order.

The file side (scanning lines, reading them back) is `jobqueue.files.results`; the SQL is
`jobqueue.store.outcomes`; this module puts them together. Collection never holds a file in
memory: lines are scanned one at a time and their outcomes go to the database a batch at a
time. The index then records, for each request, where its line is (batch, file, offset,
length), so the export in input order reads each line straight from disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection

from jobqueue.core.lifecycle import RETRYABLE_CODES
from jobqueue.files.results import outcome_rows, read_runs, run_lines, write_runs
from jobqueue.store import Store
from jobqueue.store.outcomes import (
    batch_positions,
    record_missing,
    result_locations_in_order,
    write_outcomes,
)


def record_outcomes(
    store: Store,
    conn: Connection,
    *,
    job_number: int,
    batch_number: int,
    files: list[tuple[str, Path]],
    can_retry: bool,
    missing_code: str,
) -> dict[str, int]:
    """Record the outcome of every request of a collected batch; return final counts.

    A retryable failure leaves the request pending (outcome NULL) when `can_retry`, for the retry
    duty to resubmit, but its line is recorded so results can show it if no retry ever runs.
    Requests the files do not mention get `missing_code`. If a request appears in more than one
    line (in both files, say), its first line wins: output lines are read first, so a success.

    The batch's custom ids come first (custom_id -> position, from the (job, batch) index), so
    lines of ids the batch does not hold are dropped, and each line becomes an update by primary
    key (see `outcomes.write_outcomes`). At most one batch of updates is held in memory. Every
    request of the batch was pending, so the counts are those of the updates themselves.
    """
    missing_final = None if (can_retry and missing_code in RETRYABLE_CODES) else "failed"
    positions = batch_positions(conn, store.dialect, job_number, batch_number)
    counts = {"succeeded": 0, "failed": 0, "pending": 0}

    def first_lines() -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(position, outcome columns) of the first line of each request of the batch."""
        seen: set[int] = set()
        for row in outcome_rows(files, can_retry):
            position = positions.get(row[6])
            if position is not None and position not in seen:
                seen.add(position)
                counts[row[0] or "pending"] += 1
                yield position, row[:6]

    recorded = write_outcomes(conn, store.dialect, job_number, batch_number, first_lines())
    if recorded < len(positions):
        counts[missing_final or "pending"] += record_missing(
            conn, store.dialect, job_number, batch_number, missing_final, missing_code
        )
    return counts


def iter_result_lines(
    store: Store,
    job_number: int,
    result_paths: dict[int, dict[str, str]],
    *,
    errors_only: bool = False,
    chunk: int = 20_000,
    final_only: bool = False,
) -> Iterator[tuple[tuple[Any, ...], bytes]]:
    """(request, raw JSONL line without newline) for every request, in input order; the request
    is a tuple (position, custom_id, status_code, error_code, result_batch_number, result_kind,
    result_offset, result_length).

    `result_paths` maps batch number -> {"output": path, "error": path}. A request that never ran
    (cancelled or expired before it was executed) gets a synthetic line with that error.
    `final_only`: only requests with a final outcome (the partial results of a running job).
    """
    pages = result_locations_in_order(
        store, job_number, errors_only=errors_only, chunk=chunk, final_only=final_only
    )
    for run, data in read_runs(pages, result_paths):
        yield from zip(run, run_lines(run, data), strict=True)


def write_result_lines(
    store: Store,
    job_number: int,
    result_paths: dict[int, dict[str, str]],
    out: IO[bytes],
    *,
    errors_only: bool = False,
    chunk: int = 20_000,
    final_only: bool = False,
) -> int:
    """Write what `iter_result_lines` yields as JSONL (each line ending in one newline) to
    `out`; return the number of lines. Runs of lines already in that form are written as read."""
    pages = result_locations_in_order(
        store, job_number, errors_only=errors_only, chunk=chunk, final_only=final_only
    )
    return write_runs(read_runs(pages, result_paths), out)
