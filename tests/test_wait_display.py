"""What `wait` shows: the remote's progress and the collected outcomes apart, a job's problem,
a hint when no daemon runs; and nothing but the bar on a terminal that logs share (this
process's routine logs held back, a daemon in the terminal's background kept quiet)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from jobqueue.api import JobQueue
from jobqueue.cli.app import main
from jobqueue.cli.running import NO_DAEMON, JobProgress
from jobqueue.core.records import Batch, Job, RequestCounts
from jobqueue.duties.context import DutyContext
from jobqueue.duties.submit import submit_once
from jobqueue.logs import configure_logging, get_logger
from jobqueue.remote import PermanentRemoteError
from jobqueue.testing import InMemoryRemote
from tests.factories import chat_file

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def _batch(i: int, status: str, remote: RequestCounts, collected: bool) -> Batch:
    return Batch(
        id=f"batch_{i}", job_id="job_x", status=status, attempt=1, shard_index=i, model="m",
        remote_id=f"b{i}", input_file_id=None, output_file_id=None, error_file_id=None,
        request_counts=remote, last_error=None, cancel_requested=False,
        times={"created_at": NOW, "collected_at": NOW if collected else None},
    )  # fmt: skip


def _job(collected: RequestCounts, batches: list[Batch]) -> Job:
    return Job(
        id="job_x", status="running", endpoint="/v1/chat/completions", completion_window="24h",
        metadata={}, max_attempts=3, source="in.jsonl", bytes=1, request_counts=collected,
        cancel_requested=False, error=None, created_at=NOW, started_at=NOW, finished_at=None,
        deadline_at=None, batches=tuple(batches), short_id="abc123",
    )  # fmt: skip


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=160, highlight=False), buffer


def test_remote_progress_and_collected_outcomes_are_shown_apart() -> None:
    # The remote reports 190 of 200 done (two batches of 100); nothing is collected yet.
    job = _job(
        RequestCounts(200, 0, 0),
        [
            _batch(0, "finalizing", RequestCounts(100, 99, 1), collected=False),
            _batch(1, "in_progress", RequestCounts(100, 90, 0), collected=False),
        ],
    )
    assert job.remote_counts == RequestCounts(200, 189, 1)
    console, buffer = _terminal()
    with JobProgress(console, show=True) as bar:
        bar.update(job)
    text = buffer.getvalue()
    remote_line = next(line for line in text.splitlines()[::-1] if "remote" in line)
    collected_line = next(line for line in text.splitlines()[::-1] if "collected" in line)
    assert "190/200" in remote_line and "1 finalizing, 1 in_progress" in remote_line
    assert "0/200" in collected_line and "0 succeeded, 0 failed" in collected_line
    # Collected batches count by their outcomes, not twice.
    later = _job(
        RequestCounts(200, 99, 1),
        [
            _batch(0, "completed", RequestCounts(100, 99, 1), collected=True),
            _batch(1, "in_progress", RequestCounts(100, 95, 0), collected=False),
        ],
    )
    assert later.remote_counts == RequestCounts(200, 194, 1)


def test_routine_logs_are_held_back_while_the_bar_shows(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    log = get_logger("jobqueue.test")
    console, buffer = _terminal()
    job = _job(RequestCounts(10, 0, 0), [])
    with JobProgress(console, show=True) as bar:
        bar.update(job)
        log.info("routine line")
        log.warning("careful now")
        bar.update(replace(job, problem="the remote refused the API key (401)"))
    text = buffer.getvalue() + capsys.readouterr().err
    assert "routine line" not in text
    assert "careful now" in text
    assert "problem: the remote refused the API key (401)" in text
    log.info("after the bar")
    assert "after the bar" in capsys.readouterr().err


def test_a_daemon_in_the_background_of_its_terminal_logs_only_warnings(tmp_path: Path) -> None:
    """On a real terminal: a process of the terminal's foreground group logs everything; one
    in a background group (`jobqueue run &`) writes only its warnings there."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from jobqueue.logs import configure_logging, get_logger
        os.setsid()
        fd = os.open(os.ttyname(0), os.O_RDWR)  # becomes the controlling terminal
        for n in (0, 1, 2):
            os.dup2(fd, n)
        def speak(who):
            configure_logging("info", "console", quiet_in_background=True)
            log = get_logger("t")
            log.info(who + "-info")
            log.warning(who + "-warning")
        speak("fg")
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # a background group of the same terminal
            speak("bg")
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=slave, stdout=slave, stderr=slave,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    text = output.decode(errors="replace")
    assert "fg-info" in text and "fg-warning" in text
    assert "bg-warning" in text and "bg-info" not in text


# -- the wait command ------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--database-url", db_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def queue(db_url: str, tmp_path: Path) -> Any:
    jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data", poll_interval=0.2)
    yield jq
    jq.close()


def test_wait_says_when_no_daemon_runs(
    queue: JobQueue, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 2), "/v1/chat/completions")
    code, _, err = _cli(capsys, db_url, "wait", job.id, "--timeout", "0.5")
    assert code == 3 and NO_DAEMON in err
    queue.start(provider=InMemoryRemote())  # runs; the remote keeps its batch validating
    code, _, err = _cli(capsys, db_url, "wait", job.id, "--timeout", "0.5")
    assert code == 3 and NO_DAEMON not in err


def test_status_and_wait_show_a_job_problem(
    queue: JobQueue, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 2), "/v1/chat/completions")
    remote = InMemoryRemote()
    remote.fault("upload_file", PermanentRemoteError("Incorrect API key", status=401))
    submit_once(DutyContext(store=queue.store, provider=remote, settings=queue.settings))
    code, out, _ = _cli(capsys, db_url, "status", job.id)
    assert code == 0 and "problem    the remote refused the API key (401)" in out
    code, out, _ = _cli(capsys, db_url, "status")
    assert "PROBLEM" in out and "refused the API key" in out
    code, out, _ = _cli(capsys, db_url, "status", job.id, "--json")
    shown = json.loads(out)
    assert shown["problem_kind"] == "credentials" and "API key" in shown["problem"]
    code, _, err = _cli(capsys, db_url, "wait", job.id, "--timeout", "0.3")
    assert code == 3 and "problem: the remote refused the API key (401)" in err
