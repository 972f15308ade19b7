"""Compare-and-set transitions of batches and jobs.

Every applied edge is `UPDATE … WHERE id = :id AND status = :from` plus exactly one outbox event
in the same transaction; an illegal edge is refused before anything is written; a stale source
changes nothing; of two writers applying one edge at once exactly one wins.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Connection, Row

from jobqueue.core.states import (
    BATCH_EDGES,
    BATCH_TIME_COLUMN,
    JOB_EDGES,
    BatchStatus,
    IllegalTransition,
    JobStatus,
)
from jobqueue.store import Store
from jobqueue.store.tables import events_table
from tests.store.helpers import (
    NOW,
    InThread,
    add_job,
    count,
    events_of,
    get_batch,
    get_job,
    second_store,
    wait_until_blocked,
)

# -- the operations under test ----------------------------------------------------------------


def cas_batch(
    store: Store, conn: Connection, batch_id: str, source: str, dest: str, **kwargs: Any
) -> Row | None:
    return store.transition_batch(conn, batch_id, source, dest, **kwargs)


def cas_job(
    store: Store, conn: Connection, job_id: str, source: str, dest: str, **kwargs: Any
) -> Row | None:
    return store.transition_job(conn, job_id, source, dest, **kwargs)


def read_batch(store: Store, conn: Connection, batch_id: str) -> Row | None:
    return store.get_batch(conn, batch_id)


def read_job(store: Store, conn: Connection, job_id: str) -> Row | None:
    return store.get_job(conn, job_id)


# -- edges ------------------------------------------------------------------------------------

BATCH_LEGAL = [(s.value, d.value) for s, dests in BATCH_EDGES.items() for d in dests]
BATCH_ILLEGAL = [
    (s.value, d.value)
    for s, d in itertools.product(BatchStatus, BatchStatus)
    if (s.value, d.value) not in BATCH_LEGAL
]
JOB_LEGAL = [(s.value, d.value) for s, dests in JOB_EDGES.items() for d in dests]
JOB_ILLEGAL = [
    (s.value, d.value)
    for s, d in itertools.product(JobStatus, JobStatus)
    if (s.value, d.value) not in JOB_LEGAL
]
_JOB_TERMINAL = {"completed", "failed", "cancelled", "expired"}


def _unchanged(before: Row, after: Row) -> None:
    assert after._asdict() == before._asdict()


# -- batches ----------------------------------------------------------------------------------


def test_every_legal_batch_edge_applies_with_one_event(store: Store) -> None:
    job_id, batch_ids = add_job(
        store, *({"status": source, "requests": 2} for source, _ in BATCH_LEGAL)
    )
    at = NOW + 1
    for (source, dest), batch_id in zip(BATCH_LEGAL, batch_ids, strict=True):
        with store.write() as conn:
            row = cas_batch(store, conn, batch_id, source, dest, now=at)
        assert row is not None, (source, dest)
        assert (row.id, row.status, row.updated_at) == (batch_id, dest, at)
        column = BATCH_TIME_COLUMN.get(BatchStatus(dest))
        if column:
            assert getattr(row, column) == at
        assert get_batch(store, batch_id)._asdict() == row._asdict()
        [queued, event] = events_of(store, job_id, batch_id=batch_id)
        assert queued.type == "batch.queued"
        assert event.type == f"batch.{dest}" and event.id.startswith("evt_")
        assert (event.job_id, event.from_status, event.to_status) == (job_id, source, dest)
        assert event.created_at == at
        assert event.data == {
            "attempt": 1,
            "shard_index": row.shard_index,
            "model": "gpt-4o-mini",
            "remote_id": None,
            "input_file_id": None,
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": 2, "completed": 0, "failed": 0},
        }


def test_a_batch_edge_applies_only_from_its_source(store: Store) -> None:
    """A stale source (a late poll, a replayed webhook) changes nothing and writes no event:
    each batch, in each status, is offered every legal edge from another status."""
    statuses = [s.value for s in BatchStatus]
    _job_id, batch_ids = add_job(store, *({"status": s} for s in statuses))
    before = {b: get_batch(store, b) for b in batch_ids}
    events_before = count(store, events_table)
    with store.write() as conn:
        for status, batch_id in zip(statuses, batch_ids, strict=True):
            for source, dest in BATCH_LEGAL:
                if source != status:
                    assert cas_batch(store, conn, batch_id, source, dest, now=NOW + 5) is None
    for batch_id in batch_ids:
        _unchanged(before[batch_id], get_batch(store, batch_id))
    assert count(store, events_table) == events_before


@pytest.mark.parametrize("kind", ["batch", "job"])
def test_illegal_edges_are_refused_before_any_write(store: Store, kind: str) -> None:
    """The row is in the edge's source, so the compare-and-set would match: the refusal comes
    first. Read inside the refusing transaction, the row is still untouched."""
    illegal = BATCH_ILLEGAL if kind == "batch" else JOB_ILLEGAL
    sources = sorted({source for source, _ in illegal})
    if kind == "batch":
        _, ids = add_job(store, *({"status": s} for s in sources))
    else:
        ids = [add_job(store, status=s)[0] for s in sources]
    row_of = dict(zip(sources, ids, strict=True))
    events_before = count(store, events_table)
    cas, read = (cas_batch, read_batch) if kind == "batch" else (cas_job, read_job)
    for source, dest in illegal:
        with store.write() as conn:
            before = read(store, conn, row_of[source])
            with pytest.raises(IllegalTransition) as refused:
                cas(store, conn, row_of[source], source, dest, now=NOW + 5)
            assert (refused.value.kind, refused.value.source, refused.value.dest) == (
                kind,
                source,
                dest,
            )
            _unchanged(before, read(store, conn, row_of[source]))
    assert count(store, events_table) == events_before


def test_a_rolled_back_transaction_leaves_neither_change_nor_event(store: Store) -> None:
    job_id, [batch_id] = add_job(store, {"status": "validating"})
    events_before = count(store, events_table)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.write() as conn:
        assert cas_batch(store, conn, batch_id, "validating", "in_progress") is not None
        assert cas_job(store, conn, job_id, "running", "completed") is not None
        raise Boom
    assert get_batch(store, batch_id).status == "validating"
    assert get_batch(store, batch_id).in_progress_at is None
    assert get_job(store, job_id).status == "running"
    assert count(store, events_table) == events_before


def test_event_payload_carries_the_new_row_and_the_callers_data(store: Store) -> None:
    job_id, [batch_id] = add_job(store, {"status": "validating", "requests": 3})
    with store.write() as conn:
        cas_batch(
            store,
            conn,
            batch_id,
            "validating",
            "in_progress",
            values={"remote_id": "batch_abc", "remote_total": 3, "remote_completed": 1},
        )
        cas_batch(
            store,
            conn,
            batch_id,
            "in_progress",
            "failed",
            values={"remote_failed": 2, "last_error": "boom", "output_file_id": "file_o"},
            data={"reason": "test", "model": "overridden"},
        )
    running, failed = events_of(store, job_id, batch_id=batch_id)[1:]
    assert running.type == "batch.in_progress"
    assert (running.job_id, running.batch_id, running.from_status, running.to_status) == (
        job_id,
        batch_id,
        "validating",
        "in_progress",
    )
    assert running.data["remote_id"] == "batch_abc"
    assert running.data["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    assert "error" not in running.data
    assert failed.data["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert failed.data["error"] == "boom" and failed.data["output_file_id"] == "file_o"
    assert failed.data["reason"] == "test" and failed.data["model"] == "overridden"


def test_time_columns_take_the_remote_time_else_the_local_clock(store: Store) -> None:
    _, [a, b, c] = add_job(store, {"status": "validating"}, {"status": "queued"}, {})
    remote_time, local = NOW - 50, NOW + 10
    with store.write() as conn:
        # The remote's own time for the change stamps its column; updated_at is ours.
        row = cas_batch(store, conn, a, "validating", "in_progress", at=remote_time, now=local)
        assert (row.in_progress_at, row.updated_at) == (remote_time, local)
        # No remote time: the local clock.
        row = cas_batch(store, conn, a, "in_progress", "completed", now=local + 1)
        assert (row.in_progress_at, row.completed_at) == (remote_time, local + 1)
        # A value for the column itself wins over both.
        row = cas_batch(
            store, conn, b, "queued", "submitting", values={"submitting_at": 7.0}, at=8.0, now=9.0
        )
        assert row.submitting_at == 7.0
        # Entering a status again (requeued, then claimed again) stamps it again.
        cas_batch(store, conn, b, "submitting", "queued", now=10.0)
        row = cas_batch(store, conn, b, "queued", "submitting", now=11.0)
        assert row.submitting_at == 11.0 and row.validating_at is None
    before = time.time()
    with store.write() as conn:
        row = cas_batch(store, conn, c, "queued", "submitting")
    after = time.time()
    assert before <= row.submitting_at == row.updated_at <= after


# -- jobs -------------------------------------------------------------------------------------


def test_every_legal_job_edge_applies_with_one_event(store: Store) -> None:
    for source, dest in JOB_LEGAL:
        job_id, _ = add_job(store, {"requests": 4}, status=source, error="why")
        with store.write() as conn:
            row = cas_job(store, conn, job_id, source, dest, now=NOW + 1)
        assert row is not None and (row.status, row.updated_at) == (dest, NOW + 1)
        assert row.started_at == (NOW + 1 if dest == "running" else None)
        assert row.finished_at == (NOW + 1 if dest in _JOB_TERMINAL else None)
        event = events_of(store, job_id)[-1]
        assert event.type == f"job.{dest}" and event.batch_id is None
        assert (event.from_status, event.to_status, event.created_at) == (source, dest, NOW + 1)
        assert event.data == {
            "request_counts": {"total": 4, "completed": 0, "failed": 0},
            "error": "why",
        }
        assert len(events_of(store, job_id)) == 3  # job.queued, batch.queued, this one


def test_a_job_edge_applies_only_from_its_source(store: Store) -> None:
    job_id, _ = add_job(store, status="running")
    before = get_job(store, job_id)
    with store.write() as conn:
        for source, dest in JOB_LEGAL:
            if source != "running":
                assert cas_job(store, conn, job_id, source, dest) is None
    _unchanged(before, get_job(store, job_id))
    assert [e.type for e in events_of(store, job_id)] == ["job.queued", "batch.queued"]


def test_job_values_and_counts_reach_the_row_and_the_event(store: Store) -> None:
    job_id, _ = add_job(store, {"requests": 5}, status="running")
    with store.write() as conn:
        row = cas_job(
            store,
            conn,
            job_id,
            "running",
            "failed",
            values={"requests_succeeded": 2, "requests_failed": 3, "error": "bad input",
                    "finished_at": 5.0},
            data={"extra": True},
            now=NOW,
        )  # fmt: skip
    assert (row.finished_at, row.error) == (5.0, "bad input")
    event = events_of(store, job_id)[-1]
    assert event.data == {
        "request_counts": {"total": 5, "completed": 2, "failed": 3},
        "error": "bad input",
        "extra": True,
    }


# -- two writers at once ----------------------------------------------------------------------


def test_compare_and_set_race_between_threads(store: Store) -> None:
    """Eight threads apply the same edge at once: exactly one wins, exactly one event exists."""
    for _ in range(5):
        _, [batch_id] = add_job(store, {"status": "in_progress"})
        barrier = threading.Barrier(8)
        wins: list[bool] = []

        def apply(
            batch_id: str = batch_id, barrier: threading.Barrier = barrier, wins: list = wins
        ) -> None:
            barrier.wait()
            with store.write() as conn:
                row = cas_batch(store, conn, batch_id, "in_progress", "completed")
            wins.append(row is not None)

        threads = [threading.Thread(target=apply) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]
        assert count(store, events_table, events_table.c.batch_id == batch_id,
                     events_table.c.type == "batch.completed") == 1  # fmt: skip


def _apply_in_process(url: str, batch_id: str, barrier: Any, results: Any) -> None:
    store = Store(url)
    barrier.wait()
    with store.write() as conn:
        row = cas_batch(store, conn, batch_id, "validating", "in_progress")
    results.put(row is not None)
    store.close()


def test_compare_and_set_race_between_processes(store: Store, db_url: str) -> None:
    _, [batch_id] = add_job(store, {"status": "validating"})
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
    assert count(store, events_table, events_table.c.batch_id == batch_id,
                 events_table.c.type == "batch.in_progress") == 1  # fmt: skip


def test_a_second_connection_waits_for_the_first_on_the_same_edge(
    store: Store, db_url: str
) -> None:
    """Two daemons (two stores, two connections) apply one edge. The second waits on the
    first's lock (on PostgreSQL, seen waiting on it); once the first commits, the second finds
    the row moved and applies nothing; if the first rolls back, the second applies it."""
    for kind, first_commits in itertools.product(["batch", "job"], [True, False]):
        job_id, [batch_id] = add_job(store, {"status": "in_progress"})
        if kind == "batch":
            row_id, source, dest, cas = batch_id, "in_progress", "completed", cas_batch
        else:
            row_id, source, dest, cas = job_id, "running", "completed", cas_job
        won = _race_one_edge(store, db_url, row_id, source, dest, cas, first_commits)
        events = [e for e in events_of(store, job_id) if e.type == f"{kind}.{dest}"]
        if first_commits:
            assert won is None, kind
            assert [e.created_at for e in events] == [NOW]
        else:
            assert won is not None and won.status == dest, kind
            assert [e.created_at for e in events] == [NOW + 1]


def _race_one_edge(
    store: Store,
    db_url: str,
    row_id: str,
    source: str,
    dest: str,
    cas: Any,
    first_commits: bool,
) -> Row | None:
    """The first applies the edge and holds its transaction until the second waits on it,
    then commits or rolls back; returns what the second's attempt returned."""
    other = second_store(db_url)

    class Abandon(Exception):
        pass

    def second() -> Row | None:
        with other.write() as conn2:
            return cas(other, conn2, row_id, source, dest, now=NOW + 1)

    try:
        try:
            with store.write() as conn:
                assert cas(store, conn, row_id, source, dest, now=NOW) is not None
                waiting = InThread(second)
                wait_until_blocked(other, waiting.started)
                assert not waiting.done(0.05)
                if not first_commits:
                    raise Abandon
        except Abandon:
            pass
        return waiting.result()
    finally:
        other.close()


def test_the_row_a_transition_returns_is_the_row_as_read(store: Store) -> None:
    """The new row comes back with every column as a read gives it (SQLite builds it from the
    driver's row: JSON decoded, booleans as booleans), whatever the values were written as."""
    _, [batch_id] = add_job(store, {"status": "in_progress", "requests": 2})
    usage = {"input_tokens": 12, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 0}}
    errors = [{"code": "x", "line": 1, "message": "é"}]
    with store.write() as conn:
        row = cas_batch(
            store, conn, batch_id, "in_progress", "finalizing",
            values={"usage": usage, "errors": errors, "cancel_requested": True,
                    "remote_total": 2, "lease_until": 1.5},
        )  # fmt: skip
    assert row is not None
    read = get_batch(store, batch_id)
    assert tuple(row) == tuple(read)
    assert row.usage == usage and row.errors == errors and row.cancel_requested is True
    assert row.status == "finalizing" and row.finalizing_at is not None
    with store.write() as conn:
        row = cas_batch(
            store, conn, batch_id, "finalizing", "completed",
            values={"usage": None, "errors": None, "cancel_requested": False},
        )  # fmt: skip
    assert row is not None and tuple(row) == tuple(get_batch(store, batch_id))
    assert row.usage is None and row.errors is None and row.cancel_requested is False
