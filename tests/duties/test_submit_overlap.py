"""Overlapped submission (`submit_concurrency`): several batches uploaded and created at once,
each under its own fenced lease, within the enqueued-token budget; a crash in the middle is
recovered as before; with a concurrency of 1 the duty works as it always did, in its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from jobqueue.duties.submit import claim_next, submit_once
from jobqueue.store import batches, coordination
from jobqueue.testing import Call
from tests.duties.conftest import Crash, World
from tests.duties.test_two_owners import running

OPEN = ("submitting", "validating", "in_progress", "finalizing")


def _batches(world: World, job_id: str) -> list[str]:
    return [b.id for b in world.job(job_id).batches]


def _wait_for(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


class Gauge:
    """How many calls of a method are under way at once, at most, as the remote sees them."""

    def __init__(self, world: World, method: str) -> None:
        self._lock = threading.Lock()
        self.now = self.most = 0
        world.remote.on_call(method, self._enter, times=None, when="before")
        world.remote.on_call(method, self._leave, times=None, when="after")

    def _enter(self, _call: Call) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def _leave(self, _call: Call) -> None:
        with self._lock:
            self.now -= 1


def test_uploads_and_creates_overlap_up_to_the_concurrency(make_world: Callable) -> None:
    """Three uploads are under way at once (none of them ends before all three started: a
    barrier holds each), never more than three; every batch ends up created once."""
    world = make_world(submit_concurrency=3)
    job = world.submit(7, max_batch_requests=1)
    uploads, creates = Gauge(world, "upload_file"), Gauge(world, "create_batch")
    together = threading.Barrier(3, timeout=10)
    world.remote.on_call("upload_file", lambda _c: together.wait(), times=3)

    assert submit_once(world.ctx()) == 7
    assert uploads.most == 3 and creates.most <= 3
    for batch_id in _batches(world, job.id):
        row = world.row(batch_id)
        assert row.status == "validating" and row.lease_owner is None
        assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    threads = {c.thread for c in world.remote.calls_to("create_batch")}
    assert threading.current_thread().name not in threads and len(threads) > 1


def test_concurrent_claims_never_enqueue_more_than_the_budget(make_world: Callable) -> None:
    """Room for two shards: two are uploaded at once (a barrier proves it), the third stays
    queued, and at every upload the tokens of the open batches are within the limit."""
    probe = make_world(enqueued_token_limit=10**12)  # estimates depend on a limit being set
    probe_job = probe.submit(50, max_batch_requests=10)
    tokens = max(probe.row(b).estimated_tokens for b in _batches(probe, probe_job.id))
    probe.jq.cancel(probe_job.id)

    limit = 2 * tokens + 1
    world = make_world(enqueued_token_limit=limit, submit_concurrency=4)
    job = world.submit(50, max_batch_requests=10)
    seen: list[int] = []

    def open_tokens(_call: Call) -> None:
        with world.store.read() as conn:
            seen.append(sum(world.store.open_tokens_by_model(conn).values()))

    together = threading.Barrier(2, timeout=10)
    world.remote.on_call("upload_file", open_tokens, times=None)
    world.remote.on_call("upload_file", lambda _c: together.wait(), times=2)

    assert submit_once(world.ctx()) == 2
    statuses = [world.row(b).status for b in _batches(world, job.id)]
    assert statuses.count("validating") == 2 and statuses.count("queued") == 3
    assert len(seen) == 2 and all(0 < s <= limit for s in seen)
    assert submit_once(world.ctx()) == 0  # still no room: nothing more claimed


def test_a_lease_lost_mid_upload_stops_that_batch_only(world: World) -> None:
    """Daemon one uploads two batches at once; the upload of the first is slow past its lease,
    which daemon two takes over (and holds in its own create). One's other batch is submitted
    as usual; its late write of the first's file is refused by the fence, and one never
    creates the first: the remote holds one batch for each."""
    batch_ids = _batches(world, world.submit(2, max_batch_requests=1).id)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    upload = world.remote.pause("upload_file", when="after")  # whichever batch's comes first
    with running(lambda: submit_once(one), upload) as out_one:
        filename = upload.wait().args["filename"]
        (first,) = [b for b in batch_ids if b in filename]
        (second,) = [b for b in batch_ids if b != first]
        _wait_for(lambda: world.row(second).status == "validating")
        assert world.row(first).status == "submitting"
        world.clock.advance(world.settings.lease_seconds + 1)
        create = world.remote.pause("create_batch")
        with running(lambda: submit_once(two), create) as out_two:
            create.wait()
            held = world.row(first)
            assert held.lease_owner == "daemon-2"
            upload.release()
            _wait_for(lambda: "result" in out_one or "error" in out_one)
            assert out_one == {"result": 1} and one.stats["lost_leases"] == 1
            row = world.row(first)
            assert (row.lease_owner, row.lease_token) == ("daemon-2", held.lease_token)
            assert row.input_file_id == held.input_file_id
            create.release()
        assert out_two["result"] == 2  # recovered (requeued), then submitted
    for batch_id in (first, second):
        row = world.row(batch_id)
        assert row.status == "validating"
        assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    creates = world.remote.calls_to("create_batch")
    assert sorted(c.args["metadata"]["jobqueue_batch_id"] for c in creates) == sorted(batch_ids)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_in_one_create_is_recovered_as_before(make_world: Callable, when: str) -> None:
    """The daemon dies in its second create (before or after the remote made the batch) while
    the others are in flight: they finish, the crash surfaces, and the batch left in
    `submitting` is adopted or requeued by the next daemon once the lease ran out."""
    world = make_world(submit_concurrency=3)
    job = world.submit(3, max_batch_requests=1)
    world.remote.fault("create_batch", Crash, nth=2, when=when)  # type: ignore[arg-type]
    with pytest.raises(Crash):
        submit_once(world.ctx("owner-1"))
    rows = [world.row(b) for b in _batches(world, job.id)]
    (stuck,) = [r for r in rows if r.status == "submitting"]
    assert stuck.lease_owner == "owner-1" and stuck.remote_id is None
    assert sorted(r.status for r in rows) == ["submitting", "validating", "validating"]

    two = world.ctx("owner-2")
    assert submit_once(two) == 0  # owner-1's lease still runs
    world.clock.advance(world.settings.lease_seconds + 1)
    assert submit_once(two) == (1 if when == "after" else 2)
    for batch_id in _batches(world, job.id):
        row = world.row(batch_id)
        assert row.status == "validating" and row.lease_owner is None
        assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]


def test_concurrency_one_submits_one_batch_after_another_in_the_duty_thread(
    make_world: Callable,
) -> None:
    world = make_world(submit_concurrency=1)
    job = world.submit(3, max_batch_requests=1)
    assert submit_once(world.ctx()) == 3
    calls = [c for c in world.remote.calls if c.method in ("upload_file", "create_batch")]
    assert [c.method for c in calls] == ["upload_file", "create_batch"] * 3
    assert {c.thread for c in calls} == {threading.current_thread().name}
    assert [world.row(b).status for b in _batches(world, job.id)] == ["validating"] * 3


def test_the_concurrency_is_a_bounded_setting() -> None:
    from pydantic import ValidationError

    from jobqueue.settings import Settings

    assert Settings().submit_concurrency == 4
    for bad in (0, 65):
        with pytest.raises(ValidationError):
            Settings(submit_concurrency=bad)


def test_two_daemons_claims_are_ordered_so_the_budget_holds(make_world: Callable) -> None:
    """Room for one shard. Daemon two claims one in a transaction still open when daemon one
    comes to claim: one waits for it (the claim lock), then counts two's batch and claims
    nothing, instead of both counting an empty budget."""
    probe = make_world(enqueued_token_limit=10**12)  # estimates depend on a limit being set
    if probe.store.dialect != "postgresql":
        pytest.skip("on SQLite the write lock already orders every writer")
    probe_job = probe.submit(20, max_batch_requests=10)
    tokens = max(probe.row(b).estimated_tokens for b in _batches(probe, probe_job.id))
    probe.jq.cancel(probe_job.id)
    world = make_world(enqueued_token_limit=tokens + 1)
    first, second = _batches(world, world.submit(20, max_batch_requests=10).id)
    one = world.ctx("daemon-1", own_store=True)
    out: dict[str, object] = {}
    thread = threading.Thread(target=lambda: out.update(claimed=claim_next(one)))
    with world.store.write() as conn:
        coordination.serialize_claims(conn)
        assert batches.claim_queued(
            world.store, conn, world.row(first), owner="daemon-2", now=world.clock(),
            lease_seconds=60,
        )  # fmt: skip
        thread.start()
        _wait_for(lambda: _waiting_on_an_advisory_lock(world))
        assert "claimed" not in out
    thread.join(10)
    assert out == {"claimed": None}
    assert world.row(first).lease_owner == "daemon-2" and world.row(second).status == "queued"


def _waiting_on_an_advisory_lock(world: World) -> bool:
    with world.store.read() as conn:
        return bool(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid = 27250 AND objsubid = 2"  # the claim lock (0x6A72, hash)
            ).scalar_one()
        )
