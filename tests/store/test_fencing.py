"""Fenced leases on batches, the daemons table, and hook leases of dead owners.

Every claim of a batch draws a new lease token; every write its holder makes is fenced on
(lease_owner, lease_token) and changes nothing once the lease was lost. A lease is taken over
only once it has run out and its owner is not a live daemon. Run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest
from sqlalchemy import Row, select

from jobqueue.core.ids import new_id
from jobqueue.store import Store, batches, daemons, outbox
from jobqueue.store.batches import Lease
from jobqueue.store.tables import deliveries_table

NOW = 1_700_000_000.0
LEASE = 300.0

# -- the operations under test ----------------------------------------------------------------


def add_batch(store: Store, **values: Any) -> str:
    """A job with one batch (its columns overridden by `values`) and one request; its id."""
    job_id, batch_id = new_id("job"), new_id("batch")
    batch = {
        "id": batch_id, "job_id": job_id, "number": 1, "status": "queued", "shard_index": 0,
        "attempt": 1, "model": "gpt-4o-mini", "input_path": "/nonexistent/shard.jsonl",
        "request_count": 1, "bytes": 100, "created_at": NOW, "updated_at": NOW, **values,
    }  # fmt: skip
    job = {
        "id": job_id, "status": "queued" if batch["status"] == "queued" else "running",
        "endpoint": "/v1/chat/completions", "completion_window": "24h", "user_metadata": {},
        "max_attempts": 3, "source": "t.jsonl", "input_dir": "/nonexistent",
        "max_batch_requests": 50_000, "max_batch_bytes": 1 << 20, "request_count": 1,
        "bytes": 100, "created_at": NOW, "updated_at": NOW,
    }  # fmt: skip
    with store.write() as conn:
        job["number"] = store.next_job_number(conn)
        store.insert_job(conn, job, [batch])
        store.insert_requests_json(conn, job["number"], 1, orjson.dumps(["req-0"]).decode(), 0)
    return batch_id


def get(store: Store, batch_id: str) -> Row:
    with store.read() as conn:
        row = store.get_batch(conn, batch_id)
    assert row is not None
    return row


def claim(store: Store, batch_id: str, owner: str, now: float = NOW) -> Lease:
    with store.write() as conn:
        row = batches.claim_queued(
            store, conn, get(store, batch_id), owner=owner, now=now, lease_seconds=LEASE
        )
    assert row is not None
    return Lease.of(row)


def take(
    store: Store, batch_id: str, owner: str, now: float, live: tuple[str, ...] = (), **kw: Any
) -> Lease | None:
    with store.write() as conn:
        return store.take_lease(
            conn, batch_id, owner, now=now, seconds=LEASE, status=kw.get("status", "submitting"),
            live_owners=live,
        )  # fmt: skip


def stale(store: Store, now: float, taker: str, live: tuple[str, ...] = ()) -> set[str]:
    with store.read() as conn:
        return {r.id for r in store.stale_submitting(conn, now, taker, live)}


def events_of(store: Store, batch_id: str) -> list[str]:
    with store.read() as conn:
        return [e.type for e in store.events(conn) if e.batch_id == batch_id]


def lease_of(store: Store, batch_id: str) -> tuple[str | None, float | None, str | None]:
    row = get(store, batch_id)
    return row.lease_owner, row.lease_until, row.lease_token


def taken_over(store: Store) -> tuple[str, Lease, Lease]:
    """A submitting batch d1 claimed, whose lease ran out and d2 took over: (id, d1's, d2's)."""
    batch_id = add_batch(store)
    old = claim(store, batch_id, "d1")
    new = take(store, batch_id, "d2", NOW + LEASE + 1)
    assert new is not None
    return batch_id, old, new


# -- claims and takeovers ---------------------------------------------------------------------


def test_every_claim_draws_a_new_token(store: Store) -> None:
    batch_id = add_batch(store)
    first = claim(store, batch_id, "d1")
    assert lease_of(store, batch_id) == ("d1", NOW + LEASE, first.token)
    with store.write() as conn:
        assert batches.requeue_submitting(
            store, conn, first, error="again", delay=0.0, now=NOW + 1
        ) is not None  # fmt: skip
    assert lease_of(store, batch_id) == (None, None, None)
    second = claim(store, batch_id, "d1", NOW + 2)
    assert second.token != first.token and second.owner == "d1"


def test_a_lease_is_taken_over_only_once_run_out_and_its_owner_not_alive(store: Store) -> None:
    batch_id = add_batch(store)
    first = claim(store, batch_id, "d1")
    # Running: nobody takes it, whether d1 is alive or not.
    assert take(store, batch_id, "d2", NOW + LEASE) is None
    assert stale(store, NOW + LEASE, "d2") == set()
    # Run out, d1 alive: it keeps it (it may still be working on it).
    assert take(store, batch_id, "d2", NOW + LEASE + 1, live=("d1", "d2")) is None
    assert stale(store, NOW + LEASE + 1, "d2", ("d1",)) == set()
    assert lease_of(store, batch_id) == ("d1", NOW + LEASE, first.token)
    # Run out, d1 not alive (dead, or never registered): taken, with a new token.
    assert stale(store, NOW + LEASE + 1, "d2", ("d2", "d3")) == {batch_id}
    second = take(store, batch_id, "d2", NOW + LEASE + 1, live=("d2", "d3"))
    assert second is not None and second.token != first.token
    assert lease_of(store, batch_id) == ("d2", NOW + 2 * LEASE + 1, second.token)


def test_a_daemon_takes_its_own_run_out_lease_with_a_new_token(store: Store) -> None:
    batch_id = add_batch(store)
    first = claim(store, batch_id, "d1")
    assert take(store, batch_id, "d1", NOW + 1, live=("d1",)) is None  # still running
    assert stale(store, NOW + LEASE + 1, "d1", ("d1",)) == {batch_id}
    again = take(store, batch_id, "d1", NOW + LEASE + 1, live=("d1",))
    assert again is not None and again.token != first.token
    with store.write() as conn:  # the step of ours that held the old token is fenced off
        assert not batches.set_input_file(conn, first, "file_old")


def test_an_unowned_lease_is_free_and_only_in_the_given_status(store: Store) -> None:
    batch_id = add_batch(store, status="submitting")
    assert stale(store, NOW, "d1", ("d2",)) == {batch_id}
    assert take(store, batch_id, "d1", NOW, status="completed") is None
    lease = take(store, batch_id, "d1", NOW, live=("d2",))
    assert lease is not None and lease_of(store, batch_id) == ("d1", NOW + LEASE, lease.token)


# -- fenced writes ----------------------------------------------------------------------------


def test_renewal_is_fenced(store: Store) -> None:
    batch_id, old, new = taken_over(store)
    with store.write() as conn:
        assert batches.renew_lease(conn, old, until=NOW + 10_000) is None
        renewed = batches.renew_lease(conn, new, until=NOW + 10_000)
    assert renewed == Lease(batch_id, "d2", new.token, NOW + 10_000)
    assert lease_of(store, batch_id) == ("d2", NOW + 10_000, new.token)


def test_a_former_owner_cannot_release_the_new_owners_lease(store: Store) -> None:
    batch_id, old, new = taken_over(store)
    assert not store.release_lease(old)
    assert lease_of(store, batch_id) == ("d2", new.until, new.token)
    assert store.release_lease(new)
    assert lease_of(store, batch_id) == (None, None, None)
    assert not store.release_lease(new)  # given back already


def test_field_updates_are_fenced(store: Store) -> None:
    batch_id, old, new = taken_over(store)
    with store.write() as conn:
        assert not batches.set_input_file(conn, old, "file_late")
        assert not batches.mark_create_uncertain(conn, old, error="late", lease_until=NOW)
    row = get(store, batch_id)
    assert (row.input_file_id, row.last_error, row.lease_until) == (None, None, new.until)
    with store.write() as conn:
        assert batches.set_input_file(conn, new, "file_2")
        assert batches.mark_create_uncertain(conn, new, error="timeout", lease_until=NOW + 5)
    row = get(store, batch_id)
    assert row.input_file_id == "file_2" and row.last_error == "create uncertain: timeout"
    assert lease_of(store, batch_id) == ("d2", NOW + 5, new.token)  # cut short, still d2's


@pytest.mark.parametrize("step", ["adopt", "requeue", "fail"])
def test_transitions_out_of_submitting_are_fenced(store: Store, step: str) -> None:
    batch_id, old, new = taken_over(store)
    before = events_of(store, batch_id)

    def apply(lease: Lease) -> bool:
        with store.write() as conn:
            if step == "adopt":
                values = {"remote_id": f"batch_{lease.owner}"}
                return batches.mark_submitted(
                    store, conn, lease, values, at=None, now=NOW + 1
                ) is not None  # fmt: skip
            if step == "requeue":
                return batches.requeue_submitting(
                    store, conn, lease, error="x", delay=0.0, now=NOW + 1
                ) is not None  # fmt: skip
            return batches.fail_submission(
                store, conn, get(store, batch_id), lease, code="c", error="x", now=NOW + 1
            )

    assert not apply(old)
    row = get(store, batch_id)
    assert (row.status, row.remote_id) == ("submitting", None)
    assert lease_of(store, batch_id) == ("d2", new.until, new.token)
    assert events_of(store, batch_id) == before  # no event for a change not made
    assert apply(new)
    row = get(store, batch_id)
    assert row.status == {"adopt": "validating", "requeue": "queued", "fail": "failed"}[step]
    assert lease_of(store, batch_id) == (None, None, None)
    assert len(events_of(store, batch_id)) == len(before) + 1
    if step == "adopt":
        assert row.remote_id == "batch_d2"


def test_a_fenced_transition_names_its_batch(store: Store) -> None:
    one, other = add_batch(store), add_batch(store)
    lease = claim(store, one, "d1")
    with store.write() as conn, pytest.raises(ValueError, match="lease is on batch"):
        store.transition_batch(conn, other, "queued", "submitting", lease=lease)


def test_collection_is_fenced_and_done_once(store: Store) -> None:
    batch_id = add_batch(store, status="completed", remote_id="batch_r")
    old = take(store, batch_id, "d1", NOW, status="completed")
    new = take(store, batch_id, "d2", NOW + LEASE + 1, status="completed")
    assert old is not None and new is not None

    def collect(lease: Lease) -> bool:
        with store.write() as conn:
            return batches.mark_collected(
                conn, lease, output_path="out", error_path=None, now=NOW + LEASE + 2
            )

    assert not collect(old)
    assert get(store, batch_id).collected_at is None
    assert collect(new)
    row = get(store, batch_id)
    assert (row.collected_at, row.output_path) == (NOW + LEASE + 2, "out")
    assert lease_of(store, batch_id) == (None, None, None)
    again = take(store, batch_id, "d2", NOW + LEASE + 3, status="completed")
    assert again is not None and not collect(again)  # collected already


def test_a_stopping_daemon_gives_back_every_lease_with_its_token(store: Store) -> None:
    a, b, c = add_batch(store), add_batch(store), add_batch(store)
    la, lb = claim(store, a, "d1"), claim(store, b, "d1")
    claim(store, c, "d2")
    with store.write() as conn:
        assert store.release_leases(conn, "d1") == 2
    assert lease_of(store, a) == lease_of(store, b) == (None, None, None)
    assert lease_of(store, c)[0] == "d2"
    with store.write() as conn:
        assert not batches.set_input_file(conn, la, "file_late")
        assert batches.renew_lease(conn, lb, until=NOW + 1) is None


def test_a_takeover_in_flight_holds_off_the_old_holders_write(store: Store, db_url: str) -> None:
    """On PostgreSQL the takeover's UPDATE locks the row: the old holder's fenced write waits
    for it, then finds the lease gone. On SQLite writers take turns on the database."""
    batch_id = add_batch(store)
    old = claim(store, batch_id, "d1")
    other = Store(db_url)
    result: dict[str, bool] = {}
    started = threading.Event()
    try:
        with store.write() as conn:
            assert store.take_lease(
                conn, batch_id, "d2", now=NOW + LEASE + 1, seconds=LEASE, status="submitting"
            ) is not None  # fmt: skip

            def late_write() -> None:
                started.set()
                with other.write() as conn2:
                    result["written"] = batches.set_input_file(conn2, old, "file_late")

            thread = threading.Thread(target=late_write)
            thread.start()
            assert started.wait(10)
            thread.join(0.3)  # it waits on our row lock (PostgreSQL) or our write lock (SQLite)
            assert thread.is_alive()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        other.close()
    assert result == {"written": False}
    assert get(store, batch_id).input_file_id is None


# -- the daemons table ------------------------------------------------------------------------


def rows_of(store: Store, *ids: str) -> dict[str, Row]:
    with store.read() as conn:
        return {r.id: r for r in daemons.daemon_rows(conn, ids or None)}


def register(store: Store, daemon_id: str, now: float = NOW, pid: int = 42) -> bool:
    with store.write() as conn:
        return daemons.register_daemon(
            conn, daemon_id=daemon_id, host="h1", pid=pid, version="1.0", now=now
        )


def test_register_heartbeat_and_stop(store: Store) -> None:
    assert register(store, "h1:42:aaaaaa")
    (row,) = rows_of(store).values()
    assert (row.id, row.host, row.pid, row.version) == ("h1:42:aaaaaa", "h1", 42, "1.0")
    assert (row.started_at, row.heartbeat_at, row.stopped_at) == (NOW, NOW, None)
    with store.write() as conn:
        assert daemons.renew_heartbeat(conn, "h1:42:aaaaaa", NOW + 5)
        assert not daemons.renew_heartbeat(conn, "h1:42:unknown", NOW + 5)
    assert rows_of(store)["h1:42:aaaaaa"].heartbeat_at == NOW + 5
    with store.write() as conn:
        assert daemons.mark_daemon_stopped(conn, "h1:42:aaaaaa", NOW + 6)
        assert not daemons.mark_daemon_stopped(conn, "h1:42:aaaaaa", NOW + 7)
        # A stopped daemon's heartbeat is refused: it stays stopped, even if registered again.
        assert not daemons.renew_heartbeat(conn, "h1:42:aaaaaa", NOW + 8)
    assert register(store, "h1:42:aaaaaa", NOW + 9)  # ours, still
    assert not register(store, "h1:42:aaaaaa", NOW + 9, pid=43)  # another process's name
    row = rows_of(store)["h1:42:aaaaaa"]
    assert (row.heartbeat_at, row.stopped_at, row.started_at) == (NOW + 5, NOW + 6, NOW)


def test_daemon_rows_by_id_and_forgetting_old_ones(store: Store) -> None:
    for i, when in enumerate([NOW, NOW + 100, NOW + 200]):
        register(store, f"d{i}", when)
    with store.write() as conn:
        daemons.mark_daemon_stopped(conn, "d2", NOW + 250)
    assert list(rows_of(store, "d0", "d2", "nobody")) == ["d0", "d2"]
    with store.write() as conn:
        assert daemons.forget_daemons(conn, NOW + 150) == 2  # d0 silent, d1 silent since +100
    assert list(rows_of(store)) == ["d2"]
    with store.read() as conn:
        assert daemons.daemon_rows(conn, []) == []
    assert daemons.daemon_of_owner(daemons.hooks_owner("h:1:abc")) == "h:1:abc"


# -- hook deliveries of dead owners -----------------------------------------------------------


def test_a_dead_owners_delivery_lease_is_free_before_it_runs_out(store: Store) -> None:
    batch_id = add_batch(store)
    with store.read() as conn:
        (event,) = [e for e in store.events(conn) if e.batch_id == batch_id]
    with store.write() as conn:
        outbox.insert_deliveries(
            conn, store.dialect,
            [{"event_seq": event.seq, "event_id": event.id, "job_id": event.job_id,
              "sink": "s"}],
            NOW,
        )  # fmt: skip
        (held,) = outbox.claim(conn, store.dialect, "s", "d1/hooks", NOW, NOW + 60, 10)
    with store.read() as conn:
        assert outbox.due_sinks(conn, ["s"], NOW + 1) == set()
        assert outbox.due_sinks(conn, ["s"], NOW + 1, ["d1/hooks"]) == {"s"}
        assert outbox.next_due(conn, ["s"]) == NOW + 60
        assert outbox.next_due(conn, ["s"], ["d1/hooks"]) == NOW
    with store.write() as conn:
        assert outbox.claim(conn, store.dialect, "s", "d2/hooks", NOW + 1, NOW + 61, 10) == []
        (taken,) = outbox.claim(
            conn, store.dialect, "s", "d2/hooks", NOW + 1, NOW + 61, 10, ["d1/hooks"]
        )
    assert taken.id == held.id
    with store.write() as conn:  # the dead owner's late record is refused
        assert not outbox.record_attempt(
            conn, held, "d1/hooks", started_at=NOW, finished_at=NOW + 2, ok=True, error=None,
            status_code=200, status=outbox.DELIVERED, next_attempt_at=NOW + 2,
        )  # fmt: skip
        owner = conn.execute(select(deliveries_table.c.lease_owner)).scalar_one()
    assert owner == "d2/hooks"
