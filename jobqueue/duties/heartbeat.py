"""A daemon's own row in the `daemons` table: registered at start, its heartbeat renewed every
`heartbeat_interval` seconds, stamped stopped on a clean stop (see `jobqueue.duties.owners`).

The heartbeat is what the duties' claims depend on (`DutyContext.may_claim`): a renewal that
fails (the database does not answer, or the row says the daemon stopped) stops the claims until
one succeeds again. A row that vanished (forgotten by another daemon after a long silence) is
registered again; a row that says stopped stays so: whoever stopped it meant it.
"""

from __future__ import annotations

import os
import socket

from jobqueue.duties.context import DutyContext, Heartbeat
from jobqueue.duties.owners import Liveness, judge
from jobqueue.logs import get_logger
from jobqueue.store import daemons
from jobqueue.version import __version__

log = get_logger("jobqueue.heartbeat")

# Rows of daemons stopped or silent this long are deleted when a daemon registers.
FORGET_AFTER = 7 * 86400.0


def _heartbeat(ctx: DutyContext) -> Heartbeat:
    if ctx.heartbeat is None:
        ctx.heartbeat = Heartbeat(ctx.settings.daemon_timeout)
    return ctx.heartbeat


def register(ctx: DutyContext) -> bool:
    """Add our row (heartbeat now). False when the database did not answer: the heartbeat
    duty registers us on its next run, and nothing is claimed meanwhile."""
    beat = _heartbeat(ctx)
    now = ctx.clock()
    try:
        with ctx.store.write() as conn:
            daemons.forget_daemons(conn, now - FORGET_AFTER)
            ours = daemons.register_daemon(
                conn, daemon_id=ctx.owner, host=socket.gethostname(), pid=os.getpid(),
                version=__version__, now=now,
            )  # fmt: skip
            renewed = ours and daemons.renew_heartbeat(conn, ctx.owner, now)
    except Exception as exc:
        beat.failed(f"cannot register: {exc}")
        log.warning("cannot register the daemon; claiming nothing until it can", error=str(exc))
        return False
    if not ours:
        beat.failed("another process's row has our name")
        log.error("another process's row has this daemon's name; claiming nothing",
                  owner=ctx.owner)  # fmt: skip
        return False
    if not renewed:
        beat.failed("the daemon's row says it stopped")
        log.error("the daemon's row says it stopped; claiming nothing", owner=ctx.owner)
        return False
    beat.renewed(now)
    return True


def heartbeat_once(ctx: DutyContext) -> Liveness | None:
    """Renew our heartbeat, then judge the other daemons. Returns that judgement, or None when
    the heartbeat could not be renewed (the claims stop until it can)."""
    beat = _heartbeat(ctx)
    now = ctx.clock()
    was_fresh = beat.fresh(now)
    try:
        with ctx.store.write() as conn:
            renewed = daemons.renew_heartbeat(conn, ctx.owner, now)
            if not renewed and not daemons.daemon_rows(conn, [ctx.owner]):
                renewed = daemons.register_daemon(
                    conn, daemon_id=ctx.owner, host=socket.gethostname(), pid=os.getpid(),
                    version=__version__, now=now,
                )  # fmt: skip
            liveness = judge(conn, me=ctx.owner, now=now, timeout=ctx.settings.daemon_timeout)
    except Exception as exc:
        if beat.refused is None:
            log.warning("cannot renew the heartbeat; claiming nothing until it can", error=str(exc))
        beat.failed(f"cannot renew: {exc}")
        return None
    if not renewed:
        if beat.refused is None:
            log.error("the daemon's row says it stopped; claiming nothing", owner=ctx.owner)
        beat.failed("the daemon's row says it stopped")
        return None
    if not was_fresh and beat.refused is not None:
        log.info("heartbeat renewed; claiming again", owner=ctx.owner)
    beat.renewed(now)
    return liveness


def mark_stopped(ctx: DutyContext) -> None:
    """Stamp our row stopped (a clean stop): the other daemons count us dead from now on."""
    if ctx.heartbeat is not None:
        ctx.heartbeat.failed("stopped")
    with ctx.store.write() as conn:
        daemons.mark_daemon_stopped(conn, ctx.owner, ctx.clock())
