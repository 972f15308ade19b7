"""The orphan sweep: remote batches made for a local batch that adopted another one.

Fenced leases keep a daemon from starting a create it may not finish, but they cannot stop a
create already under way in a process that was paused past its lease, or one whose answer was
lost after another daemon gave up on it: the remote then holds a second batch that names a local
batch (`jobqueue_batch_id`) of a job of ours (`jobqueue_job_id`) but is not the one adopted for
it. Such an orphan is cancelled, its files are deleted (its input only when no local batch uses
that file), it is counted (`orphan_batches`, `jobqueue_orphan_batches_total`) and logged with
both ids. Nothing of it is ever collected: only adopted remote batches are.

A remote batch is an orphan when its local batch adopted another remote id, or ended without
one (refused, cancelled before submission), or does not exist while its job does. One whose
local batch is still `queued` or `submitting` is not decided yet: it may be about to be adopted.

The sweep runs on the leader, inside the reconcile cycle: it looks at every batch the cycle's
list walk saw, and every `WALK_EVERY` seconds it walks the list back over what was created since
the previous such walk (the first one after a start: `FIRST_LOOKBACK`), so orphans are found
when few batches are open too (refreshed one by one, without listing). Orphans found are
followed by id until they have ended and their files are gone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jobqueue.core.states import BATCH_TERMINAL, BatchStatus
from jobqueue.duties.context import DutyContext
from jobqueue.duties.submit import JOB_METADATA_KEY, METADATA_KEY
from jobqueue.logs import get_logger
from jobqueue.remote.base import NotFoundError, PermanentRemoteError, RemoteBatch, RemoteError
from jobqueue.store import Row, orphans

log = get_logger("jobqueue.orphans")

PAGE_SIZE = 100
WALK_EVERY = 300.0
FIRST_LOOKBACK = 24 * 3600.0
MAX_WALK_PAGES = 200
_CLOCK_SLACK = 600.0
_UNDECIDED = frozenset({BatchStatus.QUEUED, BatchStatus.SUBMITTING})
_CANCELLABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})
_ENDED = frozenset(s.value for s in BATCH_TERMINAL)
_DONE_KEPT = 100_000


@dataclass
class SweepState:
    """The sweep's progress in this process (`ctx.memo["orphans"]`)."""

    next_walk_at: float = 0.0
    last_walk_from: float | None = None
    # Orphans found and not finished with: remote id -> local batch id.
    pending: dict[str, str] = field(default_factory=dict)
    # Remote batches never to look at again: orphans finished with (ended, files deleted),
    # adopted ones and other installations' (the newest `_DONE_KEPT`).
    done: dict[str, None] = field(default_factory=dict)


def state(ctx: DutyContext) -> SweepState:
    found = ctx.memo.get("orphans")
    if not isinstance(found, SweepState):
        found = ctx.memo["orphans"] = SweepState()
    return found


def walk_horizon(ctx: DutyContext) -> float | None:
    """When a walk is due, the creation time it walks back to (and the walk counts as done);
    None otherwise."""
    now, sweep = ctx.clock(), state(ctx)
    if now < sweep.next_walk_at:
        return None
    since = sweep.last_walk_from if sweep.last_walk_from is not None else now - FIRST_LOOKBACK
    sweep.last_walk_from, sweep.next_walk_at = now, now + WALK_EVERY
    return since - _CLOCK_SLACK


def walk_back(ctx: DutyContext, horizon: float) -> list[RemoteBatch]:
    """List pages, newest first, until they hold only batches created before `horizon`."""
    seen: list[RemoteBatch] = []
    after: str | None = None
    for _ in range(MAX_WALK_PAGES):
        try:
            page = ctx.provider.list_batches(after=after, limit=PAGE_SIZE)
        except RemoteError as exc:
            log.warning("listing batches for the orphan sweep failed", error=str(exc))
            state(ctx).next_walk_at = ctx.clock()  # try again next cycle
            break
        finally:
            ctx.count("reconcile_calls")
        seen.extend(page.data)
        if not page.has_more or not page.data or not page.last_id:
            break
        if all(r.created_at is not None and r.created_at < horizon for r in page.data):
            break
        after = page.last_id
    return seen


def sweep(ctx: DutyContext, seen: Iterable[RemoteBatch], adopted: set[str]) -> int:
    """Find the orphans among `seen` (remote batches the cycle listed; `adopted`: the remote
    ids of our open batches, known not to be orphans), and go on with those found before.
    Returns how many orphans were found for the first time."""
    sweep_state = state(ctx)
    seen_by_id = {remote.id: remote for remote in seen}
    candidates: dict[str, RemoteBatch] = {}
    for remote in seen_by_id.values():
        meta = remote.metadata
        if (
            remote.id in adopted
            or remote.id in sweep_state.done
            or remote.id in sweep_state.pending
            or not meta.get(METADATA_KEY)
            or not meta.get(JOB_METADATA_KEY)
        ):
            continue
        candidates[remote.id] = remote
    found = 0
    if candidates:
        with ctx.store.read() as conn:
            local = orphans.local_batches(
                conn, (r.metadata[METADATA_KEY] for r in candidates.values())
            )
            jobs = orphans.known_jobs(
                conn, (r.metadata[JOB_METADATA_KEY] for r in candidates.values())
            )
        for remote in candidates.values():
            row = local.get(remote.metadata[METADATA_KEY])
            if not is_orphan(remote, row, jobs):
                if _settled_for_good(remote, row, jobs):
                    _remember(sweep_state, remote.id)  # adopted, or not ours: for good
                continue
            found += 1
            ctx.count("orphan_batches")
            log.warning(
                "orphan remote batch: cancelling it and deleting its files",
                batch_id=remote.metadata[METADATA_KEY], job_id=remote.metadata[JOB_METADATA_KEY],
                orphan_remote_id=remote.id, adopted_remote_id=row.remote_id if row else None,
                status=remote.status,
            )  # fmt: skip
            sweep_state.pending[remote.id] = remote.metadata[METADATA_KEY]
            _settle(ctx, remote)
    for remote_id in [r for r in sweep_state.pending if r not in candidates]:
        fresh = seen_by_id.get(remote_id)
        if fresh is not None:
            _settle(ctx, fresh)  # listed this cycle: no need to ask again
        else:
            _follow(ctx, remote_id)
    return found


def is_orphan(remote: RemoteBatch, row: Row[Any] | None, jobs: set[str]) -> bool:
    """Whether `remote` (naming a local batch and job in its metadata) is an orphan, given the
    local batch it names (`row`, None when there is none) and which named jobs are ours."""
    if row is None:
        return remote.metadata.get(JOB_METADATA_KEY) in jobs
    if row.job_id != remote.metadata.get(JOB_METADATA_KEY):
        return False  # not the batch of ours it seems to name
    if row.remote_id is not None:
        return bool(row.remote_id != remote.id)
    return row.status not in _UNDECIDED


def _settled_for_good(remote: RemoteBatch, row: Row[Any] | None, jobs: set[str]) -> bool:
    """A batch that is not an orphan now and never will be: the adopted one (a local batch
    never adopts another), or one that names a job that is not ours."""
    if row is None:
        return remote.metadata.get(JOB_METADATA_KEY) not in jobs
    return bool(row.remote_id == remote.id or row.job_id != remote.metadata.get(JOB_METADATA_KEY))


def _follow(ctx: DutyContext, remote_id: str) -> None:
    ctx.count("reconcile_calls")
    try:
        remote = ctx.provider.retrieve_batch(remote_id)
    except NotFoundError:
        _finish(ctx, remote_id)
        return
    except RemoteError as exc:
        log.warning("orphan refresh failed", orphan_remote_id=remote_id, error=str(exc))
        return
    _settle(ctx, remote)


def _settle(ctx: DutyContext, remote: RemoteBatch) -> None:
    """Cancel an open orphan; delete the files of one that ended, and be done with it."""
    if remote.status in _CANCELLABLE:
        ctx.count("reconcile_calls")
        try:
            ctx.provider.cancel_batch(remote.id)
        except PermanentRemoteError as exc:  # it ended meanwhile: its files go next time
            log.info("orphan cancel refused", orphan_remote_id=remote.id, error=str(exc))
        except RemoteError as exc:
            log.warning("orphan cancel failed, will retry", orphan_remote_id=remote.id,
                        error=str(exc))  # fmt: skip
        return
    if remote.status not in _ENDED:
        return  # finalizing or cancelling: its files come once it ends
    files = [f for f in (remote.output_file_id, remote.error_file_id) if f]
    if remote.input_file_id:
        with ctx.store.read() as conn:
            if not orphans.input_file_in_use(conn, remote.input_file_id):
                files.append(remote.input_file_id)
    for file_id in files:
        ctx.count("reconcile_calls")
        try:
            ctx.provider.delete_file(file_id)
        except NotFoundError:
            pass
        except RemoteError as exc:
            log.warning("deleting an orphan's file failed, will retry",
                        orphan_remote_id=remote.id, file_id=file_id, error=str(exc))  # fmt: skip
            return
    log.info("orphan remote batch swept", orphan_remote_id=remote.id, status=remote.status,
             files_deleted=len(files))  # fmt: skip
    _finish(ctx, remote.id)


def _finish(ctx: DutyContext, remote_id: str) -> None:
    sweep_state = state(ctx)
    sweep_state.pending.pop(remote_id, None)
    _remember(sweep_state, remote_id)


def _remember(sweep_state: SweepState, remote_id: str) -> None:
    sweep_state.done[remote_id] = None
    while len(sweep_state.done) > _DONE_KEPT:
        sweep_state.done.pop(next(iter(sweep_state.done)))
