"""Claims and leases on batches: take, renew, expire, take over after expiry, release.

A daemon claims queued batches by moving them to `submitting` under its lease, and takes a
lease on a batch in another status (recovery of `submitting`, collection of ended batches). A
lease is free when it has no owner, or when it has run out and its owner is not a live daemon
(the taker's own run-out lease is free to it). Each claim draws a new lease token; what the
holder writes is fenced on it (tests/store/test_fencing.py).
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Connection, Row

from jobqueue.store import Store, batches
from jobqueue.store.batches import Lease
from tests.store.helpers import LEASE, NOW, InThread, add_job, get_batch, second_store

# -- the operations under test ----------------------------------------------------------------


def claim_queued(
    store: Store, conn: Connection, owner: str, now: float, *, limit: int = 16
) -> list[Row]:
    """The submit duty's claim: due queued batches, oldest job first, each moved to
    `submitting` under `owner`'s lease unless another daemon claimed it first."""
    claimed = []
    for row in store.queued_candidates(conn, now, limit):
        taken = batches.claim_queued(store, conn, row, owner=owner, now=now, lease_seconds=LEASE)
        if taken is not None:
            claimed.append(taken)
    return claimed


def queued_candidates(store: Store, now: float, limit: int = 16) -> list[Row]:
    with store.read() as conn:
        return store.queued_candidates(conn, now, limit)


def take_lease(
    store: Store,
    batch_id: str,
    owner: str,
    now: float,
    status: str | list[str],
    *,
    seconds: float = LEASE,
    live_owners: tuple[str, ...] = (),
) -> Lease | None:
    with store.write() as conn:
        return store.take_lease(
            conn, batch_id, owner, now=now, seconds=seconds, status=status, live_owners=live_owners
        )


def renew_lease(store: Store, lease: Lease, until: float) -> Lease | None:
    with store.write() as conn:
        return batches.renew_lease(conn, lease, until=until)


def release_lease(store: Store, lease: Lease) -> bool:
    """Give the batch back: only its holder can (the lease it gives back is the one it holds)."""
    return store.release_lease(lease)


def release_leases(store: Store, owner: str) -> int:
    with store.write() as conn:
        return store.release_leases(conn, owner)


def lease_owners(store: Store) -> list[str]:
    with store.read() as conn:
        return store.lease_owners(conn)


def stale_submitting(
    store: Store, now: float, taker: str = "taker", live: tuple[str, ...] = ()
) -> list[Row]:
    with store.read() as conn:
        return store.stale_submitting(conn, now, taker, live)


def set_batch(store: Store, batch_id: str, **values: Any) -> None:
    with store.write() as conn:
        store.update_batch(conn, batch_id, **values)


def lease_of(store: Store, batch_id: str) -> tuple[str | None, float | None]:
    row = get_batch(store, batch_id)
    return row.lease_owner, row.lease_until


# -- claiming queued batches ------------------------------------------------------------------


def test_claim_moves_due_queued_batches_to_submitting_under_a_lease(store: Store) -> None:
    _job_id, [a, b] = add_job(store, {"not_before": NOW - 1}, {})
    with store.write() as conn:
        claimed = claim_queued(store, conn, "d1", NOW)
    assert [r.id for r in claimed] == [a, b]
    for row in claimed:
        assert (row.status, row.lease_owner, row.lease_until) == ("submitting", "d1", NOW + LEASE)
        assert (row.submit_attempts, row.not_before, row.submitting_at) == (1, None, NOW)
    assert get_batch(store, a)._asdict() == claimed[0]._asdict()


def test_a_claimed_batch_is_not_claimed_again(store: Store) -> None:
    _, [batch_id] = add_job(store)
    with store.write() as conn:
        assert [r.id for r in claim_queued(store, conn, "d1", NOW)] == [batch_id]
    with store.write() as conn:
        assert claim_queued(store, conn, "d2", NOW + 1) == []
        # ...not even once its lease ran out: recovery of `submitting` takes it from there.
        assert claim_queued(store, conn, "d2", NOW + 10 * LEASE) == []
    assert lease_of(store, batch_id) == ("d1", NOW + LEASE)


def test_claims_take_the_oldest_job_first_within_the_limit(store: Store) -> None:
    _newer, [n1] = add_job(store, now=NOW)
    _older, [o2, o1, o_retry] = add_job(
        store,
        {"shard_index": 1},
        {"shard_index": 0},
        {"shard_index": 0, "attempt": 2},
        now=NOW - 100,
    )
    assert [r.id for r in queued_candidates(store, NOW)] == [o1, o2, o_retry, n1]
    with store.write() as conn:
        assert [r.id for r in claim_queued(store, conn, "d1", NOW, limit=2)] == [o1, o2]
    with store.write() as conn:
        assert [r.id for r in claim_queued(store, conn, "d1", NOW, limit=2)] == [o_retry, n1]


def test_claims_skip_batches_not_due_and_jobs_being_cancelled(store: Store) -> None:
    _, [later, due] = add_job(store, {"not_before": NOW + 60}, {"not_before": NOW})
    add_job(store, cancel_requested=True)
    add_job(store, {"status": "submitting"}, {"status": "validating"})
    assert [r.id for r in queued_candidates(store, NOW)] == [due]
    assert [r.id for r in queued_candidates(store, NOW + 60)] == [later, due]


def test_two_claimers_at_once_claim_each_batch_once(store: Store, db_url: str) -> None:
    _, batch_ids = add_job(store, *({} for _ in range(12)))
    other = second_store(db_url)
    barrier = threading.Barrier(2)

    def claimer(s: Store, owner: str) -> list[str]:
        got: list[str] = []
        barrier.wait()
        # A round can come back empty when the other claimer took its candidates first: go on
        # until nothing is queued any more.
        while queued_candidates(s, NOW):
            with s.write() as conn:
                got += [r.id for r in claim_queued(s, conn, owner, NOW, limit=2)]
        return got

    try:
        one = InThread(lambda: claimer(store, "d1"))
        two = InThread(lambda: claimer(other, "d2"))
        mine, theirs = one.result(), two.result()
    finally:
        other.close()
    assert sorted(mine + theirs) == sorted(batch_ids)
    assert all(lease_of(store, b)[0] == "d1" for b in mine)
    assert all(lease_of(store, b)[0] == "d2" for b in theirs)


# -- leases -----------------------------------------------------------------------------------


def test_take_renew_expire_and_take_over(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "completed", "remote_id": "batch_r"})
    first = take_lease(store, batch_id, "d1", NOW, "completed")
    assert first is not None and first.until == NOW + LEASE
    assert lease_of(store, batch_id) == ("d1", NOW + LEASE)
    # Held: nobody takes it, up to and including its last instant, its owner neither.
    assert not take_lease(store, batch_id, "d2", NOW + 1, "completed")
    assert not take_lease(store, batch_id, "d2", NOW + LEASE, "completed")
    assert not take_lease(store, batch_id, "d1", NOW + 10, "completed")
    # Its owner renews it.
    renewed = renew_lease(store, first, NOW + 10 + LEASE)
    assert renewed is not None and lease_of(store, batch_id) == ("d1", NOW + 10 + LEASE)
    # Run out, d1 not known alive: another owner takes it over, and the first one can neither
    # renew it nor take it back.
    second = take_lease(store, batch_id, "d2", NOW + 11 + LEASE, "completed", seconds=30)
    assert second is not None and second.token != first.token
    assert lease_of(store, batch_id) == ("d2", NOW + 41 + LEASE)
    assert renew_lease(store, renewed, NOW + 1000 + LEASE) is None
    assert not take_lease(store, batch_id, "d1", NOW + 12 + LEASE, "completed")
    assert lease_of(store, batch_id) == ("d2", NOW + 41 + LEASE)


def test_a_lease_is_taken_only_in_the_given_status(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "submitting"})
    assert not take_lease(store, batch_id, "d1", NOW, "completed")
    assert not take_lease(store, batch_id, "d1", NOW, ["queued", "validating"])
    assert lease_of(store, batch_id) == (None, None)
    assert take_lease(store, batch_id, "d1", NOW, ["validating", "submitting"])
    assert not take_lease(store, "batch_missing", "d1", NOW, "submitting")


def test_a_live_owners_lease_is_kept_past_its_end(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "submitting"})
    assert take_lease(store, batch_id, "host:1:live", NOW, "submitting")
    after = NOW + LEASE + 1
    live = ("host:1:live", "d2")
    assert not take_lease(store, batch_id, "d2", after, "submitting", live_owners=live)
    assert lease_of(store, batch_id) == ("host:1:live", NOW + LEASE)
    assert take_lease(store, batch_id, "d2", after, "submitting", live_owners=("d2", "other"))
    assert lease_of(store, batch_id) == ("d2", after + LEASE)


def test_a_lease_without_an_end_is_free(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "submitting", "lease_owner": "d1"})
    assert take_lease(store, batch_id, "d2", NOW, "submitting")


def test_release_gives_the_batch_back(store: Store) -> None:
    _, [a, b, c] = add_job(store, *({"status": "completed"} for _ in range(3)))
    leases = {
        batch_id: take_lease(store, batch_id, owner, NOW, "completed")
        for batch_id, owner in ((a, "d1"), (b, "d1"), (c, "d2"))
    }
    assert sorted(lease_owners(store)) == ["d1", "d2"]
    held = leases[c]
    assert held is not None and release_lease(store, held)
    assert lease_of(store, c) == (None, None)
    assert not release_lease(store, held)  # given back already
    assert take_lease(store, c, "d3", NOW + 1, "completed")
    # Every lease of an owner at once (a daemon stopping): the others keep theirs.
    assert release_leases(store, "d1") == 2
    assert release_leases(store, "d1") == 0
    assert lease_of(store, a) == lease_of(store, b) == (None, None)
    assert lease_owners(store) == ["d3"]


def test_a_former_owner_cannot_release_the_new_owners_lease(store: Store) -> None:
    _, [batch_id] = add_job(store, {"status": "completed"})
    old = take_lease(store, batch_id, "d1", NOW, "completed")
    assert old is not None
    assert take_lease(store, batch_id, "d2", NOW + LEASE + 1, "completed")
    # d1's download failed late: it gives back "its" batch, and changes nothing.
    assert not release_lease(store, old)
    assert lease_of(store, batch_id) == ("d2", NOW + 2 * LEASE + 1)


def test_stale_submitting_is_what_recovery_may_take(store: Store) -> None:
    _, [running, expired, endless, alive, mine, _queued] = add_job(
        store,
        {"status": "submitting", "lease_owner": "d1", "lease_until": NOW + 10},
        {"status": "submitting", "lease_owner": "d1", "lease_until": NOW - 1},
        {"status": "submitting"},
        {"status": "submitting", "lease_owner": "host:9:live", "lease_until": NOW - 1},
        {"status": "submitting", "lease_owner": "taker", "lease_until": NOW - 1},
        {"status": "queued", "lease_owner": "d1", "lease_until": NOW - 1},
    )
    everything_run_out = {expired, endless, alive, mine}
    assert {r.id for r in stale_submitting(store, NOW)} == everything_run_out
    live = ("host:9:live", "taker")
    assert {r.id for r in stale_submitting(store, NOW, live=live)} == {expired, endless, mine}
    assert {r.id for r in stale_submitting(store, NOW + 11, live=live)} == {
        running, expired, endless, mine,
    }  # fmt: skip


def test_update_batch_changes_only_the_given_columns(store: Store) -> None:
    _, [a, b] = add_job(store, {"status": "submitting"}, {"status": "submitting"})
    before = get_batch(store, b)
    set_batch(store, a, input_file_id="file_1", lease_until=NOW + 5)
    row = get_batch(store, a)
    assert (row.input_file_id, row.lease_until, row.status) == ("file_1", NOW + 5, "submitting")
    assert get_batch(store, b)._asdict() == before._asdict()
