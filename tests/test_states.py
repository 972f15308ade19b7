"""The state machine, exhaustively: every pair of statuses, legal edges apply, others refused."""

from __future__ import annotations

import itertools
import threading

import pytest
from sqlalchemy import func, select

from jobqueue.core.states import (
    BATCH_MACHINE,
    BATCH_TERMINAL,
    JOB_MACHINE,
    BatchStatus,
    IllegalTransition,
    JobStatus,
)
from jobqueue.store.tables import batches_table, events_table, jobs_table
from tests.factories import insert_job_with_batch

B = BatchStatus
# DESIGN.md's edges, written out again independently of states.py so a typo there cannot hide.
DESIGN_BATCH_EDGES = {
    ("queued", "submitting"), ("queued", "cancelled"), ("queued", "failed"),
    ("submitting", "validating"), ("submitting", "queued"), ("submitting", "failed"),
    *{("validating", d) for d in ("in_progress", "finalizing", "completed", "failed", "expired",
                                  "cancelling", "cancelled")},
    *{("in_progress", d) for d in ("finalizing", "completed", "failed", "expired", "cancelling",
                                   "cancelled")},
    ("finalizing", "completed"), ("finalizing", "expired"), ("finalizing", "failed"),
    ("cancelling", "cancelled"), ("cancelling", "completed"), ("cancelling", "expired"),
    ("cancelling", "failed"),
}  # fmt: skip
ALL_BATCH_PAIRS = list(itertools.product([s.value for s in B], repeat=2))


def test_ten_batch_statuses_and_six_job_statuses() -> None:
    assert sorted(BATCH_MACHINE.states) == sorted(
        ["queued", "submitting", "validating", "in_progress", "finalizing", "completed",
         "failed", "expired", "cancelling", "cancelled"]
    )  # fmt: skip
    assert sorted(JOB_MACHINE.states) == sorted(
        ["queued", "running", "completed", "failed", "cancelled", "expired"]
    )
    assert {s.value for s in BATCH_TERMINAL} == {"completed", "failed", "expired", "cancelled"}


@pytest.mark.parametrize(("source", "dest"), ALL_BATCH_PAIRS)
def test_machine_decides_every_pair(source: str, dest: str) -> None:
    legal = (source, dest) in DESIGN_BATCH_EDGES
    assert BATCH_MACHINE.is_legal(source, dest) is legal
    if legal:
        BATCH_MACHINE.check(source, dest)
    else:
        before = BATCH_MACHINE.refused().get((source, dest), 0)
        with pytest.raises(IllegalTransition, match=f"{source} -> {dest}"):
            BATCH_MACHINE.check(source, dest)
        assert BATCH_MACHINE.refused()[(source, dest)] == before + 1


def test_terminal_statuses_have_no_way_out() -> None:
    for status in BATCH_TERMINAL:
        assert BATCH_MACHINE.is_terminal(status)
        assert not any(BATCH_MACHINE.is_legal(status, d) for d in B)
    for status in ("completed", "failed", "cancelled", "expired"):
        assert not any(JOB_MACHINE.is_legal(status, d) for d in JobStatus)


def test_never_backwards_for_remote_statuses() -> None:
    order = ["validating", "in_progress", "finalizing", "completed"]
    for later, earlier in itertools.combinations(reversed(order), 2):
        assert not BATCH_MACHINE.is_legal(later, earlier)


def test_machine_is_safe_from_many_threads() -> None:
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(200):
                for source, dest in ALL_BATCH_PAIRS:
                    assert BATCH_MACHINE.is_legal(source, dest) == (
                        (source, dest) in DESIGN_BATCH_EDGES
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_every_pair_through_the_store(store) -> None:
    """Through the database: legal edges apply with one event, illegal ones write nothing."""
    for source, dest in ALL_BATCH_PAIRS:
        _, batch_id = insert_job_with_batch(store, source)
        with store.read() as conn:
            events_before = conn.execute(
                select(func.count()).select_from(events_table)
            ).scalar_one()
        legal = (source, dest) in DESIGN_BATCH_EDGES
        if legal:
            with store.write() as conn:
                row = store.transition_batch(conn, batch_id, source, dest, at=1234.5)
            assert row is not None and row.status == dest
        else:
            with pytest.raises(IllegalTransition), store.write() as conn:
                store.transition_batch(conn, batch_id, source, dest)
        with store.read() as conn:
            status = conn.execute(
                select(batches_table.c.status).where(batches_table.c.id == batch_id)
            ).scalar_one()
            new_events = conn.execute(
                select(events_table).where(events_table.c.seq > events_before)
            ).all()
        if legal:
            assert status == dest
            assert [(e.type, e.from_status, e.to_status, e.batch_id) for e in new_events] == [
                (f"batch.{dest}", source, dest, batch_id)
            ]
        else:
            assert status == source, f"{source} -> {dest} was applied"
            assert new_events == []


def test_transition_stamps_the_remote_time_when_given(store) -> None:
    _, batch_id = insert_job_with_batch(store, "validating")
    with store.write() as conn:
        row = store.transition_batch(conn, batch_id, "validating", "in_progress", at=1700000000.0)
    assert row.in_progress_at == 1700000000.0
    with store.write() as conn:
        row = store.transition_batch(conn, batch_id, "in_progress", "completed")
    assert row.completed_at is not None and row.completed_at > 1700000000.0


def test_stale_source_is_a_lost_race_not_an_error(store) -> None:
    _, batch_id = insert_job_with_batch(store, "in_progress")
    with store.write() as conn:
        assert store.transition_batch(conn, batch_id, "in_progress", "completed") is not None
    # A late observation that still believes the batch validating: refused by the compare-and-set.
    with store.write() as conn:
        assert store.transition_batch(conn, batch_id, "validating", "in_progress") is None
    with store.read() as conn:
        assert store.get_batch(conn, batch_id).status == "completed"


def test_job_transitions_are_compare_and_set_with_events(store) -> None:
    job_id, _ = insert_job_with_batch(store, "queued")
    with store.write() as conn:
        assert store.transition_job(conn, job_id, "queued", "running") is not None
        assert store.transition_job(conn, job_id, "queued", "running") is None
    with pytest.raises(IllegalTransition), store.write() as conn:
        store.transition_job(conn, job_id, "running", "queued")
    with store.write() as conn:
        row = store.transition_job(conn, job_id, "running", "completed")
    assert row.finished_at is not None and row.started_at is not None
    with store.read() as conn:
        types = [e.type for e in store.events(conn, job_id) if e.type.startswith("job.")]
        assert (
            conn.execute(select(jobs_table.c.status).where(jobs_table.c.id == job_id)).scalar_one()
            == "completed"
        )
    assert types == ["job.queued", "job.running", "job.completed"]
