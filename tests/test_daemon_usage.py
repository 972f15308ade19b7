"""Usage recorded while collecting, through the daemon against the emulator (its output
shuffled), on SQLite and PostgreSQL: each request's tokens from its response body, summed per
batch equal to the emulator's own batch usage, and per job by model (`usage_by_job_and_model`)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobqueue.api import JobQueue
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.files.results import TOKEN_KINDS
from jobqueue.store.costs import usage_by_job_and_model
from jobqueue.store.usage import remote_tokens
from tests.daemon_helpers import API_KEY, make_queue
from tests.factories import write_jsonl

LONG_SYSTEM = "You follow the house style guide to the letter. " * 120  # cached past 1,024


def _lines(endpoint: str, n: int) -> Iterator[dict[str, Any]]:
    """Requests of two models each: some with a long shared prefix (cached input), some to a
    reasoning model (reasoning tokens)."""
    for i in range(n):
        model = "o4-mini" if i % 3 == 1 else "gpt-4o-mini"
        if endpoint == "/v1/embeddings":
            model = "text-embedding-3-large" if i % 3 == 1 else "text-embedding-3-small"
            body: dict[str, Any] = {"model": model, "input": f"text number {i}"}
        elif endpoint == "/v1/responses":
            text = (LONG_SYSTEM if i % 3 == 0 else "") + f"Say {i}"
            body = {"model": model, "input": text}
        else:
            messages = [{"role": "user", "content": f"Say {i}"}]
            if i % 3 == 0:
                messages.insert(0, {"role": "system", "content": LONG_SYSTEM})
            body = {"model": model, "messages": messages}
        yield {"custom_id": f"req-{i}", "method": "POST", "url": endpoint, "body": body}


@pytest.fixture
def queue(db_url: str, tmp_path: Path) -> Iterator[JobQueue]:
    config = EmulatorConfig(time_scale=3600, seed=5, api_key=API_KEY, shuffle_output=True)
    with serve_in_thread(config) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        yield jq
        jq.close()


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"])
def test_request_usage_sums_to_the_remote_batch_usage(
    queue: JobQueue, tmp_path: Path, endpoint: str
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _lines(endpoint, 240))
    job = queue.submit(source, endpoint, max_batch_requests=50)
    queue.start()
    job = queue.wait(job.id, timeout=60)
    assert job.status == "completed"
    kinds = ", ".join(f"sum(o.{k})" for k in TOKEN_KINDS)
    with queue.store.read() as conn:
        batches = conn.exec_driver_sql(
            f"SELECT number, model, usage, {', '.join(TOKEN_KINDS)} FROM batches "
            f"WHERE job_id = '{job.id}'"
        ).all()
        number = conn.exec_driver_sql(f"SELECT number FROM jobs WHERE id = '{job.id}'").scalar()
        per_request = {
            row[0]: tuple(row[1:])
            for row in conn.exec_driver_sql(
                f"SELECT r.batch_number, {kinds}, count(o.input_tokens) FROM requests AS r "
                "JOIN outcomes AS o ON o.job_number = r.job_number AND o.position = r.position "
                f"WHERE r.job_number = {number} GROUP BY r.batch_number"
            ).all()
        }
        usage = {u.model: u.usage.to_dict() for u in usage_by_job_and_model(conn, [job.id])}
    assert len(batches) >= 6
    by_model: dict[str | None, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TOKEN_KINDS, 0))
    for batch_number, model, remote, *summed in batches:
        remote = remote if isinstance(remote, dict) else json.loads(remote)
        theirs = remote_tokens(remote)
        assert theirs is not None
        assert per_request[batch_number][:4] == tuple(summed)
        assert per_request[batch_number][4] > 0  # every line had usage
        assert dict(zip(TOKEN_KINDS, summed, strict=True)) == {
            k: theirs.get(k, 0) for k in TOKEN_KINDS
        }
        for k, v in zip(TOKEN_KINDS, summed, strict=True):
            by_model[model][k] += v
    assert usage == dict(by_model)
    totals = {k: sum(u[k] for u in usage.values()) for k in TOKEN_KINDS}
    assert totals["input_tokens"] > 0
    if endpoint == "/v1/embeddings":
        assert totals["output_tokens"] == totals["reasoning_tokens"] == 0
    else:
        # The test can tell the kinds apart: each one is counted somewhere.
        assert totals["output_tokens"] and totals["reasoning_tokens"]
        assert totals["cached_input_tokens"] or endpoint == "/v1/responses"
