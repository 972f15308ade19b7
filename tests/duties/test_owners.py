"""Liveness of the daemons (`jobqueue.duties.owners.judge`): from their rows' heartbeats and
stops, and for daemons of this host, from whether their process still exists."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from jobqueue.duties import owners
from jobqueue.duties.context import make_owner
from jobqueue.duties.owners import judge
from jobqueue.store import Store, daemons

HOST = socket.gethostname()
NOW = 1_700_000_000.0
TIMEOUT = 30.0


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _register(store: Store, name: str, *, heartbeat: float = NOW, stopped: bool = False) -> None:
    host, pid, _ = name.split(":")
    with store.write() as conn:
        daemons.register_daemon(
            conn, daemon_id=name, host=host, pid=int(pid), version="t", now=heartbeat
        )
        if stopped:
            daemons.mark_daemon_stopped(conn, name, heartbeat)


def _judge(store: Store, me: str) -> tuple[set[str], set[str]]:
    with store.read() as conn:
        seen = judge(conn, me=me, now=NOW, timeout=TIMEOUT)
    return set(seen.alive), set(seen.dead)


def test_heartbeats_stops_and_gone_processes(store: Store) -> None:
    me = make_owner()
    fresh = f"{HOST}:{os.getppid()}:aaaaaa"  # a live process of this host
    gone = f"{HOST}:{_dead_pid()}:bbbbbb"  # its heartbeat is fresh, its process gone
    sibling = f"{HOST}:{os.getpid()}:cccccc"  # another context of this very process
    elsewhere = "elsewhere:1:dddddd"  # another host: its heartbeat is all there is to go on
    stale = "elsewhere:2:eeeeee"
    stopped = "elsewhere:3:ffffff"
    for name in (fresh, gone, sibling, elsewhere):
        _register(store, name, heartbeat=NOW - TIMEOUT + 1)
    _register(store, stale, heartbeat=NOW - TIMEOUT - 1)
    _register(store, stopped, heartbeat=NOW, stopped=True)
    alive, dead = _judge(store, me)
    assert alive == {me, fresh, sibling, elsewhere}
    assert dead == {gone, stale, stopped}


def test_we_are_alive_whatever_our_row_says(store: Store) -> None:
    me = f"{HOST}:{_dead_pid()}:aaaaaa"
    _register(store, me, heartbeat=NOW - 1000, stopped=True)
    assert _judge(store, f"{me}/hooks") == ({me}, set())


def test_owners_without_a_row_are_neither_alive_nor_dead(store: Store) -> None:
    assert _judge(store, "me") == ({"me"}, set())


def test_a_process_we_may_not_signal_counts_as_alive(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    _register(store, f"{HOST}:1:aaaaaa")
    monkeypatch.setattr(owners.os, "kill", refuse)
    assert _judge(store, "me") == ({"me", f"{HOST}:1:aaaaaa"}, set())


def test_make_owner_names_this_process() -> None:
    host, pid, tail = make_owner().split(":")
    assert (host, pid) == (HOST, str(os.getpid())) and len(tail) == 6
    assert make_owner() != make_owner()
    assert daemons.daemon_of_owner(daemons.hooks_owner("h:1:abc")) == "h:1:abc"
