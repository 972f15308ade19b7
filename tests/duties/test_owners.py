"""dead_local_owners: which lease owners are processes of this host that no longer exist."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from jobqueue.duties import owners
from jobqueue.duties.context import make_owner
from jobqueue.duties.owners import dead_local_owners

HOST = socket.gethostname()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_gone_processes_of_this_host_are_dead() -> None:
    gone = f"{HOST}:{_dead_pid()}:aaaaaa"
    alive = f"{HOST}:{os.getppid()}:bbbbbb"
    me = make_owner()
    sibling = f"{HOST}:{os.getpid()}:cccccc"  # another context of this very process
    listed = [gone, alive, me, sibling, "elsewhere:1:dddddd", "daemon-1", f"{HOST}:x:1", ""]
    assert dead_local_owners(listed, me) == [gone]


def test_our_own_name_is_never_dead_even_with_a_gone_pid() -> None:
    gone = f"{HOST}:{_dead_pid()}:aaaaaa"
    assert dead_local_owners([gone], gone) == []


def test_make_owner_names_this_process() -> None:
    host, pid, tail = make_owner().split(":")
    assert (host, pid) == (HOST, str(os.getpid())) and len(tail) == 6
    assert make_owner() != make_owner()


def test_a_process_we_may_not_signal_counts_as_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(owners.os, "kill", refuse)
    assert dead_local_owners([f"{HOST}:1:aaaaaa"], "me") == []
