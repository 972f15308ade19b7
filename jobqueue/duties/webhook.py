"""Webhook reconcile: an OpenAI webhook said a batch ended; refresh that one batch now instead
of waiting for the next poll. Called by the HTTP server (`jobqueue.service.server`)."""

from __future__ import annotations

from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import observe
from jobqueue.logs import get_logger
from jobqueue.remote.base import RemoteError
from jobqueue.store.webhooks import batch_by_remote_id

log = get_logger("jobqueue.webhook")


def reconcile_batch_by_remote_id(ctx: DutyContext, remote_id: str) -> str:
    """Refresh one remote batch now: `unknown`, `unchanged`, `moved` or `error`.

    An unknown batch is ignored; a remote error is left for the poller to catch up on; a
    replayed webhook changes nothing, because observations only ever move a batch forward.
    """
    with ctx.store.read() as conn:
        row = batch_by_remote_id(conn, remote_id)
    if row is None:
        log.info("webhook for a batch we do not know; ignored", remote_id=remote_id)
        return "unknown"
    try:
        remote = ctx.provider.retrieve_batch(remote_id)
    except RemoteError as exc:
        log.warning("webhook reconcile failed; the poller will catch up", error=str(exc))
        return "error"
    ctx.count("reconcile_calls")
    ctx.count("webhook_reconciles")
    moved = observe(ctx, row.id, remote)
    log.info("webhook reconciled", batch_id=row.id, remote_id=remote_id, moved=moved)
    return "moved" if moved else "unchanged"
