"""A full disk (and other refusals of the file system) during submit, collect and export: one
line, exit code 1, nothing half-written left behind.

The file systems refuse for real: `RLIMIT_FSIZE` in a child process (writes past the limit fail
with EFBIG, no privileges needed), a small tmpfs in a private mount namespace (ENOSPC; skipped
where namespaces are not allowed) and /dev/full.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select

from jobqueue.api import JobQueue
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.store.tables import batches_table, events_table, jobs_table, requests_table
from tests.daemon_helpers import API_KEY, make_queue, wait_until
from tests.factories import chat_file, chat_line, write_jsonl

CHAT = "/v1/chat/completions"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQUEUE_", "OPENAI_"))}
    env.update(
        JOBQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'q.db'}",
        JOBQUEUE_DATA_DIR=str(tmp_path / "data"),
        JOBQUEUE_LOG_FORMAT="json",
        **extra,
    )
    return env


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _jobqueue(args: list[str], env: dict[str, str], limit: int | None = None,
              **kw: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "jobqueue", *args], env=env, capture_output=True, text=True,
        timeout=120, preexec_fn=_file_size_limit(limit) if limit else None, **kw,
    )  # fmt: skip


def _nothing_recorded(tmp_path: Path) -> None:
    with JobQueue(database_url=f"sqlite:///{tmp_path / 'q.db'}",
                  data_dir=tmp_path / "data") as jq, jq.store.read() as conn:  # fmt: skip
        for table in (jobs_table, batches_table, requests_table, events_table):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
    jobs = tmp_path / "data" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), list(jobs.rglob("*"))


def _big_requests(path: Path, n: int = 400) -> Path:
    # ~10 KB a line: the input shards outgrow the limit long before the request index does.
    lines = (chat_line(i) for i in range(n))
    return write_jsonl(path, ({**x, "body": {**x["body"], "user": "x" * 10_000}} for x in lines))


def test_submit_past_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    source = _big_requests(tmp_path / "in.jsonl")
    assert _jobqueue(["status"], env).returncode == 0  # the database exists, migrated
    done = _jobqueue(["submit", str(source), "-e", CHAT], env, limit=1 << 20)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: cannot write the job's files in {tmp_path / 'data' / 'jobs'}: "
        "File too large; nothing was kept"
    ]
    _nothing_recorded(tmp_path)


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs a private mount namespace")
def test_submit_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    source = _big_requests(tmp_path / "in.jsonl")
    data = tmp_path / "data"
    data.mkdir()
    assert _jobqueue(["status"], env).returncode == 0
    # The data dir becomes a 1 MB tmpfs, in a mount namespace of its own: ENOSPC for real.
    script = (
        'mount -t tmpfs -o size=1m tmpfs "$1" && "$2" -m jobqueue submit "$3" -e "$4"; '
        'echo "rc=$?"; find "$1" -mindepth 1 -not -type d'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(data), sys.executable, str(source), CHAT],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.splitlines() == ["rc=1"], done.stdout  # and no file left in the tmpfs
    assert done.stderr.strip().splitlines() == [
        f"error: cannot write the job's files in {data / 'jobs'}: "
        "No space left on device; nothing was kept"
    ]
    _nothing_recorded(tmp_path)


def _ended_job(tmp_path: Path, requests: int) -> str:
    """A job that ended without any remote: queued, then cancelled (its results say so)."""
    with JobQueue(database_url=f"sqlite:///{tmp_path / 'q.db'}", data_dir=tmp_path / "data") as jq:
        job = jq.submit(chat_file(tmp_path / "in.jsonl", requests), CHAT)
        assert jq.cancel(job.id).status == "cancelled"
        return job.id


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_results_to_a_full_stdout_is_one_line(tmp_path: Path) -> None:
    job_id = _ended_job(tmp_path, 2000)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "jobqueue", "results", job_id], env=_env(tmp_path),
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: cannot write the results to stdout: No space left on device"
    ]


def test_results_to_a_file_past_the_limit_leave_no_half_file(tmp_path: Path) -> None:
    job_id = _ended_job(tmp_path, 5000)
    out = tmp_path / "out" / "results.jsonl"
    out.parent.mkdir()
    done = _jobqueue(["results", job_id, "-o", str(out)], _env(tmp_path), limit=64 << 10)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: cannot write {out}: File too large; nothing was written"
    ]
    assert list(out.parent.iterdir()) == []  # neither the file nor its .part
    whole = _jobqueue(["results", job_id, "-o", str(out)], _env(tmp_path))
    assert whole.returncode == 0 and len(out.read_bytes().splitlines()) == 5000


def test_collect_on_a_refusing_file_system_warns_in_one_line_and_retries(
    tmp_path: Path,
) -> None:
    """The download is refused twice (the results dir is blocked, then the file outgrows the
    limit): each time one warning line, no file or .part kept, the batch left to collect; once
    the file system takes it, the job completes."""
    config = EmulatorConfig(time_scale=3600, seed=3, api_key=API_KEY)
    with serve_in_thread(config) as em:
        db_url = f"sqlite:///{tmp_path / 'q.db'}"
        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        job = jq.submit(chat_file(tmp_path / "in.jsonl", 4000), CHAT)
        results = tmp_path / "data" / "jobs" / job.id / "results"
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text("in the way")  # a file where the results dir goes: mkdir fails
        jq.start()
        try:
            wait_until(lambda: jq.get(job.id).batches[0].status == "completed", timeout=60)
            wait_until(lambda: jq.daemon.duty_states()["collect"]["runs"] >= 2, timeout=30)
        finally:
            jq.stop()
        assert jq.get(job.id).status == "running"
        results.unlink()
        env = _env(tmp_path, JOBQUEUE_BASE_URL=em.base_url, OPENAI_API_KEY=API_KEY,
                   JOBQUEUE_LOG_LEVEL="warning")  # fmt: skip
        db_size = max(p.stat().st_size for p in tmp_path.glob("q.db*"))
        limited = _jobqueue(["run", "--once"], env, limit=db_size + (256 << 10))
        assert limited.returncode == 0, limited.stderr
        warnings = [orjson.loads(x) for x in limited.stderr.splitlines() if x.startswith("{")]
        failed = [w for w in warnings if w["event"] == "download failed, will retry"]
        assert failed and "File too large" in failed[0]["error"], limited.stderr
        assert "Traceback" not in limited.stderr
        assert not results.exists() or not any(results.iterdir()), list(results.iterdir())
        assert jq.get(job.id).status == "running"
        whole = _jobqueue(["run", "--once"], env)
        assert whole.returncode == 0, whole.stderr
        assert jq.get(job.id).status == "completed"
        jq.close()
