"""The named changes the duties make to batches (`jobqueue.store.batches`): inserting queued
batches, submitting, requeueing, failing, cancelling, reporting and collecting. Each status
change is a compare-and-set with its event; each returns None or False, and changes nothing,
when the batch had moved meanwhile."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from jobqueue.core.costs import Price, PriceTable
from jobqueue.store import Store, batches
from jobqueue.store.batches import Lease
from jobqueue.store.tables import events_table
from tests.store.helpers import (
    LEASE,
    NOW,
    add_job,
    batch_values,
    count,
    events_of,
    get_batch,
    get_job,
    requests_of,
)

# -- the operations under test ----------------------------------------------------------------


def insert_queued(store: Store, rows: list[dict[str, Any]], **kwargs: Any) -> None:
    with store.write() as conn:
        batches.insert_queued_batches(conn, rows, now=NOW, **kwargs)


def last_shard_index(store: Store, job_id: str) -> int:
    with store.read() as conn:
        return batches.last_shard_index(conn, job_id)


def claim_queued(store: Store, row: Row, owner: str = "d1") -> Row | None:
    with store.write() as conn:
        return batches.claim_queued(store, conn, row, owner=owner, now=NOW, lease_seconds=LEASE)


def held(store: Store, batch_id: str) -> Lease:
    """The lease the batch is under now, as its holder passes it to the holder's writes (these
    are fenced on it: tests/store/test_fencing.py); a batch under none gets one nobody holds."""
    row = get_batch(store, batch_id)
    return Lease(batch_id, row.lease_owner or "-", row.lease_token or "-", row.lease_until or 0)


def set_input_file(store: Store, batch_id: str, file_id: str | None) -> bool:
    with store.write() as conn:
        return batches.set_input_file(conn, held(store, batch_id), file_id)


def mark_create_uncertain(store: Store, batch_id: str, error: str, lease_until: float) -> bool:
    lease = held(store, batch_id)
    with store.write() as conn:
        return batches.mark_create_uncertain(conn, lease, error=error, lease_until=lease_until)


def requeue_submitting(store: Store, batch_id: str, error: str, delay: float) -> Row | None:
    lease = held(store, batch_id)
    with store.write() as conn:
        return batches.requeue_submitting(store, conn, lease, error=error, delay=delay, now=NOW)


def fail_submission(store: Store, row: Row, code: str, error: str) -> bool:
    lease = held(store, row.id)
    with store.write() as conn:
        return batches.fail_submission(store, conn, row, lease, code=code, error=error, now=NOW)


def mark_submitted(
    store: Store, batch_id: str, values: dict[str, Any], at: float | None
) -> Row | None:
    lease = held(store, batch_id)
    with store.write() as conn:
        return batches.mark_submitted(store, conn, lease, values, at=at, now=NOW)


def record_observed(store: Store, batch_id: str, **values: Any) -> None:
    with store.write() as conn:
        batches.record_observed(conn, batch_id, values)


def requeue_after_token_limit(
    store: Store, row: Row, values: dict[str, Any], delay: float, now: float = NOW
) -> str | None:
    with store.write() as conn:
        return batches.requeue_after_token_limit(store, conn, row, values, delay=delay, now=now)


def cancel_queued(store: Store, job_id: str, batch_id: str, *, by_user: bool = False) -> bool:
    with store.write() as conn:
        return batches.cancel_queued(
            store, conn, job_id, batch_id, reason="deadline", error_code="batch_expired",
            now=NOW, by_user=by_user,
        )  # fmt: skip


def request_remote_cancel(store: Store, batch_id: str) -> None:
    with store.write() as conn:
        batches.request_remote_cancel(conn, batch_id, NOW)


def open_unreported(store: Store) -> list[Row]:
    with store.read() as conn:
        return batches.open_unreported(conn)


def report_once(store: Store, row: Row, kind: Any, data: dict[str, Any]) -> bool:
    with store.write() as conn:
        return batches.report_once(conn, row, kind, data, now=NOW)


def mark_collected(store: Store, batch_id: str, output: str | None, error: str | None) -> bool:
    lease = held(store, batch_id)
    with store.write() as conn:
        return batches.mark_collected(conn, lease, output_path=output, error_path=error, now=NOW)


# -- inserting --------------------------------------------------------------------------------


def test_insert_queued_batches_with_their_events(store: Store) -> None:
    job_id, _ = add_job(store, status="running")
    rows = [
        {k: v for k, v in batch_values(job_id, n, requests=n).items()
         if k not in ("status", "created_at", "updated_at")}
        for n in (2, 3)
    ]  # fmt: skip
    rows[1]["attempt"] = 2
    rows[0].update(estimated_tokens=1_000_000, max_output_tokens=500_000)
    rows[1].update(estimated_tokens=0, max_output_tokens=None)
    prices = PriceTable({"gpt-4o-mini": Price(input=2.0, cached_input=0.5, output=8.0)})
    insert_queued(store, rows, data=[{"retry_of": ["b1"]}, {}], prices=prices)
    for row in rows:
        stored = get_batch(store, row["id"])
        assert (stored.status, stored.created_at, stored.updated_at) == ("queued", NOW, NOW)
    first, second = (events_of(store, job_id, batch_id=row["id"]) for row in rows)
    assert [(e.type, e.from_status, e.to_status, e.created_at) for e in first + second] == [
        ("batch.queued", None, "queued", NOW)
    ] * 2
    assert first[0].data == {
        "attempt": 1, "shard_index": 1, "model": "gpt-4o-mini",
        "request_counts": {"total": 2, "completed": 0, "failed": 0},
        "estimated_input_tokens": 1_000_000, "max_output_tokens": 500_000,
        "estimated_cost": {"min": 2.0, "max": 6.0},  # at the prices given
        "estimate_sampled": False,
        "retry_of": ["b1"],
    }  # fmt: skip
    assert second[0].data["estimated_cost"] == {"min": 0.0, "max": None}  # no output bound
    assert second[0].data["attempt"] == 2 and "retry_of" not in second[0].data
    events_before = count(store, events_table)
    insert_queued(store, [])
    assert count(store, events_table) == events_before


def test_last_shard_index(store: Store) -> None:
    job_id, _ = add_job(store, {"shard_index": 0}, {"shard_index": 4}, {"shard_index": 2})
    assert last_shard_index(store, job_id) == 4
    assert last_shard_index(store, "job_missing") == 0


# -- submitting -------------------------------------------------------------------------------


def test_claim_queued_takes_a_queued_batch_once(store: Store) -> None:
    _, [batch_id] = add_job(store, {"submit_attempts": 2, "not_before": NOW - 1})
    row = get_batch(store, batch_id)
    claimed = claim_queued(store, row)
    assert claimed is not None
    assert (claimed.status, claimed.lease_owner, claimed.lease_until) == (
        "submitting",
        "d1",
        NOW + LEASE,
    )
    assert (claimed.submit_attempts, claimed.not_before) == (3, None)
    assert claim_queued(store, row, "d2") is None  # the row it was read as is stale now
    assert get_batch(store, batch_id).lease_owner == "d1"


def test_input_file_and_an_uncertain_create(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "submitting", "lease_owner": "d1",
                                    "lease_token": "t1", "lease_until": NOW + LEASE})  # fmt: skip
    set_input_file(store, batch_id, "file_in")
    assert get_batch(store, batch_id).input_file_id == "file_in"
    mark_create_uncertain(store, batch_id, "timed out", NOW + 30)
    row = get_batch(store, batch_id)
    assert (row.status, row.lease_owner, row.lease_until) == ("submitting", "d1", NOW + 30)
    assert row.last_error == "create uncertain: timed out"
    set_input_file(store, batch_id, None)  # gone remotely: upload again
    assert get_batch(store, batch_id).input_file_id is None


def test_requeue_submitting_releases_and_delays(store: Store) -> None:
    job_id, [later, now_again] = add_job(
        store, *({"status": "submitting", "lease_owner": "d1", "lease_token": "t1",
                   "lease_until": NOW + 9}
                 for _ in "ab"),
    )  # fmt: skip
    row = requeue_submitting(store, later, "x" * 5000, delay=12.34)
    assert row is not None and row.status == "queued"
    assert (row.lease_owner, row.lease_until, row.not_before) == (None, None, NOW + 12.34)
    assert row.last_error == "x" * 4000
    [event] = [e for e in events_of(store, job_id, batch_id=later) if e.to_status == "queued"][1:]
    assert (event.from_status, event.data["reason"], event.data["retry_in_seconds"]) == (
        "submitting",
        "x" * 500,
        12.3,
    )
    assert requeue_submitting(store, now_again, "503", delay=0).not_before is None
    assert requeue_submitting(store, later, "again", delay=1) is None  # already queued


def test_fail_submission_ends_the_batch_and_its_requests(store: Store) -> None:
    job_id, [batch_id, other] = add_job(
        store,
        {"status": "submitting", "lease_owner": "d1", "lease_token": "t1", "requests": 2},
        {"status": "queued"},
    )
    row = get_batch(store, batch_id)
    assert fail_submission(store, row, "invalid_request", "bad model")
    failed = get_batch(store, batch_id)
    assert (failed.status, failed.lease_owner, failed.collected_at, failed.failed_at) == (
        "failed",
        None,
        NOW,
        NOW,
    )
    assert failed.last_error == "invalid_request: bad model"
    assert [(r.outcome, r.error_code) for r in requests_of(store, job_id)] == [
        ("failed", "invalid_request"),
        ("failed", "invalid_request"),
        (None, None),
    ]
    assert get_job(store, job_id).requests_failed == 2
    assert not fail_submission(store, row, "again", "no")  # no longer submitting
    assert not fail_submission(store, get_batch(store, other), "x", "y")
    assert get_job(store, job_id).requests_failed == 2


def test_mark_submitted_records_the_remote_batch(store: Store) -> None:
    _, [a, b] = add_job(
        store, *({"status": "submitting", "lease_owner": "d1", "lease_token": t} for t in "ab")
    )
    row = mark_submitted(store, a, {"remote_id": "batch_r1", "input_file_id": "f1"}, at=NOW - 7)
    assert row is not None
    assert (row.status, row.remote_id, row.input_file_id, row.lease_owner) == (
        "validating",
        "batch_r1",
        "f1",
        None,
    )
    assert (row.validating_at, row.updated_at) == (NOW - 7, NOW)
    assert mark_submitted(store, b, {"remote_id": "batch_r2"}, at=None).validating_at == NOW
    assert mark_submitted(store, a, {"remote_id": "batch_r3"}, at=None) is None
    assert get_batch(store, a).remote_id == "batch_r1"


def test_record_observed_changes_no_status_and_writes_no_event(store: Store) -> None:
    job_id, [batch_id] = add_job(store, {"status": "in_progress", "remote_id": "r"})
    events_before = len(events_of(store, job_id))
    record_observed(store, batch_id, remote_completed=5, refreshed_at=NOW)
    row = get_batch(store, batch_id)
    assert (row.status, row.remote_completed, row.refreshed_at) == ("in_progress", 5, NOW)
    assert len(events_of(store, job_id)) == events_before


# -- the enqueued-token limit -----------------------------------------------------------------


def test_token_limit_requeue_counts_refusals_across_submissions(store: Store) -> None:
    """A batch refused for the token limit fails and its requests move to a new queued batch,
    same attempt, with one more refusal counted; the count survives the next submission."""
    job_id, [batch_id] = add_job(
        store, {"status": "in_progress", "requests": 3, "input_file_id": "f_in"}
    )
    refused = get_batch(store, batch_id)
    first = requeue_after_token_limit(store, refused, {"remote_failed": 3}, delay=5.0)
    assert first is not None
    # Already failed: a second refusal of the same row moves nothing.
    assert requeue_after_token_limit(store, refused, {}, delay=5.0) is None
    claimed = claim_queued(store, get_batch(store, first), owner="me")
    assert claimed is not None and claimed.lease_owner == "me"
    submitted = mark_submitted(store, first, {"remote_id": "batch_remote_1", "last_error": None},
                               at=None)  # fmt: skip
    assert submitted is not None and submitted.lease_owner is None
    second = requeue_after_token_limit(store, submitted, {}, delay=10.0)
    assert second is not None
    with store.read() as conn:
        rows = {b.id: b for b in store.job_batches(conn, job_id)}
    assert [rows[i].status for i in (batch_id, first, second)] == ["failed", "failed", "queued"]
    assert [rows[i].token_limit_refusals for i in (batch_id, first, second)] == [0, 1, 2]
    assert rows[batch_id].remote_failed == 3
    assert rows[second].last_error == "token_limit_exceeded x2"
    assert rows[second].not_before == NOW + 10.0
    assert rows[second].input_file_id == "f_in" and rows[second].number == 3
    assert rows[batch_id].collected_at == rows[first].collected_at == NOW
    assert {r.attempt for r in rows.values()} == {1}
    assert [(r.position, r.batch_number, r.attempt) for r in requests_of(store, job_id)] == [
        (i, 3, 1) for i in range(3)
    ]
    queued = [e for e in events_of(store, job_id) if e.type == "batch.queued"]
    assert [(e.batch_id, e.data.get("requeued_from"), e.data.get("retry_in_seconds"))
            for e in queued] == [(batch_id, None, None), (first, batch_id, 5.0),
                                 (second, first, 10.0)]  # fmt: skip
    [failed] = [e for e in events_of(store, job_id, batch_id=batch_id) if e.type == "batch.failed"]
    assert failed.data["reason"] == "token_limit_exceeded"


# -- cancelling -------------------------------------------------------------------------------


def test_cancel_queued_ends_it_and_fails_its_requests(store: Store) -> None:
    job_id, [mine, users, running] = add_job(store, {"requests": 2}, {}, {"status": "in_progress"})
    assert cancel_queued(store, job_id, mine)
    row = get_batch(store, mine)
    assert (row.status, row.collected_at, row.cancelled_at, row.cancel_requested) == (
        "cancelled",
        NOW,
        NOW,
        False,
    )
    [event] = [e for e in events_of(store, job_id, batch_id=mine) if e.type == "batch.cancelled"]
    assert event.data["reason"] == "deadline"
    assert [(r.outcome, r.error_code) for r in requests_of(store, job_id)] == [
        ("failed", "batch_expired"),
        ("failed", "batch_expired"),
        (None, None),
        (None, None),
    ]
    assert not cancel_queued(store, job_id, mine)  # cancelled already
    assert cancel_queued(store, job_id, users, by_user=True)
    assert get_batch(store, users).cancel_requested is True
    assert not cancel_queued(store, job_id, running)
    assert get_batch(store, running).status == "in_progress"
    assert get_job(store, job_id).requests_failed == 3


def test_request_remote_cancel_flags_the_batch(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "in_progress", "remote_id": "r"})
    request_remote_cancel(store, batch_id)
    row = get_batch(store, batch_id)
    assert (row.cancel_requested, row.updated_at, row.status) == (True, NOW, "in_progress")


# -- overdue and stuck ------------------------------------------------------------------------


def test_overdue_and_stuck_are_reported_once_each(store: Store) -> None:
    job_id, [batch_id, both_done, _queued] = add_job(
        store,
        {"status": "validating", "remote_id": "r1"},
        {"status": "in_progress", "overdue_reported_at": 1.0, "stuck_reported_at": 1.0},
        {"status": "queued"},
    )
    assert [r.id for r in open_unreported(store)] == [batch_id]
    row = get_batch(store, batch_id)
    assert report_once(store, row, "overdue", {"expires_at": 5.0})
    assert not report_once(store, row, "overdue", {"expires_at": 5.0})
    assert [r.id for r in open_unreported(store)] == [batch_id]  # not stuck yet
    assert report_once(store, row, "stuck", {"seconds": 99})
    assert open_unreported(store) == []
    assert (get_batch(store, batch_id).overdue_reported_at, get_batch(store, both_done).id) == (
        NOW,
        both_done,
    )
    reported = [e for e in events_of(store, job_id, batch_id=batch_id) if e.type != "batch.queued"]
    assert [(e.type, e.from_status, e.to_status, e.data) for e in reported] == [
        ("batch.overdue", "validating", "validating", {"remote_id": "r1", "expires_at": 5.0}),
        ("batch.stuck", "validating", "validating", {"remote_id": "r1", "seconds": 99}),
    ]


# -- collecting -------------------------------------------------------------------------------


def test_mark_collected_stores_the_paths_and_releases_the_lease(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "completed", "remote_id": "r",
                                    "lease_owner": "d1", "lease_token": "t1",
                                    "lease_until": NOW + 5})  # fmt: skip
    mark_collected(store, batch_id, "/out.jsonl", None)
    row = get_batch(store, batch_id)
    assert (row.collected_at, row.output_path, row.error_path) == (NOW, "/out.jsonl", None)
    assert (row.lease_owner, row.lease_until, row.status) == (None, None, "completed")
