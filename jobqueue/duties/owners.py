"""Which lease owners are known dead: processes of this host that no longer exist.

A daemon killed with SIGKILL leaves its leases behind; waiting out the lease would stall its work
for minutes, so a daemon on the same host frees them at once when the owning pid is gone.
"""

from __future__ import annotations

import os
import socket


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_local_owners(owners: list[str], me: str) -> list[str]:
    host = socket.gethostname()
    dead = []
    for owner in owners:
        if owner == me:
            continue
        parts = owner.split(":")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _pid_alive(pid):
            dead.append(owner)
    return dead
