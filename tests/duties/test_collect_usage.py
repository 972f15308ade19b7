"""Collect sums each batch's tokens from its lines and checks them against the remote batch's
own `usage`: a difference is logged, but only for a batch whose every request has a line."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from structlog.testing import capture_logs

from jobqueue.duties.collect import collect_once
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.submit import submit_once
from jobqueue.store.tables import batches_table
from tests.duties.conftest import World

WARNING = "usage differs from the remote batch's"


def _completed(world: World, n: int, **complete: object) -> str:
    """A job of `n` requests whose one batch the remote completed; its batch id."""
    job = world.submit(n)
    submit_once(world.ctx())
    (batch,) = world.job(job.id).batches
    remote_id = world.row(batch.id).remote_id
    world.remote.advance(remote_id, "in_progress")
    world.remote.complete(remote_id, **complete)  # type: ignore[arg-type]
    assert reconcile_once(world.ctx()) == 1
    return batch.id


def _remote_says(world: World, batch_id: str, **usage: int) -> None:
    b = batches_table
    with world.store.write() as conn:
        conn.execute(update(b).where(b.c.id == batch_id).values(usage=usage))


@pytest.mark.parametrize("tampered", [False, True])
def test_a_difference_from_the_remote_usage_is_logged(world: World, tampered: bool) -> None:
    batch_id = _completed(world, 5)
    assert world.row(batch_id).input_tokens is None  # not known before collection
    # The in-memory remote's lines each say 1 prompt and 1 completion token; its batch usage
    # is its own estimate: set it to what the lines add up to, or not.
    _remote_says(world, batch_id, input_tokens=5, output_tokens=5 + tampered, total_tokens=10)
    with capture_logs() as logs:
        assert collect_once(world.ctx()) == 1
    row = world.row(batch_id)
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (5, 0, 5)
    warnings = [e for e in logs if e["event"] == WARNING]
    if tampered:
        (warning,) = warnings
        assert warning["output_tokens"] == {"responses": 5, "remote": 6}
        assert "input_tokens" not in warning
    else:
        assert warnings == []


def test_no_check_when_some_requests_have_no_line(world: World) -> None:
    batch_id = _completed(world, 5, missing=["req-3"])
    _remote_says(world, batch_id, input_tokens=10_000, output_tokens=10_000)
    with capture_logs() as logs:
        assert collect_once(world.ctx()) == 1
    assert [e for e in logs if e["event"] == WARNING] == []
    assert world.row(batch_id).input_tokens is not None
