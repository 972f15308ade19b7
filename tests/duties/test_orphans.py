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


def test_a_paused_holders_late_create_is_swept_and_counted_once(world: World) -> None:
    """Daemon one is held inside its create until its lease has run out; daemon two requeues
    the batch and submits it (adopted). Then daemon one's create goes through: a second remote
    batch for the same local batch, which nothing adopts. Daemon two's reconcile cancels it and,
    once it has ended, deletes its files; the job's results count each request once."""
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
    remotes = world.remote.batches(jobqueue_batch_id=batch.id)
    assert len(remotes) == 2, "the paused create went through late"
    (orphan,) = [r for r in remotes if r.id != adopted.remote_id]

    reconcile_once(two)
    assert world.remote.batch(orphan.id).status == "cancelling"
    assert two.stats["orphan_batches"] == 1
    reconcile_once(two)  # followed, not counted again
    assert two.stats["orphan_batches"] == 1

    world.remote.finish_cancel(orphan.id)  # its error file: three batch_cancelled lines
    cancelled = world.remote.batch(orphan.id)
    assert cancelled.error_file_id is not None
    world.remote.complete(adopted.remote_id)
    reconcile_once(two)
    collect_once(two)
    files = {f.id for f in world.remote.files()}
    assert cancelled.error_file_id not in files
    assert adopted.input_file_id in files, "shared with the adopted batch: kept"
    done = world.job(job.id)
    assert done.status == "completed"
    assert done.request_counts.completed == 3 and done.request_counts.failed == 0
    results = world.results(job.id)
    assert [r["custom_id"] for r in results] == ["req-0", "req-1", "req-2"]
    assert all(r["error"] is None for r in results)
    assert two.stats["orphan_batches"] == 1
    assert world.row(batch.id).remote_id == adopted.remote_id


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
