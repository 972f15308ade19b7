"""A webhook for a remote batch not known yet is kept, and reconciled once the batch is adopted;
one whose batch never becomes known is let go after a while."""

from __future__ import annotations

from jobqueue.duties.submit import submit_once
from jobqueue.duties.webhook import (
    keep_seconds,
    pending_webhooks,
    reconcile_batch_by_remote_id,
    retry_pending_webhooks,
)
from tests.duties.conftest import World
from tests.duties.test_two_owners import running


def test_a_webhook_before_the_adoption_is_reconciled_after_it(world: World) -> None:
    (batch,) = world.submit(3).batches
    ctx = world.ctx("daemon-1")
    woken: list[str] = []
    ctx.wake = woken.append
    paused = world.remote.pause("create_batch", when="after")  # created, answer held back
    with running(lambda: submit_once(ctx), paused):
        paused.wait()
        (remote,) = world.remote.batches()
        world.remote.complete(remote.id)
        assert reconcile_batch_by_remote_id(ctx, remote.id) == "pending"
        assert retry_pending_webhooks(ctx) == 0  # still not adopted: kept
        assert remote.id in pending_webhooks(ctx).since
        paused.release()
    assert "webhooks" in woken  # the adoption wakes the duty that retries
    assert world.row(batch.id).status == "validating"
    assert retry_pending_webhooks(ctx) == 1
    assert world.row(batch.id).status == "completed"
    assert not pending_webhooks(ctx).since
    assert ctx.stats["webhook_reconciles"] == 1
    assert retry_pending_webhooks(ctx) == 0


def test_a_webhook_whose_batch_never_becomes_known_is_let_go(world: World) -> None:
    ctx = world.ctx()
    assert reconcile_batch_by_remote_id(ctx, "batch_not_ours") == "pending"
    world.clock.advance(keep_seconds(world.settings) - 1)
    retry_pending_webhooks(ctx)
    assert "batch_not_ours" in pending_webhooks(ctx).since
    world.clock.advance(2)
    calls = len(world.remote.calls)
    assert retry_pending_webhooks(ctx) == 0
    assert not pending_webhooks(ctx).since
    assert len(world.remote.calls) == calls  # nothing asked of the remote for it
