"""The fast path of result scanning (`scan_line`, `scan_line_tokens`) against a full parse +
`classify` (+ `tokens_of`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from jobqueue.files.results import (
    classify,
    scan_line,
    scan_line_tokens,
    scan_result_file,
    tokens_of,
)


def reference(raw: bytes) -> tuple[str, bool, int | None, str | None] | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
        return (line["custom_id"], *classify(line))
    return None


def reference_tokens(raw: bytes) -> tuple[Any, ...] | None:
    found = reference(raw)
    if found is None:
        return None
    response = orjson.loads(raw).get("response")
    body = response.get("body") if isinstance(response, dict) else None
    return (*found, tokens_of(body))


def _body(dims: int = 8) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5 - i / 7 for i in range(dims)]}
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }


IDS = [
    "req-1",
    "",
    'with "quotes"',
    "back\\slash",
    "tab\there",
    "café",
    "日本語",
    "emoji 😀",
    "a/b",
]
SHAPES: list[dict[str, Any]] = []
for cid in IDS:
    SHAPES += [
        {
            "id": "batch_req_1",
            "custom_id": cid,
            "response": {"status_code": 200, "body": _body()},
            "error": None,
        },
        {"custom_id": cid, "response": {"status_code": 201, "request_id": "r", "body": {}}},
        {
            "id": "x",
            "custom_id": cid,
            "response": {
                "status_code": 400,
                "body": {"error": {"code": "invalid_value", "message": "m"}},
            },
            "error": None,
        },
        {
            "id": "x",
            "custom_id": cid,
            "response": {
                "status_code": 429,
                "body": {"error": {"type": "rate_limit", "message": "m"}},
            },
            "error": None,
        },
        {
            "id": "x",
            "custom_id": cid,
            "response": {"status_code": 500, "body": "oops"},
            "error": None,
        },
        {
            "id": "x",
            "custom_id": cid,
            "response": None,
            "error": {"code": "batch_expired", "message": "m"},
        },
        {
            "id": "x",
            "custom_id": cid,
            "response": {"status_code": 200, "body": {}},
            "error": {"code": "weird", "message": "m"},
        },
        {"id": "x", "custom_id": cid, "response": {"status_code": 200}, "error": {}},
        {"id": "x", "custom_id": cid, "response": {"status_code": 200}, "error": "boom"},
        {"id": "x", "custom_id": cid, "response": {"status_code": 200}, "error": False},
        {"id": "x", "custom_id": cid, "response": {}, "error": None},
        {"id": "x", "custom_id": cid, "response": None, "error": None},
        {"id": "x", "custom_id": cid},
        {"id": "x", "custom_id": cid, "response": {"status_code": 200.0}},
        {"id": "x", "custom_id": cid, "response": {"status_code": True}},
        {"id": "x", "custom_id": cid, "response": {"status_code": 299, "body": [1, 2]}},
        {"id": "x", "custom_id": cid, "response": {"status_code": 300}},
        {"id": "x", "custom_id": cid, "response": {"status_code": 199}},
        {"id": "x", "custom_id": cid, "response": [200]},
        {"response": {"status_code": 200, "custom_id": cid}, "custom_id": cid},
    ]
SHAPES += [
    {"id": "x", "custom_id": 5, "response": {"status_code": 200}},
    {"id": "x", "response": {"status_code": 200}},
    {"id": "x", "custom_id": None, "response": {"status_code": 200}},
]


_CHAT_USAGE = {
    "prompt_tokens": 1300,
    "completion_tokens": 40,
    "total_tokens": 1340,
    "prompt_tokens_details": {"cached_tokens": 1280, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 24, "audio_tokens": 0},
}
_RESPONSES_USAGE = {
    "input_tokens": 900,
    "input_tokens_details": {"cached_tokens": 768, "cache_write_tokens": 0},
    "output_tokens": 50,
    "output_tokens_details": {"reasoning_tokens": 10},
    "total_tokens": 950,
}
# (usage, the tokens it gives): every shape of the four endpoints, and odd ones.
USAGES: list[tuple[Any, tuple[int, int, int, int] | None]] = [
    (_CHAT_USAGE, (1300, 1280, 40, 24)),
    (_RESPONSES_USAGE, (900, 768, 50, 10)),
    ({"prompt_tokens": 7, "total_tokens": 7}, (7, 0, 0, 0)),  # embeddings
    ({"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}, (5, 0, 9, 0)),
    ({**_CHAT_USAGE, "prompt_tokens_details": None}, (1300, 0, 40, 24)),
    ({**_CHAT_USAGE, "completion_tokens": 40.0}, (1300, 1280, 0, 24)),  # not an integer
    ({**_RESPONSES_USAGE, "output_tokens_details": 3}, (900, 768, 50, 0)),
    ({"prompt_tokens": True}, (0, 0, 0, 0)),
    ({}, (0, 0, 0, 0)),
    (None, None),
    (17, None),
]
USAGE_LINES = [
    {"custom_id": "u", "response": {"status_code": 200, "body": {"x": [1.5], "usage": u}}}
    for u, _ in USAGES
]


def _encodings(obj: Any) -> list[bytes]:
    compact = orjson.dumps(obj)
    # OpenAI's style: spaces after colons and commas, non-ASCII escaped or not.
    return [
        compact,
        json.dumps(obj).encode(),
        json.dumps(obj, ensure_ascii=False).encode(),
        json.dumps(obj, indent=None, separators=(" , ", " : ")).encode(),
    ]


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_scan_line_matches_full_parse(index: int) -> None:
    for raw in _encodings(SHAPES[index]):
        assert scan_line(raw) == reference(raw), raw


@pytest.mark.parametrize("index", range(len(SHAPES) + len(USAGE_LINES)))
def test_scan_line_tokens_matches_full_parse(index: int) -> None:
    shape = (SHAPES + USAGE_LINES)[index]
    for raw in _encodings(shape):
        found = scan_line_tokens(raw)
        assert found == reference_tokens(raw), raw
        assert found is None or found[:4] == scan_line(raw)


@pytest.mark.parametrize(("usage", "tokens"), USAGES)
def test_tokens_of_each_usage_shape(usage: Any, tokens: Any) -> None:
    raw = orjson.dumps(
        {"custom_id": "u", "response": {"status_code": 200, "body": {"usage": usage}}}
    )
    assert scan_line_tokens(raw) == ("u", True, 200, None, tokens)
    error = {"custom_id": "e", "response": None, "error": {"code": "batch_expired"}}
    assert scan_line_tokens(orjson.dumps(error)) == ("e", False, None, "batch_expired", None)


ODD_LINES = [
    b'{"custom_id":"a","response":{"status_code":200},"error":null',  # cut short
    b'{"custom_id":"a","response":{"status_code":200},"error":null} x',
    b'{"custom_id":"a","response":{"status_code":200,"body":[1,]},"error":null}',
    b'{"custom_id":"a","response":{"status_code":200,"body":"\xff"},"error":null}',
    b'{"custom_id":"a","response":{"status_code":200,"body":"\xed\xa0\x80"},"error":null}',
    b'{"custom_id":"a","response":{"status_code":200,"body":"\\ud800"},"error":null}',
    b'{"custom_id":"a","response":{"status_code":200,"body":NaN},"error":null}',
    b'{"custom_id":"a","response":{"status_code":0200},"error":null}',
    b'{"custom_id":"a","custom_id":"b","response":{"status_code":200},"error":null}',
    b'{"custom_id":"a","response":{"status_code":200,"status_code":503},"error":null}',
    b'{"custom_id":"\\u00e9\\"x\\n","response":{"status_code":200}}',
    b'{"custom_id":"\\ud83d\\ude00","response":{"status_code":204}}',
    b'["custom_id", "a"]',
    b"null",
    b"",
]


@pytest.mark.parametrize("raw", ODD_LINES)
def test_scan_line_odd_lines(raw: bytes) -> None:
    assert scan_line(raw) == reference(raw)
    assert scan_line_tokens(raw) == reference_tokens(raw)


def test_scan_result_file_offsets(tmp_path: Path) -> None:
    lines = [orjson.dumps(s) for s in SHAPES[:40]]
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"\n".join(lines[:20]) + b"\n\n  \n" + b"\r\n".join(lines[20:]) + b"\n")
    data = path.read_bytes()
    seen = list(scan_result_file(path, "output"))
    expected = [reference(raw) for raw in lines]
    assert [(o.custom_id, o.succeeded, o.status_code, o.error_code) for o in seen] == [
        e for e in expected if e is not None
    ]
    for o in seen:
        assert o.kind == "output"
        assert scan_line(data[o.offset : o.offset + o.length].strip()) is not None
