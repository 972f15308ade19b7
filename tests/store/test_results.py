"""Recording a collected batch's outcomes: which requests a line may touch, what becomes final
and what stays pending for a retry, and what the counts say. (Line classification, chunking
and the ordered export are in tests/test_results_record.py and tests/test_results_scan.py.)"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from sqlalchemy import Connection

from jobqueue.store import Store
from jobqueue.store.requests import move_to_retry_batch
from jobqueue.store.results import record_outcomes
from tests.store.helpers import add_job, get_job, requests_of

# -- the operations under test ----------------------------------------------------------------


def record(
    store: Store,
    conn: Connection,
    job_id: str,
    batch_number: int,
    files: list[tuple[str, Path]],
    *,
    can_retry: bool,
    missing_code: str = "missing_result",
) -> dict[str, int]:
    return record_outcomes(
        store,
        conn,
        job_number=get_job(store, job_id).number,
        batch_number=batch_number,
        files=files,
        can_retry=can_retry,
        missing_code=missing_code,
    ).counts


def move_to_batch(store: Store, job_id: str, positions: list[int], batch_number: int) -> None:
    """Requests put into a retry batch, as the retry duty moves them."""
    held = {r.position: r.batch_number for r in requests_of(store, job_id)}
    with store.write() as conn:
        moved = move_to_retry_batch(
            conn, get_job(store, job_id).number, [(p, held[p]) for p in positions], batch_number
        )
    assert moved == len(positions)


# -- lines ------------------------------------------------------------------------------------


def _ok(cid: str) -> bytes:
    return orjson.dumps({"custom_id": cid, "response": {"status_code": 200, "body": {}}})


def _status(cid: str, status: int) -> bytes:
    return orjson.dumps({"custom_id": cid, "response": {"status_code": status, "body": {}}})


def _error(cid: str, code: str) -> bytes:
    return orjson.dumps({"custom_id": cid, "response": None, "error": {"code": code}})


def _file(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _outcomes(store: Store, job_id: str) -> dict[str, tuple[object, ...]]:
    """custom_id -> (outcome, error_code, result_batch_number, attempt)."""
    return {
        r.custom_id: (r.outcome, r.error_code, r.result_batch_number, r.attempt)
        for r in requests_of(store, job_id)
    }


# -- tests ------------------------------------------------------------------------------------


def test_lines_touch_only_the_requests_the_batch_holds(store: Store, tmp_path: Path) -> None:
    job_id, _ = add_job(store, {"status": "completed", "requests": 2}, {"status": "in_progress"})
    other_job, _ = add_job(store, {"status": "completed", "requests": 3})
    output = _file(tmp_path / "out.jsonl", _ok("req-0"), _ok("req-2"), _status("req-1", 500))
    with store.write() as conn:
        counts = record(store, conn, job_id, 1, [("output", output)], can_retry=True)
    assert counts == {"succeeded": 1, "failed": 0, "pending": 1}
    assert _outcomes(store, job_id) == {
        "req-0": ("succeeded", None, 1, 1),
        "req-1": (None, "http_500", 1, 1),  # retryable: pending, its line recorded
        "req-2": (None, None, None, 1),  # batch 2's: not this batch's to record
    }
    assert {o[0] for o in _outcomes(store, other_job).values()} == {None}


def test_without_a_retry_every_failure_is_final(store: Store, tmp_path: Path) -> None:
    job_id, _ = add_job(store, {"status": "expired", "requests": 4})
    output = _file(tmp_path / "out.jsonl", _ok("req-0"), _status("req-1", 500))
    error = _file(tmp_path / "err.jsonl", _error("req-2", "batch_expired"))
    with store.write() as conn:
        counts = record(
            store,
            conn,
            job_id,
            1,
            [("output", output), ("error", error)],
            can_retry=False,
            missing_code="batch_expired",
        )
    assert counts == {"succeeded": 1, "failed": 3, "pending": 0}
    assert _outcomes(store, job_id) == {
        "req-0": ("succeeded", None, 1, 1),
        "req-1": ("failed", "http_500", 1, 1),
        "req-2": ("failed", "batch_expired", 1, 1),
        "req-3": ("failed", "batch_expired", None, 1),  # no line at all
    }


def test_requests_no_file_mentions_get_the_missing_code(store: Store) -> None:
    for missing_code, can_retry, outcome in [
        ("batch_cancelled", True, None),  # never ran: retried
        ("batch_failed", True, "failed"),  # not a code worth a retry
        ("missing_result", False, "failed"),  # no retry allowed
    ]:
        job_id, _ = add_job(store, {"status": "cancelled", "requests": 2})
        with store.write() as conn:
            counts = record(
                store, conn, job_id, 1, [], can_retry=can_retry, missing_code=missing_code
            )
        assert counts == {"succeeded": 0, "failed": 2 * (outcome == "failed"),
                          "pending": 2 * (outcome is None)}  # fmt: skip
        assert set(_outcomes(store, job_id).values()) == {(outcome, missing_code, None, 1)}


def test_a_retried_request_is_recorded_under_its_new_batch(store: Store, tmp_path: Path) -> None:
    job_id, _ = add_job(store, {"status": "expired", "requests": 3, "collected_at": 1.0})
    first = _file(tmp_path / "b1.jsonl", _ok("req-0"), _error("req-1", "batch_expired"))
    with store.write() as conn:
        record(store, conn, job_id, 1, [("error", first)], can_retry=True)
    move_to_batch(store, job_id, [1, 2], 2)
    second = _file(tmp_path / "b2.jsonl", _ok("req-1"), _ok("req-0"))  # req-0 is not batch 2's
    with store.write() as conn:
        counts = record(store, conn, job_id, 2, [("output", second)], can_retry=True)
    assert counts == {"succeeded": 1, "failed": 0, "pending": 1}
    assert _outcomes(store, job_id) == {
        "req-0": ("succeeded", None, 1, 1),
        "req-1": ("succeeded", None, 2, 2),
        "req-2": (None, "missing_result", None, 2),
    }


def test_a_rolled_back_recording_leaves_every_request_pending(store: Store, tmp_path: Path) -> None:
    job_id, _ = add_job(store, {"status": "completed", "requests": 2})
    output = _file(tmp_path / "out.jsonl", _ok("req-0"), _ok("req-1"))

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.write() as conn:
        record(store, conn, job_id, 1, [("output", output)], can_retry=True)
        raise Boom
    assert set(_outcomes(store, job_id).values()) == {(None, None, None, 1)}
