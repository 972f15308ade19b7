"""Webhook reconcile: an OpenAI webhook said a batch ended; refresh that one batch now instead
of waiting for the next poll. Called by the HTTP server (`jobqueue.service.server`).

A webhook can come before we know its batch: the remote may finish a small batch, and say so,
before the daemon that created it has committed its remote id (or, with several daemons, before
the one that did so is seen here). Such a webhook is kept (`pending`) and tried again by the
`webhooks` duty as soon as a remote batch is adopted (every daemon hears of it), and every
second meanwhile; after `keep_seconds(settings)` an id still unknown is let go: it was not ours,
or the poller has long caught up with it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import observe
from jobqueue.logs import get_logger
from jobqueue.remote.base import RemoteError
from jobqueue.settings import Settings
from jobqueue.store import Row
from jobqueue.store.webhooks import batch_by_remote_id, batches_by_remote_ids

log = get_logger("jobqueue.webhook")

# At most this many unknown ids are kept at once (each webhook is signed, so this only bounds a
# burst of other systems' batches on the same remote account).
MAX_PENDING = 10_000


def keep_seconds(settings: Settings) -> float:
    """How long a webhook for an unknown batch is kept: past a lease, the submitting daemon has
    adopted the batch or a recovery has, and the poller sees it anyway."""
    return settings.lease_seconds + 60.0


@dataclass
class PendingWebhooks:
    """Remote ids of webhooks whose batch was not known yet, with when each first came."""

    since: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def pending_webhooks(ctx: DutyContext) -> PendingWebhooks:
    found = ctx.memo.setdefault("webhooks", PendingWebhooks())
    assert isinstance(found, PendingWebhooks)
    return found


def reconcile_batch_by_remote_id(ctx: DutyContext, remote_id: str) -> str:
    """Refresh one remote batch now: `moved`, `unchanged`, `error`, `pending` (not known yet:
    kept and tried again once it is) or `unknown` (not known, and too many kept already).

    A remote error is left for the poller to catch up on; a replayed webhook changes nothing,
    because observations only ever move a batch forward.
    """
    with ctx.store.read() as conn:
        row = batch_by_remote_id(conn, remote_id)
    if row is None:
        pending = pending_webhooks(ctx)
        with pending.lock:
            if remote_id not in pending.since and len(pending.since) >= MAX_PENDING:
                log.info("webhook for a batch we do not know; ignored", remote_id=remote_id)
                return "unknown"
            pending.since.setdefault(remote_id, ctx.clock())
        ctx.count("webhooks_deferred")
        log.info("webhook for a batch not known yet; kept until it is", remote_id=remote_id)
        return "pending"
    return _reconcile(ctx, row)


def retry_pending_webhooks(ctx: DutyContext) -> int:
    """The `webhooks` duty: reconcile the kept webhooks whose batch is known now; let go of
    those kept too long. Returns how many batches moved."""
    pending = pending_webhooks(ctx)
    with pending.lock:
        if not pending.since:
            return 0
        waiting = dict(pending.since)
    now, keep = ctx.clock(), keep_seconds(ctx.settings)
    with ctx.store.read() as conn:
        known = batches_by_remote_ids(conn, waiting)
    expired = [r for r, since in waiting.items() if r not in known and now - since > keep]
    with pending.lock:
        for remote_id in [*known, *expired]:
            pending.since.pop(remote_id, None)
    for remote_id in expired:
        log.info("webhook's batch never became known; left to the poller", remote_id=remote_id)
    moved = 0
    for row in known.values():
        moved += _reconcile(ctx, row) == "moved"
    return moved


def _reconcile(ctx: DutyContext, row: Row) -> str:
    remote_id = row.remote_id
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
