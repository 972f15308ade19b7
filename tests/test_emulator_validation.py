"""Validation as the remote does it: asynchronous `failed` batches with `errors.data`."""

from __future__ import annotations

from typing import Any

import pytest

from jobqueue.emulator import Emulator, EmulatorConfig
from jobqueue.emulator.errors import ApiError
from tests.test_emulator_helpers import CHAT, add_input, chat_line, create, manual

__all__ = ["manual"]


def failed_errors(em: Emulator, batch: dict[str, Any]) -> list[dict[str, Any]]:
    em.advance(61)
    batch = em.get_batch(batch["id"])
    assert batch["status"] == "failed"
    assert batch["failed_at"] is not None and batch["in_progress_at"] is None
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["errors"]["object"] == "list"
    return batch["errors"]["data"]


def without(key: str, i: int = 1) -> dict[str, Any]:
    line = chat_line(i)
    del line[key]
    return line


@pytest.mark.parametrize(
    ("lines", "code", "param", "line_no"),
    [
        ([chat_line(0), "{not json", chat_line(2)], "invalid_json_line", None, 2),
        ([chat_line(0), "[1, 2]"], "invalid_json_line", None, 2),
        ([without("custom_id")], "missing_required_parameter", "custom_id", 1),
        ([chat_line(0), without("method")], "missing_required_parameter", "method", 2),
        ([without("url")], "missing_required_parameter", "url", 1),
        ([without("body")], "missing_required_parameter", "body", 1),
        ([chat_line(0, url="/v1/embeddings")], "invalid_url", "url", 1),
        ([chat_line(0), chat_line(1), chat_line(0)], "duplicate_custom_id", "custom_id", 3),
        ([chat_line(0), chat_line(1, model="gpt-4.1")], "model_mismatch", "body.model", 2),
        ([chat_line(0, method="GET")], "invalid_request", "method", 1),
        (
            [{**chat_line(0), "body": {"model": "m", "messages": [], "stream": True}}],
            "streaming_unsupported",
            "body.stream",
            1,
        ),
        (
            [{**chat_line(0), "body": {"messages": []}}],
            "missing_required_parameter",
            "body.model",
            1,
        ),
    ],
)
def test_invalid_lines_fail_the_batch_with_their_code_and_line(
    manual: Emulator, lines: list[Any], code: str, param: str | None, line_no: int
) -> None:
    batch = create(manual, add_input(manual, lines))
    assert batch["status"] == "validating"  # never a 400 at create
    errors = failed_errors(manual, batch)
    assert errors[0]["code"] == code
    assert errors[0]["param"] == param
    assert errors[0]["line"] == line_no
    assert errors[0]["message"]


def test_several_problems_are_listed(manual: Emulator) -> None:
    lines = ["{", chat_line(1), without("body", 2), chat_line(1)]
    errors = failed_errors(manual, create(manual, add_input(manual, lines)))
    assert [(e["code"], e["line"]) for e in errors] == [
        ("invalid_json_line", 1),
        ("missing_required_parameter", 3),
        ("duplicate_custom_id", 4),
    ]


def test_empty_file(manual: Emulator) -> None:
    [err] = failed_errors(manual, create(manual, add_input(manual, [])))
    assert err["code"] == "empty_file" and err["line"] is None


def test_blank_lines_are_ignored(manual: Emulator) -> None:
    batch = create(manual, add_input(manual, [chat_line(0), "", "  ", chat_line(1)]))
    manual.advance(600)
    batch = manual.get_batch(batch["id"])
    assert batch["status"] == "completed" and batch["request_counts"]["total"] == 2


def test_too_many_requests_and_too_many_bytes() -> None:
    with Emulator(EmulatorConfig(max_requests=5, max_bytes=2000)) as em:
        [err] = failed_errors(em, create(em, add_input(em, [chat_line(i) for i in range(6)])))
        assert err["code"] == "too_many_tasks" and err["line"] is None
        big = [chat_line(i, extra="x" * 400) for i in range(5)]
        [err] = failed_errors(em, create(em, add_input(em, big)))
        assert err["code"] == "file_too_large"
        ok = create(em, add_input(em, [chat_line(i) for i in range(5)]))
        em.advance(600)
        assert em.get_batch(ok["id"])["status"] == "completed"


def test_missing_input_file_is_accepted_then_fails(manual: Emulator) -> None:
    batch = create(manual, "file-doesnotexist")
    assert batch["status"] == "validating"
    [err] = failed_errors(manual, batch)
    assert err["code"] == "file_not_found" and err["param"] == "input_file_id"


def test_input_file_with_another_purpose_fails(manual: Emulator) -> None:
    path = manual.upload_path()
    path.write_bytes(b"{}\n")
    file_id = manual.add_file(path, filename="x.jsonl", purpose="user_data", size=3)["id"]
    [err] = failed_errors(manual, create(manual, file_id))
    assert err["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ({"endpoint": "/v1/audio/speech"}, "endpoint", "invalid_value"),
        ({"endpoint": "/v1/chat"}, "endpoint", "invalid_value"),
        ({"completion_window": "48h"}, "completion_window", "invalid_value"),
        ({"input_file_id": None}, "input_file_id", "missing_required_parameter"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
        ({"metadata": {"k": 1}}, "metadata", "invalid_value"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "invalid_value"),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
            "output_expires_after.seconds",
            "invalid_value",
        ),
        (
            {"output_expires_after": {"anchor": "now", "seconds": 3600}},
            "output_expires_after.anchor",
            "invalid_value",
        ),
    ],
)
def test_bad_create_requests_are_400_at_once(
    manual: Emulator, payload: dict[str, Any], param: str, code: str
) -> None:
    body = {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h", **payload}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(ApiError) as info:
        manual.create_batch(body)
    assert info.value.status == 400
    assert info.value.param == param and info.value.code == code
    assert info.value.type == "invalid_request_error"
    assert manual.stats()["batches_created"] == 0
