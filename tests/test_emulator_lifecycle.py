"""Lifecycle of emulated batches: statuses, timestamps, counts, expiry, cancel, limits, scripts."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from jobqueue.emulator import Emulator, EmulatorConfig
from jobqueue.emulator.errors import ApiError
from tests.test_emulator_helpers import (
    add_input,
    chat_line,
    create,
    fast,
    manual,
    read_lines,
    wait_for,
)

__all__ = ["fast", "manual"]


def make(**overrides: object) -> Emulator:
    return Emulator(EmulatorConfig(**{"time_scale": 1.0, "seed": 3, **overrides}))  # type: ignore[arg-type]


@pytest.fixture
def slow_run() -> Iterator[Emulator]:
    """One request a simulated second, a 120 s window: easy arithmetic for partial results."""
    em = make(requests_per_minute=60.0, completion_window_seconds=120.0)
    yield em
    em.close()


def test_full_lifecycle_sets_every_timestamp_and_counts_rise(manual: Emulator) -> None:
    file_id = add_input(manual, [chat_line(i) for i in range(200)])
    batch = create(manual, file_id, metadata={"job": "j1"})
    assert batch["status"] == "validating"
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["expires_at"] - batch["created_at"] in (86399, 86400, 86401)
    assert batch["metadata"] == {"job": "j1"}

    manual.advance(60)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "in_progress"
    assert batch["in_progress_at"] - batch["created_at"] in (59, 60, 61)
    assert batch["request_counts"]["total"] == 200
    assert batch["model"] == "gpt-4o-mini"

    manual.advance(3)  # 2,000 a minute: 100 in 3 s
    counts = manual.get_batch(batch["id"])["request_counts"]
    assert 95 <= counts["completed"] <= 105 and counts["failed"] == 0

    manual.advance(4)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "finalizing"
    assert batch["finalizing_at"] is not None
    assert batch["request_counts"]["completed"] == 200

    manual.advance(60)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "completed"
    stamps = [batch[k] for k in ("created_at", "in_progress_at", "finalizing_at", "completed_at")]
    assert stamps == sorted(stamps)
    assert batch["completed_at"] - batch["finalizing_at"] in (59, 60, 61)
    assert batch["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    assert batch["error_file_id"] is None
    for key in ("failed_at", "expired_at", "cancelling_at", "cancelled_at", "errors"):
        assert batch[key] is None

    lines = read_lines(manual, batch["output_file_id"])
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(200))
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in lines)
    assert all(line["id"].startswith("batch_req_") for line in lines)
    assert len({line["id"] for line in lines}) == 200
    usage = batch["usage"]
    assert usage["input_tokens"] == sum(
        x["response"]["body"]["usage"]["prompt_tokens"] for x in lines
    )
    assert usage["output_tokens"] == sum(
        x["response"]["body"]["usage"]["completion_tokens"] for x in lines
    )
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0

    out = manual.get_file(batch["output_file_id"])
    assert out["purpose"] == "batch_output" and out["bytes"] > 0


def test_real_time_run_finishes_without_advancing(fast: Emulator) -> None:
    batch = create(fast, add_input(fast, [chat_line(i) for i in range(50)]))
    done = wait_for(fast, batch["id"], timeout=5)
    assert done["status"] == "completed"
    assert done["request_counts"]["completed"] == 50


def test_expiry_keeps_finished_requests_and_marks_the_rest(slow_run: Emulator) -> None:
    batch = create(slow_run, add_input(slow_run, [chat_line(i) for i in range(100)]))
    slow_run.advance(60)
    assert slow_run.get_batch(batch["id"])["status"] == "in_progress"
    slow_run.advance(60)  # the 120 s window ends with 60 of 100 finished
    batch = slow_run.get_batch(batch["id"])
    assert batch["status"] == "expired"
    assert batch["expired_at"] is not None and batch["completed_at"] is None
    assert batch["request_counts"] == {"total": 100, "completed": 60, "failed": 40}
    done = read_lines(slow_run, batch["output_file_id"])
    expired = read_lines(slow_run, batch["error_file_id"])
    assert len(done) == 60 and len(expired) == 40
    assert {x["custom_id"] for x in done} | {x["custom_id"] for x in expired} == {
        f"req-{i}" for i in range(100)
    }
    assert all(x["response"] is None for x in expired)
    assert all(
        x["error"]
        == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
        for x in expired
    )


def test_cancel_keeps_partial_results_and_a_second_cancel_is_accepted(
    slow_run: Emulator,
) -> None:
    batch = create(slow_run, add_input(slow_run, [chat_line(i) for i in range(100)]))
    slow_run.advance(70)  # 10 finished
    cancelling = slow_run.cancel_batch(batch["id"])
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    again = slow_run.cancel_batch(batch["id"])
    assert again["status"] == "cancelling"
    assert again["cancelling_at"] == cancelling["cancelling_at"]
    slow_run.advance(30)
    assert slow_run.get_batch(batch["id"])["status"] == "cancelling"  # about a minute
    slow_run.advance(30)
    batch = slow_run.get_batch(batch["id"])
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
    assert batch["request_counts"] == {"total": 100, "completed": 10, "failed": 90}
    assert len(read_lines(slow_run, batch["output_file_id"])) == 10
    cancelled = read_lines(slow_run, batch["error_file_id"])
    assert {x["error"]["code"] for x in cancelled} == {"batch_cancelled"}
    with pytest.raises(ApiError) as info:
        slow_run.cancel_batch(batch["id"])
    assert info.value.status == 409
    assert info.value.message == "Cannot cancel a batch with status 'cancelled'."


def test_cancel_while_validating_ends_cancelled_without_files(manual: Emulator) -> None:
    batch = create(manual, add_input(manual, [chat_line(i) for i in range(10)]))
    assert manual.cancel_batch(batch["id"])["status"] == "cancelling"
    manual.advance(120)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "cancelled"
    assert batch["in_progress_at"] is None
    assert batch["output_file_id"] is None and batch["error_file_id"] is None


def test_cancelling_a_completed_batch_is_a_409(fast: Emulator) -> None:
    batch = wait_for(fast, create(fast, add_input(fast, [chat_line(1)]))["id"])
    with pytest.raises(ApiError) as info:
        fast.cancel_batch(batch["id"])
    assert info.value.status == 409
    assert info.value.body()["error"] == {
        "message": "Cannot cancel a batch with status 'completed'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_output_files_expire_after_output_expires_after(manual: Emulator) -> None:
    batch = create(
        manual,
        add_input(manual, [chat_line(i) for i in range(5)]),
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    manual.advance(200)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "completed"
    out = manual.get_file(batch["output_file_id"])
    assert out["expires_at"] - out["created_at"] in (3599, 3600, 3601)
    path, _, _ = manual.file_content(batch["output_file_id"])
    manual.advance(3601)
    with pytest.raises(ApiError) as info:
        manual.get_file(batch["output_file_id"])
    assert info.value.status == 404
    assert not path.exists()
    listed = manual.list_files(purpose="batch_output")["data"]
    assert batch["output_file_id"] not in {f["id"] for f in listed}


def test_request_failure_rate_puts_that_share_in_the_error_file() -> None:
    with make(request_failure_rate=0.3) as em:
        batch = create(em, add_input(em, [chat_line(i) for i in range(1000)]))
        em.advance(3600)
        batch = em.get_batch(batch["id"])
        assert batch["status"] == "completed"
        counts = batch["request_counts"]
        assert 230 <= counts["failed"] <= 370
        assert counts["completed"] + counts["failed"] == 1000
        errors = read_lines(em, batch["error_file_id"])
        assert len(errors) == counts["failed"]
        for line in errors:
            assert line["error"] is None
            assert line["response"]["status_code"] == 500
            assert line["response"]["body"]["error"]["type"] == "server_error"
        done = read_lines(em, batch["output_file_id"])
        assert batch["usage"]["input_tokens"] == sum(
            x["response"]["body"]["usage"]["prompt_tokens"] for x in done
        )


def test_enqueued_token_limit_fails_new_batches_while_earlier_ones_are_open() -> None:
    lines = [chat_line(i) for i in range(100)]
    with make() as probe:
        probe_batch = create(probe, add_input(probe, lines))
        probe.advance(60)
        tokens = probe.stats()["enqueued_tokens"]["gpt-4o-mini"]
    with make(enqueued_token_limit=int(tokens * 1.5)) as em:
        first = create(em, add_input(em, lines))
        second = create(em, add_input(em, lines))
        other_model = create(em, add_input(em, [chat_line(i, model="gpt-4.1") for i in range(100)]))
        em.advance(61)
        assert em.get_batch(first["id"])["status"] == "in_progress"
        assert em.get_batch(other_model["id"])["status"] == "in_progress"
        refused = em.get_batch(second["id"])
        assert refused["status"] == "failed" and refused["failed_at"] is not None
        [err] = refused["errors"]["data"]
        assert err["code"] == "token_limit_exceeded" and err["line"] is None
        assert err["message"].startswith("Enqueued token limit reached for gpt-4o-mini")
        assert (
            "Please try again once some in_progress batches have been completed."
            in (err["message"])
        )
        em.advance(3600)
        assert em.get_batch(first["id"])["status"] == "completed"
        third = create(em, add_input(em, lines))
        em.advance(3600)
        assert em.get_batch(third["id"])["status"] == "completed"
    assert probe_batch["id"]


def test_stick_in_finalizing_holds_the_batch_until_unscripted(manual: Emulator) -> None:
    batch = create(manual, add_input(manual, [chat_line(i) for i in range(10)]))
    manual.script(batch["id"], stick_in="finalizing")
    manual.advance(7200)
    assert manual.get_batch(batch["id"])["status"] == "finalizing"
    manual.script(batch["id"], stick_in=None)
    manual.settle()
    assert manual.get_batch(batch["id"])["status"] == "completed"


def test_script_fail_and_script_next_by_metadata(manual: Emulator) -> None:
    file_id = add_input(manual, [chat_line(i) for i in range(3)])
    plain = create(manual, file_id)
    manual.script(plain["id"], fail="model_not_found")
    manual.script_next({"job": "x"}, times=2, fail="invalid_request")
    other = create(manual, file_id, metadata={"job": "y"})
    hit1 = create(manual, file_id, metadata={"job": "x", "shard": "1"})
    hit2 = create(manual, file_id, metadata={"job": "x", "shard": "2"})
    miss = create(manual, file_id, metadata={"job": "x", "shard": "3"})
    manual.advance(600)
    status = {b["id"]: b for b in manual.batches()}
    assert status[plain["id"]]["errors"]["data"][0]["code"] == "model_not_found"
    assert status[hit1["id"]]["status"] == status[hit2["id"]]["status"] == "failed"
    assert status[hit1["id"]]["errors"]["data"][0]["code"] == "invalid_request"
    assert status[other["id"]]["status"] == status[miss["id"]]["status"] == "completed"


def test_expire_at_fraction_expires_half_way(manual: Emulator) -> None:
    manual.script_next(expire_at_fraction=0.5)
    batch = create(manual, add_input(manual, [chat_line(i) for i in range(100)]))
    manual.advance(600)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "expired"
    assert batch["request_counts"] == {"total": 100, "completed": 50, "failed": 50}
    assert len(read_lines(manual, batch["error_file_id"])) == 50


def test_stats_and_batches_for_assertions(manual: Emulator) -> None:
    file_id = add_input(manual, [chat_line(1)])
    for i in range(3):
        create(manual, file_id, metadata={"local_id": str(i)})
    stats = manual.stats()
    assert stats["batches_created"] == 3 and stats["files_created"] == 1
    assert [b["metadata"]["local_id"] for b in manual.batches()] == ["0", "1", "2"]


def test_deleting_the_input_file_of_an_open_batch_does_not_break_it(manual: Emulator) -> None:
    file_id = add_input(manual, [chat_line(i) for i in range(20)])
    batch = create(manual, file_id)
    manual.delete_file(file_id)
    with pytest.raises(ApiError):
        manual.get_file(file_id)
    manual.advance(600)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 20


def test_batch_list_pages_newest_first(manual: Emulator) -> None:
    file_id = add_input(manual, [chat_line(1)])
    ids = [create(manual, file_id)["id"] for _ in range(45)]
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = manual.list_batches(after=after, limit=20)
        pages += 1
        seen += [b["id"] for b in page["data"]]
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == 3
    assert seen == ids[::-1]


def test_advance_is_fast_with_many_open_batches(manual: Emulator) -> None:
    file_id = add_input(manual, [chat_line(i) for i in range(10)])
    for _ in range(500):
        create(manual, file_id)
    started = time.perf_counter()
    manual.advance(3600)
    assert time.perf_counter() - started < 10
    assert manual.stats()["batch_statuses"] == {"completed": 500}
