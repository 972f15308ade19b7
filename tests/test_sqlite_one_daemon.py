"""SQLite serves one daemon: a second one on the same file is refused with one line and exit 2,
while the CLI goes on working beside the daemon; a SIGKILLed daemon never blocks its restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobqueue.api import DaemonAlreadyRunning, JobQueue
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.testing import InMemoryRemote
from tests.daemon_helpers import API_KEY
from tests.factories import chat_file

ENDPOINT = "/v1/chat/completions"


def test_a_second_daemon_in_one_process_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    one = JobQueue(database_url=sqlite_url, data_dir=tmp_path / "data", poll_interval=0.2)
    two = JobQueue(database_url=sqlite_url, data_dir=tmp_path / "data", poll_interval=0.2)
    try:
        one.start(provider=InMemoryRemote())
        with pytest.raises(DaemonAlreadyRunning, match=rf"\(pid {os.getpid()}\) already runs"):
            two.start(provider=InMemoryRemote())
        assert two.daemon is None
        with pytest.raises(DaemonAlreadyRunning):
            two.run_once(provider=InMemoryRemote())
        # The other side of the CLI keeps working meanwhile.
        job = two.submit(chat_file(tmp_path / "in.jsonl", 3), ENDPOINT)
        assert two.get(job.id).status in ("queued", "running")
        one.stop()
        two.start(provider=InMemoryRemote())  # free again
        assert two.daemon is not None and two.daemon.leading
    finally:
        one.close()
        two.close()


def _env(db_url: str, data_dir: Path, base_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQUEUE_", "OPENAI_"))}
    env.update(
        JOBQUEUE_DATABASE_URL=db_url, JOBQUEUE_DATA_DIR=str(data_dir), JOBQUEUE_BASE_URL=base_url,
        OPENAI_API_KEY=API_KEY, JOBQUEUE_POLL_INTERVAL="0.5", JOBQUEUE_LOG_LEVEL="warning",
        **extra,
    )  # fmt: skip
    return env


def _start_ready(env: dict[str, str], tmp_path: Path, name: str) -> subprocess.Popen:
    """A `jobqueue run` that has said READY=1 (its lock taken, its duties started)."""
    path = tmp_path / f"{name}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "run"],
        env={**env, "NOTIFY_SOCKET": str(path)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / f"{name}.log").open("ab"),
        stdin=subprocess.DEVNULL,
    )
    try:
        while "READY=1" not in sock.recv(1024).decode():
            pass
    finally:
        sock.close()
    return proc


def _jobqueue(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobqueue", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_second_daemon_process_is_refused_and_a_killed_one_restarts(
    sqlite_url: str, tmp_path: Path
) -> None:
    with serve_in_thread(EmulatorConfig(time_scale=3600, seed=31, api_key=API_KEY)) as em:
        env = _env(sqlite_url, tmp_path / "data", em.base_url)
        first = _start_ready(env, tmp_path, "first")
        try:
            for args in (["run"], ["run", "--once"]):
                second = _jobqueue(env, *args)
                assert second.returncode == 2, second.stderr
                lines = second.stderr.strip().splitlines()
                assert len(lines) == 1, second.stderr
                assert lines[0].startswith(f"error: another jobqueue daemon (pid {first.pid})")
                assert "SQLite serves one daemon" in lines[0] and "Traceback" not in second.stderr
            # The CLI works beside the daemon, which runs what it submits.
            source = chat_file(tmp_path / "in.jsonl", 5)
            submitted = _jobqueue(env, "submit", str(source), "--endpoint", ENDPOINT, "--json")
            assert submitted.returncode == 0, submitted.stderr
            import json

            job_id = json.loads(submitted.stdout)["id"]
            waited = _jobqueue(env, "wait", job_id, "--timeout", "30")
            assert waited.returncode == 0, waited.stderr
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        # The kernel dropped the dead daemon's lock: a new one starts at once.
        again = _start_ready(env, tmp_path, "again")
        again.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0
        lock = Path(sqlite_url.removeprefix("sqlite:///") + ".daemon.lock")
        assert lock.read_text().strip() == str(again.pid)
