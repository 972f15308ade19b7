"""One-shot runs from the command line, against the emulator: `run --once` and `run --until-done`
with exit codes that say how it went, `process FILE -o OUT` (and finding its job again after a
crash), and `submit` refusing a second open job for the same file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobqueue.api import JobQueue
from jobqueue.cli.app import main
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from tests.daemon_helpers import API_KEY, wait_until
from tests.factories import chat_file

pytestmark = pytest.mark.timeout(120)
ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    config = EmulatorConfig(time_scale=3600, seed=5, api_key=API_KEY)
    with serve_in_thread(config) as em:
        monkeypatch.setenv("JOBQUEUE_BASE_URL", em.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        monkeypatch.setenv("JOBQUEUE_POLL_INTERVAL", "0.2")
        yield em


class Cli:
    def __init__(self, db_url: str, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.base = ["--database-url", db_url, "--data-dir", str(data_dir)]
        self.capsys = capsys
        self.db_url, self.data_dir = db_url, data_dir

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([*self.base, *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def queue(self) -> JobQueue:
        return JobQueue(database_url=self.db_url, data_dir=self.data_dir)


@pytest.fixture
def cli(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(db_url, tmp_path / "data", capsys)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- run --until-done -------------------------------------------------------------------------


def test_until_done_runs_every_open_job_to_its_end_and_exits_0(
    cli: Cli, emulator: Any, tmp_path: Path
) -> None:
    for i, n in enumerate((7, 12)):
        code, _, _ = cli("submit", str(chat_file(tmp_path / f"in{i}.jsonl", n)), "-e", ENDPOINT,
                         "--max-batch-requests", "5")  # fmt: skip
        assert code == 0
    code, _, err = cli("run", "--until-done")
    assert code == 0, err
    with cli.queue() as jq:
        jobs = jq.jobs()
    assert [j.status for j in jobs] == ["completed", "completed"]
    assert sum(j.request_counts.completed for j in jobs) == 19
    assert err.count("completed: ") == 2


def test_until_done_exits_1_when_a_job_ended_otherwise(
    cli: Cli, emulator: Any, tmp_path: Path
) -> None:
    emulator.emulator.script_next(fail="invalid_json_line")
    cli("submit", str(chat_file(tmp_path / "in.jsonl", 3)), "-e", ENDPOINT)
    code, _, err = cli("run", "--until-done")
    assert code == 1, err
    with cli.queue() as jq:
        (job,) = jq.jobs()
    assert job.status == "failed"
    assert "failed: " in err


def test_once_and_until_done_exit_4_on_a_refused_key_instead_of_waiting(
    cli: Cli, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-wrong-one")
    cli("submit", str(chat_file(tmp_path / "in.jsonl", 3)), "-e", ENDPOINT)
    code, _, err = cli("run", "--once")
    assert code == 4
    assert "refused the API key" in err and "sk-the-wrong-one" not in err
    started = time.monotonic()
    code, _, err = cli("run", "--until-done")
    assert code == 4 and "refused the API key" in err
    assert time.monotonic() - started < 30  # it stopped; the backoff would be 30 s and more
    with cli.queue() as jq:
        (job,) = jq.jobs()
    assert job.status == "queued" and job.problem_kind == "credentials"
    # Fixed: the next run tries at once and the problem goes.
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    code, _, err = cli("run", "--until-done")
    assert code == 0, err
    with cli.queue() as jq:
        (job,) = jq.jobs()
    assert job.status == "completed" and job.problem is None


def test_once_exits_4_when_a_duty_failed(
    cli: Cli, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobqueue.service.daemon as daemon_module

    def broken(_ctx: Any) -> int:
        raise RuntimeError("the expire duty is broken")

    monkeypatch.setattr(daemon_module, "expire_once", broken)
    cli("submit", str(chat_file(tmp_path / "in.jsonl", 3)), "-e", ENDPOINT)
    code, _, err = cli("run", "--once")
    assert code == 4
    assert "the expire duty failed: RuntimeError: the expire duty is broken" in err
    cli("submit", str(chat_file(tmp_path / "more.jsonl", 4)), "-e", ENDPOINT)
    code, _, err = cli("run", "--until-done")
    assert code == 4 and "the expire duty failed" in err
    with cli.queue() as jq:
        assert [job.status for job in jq.jobs()] == ["completed"] * 2  # the others worked


def test_once_exits_0_when_all_is_well(cli: Cli, emulator: Any, tmp_path: Path) -> None:
    cli("submit", str(chat_file(tmp_path / "in.jsonl", 3)), "-e", ENDPOINT)
    code, _, err = cli("run", "--once")
    assert code == 0, err


def test_run_refuses_contradicting_options(cli: Cli, emulator: Any) -> None:
    assert cli("run", "--once", "--until-done")[0] == 2
    assert cli("run", "--until-done", "--listen", "127.0.0.1:0")[0] == 2


# -- process ------------------------------------------------------------------------------------


def test_process_submits_runs_and_writes_the_results(
    cli: Cli, emulator: Any, tmp_path: Path
) -> None:
    source = chat_file(tmp_path / "in.jsonl", 11)
    out = tmp_path / "out.jsonl"
    code, _, err = cli("process", str(source), "-e", ENDPOINT, "-o", str(out),
                       "--max-batch-requests", "4", "--name", "nightly")  # fmt: skip
    assert code == 0, err
    results = _lines(out)
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(11)]
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert not out.with_name("out.jsonl.part").exists()
    # Again: the same job is found (the file and options are the same), its results written.
    out.unlink()
    code, _, err = cli("process", str(source), "-e", ENDPOINT, "-o", str(out),
                       "--max-batch-requests", "4")  # fmt: skip
    assert code == 0 and "nightly" in err and "writing its results" in err
    assert len(_lines(out)) == 11
    with cli.queue() as jq:
        (job,) = jq.jobs()
    assert job.name == "nightly"
    # Other options are another job.
    code, _, _ = cli("process", str(source), "-e", ENDPOINT, "-o", str(out), "--max-attempts", "2")
    assert code == 0
    with cli.queue() as jq:
        assert len(jq.jobs()) == 2


def test_process_after_a_crash_goes_on_with_its_job(
    db_url: str, tmp_path: Path, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jobqueue process` killed (SIGKILL) while its job runs; run again, it finds the job by
    the file's content and options and runs it to the end: one job, one remote batch."""
    data_dir = tmp_path / "data"
    source = chat_file(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    emulator.emulator.script_next(stick_in="validating")  # holds the first run in the middle
    env = {**os.environ, "JOBQUEUE_DATA_DIR": str(data_dir)}
    args = [sys.executable, "-m", "jobqueue", "--database-url", db_url, "process", str(source),
            "-e", ENDPOINT, "-o", str(out)]  # fmt: skip
    first = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def running() -> bool:
        with JobQueue(database_url=db_url, data_dir=data_dir) as jq:
            return [job.status for job in jq.jobs()] == ["running"]

    try:
        wait_until(running, timeout=60)  # submitted: its remote batch sits in validating
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert not out.exists()
    (remote,) = emulator.emulator.batches()
    emulator.emulator.script(remote["id"], stick_in=None)  # the remote goes on
    cli = Cli(db_url, data_dir, capsys)
    code, _, err = cli("process", str(source), "-e", ENDPOINT, "-o", str(out))
    assert code == 0, err
    assert "going on with it" in err
    assert len(_lines(out)) == 6
    with cli.queue() as jq:
        assert len(jq.jobs()) == 1
    assert len(emulator.emulator.batches()) == 1


def test_process_stops_on_a_refused_key_and_writes_nothing(
    cli: Cli, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-wrong-one")
    out = tmp_path / "out.jsonl"
    code, _, err = cli("process", str(chat_file(tmp_path / "in.jsonl", 3)), "-e", ENDPOINT,
                       "-o", str(out))  # fmt: skip
    assert code == 4
    assert "refused the API key" in err and "run this command again" in err
    assert not out.exists()


# -- duplicates -------------------------------------------------------------------------------


def test_submit_refuses_a_file_whose_job_is_open(cli: Cli, emulator: Any, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 3)
    code, first_id, _ = cli("submit", str(source), "-e", ENDPOINT)
    assert code == 0
    code, out, err = cli("submit", str(source), "-e", ENDPOINT)
    assert code == 2 and out == ""
    assert first_id.strip() in err and "--allow-duplicate" in err
    # The same content under another name is the same file.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(source.read_bytes())
    assert cli("submit", str(copy), "-e", ENDPOINT)[0] == 2
    # Other options, or --allow-duplicate: a second job.
    assert cli("submit", str(source), "-e", ENDPOINT, "--deadline", "2h")[0] == 0
    assert cli("submit", str(source), "-e", ENDPOINT, "--allow-duplicate")[0] == 0
    with cli.queue() as jq:
        assert len(jq.jobs()) == 3
    # Once the jobs ended, the file may go again.
    assert cli("run", "--until-done")[0] == 0
    assert cli("submit", str(source), "-e", ENDPOINT)[0] == 0
