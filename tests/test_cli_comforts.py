"""Small comforts of the command line: `--version`, shell completion, choices checked, `events
--limit` giving the newest, a TOML error naming its file and line, `submit --dry-run`, and the
demo's `--port` and `--keep`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobqueue.api import JobQueue
from jobqueue.cli.app import main
from jobqueue.version import __version__
from tests.factories import chat_file, chat_line, write_jsonl

ENDPOINT = "/v1/chat/completions"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "--version")
    assert code == 0 and out.strip() == f"jobqueue {__version__}"


def test_shell_completion_of_commands_and_jobs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with JobQueue(data_dir=data) as jq:
        job = jq.submit(chat_file(tmp_path / "in.jsonl", 2), ENDPOINT, name="nightly")
    env = {**os.environ, "JOBQUEUE_DATA_DIR": str(data), "_JOBQUEUE_COMPLETE": "complete_bash"}
    jobqueue = [sys.executable, "-m", "jobqueue"]

    def complete(words: str) -> list[str]:
        cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
        done = subprocess.run(
            jobqueue, env={**env, "COMP_WORDS": words, "COMP_CWORD": cword},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.split()

    assert "process" in complete("jobqueue pro") and "retry" in complete("jobqueue re")
    assert set(complete("jobqueue wait ")) == {job.short_id, "nightly"}
    assert complete("jobqueue status nig") == ["nightly"]
    script = subprocess.run(
        [*jobqueue, "--show-completion", "bash"], env={**os.environ, "SHELL": "/bin/bash"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert script.returncode == 0 and "_JOBQUEUE_COMPLETE" in script.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--status", "runing"],
        ["--log-level", "loud", "status"],
        ["--log-format", "xml", "status"],
        ["events", "--sink", "ops"],
    ],
)
def test_choices_are_checked(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = _cli(capsys, *args)
    assert code == 2 and out == ""
    assert "Traceback" not in err


def test_a_log_level_from_the_environment_is_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBQUEUE_LOG_LEVEL", "loud")
    assert _cli(capsys, "status")[0] == 2
    monkeypatch.setenv("JOBQUEUE_LOG_LEVEL", "WARNING")
    assert _cli(capsys, "status")[0] == 0


def test_events_limit_gives_the_newest_and_after_pages(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with JobQueue(database_url=db_url, data_dir=tmp_path / "data") as jq:
        for i in range(3):  # a job.queued and a batch.queued each
            jq.submit(chat_file(tmp_path / f"in{i}.jsonl", 1 + i), ENDPOINT)
        every = [e.seq for e in jq.events()]
        assert [e.seq for e in jq.events(limit=2)] == every[-2:]
        assert [e.seq for e in jq.events(after=every[0], limit=2)] == every[1:3]
    base = ["--database-url", db_url, "events", "--json"]
    code, out, _ = _cli(capsys, *base, "--limit", "2")
    assert code == 0 and [e["seq"] for e in json.loads(out)] == every[-2:]
    code, out, _ = _cli(capsys, *base, "--after", str(every[1]), "--limit", "3")
    assert [e["seq"] for e in json.loads(out)] == every[2:5]


def test_a_toml_error_names_its_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "jobqueue.toml"
    config.write_text('poll_interval = 5\n\nbase_url = "http://x\n')
    code, out, err = _cli(capsys, "--config", str(config), "status")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert str(config) in line and "line 3" in line


def test_dry_run_prints_the_plan_and_records_nothing(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [chat_line(i, model="model-a" if i < 5 else "model-b") for i in range(12)]
    for line in lines:
        line["body"]["max_tokens"] = 10
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    data = tmp_path / "data"
    base = ["--database-url", db_url, "--data-dir", str(data), "submit", str(source), "-e",
            ENDPOINT, "--max-batch-requests", "4", "--dry-run"]  # fmt: skip
    code, out, err = _cli(capsys, *base, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["requests"] == 12 and plan["batches"] == 4  # a:4+1, b:4+3
    assert sorted((s["model"], s["requests"]) for s in plan["shards"]) == [
        ("model-a", 1), ("model-a", 4), ("model-b", 3), ("model-b", 4),
    ]  # fmt: skip
    assert all(s["input_tokens"] > 0 for s in plan["shards"])
    assert sum(s["max_output_tokens"] for s in plan["shards"]) == 120
    assert plan["input_tokens"] == sum(s["input_tokens"] for s in plan["shards"])
    code, out, _ = _cli(capsys, *base)
    assert code == 0 and "nothing recorded" in out and "model-b" in out
    with JobQueue(database_url=db_url, data_dir=data) as jq:
        assert jq.jobs() == [] and jq.events() == []
    assert [p.name for p in data.iterdir()] in ([], ["jobqueue.db"])
    # A bad file is refused as submit refuses it.
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat_line(0), b"{not json"])
    code, _, err = _cli(capsys, "--database-url", db_url, "--data-dir", str(data), "submit",
                        str(bad), "-e", ENDPOINT, "--dry-run")  # fmt: skip
    assert code == 2 and "line 2" in err


def test_dry_run_notes_an_open_job_for_the_same_file(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = chat_file(tmp_path / "in.jsonl", 3)
    with JobQueue(database_url=db_url, data_dir=tmp_path / "data") as jq:
        job = jq.submit(source, ENDPOINT)
    code, out, _ = _cli(capsys, "--database-url", db_url, "--data-dir", str(tmp_path / "data"),
                        "submit", str(source), "-e", ENDPOINT, "--dry-run", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["duplicate_of"] == job.id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keep", [False, True])
def test_demo_port_and_its_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    keep: bool,
) -> None:  # fmt: skip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port = _free_port()
    args = ["demo", "--requests", "60", "--batch-size", "30", "--port", str(port)]
    code, out, _ = _cli(capsys, *args, *(["--keep"] if keep else []))
    assert code in (0, 1)
    assert f"emulator on http://127.0.0.1:{port}/v1" in out
    (workdir,) = re.findall(r"data in (\S+)", out)
    assert Path(workdir).parent == tmp_path
    assert Path(workdir).exists() is keep
    if keep:
        assert (Path(workdir) / "results.jsonl").exists() and str(workdir) in out
    else:
        assert list(tmp_path.glob("jobqueue-demo-*")) == [] and "--keep" in out
