"""The store's connections: kept and reused, shared by threads, closed cleanly.

A SQLite store keeps its connections open between transactions (no open, close and checkpoint
for each one); closing the store closes them all and leaves the database in its one file.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sqlalchemy.engine import make_url

from jobqueue.store import BatchChange, Store
from jobqueue.store.tables import events_table
from tests.store.helpers import NOW, InThread, add_job, count, get_batch


def _wal(store: Store) -> Path:
    database = Path(make_url(store.url).database or "")
    return database.with_name(database.name + "-wal")


def _driver_connection(store: Store) -> object:
    with store.write() as conn:
        return conn.connection.driver_connection


def test_a_thread_reuses_its_connection_between_transactions(store: Store) -> None:
    first = _driver_connection(store)
    assert all(_driver_connection(store) is first for _ in range(5))


def test_sqlite_commits_leave_the_wal_to_its_own_checkpoints(sqlite_url: str) -> None:
    """Closing the last connection of a WAL database checkpoints it; a kept connection does
    not, so a commit costs its own sync and no checkpoint."""
    store = Store(sqlite_url)
    try:
        add_job(store)
        wal = _wal(store)
        assert wal.exists() and wal.stat().st_size > 0
        assert _driver_connection(store) is _driver_connection(store)
    finally:
        store.close()


def test_closing_the_store_leaves_a_clean_database(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    job_id, _ = add_job(store, {}, {})
    with store.read() as conn:  # a reader too, so that more than one connection is open
        assert store.get_job(conn, job_id) is not None
    store.close()
    assert not _wal(store).exists()  # checkpointed into the database file, and removed
    database = make_url(sqlite_url).database or ""
    raw = sqlite3.connect(database)
    try:
        assert raw.execute("SELECT count(*) FROM jobs WHERE id = ?", (job_id,)).fetchone() == (1,)
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        raw.close()


def test_a_closed_store_opens_connections_again_when_used(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "validating"})
    store.close()
    with store.write() as conn:
        store.transition_batches(conn, [BatchChange(batch_id, "validating", "in_progress")])
    assert get_batch(store, batch_id).status == "in_progress"


def test_threads_share_the_store(store: Store) -> None:
    """More threads than the pool keeps, each writing and reading at once: every write lands
    once, with its event, and no thread waits for another's connection to be given back."""
    threads = 16
    _, ids = add_job(store, *({"status": "validating"} for _ in range(threads * 3)))
    events_before = count(store, events_table)
    barrier = threading.Barrier(threads)

    def work(n: int) -> int:
        barrier.wait(timeout=30)
        moved = 0
        for batch_id in ids[n * 3 : n * 3 + 3]:
            with store.write() as conn:
                moved += (
                    store.transition_batch(conn, batch_id, "validating", "in_progress", now=NOW + n)
                    is not None
                )
            with store.read() as conn:
                assert store.get_batch(conn, batch_id).status == "in_progress"
        return moved

    runs = [InThread(lambda n=n: work(n)) for n in range(threads)]
    assert sum(run.result(timeout=120) for run in runs) == len(ids)
    assert count(store, events_table) == events_before + len(ids)
    assert {get_batch(store, b).status for b in ids} == {"in_progress"}


def test_foreign_keys_stay_enforced_on_reused_connections(sqlite_url: str) -> None:
    """The migrations switch foreign keys off on their connection; it goes back to the pool
    enforcing them again."""
    store = Store(sqlite_url)
    try:
        for _ in range(3):
            with store.read() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


def _cache_size(conn: object) -> int:
    return int(conn.execute("PRAGMA cache_size").fetchone()[0])  # type: ignore[attr-defined]


def test_a_bulk_write_has_a_big_page_cache_and_gives_it_back(sqlite_url: str) -> None:
    """A pooled connection keeps SQLite's small cache; a bulk write (intake, collection) gets a
    bigger one for its transaction alone, committed or not, so idle connections hold little."""
    from jobqueue.store.base import SQLITE_BULK_CACHE_KIB, SQLITE_CACHE_KIB

    store = Store(sqlite_url)
    try:
        with store.write() as conn:
            driver = conn.connection.driver_connection
            assert _cache_size(driver) == SQLITE_CACHE_KIB
        with store.write(bulk=True) as conn:
            assert conn.connection.driver_connection is driver
            assert _cache_size(driver) == SQLITE_BULK_CACHE_KIB
        assert _cache_size(driver) == SQLITE_CACHE_KIB
        try:
            with store.write(bulk=True) as conn:
                raise RuntimeError("refused")
        except RuntimeError:
            pass
        assert _cache_size(driver) == SQLITE_CACHE_KIB
    finally:
        store.close()
