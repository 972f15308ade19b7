"""Wake-ups from other processes on PostgreSQL: LISTEN on a connection of our own.

Every write transaction that gives a duty work (a submitted job, a cancel, an ingested webhook,
any new event) notifies the schema's channel as it commits (see `jobqueue.store.coordination`); this
thread hears it and wakes the named duties at once. Polling stays the fallback: a lost
connection is opened again, and then every duty is woken once, for what was said meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from jobqueue.core.backoff import backoff
from jobqueue.logs import get_logger
from jobqueue.store import Connection, Store
from jobqueue.store.coordination import close_dedicated, listen, notifications, open_dedicated

log = get_logger("jobqueue.service.wakeups")


class Listener:
    """Calls `on_wake(duties)` for each notification; `on_reconnect()` after a lost connection."""

    def __init__(
        self,
        store: Store,
        on_wake: Callable[[list[str]], None],
        on_reconnect: Callable[[], None],
        *,
        poll: float = 0.5,
    ) -> None:
        self.store = store
        self._on_wake = on_wake
        self._on_reconnect = on_reconnect
        self.poll = poll
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.store.dialect != "postgresql" or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jobqueue-listen", daemon=True)
        self._thread.start()

    def wait_listening(self, timeout: float) -> bool:
        """True once the LISTEN is in place (for tests and the first start)."""
        return self._listening.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        conn: Connection | None = None
        failures = 0
        connected_before = False
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        conn = open_dedicated(self.store)
                        listen(conn)
                        self._listening.set()
                        if connected_before:
                            log.info("listening again")
                            self._on_reconnect()
                        connected_before = True
                        failures = 0
                    duties = notifications(conn, self.poll)
                except Exception as exc:
                    self._listening.clear()
                    if conn is not None:
                        close_dedicated(conn)
                        conn = None
                    failures += 1
                    if failures == 1:
                        log.warning("cannot listen for wake-ups; polling only", error=str(exc))
                    self._stop.wait(backoff(failures, base=1.0, cap=30.0))
                    continue
                if duties:
                    self._on_wake(duties)
        finally:
            if conn is not None:
                close_dedicated(conn)
