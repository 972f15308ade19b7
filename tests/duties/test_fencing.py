"""Fenced leases and the liveness of daemons, driven a step at a time against the in-memory
remote with a frozen clock: a holder that lost its lease changes nothing and notices; a lease
is taken over only once it ran out and its holder is not a live daemon; a create starts only
while its lease outlives the call; a daemon whose heartbeat cannot be renewed claims nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

import pytest

from jobqueue.duties.collect import collect_once
from jobqueue.duties.context import DutyContext
from jobqueue.duties.heartbeat import heartbeat_once, mark_stopped, register
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.submit import submit_once
from jobqueue.store import Store, daemons
from tests.duties.conftest import CALL_TIMEOUT, Crash, World
from tests.duties.test_two_owners import running

CALL_MARGIN = 10.0  # how much longer than the create's bound a renewed lease runs


def _one_batch(world: World) -> str:
    (batch,) = world.submit(3).batches
    return batch.id


def test_a_paused_holders_late_write_is_refused_by_the_fence(world: World) -> None:
    """Daemon one's upload is done but its answer is slow (its process paused, say) until its
    lease has run out. Daemon two takes the batch over, uploads the shard again and is held in
    its create, the batch still `submitting` under two's lease. One's late write of its file
    id is then refused by the fence alone (the status is what one expects): it changes nothing,
    one notices and stops, and creates nothing."""
    batch_id = _one_batch(world)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    upload = world.remote.pause("upload_file", when="after")
    first: dict[str, int] = {}
    daemon_one = threading.Thread(target=lambda: first.update(moved=submit_once(one)))
    daemon_one.start()
    try:
        upload.wait()
        (one_file,) = world.remote.files("batch")
        world.clock.advance(world.settings.lease_seconds + 1)
        create = world.remote.pause("create_batch")
        with running(lambda: submit_once(two), create) as second:
            create.wait()
            held = world.row(batch_id)
            assert held.status == "submitting" and held.lease_owner == "daemon-2"
            upload.release()
            daemon_one.join(30)
            assert first == {"moved": 0} and one.stats["lost_leases"] == 1
            row = world.row(batch_id)
            assert row.input_file_id == held.input_file_id != one_file.id
            assert (row.lease_owner, row.lease_token) == ("daemon-2", held.lease_token)
            create.release()
        assert second["result"] == 2  # recovered (requeued), then submitted
    finally:
        upload.release()
        daemon_one.join(30)
    row = world.row(batch_id)
    assert row.status == "validating" and row.input_file_id == held.input_file_id
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    assert len(world.remote.calls_to("create_batch")) == 1  # two's: one never got that far


def test_a_create_starts_only_while_the_lease_outlives_it(make_world: Callable) -> None:
    """A lease shorter than the create's bound is renewed to outlive it before the create
    starts: however slow the create, no other daemon takes the batch over until the create can
    no longer take effect (it timed out), and there is one remote batch."""
    world = make_world(lease_seconds=30)
    batch_id = _one_batch(world)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    paused = world.remote.pause("create_batch")
    with running(lambda: submit_once(one), paused) as out:
        started = paused.wait().time
        assert world.row(batch_id).lease_until == started + CALL_TIMEOUT + CALL_MARGIN
        world.clock.advance(31)  # past lease_seconds: the lease still runs
        assert submit_once(two) == 0
        world.clock.set(started + CALL_TIMEOUT + CALL_MARGIN + 1)
        assert submit_once(two) == 2  # taken over, requeued, submitted
        paused.release()
    # One's create was held past its bound: it timed out and never took effect; its lookup
    # found two's batch, whose adoption by one the fence refused.
    assert out["result"] == 0 and one.stats["lost_leases"] == 1
    row = world.row(batch_id)
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]


def _held_by_a_crashed_daemon(world: World, duty: str, owner: str) -> str:
    """`owner` dies in the middle of `duty` on a batch, leaving its lease; the batch id."""
    batch_id = _one_batch(world)
    if duty == "submit":
        world.remote.fault("create_batch", Crash, when="after")
        with pytest.raises(Crash):
            submit_once(world.ctx(owner))
        assert world.row(batch_id).status == "submitting"
    else:
        submit_once(world.ctx("submitter"))
        world.remote.complete(world.row(batch_id).remote_id)
        reconcile_once(world.ctx("submitter"))
        world.remote.fault("download_file", Crash)
        with pytest.raises(Crash):
            collect_once(world.ctx(owner))
        assert world.row(batch_id).status == "completed"
    assert world.row(batch_id).lease_owner == owner
    return batch_id


def _run(world: World, duty: str, owner: str) -> int:
    return (submit_once if duty == "submit" else collect_once)(world.ctx(owner))


@pytest.mark.parametrize("duty", ["submit", "collect"])
@pytest.mark.parametrize("death", ["stale", "stopped"])
def test_a_live_daemon_keeps_its_batch_past_its_lease_a_dead_one_loses_it(
    world: World, duty: str, death: str
) -> None:
    owner = "host-a:4242:a1b2c3"  # another host: its process cannot be looked at from here
    world.register(owner)
    batch_id = _held_by_a_crashed_daemon(world, duty, owner)
    world.clock.set(world.row(batch_id).lease_until + 1)
    assert world.beat(owner)  # alive: its heartbeat is fresh
    assert _run(world, duty, "daemon-2") == 0
    assert world.row(batch_id).lease_owner == owner
    if death == "stale":
        world.clock.advance(world.settings.daemon_timeout + 1)  # not heard of since
    else:
        with world.store.write() as conn:
            assert daemons.mark_daemon_stopped(conn, owner, world.clock())
    assert _run(world, duty, "daemon-2") == 1
    row = world.row(batch_id)
    assert row.lease_owner is None
    if duty == "submit":
        assert row.status == "validating"
        assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    else:
        assert row.collected_at == world.clock()


def test_a_dead_daemons_lease_still_runs_to_its_end(world: World) -> None:
    owner = "host-a:4242:a1b2c3"
    world.register(owner)
    batch_id = _held_by_a_crashed_daemon(world, "submit", owner)
    world.clock.advance(world.settings.daemon_timeout + 1)  # dead, its lease running
    assert world.row(batch_id).lease_until > world.clock()
    assert submit_once(world.ctx("daemon-2")) == 0
    world.clock.set(world.row(batch_id).lease_until + 1)
    assert submit_once(world.ctx("daemon-2")) == 1


def _daemon(world: World, owner: str) -> DutyContext:
    ctx = world.ctx(owner)
    assert register(ctx) and ctx.may_claim()
    return ctx


def test_a_daemon_whose_heartbeat_cannot_be_renewed_claims_nothing(world: World) -> None:
    ctx = _daemon(world, "daemon-1")
    batch_id = _one_batch(world)
    down = Store("postgresql+psycopg://127.0.0.1:1/nowhere", migrate=False)
    try:
        # The database does not answer the heartbeat: no claim until it does.
        assert heartbeat_once(replace(ctx, store=down)) is None
    finally:
        down.close()
    assert ctx.heartbeat is not None and ctx.heartbeat.refused
    assert not ctx.may_claim()
    assert submit_once(ctx) == 0
    assert world.row(batch_id).status == "queued" and world.remote.calls == []
    # It answers again: the daemon claims again.
    assert heartbeat_once(ctx) is not None and ctx.may_claim()
    assert submit_once(ctx) == 1
    assert world.row(batch_id).status == "validating"


def test_a_heartbeat_not_renewed_for_the_timeout_stops_the_claims(world: World) -> None:
    ctx = _daemon(world, "daemon-1")
    batch_id = _one_batch(world)
    world.clock.advance(world.settings.daemon_timeout / 2)  # no renewal since: stale
    assert not ctx.may_claim()
    assert submit_once(ctx) == 0 and collect_once(ctx) == 0
    assert world.row(batch_id).status == "queued"
    assert heartbeat_once(ctx) is not None
    assert submit_once(ctx) == 1


def test_a_daemon_whose_row_says_stopped_claims_nothing(world: World) -> None:
    ctx = _daemon(world, "daemon-1")
    batch_id = _one_batch(world)
    with world.store.write() as conn:  # an operator (or a clean stop) stopped it
        assert daemons.mark_daemon_stopped(conn, "daemon-1", world.clock())
    assert heartbeat_once(ctx) is None
    assert ctx.heartbeat is not None and "stopped" in (ctx.heartbeat.refused or "")
    assert submit_once(ctx) == 0 and world.row(batch_id).status == "queued"
    assert not register(ctx)  # registering again does not undo the stop


def test_a_row_of_another_process_with_our_name_stops_the_claims(world: World) -> None:
    ctx = world.ctx("daemon-1")
    world.register("daemon-1")  # someone else's row (another host and pid) has our name
    assert not register(ctx) and not ctx.may_claim()
    assert ctx.heartbeat is not None and "another process" in (ctx.heartbeat.refused or "")
    _one_batch(world)
    assert submit_once(ctx) == 0


def test_a_forgotten_row_is_registered_again(world: World) -> None:
    ctx = _daemon(world, "daemon-1")
    with world.store.write() as conn:
        assert daemons.forget_daemons(conn, world.clock() + 1) == 1
    assert heartbeat_once(ctx) is not None and ctx.may_claim()
    with world.store.read() as conn:
        assert [r.id for r in daemons.daemon_rows(conn)] == ["daemon-1"]


def test_the_heartbeat_judges_the_other_daemons(world: World) -> None:
    ctx = _daemon(world, "daemon-1")
    for owner in ("host-a:1:aaaaaa", "host-b:2:bbbbbb", "host-c:3:cccccc"):
        world.register(owner)
    world.clock.advance(world.settings.daemon_timeout - 1)
    assert world.beat("host-a:1:aaaaaa")
    with world.store.write() as conn:
        daemons.mark_daemon_stopped(conn, "host-b:2:bbbbbb", world.clock())
    world.clock.advance(2)  # host-c's heartbeat is now older than the timeout
    liveness = heartbeat_once(ctx)
    assert liveness is not None
    assert liveness.alive == {"daemon-1", "host-a:1:aaaaaa"}
    assert liveness.dead == {"host-b:2:bbbbbb", "host-c:3:cccccc"}
    mark_stopped(ctx)
    assert not ctx.may_claim()
    with world.store.read() as conn:
        (row,) = daemons.daemon_rows(conn, ["daemon-1"])
    assert row.stopped_at == world.clock()
