"""Problems on jobs: a batch that cannot be submitted or refreshed puts a short problem on its
job (`Job.problem`, a `job.problem` event once per change, one warning), and takes it off when it
goes away; a submit problem is not cleared by a refresh, nor the other way round."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from jobqueue.duties.collect import collect_once
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.submit import submit_once
from jobqueue.remote import NotFoundError, PermanentRemoteError, TransientRemoteError
from tests.duties.conftest import World

REFUSALS = [
    (PermanentRemoteError("Incorrect API key", status=401, code="invalid_api_key"),
     "credentials", "refused the API key"),
    (PermanentRemoteError("Not allowed", status=403, code="unsupported_country"),
     "permission", "refused permission"),
    (TransientRemoteError("You exceeded your current quota", status=429,
                          code="insufficient_quota"), "quota", "quota is used up"),
    (TransientRemoteError("connection refused"), "unavailable", "the remote is unavailable"),
    (TransientRemoteError("Bad gateway", status=502), "unavailable", "(502)"),
]  # fmt: skip


def _problem_events(world: World, job_id: str) -> list[Any]:
    return [e for e in world.jq.events(job_id) if e.type == "job.problem"]


def _warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and e["event"] == "job problem"]


def _retry_submit(world: World, times: int) -> None:
    """Run submit `times` times, each after the batch's backoff ran out."""
    for _ in range(times):
        world.clock.advance(1000.0)
        submit_once(world.ctx())


@pytest.mark.parametrize(("error", "kind", "text"), REFUSALS)
def test_a_refused_submit_puts_one_problem_on_the_job_until_it_goes_away(
    world: World, error: Exception, kind: str, text: str
) -> None:
    job = world.submit(3)
    rule = world.remote.fault("upload_file", error, times=None)
    with capture_logs() as logs:
        submit_once(world.ctx())
        _retry_submit(world, 2)  # the same refusal, twice more
    assert len(world.remote.calls_to("upload_file")) == 3
    seen = world.job(job.id)
    assert seen.status == "queued" and seen.problem_kind == kind
    assert seen.problem is not None and text in seen.problem
    assert seen.problem_at is not None
    # Once per change: one event and one warning for three refusals.
    (event,) = _problem_events(world, job.id)
    assert event.data["problem"] == seen.problem and event.data["kind"] == kind
    assert event.data["previous"] is None and event.from_status == event.to_status == "queued"
    assert len(_warnings(logs)) == 1

    rule.remove()  # the key is fixed, the remote is back
    _retry_submit(world, 1)
    fixed = world.job(job.id)
    assert fixed.status == "running" and fixed.problem is None and fixed.problem_kind is None
    cleared = _problem_events(world, job.id)[-1]
    assert cleared.data["problem"] is None and cleared.data["previous"] == seen.problem


def test_a_key_refusal_needs_the_operator_and_the_remote_down_does_not(make_world) -> None:
    world = make_world(submit_concurrency=1)  # the faults are scripted by the uploads' order
    keyed, down = world.submit(2), world.submit(2)
    ctx = world.ctx()
    world.remote.fault(
        "upload_file", PermanentRemoteError("bad key", status=401, code="invalid_api_key")
    )
    world.remote.fault("upload_file", TransientRemoteError("timed out"), nth=2)
    submit_once(ctx)
    assert world.job(keyed.id).needs_operator
    assert world.job(down.id).problem is not None and not world.job(down.id).needs_operator


def test_a_problem_that_changes_is_a_new_event(world: World) -> None:
    job = world.submit(2)
    world.remote.fault("upload_file", TransientRemoteError("timed out"))
    submit_once(world.ctx())
    world.remote.fault("upload_file", PermanentRemoteError("bad key", status=401))
    _retry_submit(world, 1)
    first, second = _problem_events(world, job.id)
    assert "unavailable" in first.data["problem"]
    assert "API key" in second.data["problem"] and second.data["previous"] == first.data["problem"]


def test_a_refresh_that_fails_is_a_problem_a_good_refresh_clears(world: World) -> None:
    job = world.submit(2)
    ctx = world.ctx()
    submit_once(ctx)
    assert world.job(job.id).problem is None
    world.remote.fault("retrieve_batch", TransientRemoteError("bad gateway", status=502), times=2)
    with capture_logs() as logs:
        reconcile_once(ctx)
        reconcile_once(ctx)
    seen = world.job(job.id)
    assert seen.problem is not None and "cannot refresh" in seen.problem
    assert len(_problem_events(world, job.id)) == 1 and len(_warnings(logs)) == 1
    # No warning per failed refresh besides the problem's one.
    assert not [e for e in logs if e["event"] == "refresh failed" and e["log_level"] != "debug"]
    reconcile_once(ctx)
    assert world.job(job.id).problem is None


def test_a_remote_batch_gone_is_a_not_found_problem(world: World) -> None:
    job = world.submit(2)
    ctx = world.ctx()
    submit_once(ctx)
    world.remote.fault("retrieve_batch", NotFoundError("No batch found", status=404), times=None)
    reconcile_once(ctx)
    seen = world.job(job.id)
    assert seen.problem_kind == "not_found" and "404" in (seen.problem or "")


def test_a_refresh_does_not_clear_a_submit_problem(make_world) -> None:
    world = make_world(submit_concurrency=1)  # the first shard's success comes before the refusal
    job = world.submit(4, max_batch_requests=2)
    ctx = world.ctx()
    # The first shard goes out, the second is refused.
    world.remote.fault("upload_file", PermanentRemoteError("bad key", status=401), nth=2)
    submit_once(ctx)
    assert world.job(job.id).problem_kind == "credentials"
    reconcile_once(ctx)  # the first shard refreshes fine
    assert world.job(job.id).problem_kind == "credentials"
    assert len(_problem_events(world, job.id)) == 1


def test_an_ended_job_carries_no_problem(world: World) -> None:
    job = world.submit(2, max_attempts=1)
    ctx = world.ctx()
    submit_once(ctx)
    (remote,) = world.remote.batches()
    world.remote.fault("retrieve_batch", TransientRemoteError("bad gateway", status=502))
    reconcile_once(ctx)
    assert world.job(job.id).problem is not None
    world.remote.complete(remote.id)
    reconcile_once(ctx)  # this refresh works: the problem goes with an event
    collect_once(ctx)
    ended = world.job(job.id)
    assert ended.status == "completed" and ended.problem is None


def test_the_token_limit_is_a_problem_that_waits(world: World) -> None:
    job = world.submit(2)
    ctx = world.ctx()
    submit_once(ctx)
    (remote,) = world.remote.batches()
    world.remote.fail(remote.id, "token_limit_exceeded", "Enqueued token limit reached")
    reconcile_once(ctx)
    seen = world.job(job.id)
    assert seen.problem_kind == "token_limit" and not seen.needs_operator
    assert "enqueued-token limit" in (seen.problem or "")
    world.clock.advance(world.settings.token_limit_backoff)
    submit_once(ctx)
    assert world.job(job.id).problem is None


def test_job_start_and_end_are_logged_with_counts(world: World) -> None:
    job = world.submit(3)
    ctx = world.ctx()
    with capture_logs() as logs:
        submit_once(ctx)
        world.remote.complete(world.remote.batches()[0].id, errors={"req-1": 400})
        reconcile_once(ctx)
        collect_once(ctx)
    (started,) = [e for e in logs if e["event"] == "job started"]
    (ended,) = [e for e in logs if e["event"] == "job ended"]
    assert started["job_id"] == job.id and started["requests"] == 3
    assert ended["job_id"] == job.id and ended["status"] == "completed"
    assert (ended["requests"], ended["succeeded"], ended["failed"]) == (3, 2, 1)


def test_a_batch_the_remote_failed_shows_why_while_the_job_goes_on(world: World) -> None:
    job = world.submit(4, max_batch_requests=2)
    ctx = world.ctx()
    submit_once(ctx)
    first, second = world.remote.batches()
    world.remote.fail(first.id, "model_not_found", "The model 'gpt-nope' does not exist")
    reconcile_once(ctx)
    seen = world.job(job.id)
    assert seen.status == "running" and seen.problem_kind == "not_found"
    assert "model_not_found" in (seen.problem or "") and "gpt-nope" in (seen.problem or "")
    world.remote.complete(second.id)
    reconcile_once(ctx)
    collect_once(ctx)
    ended = world.job(job.id)
    assert ended.status == "completed" and ended.request_counts.failed == 2
    assert ended.problem is None  # an ended job carries none
