"""Intake through the embedded API and the CLI, on both databases: good files are recorded,
bad files are refused with every problem named by line, and nothing is left behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import and_, func, select

from jobqueue.api import InvalidOptions, JobQueue
from jobqueue.cli.app import main
from jobqueue.files.inputs import InputError
from jobqueue.store import job_number_of
from jobqueue.store.tables import batches_table, events_table, jobs_table, requests_table
from tests.factories import chat_file, chat_line, write_jsonl


@pytest.fixture
def queue(db_url: str, tmp_path: Path):
    jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data")
    yield jq
    jq.close()


def _nothing_recorded(jq: JobQueue) -> None:
    with jq.store.read() as conn:
        for table in (jobs_table, batches_table, requests_table, events_table):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
    jobs_dir = jq.data_dir / "jobs"
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir()), list(jobs_dir.iterdir())


def _request_rows(conn: Any, job_id: str) -> list[Any]:
    """(position, custom_id, batch_id) of a job's requests, in input order."""
    r, b = requests_table, batches_table
    return list(
        conn.execute(
            select(r.c.position, r.c.custom_id, b.c.id.label("batch_id"))
            .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
            .where(r.c.job_number == job_number_of(job_id))
            .order_by(r.c.position)
        ).all()
    )


def test_submit_records_job_batches_and_request_index(queue: JobQueue, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 2_500)
    job = queue.submit(source, "/v1/chat/completions", max_batch_requests=1_000,
                       metadata={"team": "eval"}, deadline="48h")  # fmt: skip
    assert job.status == "queued"
    assert job.request_counts.total == 2_500
    assert [b.request_counts.total for b in job.batches] == [1_000, 1_000, 500]
    assert all(b.status == "queued" and b.attempt == 1 for b in job.batches)
    assert job.metadata == {"team": "eval"}
    assert job.deadline_at is not None
    with queue.store.read() as conn:
        rows = _request_rows(conn, job.id)
        types = [e.type for e in queue.store.events(conn, job.id)]
    assert [r.custom_id for r in rows] == [f"req-{i}" for i in range(2_500)]
    assert [r.position for r in rows] == list(range(2_500))
    assert {r.batch_id for r in rows[:1_000]} == {job.batches[0].id}
    assert {r.batch_id for r in rows[2_000:]} == {job.batches[2].id}
    assert types == ["job.queued"] + ["batch.queued"] * 3
    # The shards hold the input lines, byte for byte, and live under the data dir.
    shard_lines = b"".join(
        Path(p).read_bytes()
        for p in sorted((queue.data_dir / "jobs" / job.id / "input").glob("*.jsonl"))
    )
    assert sorted(shard_lines.splitlines()) == sorted(source.read_bytes().splitlines())


def test_mixed_models_are_split_by_model(queue: JobQueue, tmp_path: Path) -> None:
    lines = [chat_line(i, model="model-a" if i % 2 else "model-b") for i in range(10)]
    job = queue.submit(write_jsonl(tmp_path / "m.jsonl", lines), "/v1/chat/completions")
    assert sorted((b.model, b.request_counts.total) for b in job.batches) == [
        ("model-a", 5),
        ("model-b", 5),
    ]
    with queue.store.read() as conn:
        by_batch = {r.custom_id: r.batch_id for r in _request_rows(conn, job.id)}
    model_of = {b.id: b.model for b in job.batches}
    assert all(
        model_of[by_batch[f"req-{i}"]] == ("model-a" if i % 2 else "model-b") for i in range(10)
    )


BAD_LINES = {
    "not json": (b"{nope", "line 2: not valid JSON"),
    "not an object": (b"[1, 2]", "line 2:"),
    "no custom_id": (orjson.dumps({**chat_line(1), "custom_id": ""}), "line 2: custom_id"),
    "duplicate custom_id": (orjson.dumps(chat_line(0)), "line 2: duplicate custom_id"),
    "method": (orjson.dumps({**chat_line(1), "method": "GET"}), "line 2: method"),
    "url": (orjson.dumps({**chat_line(1), "url": "/v1/embeddings"}), "line 2: url"),
    "body": (orjson.dumps({**chat_line(1), "body": "text"}), "line 2: body"),
    "model": (orjson.dumps({**chat_line(1), "body": {"messages": []}}), "line 2: body.model"),
    "utf8": (b'{"custom_id": "\xff"}', "line 2:"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_rule_refuses_the_file_and_records_nothing(
    queue: JobQueue, tmp_path: Path, case: str
) -> None:
    bad, expected = BAD_LINES[case]
    source = write_jsonl(tmp_path / "bad.jsonl", [chat_line(0), bad, chat_line(2)])
    with pytest.raises(InputError) as info:
        queue.submit(source, "/v1/chat/completions")
    assert expected in str(info.value)
    _nothing_recorded(queue)


def test_empty_file_is_refused(queue: JobQueue, tmp_path: Path) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        queue.submit(source, "/v1/chat/completions")
    _nothing_recorded(queue)


def test_a_line_over_the_limit_is_refused(queue: JobQueue, tmp_path: Path) -> None:
    huge = chat_line(1)
    huge["body"]["messages"][0]["content"] = "x" * 5000
    source = write_jsonl(tmp_path / "big.jsonl", [chat_line(0), huge])
    with pytest.raises(InputError, match="line 2"):
        queue.submit(source, "/v1/chat/completions", max_batch_bytes=4096)
    _nothing_recorded(queue)


def test_bad_options_are_refused_before_reading(queue: JobQueue, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 3)
    for kwargs, message in [
        ({"completion_window": "48h"}, "completion window"),
        ({"max_batch_requests": 50_001}, "max-batch-requests"),
        ({"max_batch_bytes": 300 * 1024 * 1024}, "max-batch-bytes"),
        ({"deadline": "soon"}, "deadline"),
        ({"metadata": {"jobqueue_batch_id": "x"}}, "reserved"),
        ({"metadata": {f"k{i}": "v" for i in range(15)}}, "metadata pairs"),
    ]:
        with pytest.raises(InvalidOptions, match=message):
            queue.submit(source, "/v1/chat/completions", **kwargs)
    with pytest.raises(InvalidOptions, match="unknown endpoint"):
        queue.submit(source, "/v1/chat")
    _nothing_recorded(queue)


# -- the command line ------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    code = main(["--database-url", db_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_submit_json_and_status_json(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = chat_file(tmp_path / "in.jsonl", 120)
    code, out, _ = _cli(capsys, db_url, "submit", str(source), "--endpoint", "/v1/chat/completions",
                        "--max-batch-requests", "50", "--json")  # fmt: skip
    assert code == 0
    submitted = json.loads(out)
    assert submitted["status"] == "queued"
    assert (submitted["batches"], submitted["requests"]) == (3, 120)
    assert set(submitted) == {
        "id", "short_id", "name", "status", "batches", "requests", "max_cost",
    }  # fmt: skip
    code, out, _ = _cli(capsys, db_url, "status", submitted["id"], "--json")
    assert code == 0
    status = json.loads(out)
    assert {"id", "status", "endpoint", "created_at", "request_counts", "batches"} <= set(status)
    assert status["request_counts"] == {"total": 120, "completed": 0, "failed": 0}
    assert [b["request_counts"]["total"] for b in status["batches"]] == [50, 50, 20]
    for batch in status["batches"]:
        assert {"id", "remote_id", "status", "attempt", "request_counts"} <= set(batch)
    code, out, _ = _cli(capsys, db_url, "status", "--json")
    assert [j["id"] for j in json.loads(out)] == [submitted["id"]]


def test_cli_bad_file_exit_2_names_lines_and_caps_at_20(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [chat_line(0)] + [{**chat_line(i), "method": "GET"} for i in range(1, 31)]
    source = write_jsonl(tmp_path / "bad.jsonl", lines)
    code, out, err = _cli(capsys, db_url, "submit", str(source), "-e", "/v1/chat/completions")
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    for line in range(2, 22):
        assert f"line {line}:" in err
    assert "line 22:" not in err
    assert "10 more" in err
    with JobQueue(database_url=db_url) as jq:
        _nothing_recorded(jq)


def test_cli_errors_are_one_line(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, db_url, "status", "job_doesnotexist")
    assert code == 2 and out == ""  # a job that does not exist is bad input
    assert err.strip().splitlines() == ["error: no job 'job_doesnotexist'"]
    code, _, err = _cli(capsys, db_url, "submit", "/nonexistent.jsonl", "-e", "/v1/embeddings")
    assert code == 2 and "Traceback" not in err and "nonexistent.jsonl" in err


def test_cli_cancel_queued_job(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = chat_file(tmp_path / "in.jsonl", 10)
    _, out, _ = _cli(capsys, db_url, "submit", str(source), "-e", "/v1/chat/completions", "--json")
    job_id = json.loads(out)["id"]
    code, out, _ = _cli(capsys, db_url, "cancel", job_id, "--json")
    assert code == 0
    cancelled = json.loads(out)
    assert cancelled["status"] == "cancelled"
    assert cancelled["request_counts"]["failed"] == 10
    assert {b["status"] for b in cancelled["batches"]} == {"cancelled"}
    code, out, _ = _cli(capsys, db_url, "events", job_id, "--json")
    assert [e["type"] for e in json.loads(out)] == [
        "job.queued", "batch.queued", "batch.cancelled", "job.cancelled",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "command", [[], ["submit"], ["status"], ["cancel"], ["events"], ["db"], ["db", "upgrade"]]
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_a_late_bad_line_undoes_shards_already_indexed(queue: JobQueue, tmp_path: Path) -> None:
    """Shards complete (and get their request index rows) while the file is still read; a bad
    line near the end still leaves nothing behind."""
    lines: list[Any] = [chat_line(i) for i in range(95)] + [b"{broken"] + [chat_line(96)]
    source = write_jsonl(tmp_path / "late.jsonl", lines)
    seen: list[int] = []
    insert = queue.store.insert_requests_json

    def counting(*args: Any, **kwargs: Any) -> None:
        seen.append(args[2])
        insert(*args, **kwargs)

    queue.store.insert_requests_json = counting  # type: ignore[method-assign]
    with pytest.raises(InputError, match="line 96"):
        queue.submit(source, "/v1/chat/completions", max_batch_requests=10)
    assert len(seen) >= 9  # nine full shards were indexed before the bad line
    _nothing_recorded(queue)


def test_a_database_error_while_indexing_stops_the_intake(queue: JobQueue, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 100)

    def failing(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("disk full")

    queue.store.insert_requests_json = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk full"):
        queue.submit(source, "/v1/chat/completions", max_batch_requests=10)
    _nothing_recorded(queue)


def test_mixed_models_out_of_order_positions_are_indexed(queue: JobQueue, tmp_path: Path) -> None:
    """Shards whose lines are not contiguous in the input go in as (position, id) pairs."""
    models = ["a", "b", "a", "a", "c", "b", "a"]
    lines = [chat_line(i, model=m) for i, m in enumerate(models)]
    job = queue.submit(write_jsonl(tmp_path / "m.jsonl", lines), "/v1/chat/completions")
    with queue.store.read() as conn:
        rows = _request_rows(conn, job.id)
    model_of = {b.id: b.model for b in job.batches}
    assert [(r.position, r.custom_id, model_of[r.batch_id]) for r in rows] == [
        (i, f"req-{i}", m) for i, m in enumerate(models)
    ]
