"""A job runs end to end through the daemon against the emulator on a real loopback port,
on SQLite and on PostgreSQL.

The remote does not promise any order of output lines: the tests that use the `emulator`
fixture run with the emulator's output in input order and shuffled, and the others with it
shuffled, so results coming back in input order is jobqueue's own doing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobqueue.api import JobQueue
from jobqueue.cli.app import main
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.tokens import input_tokens
from tests.daemon_helpers import (
    API_KEY,
    content_of,
    make_queue,
    remote_batches_per_local_id,
    wait_until,
)
from tests.factories import chat_file, chat_line, write_jsonl

ENDPOINT = "/v1/chat/completions"


@pytest.fixture(params=["ordered", "shuffled"])
def emulator(request: pytest.FixtureRequest) -> Iterator:
    shuffle = request.param == "shuffled"
    config = EmulatorConfig(time_scale=3600, seed=3, api_key=API_KEY, shuffle_output=shuffle)
    with serve_in_thread(config) as em:
        yield em


@pytest.fixture
def queue(db_url: str, tmp_path: Path, emulator) -> Iterator[JobQueue]:
    jq = make_queue(db_url, tmp_path / "data", emulator.base_url)
    yield jq
    jq.close()


def _run(jq: JobQueue, job_id: str, timeout: float = 60):
    jq.start()
    return jq.wait(job_id, timeout=timeout)


def test_multi_shard_job_completes_in_input_order(
    queue: JobQueue, emulator, tmp_path: Path
) -> None:
    source = chat_file(tmp_path / "in.jsonl", 2_345)
    job = queue.submit(source, ENDPOINT, max_batch_requests=500)
    assert len(job.batches) == 5
    job = _run(queue, job.id)
    assert job.status == "completed"
    assert job.request_counts.total == job.request_counts.completed == 2_345
    records = list(queue.results(job.id))
    assert [r["custom_id"] for r in records] == [f"req-{i}" for i in range(2_345)]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in records)
    assert records[7]["response"]["body"]["choices"][0]["message"]["content"].endswith("Say 7")
    assert set(remote_batches_per_local_id(emulator.emulator).values()) == {1}
    types = [e.type for e in queue.events(job.id)]
    assert types[0] == "job.queued" and types[-1] == "job.completed"
    assert types.count("batch.completed") == 5
    # Every batch stamped with its remote times.
    for batch in queue.get(job.id).batches:
        assert batch.status == "completed" and batch.remote_id
        assert batch.times["validating_at"] and batch.times["completed_at"]


def test_cli_results_export_in_order(
    queue: JobQueue, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 300), ENDPOINT, max_batch_requests=100)
    _run(queue, job.id)
    out = tmp_path / "results.jsonl"
    data_dir = str(tmp_path / "data")
    args = ["--database-url", db_url, "--data-dir", data_dir]
    assert main([*args, "results", job.id, "--output", str(out)]) == 0
    lines = out.read_bytes().splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == [f"req-{i}" for i in range(300)]
    assert main([*args, "results", job.id, "--errors-only"]) == 0
    assert capsys.readouterr().out == ""
    assert main([*args, "wait", job.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"


def test_expiry_keeps_partial_output_and_resubmits_the_rest(
    queue: JobQueue, emulator, tmp_path: Path
) -> None:
    emulator.emulator.script_next(expire_at_fraction=0.4)
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 1_000), ENDPOINT, max_batch_requests=1_000)
    job = _run(queue, job.id)
    assert job.status == "completed"
    assert job.request_counts.completed == 1_000
    statuses = sorted((b.attempt, b.status) for b in job.batches)
    assert statuses == [(1, "expired"), (2, "completed")]
    expired, retry = sorted(job.batches, key=lambda b: b.attempt)
    # Only the unfinished requests were resubmitted; the finished ones were kept.
    assert expired.request_counts.completed + retry.request_counts.total == 1_000
    assert 0 < expired.request_counts.completed < 1_000
    records = list(queue.results(job.id))
    assert [r["custom_id"] for r in records] == [f"req-{i}" for i in range(1_000)]
    assert all(r["error"] is None for r in records)


def test_cancel_before_submission_never_reaches_the_remote(
    queue: JobQueue, emulator, tmp_path: Path
) -> None:
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 50), ENDPOINT, max_batch_requests=20)
    job = queue.cancel(job.id)
    assert job.status == "cancelled"
    queue.start()
    queue.daemon.run_once()
    assert emulator.emulator.stats()["batches_created"] == 0
    records = list(queue.results(job.id))
    assert {r["error"]["code"] for r in records} == {"batch_cancelled"}
    assert len(records) == 50


def test_cancel_after_submission_reaches_the_remote(db_url: str, tmp_path: Path) -> None:
    slow = EmulatorConfig(
        time_scale=3600, shuffle_output=True, seed=4, api_key=API_KEY, requests_per_minute=2.0
    )
    with serve_in_thread(slow) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 400), ENDPOINT, max_batch_requests=200)
            jq.start()
            wait_until(lambda: all(b.status == "in_progress" for b in jq.get(job.id).batches))
            jq.cancel(job.id)
            job = jq.wait(job.id, timeout=60)
            assert job.status == "cancelled"
            assert {b.status for b in job.batches} == {"cancelled"}
            assert all(b.remote_id for b in job.batches)
            assert em.emulator.stats()["calls"].get("POST /v1/batches/{id}/cancel", 0) == 2
            records = list(jq.results(job.id))
            assert len(records) == 400
            codes = {(r["error"] or {}).get("code") for r in records}
            assert "batch_cancelled" in codes
            # Cancelled by the user: nothing is retried.
            assert all(b.attempt == 1 for b in job.batches)
        finally:
            jq.close()


def test_validation_failure_fails_the_job_with_the_reason(
    queue: JobQueue, emulator, tmp_path: Path
) -> None:
    emulator.emulator.script_next(fail="invalid_json_line")
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 10), ENDPOINT)
    job = _run(queue, job.id)
    assert job.status == "failed"
    assert "invalid_json_line" in (job.error or "")
    assert job.request_counts.failed == 10
    assert {r["error"]["code"] for r in queue.results(job.id)} == {"invalid_json_line"}


def test_token_limit_requeues_instead_of_failing(db_url: str, tmp_path: Path) -> None:
    # Room for one shard's tokens at a time: the second is refused while the first runs. The
    # emulator counts a request's tokens as jobqueue.tokens estimates them.
    shards = [sum(input_tokens(ENDPOINT, chat_line(i)["body"]) for i in range(start, start + 200))
              for start in (0, 200)]  # fmt: skip
    config = EmulatorConfig(
        time_scale=3600, seed=5, api_key=API_KEY, enqueued_token_limit=max(shards) * 3 // 2,
        requests_per_minute=2.0, shuffle_output=True,
    )  # fmt: skip
    with serve_in_thread(config) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 400), ENDPOINT, max_batch_requests=200)
            job = _run(jq, job.id, timeout=90)
            assert job.status == "completed"
            assert job.request_counts.completed == 400
            events = jq.events(job.id)
            refused = [e for e in events if e.type == "batch.failed"]
            assert refused and all(e.data.get("reason") == "token_limit_exceeded" for e in refused)
            requeued = [e for e in events if e.data.get("requeued_from")]
            assert len(requeued) == len(refused)
            # Requeued batches cost no attempt.
            assert {b.attempt for b in job.batches} == {1}
        finally:
            jq.close()


def test_fault_storm_changes_nothing_in_the_results(db_url: str, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 600)
    expected: list | None = None
    for name, faults in [
        ("calm", {}),
        ("storm", {"fault_500": 0.15, "fault_429": 0.15, "fault_drop": 0.1,
                   "fault_cut_download": 0.4}),
    ]:  # fmt: skip
        with serve_in_thread(
            EmulatorConfig(time_scale=3600, shuffle_output=True, seed=6, api_key=API_KEY)
        ) as em:
            em.emulator.set_faults(**faults)
            url = db_url if name == "storm" else f"sqlite:///{tmp_path / 'calm.db'}"
            jq = make_queue(url, tmp_path / name, em.base_url, max_retries=8)
            try:
                job = jq.submit(source, ENDPOINT, max_batch_requests=200)
                job = _run(jq, job.id, timeout=120)
                assert job.status == "completed", job.to_dict()
                got = [(r["custom_id"], content_of(r)) for r in jq.results(job.id)]
                if faults:
                    injected = em.emulator.stats()["faults"]["injected"]
                    assert sum(injected.values()) > 0
                assert set(remote_batches_per_local_id(em.emulator).values()) == {1}
            finally:
                jq.close()
        if expected is None:
            expected = got
        else:
            assert got == expected


def test_lost_create_answer_is_adopted_not_duplicated(
    queue: JobQueue, emulator, tmp_path: Path
) -> None:
    emulator.emulator.script_next(create_fault="drop")
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 30), ENDPOINT)
    job = _run(queue, job.id)
    assert job.status == "completed"
    counts = remote_batches_per_local_id(emulator.emulator)
    assert counts == {job.batches[0].id: 1}


def test_many_open_batches_are_refreshed_by_list_pages(db_url: str, tmp_path: Path) -> None:
    config = EmulatorConfig(time_scale=3600, shuffle_output=True, seed=8, api_key=API_KEY)
    with serve_in_thread(config) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url, list_threshold=0)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 120), ENDPOINT, max_batch_requests=20)
            job = _run(jq, job.id)
            assert job.status == "completed"
            calls = em.emulator.stats()["calls"]
            assert calls.get("GET /v1/batches", 0) > 0
        finally:
            jq.close()


def test_attempts_run_out_and_failures_are_final(db_url: str, tmp_path: Path) -> None:
    config = EmulatorConfig(
        time_scale=3600, shuffle_output=True, seed=9, api_key=API_KEY, request_failure_rate=0.5
    )
    with serve_in_thread(config) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url, max_attempts=2)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 200), ENDPOINT)
            job = _run(jq, job.id)
            assert job.status == "completed"
            assert max(b.attempt for b in job.batches) == 2
            records = list(jq.results(job.id))
            failed = [r for r in records if r["response"]["status_code"] != 200]
            diagnosis = [(b.attempt, b.status, b.request_counts) for b in job.batches]
            assert job.request_counts.failed == len(failed) > 0, diagnosis
            assert job.request_counts.completed + job.request_counts.failed == 200
            assert all(r["response"]["status_code"] == 500 for r in failed)
        finally:
            jq.close()


def test_deadline_ends_the_job_expired(db_url: str, tmp_path: Path) -> None:
    slow = EmulatorConfig(
        time_scale=3600, shuffle_output=True, seed=10, api_key=API_KEY, requests_per_minute=1.0
    )
    with serve_in_thread(slow) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 300), ENDPOINT, deadline="3s")
            job = _run(jq, job.id, timeout=60)
            assert job.status == "expired"
            records = list(jq.results(job.id))
            assert len(records) == 300
            assert any(r["error"] for r in records)
            assert all(b.attempt == 1 for b in job.batches)  # no retries past the deadline
        finally:
            jq.close()


def test_stuck_batch_raises_an_event_once(db_url: str, tmp_path: Path) -> None:
    with serve_in_thread(
        EmulatorConfig(time_scale=3600, shuffle_output=True, seed=11, api_key=API_KEY)
    ) as em:
        em.emulator.script_next(stick_in="finalizing")
        # The remote's times are whole seconds, so a batch can look up to a second older than
        # it is: stuck_after stays well above that, or a batch passing through `validating`
        # could be reported instead of the one stuck in `finalizing`.
        jq = make_queue(db_url, tmp_path / "data", em.base_url, stuck_after=2.5)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 20), ENDPOINT)
            jq.start()
            wait_until(lambda: any(e.type == "batch.stuck" for e in jq.events(job.id)), 30)
            stuck = [e for e in jq.events(job.id) if e.type == "batch.stuck"]
            assert len(stuck) == 1 and stuck[0].data["status"] == "finalizing"
        finally:
            jq.close()


def test_mixed_models_and_embeddings(queue: JobQueue, tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small" if i % 3 else "text-embedding-3-large",
                  "input": f"text {i}", "dimensions": 8}}
        for i in range(90)
    ]  # fmt: skip
    job = queue.submit(write_jsonl(tmp_path / "emb.jsonl", lines), "/v1/embeddings")
    assert len(job.batches) == 2
    job = _run(queue, job.id)
    assert job.status == "completed"
    records = list(queue.results(job.id))
    assert [r["custom_id"] for r in records] == [f"e{i}" for i in range(90)]
    assert len(records[0]["response"]["body"]["data"][0]["embedding"]) == 8


def test_cancel_reaches_the_remote_without_a_daemon(db_url: str, tmp_path: Path) -> None:
    slow = EmulatorConfig(
        time_scale=3600, shuffle_output=True, seed=14, api_key=API_KEY, requests_per_minute=0.5
    )
    with serve_in_thread(slow) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 100), ENDPOINT)
            jq.start()
            wait_until(lambda: jq.get(job.id).batches[0].status == "in_progress")
            jq.stop()  # no daemon from here on: the cancel itself must reach the remote
            job = jq.cancel(job.id)
            assert em.emulator.stats()["calls"].get("POST /v1/batches/{id}/cancel") == 1
            assert job.batches[0].status in ("cancelling", "cancelled")
        finally:
            jq.close()


def test_local_files_are_purged_after_the_retention(db_url: str, tmp_path: Path) -> None:
    from jobqueue.api import JobQueueError
    from jobqueue.duties.expire import purge_old_files

    with serve_in_thread(
        EmulatorConfig(time_scale=3600, shuffle_output=True, seed=15, api_key=API_KEY)
    ) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url, result_retention=0.5)
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 20), ENDPOINT)
            job = _run(jq, job.id)
            assert len(list(jq.results(job.id))) == 20
            jq.stop()
            job_dir = tmp_path / "data" / "jobs" / job.id
            assert (job_dir / "results").is_dir()
            import time

            time.sleep(0.6)
            from jobqueue.service.daemon import Daemon

            daemon = Daemon(jq.settings, jq.store)
            assert purge_old_files(daemon.ctx) == 1
            assert not job_dir.exists()
            assert jq.get(job.id).purged_at is not None
            with pytest.raises(JobQueueError, match="deleted"):
                list(jq.results(job.id))
            daemon.stop()
        finally:
            jq.close()


def test_azure_variant_runs_a_job(db_url: str, tmp_path: Path) -> None:
    """The Azure flavour: `api-key` header, `/openai/v1` base URL, 100,000 requests a file."""
    with serve_in_thread(
        EmulatorConfig(time_scale=3600, shuffle_output=True, seed=16, api_key=API_KEY)
    ) as em:
        jq = make_queue(db_url, tmp_path / "data", f"{em.url}/openai/v1", provider="azure")
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 30), ENDPOINT,
                            max_batch_requests=100_000)  # fmt: skip
            job = _run(jq, job.id)
            assert job.status == "completed"
            assert job.request_counts.completed == 30
        finally:
            jq.close()


def test_run_once_moves_what_it_can_and_exits(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_in_thread(
        EmulatorConfig(time_scale=3600, shuffle_output=True, seed=17, api_key=API_KEY)
    ) as em:
        monkeypatch.setenv("JOBQUEUE_BASE_URL", em.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        args = ["--database-url", db_url, "--data-dir", str(tmp_path / "data")]
        with JobQueue(database_url=db_url, data_dir=tmp_path / "data") as jq:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 10), ENDPOINT)
        assert main([*args, "run", "--once"]) == 0
        with JobQueue(database_url=db_url, data_dir=tmp_path / "data") as jq:
            batch = jq.get(job.id).batches[0]
            assert batch.remote_id is not None  # submitted
            assert batch.status != "queued"
