"""The transactional-outbox dispatcher: events in the database, delivered at least once.

Each round (`run_once`) does three things, none of them holding a transaction while a sink runs:

1. Fan-out. For every sink, the events past its cursor whose type matches its patterns become
   `pending` deliveries, and the cursor moves on, in one transaction. A sink seen for the first
   time starts at the newest event (only new events reach it) unless it replays.
2. Claim. The due pending deliveries of each sink, oldest first, but only the head of each job's
   queue (an earlier pending delivery of the same job and sink holds the later ones back), are
   leased to this dispatcher (`lease_owner`, `lease_until`).
3. Deliver. Outside any transaction, on a shared thread pool, with a per-sink limit on lanes so
   a slow or dead sink occupies a bounded share of the workers; each attempt is then recorded,
   with the delivery's new state, in one transaction guarded by the lease.

At least once: a dispatcher killed after delivering but before recording leaves the lease to
run out; the delivery is then claimed again (by any dispatcher with that sink) and repeated.
Receivers deduplicate by event id (`webhook-id`).

The sequence gap problem: on PostgreSQL, `events.seq` values are taken when a row is inserted
but become visible at commit, so a transaction may commit seq 12 before another commits seq 11.
Fan-out therefore only advances a cursor over a contiguous run of seqs; a gap holds it back
until the gap is `gap_grace` seconds old (a rolled-back transaction leaves a gap forever), and
a gap passed over that fills in later (a long transaction) is still fanned out while this
dispatcher remembers it (`late_window`). SQLite serialises writers, so it has no such gaps.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from jobqueue.core.backoff import backoff
from jobqueue.core.records import Event
from jobqueue.hooks.patterns import matches
from jobqueue.hooks.sinks import DeliveryError, Sink, event_body
from jobqueue.logs import FailureLog, get_logger
from jobqueue.store import Store, outbox
from jobqueue.store.outbox import DEAD, DELIVERED, PENDING, Claimed, Delivery

__all__ = ["Dispatcher"]

log = get_logger("jobqueue.hooks")

_HTTP_STATUS = re.compile(r"^HTTP (\d{3})\b")
# Gaps wider than this are timed as one unit (by their first seq), not seq by seq.
_MAX_TRACKED_GAP = 10_000


class Dispatcher:
    """Delivers outbox events to `sinks` on behalf of `owner` (unique per dispatcher).

    `batch_size` bounds the deliveries claimed per sink and round, `workers` the threads that
    deliver, `sink_concurrency` the lanes one sink may use at once (default: all workers with a
    single sink, else half of them; a sink's own `concurrency` attribute wins). A sink attribute
    `replay = True` (or `replay=True` here) makes a new sink start from the first stored event.
    `backoff_base`/`backoff_cap` shape the retry delays (`jobqueue.core.backoff.backoff`).
    `free_owners()` names the lease owners known dead (a killed daemon's dispatcher): their
    leases are taken over at once instead of when they run out; `may_claim()` false stops the
    claims (a daemon whose heartbeat cannot be renewed); both are asked once a round.
    `clock` is the wall clock for every stored time; tests inject their own. A lane records
    its outcomes in one transaction per `flush_interval` seconds of delivering (not one per
    attempt), so recording costs few commits when a sink is fast; `run_forever` starts rounds
    at most every `coalesce` seconds however often it is woken.

    The dispatcher does not own the sinks: whoever built them closes them.
    """

    def __init__(
        self,
        store: Store,
        sinks: Sequence[Sink],
        owner: str,
        *,
        batch_size: int = 100,
        lease_seconds: float = 60.0,
        workers: int = 4,
        clock: Callable[[], float] = time.time,
        sink_concurrency: int | None = None,
        replay: bool = False,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        gap_grace: float = 30.0,
        late_window: float = 3600.0,
        fan_out_limit: int = 1000,
        flush_interval: float = 0.05,
        coalesce: float = 0.02,
        free_owners: Callable[[], Collection[str]] | None = None,
        may_claim: Callable[[], bool] | None = None,
        failures: FailureLog | None = None,
    ) -> None:
        names = [sink.name for sink in sinks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"sink names must be unique; repeated: {', '.join(duplicates)}")
        if batch_size < 1 or workers < 1 or lease_seconds <= 0:
            raise ValueError("batch_size, workers and lease_seconds must be positive")
        self.store = store
        self.sinks = list(sinks)
        self.owner = owner
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.workers = workers
        self.clock = clock
        self.replay = replay
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.gap_grace = gap_grace
        self.late_window = late_window
        self.fan_out_limit = fan_out_limit
        self.flush_interval = flush_interval
        self.coalesce = coalesce
        self.free_owners: Callable[[], Collection[str]] = free_owners or frozenset
        self.may_claim: Callable[[], bool] = may_claim or (lambda: True)
        # A round that keeps failing (the database down) is logged once, then once a minute.
        self.failures = failures or FailureLog(log)
        default_lanes = workers if len(self.sinks) == 1 else max(1, workers // 2)
        self._lane_limit = {
            sink.name: max(
                1,
                min(
                    workers, getattr(sink, "concurrency", None) or sink_concurrency or default_lanes
                ),
            )
            for sink in self.sinks
        }
        self._names = names
        self._lock = threading.Lock()
        self._lanes = dict.fromkeys(names, 0)
        self._active = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cursors_ready = False
        self._gaps: dict[int, float] = {}  # missing seq -> when first seen
        self._skipped: dict[tuple[int, int], float] = {}  # seq range passed over -> when
        self._late_seen: set[int] = set()
        self._rotation = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jobqueue-hook")
        self.stats = {"delivered": 0, "failed": 0, "dead": 0, "lost_lease": 0, "late_events": 0}

    # -- the loop -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Run the next round now (call it after committing new events)."""
        self._wake.set()

    def run_once(self, *, wait: bool = True) -> int:
        """One round: fan out, claim, deliver. Returns the deliveries attempted (claimed).

        With `wait=True` (tests, one-shot use) it returns when this round's attempts are
        recorded; `run_forever` uses `wait=False`, so a slow sink never delays the next round.
        """
        if self._stopping.is_set() or not self.sinks:
            return 0
        futures, claimed = self._round()
        if not wait:
            return claimed
        return sum(future.result() for future in futures)

    def run_forever(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Rounds until `stop` is set: at once when woken, else every `interval` seconds at most."""
        failures = 0
        last = 0.0
        while not stop.is_set() and not self._stopping.is_set():
            # Coalesce wake-ups: a writer committing hundreds of events a second would
            # otherwise cost a round (and a write transaction) per commit.
            pause = last + self.coalesce - time.monotonic()
            if pause > 0:
                stop.wait(pause)
            last = time.monotonic()
            self._wake.clear()
            try:
                claimed = self.run_once(wait=False)
                # With work in flight, a lane finishing wakes the next round.
                timeout = interval if claimed else self._idle_timeout(interval)
                failures = 0
                self.failures.succeeded("hooks")
            except Exception as exc:
                failures += 1
                self.failures.failed("hooks", exc, owner=self.owner)
                timeout = min(30.0, interval * 2**failures)
            deadline = time.monotonic() + timeout
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or self._wake.wait(min(left, 0.2)):
                    break

    def _idle_timeout(self, interval: float) -> float:
        with self.store.read() as conn:
            due = outbox.next_due(conn, self._names, self.free_owners())
        now = self.clock()
        # Past due but not claimed: held back behind its job's head, or no free lane; either
        # way a lane finishing wakes us. Future due (a retry backoff): sleep until then.
        if due is None or due <= now:
            return interval
        return max(0.001, min(interval, due - now))

    def close(self) -> None:
        """Stop: lanes finish the attempt they are in and give back what they had claimed."""
        self._stopping.set()
        self._wake.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- a round: fan-out and claims in one short transaction -----------------------------------

    def _round(self) -> tuple[list[Future[int]], int]:
        now = self.clock()
        self._ensure_cursors(now)
        claiming = self._free_workers() > 0 and self.may_claim()
        free = self.free_owners() if claiming else frozenset()
        # Look first (a read takes no write lock): an idle round writes nothing.
        with self.store.read() as conn:
            plan = self._plan_fan_out(conn, now)
            due = outbox.due_sinks(conn, self._names, now, free) if claiming else set()
        if plan is None and not due:
            return [], 0
        claims: list[tuple[Sink, list[Claimed], int]] = []
        with self.store.write() as conn:
            if plan is not None:
                self._apply_fan_out(conn, plan, now)
                if claiming:
                    due |= plan.sinks
            claims = self._claim(conn, due, now, free)
        if plan is not None:
            self._after_fan_out(plan)
        return self._start_lanes(claims)

    def fan_out(self) -> int:
        """Turn new matching events into pending deliveries now; returns how many were added."""
        if not self.sinks:
            return 0
        added = 0
        for _ in range(100):  # bounded: the rest waits for the next round
            now = self.clock()
            self._ensure_cursors(now)
            with self.store.read() as conn:
                plan = self._plan_fan_out(conn, now)
            if plan is None:
                break
            with self.store.write() as conn:
                self._apply_fan_out(conn, plan, now)
            self._after_fan_out(plan)
            added += len(plan.rows)
            if not plan.more:
                break
        return added

    def _ensure_cursors(self, now: float) -> None:
        if self._cursors_ready:
            return
        with self.store.write() as conn:
            outbox.ensure_cursors(
                conn,
                self.store.dialect,
                {s.name: bool(getattr(s, "replay", self.replay)) for s in self.sinks},
                now,
            )
        self._cursors_ready = True

    def _plan_fan_out(self, conn: Any, now: float) -> _FanOut | None:
        """What fan-out would write: idempotent, so it may be applied in a later transaction."""
        cursors = outbox.cursors(conn, self._names)
        if len(cursors) < len(self._names):  # a cursor row vanished: recreate it next round
            self._cursors_ready = False
            return None
        low = min(cursors.values())
        rows = outbox.event_window(conn, low, self.fan_out_limit)
        ranges = self._late_ranges(now)
        late = outbox.events_in_ranges(conn, ranges) if ranges else []
        horizon = self._horizon(low, [row.seq for row in rows], now)
        late = [row for row in late if row.seq <= horizon and row.seq not in self._late_seen]
        planned: list[dict[str, Any]] = []
        for sink in self.sinks:
            cursor = cursors[sink.name]
            for row in rows:
                if cursor < row.seq <= horizon and matches(sink.patterns, row.type):
                    planned.append(_plan(row, sink.name))
            for row in late:
                if row.seq <= cursor and matches(sink.patterns, row.type):
                    planned.append(_plan(row, sink.name))
        advance = [name for name, cursor in cursors.items() if horizon > cursor]
        if not planned and not advance:
            return None
        more = len(rows) >= self.fan_out_limit and horizon >= rows[-1].seq
        return _FanOut(planned, advance, horizon, late, {p["sink"] for p in planned}, more)

    def _apply_fan_out(self, conn: Any, plan: _FanOut, now: float) -> None:
        outbox.insert_deliveries(conn, self.store.dialect, plan.rows, now)
        for name in plan.advance:
            outbox.advance_cursor(conn, name, plan.horizon, now)

    def _after_fan_out(self, plan: _FanOut) -> None:
        for row in plan.late:
            self._late_seen.add(row.seq)
            self._count("late_events")
            log.warning(
                "event committed after fan-out passed its seq; delivered late",
                seq=row.seq,
                event_id=row.id,
            )
        if plan.more:
            self.wake()  # a full window: more events are waiting

    def _horizon(self, low: int, seqs: list[int], now: float) -> int:
        """The highest seq fan-out may pass: contiguous from `low`, gaps only once old enough."""
        horizon = low
        for seq in seqs:
            if seq > horizon + 1:
                first, last = horizon + 1, seq - 1
                if last - first >= _MAX_TRACKED_GAP:
                    seen = self._gaps.setdefault(first, now)
                else:
                    seen = max(self._gaps.setdefault(m, now) for m in range(first, last + 1))
                if now - seen < self.gap_grace:
                    break
                log.warning("passing over a gap in event seqs", first=first, last=last)
                self._skipped[(first, last)] = now
            horizon = seq
        for missing in [m for m in self._gaps if m <= horizon]:
            del self._gaps[missing]
        return horizon

    def _late_ranges(self, now: float) -> list[tuple[int, int]]:
        for key in [k for k, when in self._skipped.items() if now - when > self.late_window]:
            del self._skipped[key]
            self._late_seen.difference_update(range(key[0], key[1] + 1))
        return list(self._skipped)

    # -- claim and deliver ----------------------------------------------------------------------

    def _lease_for(self, sink: Sink) -> float:
        # A lease must outlast at least one attempt, or a slow sink would be claimed twice.
        return max(self.lease_seconds, 2 * sink.timeout)

    def _free_workers(self) -> int:
        with self._lock:
            return self.workers - self._active

    def _claim(
        self, conn: Any, due: set[str], now: float, dead_owners: Collection[str] = ()
    ) -> list[tuple[Sink, list[Claimed], int]]:
        """Lease due deliveries of the sinks with free lanes: (sink, claimed, lanes) each."""
        if self._stopping.is_set() or not due:
            return []
        start = next(self._rotation) % len(self.sinks)
        claims = []
        reserved = 0
        for sink in self.sinks[start:] + self.sinks[:start]:  # take turns at the free workers
            if sink.name not in due:
                continue
            with self._lock:
                free = min(
                    self._lane_limit[sink.name] - self._lanes[sink.name],
                    self.workers - self._active - reserved,
                )
            if free <= 0:
                continue
            claimed = outbox.claim(
                conn,
                self.store.dialect,
                sink.name,
                self.owner,
                now,
                now + self._lease_for(sink),
                self.batch_size,
                dead_owners,
            )
            if claimed:
                lanes = min(free, len(claimed))
                reserved += lanes
                claims.append((sink, claimed, lanes))
        return claims

    def _start_lanes(
        self, claims: list[tuple[Sink, list[Claimed], int]]
    ) -> tuple[list[Future[int]], int]:
        futures: list[Future[int]] = []
        total = 0
        for sink, claimed, lanes in claims:
            total += len(claimed)
            with self._lock:
                self._lanes[sink.name] += lanes
                self._active += lanes
            for index in range(lanes):
                futures.append(self._pool.submit(self._lane, sink, claimed[index::lanes]))
        return futures, total

    def _lane(self, sink: Sink, items: list[Claimed]) -> int:
        """Deliver `items` one after another; record outcomes in few transactions."""
        attempted = 0
        outcomes: list[_Outcome] = []
        flushed = time.monotonic()
        try:
            for index, item in enumerate(items):
                # Don't start an attempt the lease may not cover: give the rest back.
                if self._stopping.is_set() or self.clock() + sink.timeout >= item.lease_until:
                    self._release(items[index:])
                    break
                outcomes.append(self._attempt(sink, item))
                attempted += 1
                if time.monotonic() - flushed >= self.flush_interval:
                    self._record_all(sink, outcomes)
                    outcomes, flushed = [], time.monotonic()
        except Exception:
            log.exception("hook delivery lane failed", sink=sink.name)
        finally:
            if outcomes:
                self._record_all(sink, outcomes)
            with self._lock:
                self._lanes[sink.name] -= 1
                self._active -= 1
            self._wake.set()
        return attempted

    def _attempt(self, sink: Sink, item: Claimed) -> _Outcome:
        payload = Event.from_row(item.event).to_payload()
        error: str | None = None
        retryable, retry_after, status_code = True, None, None
        started = self.clock()
        try:
            sink.deliver(payload, event_body(payload))
        except DeliveryError as exc:
            error, retryable, retry_after = exc.message, exc.retryable, exc.retry_after
            status_code = getattr(exc, "status_code", None) or _http_status(exc.message)
        except Exception as exc:  # a sink bug is a failed attempt, not a dead dispatcher
            error = f"{type(exc).__name__}: {exc}"
        finished = self.clock()
        attempt = item.attempts + 1
        if error is None:
            status, next_at = DELIVERED, finished
        elif not retryable or attempt >= sink.max_attempts:
            status, next_at = DEAD, finished
        else:
            delay = (
                min(retry_after, 86400.0)
                if retry_after is not None
                else backoff(attempt, base=self.backoff_base, cap=self.backoff_cap)
            )
            status, next_at = PENDING, finished + delay
        return _Outcome(item, started, finished, error, status_code, status, next_at)

    def _record_all(self, sink: Sink, outcomes: list[_Outcome]) -> None:
        """Record attempts and new states in one transaction, each guarded by its lease."""
        try:
            with self.store.write() as conn:
                kept = [
                    outbox.record_attempt(
                        conn,
                        o.item,
                        self.owner,
                        started_at=o.started,
                        finished_at=o.finished,
                        ok=o.error is None,
                        error=o.error,
                        status_code=o.status_code,
                        status=o.status,
                        next_attempt_at=o.next_at,
                    )
                    for o in outcomes
                ]
        except Exception:
            # Not recorded: the leases run out and the deliveries are attempted again.
            log.exception("cannot record hook delivery attempts", sink=sink.name)
            return
        for outcome, ok in zip(outcomes, kept, strict=True):
            self._log_outcome(sink, outcome, ok)

    def _log_outcome(self, sink: Sink, o: _Outcome, kept: bool) -> None:
        event_id = o.item.event.id
        if not kept:
            self._count("lost_lease")
            log.warning(
                "hook delivery lease lost before recording", sink=sink.name, event_id=event_id
            )
        elif o.status == DELIVERED:
            self._count("delivered")
        elif o.status == DEAD:
            self._count("failed")
            self._count("dead")
            log.warning(
                "hook delivery dead-lettered",
                sink=sink.name,
                event_id=event_id,
                attempts=o.item.attempts + 1,
                error=o.error,
            )
        else:
            self._count("failed")
            log.info(
                "hook delivery failed; will retry",
                sink=sink.name,
                event_id=event_id,
                attempt=o.item.attempts + 1,
                retry_in=round(o.next_at - o.finished, 3),
                error=o.error,
            )

    def _release(self, items: list[Claimed]) -> None:
        try:
            with self.store.write() as conn:
                for item in items:
                    outbox.release(conn, item.id, self.owner, item.lease_until)
        except Exception:
            log.exception("cannot release hook deliveries; their leases will run out")

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # -- queries and control ----------------------------------------------------------------------

    def redeliver(self, event_id: str, sink: str | None = None) -> int:
        """Queue an event's dead or delivered deliveries again (attempts reset); how many."""
        with self.store.write() as conn:
            count = outbox.redeliver(conn, event_id, sink, self.clock())
        if count:
            self.wake()
        return count

    def dead_deliveries(self, job_id: str | None = None) -> list[Delivery]:
        with self.store.read() as conn:
            return outbox.dead_deliveries(conn, job_id)

    def deliveries_for(self, job_id: str | None = None) -> list[Delivery]:
        with self.store.read() as conn:
            return outbox.deliveries_for(conn, job_id)

    def pending_count(self) -> int:
        with self.store.read() as conn:
            return outbox.pending_count(conn, self._names)

    def dead_count(self) -> int:
        with self.store.read() as conn:
            return outbox.dead_count(conn, self._names)

    def outbox_backlog(self) -> int:
        """Events not yet fanned out to at least one of this dispatcher's sinks."""
        with self.store.read() as conn:
            return outbox.backlog(conn, self._names)


@dataclass(frozen=True)
class _FanOut:
    rows: list[dict[str, Any]]  # deliveries to insert
    advance: list[str]  # sinks whose cursor moves to `horizon`
    horizon: int
    late: list[Any]  # events fanned out after their gap was passed over
    sinks: set[str]  # sinks that get new deliveries
    more: bool  # the window was full: more events wait


@dataclass(frozen=True)
class _Outcome:
    item: Claimed
    started: float
    finished: float
    error: str | None
    status_code: int | None
    status: str
    next_at: float


def _plan(row: Any, sink: str) -> dict[str, Any]:
    return {"event_seq": row.seq, "event_id": row.id, "job_id": row.job_id, "sink": sink}


def _http_status(message: str) -> int | None:
    match = _HTTP_STATUS.match(message)
    return int(match.group(1)) if match else None
