"""Recording a collected batch's lines (both dialects) and exporting them in input order."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from jobqueue.store import outcomes as results
from jobqueue.store.results import iter_result_lines, record_outcomes, write_result_lines
from tests.factories import insert_job_with_batch


def _ok(cid: str) -> bytes:
    return orjson.dumps(
        {"id": "x", "custom_id": cid, "response": {"status_code": 200, "body": {"v": [0.25]}},
         "error": None}
    )  # fmt: skip


def _status(cid: str, status: int) -> bytes:
    return orjson.dumps(
        {"id": "x", "custom_id": cid, "response": {"status_code": status, "body": {"error": {
            "code": f"c{status}"}}}, "error": None}
    )  # fmt: skip


def _error(cid: str, code: str) -> bytes:
    return orjson.dumps(
        {"id": "x", "custom_id": cid, "response": None, "error": {"code": code, "message": "m"}}
    )


@pytest.mark.parametrize("record_chunk", [10_000, 2])
def test_record_and_export(store, tmp_path: Path, monkeypatch, record_chunk: int) -> None:  # type: ignore[no-untyped-def]
    # A chunk of 2 sends PostgreSQL's updates in several statements, two in flight at a time.
    monkeypatch.setattr(results, "_CHUNK", record_chunk)
    job_id, _ = insert_job_with_batch(store, "completed", requests=9)
    with store.read() as conn:
        job_number = store.get_job(conn, job_id).number
    output = tmp_path / "out.jsonl"
    error = tmp_path / "err.jsonl"
    out_lines = [
        _ok("req-0") + b"\n",
        _ok("req-1") + b"\r\n",
        _ok("req-2") + b"\n",
        _status("req-2", 500) + b"\n",  # a second line for req-2: the first one wins
        _status("req-3", 500) + b"\n",
        _status("req-4", 400) + b"\n",
        b"\n",
        _ok("unknown") + b"\n",
        _ok("req-8"),  # the last line, without a newline
    ]
    output.write_bytes(b"".join(out_lines))
    error.write_bytes(_error("req-5", "batch_expired") + b"\n" + _error("req-2", "x") + b"\n")
    with store.write() as conn:
        counts = record_outcomes(
            store,
            conn,
            job_number=job_number,
            batch_number=1,
            files=[("output", output), ("error", error)],
            can_retry=True,
            missing_code="missing_result",
        ).counts
    assert counts == {"succeeded": 4, "failed": 1, "pending": 4}
    with store.read() as conn:
        rows = {
            r[0]: r[1:]
            for r in conn.exec_driver_sql(
                "SELECT r.custom_id, o.outcome, o.status_code, o.error_code, o.result_kind, "
                "o.result_offset, o.result_length, o.result_batch_number FROM requests AS r "
                "LEFT JOIN outcomes AS o ON o.job_number = r.job_number "
                "AND o.position = r.position"
            )
        }
    offsets = [sum(len(x) for x in out_lines[:i]) for i in range(len(out_lines))]
    assert rows["req-0"] == ("succeeded", 200, None, "output", 0, len(out_lines[0]), 1)
    assert rows["req-1"][:5] == ("succeeded", 200, None, "output", offsets[1])
    assert rows["req-2"][:5] == ("succeeded", 200, None, "output", offsets[2])
    assert rows["req-3"][:5] == (None, 500, "c500", "output", offsets[4])
    assert rows["req-4"][:5] == ("failed", 400, "c400", "output", offsets[5])
    assert rows["req-5"][:5] == (None, None, "batch_expired", "error", 0)
    for cid in ("req-6", "req-7"):
        assert rows[cid] == (None, None, "missing_result", None, None, None, None)
    assert rows["req-8"][:5] == ("succeeded", 200, None, "output", offsets[8])

    paths = {1: {"output": str(output), "error": str(error)}}
    expected = [line for _row, line in iter_result_lines(store, job_number, paths)]
    assert expected[:3] == [_ok("req-0"), _ok("req-1"), _ok("req-2")]
    assert orjson.loads(expected[6])["error"]["code"] == "missing_result"
    assert expected[8] == _ok("req-8")
    for chunk in (2, 3, 20_000):
        buffer = io.BytesIO()
        assert write_result_lines(store, job_number, paths, buffer, chunk=chunk) == 9
        assert buffer.getvalue() == b"".join(line + b"\n" for line in expected)
        errors = io.BytesIO()
        assert (
            write_result_lines(store, job_number, paths, errors, errors_only=True, chunk=chunk) == 5
        )
        assert errors.getvalue().count(b"\n") == 5
