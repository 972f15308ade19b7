"""jobqueue.testing: the in-memory remote and the clock, on their own and under the daemon."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from jobqueue.api import JobQueue
from jobqueue.remote import (
    IncompleteDownloadError,
    NotFoundError,
    PermanentRemoteError,
    Provider,
    TransientRemoteError,
)
from jobqueue.testing import Clock, InMemoryRemote, echo_response
from tests.factories import chat_file, chat_line, write_jsonl

CHAT = "/v1/chat/completions"


@pytest.fixture
def clock() -> Clock:
    return Clock(1_750_000_000)


@pytest.fixture
def remote(clock: Clock) -> InMemoryRemote:
    return InMemoryRemote(clock=clock)


def _create(remote: InMemoryRemote, file_id: str, **metadata: str):
    return remote.create_batch(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h",
        metadata=metadata, output_expires_after=3600,
    )  # fmt: skip


def _upload(remote: InMemoryRemote, tmp_path: Path, n: int = 3) -> str:
    path = chat_file(tmp_path / f"in-{len(remote.files())}.jsonl", n)
    return remote.upload_file(path, "input.jsonl", expires_after=7200).id


def _lines(remote: InMemoryRemote, file_id: str | None) -> list[dict]:
    assert file_id is not None
    return [json.loads(x) for x in remote.file_content(file_id).splitlines()]


def test_it_is_a_provider(remote: InMemoryRemote) -> None:
    assert isinstance(remote, Provider)
    with remote as r:
        assert r is remote
    assert remote.closed


def test_clock_moves_only_forward() -> None:
    clock = Clock(100)
    assert clock() == 100.0
    assert clock.advance(2.5) == 102.5
    clock.set(200)
    assert clock() == 200.0
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.set(199)
    assert abs(Clock()() - time.time()) < 2  # starts at the real time


def test_a_batch_goes_through_its_lifecycle(
    remote: InMemoryRemote, clock: Clock, tmp_path: Path
) -> None:
    file_id = _upload(remote, tmp_path, 4)
    created = _create(remote, file_id, jobqueue_batch_id="b1")
    assert created.status == "validating" and created.created_at == clock()
    assert created.expires_at == clock() + 24 * 3600
    assert created.metadata == {"jobqueue_batch_id": "b1"}
    assert created.request_counts.total == 0

    clock.advance(5)
    moved = remote.advance(created.id, "in_progress")
    assert moved.in_progress_at == clock() and moved.request_counts.total == 4
    assert moved.model == "gpt-4o-mini"
    clock.advance(5)
    done = remote.complete(created.id, errors={"req-1": 500, "req-2": "invalid_prompt"},
                           missing=["req-3"])  # fmt: skip
    assert done.status == "completed" and done.completed_at == clock()
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    assert remote.retrieve_batch(created.id) == done

    (ok,) = _lines(remote, done.output_file_id)
    assert ok["custom_id"] == "req-0" and ok["error"] is None
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["body"]["choices"][0]["message"]["content"] == "echo: Say 0"
    server, refused = _lines(remote, done.error_file_id)
    assert server["custom_id"] == "req-1" and server["response"]["status_code"] == 500
    assert server["response"]["body"]["error"]["type"] == "server_error"
    assert refused["response"] is None and refused["error"]["code"] == "invalid_prompt"
    output = remote.retrieve_file(done.output_file_id)
    assert output.purpose == "batch_output" and output.expires_at == clock() + 3600


def test_expired_and_cancelled_batches_have_partial_results(
    remote: InMemoryRemote, tmp_path: Path
) -> None:
    file_id = _upload(remote, tmp_path, 3)
    expired = remote.expire(_create(remote, file_id).id, finished=1)
    assert [x["custom_id"] for x in _lines(remote, expired.output_file_id)] == ["req-0"]
    codes = [x["error"]["code"] for x in _lines(remote, expired.error_file_id)]
    assert codes == ["batch_expired", "batch_expired"]

    batch = _create(remote, file_id)
    assert remote.cancel_batch(batch.id).status == "cancelling"
    assert remote.cancel_batch(batch.id).status == "cancelling"  # a second cancel is accepted
    cancelled = remote.finish_cancel(batch.id)
    assert cancelled.output_file_id is None  # nothing succeeded: no output file
    assert {x["error"]["code"] for x in _lines(remote, cancelled.error_file_id)} == {
        "batch_cancelled"
    }
    with pytest.raises(PermanentRemoteError) as refused:
        remote.cancel_batch(expired.id)
    assert refused.value.status == 409 and "expired" in refused.value.message


def test_failures_and_test_mistakes(remote: InMemoryRemote, tmp_path: Path) -> None:
    file_id = _upload(remote, tmp_path)
    batch = _create(remote, file_id)
    failed = remote.fail(batch.id, "token_limit_exceeded", "Enqueued token limit reached")
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.errors == [{"code": "token_limit_exceeded", "param": None, "line": None,
                              "message": "Enqueued token limit reached"}]  # fmt: skip
    assert failed.output_file_id is None and failed.error_file_id is None
    with pytest.raises(ValueError, match="cannot become completed"):
        remote.complete(batch.id)
    with pytest.raises(ValueError, match="not 'completed'"):
        remote.advance(batch.id, "completed")
    with pytest.raises(KeyError):
        remote.complete("batch_nope")

    # A create on a missing file succeeds; the batch can then only fail, as on the remote.
    orphan = _create(remote, "file-missing")
    with pytest.raises(ValueError, match="missing input file"):
        remote.advance(orphan.id, "in_progress")
    assert remote.fail(orphan.id).errors[0]["code"] == "file_not_found"


def test_create_refuses_what_the_remote_refuses(remote: InMemoryRemote, tmp_path: Path) -> None:
    file_id = _upload(remote, tmp_path)
    bad = [
        {"endpoint": "/v1/nope"},
        {"completion_window": "48h"},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"output_expires_after": 60},
    ]
    for change in bad:
        options = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                   "metadata": {}, "output_expires_after": None, **change}  # fmt: skip
        with pytest.raises(PermanentRemoteError) as refused:
            remote.create_batch(**options)
        assert refused.value.status == 400
    assert remote.batches() == []
    with pytest.raises(PermanentRemoteError):
        remote.upload_file(tmp_path / "in-0.jsonl", "input.txt")
    with pytest.raises(FileNotFoundError):
        remote.upload_file(tmp_path / "absent.jsonl", "absent.jsonl")
    with pytest.raises(NotFoundError):
        remote.retrieve_batch("batch_nope")


def test_files_expire_on_the_clock_and_can_be_lost(
    remote: InMemoryRemote, clock: Clock, tmp_path: Path
) -> None:
    file_id = _upload(remote, tmp_path)
    dest = tmp_path / "out" / "copy.jsonl"
    size = remote.download_file(file_id, dest)
    assert dest.read_bytes() == remote.file_content(file_id) and size == dest.stat().st_size
    assert not dest.with_suffix(".jsonl.part").exists()
    with pytest.raises(IncompleteDownloadError):
        remote.download_file(file_id, dest, expected_bytes=size + 1)
    clock.advance(7200)
    with pytest.raises(NotFoundError):
        remote.retrieve_file(file_id)

    other = _upload(remote, tmp_path)
    remote.drop_file(other)
    with pytest.raises(NotFoundError):
        remote.download_file(other, dest)
    remote.delete_file(other)  # already gone: fine, as with the HTTP client
    assert [c.method for c in remote.calls[-2:]] == ["download_file", "delete_file"]


def test_list_pages_and_lookup_by_metadata(
    remote: InMemoryRemote, clock: Clock, tmp_path: Path
) -> None:
    file_id = _upload(remote, tmp_path)
    ids = []
    for i in range(5):
        ids.append(_create(remote, file_id, jobqueue_batch_id=f"b{i % 3}").id)
        clock.advance(100)
    first = remote.list_batches(limit=2)
    assert [b.id for b in first.data] == [ids[4], ids[3]] and first.has_more
    assert first.first_id == ids[4] and first.last_id == ids[3]
    last = remote.list_batches(after=ids[1], limit=100)
    assert [b.id for b in last.data] == [ids[0]] and not last.has_more
    assert remote.list_batches(after="batch_unknown").data == []

    assert remote.find_batch_by_metadata("jobqueue_batch_id", "b1").id == ids[4]  # newest
    assert remote.find_batch_by_metadata("jobqueue_batch_id", "b0").id == ids[3]
    created_2 = remote.batch(ids[2]).created_at
    # It stops at the first batch created before `created_after`: b2 was, so it is not found.
    assert (
        remote.find_batch_by_metadata("jobqueue_batch_id", "b2", created_after=created_2 + 1)
        is None
    )
    assert remote.find_batch_by_metadata("jobqueue_batch_id", "b2").id == ids[2]
    assert [b.id for b in remote.batches(jobqueue_batch_id="b0")] == [ids[0], ids[3]]
    (find,) = remote.calls_to("find_batch_by_metadata")[:1]
    assert find.args["key"] == "jobqueue_batch_id" and find.time == clock()


def test_faults_pick_their_calls(remote: InMemoryRemote, tmp_path: Path) -> None:
    file_id = _upload(remote, tmp_path)
    rule = remote.fault("retrieve_batch", TransientRemoteError("503"), nth=2, times=2)
    batch = _create(remote, file_id)
    outcomes = []
    for _ in range(5):
        try:
            remote.retrieve_batch(batch.id)
            outcomes.append("ok")
        except TransientRemoteError:
            outcomes.append("fault")
    assert outcomes == ["ok", "fault", "fault", "ok", "ok"]
    assert rule.fired == 2
    calls = remote.calls_to("retrieve_batch")
    assert [c.error is not None for c in calls] == [False, True, True, False, False]
    assert all(c.done for c in calls)

    forever = remote.fault("list_batches", lambda: TransientRemoteError("down"), times=None)
    for _ in range(3):
        with pytest.raises(TransientRemoteError):
            remote.list_batches()
    forever.remove()
    assert remote.list_batches().data

    # After the effect: the batch exists though the caller saw an error.
    remote.fault("create_batch", TransientRemoteError("lost", maybe_created=True), when="after")
    with pytest.raises(TransientRemoteError):
        _create(remote, file_id, jobqueue_batch_id="lost")
    assert len(remote.batches(jobqueue_batch_id="lost")) == 1
    with pytest.raises(ValueError, match="no provider method"):
        remote.fault("create", TransientRemoteError("typo"))


def test_hooks_run_inside_the_call(remote: InMemoryRemote, clock: Clock, tmp_path: Path) -> None:
    file_id = _upload(remote, tmp_path)
    seen = []
    remote.on_call("create_batch", lambda call: clock.advance(60))  # a call that takes a minute
    remote.on_call("create_batch", lambda call: seen.append(len(remote.batches())), when="after")
    start = clock()
    batch = _create(remote, file_id)
    assert batch.created_at == start + 60 and seen == [1]
    assert remote.calls_to("create_batch")[0].time == start


def test_a_call_held_past_its_timeout_fails_as_the_client_would(
    clock: Clock, tmp_path: Path
) -> None:
    remote = InMemoryRemote(clock=clock, call_timeout=60)
    assert remote.max_call_seconds == 60 and InMemoryRemote().max_call_seconds == 0
    file_id = _upload(remote, tmp_path)
    rule = remote.on_call("create_batch", lambda call: clock.advance(61))
    with pytest.raises(TransientRemoteError, match="timed out") as info:
        _create(remote, file_id, jobqueue_batch_id="b1")
    assert info.value.maybe_created and remote.batches() == []  # held before: never created
    rule.remove()
    remote.on_call("create_batch", lambda call: clock.advance(61), when="after")
    with pytest.raises(TransientRemoteError):
        _create(remote, file_id, jobqueue_batch_id="b2")
    assert len(remote.batches(jobqueue_batch_id="b2")) == 1  # held after: only the answer lost
    remote.on_call("retrieve_file", lambda call: clock.advance(61))
    with pytest.raises(TransientRemoteError) as info:
        remote.retrieve_file(file_id)
    assert not info.value.maybe_created
    remote.on_call("create_batch", lambda call: clock.advance(60))  # just within: fine
    assert _create(remote, file_id).status == "validating"
    # Transfers take what their size needs: never timed out.
    remote.on_call("upload_file", lambda call: clock.advance(3600))
    assert _upload(remote, tmp_path)
    with pytest.raises(ValueError, match="positive"):
        InMemoryRemote(call_timeout=0)


def test_a_pause_holds_one_call_and_no_other(remote: InMemoryRemote, tmp_path: Path) -> None:
    file_id = _upload(remote, tmp_path)
    paused = remote.pause("create_batch")
    result = {}
    worker = threading.Thread(target=lambda: result.update(b=_create(remote, file_id)))
    worker.start()
    call = paused.wait()
    assert paused.reached and not call.done and remote.batches() == []
    assert remote.list_batches().data == []  # other calls go on meanwhile
    paused.release()
    worker.join(10)
    assert result["b"].id == remote.batches()[0].id and call.done
    assert remote.pause("retrieve_batch", timeout=0.01) is not None
    with pytest.raises(TimeoutError):
        remote.retrieve_batch(result["b"].id)  # never released: the call gives up
    with pytest.raises(TimeoutError):
        remote.pause("delete_file").wait(timeout=0.01)


def test_auto_complete_and_a_custom_responder(tmp_path: Path) -> None:
    remote = InMemoryRemote(
        auto_complete=True, responder=lambda line: {"answer": line["custom_id"].upper()}
    )
    file_id = remote.upload_file(chat_file(tmp_path / "in.jsonl", 2), "in.jsonl").id
    created = _create(remote, file_id)
    assert created.status == "validating"
    done = remote.retrieve_batch(created.id)
    assert done.status == "completed"
    bodies = [x["response"]["body"] for x in _lines(remote, done.output_file_id)]
    assert bodies == [{"answer": "REQ-0"}, {"answer": "REQ-1"}]
    assert remote.retrieve_batch(_create(remote, "file-gone").id).status == "failed"


def test_echo_response_follows_the_endpoint() -> None:
    embed = {"custom_id": "e", "url": "/v1/embeddings",
             "body": {"model": "m", "input": ["a", "b"], "dimensions": 4}}  # fmt: skip
    assert [len(d["embedding"]) for d in echo_response(embed)["data"]] == [4, 4]
    responses = {"custom_id": "r", "url": "/v1/responses", "body": {"model": "m", "input": "hi"}}
    assert echo_response(responses)["output"][0]["content"][0]["text"] == "echo: hi"
    completion = {"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "yo"}}
    assert echo_response(completion)["choices"][0]["text"] == "echo: yo"
    assert echo_response(chat_line(7))["choices"][0]["message"]["content"] == "echo: Say 7"


def test_the_readme_example_runs_under_the_daemon(db_url: str, tmp_path: Path) -> None:
    """The daemon's duties in background threads, on the real clock, against the remote."""
    source = write_jsonl(tmp_path / "requests.jsonl", [chat_line(i) for i in range(5)])
    remote = InMemoryRemote()
    jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data", poll_interval=0.1)
    try:
        job = jq.submit(source, endpoint=CHAT)
        jq.start(provider=remote)
        (batch,) = remote.wait_for_batches(1)
        remote.advance(batch.id, "in_progress")
        remote.complete(batch.id, errors={"req-3": 400})
        job = jq.wait(job.id, timeout=20)
        assert job.status == "completed"
        assert (job.request_counts.completed, job.request_counts.failed) == (4, 1)
        assert len(remote.batches()) == 1  # a 400 is final: nothing retried
    finally:
        jq.close()
