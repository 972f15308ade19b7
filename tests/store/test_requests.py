"""The request index's named changes and queries (`jobqueue.store.requests`): final failures,
what is pending and where, and moving requests into retry and requeued batches."""

from __future__ import annotations

from sqlalchemy import Row

from jobqueue.store import Store, requests
from tests.store.helpers import NOW, add_job, get_job, requests_of, set_requests

# -- the operations under test ----------------------------------------------------------------


def fail_pending(store: Store, job_id: str, batch_id: str, code: str) -> int:
    with store.write() as conn:
        return requests.fail_pending_requests(conn, job_id, batch_id, code)


def fail_exhausted(store: Store, job_id: str, max_attempts: int | None) -> int:
    with store.write() as conn:
        return requests.fail_exhausted(
            conn, job_id, get_job(store, job_id).number, max_attempts=max_attempts
        )


def count_pending(store: Store, job_id: str) -> int:
    with store.read() as conn:
        return requests.count_pending(conn, job_id)


def pending_by_batch(store: Store, job_id: str) -> list[tuple[str, int]]:
    with store.read() as conn:
        return requests.pending_by_batch(conn, job_id)


def pending_in_batches(store: Store, job_id: str, batch_ids: list[str]) -> list[Row]:
    with store.read() as conn:
        return requests.pending_in_batches(conn, job_id, batch_ids)


def move_to_retry_batch(
    store: Store, job_id: str, moves: list[tuple[int, int]], batch_number: int
) -> int:
    with store.write() as conn:
        return requests.move_to_retry_batch(
            conn, get_job(store, job_id).number, moves, batch_number
        )


def move_batch_requests(store: Store, job_id: str, batch_id: str, batch_number: int) -> int:
    with store.write() as conn:
        return requests.move_batch_requests(conn, job_id, batch_id, batch_number)


def _index(store: Store, job_id: str) -> list[tuple[int, str | None, str | None, int, int]]:
    """(position, outcome, error_code, batch_number, attempt) of each request."""
    return [
        (r.position, r.outcome, r.error_code, r.batch_number, r.attempt)
        for r in requests_of(store, job_id)
    ]


# -- final failures ---------------------------------------------------------------------------


def test_fail_pending_requests_fails_only_the_batchs_pending_ones(store: Store) -> None:
    job_id, [first, _] = add_job(store, {"requests": 3}, {"requests": 1})
    other, _ = add_job(store, {"requests": 1})
    set_requests(store, job_id, [0], outcome="succeeded")
    assert fail_pending(store, job_id, first, "batch_expired") == 2
    assert fail_pending(store, job_id, first, "batch_expired") == 0
    assert _index(store, job_id) == [
        (0, "succeeded", None, 1, 1),
        (1, "failed", "batch_expired", 1, 1),
        (2, "failed", "batch_expired", 1, 1),
        (3, None, None, 2, 1),
    ]
    assert get_job(store, job_id).requests_failed == 2
    assert _index(store, other)[0][1] is None and get_job(store, other).requests_failed == 0


def test_fail_exhausted_finalises_collected_requests_out_of_attempts(store: Store) -> None:
    job_id, _ = add_job(
        store,
        {"status": "expired", "requests": 3, "collected_at": NOW},
        {"status": "in_progress", "requests": 1},  # not collected: nothing final yet
    )
    set_requests(store, job_id, [0], attempt=3)
    set_requests(store, job_id, [1], attempt=3, outcome="succeeded")
    set_requests(store, job_id, [3], attempt=3)
    assert fail_exhausted(store, job_id, max_attempts=3) == 1
    assert [r[1] for r in _index(store, job_id)] == ["failed", "succeeded", None, None]
    assert get_job(store, job_id).requests_failed == 1
    # No retry allowed at all: every pending request of a collected batch.
    assert fail_exhausted(store, job_id, max_attempts=None) == 1
    assert [r[1] for r in _index(store, job_id)] == ["failed", "succeeded", "failed", None]
    assert get_job(store, job_id).requests_failed == 2
    assert fail_exhausted(store, job_id, max_attempts=None) == 0


# -- what is pending --------------------------------------------------------------------------


def test_pending_requests_by_batch(store: Store) -> None:
    job_id, [b1, b2, b3] = add_job(
        store,
        {"status": "expired", "requests": 3, "collected_at": NOW, "model": "m1"},
        {"status": "cancelled", "requests": 2, "collected_at": NOW, "model": "m2",
         "input_path": "/in/2.jsonl"},
        {"status": "in_progress", "requests": 2},
    )  # fmt: skip
    set_requests(store, job_id, [1, 3], outcome="succeeded")
    assert count_pending(store, job_id) == 5
    assert pending_by_batch(store, job_id) == sorted([(b1, 2), (b2, 1)])
    rows = pending_in_batches(store, job_id, [b2, b1])
    assert [(r.position, r.custom_id, r.batch_id, r.batch_number, r.attempt) for r in rows] == [
        (0, "req-0", b1, 1, 1),
        (2, "req-2", b1, 1, 1),
        (4, "req-4", b2, 2, 1),
    ]
    assert (rows[2].input_path, rows[2].model) == ("/in/2.jsonl", "m2")
    assert pending_in_batches(store, job_id, [b3])[0].position == 5
    assert count_pending(store, "job_missing") == 0


# -- moving requests --------------------------------------------------------------------------


def test_move_to_retry_batch_moves_only_what_is_still_pending_where_it_was(store: Store) -> None:
    job_id, _ = add_job(store, {"status": "expired", "requests": 4, "collected_at": NOW})
    set_requests(store, job_id, [1], outcome="succeeded")
    moved = move_to_retry_batch(store, job_id, [(0, 1), (1, 1), (2, 9), (3, 1)], 2)
    assert moved == 2
    assert _index(store, job_id) == [
        (0, None, None, 2, 2),
        (1, "succeeded", None, 1, 1),  # not pending
        (2, None, None, 1, 1),  # not in batch 9: another daemon moved it first
        (3, None, None, 2, 2),
    ]
    assert move_to_retry_batch(store, job_id, [(0, 1)], 3) == 0  # already moved
    assert move_to_retry_batch(store, job_id, [], 3) == 0


def test_move_batch_requests_keeps_the_attempt(store: Store) -> None:
    job_id, [first, _] = add_job(store, {"requests": 2}, {"requests": 1})
    assert move_batch_requests(store, job_id, first, 7) == 2
    assert [(r[3], r[4]) for r in _index(store, job_id)] == [(7, 1), (7, 1), (2, 1)]
