"""What every duty needs: the store, the remote, the settings, who we are, and a clock."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobqueue.core.ids import new_id
from jobqueue.remote.base import Provider
from jobqueue.settings import Settings
from jobqueue.store import Store


def make_owner() -> str:
    """A lease owner name unique to this process: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('d')[-6:]}"


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

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def count(self, name: str, n: float = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n
