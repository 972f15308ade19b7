"""The daemon: the duties on an APScheduler 3 background scheduler, woken at once when there is
new work, stopped cleanly on SIGTERM/SIGINT, speaking sd_notify under systemd.

Each duty runs with `max_instances=1` and `coalesce=True`; a wake that arrives while the duty
runs is remembered and honoured as soon as it finishes, so no wake is ever lost.

Several daemons share one PostgreSQL database: the elected leader (`service.leadership`) runs
the duties in `LEADER_DUTIES` for all of them, every daemon runs the others, and each hears the
others' wake-ups (`service.wakeups`). On SQLite the one daemon the database allows (a second is
refused: `store.coordination.hold_sqlite_daemon_lock`) always leads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from jobqueue.core import memory
from jobqueue.duties.collect import collect_once
from jobqueue.duties.context import DutyContext, Heartbeat, make_owner
from jobqueue.duties.expire import expire_once
from jobqueue.duties.heartbeat import heartbeat_once, mark_stopped, register
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.retry import retry_once
from jobqueue.duties.submit import submit_once
from jobqueue.duties.webhook import retry_pending_webhooks
from jobqueue.hooks.dispatcher import Dispatcher
from jobqueue.hooks.sinks import Sink, build_sinks, close_sinks
from jobqueue.logs import FailureLog, get_logger
from jobqueue.remote import make_provider
from jobqueue.remote.base import Provider
from jobqueue.service.leadership import Leadership
from jobqueue.service.sdnotify import notify, watchdog_interval
from jobqueue.service.wakeups import Listener
from jobqueue.settings import Settings
from jobqueue.store import Store, costs
from jobqueue.store.coordination import (
    DaemonAlreadyRunning,
    SqliteDaemonLock,
    hold_sqlite_daemon_lock,
)
from jobqueue.store.daemons import (
    daemon_of_owner,
    hooks_owner,
    is_unavailable,
    ping,
    start_cursors_at_open_jobs,
)

__all__ = ["LEADER_DUTIES", "Daemon", "DaemonAlreadyRunning", "Duty"]

log = get_logger("jobqueue.service.daemon")
# Our scheduler's own logger: a duty woken while it runs is skipped on purpose (the wake is
# remembered and honoured right after), which APScheduler would report as a warning.
_scheduler_logger = logging.getLogger("jobqueue.scheduler")
_scheduler_logger.setLevel(logging.ERROR)
# Run by the leader only: one reconcile walk (with the remote cancels and the orphan sweep) and
# one maintenance pass for all daemons, whatever their number.
LEADER_DUTIES = frozenset({"reconcile", "expire"})


@dataclass
class Duty:
    name: str
    fn: Callable[[DutyContext], int]
    interval: float
    # Run again at once when it moved something: there may be more of the same work.
    again_if_moved: bool
    # False for a duty that may finish without asking the database anything (the kept
    # webhooks, when none are kept): its success says nothing of an outage.
    asks_database: bool = True


class _DutyState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = False
        self.wake_pending = False
        self.runs = 0
        self.errors = 0
        self.last_run: float | None = None
        self.last_error: str | None = None


class Daemon:
    """Runs the duties against one store and one remote, in background threads."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: Provider | None = None,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        extra_duties: list[Duty] | None = None,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        costs.use_prices(store, settings.price_table())  # what its events are priced with
        self.provider = provider or make_provider(settings)
        self._own_provider = provider is None
        self.ctx = DutyContext(
            store=store,
            provider=self.provider,
            settings=settings,
            owner=owner or make_owner(),
            clock=clock,
            wake=self.wake,
        )
        poll = settings.poll_interval
        self.duties: dict[str, Duty] = {
            d.name: d
            for d in [
                Duty("submit", submit_once, min(poll, 2.0), True),
                Duty("reconcile", reconcile_once, poll, False),
                Duty("collect", collect_once, min(poll, 5.0), True),
                Duty("retry", retry_once, min(poll, 5.0), True),
                Duty("expire", expire_once, min(poll, 30.0), False),
                Duty("webhooks", retry_pending_webhooks, 1.0, False, asks_database=False),
                *(extra_duties or []),
            ]
        }
        self._states = {name: _DutyState() for name in self.duties}
        self._scheduler: BackgroundScheduler | None = None
        self._stopping = threading.Event()
        self._ran = False  # started, or run once: what `stop()` reports having stopped
        self.log = log.bind(owner=self.ctx.owner)
        # A failure that repeats (the database down: every duty, every second) is logged once,
        # then once a minute, then when it is over.
        self.failures = FailureLog(self.log, outage=is_unavailable)
        # Hooks: the config's sinks (owned here) and the embedding program's (not owned).
        try:
            self._config_sinks = build_sinks(settings.hooks)
        except BaseException:
            if self._own_provider:
                self.provider.close()
            raise
        self._extra_sinks = list(sinks or [])
        self.dispatcher: Dispatcher | None = None
        self._dispatch_stop = threading.Event()
        self._dispatch_thread: threading.Thread | None = None
        # Lease owner names of the daemons known dead, as of our last heartbeat: their hook
        # lanes are taken over at once.
        self._dead_owners: frozenset[str] = frozenset()
        # Several daemons: who leads, wake-ups from the others, SQLite's one-daemon lock.
        self.leadership = Leadership(store, on_change=self._on_leadership)
        self.listener = Listener(store, self._on_notified, self.wake_all)
        self._sqlite_lock: SqliteDaemonLock | None = None

    @property
    def owner(self) -> str:
        return self.ctx.owner

    @property
    def stats(self) -> dict[str, Any]:
        return self.ctx.stats

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this daemon runs the leader's duties now."""
        return self.leadership.leading

    def start(self) -> None:
        """Start the duties in background threads. On SQLite, `DaemonAlreadyRunning` when
        another daemon holds the database; nothing is started then."""
        if self._scheduler is not None:
            return
        self.hold_database()
        self._ran = True
        memory.limit_arenas()  # before the duties' threads start
        # Registered, with a first heartbeat, before anything is claimed.
        self.ctx.heartbeat = Heartbeat(self.settings.daemon_timeout)
        register(self.ctx)
        self.heartbeat()
        self.leadership.start()
        self.listener.start()
        # Ready means listening: what is submitted from now on wakes us at once. A database
        # that does not answer in time only delays that until the first poll.
        if self.store.dialect == "postgresql":
            self.listener.wait_listening(5.0)
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(len(self.duties) + 3)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
            logger=_scheduler_logger,
        )
        now = datetime.now(UTC)
        for duty in self.duties.values():
            scheduler.add_job(
                self._run_duty, "interval", seconds=duty.interval, args=[duty.name],
                id=duty.name, name=duty.name, next_run_time=now,
            )  # fmt: skip
        scheduler.add_job(
            self.heartbeat, "interval", seconds=self.settings.heartbeat_interval,
            id="heartbeat", name="heartbeat",
        )  # fmt: skip
        interval = watchdog_interval()
        if interval:
            scheduler.add_job(
                self._watchdog, "interval", seconds=interval, id="watchdog", next_run_time=now
            )
        self._scheduler = scheduler
        scheduler.start()
        self._start_dispatcher()
        notify("READY=1")
        self.log.info(
            "daemon started", duties=list(self.duties), poll_interval=self.settings.poll_interval
        )

    def stop(self) -> None:
        """Finish the steps in hand, release our leases, close the remote client."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        notify("STOPPING=1")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self._stop_dispatcher()
        self.listener.stop()
        self.leadership.stop()
        close_sinks(self._config_sinks)
        try:
            with self.store.write() as conn:
                released = self.store.release_leases(conn, self.owner)
            if released:
                self.log.info("released leases", count=released)
        except Exception as exc:  # the database may be what failed; nothing more to do
            self.log.warning("could not release leases", error=str(exc))
        if self.ctx.heartbeat is not None:
            try:
                mark_stopped(self.ctx)
            except Exception as exc:  # its heartbeat goes stale instead
                self.log.warning("could not mark the daemon stopped", error=str(exc))
        if self._own_provider:
            self.provider.close()
        self._release_database()
        if self._ran:
            self.log.info("daemon stopped")

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def run_forever(self, stop: threading.Event) -> None:
        self.start()
        try:
            # A timed wait: the main thread returns to Python at least once a second, so a
            # signal's handler never waits on a blocked lock acquire.
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()

    def run_once(self, max_rounds: int = 10_000) -> int:
        """Run every duty in turn until a whole round moves nothing; return what moved.

        Hook deliveries due now are made too; ones waiting for a retry backoff are left for
        the next run. Not started, it takes the lead for its run if no other daemon has it
        (else it leaves the leader's duties to that one), and SQLite's daemon lock.
        """
        standalone = self._scheduler is None
        if standalone:
            self.hold_database()
            self._ran = True
            self.leadership.check()
        dispatcher = self._make_dispatcher()
        total = 0
        try:
            for _ in range(max_rounds):
                moved = sum(self._call(duty) for duty in self.duties.values())
                if dispatcher is not None:
                    moved += dispatcher.run_once()
                total += moved
                if not moved:
                    break
        finally:
            if dispatcher is not None:
                dispatcher.close()
            if standalone:
                self.leadership.stop()
                self._release_database()
        return total

    # -- several daemons --------------------------------------------------------------------

    def hold_database(self) -> None:
        """On SQLite, take the database's one-daemon lock (`DaemonAlreadyRunning` when another
        daemon has it); kept until `stop()`. Nothing on PostgreSQL."""
        if self.store.dialect == "sqlite" and self._sqlite_lock is None:
            self._sqlite_lock = hold_sqlite_daemon_lock(self.store)

    def _release_database(self) -> None:
        lock, self._sqlite_lock = self._sqlite_lock, None
        if lock is not None:
            lock.release()

    def _on_leadership(self, leading: bool) -> None:
        if leading:  # what the last leader left undone, at once
            for name in LEADER_DUTIES:
                self.wake(name)

    def _on_notified(self, duties: list[str]) -> None:
        self.ctx.count("notified_wakes")
        for name in set(duties):
            if name == "hooks":
                if self.dispatcher is not None:
                    self.dispatcher.wake()
            else:
                self.wake(name)

    # -- hooks ------------------------------------------------------------------------------

    @property
    def sinks(self) -> list[Sink]:
        return [*self._config_sinks, *self._extra_sinks]

    def set_extra_sinks(self, sinks: list[Sink]) -> None:
        """Replace the embedding program's sinks; a running dispatcher restarts with them."""
        running = self._dispatch_thread is not None
        if running:
            self._stop_dispatcher()
        self._extra_sinks = list(sinks)
        if running or (self.running and not self._stopping.is_set()):
            self._start_dispatcher()

    def _make_dispatcher(self) -> Dispatcher | None:
        if not self.sinks:
            return None
        self._start_config_cursors()
        return Dispatcher(
            self.store, self.sinks, hooks_owner(self.owner), clock=self.ctx.clock,
            free_owners=lambda: self._dead_owners, may_claim=self.ctx.may_claim,
            failures=self.failures,
        )  # fmt: skip

    # -- heartbeat ------------------------------------------------------------------------------

    def heartbeat(self) -> bool:
        """Renew our heartbeat and look at the other daemons: the hook lanes of those found
        dead are taken over at once. False when the heartbeat could not be renewed (nothing
        is claimed until it can)."""
        try:
            liveness = heartbeat_once(self.ctx)
        except Exception as exc:  # a scheduler job must not die of it; the next beat tries again
            self.failures.failed("heartbeat", exc)
            return False
        if liveness is None:
            return False
        self.failures.succeeded("heartbeat")
        dead = frozenset(name for d in liveness.dead for name in (d, hooks_owner(d)))
        newly_dead = dead - self._dead_owners
        self._dead_owners = dead
        if newly_dead:
            found = sorted({daemon_of_owner(name) for name in newly_dead})
            self.log.info("daemons found dead or stopped", daemons=found)
            if self.dispatcher is not None:
                self.dispatcher.wake()
        return True

    def _start_config_cursors(self) -> None:
        """A config hook seen for the first time starts with the events of the jobs still
        open, so jobs submitted before the daemon first ran are reported whole; events of
        jobs that already ended are not replayed."""
        names = [sink.name for sink in self._config_sinks]
        if not names:
            return
        with self.store.write() as conn:
            start_cursors_at_open_jobs(conn, self.store.dialect, names, time.time())

    def _start_dispatcher(self) -> None:
        self.dispatcher = self._make_dispatcher()
        if self.dispatcher is None:
            return
        self._dispatch_stop = threading.Event()
        self._dispatch_thread = threading.Thread(
            target=self.dispatcher.run_forever,
            args=(self._dispatch_stop,),
            name="jobqueue-hooks",
            daemon=True,
        )
        self._dispatch_thread.start()

    def _stop_dispatcher(self) -> None:
        self._dispatch_stop.set()
        if self._dispatch_thread is not None:
            self._dispatch_thread.join(60)
            self._dispatch_thread = None
        if self.dispatcher is not None:
            self.dispatcher.close()

    # -- waking -----------------------------------------------------------------------------

    def wake(self, name: str) -> None:
        """Run duty `name` as soon as possible (now, or right after its current run)."""
        state = self._states.get(name)
        if state is None or self._scheduler is None or self._stopping.is_set():
            return
        with state.lock:
            if state.running:
                state.wake_pending = True
                return
        with contextlib.suppress(Exception):  # the scheduler may be shutting down
            self._scheduler.modify_job(name, next_run_time=datetime.now(UTC))

    def wake_all(self) -> None:
        for name in self.duties:
            self.wake(name)

    # -- running duties ---------------------------------------------------------------------

    def _run_duty(self, name: str) -> None:
        if self._stopping.is_set():
            return
        state = self._states[name]
        with state.lock:
            state.running = True
            state.wake_pending = False
        moved = 0
        try:
            moved = self._call(self.duties[name])
        finally:
            with state.lock:
                state.running = False
                again = state.wake_pending or (moved > 0 and self.duties[name].again_if_moved)
            if moved and self.dispatcher is not None:
                self.dispatcher.wake()
            if again:
                self.wake(name)

    def _call(self, duty: Duty) -> int:
        if duty.name in LEADER_DUTIES and not self.leadership.leading:
            return 0  # the leader does it for all
        state = self._states[duty.name]
        started = time.perf_counter()
        try:
            moved = duty.fn(self.ctx)
        except OSError as exc:
            # The machine, not the code (a full disk, a lost mount): one line, no traceback.
            state.errors += 1
            state.last_error = f"{type(exc).__name__}: {exc}"
            self.log.error("duty failed", duty=duty.name, error=state.last_error)
            return 0
        except Exception as exc:
            state.errors += 1
            state.last_error = f"{type(exc).__name__}: {exc}"
            self.failures.failed(duty.name, exc)
            return 0
        finally:
            state.runs += 1
            state.last_run = time.time()
            self.ctx.count(f"duty_seconds.{duty.name}", time.perf_counter() - started)
        # A duty held back by a stale heartbeat (no claims) may not have asked the database
        # anything: its success says nothing of an outage.
        self.failures.succeeded(duty.name, outage_over=duty.asks_database and self.ctx.may_claim())
        return moved

    def failed_duties(self) -> dict[str, str]:
        """The duties that failed (raised) at least once, with their last error."""
        return {name: s.last_error or "failed" for name, s in self._states.items() if s.errors}

    def duty_states(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "runs": s.runs,
                "errors": s.errors,
                "last_run": s.last_run,
                "last_error": s.last_error,
                "running": s.running,
            }
            for name, s in self._states.items()
        }

    def healthy(self) -> bool:
        """The database answers and the scheduler runs."""
        if not self.running:
            return False
        try:
            ping(self.store)
        except Exception:
            return False
        return True

    def _watchdog(self) -> None:
        if self.healthy():
            notify("WATCHDOG=1")
