"""reconcile, collect and retry through the in-memory remote, a step at a time: each test
drives the remote and runs the duties in order, and checks what each step recorded."""

from __future__ import annotations

import json
from pathlib import Path

from jobqueue.duties.collect import collect_once, result_path
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.retry import retry_once
from jobqueue.duties.submit import submit_once
from jobqueue.remote import TransientRemoteError
from tests.duties.conftest import World


def _submitted(world: World, n: int, **options) -> tuple[str, list[str]]:
    """A job of `n` requests, submitted; (job id, remote ids of its batches)."""
    job = world.submit(n, **options)
    submit_once(world.ctx())
    rows = [world.row(b.id) for b in world.job(job.id).batches]
    assert all(r.status == "validating" for r in rows)
    return job.id, [r.remote_id for r in rows]


def _custom_ids(content: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in content.splitlines()]


def test_completed_with_failures_then_retried_to_completion(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 6)
    (batch,) = world.job(job_id).batches

    assert reconcile_once(ctx) == 0  # still validating: nothing moves
    world.clock.advance(10)
    world.remote.advance(remote_id, "in_progress")
    assert reconcile_once(ctx) == 1
    row = world.row(batch.id)
    assert row.status == "in_progress" and row.in_progress_at == world.clock()
    assert row.remote_total == 6

    world.clock.advance(10)
    world.remote.advance(remote_id, "finalizing")
    world.remote.complete(remote_id, errors={"req-1": 500, "req-2": 400}, missing=["req-3"])
    assert reconcile_once(ctx) == 1  # finalizing skipped: the remote was not looked at then
    row = world.row(batch.id)
    assert row.status == "completed"
    assert (row.remote_completed, row.remote_failed) == (3, 2)
    assert row.output_file_id and row.error_file_id and row.usage["output_tokens"] == 6
    assert row.finalizing_at == row.completed_at == world.clock()

    assert collect_once(ctx) == 1
    row = world.row(batch.id)
    assert row.collected_at == world.clock() and row.lease_owner is None
    for kind, file_id in (("output", row.output_file_id), ("error", row.error_file_id)):
        path = result_path(ctx, row, kind)
        assert path.read_bytes() == world.remote.file_content(file_id)
    assert world.job(job_id).status == "running"  # req-1 (a 500) and req-3 (unreported) wait
    assert collect_once(ctx) == 0

    assert retry_once(ctx) == 1
    retry = next(b for b in world.job(job_id).batches if b.attempt == 2)
    assert retry.status == "queued" and retry.request_counts.total == 2
    assert retry_once(ctx) == 0

    submit_once(ctx)
    (upload,) = world.remote.calls_to("upload_file")[1:]
    assert _custom_ids(world.remote.file_content(upload.result.id)) == ["req-1", "req-3"]
    world.remote.complete(world.row(retry.id).remote_id)
    assert reconcile_once(ctx) == 1
    assert collect_once(ctx) == 1

    job = world.job(job_id)
    assert job.status == "completed"
    assert (job.request_counts.completed, job.request_counts.failed) == (5, 1)
    results = world.results(job_id)
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(6)]
    assert results[2]["response"]["status_code"] == 400
    ok = [r for r in results if r["custom_id"] != "req-2"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in ok)
    assert results[3]["response"]["body"]["choices"][0]["message"]["content"] == "echo: Say 3"
    assert world.event_types(job_id)[-1] == "job.completed"


def test_expired_batch_keeps_what_finished_and_retries_the_rest(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 5)
    world.remote.advance(remote_id, "in_progress")
    world.remote.expire(remote_id, finished=2)
    assert reconcile_once(ctx) == 1
    assert collect_once(ctx) == 1
    assert retry_once(ctx) == 1

    retry = next(b for b in world.job(job_id).batches if b.attempt == 2)
    assert retry.request_counts.total == 3
    submit_once(ctx)
    world.remote.complete(world.row(retry.id).remote_id)
    reconcile_once(ctx)
    collect_once(ctx)
    job = world.job(job_id)
    assert job.status == "completed" and job.request_counts.completed == 5
    assert sorted((b.attempt, b.status) for b in job.batches) == [(1, "expired"), (2, "completed")]


def test_cancelled_job_is_cancelled_remotely_and_keeps_partial_results(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 4)
    world.remote.advance(remote_id, "in_progress")
    world.jq.cancel(job_id)  # no key here: the cancel is left to the daemon
    assert world.remote.calls_to("cancel_batch") == []

    assert reconcile_once(ctx) == 1
    (cancel,) = world.remote.calls_to("cancel_batch")
    assert cancel.args == {"batch_id": remote_id}
    assert world.job(job_id).batches[0].status == "cancelling"
    assert reconcile_once(ctx) == 0  # a cancel goes out once

    world.remote.finish_cancel(remote_id, finished=1)
    assert reconcile_once(ctx) == 1
    assert collect_once(ctx) == 1
    assert retry_once(ctx) == 0  # cancelled by the user: nothing is retried
    job = world.job(job_id)
    assert job.status == "cancelled"
    codes = [(r["error"] or {}).get("code") for r in world.results(job_id)]
    assert codes == [None, "batch_cancelled", "batch_cancelled", "batch_cancelled"]


def test_cancel_of_a_batch_that_just_ended_is_refused_and_its_end_recorded(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 2)
    world.jq.cancel(job_id)
    world.remote.complete(remote_id)  # it ended before the cancel reached it
    assert reconcile_once(ctx) == 1
    (cancel,) = world.remote.calls_to("cancel_batch")
    assert cancel.error is not None and cancel.error.status == 409
    assert world.job(job_id).batches[0].status == "completed"
    collect_once(ctx)
    job = world.job(job_id)
    # Every request succeeded before the cancel arrived: it cut nothing short.
    assert job.status == "completed" and job.request_counts.completed == 2


def test_many_open_batches_are_refreshed_by_list_pages(make_world) -> None:
    world = make_world(list_threshold=2)
    ctx = world.ctx()
    job_id, remote_ids = _submitted(world, 10, max_batch_requests=2)
    assert len(remote_ids) == 5
    for remote_id in remote_ids[:3]:
        world.remote.advance(remote_id, "in_progress")
    world.remote.clear_calls()

    assert reconcile_once(ctx) == 3
    assert {c.method for c in world.remote.calls} == {"list_batches"}
    statuses = sorted(b.status for b in world.job(job_id).batches)
    assert statuses == ["in_progress"] * 3 + ["validating"] * 2
    assert ctx.stats["last_cycle_batches"] == 5


def test_a_failed_list_falls_back_to_retrieving_each_batch(make_world) -> None:
    world = make_world(list_threshold=0)
    ctx = world.ctx()
    _job_id, (remote_id,) = _submitted(world, 2)
    world.remote.advance(remote_id, "in_progress")
    world.remote.fault("list_batches", TransientRemoteError("503", status=503))
    world.remote.clear_calls()
    assert reconcile_once(ctx) == 1
    assert [c.method for c in world.remote.calls] == ["list_batches", "retrieve_batch"]


def test_a_batch_the_remote_lost_or_a_failed_refresh_changes_nothing(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 2)
    world.remote.advance(remote_id, "in_progress")
    world.remote.fault("retrieve_batch", TransientRemoteError("503", status=503))
    assert reconcile_once(ctx) == 0
    batch = world.job(job_id).batches[0]
    assert world.row(batch.id).status == "validating"
    with world.store.write() as conn:  # a remote id the remote does not know
        world.store.update_batch(conn, batch.id, remote_id="batch_unknown")
    assert reconcile_once(ctx) == 0
    (lookup,) = world.remote.calls_to("retrieve_batch")[-1:]
    assert lookup.args == {"batch_id": "batch_unknown"} and lookup.error.status == 404
    assert world.row(batch.id).status == "validating"


def test_a_failed_download_is_tried_again(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 3)
    world.remote.complete(remote_id)
    reconcile_once(ctx)
    world.remote.fault("download_file", TransientRemoteError("cut short"))
    assert collect_once(ctx) == 0
    row = world.row(world.job(job_id).batches[0].id)
    assert row.collected_at is None and row.lease_owner is None
    assert not result_path(ctx, row, "output").exists()
    assert collect_once(ctx) == 1
    assert world.job(job_id).status == "completed"


def test_result_file_gone_remotely_counts_its_requests_unreported(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 3, max_attempts=1)
    world.remote.complete(remote_id)
    reconcile_once(ctx)
    world.remote.drop_file(world.remote.batch(remote_id).output_file_id)
    assert collect_once(ctx) == 1
    retry_once(ctx)
    job = world.job(job_id)
    assert job.status == "completed" and job.request_counts.failed == 3
    assert {r["error"]["code"] for r in world.results(job_id)} == {"missing_result"}


def test_validation_failure_fails_the_job(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 3)
    world.remote.fail(remote_id, "invalid_json_line", "Line 2 is not valid JSON.", line=2)
    assert reconcile_once(ctx) == 1
    assert collect_once(ctx) == 1
    job = world.job(job_id)
    assert job.status == "failed" and "invalid_json_line" in (job.error or "")
    assert {r["error"]["code"] for r in world.results(job_id)} == {"invalid_json_line"}


def test_outputs_land_in_the_data_dir(world: World) -> None:
    ctx = world.ctx()
    job_id, (remote_id,) = _submitted(world, 2)
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "chosen"}}]}
    world.remote.complete(remote_id, outputs={"req-0": body})
    reconcile_once(ctx)
    collect_once(ctx)
    row = world.row(world.job(job_id).batches[0].id)
    assert Path(row.output_path).parent == world.jq.data_dir / "jobs" / job_id / "results"
    first = world.results(job_id)[0]
    assert first["response"]["body"] == body
