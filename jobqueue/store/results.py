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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection

from jobqueue.core.lifecycle import RETRYABLE_CODES
from jobqueue.files.results import TOKEN_KINDS, outcome_rows, read_runs, run_lines, write_runs
from jobqueue.store import Store
from jobqueue.store.outcomes import (
    batch_positions,
    record_missing,
    result_locations_in_order,
    write_outcomes,
)


@dataclass(slots=True)
class Recorded:
    """What recording a batch's outcomes found."""

    # Requests by outcome: succeeded, failed, pending (waiting for a retry).
    counts: dict[str, int]
    # Tokens summed over the lines' `usage`, by kind (`TOKEN_KINDS`); all 0 when not read.
    tokens: dict[str, int]
    # Requests no line mentioned.
    missing: int


def record_outcomes(
    store: Store,
    conn: Connection,
    *,
    job_number: int,
    batch_number: int,
    files: list[tuple[str, Path]],
    can_retry: bool,
    missing_code: str,
    replace: bool = True,
    tokens: bool = True,
) -> Recorded:
    """Record the outcome of every request of a collected batch, and the tokens of each
    response's `usage` (in the same pass over the files; `tokens=False` skips them); return the
    final counts and the tokens summed.

    A retryable failure leaves the request pending (outcome NULL) when `can_retry`, for the retry
    duty to resubmit, but its line is recorded so results can show it if no retry ever runs.
    Requests the files do not mention get `missing_code`. If a request appears in more than one
    line (in both files, say), its first line wins: output lines are read first, so a success.

    The batch's custom ids come first (custom_id -> position, from the (job, batch) index), so
    lines of ids the batch does not hold are dropped, and each line becomes an outcome row
    (see `outcomes.write_outcomes`; `replace` when the batch may hold requests that have a row
    already, i.e. a retry batch). At most one batch of rows is held in memory. Every request of
    the batch was pending, so the counts are those of the rows themselves.
    """
    missing_final = None if (can_retry and missing_code in RETRYABLE_CODES) else "failed"
    positions = batch_positions(conn, store.dialect, job_number, batch_number)
    counts = {"succeeded": 0, "failed": 0, "pending": 0}
    sums = [0, 0, 0, 0]

    def first_lines() -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(position, outcome columns) of the first line of each request of the batch."""
        seen: set[int] = set()
        for row in outcome_rows(files, can_retry, tokens=tokens):
            position = positions.get(row[6])
            if position is not None and position not in seen:
                seen.add(position)
                counts[row[0] or "pending"] += 1
                used = row[7]
                if used is None:
                    yield position, (*row[:6], None, None, None, None)
                else:
                    sums[0] += used[0]
                    sums[1] += used[1]
                    sums[2] += used[2]
                    sums[3] += used[3]
                    yield position, (*row[:6], *used)

    recorded = write_outcomes(
        conn,
        store.dialect,
        job_number,
        batch_number,
        first_lines(),
        replace=positions.values() if replace else (),
    )
    missing = 0
    if recorded < len(positions):
        missing = record_missing(
            conn, store.dialect, job_number, batch_number, missing_final, missing_code
        )
        counts[missing_final or "pending"] += missing
    return Recorded(counts, dict(zip(TOKEN_KINDS, sums, strict=True)), missing)


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
    result_offset, result_length), its custom_id None where the line has it.

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
    return write_runs(pages, result_paths, out)
