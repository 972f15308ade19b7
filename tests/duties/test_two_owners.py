"""Two daemons on the same work, driven a step at a time: daemon one is held inside a remote
call (an `InMemoryRemote.pause`) while daemon two runs, on a store of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from jobqueue.duties.submit import submit_once
from jobqueue.testing import Pause
from tests.duties.conftest import Crash, World


@contextmanager
def running(fn: Callable[[], object], paused: Pause) -> Iterator[dict[str, object]]:
    """Run `fn` in a thread (daemon one); on exit, release `paused` (if the test did not get
    that far), join the thread and re-raise what it raised."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test thread below
            out["error"] = exc

    thread = threading.Thread(target=target, name="daemon-one")
    thread.start()
    try:
        yield out
    finally:
        paused.release()
        thread.join(timeout=30)
        assert not thread.is_alive(), "daemon one never finished"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]


def _one_batch(world: World) -> str:
    (batch,) = world.submit(3).batches
    return batch.id


def test_a_live_lease_keeps_the_second_daemon_off(world: World) -> None:
    batch_id = _one_batch(world)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    paused = world.remote.pause("create_batch")
    with running(lambda: submit_once(one), paused) as out:
        paused.wait()
        assert world.row(batch_id).lease_owner == "daemon-1"
        calls = len(world.remote.calls)
        assert submit_once(two) == 0  # nothing to claim, nothing stale
        assert len(world.remote.calls) == calls
        paused.release()
    assert out["result"] == 1
    row = world.row(batch_id)
    assert row.status == "validating"
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]


def test_adopted_by_the_second_daemon_while_the_first_waits_for_the_answer(world: World) -> None:
    """Daemon one's create reached the remote, its answer is slow to come back, its lease runs
    out: daemon two recovers the batch by its metadata. Daemon one's call times out meanwhile;
    it looks the batch up and finds it, but its adoption is refused (its lease was lost) and
    changes nothing."""
    batch_id = _one_batch(world)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    paused = world.remote.pause("create_batch", when="after")
    with running(lambda: submit_once(one), paused) as out:
        paused.wait()
        (remote,) = world.remote.batches()
        world.clock.advance(world.settings.lease_seconds + 1)
        assert submit_once(two) == 1
        row = world.row(batch_id)
        assert row.status == "validating" and row.remote_id == remote.id
        paused.release()
    assert out["result"] == 0  # nothing moved by daemon one
    assert one.stats["lost_leases"] == 1
    row = world.row(batch_id)
    assert row.status == "validating" and row.remote_id == remote.id
    assert row.lease_owner is None
    assert len(world.remote.batches()) == 1
    assert world.event_types(row.job_id).count("batch.validating") == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_concurrent_recoveries_of_one_batch(world: World, when: str) -> None:
    """Daemons one and two both find a batch left in `submitting` by a crashed daemon. One is
    held in its recovery lookup: before it (the lookup then sees what two did) or after it
    (it then acts on a stale answer). Its lease runs out meanwhile and two recovers the batch
    and submits it again; one's late recovery then changes nothing (its lookup timed out, and
    giving the batch back is refused: the lease is two's)."""
    batch_id = _one_batch(world)
    world.remote.fault("create_batch", Crash)
    with pytest.raises(Crash):
        submit_once(world.ctx("crashed"))
    world.clock.advance(world.settings.lease_seconds + 1)

    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    paused = world.remote.pause("find_batch_by_metadata", when=when)
    with running(lambda: submit_once(one), paused) as out:
        paused.wait()
        assert world.row(batch_id).lease_owner == "daemon-1"
        assert submit_once(two) == 0  # one holds the lease
        world.clock.advance(world.settings.lease_seconds + 1)
        assert submit_once(two) == 2  # requeued, then submitted
        row = world.row(batch_id)
        assert row.status == "validating"
        paused.release()
    assert out["result"] == 0
    assert one.stats["lost_leases"] == 1
    assert world.row(batch_id).status == "validating"
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    assert len(world.remote.calls_to("create_batch")) == 2  # the crashed one, and two's


@pytest.mark.parametrize("method", ["upload_file", "create_batch"])
def test_a_daemon_held_past_its_lease_makes_no_second_remote_batch(
    world: World, method: str
) -> None:
    """Daemon one is held inside `method`, before it takes effect, until its lease has run out.
    Daemon two finds the batch stale, asks the remote (nothing there yet), requeues it and
    submits it. Then daemon one goes on: its upload is done but recording it is refused by the
    fence (and no create follows); its create, held past its bound, timed out, and adopting
    the batch its lookup then finds (two's) is refused. Either way one notices and stops."""
    batch_id = _one_batch(world)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    paused = world.remote.pause(method)
    with running(lambda: submit_once(one), paused) as out:
        paused.wait()
        world.clock.advance(world.settings.lease_seconds + 1)
        assert submit_once(two) == 2
        adopted = world.row(batch_id)
        assert adopted.status == "validating" and adopted.remote_id is not None
        paused.release()
    row = world.row(batch_id)
    assert row.status == "validating" and row.remote_id == adopted.remote_id
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    assert row.input_file_id == adopted.input_file_id
    assert out["result"] == 0 and one.stats["lost_leases"] == 1
    assert len(world.remote.calls_to("create_batch")) == 1 + (method == "create_batch")
