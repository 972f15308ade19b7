"""Reconcile: refresh every open remote batch and apply what changed.

With few open batches each is retrieved; with many, the list endpoint is walked (100 a page,
newest first) so that ten thousand open batches cost about a hundred calls a cycle. Batches
nearest their remote deadline are refreshed first. Cancels the user asked for go out here too.
"""

from __future__ import annotations

import time

from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import observe, observe_many
from jobqueue.logs import get_logger
from jobqueue.remote.base import NotFoundError, PermanentRemoteError, RemoteBatch, RemoteError
from jobqueue.store import Row

log = get_logger("jobqueue.reconcile")
PAGE_SIZE = 100
# Stop walking pages once they hold batches this much older than our oldest open one.
_CLOCK_SLACK = 600


def reconcile_once(ctx: DutyContext) -> int:
    started = time.perf_counter()
    calls_before = ctx.stats.get("reconcile_calls", 0)
    moved = send_cancels(ctx)
    with ctx.store.read() as conn:
        rows = ctx.store.open_remote_batches(conn)
    if rows:
        moved += observe_many(ctx, refresh(ctx, rows))
    ctx.count("reconcile_cycles")
    ctx.count("reconcile_seconds", time.perf_counter() - started)
    ctx.stats["last_cycle_calls"] = ctx.stats.get("reconcile_calls", 0) - calls_before
    ctx.stats["last_cycle_batches"] = len(rows)
    return moved


def refresh(ctx: DutyContext, rows: list[Row]) -> list[tuple[Row, RemoteBatch]]:
    """The remote object of each row, by single retrieves or by walking list pages."""
    if len(rows) <= ctx.settings.list_threshold:
        return [(row, remote) for row in rows if (remote := _retrieve(ctx, row)) is not None]
    wanted = {row.remote_id: row for row in rows}
    found: dict[str, RemoteBatch] = {}
    oldest = min((row.validating_at or row.created_at) for row in rows) - _CLOCK_SLACK
    after: str | None = None
    while len(found) < len(wanted):
        try:
            page = ctx.provider.list_batches(after=after, limit=PAGE_SIZE)
        except RemoteError as exc:
            log.warning("listing batches failed; retrieving one by one", error=str(exc))
            break
        finally:
            ctx.count("reconcile_calls")
        for remote in page.data:
            if remote.id in wanted:
                found[remote.id] = remote
        if not page.has_more or not page.data or not page.last_id:
            break
        if all(r.created_at is not None and r.created_at < oldest for r in page.data):
            break
        after = page.last_id
    out: list[tuple[Row, RemoteBatch]] = []
    for row in rows:  # keep nearest-deadline-first order
        remote = found.get(row.remote_id) or _retrieve(ctx, row)
        if remote is not None:
            out.append((row, remote))
    return out


def _retrieve(ctx: DutyContext, row: Row) -> RemoteBatch | None:
    ctx.count("reconcile_calls")
    try:
        return ctx.provider.retrieve_batch(row.remote_id)
    except NotFoundError:
        log.error("remote batch not found", batch_id=row.id, remote_id=row.remote_id)
    except RemoteError as exc:
        log.warning("refresh failed", batch_id=row.id, remote_id=row.remote_id, error=str(exc))
    return None


def send_cancels(ctx: DutyContext) -> int:
    """Cancel remotely the batches whose job the user cancelled (or whose deadline passed)."""
    with ctx.store.read() as conn:
        rows = ctx.store.cancel_candidates(conn)
    moved = 0
    for row in rows:
        ctx.count("reconcile_calls")
        try:
            remote = ctx.provider.cancel_batch(row.remote_id)
        except PermanentRemoteError as exc:
            # 409: it ended meanwhile; the refresh below records how.
            log.info("remote cancel refused", batch_id=row.id, error=str(exc))
            continue
        except RemoteError as exc:
            log.warning("remote cancel failed, will retry", batch_id=row.id, error=str(exc))
            continue
        log.info("cancel sent", job_id=row.job_id, batch_id=row.id, remote_id=row.remote_id)
        moved += int(observe(ctx, row.id, remote))
    return moved
