"""The daemon when things go wrong: a database that is down is one warning and then one line a
minute (not a traceback per duty per second); a duty that keeps failing is one traceback and
then a count; failed duties are reported; heartbeats tell others that a daemon runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from jobqueue.api import JobQueue
from jobqueue.logs import FailureLog, get_logger
from jobqueue.service.daemon import LEADER_DUTIES, Daemon
from jobqueue.store.daemons import is_unavailable
from jobqueue.testing import Clock, InMemoryRemote
from tests.factories import chat_file


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _events(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["log_level"], e["event"]) for e in logs]


def test_failure_log_outage_once_then_a_line_a_minute_then_over() -> None:
    ticks = Ticks()
    failures = FailureLog(get_logger("test"), clock=ticks, outage=lambda exc: True)
    down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    with capture_logs() as logs:
        for duty in ("submit", "collect", "reconcile") * 20:  # 60 failures within a minute
            failures.failed(duty, down)
            ticks.now += 0.5
        ticks.now += 31
        failures.failed("submit", down)
        failures.succeeded("collect")
        failures.succeeded("submit")  # nothing more to close
    assert _events(logs) == [
        ("warning", "database unavailable"),
        ("warning", "database still unavailable"),
        ("info", "database available again"),
    ]
    assert logs[1]["failures"] == 60 and logs[1]["seconds"] == 61
    assert logs[2]["failures"] == 61
    assert "exc_info" not in logs[0]  # a line, not a traceback


def test_failure_log_a_bug_is_one_traceback_per_duty_and_kind() -> None:
    ticks = Ticks()
    failures = FailureLog(get_logger("test"), clock=ticks)
    with capture_logs() as logs:
        for _ in range(5):
            failures.failed("retry", KeyError("x"))
        failures.failed("retry", ValueError("y"))
        failures.failed("collect", KeyError("x"))
        ticks.now += 60
        failures.failed("retry", KeyError("x"))
        failures.succeeded("retry")
    assert _events(logs) == [
        ("error", "duty failed"),
        ("error", "duty failed"),
        ("error", "duty failed"),
        ("warning", "duty still failing"),
        ("info", "duty works again"),
        ("info", "duty works again"),
    ]
    assert isinstance(logs[0]["exc_info"], KeyError)
    assert failures.failing == ["collect:KeyError"]


@pytest.fixture
def queue(db_url: str, tmp_path: Path) -> Any:
    jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data", poll_interval=0.2)
    yield jq
    jq.close()


def _unreachable(dialect: str, tmp_path: Path) -> Any:
    if dialect == "sqlite":
        return create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    return create_engine(
        "postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )


def test_a_database_that_is_down_is_not_a_traceback_per_duty(
    queue: JobQueue, tmp_path: Path
) -> None:
    queue.submit(chat_file(tmp_path / "in.jsonl", 2), "/v1/chat/completions")
    daemon = Daemon(queue.settings, queue.store, InMemoryRemote(clock=Clock(time.time())))
    ticks = Ticks()
    daemon.failures.clock = ticks
    good = queue.store.engine
    try:
        queue.store.engine = _unreachable(queue.store.dialect, tmp_path)
        with capture_logs() as logs:
            for _ in range(10):  # ten rounds of every duty, within a few seconds
                for duty in daemon.duties.values():
                    daemon._call(duty)
                daemon.heartbeat()
                ticks.now += 0.5
            ticks.now += 60
            for duty in daemon.duties.values():
                daemon._call(duty)
        assert _events(logs) == [
            ("warning", "database unavailable"),
            # The heartbeat says once that claims stop meanwhile (jobqueue.duties.heartbeat).
            ("warning", "cannot renew the heartbeat; claiming nothing until it can"),
            ("warning", "database still unavailable"),
        ]
        # Every duty that asks the database, but the leader's where this daemon does not lead.
        asking = {
            name
            for name, duty in daemon.duties.items()
            if duty.asks_database and (daemon.leadership.leading or name not in LEADER_DUTIES)
        }
        assert set(daemon.failed_duties()) == asking
        assert "OperationalError" in daemon.failed_duties()["submit"]
        queue.store.engine.dispose()
    finally:
        queue.store.engine = good
    with capture_logs() as logs:
        daemon._call(daemon.duties["submit"])  # claims nothing yet: the heartbeat is stale
        assert _events(logs) == []
        assert daemon.heartbeat()  # the database answers again
        daemon._call(daemon.duties["submit"])
    assert ("info", "database available again") in _events(logs)
    daemon.stop()


def test_is_unavailable_tells_the_database_down_from_a_bug(queue: JobQueue) -> None:
    assert is_unavailable(OperationalError("x", {}, Exception("gone")))
    assert not is_unavailable(KeyError("x")) and not is_unavailable(ValueError("x"))


def test_heartbeats_tell_other_processes_a_daemon_runs(db_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with (
        JobQueue(database_url=db_url, data_dir=data, poll_interval=0.2) as running,
        JobQueue(database_url=db_url, data_dir=data) as looking,
    ):
        assert looking.daemons_alive() == []
        running.start(provider=InMemoryRemote())
        owner = running.daemon.owner  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while owner not in looking.daemons_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert looking.daemons_alive() == [owner]
        running.stop()
        assert looking.daemons_alive() == []  # a daemon that stops says so
