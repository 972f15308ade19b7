"""Opening a store, its transactions, events, and the plain reads of jobs and batches."""

from __future__ import annotations

import pytest
from sqlalchemy import Row, select

from jobqueue.store import Store, StoreError
from jobqueue.store.tables import batches_table
from tests.store.helpers import NOW, InThread, add_job, events_of, second_store

# -- the operations under test ----------------------------------------------------------------


def find_job(store: Store, prefix: str) -> Row | None:
    with store.read() as conn:
        return store.find_job(conn, prefix)


def list_jobs(store: Store, status: str | None = None, limit: int | None = None) -> list[Row]:
    with store.read() as conn:
        return store.list_jobs(conn, status, limit)


def job_batches(store: Store, job_id: str) -> list[Row]:
    with store.read() as conn:
        return store.job_batches(conn, job_id)


def events(store: Store, job_id: str | None = None, **kwargs: object) -> list[Row]:
    with store.read() as conn:
        return store.events(conn, job_id, **kwargs)  # type: ignore[arg-type]


def add_event(store: Store, type_: str, **kwargs: object) -> str:
    with store.write() as conn:
        return store.add_event(conn, type_, **kwargs)  # type: ignore[arg-type]


# -- opening ----------------------------------------------------------------------------------


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


def test_other_databases_are_refused() -> None:
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        Store("mysql://localhost/x", migrate=False)


def test_a_reader_does_not_hold_writers_back(store: Store, db_url: str) -> None:
    job_id, _ = add_job(store)
    other = second_store(db_url)
    try:
        with store.read() as conn:
            assert store.get_job(conn, job_id) is not None

            def write() -> str:
                with other.write() as conn2:
                    return other.add_event(conn2, "job.note", job_id=job_id)

            written = InThread(write).result(timeout=30)
    finally:
        other.close()
    assert events_of(store, job_id)[-1].id == written


# -- events -----------------------------------------------------------------------------------


def test_add_event_writes_every_field(store: Store) -> None:
    event_id = add_event(
        store, "batch.overdue", job_id="job_a", batch_id="batch_b", from_status="in_progress",
        to_status="in_progress", data={"expires_at": 5.0}, now=NOW,
    )  # fmt: skip
    [event] = events(store, "job_a")
    assert event.id == event_id and event_id.startswith("evt_")
    assert (event.type, event.job_id, event.batch_id, event.created_at) == (
        "batch.overdue",
        "job_a",
        "batch_b",
        NOW,
    )
    assert (event.from_status, event.to_status, event.data) == (
        "in_progress",
        "in_progress",
        {"expires_at": 5.0},
    )
    bare = add_event(store, "job.note", job_id=None)
    assert [e.id for e in events(store) if e.job_id is None] == [bare]
    assert events(store)[-1].data == {}


def test_events_filter_by_job_seq_type_and_limit(store: Store) -> None:
    job_a, _ = add_job(store)
    job_b, _ = add_job(store)
    all_events = events(store)
    assert [e.seq for e in all_events] == sorted(e.seq for e in all_events)
    assert {e.job_id for e in events(store, job_a)} == {job_a}
    assert [e.type for e in events(store, job_b)] == ["job.queued", "batch.queued"]
    after = all_events[1].seq
    assert [e.seq for e in events(store, after_seq=after)] == [e.seq for e in all_events[2:]]
    assert [e.job_id for e in events(store, types=["job.queued"])] == [job_a, job_b]
    assert len(events(store, limit=3)) == 3


# -- jobs and batches -------------------------------------------------------------------------


def test_get_of_a_missing_row_is_none(store: Store) -> None:
    with store.read() as conn:
        assert store.get_job(conn, "job_missing") is None
        assert store.get_batch(conn, "batch_missing") is None


def test_find_job_by_unique_prefix(store: Store) -> None:
    job_id, _ = add_job(store)
    assert find_job(store, job_id).id == job_id
    assert find_job(store, job_id[:-4]).id == job_id
    assert find_job(store, "job_") is None  # too short to be a prefix
    assert find_job(store, "nope_nope") is None
    assert find_job(store, "job_%%%%") is None  # LIKE wildcards are plain characters
    add_job(store)  # ids begin with the time: a short prefix now names both
    assert find_job(store, job_id[:6]) is None


def test_list_jobs_newest_first(store: Store) -> None:
    old, _ = add_job(store, now=NOW - 10)
    new, _ = add_job(store, now=NOW)
    running, _ = add_job(store, {"status": "in_progress"}, now=NOW - 5)
    assert [j.id for j in list_jobs(store)] == [new, running, old]
    assert [j.id for j in list_jobs(store, status="running")] == [running]
    assert [j.id for j in list_jobs(store, limit=1)] == [new]


def test_batches_of_a_job_in_order(store: Store) -> None:
    job_id, [s1, s0, retry] = add_job(
        store, {"shard_index": 1}, {"shard_index": 0}, {"shard_index": 0, "attempt": 2}
    )
    other, [other_batch] = add_job(store)
    assert [b.id for b in job_batches(store, job_id)] == [s0, s1, retry]
    assert [b.id for b in job_batches(store, other)] == [other_batch]
    assert job_batches(store, "job_missing") == []
    with store.read() as conn:
        assert set(conn.execute(select(batches_table.c.status)).scalars().all()) == {"queued"}
