"""The store conformance suite: the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
from sqlalchemy import func, select

from jobqueue.models import batches_table, events_table, requests_table
from jobqueue.store import Store, StoreError
from tests.factories import insert_job_with_batch


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


def test_bulk_request_insert_and_unique_custom_ids(store: Store) -> None:
    job_id, batch_id = insert_job_with_batch(store, "queued", requests=0)
    rows = ((job_id, i, f"id-{i}", batch_id, 1) for i in range(45_000))
    with store.write() as conn:
        assert store.insert_requests(conn, rows) == 45_000
    assert _count(store, requests_table, requests_table.c.job_id == job_id) == 45_000
    with pytest.raises(Exception), store.write() as conn:  # noqa: B017 - driver-specific class
        store.insert_requests(conn, [(job_id, 50_000, "id-7", batch_id, 1)])
    assert _count(store, requests_table, requests_table.c.job_id == job_id) == 45_000


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
