"""The outbox's SQL: cursors and fan-out, claims with leases, in order per job, attempts
recorded and fenced on the lease, dead letters, redelivery, and the queries over deliveries.
(The dispatcher's own behaviour over these is in tests/test_hooks_dispatcher.py.)"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row, select

from jobqueue.store import Store, outbox
from jobqueue.store.outbox import DEAD, DELIVERED, PENDING, Claimed, Delivery
from jobqueue.store.tables import delivery_attempts_table
from tests.store.helpers import NOW, InThread, second_store, wait_until_blocked

LEASE_END = NOW + 60

# -- the operations under test ----------------------------------------------------------------


def emit(store: Store, job_id: str | None, *types: str) -> list[str]:
    """Events in one transaction, in the order given; returns their ids."""
    with store.write() as conn:
        return [store.add_event(conn, t, job_id=job_id, now=NOW) for t in types]


def ensure_cursors(store: Store, sinks: Mapping[str, bool], now: float = NOW) -> dict[str, int]:
    with store.write() as conn:
        return outbox.ensure_cursors(conn, store.dialect, sinks, now)


def cursors(store: Store, *sinks: str) -> dict[str, int]:
    with store.read() as conn:
        return outbox.cursors(conn, sinks)


def advance_cursor(store: Store, sink: str, last_seq: int) -> None:
    with store.write() as conn:
        outbox.advance_cursor(conn, sink, last_seq, NOW)


def max_event_seq(store: Store) -> int:
    with store.read() as conn:
        return outbox.max_event_seq(conn)


def event_window(store: Store, after_seq: int, limit: int = 100) -> list[Row]:
    with store.read() as conn:
        return outbox.event_window(conn, after_seq, limit)


def events_in_ranges(store: Store, ranges: Sequence[tuple[int, int]]) -> list[Row]:
    with store.read() as conn:
        return outbox.events_in_ranges(conn, ranges)


def insert_deliveries(store: Store, rows: Sequence[Mapping[str, Any]], now: float = NOW) -> None:
    with store.write() as conn:
        outbox.insert_deliveries(conn, store.dialect, rows, now)


def claim(
    store: Store, sink: str, owner: str, now: float = NOW, *, until: float = LEASE_END,
    limit: int = 100,
) -> list[Claimed]:  # fmt: skip
    with store.write() as conn:
        return outbox.claim(conn, store.dialect, sink, owner, now, until, limit)


def release(store: Store, claimed: Claimed, owner: str) -> bool:
    with store.write() as conn:
        return outbox.release(conn, claimed.id, owner, claimed.lease_until)


def record(
    store: Store,
    claimed: Claimed,
    owner: str,
    status: str,
    *,
    at: float = NOW + 1,
    error: str | None = None,
    status_code: int | None = None,
    next_attempt_at: float | None = None,
) -> bool:
    with store.write() as conn:
        return outbox.record_attempt(
            conn,
            claimed,
            owner,
            started_at=at - 0.5,
            finished_at=at,
            ok=status == DELIVERED,
            error=error,
            status_code=status_code,
            status=status,
            next_attempt_at=at if next_attempt_at is None else next_attempt_at,
        )


def redeliver(store: Store, event_id: str, sink: str | None = None, now: float = NOW) -> int:
    with store.write() as conn:
        return outbox.redeliver(conn, event_id, sink, now)


def purge_attempts(store: Store, before: float) -> int:
    with store.write() as conn:
        return outbox.purge_attempts(conn, before)


def deliveries_for(store: Store, job_id: str | None = None, **kwargs: Any) -> list[Delivery]:
    with store.read() as conn:
        return outbox.deliveries_for(conn, job_id, **kwargs)


def dead_deliveries(store: Store, job_id: str | None = None) -> list[Delivery]:
    with store.read() as conn:
        return outbox.dead_deliveries(conn, job_id)


def deliveries_by_seq(store: Store, seqs: Sequence[int]) -> dict[int, list[Delivery]]:
    with store.read() as conn:
        return outbox.deliveries_by_seq(conn, seqs)


def find_event(store: Store, event_id: str) -> Row | None:
    with store.read() as conn:
        return outbox.find_event(conn, event_id)


def pending_count(store: Store, sinks: Sequence[str] | None = None) -> int:
    with store.read() as conn:
        return outbox.pending_count(conn, sinks)


def dead_count(store: Store, sinks: Sequence[str] | None = None) -> int:
    with store.read() as conn:
        return outbox.dead_count(conn, sinks)


def backlog(store: Store, *sinks: str) -> int:
    with store.read() as conn:
        return outbox.backlog(conn, sinks)


def due_sinks(store: Store, sinks: Sequence[str], now: float) -> set[str]:
    with store.read() as conn:
        return outbox.due_sinks(conn, sinks, now)


def next_due(store: Store, sinks: Sequence[str]) -> float | None:
    with store.read() as conn:
        return outbox.next_due(conn, sinks)


# -- helpers ----------------------------------------------------------------------------------


def fan_out(store: Store, *sinks: str) -> int:
    """Every event past each sink's cursor becomes a pending delivery for it (no patterns:
    matching is the dispatcher's); cursors advance. Returns the deliveries made."""
    made = 0
    for sink, after in ensure_cursors(store, dict.fromkeys(sinks, True)).items():
        while window := event_window(store, after):
            insert_deliveries(
                store,
                [{"event_seq": e.seq, "event_id": e.id, "job_id": e.job_id, "sink": sink}
                 for e in window],
            )  # fmt: skip
            after = window[-1].seq
            advance_cursor(store, sink, after)
            made += len(window)
    return made


def _event_ids(claimed: list[Claimed]) -> list[str]:
    return [c.event.id for c in claimed]


def _attempts(store: Store) -> list[Row]:
    a = delivery_attempts_table
    with store.read() as conn:
        return list(conn.execute(select(a).order_by(a.c.id)).all())


# -- cursors and fan-out ----------------------------------------------------------------------


def test_a_new_sink_starts_after_the_newest_event_unless_it_replays(store: Store) -> None:
    assert ensure_cursors(store, {"empty": False}) == {"empty": 0}
    emit(store, "job_a", "job.queued", "job.running")
    newest = max_event_seq(store)
    assert ensure_cursors(store, {"fresh": False, "replay": True}) == {
        "fresh": newest,
        "replay": 0,
    }
    # Known sinks keep their cursor, whatever the flag says now.
    advance_cursor(store, "replay", 1)
    assert ensure_cursors(store, {"fresh": True, "replay": False, "empty": True}) == {
        "fresh": newest,
        "replay": 1,
        "empty": 0,
    }
    assert cursors(store, "fresh", "nope") == {"fresh": newest}
    assert cursors(store) == {}


def test_a_cursor_never_moves_back(store: Store) -> None:
    ensure_cursors(store, {"s": True})
    advance_cursor(store, "s", 5)
    advance_cursor(store, "s", 3)
    assert cursors(store, "s") == {"s": 5}


def test_event_window_and_ranges_read_events_in_seq_order(store: Store) -> None:
    ids = emit(store, "job_a", *(f"job.e{i}" for i in range(6)))
    seqs = [e.seq for e in event_window(store, 0)]
    assert [e.id for e in event_window(store, 0)] == ids and seqs == sorted(seqs)
    assert [e.id for e in event_window(store, seqs[1], limit=2)] == ids[2:4]
    assert event_window(store, seqs[-1]) == []
    window = event_window(store, 0)[0]
    assert (window.type, window.job_id) == ("job.e0", "job_a")
    picked = events_in_ranges(store, [(seqs[4], seqs[5]), (seqs[0], seqs[0])])
    assert [e.id for e in picked] == [ids[0], ids[4], ids[5]]
    assert events_in_ranges(store, []) == []


def test_fan_out_is_idempotent_per_event_and_sink(store: Store) -> None:
    ids = emit(store, "job_a", "job.queued", "job.running")
    assert fan_out(store, "s1", "s2") == 4
    rows = [{"event_seq": e.seq, "event_id": e.id, "job_id": e.job_id, "sink": "s1"}
            for e in event_window(store, 0)]  # fmt: skip
    insert_deliveries(store, rows, now=NOW + 5)  # a second dispatcher, or a retry
    assert fan_out(store, "s1", "s2") == 0
    made = deliveries_for(store, "job_a")
    assert [(d.event_id, d.sink) for d in made] == [
        (ids[0], "s1"), (ids[0], "s2"), (ids[1], "s1"), (ids[1], "s2"),
    ]  # fmt: skip
    for d in made:
        assert (d.status, d.attempts, d.next_attempt_at, d.last_error) == (PENDING, 0, NOW, None)
        assert d.event_type in ("job.queued", "job.running") and d.delivered_at is None
    assert pending_count(store) == 4 and pending_count(store, ["s2"]) == 2
    assert backlog(store, "s1", "s2") == 0


def test_backlog_counts_events_past_the_lowest_cursor(store: Store) -> None:
    emit(store, "job_a", "job.queued", "job.running", "job.completed")
    fan_out(store, "ahead")
    ensure_cursors(store, {"behind": True})
    advance_cursor(store, "behind", max_event_seq(store) - 2)
    assert backlog(store, "ahead") == 0
    assert backlog(store, "ahead", "behind") == 2
    assert backlog(store, "unknown") == 0


# -- claims -----------------------------------------------------------------------------------


def test_claim_leases_the_head_of_each_jobs_queue_oldest_first(store: Store) -> None:
    a1, a2 = emit(store, "job_a", "job.queued", "job.running")
    [b1] = emit(store, "job_b", "job.queued")
    n1, n2 = emit(store, None, "batch.overdue", "batch.stuck")  # no job: no queue to keep
    fan_out(store, "s1", "s2")
    claimed = claim(store, "s1", "d1")
    assert _event_ids(claimed) == [a1, b1, n1, n2]
    for c in claimed:
        assert (c.sink, c.attempts, c.lease_until) == ("s1", 0, LEASE_END)
    assert claimed[0].event.type == "job.queued" and claimed[0].event.job_id == "job_a"
    # Leased: not claimed again, by anyone, until the lease ends.
    assert claim(store, "s1", "d2", NOW + 1) == []
    assert claim(store, "s1", "d2", LEASE_END - 0.001) == []
    # Another sink's deliveries are its own.
    assert _event_ids(claim(store, "s2", "d2", limit=2)) == [a1, b1]
    # The lease ran out: the same heads again; a2 still waits behind a1.
    again = claim(store, "s1", "d2", LEASE_END, until=LEASE_END + 60)
    assert _event_ids(again) == [a1, b1, n1, n2] and a2 not in _event_ids(again)


def test_claims_keep_each_job_in_order(store: Store) -> None:
    """The next event of a job is claimable only once the earlier one is no longer pending:
    delivered or dead. A failure to retry later holds the job's later events back."""
    a1, a2, a3 = emit(store, "job_a", "job.queued", "job.running", "job.completed")
    fan_out(store, "s")
    [first] = claim(store, "s", "d1")
    assert first.event.id == a1
    assert record(store, first, "d1", DELIVERED)
    [second] = claim(store, "s", "d1")
    assert second.event.id == a2
    assert record(store, second, "d1", PENDING, error="boom", next_attempt_at=NOW + 30)
    assert claim(store, "s", "d1", NOW + 29) == []  # a2 not due yet, a3 behind it
    [retried] = claim(store, "s", "d1", NOW + 30)
    assert (retried.event.id, retried.attempts) == (a2, 1)
    assert record(store, retried, "d1", DEAD, error="gave up")
    [third] = claim(store, "s", "d1", NOW + 31)
    assert third.event.id == a3


def test_claim_limit_takes_the_oldest(store: Store) -> None:
    ids = [emit(store, f"job_{i}", "job.queued")[0] for i in range(5)]
    fan_out(store, "s")
    assert _event_ids(claim(store, "s", "d1", limit=2)) == ids[:2]
    assert _event_ids(claim(store, "s", "d1", limit=2)) == ids[2:4]
    assert _event_ids(claim(store, "s", "d1", limit=2)) == ids[4:]


def test_due_sinks_and_next_due(store: Store) -> None:
    emit(store, "job_a", "job.queued")
    emit(store, "job_b", "job.queued")
    fan_out(store, "s1", "s2")
    assert due_sinks(store, ["s1", "s2", "s3"], NOW) == {"s1", "s2"}
    assert due_sinks(store, ["s1"], NOW - 1) == set() and due_sinks(store, [], NOW) == set()
    assert next_due(store, ["s1"]) == NOW
    first, second = claim(store, "s1", "d1")
    assert due_sinks(store, ["s1", "s2"], NOW) == {"s2"}
    assert next_due(store, ["s1"]) == LEASE_END  # both leased: due when the leases end
    record(store, first, "d1", PENDING, next_attempt_at=NOW + 10)
    assert next_due(store, ["s1"]) == NOW + 10
    assert record(store, second, "d1", DELIVERED)
    assert not record(store, first, "d1", DELIVERED)  # its lease went with its first record
    assert next_due(store, ["s1"]) == NOW + 10
    assert next_due(store, ["s3"]) is None and next_due(store, []) is None


def test_two_claimers_at_once_never_share_a_delivery(store: Store, db_url: str) -> None:
    """Two dispatchers (two stores, two connections) claim one sink at once, the first inside
    a transaction not committed yet. On PostgreSQL the second skips the rows the first holds
    (SKIP LOCKED) without waiting; a SQLite writer waits for the first. Either way no delivery
    is claimed by both, and only heads of their job's queue are claimed."""
    heads = [emit(store, f"job_{i}", "job.queued", "job.running")[0] for i in range(6)]
    fan_out(store, "s")
    other = second_store(db_url)
    try:
        with store.write() as conn:
            mine = outbox.claim(conn, store.dialect, "s", "d1", NOW, LEASE_END, 3)

            def second() -> list[Claimed]:
                return claim(other, "s", "d2")

            theirs = InThread(second)
            if store.dialect == "postgresql":
                taken = theirs.result()
            else:
                wait_until_blocked(other, theirs.started)
                assert not theirs.done(0.05)
        if store.dialect != "postgresql":
            taken = theirs.result()
    finally:
        other.close()
    assert len(mine) == 3
    assert sorted(_event_ids(mine) + _event_ids(taken)) == sorted(heads)


# -- attempts, leases lost, release -----------------------------------------------------------


def test_attempts_are_recorded_and_delivery_ends_delivered(store: Store) -> None:
    [event_id] = emit(store, "job_a", "job.queued")
    fan_out(store, "s")
    [c] = claim(store, "s", "d1")
    long_error = "x" * 5000
    assert record(store, c, "d1", PENDING, at=NOW + 1, error=long_error, status_code=503,
                  next_attempt_at=NOW + 2)  # fmt: skip
    [c] = claim(store, "s", "d1", NOW + 2)
    assert c.attempts == 1
    assert record(store, c, "d1", DELIVERED, at=NOW + 3, status_code=200)
    [d] = deliveries_for(store, "job_a")
    assert (d.status, d.attempts, d.delivered_at, d.updated_at) == (DELIVERED, 2, NOW + 3, NOW + 3)
    assert d.event_id == event_id and d.last_error is None
    first, second = _attempts(store)
    assert (first.attempt, first.owner, first.ok, first.status_code) == (1, "d1", False, 503)
    assert (first.started_at, first.finished_at) == (NOW + 0.5, NOW + 1)
    assert len(first.error) == outbox.ERROR_LIMIT and first.error.endswith("…")
    assert (second.attempt, second.ok, second.error, second.status_code) == (2, True, None, 200)
    assert claim(store, "s", "d1", NOW + 100) == []


def test_a_lost_lease_cannot_overwrite_the_new_owner(store: Store) -> None:
    emit(store, "job_a", "job.queued")
    fan_out(store, "s")
    [slow] = claim(store, "s", "slow")
    [fast] = claim(store, "s", "fast", LEASE_END, until=LEASE_END + 60)
    # The slow one finishes late: its attempt is recorded (it happened), the delivery is not
    # changed, and its lease is not the one that counts any more.
    assert not record(store, slow, "slow", DEAD, at=LEASE_END + 1, error="late")
    assert not release(store, slow, "slow")
    [d] = deliveries_for(store)
    assert (d.status, d.attempts) == (PENDING, 0)
    assert record(store, fast, "fast", DELIVERED, at=LEASE_END + 2)
    assert deliveries_for(store)[0].status == DELIVERED
    assert [(a.owner, a.ok) for a in _attempts(store)] == [("slow", False), ("fast", True)]


def test_release_gives_a_claim_back_unattempted(store: Store) -> None:
    emit(store, "job_a", "job.queued")
    fan_out(store, "s")
    [c] = claim(store, "s", "d1")
    assert not release(store, c, "d2")  # not its lease
    assert release(store, c, "d1")
    [again] = claim(store, "s", "d2", NOW + 1)
    assert again.id == c.id and again.attempts == 0
    assert _attempts(store) == []


# -- dead letters and redelivery --------------------------------------------------------------


def test_dead_letters_and_redeliver(store: Store) -> None:
    first, second = emit(store, "job_a", "job.queued", "job.running")
    fan_out(store, "s1", "s2")
    for sink in ("s1", "s2"):
        for _ in range(2):
            [c] = claim(store, sink, "d1", NOW + 100)
            record(store, c, "d1", DEAD, at=NOW + 100, error="refused")
    assert [(d.event_id, d.sink, d.status) for d in dead_deliveries(store, "job_a")] == [
        (first, "s1", DEAD), (first, "s2", DEAD), (second, "s1", DEAD), (second, "s2", DEAD),
    ]  # fmt: skip
    assert dead_count(store) == 4 and dead_count(store, ["s1"]) == 2
    assert pending_count(store) == 0
    assert redeliver(store, first, "s1", now=NOW + 200) == 1
    assert redeliver(store, first, "s1", now=NOW + 200) == 0  # pending already
    assert redeliver(store, second, "elsewhere") == 0
    [d] = [d for d in deliveries_for(store, status=PENDING)]
    assert (d.event_id, d.sink, d.attempts, d.next_attempt_at) == (first, "s1", 0, NOW + 200)
    [c] = claim(store, "s1", "d1", NOW + 200, until=NOW + 260)
    assert c.event.id == first and c.attempts == 0
    record(store, c, "d1", DELIVERED, at=NOW + 201)
    # Every sink at once, and a delivered event too, can be sent again.
    assert redeliver(store, first) == 2
    assert dead_count(store) == 2 and pending_count(store) == 2


def test_purge_attempts_before_a_time(store: Store) -> None:
    emit(store, "job_a", "job.queued")
    fan_out(store, "s")
    for at in (NOW + 1, NOW + 2, NOW + 3):
        [c] = claim(store, "s", "d1", at - 1, until=at + 60)
        record(store, c, "d1", PENDING, at=at)
    assert purge_attempts(store, NOW + 2.5) == 2
    assert [a.finished_at for a in _attempts(store)] == [NOW + 3]
    assert deliveries_for(store)[0].attempts == 3


# -- queries ----------------------------------------------------------------------------------


def test_delivery_queries_filter_and_order(store: Store) -> None:
    a1, a2 = emit(store, "job_a", "job.queued", "job.running")
    [b1] = emit(store, "job_b", "job.queued")
    fan_out(store, "s1", "s2")
    assert [(d.event_id, d.sink) for d in deliveries_for(store, "job_a", sink="s2")] == [
        (a1, "s2"),
        (a2, "s2"),
    ]
    assert len(deliveries_for(store)) == 6 and len(deliveries_for(store, limit=4)) == 4
    assert deliveries_for(store, status=DEAD) == []
    found = find_event(store, b1)
    assert found is not None and (found.type, found.job_id) == ("job.queued", "job_b")
    assert find_event(store, "evt_missing") is None
    shown = deliveries_for(store, "job_b", sink="s1")[0].to_dict()
    assert shown["event_id"] == b1 and shown["type"] == "job.queued"
    assert (shown["status"], shown["attempts"], shown["sink"]) == (PENDING, 0, "s1")


def test_deliveries_by_seq_beyond_one_query(store: Store) -> None:
    with store.write() as conn:
        for i in range(600):
            store.add_event(conn, "job.queued", job_id=f"job_{i}", now=NOW)
    fan_out(store, "s")
    seqs = [e.seq for e in event_window(store, 0, limit=1000)]
    by_seq = deliveries_by_seq(store, [*seqs, seqs[0], 10**9])
    assert sorted(by_seq) == seqs
    assert all(len(found) == 1 and found[0].event_seq == seq for seq, found in by_seq.items())
    assert deliveries_by_seq(store, []) == {}
