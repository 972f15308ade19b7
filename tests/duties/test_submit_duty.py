"""submit_once against the in-memory remote: the happy path, every error branch, the
enqueued-token budget, and recovery of batches left in `submitting` by a dead daemon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobqueue.duties.collect import collect_once
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.submit import submit_once
from jobqueue.remote import NotFoundError, PermanentRemoteError, TransientRemoteError
from tests.duties.conftest import Crash, World

SLACK = 600  # how far before a batch's submission recovery looks for its remote batch


def _only_batch(world: World, job_id: str):
    (batch,) = world.job(job_id).batches
    return batch


def test_submit_uploads_the_shard_and_creates_one_remote_batch(world: World) -> None:
    job = world.submit(5, metadata={"team": "eval"})
    batch = _only_batch(world, job.id)
    assert submit_once(world.ctx()) == 1

    row = world.row(batch.id)
    (remote,) = world.remote.batches()
    assert row.status == "validating" and row.remote_id == remote.id
    assert row.lease_owner is None and row.lease_until is None
    assert row.submitting_at == world.clock() and row.validating_at == remote.created_at
    assert remote.metadata == {
        "team": "eval", "jobqueue_batch_id": batch.id, "jobqueue_job_id": job.id,
    }  # fmt: skip
    (upload,) = world.remote.calls_to("upload_file")
    assert upload.args["filename"] == f"jobqueue-{batch.id}.jsonl"
    assert upload.args["expires_after"] == int(world.settings.output_expires_after)
    assert world.remote.file_content(upload.result.id) == Path(row.input_path).read_bytes()
    assert row.input_file_id == upload.result.id == remote.input_file_id
    (create,) = world.remote.calls_to("create_batch")
    assert create.args["endpoint"] == "/v1/chat/completions"
    assert create.args["completion_window"] == "24h"
    assert create.args["output_expires_after"] == int(world.settings.output_expires_after)
    assert world.job(job.id).status == "running"
    assert world.event_types(job.id) == [
        "job.queued", "batch.queued", "batch.submitting", "batch.validating", "job.running",
    ]  # fmt: skip

    # Nothing left to do: no further remote call.
    calls = len(world.remote.calls)
    assert submit_once(world.ctx()) == 0
    assert len(world.remote.calls) == calls


def test_nothing_queued_calls_nothing(world: World) -> None:
    assert submit_once(world.ctx()) == 0
    assert world.remote.calls == []


def test_a_cancelled_job_is_not_submitted(world: World) -> None:
    job = world.submit(3)
    world.jq.cancel(job.id)
    assert submit_once(world.ctx()) == 0
    assert world.remote.calls == []
    assert world.job(job.id).status == "cancelled"


# -- errors of the upload and the create ---------------------------------------------------


@pytest.mark.parametrize("method", ["upload_file", "create_batch"])
def test_transient_error_requeues_after_a_backoff(world: World, method: str) -> None:
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    world.remote.fault(method, TransientRemoteError("503 from the remote", status=503))
    assert submit_once(world.ctx()) == 1

    row = world.row(batch.id)
    now = world.clock()
    assert row.status == "queued" and row.lease_owner is None
    assert row.not_before is not None and now < row.not_before <= now + 5.0
    assert "503 from the remote" in row.last_error
    assert world.remote.batches() == []
    requeued = [e for e in world.jq.events(job.id) if e.type == "batch.queued"][-1]
    assert requeued.data["retry_in_seconds"] <= 5.0
    problem = world.job(job.id).problem
    assert problem is not None and "unavailable" in problem and "503" in problem

    # Not before its time.
    calls = len(world.remote.calls)
    assert submit_once(world.ctx()) == 0
    assert len(world.remote.calls) == calls

    world.clock.advance(5.0)
    assert submit_once(world.ctx()) == 1
    row = world.row(batch.id)
    assert row.status == "validating" and row.submit_attempts == 2
    assert len(world.remote.batches()) == 1
    # A file uploaded before the create failed is used again, not uploaded twice.
    assert len(world.remote.calls_to("upload_file")) == (2 if method == "upload_file" else 1)


def test_lost_create_answer_is_found_and_adopted(world: World) -> None:
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    lost = TransientRemoteError("read timeout", maybe_created=True)
    world.remote.fault("create_batch", lost, when="after")  # created, answer lost
    assert submit_once(world.ctx()) == 1

    (remote,) = world.remote.batches()
    row = world.row(batch.id)
    assert row.status == "validating" and row.remote_id == remote.id
    assert row.input_file_id == remote.input_file_id
    (find,) = world.remote.calls_to("find_batch_by_metadata")
    assert find.args["key"] == "jobqueue_batch_id" and find.args["value"] == batch.id
    assert find.args["created_after"] == int(world.clock() - SLACK)
    assert world.job(job.id).status == "running"


@pytest.mark.parametrize("lookup_fails", [False, True])
def test_uncertain_create_waits_then_recovery_requeues(world: World, lookup_fails: bool) -> None:
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    world.remote.fault("create_batch", TransientRemoteError("reset", maybe_created=True))
    if lookup_fails:
        world.remote.fault("find_batch_by_metadata", TransientRemoteError("502", status=502))
    assert submit_once(world.ctx()) == 1

    # Never created, but it cannot know: the batch stays `submitting` on a short lease.
    row = world.row(batch.id)
    assert row.status == "submitting" and row.lease_owner == "owner-1"
    assert row.lease_until == world.clock() + 30.0
    assert row.last_error.startswith("create uncertain: reset")
    assert world.remote.batches() == []
    assert submit_once(world.ctx()) == 0  # the short lease holds

    world.clock.advance(31.0)
    assert submit_once(world.ctx()) == 2  # recovered (requeued), then submitted
    row = world.row(batch.id)
    assert row.status == "validating"
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch.id)] == [row.remote_id]
    requeued = [e for e in world.jq.events(job.id) if e.type == "batch.queued"][-1]
    assert "the remote had no batch for it" in requeued.data["reason"]


def test_input_file_missing_remotely_is_uploaded_again(world: World) -> None:
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    world.remote.fault("create_batch", NotFoundError("No such File object", status=404))
    assert submit_once(world.ctx()) == 1

    row = world.row(batch.id)
    assert row.status == "queued" and row.input_file_id is None and row.not_before is None
    assert submit_once(world.ctx()) == 1
    first, second = world.remote.calls_to("upload_file")
    row = world.row(batch.id)
    assert row.status == "validating" and row.input_file_id == second.result.id
    assert world.remote.batch(row.remote_id).input_file_id == second.result.id != first.result.id


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_keep_the_batch_queued(world: World, status: int) -> None:
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    world.remote.fault("create_batch", PermanentRemoteError("bad key", status=status))
    assert submit_once(world.ctx()) == 1

    row = world.row(batch.id)
    assert row.status == "queued" and "bad key" in row.last_error
    assert row.not_before is not None and row.not_before <= world.clock() + 30.0
    assert world.job(job.id).status == "queued"  # the work is not thrown away
    world.clock.advance(30.0)
    assert submit_once(world.ctx()) == 1
    assert world.row(batch.id).status == "validating"


@pytest.mark.parametrize("method", ["upload_file", "create_batch"])
def test_permanent_refusal_fails_the_batch_and_the_job(world: World, method: str) -> None:
    job = world.submit(4)
    batch = _only_batch(world, job.id)
    refusal = PermanentRemoteError("metadata too long", status=400, code="invalid_value")
    world.remote.fault(method, refusal)
    assert submit_once(world.ctx()) == 1

    row = world.row(batch.id)
    assert row.status == "failed" and row.lease_owner is None
    assert row.last_error.startswith("invalid_value: metadata too long")
    assert row.collected_at == world.clock()
    job = world.job(job.id)
    assert job.status == "failed" and "invalid_value" in (job.error or "")
    assert job.request_counts.failed == 4
    assert {r["error"]["code"] for r in world.results(job.id)} == {"invalid_value"}
    assert world.remote.batches() == []
    assert world.event_types(job.id)[-2:] == ["batch.failed", "job.failed"]


def test_unreadable_shard_fails_the_batch(world: World) -> None:
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    Path(world.row(batch.id).input_path).unlink()
    assert submit_once(world.ctx()) == 1

    row = world.row(batch.id)
    assert row.status == "failed" and row.last_error.startswith("submission_refused:")
    assert world.job(job.id).status == "failed"
    (upload,) = world.remote.calls_to("upload_file")
    assert isinstance(upload.error, FileNotFoundError)
    assert world.remote.calls_to("create_batch") == []


# -- the enqueued-token limit --------------------------------------------------------------


TOKEN_LIMIT_MESSAGE = "Enqueued token limit reached for gpt-4o-mini in organization org-x."


def _refuse_for_token_limit(world: World, batch_id: str) -> str:
    """The remote fails the submitted batch for the token limit; reconcile sees it. Return the
    id of the batch its requests were queued in again."""
    job_id = world.row(batch_id).job_id
    world.remote.fail(world.row(batch_id).remote_id, "token_limit_exceeded", TOKEN_LIMIT_MESSAGE)
    assert reconcile_once(world.ctx()) == 1
    assert world.row(batch_id).status == "failed"
    (queued,) = [b for b in world.job(job_id).batches if b.status == "queued"]
    return queued.id


def test_token_limit_refusal_requeues_the_requests(world: World) -> None:
    job = world.submit(4)
    first = _only_batch(world, job.id)
    ctx = world.ctx()
    submit_once(ctx)
    uploaded = world.row(first.id).input_file_id

    again = _refuse_for_token_limit(world, first.id)
    row = world.row(again)
    assert row.not_before == world.clock() + world.settings.token_limit_backoff
    assert row.last_error == "token_limit_exceeded x1"
    assert row.attempt == 1 and row.input_file_id == uploaded  # no attempt, no new upload
    assert row.request_count == 4
    assert world.job(job.id).status == "running"
    failed = [e for e in world.jq.events(job.id) if e.type == "batch.failed"]
    assert [e.data["reason"] for e in failed] == ["token_limit_exceeded"]
    requeued = [e for e in world.jq.events(job.id) if e.type == "batch.queued"][-1]
    assert requeued.data["requeued_from"] == first.id
    assert "enqueued-token limit" in (world.job(job.id).problem or "")

    assert submit_once(ctx) == 0  # not before its backoff
    world.clock.advance(world.settings.token_limit_backoff)
    assert submit_once(ctx) == 1
    assert world.row(again).status == "validating"
    assert len(world.remote.calls_to("upload_file")) == 1
    assert world.remote.batch(world.row(again).remote_id).input_file_id == uploaded

    world.remote.complete(world.row(again).remote_id)
    reconcile_once(ctx)
    collect_once(ctx)
    job = world.job(job.id)
    assert job.status == "completed" and job.request_counts.completed == 4


def test_token_limit_backoff_doubles_with_each_refusal(world: World) -> None:
    job = world.submit(4)
    submit_once(world.ctx())
    backoff = world.settings.token_limit_backoff
    again = _refuse_for_token_limit(world, _only_batch(world, job.id).id)
    world.clock.advance(backoff)
    assert submit_once(world.ctx()) == 1
    third = _refuse_for_token_limit(world, again)
    assert world.row(third).not_before == world.clock() + 2 * backoff


def test_enqueued_token_budget_holds_batches_back(make_world) -> None:
    # (Under a limit, intake estimates each request's tokens: the probe has one too.)
    probe = make_world(enqueued_token_limit=10**9)
    job = probe.submit(20, max_batch_requests=10)
    tokens = [probe.row(b.id).estimated_tokens for b in probe.job(job.id).batches]
    probe.jq.cancel(job.id)
    assert len(tokens) == 2 and all(tokens)

    # Room for one shard's tokens at a time.
    world = make_world(enqueued_token_limit=max(tokens) + 1)
    job = world.submit(20, max_batch_requests=10)
    ctx = world.ctx()
    assert submit_once(ctx) == 1
    first, second = world.job(job.id).batches
    assert (first.status, second.status) == ("validating", "queued")
    assert submit_once(ctx) == 0  # still no room

    world.remote.complete(world.row(first.id).remote_id)
    assert reconcile_once(ctx) == 1  # the first ended: its tokens are free
    assert submit_once(ctx) == 1
    assert world.row(second.id).status == "validating"


def test_a_batch_bigger_than_the_budget_still_goes_alone(make_world) -> None:
    world = make_world(enqueued_token_limit=1)
    job = world.submit(20, max_batch_requests=10)
    assert submit_once(world.ctx()) == 1
    assert [b.status for b in world.job(job.id).batches] == ["validating", "queued"]


# -- recovery of batches left in `submitting` ----------------------------------------------


def _crash_in_create(world: World, owner: str, when: str) -> str:
    """Daemon `owner` claims the job's batch and dies inside the remote create (before or
    after the remote made the batch); return the batch id."""
    job = world.submit(3)
    batch = _only_batch(world, job.id)
    world.remote.fault("create_batch", Crash, when=when)  # type: ignore[arg-type]
    with pytest.raises(Crash):
        submit_once(world.ctx(owner))
    row = world.row(batch.id)
    assert row.status == "submitting" and row.lease_owner == owner and row.remote_id is None
    return batch.id


def test_recovery_adopts_the_batch_the_remote_has(world: World) -> None:
    batch_id = _crash_in_create(world, "owner-1", when="after")
    (remote,) = world.remote.batches(jobqueue_batch_id=batch_id)
    submitted_at = world.row(batch_id).submitting_at

    ctx = world.ctx("owner-2")
    assert submit_once(ctx) == 0  # owner-1's lease still runs
    assert world.remote.calls_to("find_batch_by_metadata") == []

    world.clock.advance(world.settings.lease_seconds + 1)
    assert submit_once(ctx) == 1
    row = world.row(batch_id)
    assert row.status == "validating" and row.remote_id == remote.id
    assert row.input_file_id == remote.input_file_id and row.lease_owner is None
    (find,) = world.remote.calls_to("find_batch_by_metadata")
    assert find.args["created_after"] == int(submitted_at - SLACK)
    assert len(world.remote.calls_to("create_batch")) == 1  # only the one that crashed
    assert world.job(row.job_id).status == "running"


def test_recovery_requeues_what_the_remote_never_saw(world: World) -> None:
    batch_id = _crash_in_create(world, "owner-1", when="before")
    assert world.remote.batches() == []

    world.clock.advance(world.settings.lease_seconds + 1)
    ctx = world.ctx("owner-2")
    assert submit_once(ctx) == 2  # requeued, then claimed and submitted again
    row = world.row(batch_id)
    assert row.status == "validating" and row.submit_attempts == 2
    assert [b.id for b in world.remote.batches(jobqueue_batch_id=batch_id)] == [row.remote_id]
    assert len(world.remote.calls_to("upload_file")) == 1  # the first upload is reused
    types = world.event_types(row.job_id)
    assert types[-4:] == ["batch.queued", "batch.submitting", "batch.validating", "job.running"]


def test_failed_recovery_lookup_leaves_the_batch_for_later(world: World) -> None:
    batch_id = _crash_in_create(world, "owner-1", when="after")
    world.clock.advance(world.settings.lease_seconds + 1)
    world.remote.fault("find_batch_by_metadata", TransientRemoteError("502", status=502))
    ctx = world.ctx("owner-2")
    assert submit_once(ctx) == 0
    row = world.row(batch_id)
    assert row.status == "submitting" and row.lease_owner is None  # released for a later try

    assert submit_once(ctx) == 1
    assert world.row(batch_id).status == "validating"
    assert len(world.remote.batches()) == 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lease_of_a_gone_local_daemon_is_taken_once_it_ran_out(world: World) -> None:
    """A daemon of this host whose process is gone is dead at once, its heartbeat fresh or not
    (the fast path); still, its batch lease is taken over only once it has run out: the create
    it may have sent could take effect until then."""
    dead = f"{socket.gethostname()}:{_dead_pid()}:a1b2c3"
    world.register(dead)
    batch_id = _crash_in_create(world, dead, when="after")
    (remote,) = world.remote.batches()
    assert submit_once(world.ctx("owner-2")) == 0
    world.clock.set(world.row(batch_id).lease_until + 1)
    assert world.beat(dead)  # its row looks alive: only its process says otherwise
    assert submit_once(world.ctx("owner-2")) == 1
    assert world.row(batch_id).remote_id == remote.id


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(f"{socket.gethostname()}:{os.getppid()}:a1b2c3", id="live-process"),
        pytest.param(f"{socket.gethostname()}:{os.getpid()}:a1b2c3", id="this-process"),
        pytest.param("other-host:1:a1b2c3", id="other-host"),
    ],
)
def test_the_lease_of_a_live_or_unknown_daemon_is_respected(world: World, owner: str) -> None:
    batch_id = _crash_in_create(world, owner, when="after")
    assert submit_once(world.ctx("owner-2")) == 0
    assert world.row(batch_id).lease_owner == owner
    world.clock.advance(world.settings.lease_seconds + 1)
    assert submit_once(world.ctx("owner-2")) == 1
