"""The orphan sweep: a remote batch that names a local batch of ours but is not the one adopted
for it is cancelled, its files deleted, counted, and nothing of it reaches the results."""

from __future__ import annotations

from pathlib import Path

from jobqueue.duties import orphans
from jobqueue.duties.collect import collect_once
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.submit import JOB_METADATA_KEY, METADATA_KEY, submit_once
from jobqueue.remote.base import RemoteBatch
from tests.duties.conftest import ENDPOINT, World
from tests.duties.test_two_owners import running
from tests.factories import chat_file


def _late_create(world: World, metadata: dict[str, str]) -> RemoteBatch:
    """A create made behind our back, as a paused process would make it late."""
    path = chat_file(world.tmp_path / "late.jsonl", 1)
    file = world.remote.upload_file(Path(path), "jobqueue-late.jsonl")
    return world.remote.create_batch(
        input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h",
        metadata=metadata, output_expires_after=None,
    )  # fmt: skip


def _late_twin(world: World, batch_id: str) -> RemoteBatch:
    """The create of a holder that was paused past its lease (after its last check of it, its
    request not sent yet): it reaches the remote once another daemon has submitted the batch
    again and adopted that remote batch. Same metadata, same uploaded input file."""
    row = world.row(batch_id)
    assert row.status != "submitting" and row.remote_id is not None
    job = world.job(row.job_id)
    return world.remote.create_batch(
        input_file_id=row.input_file_id, endpoint=ENDPOINT, completion_window="24h",
        metadata={METADATA_KEY: batch_id, JOB_METADATA_KEY: job.id},
        output_expires_after=int(world.settings.output_expires_after),
    )  # fmt: skip


def test_a_paused_holders_late_create_is_cancelled_and_its_files_deleted(world: World) -> None:
    job = world.submit(3)
    (batch,) = job.batches
    ctx = world.ctx("leader")
    assert submit_once(ctx) == 1
    adopted = world.row(batch.id)
    orphan = _late_twin(world, batch.id)
    assert len(world.remote.batches(jobqueue_batch_id=batch.id)) == 2

    reconcile_once(ctx)
    assert world.remote.batch(orphan.id).status == "cancelling"
    assert ctx.stats["orphan_batches"] == 1
    reconcile_once(ctx)  # followed by id, not counted again
    assert ctx.stats["orphan_batches"] == 1

    world.remote.finish_cancel(orphan.id, finished=1)  # one request ran: output and error files
    cancelled = world.remote.batch(orphan.id)
    assert cancelled.output_file_id and cancelled.error_file_id
    world.remote.complete(adopted.remote_id)
    reconcile_once(ctx)
    collect_once(ctx)
    files = {f.id for f in world.remote.files()}
    assert cancelled.output_file_id not in files and cancelled.error_file_id not in files
    assert adopted.input_file_id in files, "shared with the adopted batch: kept"
    _assert_counted_once(world, job.id)
    assert ctx.stats["orphan_batches"] == 1
    assert world.row(batch.id).remote_id == adopted.remote_id


def test_an_orphan_that_ran_to_the_end_reaches_no_result(world: World) -> None:
    """The worst case: the orphan ran all its requests before the sweep saw it. Its files are
    deleted, and the job counts each request once, from the adopted batch."""
    job = world.submit(3)
    (batch,) = job.batches
    ctx = world.ctx("leader")
    submit_once(ctx)
    adopted = world.row(batch.id)
    orphan = world.remote.complete(_late_twin(world, batch.id).id)
    world.remote.complete(adopted.remote_id)
    reconcile_once(ctx)
    collect_once(ctx)
    assert ctx.stats["orphan_batches"] == 1
    assert world.remote.batch(orphan.id).status == "completed"  # nothing left to cancel
    assert orphan.output_file_id not in {f.id for f in world.remote.files()}
    _assert_counted_once(world, job.id)


def _assert_counted_once(world: World, job_id: str) -> None:
    done = world.job(job_id)
    assert done.status == "completed"
    assert done.request_counts.completed == 3 and done.request_counts.failed == 0
    assert [b.remote_id for b in done.batches] == [world.row(done.batches[0].id).remote_id]
    results = world.results(job_id)
    assert [r["custom_id"] for r in results] == ["req-0", "req-1", "req-2"]
    assert all(r["error"] is None for r in results)


def test_a_late_create_raced_by_a_recovery_is_swept(world: World) -> None:
    """The interleaving itself, as the remote sees it when nothing stops it: daemon one is held
    in its create until its lease has run out, daemon two requeues and submits the batch, then
    daemon one's create goes through, or (where the call timed out meanwhile) does not.
    Whatever came of it, one remote batch is adopted and any other one is swept."""
    job = world.submit(3)
    (batch,) = job.batches
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2", own_store=True)
    paused = world.remote.pause("create_batch")
    with running(lambda: submit_once(one), paused):
        paused.wait()
        world.clock.advance(world.settings.lease_seconds + 1)
        assert submit_once(two) == 2  # requeued (the remote had nothing), then submitted
        paused.release()
    adopted = world.row(batch.id)
    assert adopted.status == "validating"
    others = [
        r.id for r in world.remote.batches(jobqueue_batch_id=batch.id) if r.id != adopted.remote_id
    ]
    reconcile_once(two)
    assert two.stats.get("orphan_batches", 0) == len(others)
    assert all(world.remote.batch(r).status == "cancelling" for r in others)
    for remote_id in others:
        world.remote.finish_cancel(remote_id)
    world.remote.complete(adopted.remote_id)
    reconcile_once(two)
    collect_once(two)
    _assert_counted_once(world, job.id)


def test_which_remote_batches_are_orphans(world: World) -> None:
    job = world.submit(3, max_batch_requests=1)
    first, second, third = (b.id for b in job.batches)
    ctx = world.ctx("leader")
    assert submit_once(ctx) == 3
    # `second` goes back to queued: a remote batch naming it is not decided yet.
    with world.store.write() as conn:
        world.store.update_batch(conn, second, status="queued", remote_id=None)
    adopted = world.row(first).remote_id
    twin = _late_create(world, {METADATA_KEY: first, JOB_METADATA_KEY: job.id})
    undecided = _late_create(world, {METADATA_KEY: second, JOB_METADATA_KEY: job.id})
    lost = _late_create(world, {METADATA_KEY: "batch_never_recorded", JOB_METADATA_KEY: job.id})
    foreign = _late_create(world, {METADATA_KEY: third, JOB_METADATA_KEY: "job_of_another_db"})
    untagged = _late_create(world, {"user": "x"})

    reconcile_once(ctx)
    status = {b.id: b.status for b in world.remote.batches()}
    assert status[twin.id] == status[lost.id] == "cancelling"
    assert status[undecided.id] == status[foreign.id] == status[untagged.id] == "validating"
    assert status[adopted] == "validating"
    assert ctx.stats["orphan_batches"] == 2


def test_the_sweep_walks_the_list_every_so_often_when_batches_are_retrieved(
    world: World,
) -> None:
    """With few open batches each is retrieved (no list call); the list is walked for orphans
    on the first cycle and then every `WALK_EVERY` seconds, back to the previous walk."""
    job = world.submit(3)
    ctx = world.ctx("leader")
    submit_once(ctx)
    reconcile_once(ctx)
    assert len(world.remote.calls_to("list_batches")) == 1  # the first walk
    twin = _late_create(world, {METADATA_KEY: job.batches[0].id, JOB_METADATA_KEY: job.id})
    world.remote.clear_calls()
    reconcile_once(ctx)
    assert world.remote.calls_to("list_batches") == []
    assert world.remote.batch(twin.id).status == "validating"
    world.clock.advance(orphans.WALK_EVERY)
    reconcile_once(ctx)
    assert len(world.remote.calls_to("list_batches")) == 1
    assert world.remote.batch(twin.id).status == "cancelling"


def test_the_list_walk_of_many_open_batches_finds_orphans_as_it_goes(make_world) -> None:
    world: World = make_world(list_threshold=0)
    job = world.submit(4, max_batch_requests=2)
    ctx = world.ctx("leader")
    submit_once(ctx)
    reconcile_once(ctx)
    twin = _late_create(world, {METADATA_KEY: job.batches[1].id, JOB_METADATA_KEY: job.id})
    world.remote.clear_calls()
    reconcile_once(ctx)  # no walk of its own is due: the cycle's walk saw it
    assert world.remote.batch(twin.id).status == "cancelling"
    assert [c.method for c in world.remote.calls] == ["list_batches", "cancel_batch"]
