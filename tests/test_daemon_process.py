"""The daemon as a separate process: SIGKILL at several points of a job and restarts lose
nothing and duplicate nothing; SIGTERM stops it cleanly; it speaks sd_notify."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobqueue.emulator import EmulatorConfig, serve_in_thread
from tests.daemon_helpers import API_KEY, content_of, make_queue, remote_batches_per_local_id
from tests.factories import chat_file

ENDPOINT = "/v1/chat/completions"


def _daemon_env(db_url: str, data_dir: Path, base_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQUEUE_", "OPENAI_"))}
    env.update(
        JOBQUEUE_DATABASE_URL=db_url,
        JOBQUEUE_DATA_DIR=str(data_dir),
        JOBQUEUE_BASE_URL=base_url,
        OPENAI_API_KEY=API_KEY,
        JOBQUEUE_POLL_INTERVAL="0.2",
        JOBQUEUE_LEASE_SECONDS="30",
        # A create's bound (`max_call_seconds`, 3 tries of 3 s + 3 s connect, and the retries'
        # sleeps) stays near the lease: a killed daemon's batch is taken over within ~45 s.
        JOBQUEUE_REQUEST_TIMEOUT="3",
        JOBQUEUE_MAX_RETRIES="2",
        JOBQUEUE_LOG_LEVEL="warning",
        # A daemon that hangs is sent SIGABRT (see `_terminate`): its threads' stacks go to the log.
        PYTHONFAULTHANDLER="1",
        **extra,
    )
    return env


def _terminate(proc: subprocess.Popen, log: Path, timeout: float = 30) -> int:
    """SIGTERM, and the exit code; a daemon still running after `timeout` fails the test with
    the stacks of all its threads."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(10)
        pytest.fail(
            f"no exit {timeout}s after SIGTERM; the daemon's log:\n{log.read_text()[-8000:]}"
        )


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        stdin=subprocess.DEVNULL,
    )


def test_sigkill_and_restart_lose_and_duplicate_nothing(db_url: str, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 1_200)
    # Slow answers widen every window between a remote call and the commit that records it.
    config = EmulatorConfig(
        time_scale=3600, seed=12, api_key=API_KEY, requests_per_minute=20.0,
        fault_slow=0.25, slow_seconds=0.3,
    )  # fmt: skip
    with serve_in_thread(config) as em:
        # The reference: an undisturbed run on its own database.
        ref = make_queue(f"sqlite:///{tmp_path / 'ref.db'}", tmp_path / "ref", em.base_url)
        job = ref.submit(source, ENDPOINT, max_batch_requests=150)
        ref.start()
        expected = [(r["custom_id"], content_of(r)) for r in ref.results(ref.wait(job.id, 120).id)]
        ref.close()
        before = set(remote_batches_per_local_id(em.emulator))

        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        job = jq.submit(source, ENDPOINT, max_batch_requests=150)
        em.emulator.script_next(create_fault="drop", times=2)  # two creates lose their answer
        env = _daemon_env(db_url, tmp_path / "data", em.base_url)
        log = tmp_path / "daemon.log"
        kills = 0
        for delay in [1.6, 1.9, 2.2, 1.7, 2.5, 2.0]:
            proc = _start(env, log)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            if jq.get(job.id).done:
                break
        # The job may end before this last daemon gets going: it must be READY (its signal
        # handlers installed) before the SIGTERM, or the signal kills it outright.
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ready.bind(str(tmp_path / "notify.sock"))
        ready.settimeout(30)
        proc = _start({**env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}, log)
        try:
            final = jq.wait(job.id, timeout=120)
            while "READY=1" not in ready.recv(1024).decode():
                pass
        finally:
            ready.close()
            assert _terminate(proc, log) == 0, log.read_text()[-3000:]
        assert kills >= 3
        assert final.status == "completed", final.to_dict()
        got = [(r["custom_id"], content_of(r)) for r in jq.results(job.id)]
        assert got == expected
        per_local = remote_batches_per_local_id(em.emulator)
        ours = {k: v for k, v in per_local.items() if k not in before}
        local_ids = {b.id for b in final.batches if b.remote_id}
        assert set(ours) == local_ids
        assert set(ours.values()) == {1}, "a local batch got two remote batches"
        # Leases were released on the clean stop.
        with jq.store.read() as conn:
            assert not jq.store.lease_owners(conn)
        jq.close()


def test_sigterm_stops_cleanly_and_speaks_sd_notify(db_url: str, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    with serve_in_thread(EmulatorConfig(time_scale=3600, seed=13, api_key=API_KEY)) as em:
        env = _daemon_env(
            db_url, tmp_path / "data", em.base_url,
            NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000",
        )  # fmt: skip
        proc = _start(env, tmp_path / "daemon.log")
        try:
            messages = []
            while "READY=1" not in messages or "WATCHDOG=1" not in messages:
                messages.append(sock.recv(1024).decode())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            messages.append(sock.recv(1024).decode())
            while True:
                try:
                    sock.settimeout(0.5)
                    messages.append(sock.recv(1024).decode())
                except TimeoutError:
                    break
            assert "STOPPING=1" in messages
        finally:
            if proc.poll() is None:
                proc.kill()
            sock.close()
