"""What every duty needs: the store, the remote, the settings, who we are, and a clock."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobqueue.core.costs import PriceTable
from jobqueue.core.ids import new_id
from jobqueue.remote.base import Provider
from jobqueue.settings import Settings
from jobqueue.store import Store


def make_owner() -> str:
    """A lease owner name unique to this process: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('d')[-6:]}"


class Heartbeat:
    """A daemon's own heartbeat as its duties see it: when it was last renewed, and whether
    the daemon's row still lets it work.

    The duties claim new work only while it is `fresh`: its last renewal succeeded, less than
    half the daemon timeout ago (well before the other daemons may count it dead and take over
    what it holds). A daemon whose heartbeat cannot be renewed (the database is down, its row
    says it stopped) claims nothing until it can.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._renewed_at: float | None = None
        self.refused: str | None = None  # why the last renewal failed, while it does

    def renewed(self, now: float) -> None:
        with self._lock:
            self._renewed_at = now
            self.refused = None

    def failed(self, reason: str) -> None:
        with self._lock:
            self._renewed_at = None
            self.refused = reason

    @property
    def renewed_at(self) -> float | None:
        with self._lock:
            return self._renewed_at

    def fresh(self, now: float) -> bool:
        with self._lock:
            at = self._renewed_at
        return at is not None and now - at < self.timeout / 2


@dataclass
class DutyContext:
    store: Store
    provider: Provider
    settings: Settings
    owner: str = field(default_factory=make_owner)
    clock: Callable[[], float] = time.time
    # Called with a duty's name when there is new work for it (the daemon wakes that duty).
    wake: Callable[[str], None] = lambda _name: None
    stats: dict[str, Any] = field(default_factory=dict)
    # What duties keep in this process from one run to the next (the orphan sweep's progress,
    # webhooks waiting for their batch), by the duty's name.
    memo: dict[str, Any] = field(default_factory=dict)
    # A daemon's heartbeat (None: the duties run unregistered, e.g. in a one-shot run or a test;
    # they always claim, and their leases are judged by lease time alone).
    heartbeat: Heartbeat | None = None
    # `count` is called from several threads at once (the submissions overlap).
    _count_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @property
    def prices(self) -> PriceTable:
        """The price table of the settings (the packaged one with the config's `[prices]`)."""
        found = self.memo.get("prices")
        if found is None:
            found = self.memo["prices"] = self.settings.price_table()
        return found  # type: ignore[no-any-return]

    def may_claim(self) -> bool:
        """Whether the duties may claim new work now: always, unless our heartbeat is stale."""
        return self.heartbeat is None or self.heartbeat.fresh(self.clock())

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def count(self, name: str, n: float = 1) -> None:
        with self._count_lock:
            self.stats[name] = self.stats.get(name, 0) + n
