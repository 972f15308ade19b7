"""Intake: a job with its queued batches and their events, job and batch numbers, and the
request index written in bulk from JSON (custom ids at consecutive positions, or [position,
custom_id] pairs), all in the intake's one transaction."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, Row, select

from jobqueue.core.ids import new_id
from jobqueue.files.inputs import Limits, Shard, prepare_input
from jobqueue.store import Store, batches
from jobqueue.store.intake import RequestIndexLoader, batch_number_for
from jobqueue.store.tables import batches_table, events_table, jobs_table, requests_table
from tests.factories import chat_line, write_jsonl
from tests.store.helpers import (
    NOW,
    InThread,
    add_job,
    batch_values,
    count,
    events_of,
    get_job,
    job_values,
    requests_of,
    second_store,
    wait_until_blocked,
)

# -- the operations under test ----------------------------------------------------------------


def insert_job(
    store: Store,
    conn: Connection,
    job: Mapping[str, Any],
    batches: list[dict[str, Any]],
    sampled: tuple[bool, ...] = (),
) -> None:
    store.insert_job(conn, job, batches, sampled=sampled)


def next_job_number(store: Store, conn: Connection) -> int:
    return store.next_job_number(conn)


def next_batch_number(store: Store, conn: Connection, job_id: str) -> int:
    return store.next_batch_number(conn, job_id)


def insert_queued_batch(store: Store, conn: Connection, row: Mapping[str, Any]) -> None:
    """A batch added to a running job (a retry, a requeue)."""
    batches.insert_queued_batches(conn, [row], now=NOW)


def insert_ids(
    store: Store, conn: Connection, job_number: int, batch_number: int, ids: list[str], first: int
) -> None:
    """Custom ids at consecutive positions from `first`."""
    store.insert_requests_json(conn, job_number, batch_number, orjson.dumps(ids).decode(), first)


def insert_pairs(
    store: Store,
    conn: Connection,
    job_number: int,
    batch_number: int,
    pairs: list[tuple[int, str]],
) -> None:
    """[position, custom_id] pairs."""
    store.insert_requests_json(conn, job_number, batch_number, orjson.dumps(pairs).decode())


def index_loader(store: Store, conn: Connection, job_number: int) -> RequestIndexLoader:
    return RequestIndexLoader(store, conn, job_number)


# -- helpers ----------------------------------------------------------------------------------


def _index(store: Store, job_number: int) -> list[tuple[int, str, int, int]]:
    """(position, custom_id, batch_number, attempt) of a job's requests, by position."""
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


def _new_job(store: Store, conn: Connection, requests: int = 0, **values: Any) -> dict[str, Any]:
    job = job_values(new_id("job"), requests=requests, **values)
    job["number"] = next_job_number(store, conn)
    return job


# -- a job and its batches --------------------------------------------------------------------


def test_insert_job_writes_the_job_its_batches_and_their_events(store: Store) -> None:
    with store.write() as conn:
        job = _new_job(store, conn, requests=5, created_at=NOW - 3, updated_at=NOW - 3)
        rows = [
            batch_values(
                job["id"], 1, requests=3, model="m-a", estimated_tokens=30, max_output_tokens=300
            ),
            batch_values(
                job["id"], 2, requests=2, model="m-b", estimated_tokens=20, max_output_tokens=None
            ),
        ]
        insert_job(store, conn, job, rows, sampled=(False, True))
    row = get_job(store, job["id"])
    assert (row.status, row.number, row.request_count) == ("queued", job["number"], 5)
    assert (row.requests_succeeded, row.requests_failed, row.cancel_requested) == (0, 0, False)
    with store.read() as conn:
        stored = store.job_batches(conn, job["id"])
    assert [(b.id, b.number, b.status, b.model, b.estimated_tokens) for b in stored] == [
        (rows[0]["id"], 1, "queued", "m-a", 30),
        (rows[1]["id"], 2, "queued", "m-b", 20),
    ]
    events = events_of(store, job["id"])
    assert [(e.type, e.batch_id, e.from_status, e.to_status) for e in events] == [
        ("job.queued", None, None, "queued"),
        ("batch.queued", rows[0]["id"], None, "queued"),
        ("batch.queued", rows[1]["id"], None, "queued"),
    ]
    assert {e.created_at for e in events} == {NOW - 3}
    # Each batch's estimate and the job's sum: models without a price cost unknown, never 0,
    # and one batch without an output bound leaves the job's unbounded; one batch's estimate
    # from a sample makes the job's one too.
    assert events[0].data == {
        "request_counts": {"total": 5, "completed": 0, "failed": 0},
        "batches": 2,
        "estimated_input_tokens": 50,
        "max_output_tokens": None,
        "estimated_cost": {"min": None, "max": None},
        "estimate_sampled": True,
    }
    assert events[1].data["max_output_tokens"] == 300
    assert events[1].data["estimate_sampled"] is False
    assert events[2].data == {
        "attempt": 1,
        "shard_index": 1,
        "model": "m-b",
        "request_counts": {"total": 2, "completed": 0, "failed": 0},
        "estimated_input_tokens": 20,
        "max_output_tokens": None,
        "estimated_cost": {"min": None, "max": None},
        "estimate_sampled": True,
    }
    assert events[0].seq < events[1].seq < events[2].seq


def test_a_job_without_batches(store: Store) -> None:
    with store.write() as conn:
        job = _new_job(store, conn)
        insert_job(store, conn, job, [])
        assert next_batch_number(store, conn, job["id"]) == 1
    [event] = events_of(store, job["id"])
    assert event.type == "job.queued" and event.data["batches"] == 0


def test_a_failed_intake_leaves_nothing(store: Store) -> None:
    with pytest.raises(Exception), store.write() as conn:  # noqa: B017 - driver-specific class
        job = _new_job(store, conn, requests=2)
        insert_ids(store, conn, job["number"], 1, ["a", "b"], 0)
        batch = batch_values(job["id"], 1, requests=2)
        insert_job(store, conn, job, [batch, {**batch, "id": new_id("batch")}])  # number twice
    assert count(store, jobs_table) == count(store, batches_table) == 0
    assert count(store, events_table) == count(store, requests_table) == 0


# -- numbers ----------------------------------------------------------------------------------


def test_job_and_batch_numbers(store: Store) -> None:
    first, _ = add_job(store)
    second, _ = add_job(store, {}, {}, {})
    with store.write() as conn:
        a, b = get_job(store, first).number, get_job(store, second).number
        assert b > a
        assert next_batch_number(store, conn, first) == 2
        assert next_batch_number(store, conn, second) == 4
        assert next_job_number(store, conn) > b


def test_two_intakes_at_once_get_different_job_numbers(store: Store, db_url: str) -> None:
    """PostgreSQL draws job numbers from a sequence, so a second intake does not wait for the
    first; a SQLite intake holds the only write lock, so the second waits for it."""
    other = second_store(db_url)
    try:
        with store.write() as conn:
            first = _new_job(store, conn)
            insert_job(store, conn, first, [])

            def intake() -> int:
                with other.write() as conn2:
                    job = _new_job(other, conn2)
                    insert_job(other, conn2, job, [])
                return int(job["number"])

            second = InThread(intake)
            if store.dialect == "postgresql":
                number = second.result()
            else:
                assert second.started.wait(30) and not second.done(0.05)
        if store.dialect != "postgresql":
            number = second.result()
    finally:
        other.close()
    assert number != first["number"]
    assert {j.number for j in _jobs(store)} == {first["number"], number}


def _jobs(store: Store) -> list[Row]:
    with store.read() as conn:
        return store.list_jobs(conn)


def test_two_writers_adding_batches_to_one_job_take_turns(store: Store, db_url: str) -> None:
    """A second writer's next batch number waits for the first's to commit, then follows it
    (PostgreSQL locks the job's row; SQLite writers always take turns)."""
    job_id, _ = add_job(store, status="running")
    other = second_store(db_url)
    try:
        with store.write() as conn:
            number = next_batch_number(store, conn, job_id)
            assert number == 2

            def add_batch() -> int:
                with other.write() as conn2:
                    n = next_batch_number(other, conn2, job_id)
                    insert_queued_batch(other, conn2, batch_values(job_id, n, requests=0))
                return n

            second = InThread(add_batch)
            wait_until_blocked(other, second.started)
            assert not second.done(0.05)
            insert_queued_batch(store, conn, batch_values(job_id, number, requests=0))
        assert second.result() == 3
    finally:
        other.close()
    with store.read() as conn:
        assert [b.number for b in store.job_batches(conn, job_id)] == [1, 2, 3]


# -- the request index ------------------------------------------------------------------------


def test_bulk_request_insert_from_json(store: Store) -> None:
    """Contiguous ids (the database numbers them from the first position) and explicit
    (position, custom_id) pairs, ids with quotes, backslashes and non-ASCII kept exactly; a
    position taken twice fails the transaction and leaves nothing of it."""
    job_id, _ = add_job(store, {"requests": 0})
    number = get_job(store, job_id).number
    odd = ['q"uote', "back\\slash", "é ünï ✓", "tab\tnew\nline"]
    ids = [f"id-{i}" for i in range(45_000)] + odd
    with store.write() as conn:
        insert_ids(store, conn, number, 1, ids, 10)
        insert_pairs(store, conn, number, 2, [(3, "pair-3"), (0, "pair-0")])
    rows = _index(store, number)
    assert len(rows) == len(ids) + 2
    assert rows[0] == (0, "pair-0", 2, 1) and rows[1] == (3, "pair-3", 2, 1)
    assert rows[2] == (10, "id-0", 1, 1)
    assert [r[1] for r in rows[-4:]] == odd and rows[-1][0] == 10 + len(ids) - 1
    with pytest.raises(Exception), store.write() as conn:  # noqa: B017 - driver-specific class
        insert_pairs(store, conn, number, 3, [(5, "new"), (10, "taken")])
    assert len(_index(store, number)) == len(ids) + 2


def test_request_index_rows_start_pending(store: Store) -> None:
    job_id, _ = add_job(store, {"requests": 2})
    rows = requests_of(store, job_id)
    assert len(rows) == 2
    for row in rows:
        assert (row.outcome, row.status_code, row.error_code, row.attempt) == (None, None, None, 1)
        assert (row.result_batch_number, row.result_kind, row.result_offset) == (None, None, None)


def test_empty_arrays_insert_nothing(store: Store) -> None:
    job_id, _ = add_job(store, {"requests": 0})
    number = get_job(store, job_id).number
    with store.write() as conn:
        insert_ids(store, conn, number, 1, [], 0)
        insert_pairs(store, conn, number, 1, [])
    assert _index(store, number) == []


def _prepare(tmp_path: Path, models: list[str]) -> list[Shard]:
    source = write_jsonl(
        tmp_path / "in.jsonl", (chat_line(i, model) for i, model in enumerate(models))
    )
    shards: list[Shard] = []
    prepare_input(
        source, "/v1/chat/completions", tmp_path / "staging", Limits(), sync=False,
        on_shard=shards.append,
    )  # fmt: skip
    return shards


def test_the_index_loader_writes_each_shard_in_the_intake_transaction(
    store: Store, tmp_path: Path
) -> None:
    """Two models interleaved: one shard's positions have a hole (pairs form), the other's
    are consecutive (ids form); both land at their input positions under their batch."""
    models = ["m-a", "m-a", "m-b", "m-b", "m-a"]
    with store.write() as conn:
        job = _new_job(store, conn, requests=len(models))
        with index_loader(store, conn, job["number"]) as loader:
            shards = _prepare(tmp_path, models)
            for shard in shards:
                loader.add(shard)
        insert_job(store, conn, job, [])
    by_model = {s.model: s for s in shards}
    assert by_model["m-a"].positions_path is not None  # 0, 1, 4
    assert by_model["m-b"].positions_path is None  # 2, 3
    a, b = batch_number_for(by_model["m-a"]), batch_number_for(by_model["m-b"])
    assert _index(store, job["number"]) == [
        (0, "req-0", a, 1),
        (1, "req-1", a, 1),
        (2, "req-2", b, 1),
        (3, "req-3", b, 1),
        (4, "req-4", a, 1),
    ]


def test_an_index_loader_error_fails_the_intake(store: Store, tmp_path: Path) -> None:
    shards = _prepare(tmp_path, ["m-a", "m-a"])
    with store.write() as conn:
        job = _new_job(store, conn, requests=2)
        insert_job(store, conn, job, [])
        insert_pairs(store, conn, job["number"], 9, [(1, "taken")])
    with pytest.raises(Exception), store.write() as conn:  # noqa: B017 - driver-specific class
        loader = index_loader(store, conn, job["number"])
        with loader:
            for shard in shards:
                loader.add(shard)
    assert _index(store, job["number"]) == [(1, "taken", 9, 1)]
