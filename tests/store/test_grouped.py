"""Many batch transitions at once (`Store.transition_batches`): each a compare-and-set with its
event, as `transition_batch` applies them one by one, written with a few statements."""

from __future__ import annotations

import pytest

from jobqueue.core.states import IllegalTransition
from jobqueue.store import BatchChange, Store
from jobqueue.store.batches import Lease
from jobqueue.store.tables import events_table
from tests.store.helpers import NOW, add_job, count, events_of, get_batch


def transition_batches(store: Store, changes: list[BatchChange], now: float = NOW + 5) -> list:
    with store.write() as conn:
        return store.transition_batches(conn, changes, now=now)


def lease_of(store: Store, batch_id: str, owner: str = "d1", token: str = "t1") -> Lease:
    with store.write() as conn:
        store.update_batch(conn, batch_id, lease_owner=owner, lease_token=token, lease_until=NOW)
    return Lease(batch_id, owner, token, NOW)


def test_each_change_applies_with_its_event_in_order(store: Store) -> None:
    job_id, ids = add_job(
        store,
        {"status": "validating"},
        {"status": "validating"},
        {"status": "in_progress", "requests": 3},
        {"status": "submitting"},
    )
    lease = lease_of(store, ids[3])
    changes = [
        # Different columns in each: on PostgreSQL, one statement per set of columns.
        BatchChange(ids[2], "in_progress", "completed",
                    values={"remote_completed": 3, "output_file_id": "file_o",
                            "usage": {"input_tokens": 5}}, data={"reason": "r"}),
        BatchChange(ids[0], "validating", "in_progress", values={"remote_total": 1}, at=NOW - 9),
        BatchChange(ids[1], "validating", "in_progress", values={"remote_total": 1}),
        BatchChange(ids[3], "submitting", "validating",
                    values={"remote_id": "batch_r", "lease_owner": None, "lease_token": None},
                    lease=lease),
    ]  # fmt: skip
    rows = transition_batches(store, changes)
    assert [r.status for r in rows] == ["completed", "in_progress", "in_progress", "validating"]
    for row in rows:
        assert row._asdict() == get_batch(store, row.id)._asdict()
        assert row.updated_at == NOW + 5
    assert rows[0].usage == {"input_tokens": 5} and rows[0].completed_at == NOW + 5
    assert rows[1].in_progress_at == NOW - 9 and rows[2].in_progress_at == NOW + 5
    assert (rows[3].remote_id, rows[3].lease_owner, rows[3].lease_token) == ("batch_r", None, None)
    new = [e for e in events_of(store, job_id) if e.from_status is not None]
    assert [(e.batch_id, e.type, e.from_status, e.to_status) for e in new] == [
        (c.batch_id, f"batch.{c.dest}", c.source, c.dest) for c in changes
    ]
    assert [e.seq for e in new] == sorted(e.seq for e in new)
    assert all(e.created_at == NOW + 5 and e.job_id == job_id for e in new)
    assert new[0].data["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert new[0].data["output_file_id"] == "file_o" and new[0].data["reason"] == "r"
    assert new[3].data["remote_id"] == "batch_r"


def test_a_change_that_does_not_match_moves_nothing_and_writes_no_event(store: Store) -> None:
    """A stale source, or a lease lost, in the middle of a group: that batch stays as it is
    and gets no event; the others of the same group (same columns) move."""
    job_id, ids = add_job(store, *({"status": "submitting"} for _ in range(5)))
    leases = [lease_of(store, batch_id, token=f"t{i}") for i, batch_id in enumerate(ids)]
    stale = Lease(ids[3], "d1", "another-token", NOW)
    before = {i: get_batch(store, ids[i])._asdict() for i in (1, 3)}
    events_before = count(store, events_table)
    values = {"lease_owner": None, "lease_token": None}
    rows = transition_batches(
        store,
        [
            BatchChange(ids[0], "submitting", "validating", values=values, lease=leases[0]),
            BatchChange(ids[1], "validating", "in_progress", values=values, lease=leases[1]),
            BatchChange(ids[2], "submitting", "validating", values=values, lease=leases[2]),
            BatchChange(ids[3], "submitting", "validating", values=values, lease=stale),
            BatchChange(ids[4], "submitting", "validating", values=values, lease=leases[4]),
        ],
    )
    assert [r is not None for r in rows] == [True, False, True, False, True]
    for i in (1, 3):
        assert get_batch(store, ids[i])._asdict() == before[i]
    assert count(store, events_table) == events_before + 3
    new = [e for e in events_of(store, job_id) if e.from_status is not None]
    assert [e.batch_id for e in new] == [ids[0], ids[2], ids[4]]


def test_an_illegal_edge_refuses_the_whole_group_before_any_write(store: Store) -> None:
    _, [a, b] = add_job(store, {"status": "validating"}, {"status": "completed"})
    events_before = count(store, events_table)
    with pytest.raises(IllegalTransition):
        transition_batches(
            store,
            [
                BatchChange(a, "validating", "in_progress"),
                BatchChange(b, "completed", "in_progress"),
            ],
        )
    assert get_batch(store, a).status == "validating"
    assert count(store, events_table) == events_before


def test_a_lease_on_another_batch_is_refused(store: Store) -> None:
    _, [a, b] = add_job(store, {"status": "submitting"}, {"status": "submitting"})
    with pytest.raises(ValueError, match="lease is on batch"):
        transition_batches(
            store, [BatchChange(a, "submitting", "queued", lease=Lease(b, "d", "t", NOW))]
        )


def test_one_batch_changed_twice_sees_its_first_change(store: Store) -> None:
    job_id, [a, b] = add_job(store, {"status": "queued"}, {"status": "queued"})
    rows = transition_batches(
        store,
        [
            BatchChange(a, "queued", "submitting"),
            BatchChange(b, "queued", "submitting"),
            BatchChange(a, "submitting", "queued", values={"last_error": "again"}),
            BatchChange(b, "validating", "in_progress"),  # b is submitting: no match
        ],
    )
    assert [r.status if r else None for r in rows] == ["submitting", "submitting", "queued", None]
    assert get_batch(store, a).last_error == "again"
    new = [e for e in events_of(store, job_id) if e.from_status is not None]
    assert [(e.batch_id, e.to_status) for e in new] == [
        (a, "submitting"), (b, "submitting"), (a, "queued"),
    ]  # fmt: skip


def test_a_rolled_back_group_leaves_no_change_and_no_event(store: Store) -> None:
    _, ids = add_job(store, {"status": "validating"}, {"status": "validating"})
    events_before = count(store, events_table)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.write() as conn:
        store.transition_batches(
            conn, [BatchChange(i, "validating", "in_progress") for i in ids], now=NOW
        )
        raise Boom
    assert {get_batch(store, i).status for i in ids} == {"validating"}
    assert count(store, events_table) == events_before


def test_an_empty_group_writes_nothing(store: Store) -> None:
    events_before = count(store, events_table)
    assert transition_batches(store, []) == []
    assert count(store, events_table) == events_before


def test_an_unknown_column_is_refused(store: Store) -> None:
    _, [a] = add_job(store, {"status": "validating"})
    with pytest.raises(Exception, match="no_such_column"):
        transition_batches(
            store, [BatchChange(a, "validating", "in_progress", values={"no_such_column": 1})]
        )
    assert get_batch(store, a).status == "validating"
