"""Small builders for test data: request lines, input files, rows."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from jobqueue.core.ids import new_id


def chat_line(i: int, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Say {i}"}]},
        **extra,
    }


def write_jsonl(path: Path, lines: Iterable[dict[str, Any] | bytes | str]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, dict):
                f.write(orjson.dumps(line) + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(line + b"\n")
    return path


def chat_file(path: Path, n: int, model: str = "gpt-4o-mini") -> Path:
    return write_jsonl(path, (chat_line(i, model) for i in range(n)))


def insert_job_with_batch(
    store: Any, status: str = "queued", *, requests: int = 3
) -> tuple[str, str]:
    """A job with one batch in `status` and its request rows; returns (job_id, batch_id)."""
    now = time.time()
    job_id, batch_id = new_id("job"), new_id("batch")
    job = {
        "id": job_id,
        "status": "running" if status not in ("queued",) else "queued",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "user_metadata": {},
        "max_attempts": 3,
        "source": "test.jsonl",
        "input_dir": "/nonexistent",
        "max_batch_requests": 50_000,
        "max_batch_bytes": 200 * 1024 * 1024,
        "request_count": requests,
        "bytes": 100 * requests,
        "created_at": now,
        "updated_at": now,
    }
    batch = {
        "id": batch_id,
        "job_id": job_id,
        "number": 1,
        "status": status,
        "shard_index": 0,
        "attempt": 1,
        "model": "gpt-4o-mini",
        "input_path": "/nonexistent/shard.jsonl",
        "request_count": requests,
        "bytes": 100 * requests,
        "created_at": now,
        "updated_at": now,
    }
    with store.write() as conn:
        job["number"] = store.next_job_number(conn)
        store.insert_job(conn, job, [batch])
        insert_requests(store, conn, job["number"], 1, [(i, f"req-{i}") for i in range(requests)])
    return job_id, batch_id


def insert_requests(
    store: Any, conn: Any, job_number: int, batch_number: int, pairs: list[tuple[int, str]]
) -> None:
    """Insert (position, custom_id) request index rows of one batch, as intake does."""
    store.insert_requests_json(conn, job_number, batch_number, orjson.dumps(pairs).decode())


def shard_requests(shard: Any) -> list[tuple[int, str]]:
    """(position, custom_id) of each request of a shard, in shard order, read back from what
    `shard_request_json` hands the database."""
    from jobqueue.files.inputs import shard_request_json

    data, first_position = shard_request_json(shard)
    values = orjson.loads(data)
    if first_position is None:
        return [(position, custom_id) for position, custom_id in values]
    return list(enumerate(values, first_position))
