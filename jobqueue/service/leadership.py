"""Which daemon leads: the one that holds the leader lock on PostgreSQL; on SQLite, always us.

The leader runs the work that one daemon does for all (the reconcile walk with its cancels and
orphan sweep, and maintenance: deadlines, overdue and stuck reports, purging); every daemon,
leader or not, submits, collects, retries and delivers hooks. The lock is a session advisory
lock on a connection of its own, kept open here for as long as we lead, and checked every
`interval` seconds: a daemon that is not leading tries to take it, one that leads makes sure it
still holds it (its session may have been ended by the server, or its connection lost). When the
leader dies, PostgreSQL ends its session and frees the lock, and a follower takes it at its next
check; a leader that hangs stops checking, its session ends after `LEADER_IDLE_TIMEOUT` seconds
idle, and the same happens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from jobqueue.logs import get_logger
from jobqueue.store import Connection, Store
from jobqueue.store.coordination import (
    close_dedicated,
    give_up_lead,
    holds_lead,
    open_dedicated,
    try_lead,
)

log = get_logger("jobqueue.service.leadership")


class Leadership:
    """Whether this daemon leads, kept up to date by a thread of its own (PostgreSQL)."""

    def __init__(
        self,
        store: Store,
        *,
        on_change: Callable[[bool], None] = lambda _leading: None,
        interval: float = 1.0,
    ) -> None:
        self.store = store
        self.elected = store.dialect == "postgresql"
        self.interval = interval
        self._on_change = on_change
        # SQLite has one daemon (see store.coordination): it always leads.
        self._leading = not self.elected
        self._conn: Connection | None = None
        self._failing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        return self._leading

    def start(self) -> None:
        """Check once now (a lone daemon leads from its first cycle), then every `interval`."""
        if not self.elected or self._thread is not None:
            return
        self._stop.clear()
        self.check()
        self._thread = threading.Thread(target=self._run, name="jobqueue-leadership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking and give the lead up (closing our session frees the lock)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                if self._leading:
                    try:
                        give_up_lead(conn)
                    except Exception as exc:  # closing the session frees it all the same
                        log.debug("could not release the leader lock", error=str(exc))
                close_dedicated(conn)
            was, self._leading = self._leading, not self.elected
        if was and self.elected:
            log.info("no longer leading: stopped")

    def check(self) -> bool:
        """One check: take the lead if it is free, or make sure we still hold it."""
        if not self.elected:
            return True
        with self._lock:
            leading = False
            try:
                if self._conn is None:
                    self._conn = open_dedicated(self.store, leader=True)
                leading = holds_lead(self._conn) if self._leading else try_lead(self._conn)
                if self._failing:
                    log.info("leader election reaches the database again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("leader election cannot reach the database", error=str(exc))
                self._failing = True
                if self._conn is not None:
                    close_dedicated(self._conn)
                    self._conn = None
            changed = leading != self._leading
            self._leading = leading
        if changed:
            log.info("leading" if leading else "no longer leading")
            self._on_change(leading)
        return leading

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
