"""`jobqueue retry` (a new job of an ended job's failed requests, linked to it) and `results
--partial` (the outcomes so far of a running job), on jobs driven through the in-memory remote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobqueue.api import DuplicateJob, InvalidOptions
from jobqueue.cli.app import main
from jobqueue.duties.collect import collect_once
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.retry import retry_once
from jobqueue.duties.submit import submit_once
from tests.duties.conftest import World


def _cli(world: World, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    base = ["--database-url", world.db_url, "--data-dir", str(world.tmp_path / "data")]
    code = main([*base, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _run(world: World, *, errors: dict[str, Any] | None = None) -> None:
    """Submit what is queued, complete every remote batch (with `errors`), collect."""
    ctx = world.ctx()
    for _ in range(3):
        submit_once(ctx)
        for remote in world.remote.batches():
            if remote.status == "validating":
                world.remote.complete(remote.id, errors=errors or {})
        reconcile_once(ctx)
        collect_once(ctx)
        retry_once(ctx)


def _failed_job(world: World) -> str:
    job = world.submit(6, max_attempts=1)
    _run(world, errors={"req-1": 400, "req-3": 500, "req-4": "server_error"})
    ended = world.job(job.id)
    assert ended.status == "completed" and ended.request_counts.failed == 3
    return job.id


def test_retry_makes_a_new_job_of_the_failed_requests(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _failed_job(world)
    source = Path(world.job(old).source)
    code, out, err = _cli(world, capsys, "retry", old)
    assert code == 0, err
    new = world.job(out.strip())
    assert new.retry_of == old and new.status == "queued"
    assert new.request_counts.total == 3 and new.max_attempts == 1
    assert new.endpoint == world.job(old).endpoint
    # The retried requests' own lines, in the old input order.
    originals = {json.loads(line)["custom_id"]: line for line in source.read_text().splitlines()}
    lines = Path(new.source).read_text().splitlines()
    assert lines == [originals[c] for c in ("req-1", "req-3", "req-4")]
    # Run to the end: the new job's results are the retried requests'; the old job's stay.
    _run(world)
    assert world.job(new.id).status == "completed"
    assert [r["custom_id"] for r in world.results(new.id)] == ["req-1", "req-3", "req-4"]
    assert (
        sum(1 for r in world.results(old) if r["error"] or r["response"]["status_code"] >= 400) == 3
    )


def test_retry_with_codes_keeps_only_those(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _failed_job(world)
    code, out, err = _cli(world, capsys, "retry", old, "--code", "500", "--code", "server_error")
    assert code == 0, err
    assert world.job(out.strip()).request_counts.total == 2
    code, _, err = _cli(world, capsys, "retry", old, "--code", "429")
    assert code == 2 and "no failed requests with code 429" in err


def test_a_retry_that_is_still_open_is_not_made_twice(world: World) -> None:
    old = _failed_job(world)
    world.jq.retry(old)
    with pytest.raises(DuplicateJob):
        world.jq.retry(old)


def test_retry_refuses_an_open_job_and_one_without_failures(world: World) -> None:
    running = world.submit(2)
    with pytest.raises(InvalidOptions, match="still queued"):
        world.jq.retry(running.id)
    _run(world)
    assert world.job(running.id).status == "completed"
    with pytest.raises(InvalidOptions, match="no failed requests"):
        world.jq.retry(running.id)
    assert len(world.jq.jobs()) == 1


def test_partial_results_while_the_job_runs(
    world: World, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    job = world.submit(4, max_batch_requests=2)
    ctx = world.ctx()
    submit_once(ctx)
    first = world.remote.batches()[0]
    world.remote.complete(first.id)
    reconcile_once(ctx)
    collect_once(ctx)
    assert world.job(job.id).status == "running"

    code, out, err = _cli(world, capsys, "results", job.id)
    assert code == 2 and out == "" and "--partial" in err
    target = tmp_path / "partial.jsonl"
    code, _, err = _cli(world, capsys, "results", job.id, "--partial", "-o", str(target))
    assert code == 0, err
    done = [json.loads(line)["custom_id"] for line in target.read_text().splitlines()]
    assert len(done) == 2 and "2 still to come" in err
    assert [r["custom_id"] for r in world.jq.results(job.id, partial=True)] == done
    _run(world)
    code, out, _ = _cli(world, capsys, "results", job.id, "--partial")
    assert code == 0 and len(out.splitlines()) == 4  # once it ended, --partial is everything
