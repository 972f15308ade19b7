"""`jobqueue events`: the DELIVERY column, --json deliveries, --dead, --redeliver, --follow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from jobqueue.cli.app import main
from jobqueue.hooks.dispatcher import Dispatcher
from jobqueue.hooks.sinks import PythonSink
from jobqueue.store import Store

pytestmark = pytest.mark.timeout(60)


def _cli(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    code = main(["--database-url", db_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


class Switch:
    """A callable for PythonSink that fails while `failing` is set."""

    def __init__(self, failing: bool) -> None:
        self.failing = failing
        self.got: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if self.failing:
            raise ConnectionError("receiver [down]")
        self.got.append(event["id"])


@pytest.fixture
def setup(store: Store) -> Iterator[tuple[Dispatcher, Switch, list[str]]]:
    """Two sinks: `ok` delivers everything, `flaky` is dead after 2 attempts for job_a."""
    switch = Switch(failing=True)
    sinks = [
        PythonSink(lambda event: None, "*", name="ok"),
        PythonSink(switch, "job.*", name="flaky", max_attempts=2),
    ]
    dispatcher = Dispatcher(store, sinks, "cli-test", backoff_base=0.001)
    dispatcher.run_once()
    with store.write() as conn:
        ids = [
            store.add_event(conn, "job.queued", job_id="job_a"),
            store.add_event(conn, "batch.queued", job_id="job_a"),
        ]
    for _ in range(50):
        dispatcher.run_once()
        if dispatcher.pending_count() == 0:
            break
        time.sleep(0.005)
    yield dispatcher, switch, ids
    dispatcher.close()


def test_events_table_has_a_delivery_column(
    db_url: str, setup: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, db_url, "events")
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split()[-1] == "DELIVERY"
    assert first.rstrip().endswith("flaky: dead (2 attempts), ok: delivered")
    assert second.rstrip().endswith("ok: delivered")


def test_events_json_lists_deliveries(
    db_url: str, setup: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, ids = setup
    code, out, _ = _cli(capsys, db_url, "events", "--json")
    assert code == 0
    found = json.loads(out)
    assert [e["id"] for e in found] == ids
    assert all(isinstance(e["seq"], int) for e in found)
    by_sink = {d["sink"]: d for d in found[0]["deliveries"]}
    assert by_sink["ok"]["status"] == "delivered" and by_sink["ok"]["attempts"] == 1
    assert by_sink["ok"]["delivered_at"].endswith("Z")
    assert by_sink["flaky"] == {
        "sink": "flaky",
        "status": "dead",
        "attempts": 2,
        "last_error": "ConnectionError: receiver [down]",
        "delivered_at": None,
    }
    assert [d["sink"] for d in found[1]["deliveries"]] == ["ok"]


def test_dead_then_redeliver(db_url: str, setup: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dispatcher, switch, ids = setup
    code, out, _ = _cli(capsys, db_url, "events", "--dead")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["EVENT", "TYPE", "JOB", "SINK", "ATTEMPTS", "LAST", "ERROR"]
    assert lines[1].split()[:5] == [ids[0], "job.queued", "job_a", "flaky", "2"]
    assert lines[1].rstrip().endswith("ConnectionError: receiver [down]")
    code, out, _ = _cli(capsys, db_url, "events", "--dead", "--json")
    [dead] = json.loads(out)
    assert (dead["event_id"], dead["sink"], dead["attempts"]) == (ids[0], "flaky", 2)

    code, out, _ = _cli(capsys, db_url, "events", "--redeliver", ids[0], "--sink", "flaky")
    assert code == 0 and out.strip() == f"queued 1 delivery of {ids[0]} again"
    switch.failing = False
    dispatcher.run_once()
    assert switch.got == [ids[0]]
    code, out, _ = _cli(capsys, db_url, "events", "--dead")
    assert out.strip() == "no dead deliveries"
    # Every delivery of the event, delivered ones included, when no sink is named.
    code, out, _ = _cli(capsys, db_url, "events", "--redeliver", ids[0], "--json")
    assert json.loads(out) == {"event_id": ids[0], "sink": None, "redelivered": 2}
    code, out, _ = _cli(capsys, db_url, "events", "--redeliver", ids[0])
    assert "no dead or delivered deliveries" in out


def test_redeliver_unknown_event_fails(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, db_url, "events", "--redeliver", "evt_nope")
    assert code == 1 and err.strip() == "error: no event 'evt_nope'"


def _read_line(stream: IO[str], timeout: float = 10) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert result and result[0], "no line from jobqueue events --follow"
    return result[0]


def test_follow_prints_new_events_until_interrupted(
    db_url: str, store: Store, tmp_path: Path
) -> None:
    with store.write() as conn:
        first = store.add_event(conn, "job.queued", job_id="job_f")
    env = {**os.environ, "JOBQUEUE_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "--database-url", db_url, "events", "-f", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(_read_line(proc.stdout))["id"] == first
        with store.write() as conn:
            second = store.add_event(conn, "job.running", job_id="job_f")
        line = json.loads(_read_line(proc.stdout))
        assert (line["id"], line["seq"], line["type"]) == (second, line["seq"], "job.running")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
