"""Recording a collected batch's lines (both dialects) and exporting them in input order."""

from __future__ import annotations

import gzip
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
    # Into files of every kind: runs of plain lines written from the reused read buffer, and
    # what was written before and after stays in order.
    want = b"".join(line + b"\n" for line in expected)
    plain, appended, packed = tmp_path / "plain.jsonl", tmp_path / "app.jsonl", tmp_path / "z.gz"
    appended.write_bytes(b"before\n")
    for path, mode in ((plain, "wb"), (appended, "ab")):
        with path.open(mode) as f:
            f.write(b"head\n")  # still buffered when the export starts writing
            assert write_result_lines(store, job_number, paths, f, chunk=3) == 9
            f.write(b"after\n")
    assert plain.read_bytes() == b"head\n" + want + b"after\n"
    assert appended.read_bytes() == b"before\nhead\n" + want + b"after\n"
    with gzip.open(packed, "wb") as z:
        assert write_result_lines(store, job_number, paths, z) == 9  # type: ignore[arg-type]
    assert gzip.decompress(packed.read_bytes()) == want


def _used(cid: str, usage: dict[str, object]) -> bytes:
    return orjson.dumps(
        {"id": "x", "custom_id": cid, "response": {"status_code": 200, "body": {"usage": usage}},
         "error": None}
    )  # fmt: skip


@pytest.mark.parametrize("tokens", [True, False])
def test_record_tokens_per_request_and_summed(store, tmp_path: Path, tokens: bool) -> None:  # type: ignore[no-untyped-def]
    """Each line's usage goes on its request's row and into the sums; a line without usage (an
    error, a body without it) counts nothing; `tokens=False` reads none."""
    job_id, _ = insert_job_with_batch(store, "completed", requests=5)
    with store.read() as conn:
        job_number = store.get_job(conn, job_id).number
    output = tmp_path / "out.jsonl"
    error = tmp_path / "err.jsonl"
    chat = {
        "prompt_tokens": 1300, "completion_tokens": 40, "total_tokens": 1340,
        "prompt_tokens_details": {"cached_tokens": 1280},
        "completion_tokens_details": {"reasoning_tokens": 24},
    }  # fmt: skip
    responses = {
        "input_tokens": 900, "output_tokens": 50, "total_tokens": 950,
        "input_tokens_details": {"cached_tokens": 768},
        "output_tokens_details": {"reasoning_tokens": 10},
    }  # fmt: skip
    lines = [_used("req-0", chat), _used("req-1", responses), _used("req-2", {"prompt_tokens": 7})]
    output.write_bytes(b"".join(line + b"\n" for line in [*lines, _ok("req-3")]))
    error.write_bytes(_error("req-4", "server_error") + b"\n")
    with store.write() as conn:
        recorded = record_outcomes(
            store,
            conn,
            job_number=job_number,
            batch_number=1,
            files=[("output", output), ("error", error)],
            can_retry=False,
            missing_code="missing_result",
            tokens=tokens,
        )
    with store.read() as conn:
        rows = conn.exec_driver_sql(
            "SELECT position, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens "
            "FROM outcomes ORDER BY position"
        ).all()
    if not tokens:
        assert [tuple(r[1:]) for r in rows] == [(None,) * 4] * 5
        assert recorded.tokens == dict.fromkeys(recorded.tokens, 0)
        return
    assert [tuple(r) for r in rows] == [
        (0, 1300, 1280, 40, 24),
        (1, 900, 768, 50, 10),
        (2, 7, 0, 0, 0),
        (3, None, None, None, None),
        (4, None, None, None, None),
    ]
    assert recorded.tokens == {
        "input_tokens": 2207, "cached_input_tokens": 2048, "output_tokens": 90,
        "reasoning_tokens": 34,
    }  # fmt: skip
    assert recorded.counts == {"succeeded": 4, "failed": 1, "pending": 0}
    assert recorded.missing == 0
