"""The store conformance suite: the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
import time

import orjson
import pytest
from sqlalchemy import func, select

from jobqueue.store import Store, StoreError, batches
from jobqueue.store.tables import batches_table, events_table, requests_table
from tests.factories import insert_job_with_batch, insert_requests


def _count(store: Store, table, *where) -> int:
    with store.read() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    store.close()


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(StoreError, match="in-memory"):
        Store("sqlite://")


def test_compare_and_set_race_between_threads(store: Store) -> None:
    """Eight threads apply the same edge at once: exactly one wins, exactly one event exists."""
    for _ in range(5):
        _, batch_id = insert_job_with_batch(store, "in_progress")
        barrier = threading.Barrier(8)
        wins: list[bool] = []

        def apply(
            batch_id: str = batch_id, barrier: threading.Barrier = barrier, wins: list = wins
        ) -> None:
            barrier.wait()
            with store.write() as conn:
                row = store.transition_batch(conn, batch_id, "in_progress", "completed")
            wins.append(row is not None)

        threads = [threading.Thread(target=apply) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]
        assert _count(store, events_table, events_table.c.batch_id == batch_id,
                      events_table.c.type == "batch.completed") == 1  # fmt: skip


def _apply_in_process(url: str, batch_id: str, barrier, results) -> None:
    store = Store(url)
    barrier.wait()
    with store.write() as conn:
        row = store.transition_batch(conn, batch_id, "validating", "in_progress")
    results.put(row is not None)
    store.close()


def test_compare_and_set_race_between_processes(store: Store, db_url: str) -> None:
    _, batch_id = insert_job_with_batch(store, "validating")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_apply_in_process, args=(db_url, batch_id, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == [False, False, False, True]
    assert _count(store, events_table, events_table.c.batch_id == batch_id,
                  events_table.c.type == "batch.in_progress") == 1  # fmt: skip


def test_rolled_back_transaction_leaves_no_change_and_no_event(store: Store) -> None:
    _, batch_id = insert_job_with_batch(store, "validating")
    events_before = _count(store, events_table)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.write() as conn:
        assert store.transition_batch(conn, batch_id, "validating", "in_progress") is not None
        raise Boom
    with store.read() as conn:
        assert store.get_batch(conn, batch_id).status == "validating"
    assert _count(store, events_table) == events_before


def test_event_payload_fields(store: Store) -> None:
    job_id, batch_id = insert_job_with_batch(store, "validating")
    with store.write() as conn:
        store.transition_batch(
            conn,
            batch_id,
            "validating",
            "in_progress",
            values={"remote_id": "batch_abc", "remote_total": 3, "remote_completed": 1},
        )
    with store.read() as conn:
        event = store.events(conn, job_id)[-1]
    assert event.type == "batch.in_progress"
    assert event.id.startswith("evt_")
    assert (event.job_id, event.batch_id, event.from_status, event.to_status) == (
        job_id,
        batch_id,
        "validating",
        "in_progress",
    )
    assert event.data["remote_id"] == "batch_abc"
    assert event.data["request_counts"] == {"total": 3, "completed": 1, "failed": 0}


def _requests(store: Store, job_number: int) -> list[tuple[int, str, int, int]]:
    r = requests_table
    with store.read() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                select(r.c.position, r.c.custom_id, r.c.batch_number, r.c.attempt)
                .where(r.c.job_number == job_number)
                .order_by(r.c.position)
            )
        ]


def test_bulk_request_insert_from_json(store: Store) -> None:
    """Contiguous ids (the database numbers them from the first position) and explicit
    (position, custom_id) pairs, ids with quotes, backslashes and non-ASCII kept exactly; a
    position taken twice fails the transaction and leaves nothing of it."""
    job_id, _ = insert_job_with_batch(store, "queued", requests=0)
    with store.read() as conn:
        number = store.get_job(conn, job_id).number
    odd = ['q"uote', "back\\slash", "é ünï ✓", "tab\tnew\nline"]
    ids = [f"id-{i}" for i in range(45_000)] + odd
    with store.write() as conn:
        store.insert_requests_json(conn, number, 1, orjson.dumps(ids).decode(), first_position=10)
        insert_requests(store, conn, number, 2, [(3, "pair-3"), (0, "pair-0")])
    rows = _requests(store, number)
    assert len(rows) == len(ids) + 2
    assert rows[0] == (0, "pair-0", 2, 1) and rows[1] == (3, "pair-3", 2, 1)
    assert rows[2] == (10, "id-0", 1, 1)
    assert [r[1] for r in rows[-4:]] == odd and rows[-1][0] == 10 + len(ids) - 1
    with pytest.raises(Exception), store.write() as conn:  # noqa: B017 - driver-specific class
        insert_requests(store, conn, number, 3, [(5, "new"), (10, "taken")])
    assert len(_requests(store, number)) == len(ids) + 2


def test_job_and_batch_numbers(store: Store) -> None:
    first, _ = insert_job_with_batch(store)
    second, _ = insert_job_with_batch(store)
    with store.write() as conn:
        a, b = store.get_job(conn, first).number, store.get_job(conn, second).number
        assert b > a
        assert store.next_batch_number(conn, first) == 2


def test_find_job_by_unique_prefix(store: Store) -> None:
    job_id, _ = insert_job_with_batch(store)
    with store.read() as conn:
        assert store.find_job(conn, job_id).id == job_id
        assert store.find_job(conn, job_id[:-4]).id == job_id
        assert store.find_job(conn, "job_") is None  # too short to be a prefix
        assert store.find_job(conn, "nope_nope") is None


def test_batches_of_a_job_in_order(store: Store) -> None:
    job_id, batch_id = insert_job_with_batch(store)
    with store.read() as conn:
        assert [b.id for b in store.job_batches(conn, job_id)] == [batch_id]
        assert conn.execute(select(batches_table.c.status)).scalars().all() == ["queued"]


def test_token_limit_requeue_counts_refusals_across_submissions(store: Store) -> None:
    """A batch refused for the token limit fails and its requests move to a new queued batch,
    same attempt, with one more refusal counted; the count survives the next submission."""
    job_id, batch_id = insert_job_with_batch(store, "in_progress")
    now = time.time()
    with store.write() as conn:
        refused = store.get_batch(conn, batch_id)
        first = batches.requeue_after_token_limit(store, conn, refused, {}, delay=5.0, now=now)
        assert first is not None
        # Already failed: a second refusal of the same row moves nothing.
        again = batches.requeue_after_token_limit(store, conn, refused, {}, delay=5.0, now=now)
        assert again is None
        claimed = batches.claim_queued(
            store, conn, store.get_batch(conn, first), owner="me", now=now, lease_seconds=60
        )
        assert claimed is not None and claimed.lease_owner == "me"
        submitted = batches.mark_submitted(
            store, conn, batches.Lease.of(claimed),
            {"remote_id": "batch_remote_1", "last_error": None}, at=None, now=now,
        )  # fmt: skip
        assert submitted is not None and submitted.lease_owner is None
        second = batches.requeue_after_token_limit(store, conn, submitted, {}, delay=10.0, now=now)
        assert second is not None
        rows = {b.id: b for b in store.job_batches(conn, job_id)}
        number = store.get_job(conn, job_id).number
    assert [rows[i].status for i in (batch_id, first, second)] == ["failed", "failed", "queued"]
    assert [rows[i].token_limit_refusals for i in (batch_id, first, second)] == [0, 1, 2]
    assert rows[second].last_error == "token_limit_exceeded x2"
    assert rows[second].not_before == pytest.approx(now + 10.0)
    assert rows[batch_id].collected_at is not None and rows[first].collected_at is not None
    assert {r.attempt for r in rows.values()} == {1}
    assert _requests(store, number) == [(i, f"req-{i}", rows[second].number, 1) for i in range(3)]
    with store.read() as conn:
        queued = [e for e in store.events(conn, job_id) if e.type == "batch.queued"]
    assert [(e.batch_id, e.data.get("requeued_from"), e.data.get("retry_in_seconds"))
            for e in queued] == [(batch_id, None, None), (first, batch_id, 5.0),
                                 (second, first, 10.0)]  # fmt: skip
