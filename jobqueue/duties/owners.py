"""Which lease owners are alive, which are dead: the liveness of the daemons sharing a database.

Every daemon registers in the `daemons` table and renews its heartbeat every
`heartbeat_interval` seconds (`jobqueue.service.daemon`). A daemon is dead when

- its heartbeat is older than `daemon_timeout`, or its row says it stopped, or
- (the fast path, on the same host) its process no longer exists: a daemon killed with SIGKILL
  is known dead at once, without waiting out its heartbeat.

It is alive when its row is fresh and not stopped (and, on this host, its process exists). An
owner with no row (an embedded run of the duties, a daemon of an older version) is neither:
unknown, judged by its lease alone. What follows from it:

- a batch lease is taken over only when it has run out AND its owner is not alive (dead or
  unknown): a live daemon keeps its batches even past their lease;
- a hook delivery lease of a dead daemon is free at once (a delivery is at least once anyway).

Owner names are `host:pid:random` (unique per process; `<id>/hooks` for its hook dispatcher),
so the host and pid of a lease owner are known even without its row; a lease owner name
belongs to the daemon `jobqueue.store.daemons.daemon_of_owner` names.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from jobqueue.duties.context import DutyContext
from jobqueue.store import Connection
from jobqueue.store.daemons import daemon_of_owner, daemon_rows


@dataclass(frozen=True)
class Liveness:
    """Daemon ids known alive and known dead; any other owner name is unknown."""

    alive: frozenset[str]
    dead: frozenset[str]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_pid(name: str, host: str) -> int | None:
    """The pid of a `host:pid:random` name of this host, else None."""
    parts = name.split(":")
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return None
    return int(parts[1])


def _gone_here(name: str, host: str) -> bool:
    """A daemon name of this host whose process no longer exists (never this process)."""
    pid = _local_pid(name, host)
    return pid is not None and pid != os.getpid() and not _pid_alive(pid)


def judge(conn: Connection, *, me: str, now: float, timeout: float) -> Liveness:
    """Sort the registered daemons into alive and dead as of `now`, from their rows and, on
    this host, their processes; `me` is always alive. Owners without a row are in neither."""
    host = socket.gethostname()
    mine = daemon_of_owner(me)
    alive: set[str] = {mine}
    dead: set[str] = set()
    for row in daemon_rows(conn):
        if row.id == mine:
            continue
        stale = row.stopped_at is not None or row.heartbeat_at < now - timeout
        if stale or (row.host == host and _gone_here(row.id, host)):
            dead.add(row.id)
        else:
            alive.add(row.id)
    return Liveness(frozenset(alive), frozenset(dead))


def live_owners(ctx: DutyContext, conn: Connection, now: float) -> frozenset[str]:
    """The daemons alive now, us included: the batches they hold stay theirs even once their
    lease ran out."""
    return judge(conn, me=ctx.owner, now=now, timeout=ctx.settings.daemon_timeout).alive
