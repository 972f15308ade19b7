"""The queries the duties run: open remote batches, cancels to send, collectable batches, jobs
with requests to retry, unsettled batches, job counts, and tokens the remote holds."""

from __future__ import annotations

from sqlalchemy import Row

from jobqueue.store import Store
from tests.store.helpers import NOW, add_job, get_job, set_requests

# -- the operations under test ----------------------------------------------------------------


def open_remote_batches(store: Store) -> list[Row]:
    with store.read() as conn:
        return store.open_remote_batches(conn)


def cancel_candidates(store: Store) -> list[Row]:
    with store.read() as conn:
        return store.cancel_candidates(conn)


def collectable(store: Store, now: float, limit: int = 16) -> list[Row]:
    with store.read() as conn:
        return store.collectable(conn, now, limit)


def jobs_with_requests_to_retry(store: Store) -> list[str]:
    with store.read() as conn:
        return store.jobs_with_requests_to_retry(conn)


def unsettled_batches(store: Store, job_id: str) -> int:
    with store.read() as conn:
        return store.unsettled_batches(conn, job_id)


def add_job_counts(store: Store, job_id: str, succeeded: int, failed: int) -> None:
    with store.write() as conn:
        store.add_job_counts(conn, job_id, succeeded, failed)


def open_tokens_by_model(store: Store) -> dict[str | None, int]:
    with store.read() as conn:
        return store.open_tokens_by_model(conn)


def _ids(rows: list[Row]) -> list[str]:
    return [r.id for r in rows]


def _set_outcome(store: Store, job_id: str, positions: list[int], outcome: str | None) -> None:
    set_requests(store, job_id, positions, outcome=outcome)


# -- open batches and cancels -----------------------------------------------------------------


def test_open_remote_batches_nearest_remote_deadline_first(store: Store) -> None:
    _, [late, no_deadline, soon, finalizing, cancelling] = add_job(
        store,
        {"status": "in_progress", "remote_id": "r1", "expires_at": NOW + 300},
        {"status": "validating", "remote_id": "r2"},
        {"status": "validating", "remote_id": "r3", "expires_at": NOW + 100},
        {"status": "finalizing", "remote_id": "r4", "expires_at": NOW + 200},
        {"status": "cancelling", "remote_id": "r5", "expires_at": NOW + 400},
    )
    add_job(
        store,
        {"status": "queued"},
        {"status": "submitting"},
        {"status": "validating"},  # no remote id yet: nothing to refresh
        *({"status": s, "remote_id": f"t-{s}"} for s in ("completed", "failed", "expired")),
        {"status": "cancelled", "remote_id": "t-cancelled"},
    )
    assert _ids(open_remote_batches(store)) == [soon, finalizing, late, cancelling, no_deadline]


def test_cancel_candidates_are_requested_cancels_the_remote_can_take(store: Store) -> None:
    _, [validating, running, *_] = add_job(
        store,
        {"status": "validating", "remote_id": "r1", "cancel_requested": True},
        {"status": "in_progress", "remote_id": "r2", "cancel_requested": True},
        {"status": "in_progress", "remote_id": "r3"},  # not asked for
        {"status": "finalizing", "remote_id": "r4", "cancel_requested": True},
        {"status": "cancelling", "remote_id": "r5", "cancel_requested": True},  # already sent
        {"status": "validating", "cancel_requested": True},  # no remote id
        {"status": "queued", "cancel_requested": True},
    )
    assert sorted(_ids(cancel_candidates(store))) == sorted([validating, running])


# -- collection -------------------------------------------------------------------------------


def test_collectable_are_ended_remote_batches_not_collected_nor_leased(store: Store) -> None:
    _, [completed, failed, expired, cancelled, expired_lease, *_] = add_job(
        store,
        {"status": "completed", "remote_id": "r1", "updated_at": NOW - 10},
        {"status": "failed", "remote_id": "r2", "updated_at": NOW - 40},
        {"status": "expired", "remote_id": "r3", "updated_at": NOW - 30},
        {"status": "cancelled", "remote_id": "r4", "updated_at": NOW - 20},
        {"status": "completed", "remote_id": "r5", "updated_at": NOW, "lease_owner": "d1",
         "lease_until": NOW - 1},
        {"status": "completed", "remote_id": "r6", "lease_owner": "d1", "lease_until": NOW + 9},
        {"status": "completed", "remote_id": "r7", "collected_at": NOW - 5},
        {"status": "failed", "collected_at": NOW - 5},  # refused at submission: nothing remote
        {"status": "failed"},
        {"status": "in_progress", "remote_id": "r8"},
    )  # fmt: skip
    oldest_first = [failed, expired, cancelled, completed, expired_lease]
    assert _ids(collectable(store, NOW)) == oldest_first
    assert _ids(collectable(store, NOW, limit=2)) == oldest_first[:2]


# -- retries and settling ---------------------------------------------------------------------


def test_jobs_with_requests_to_retry(store: Store) -> None:
    # Positions 0-1 in batch 1, 2-3 in batch 2.
    spec = ({"status": "expired", "requests": 2, "collected_at": NOW}, {"status": "in_progress",
            "requests": 2})  # fmt: skip
    retry, _ = add_job(store, *spec)
    _set_outcome(store, retry, [0], "succeeded")  # position 1 is still pending
    two_batches, _ = add_job(store, *({"status": "expired", "collected_at": NOW} for _ in "ab"))
    all_done, _ = add_job(store, *spec)
    _set_outcome(store, all_done, [0, 1], "failed")  # batch 2 is not collected yet
    not_collected, _ = add_job(store, {"status": "expired"})
    cancelled, _ = add_job(store, *spec, status="cancelled")
    assert sorted(jobs_with_requests_to_retry(store)) == sorted([retry, two_batches])
    assert {not_collected, cancelled}.isdisjoint(jobs_with_requests_to_retry(store))


def test_unsettled_batches_count_those_not_ended_and_collected(store: Store) -> None:
    job_id, _ = add_job(
        store,
        {"status": "completed", "collected_at": NOW},
        {"status": "cancelled", "collected_at": NOW},
        {"status": "completed"},  # ended, results not stored yet
        {"status": "in_progress"},
        {"status": "queued"},
    )
    other, _ = add_job(store, {"status": "failed", "collected_at": NOW})
    assert unsettled_batches(store, job_id) == 3
    assert unsettled_batches(store, other) == 0
    assert unsettled_batches(store, "job_missing") == 0


def test_add_job_counts_adds_to_the_job_only(store: Store) -> None:
    job_id, _ = add_job(store, {"requests": 10})
    other, _ = add_job(store)
    add_job_counts(store, job_id, 3, 1)
    add_job_counts(store, job_id, 2, 0)
    add_job_counts(store, job_id, 0, 0)
    job = get_job(store, job_id)
    assert (job.requests_succeeded, job.requests_failed) == (5, 1)
    assert (get_job(store, other).requests_succeeded, get_job(store, other).requests_failed) == (
        0,
        0,
    )


# -- the enqueued-token budget ----------------------------------------------------------------


def test_open_tokens_by_model_sum_what_the_remote_holds(store: Store) -> None:
    add_job(
        store,
        {"status": "submitting", "model": "a", "estimated_tokens": 100},
        {"status": "validating", "model": "a", "estimated_tokens": 20},
        {"status": "in_progress", "model": "b", "estimated_tokens": 7},
        {"status": "finalizing", "model": None, "estimated_tokens": 3},
        {"status": "cancelling", "model": "b", "estimated_tokens": 1},
        *({"status": s, "model": "a", "estimated_tokens": 1000}
          for s in ("queued", "completed", "failed", "expired", "cancelled")),
    )  # fmt: skip
    assert open_tokens_by_model(store) == {"a": 120, "b": 8, None: 3}
